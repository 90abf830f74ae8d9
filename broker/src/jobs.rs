//! The job table: every accepted job, its state, its buffered output, and who is waiting.
//!
//! Delivery is at most once and every accepted job ends in exactly one terminal state:
//! [`JobTable::finish`] is the only way to a terminal state and it wins only once, however
//! many paths (runner result, stream error, connection loss, cancel, timeout) race for it.
//! Finished jobs are kept for `GET`, bounded in count and age.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::names;

/// Output kept per job in the broker; later output is dropped and the job marked truncated.
pub(crate) const MAX_BUFFERED_OUTPUT: usize = 1024 * 1024;

pub(crate) use runnel_protocol::{JobInfo as JobView, JobState};

/// What a job asks of its runner (fixed at creation).
#[derive(Debug, Clone)]
pub(crate) struct JobSpec {
    /// Owner whose runners may take it.
    pub owner: String,
    /// Optional explicit runner.
    pub runner_id: Option<String>,
    /// Labels the runner must carry.
    pub labels: BTreeMap<String, String>,
    /// Handler kind.
    pub kind: String,
    /// Handler payload.
    pub payload: Vec<u8>,
    /// Run-time limit.
    pub timeout: Duration,
    /// Queue-wait limit.
    pub queue_timeout: Duration,
}

#[derive(Debug)]
struct JobInner {
    state: JobState,
    runner_id: Option<String>,
    exit_code: Option<i32>,
    message: String,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    output: Vec<u8>,
    output_truncated: bool,
}

/// One job.
#[derive(Debug)]
pub(crate) struct JobEntry {
    /// Job id.
    pub id: String,
    /// Tenant (from the dispatching key).
    pub tenant: String,
    /// What it asks.
    pub spec: JobSpec,
    /// Creation time, unix milliseconds.
    pub created_at_ms: i64,
    /// When it was accepted (for queue-wait and latency).
    pub accepted: Instant,
    /// Fired by `POST /v1/jobs/{id}/cancel`.
    pub cancel: CancellationToken,
    inner: Mutex<JobInner>,
    changed: watch::Sender<u64>,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl JobEntry {
    fn lock(&self) -> MutexGuard<'_, JobInner> {
        // A panic while holding this lock would be a bug; keep serving the data anyway.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Current state.
    pub(crate) fn state(&self) -> JobState {
        self.lock().state
    }

    /// Queued → running on `runner_id`; false if the job is no longer queued.
    pub(crate) fn mark_running(&self, runner_id: &str) -> bool {
        let mut g = self.lock();
        if g.state != JobState::Queued {
            return false;
        }
        g.state = JobState::Running;
        g.runner_id = Some(runner_id.into());
        g.started_at = Some(now_ms());
        drop(g);
        metrics::histogram!(names::QUEUE_WAIT).record(self.accepted.elapsed().as_secs_f64());
        metrics::gauge!(names::JOBS_IN_FLIGHT).increment(1.0);
        self.bump();
        true
    }

    /// Appends output, up to [`MAX_BUFFERED_OUTPUT`].
    pub(crate) fn append_output(&self, data: &[u8]) {
        let mut g = self.lock();
        if g.state.is_terminal() {
            return;
        }
        let room = MAX_BUFFERED_OUTPUT.saturating_sub(g.output.len());
        if data.len() > room {
            g.output_truncated = true;
        }
        let take = data.len().min(room);
        g.output.extend_from_slice(&data[..take]);
        drop(g);
        self.bump();
    }

    /// Output from `offset` on, and whether the job is over.
    pub(crate) fn output_since(&self, offset: usize) -> (Vec<u8>, bool) {
        let g = self.lock();
        let chunk = g.output.get(offset..).map(<[u8]>::to_vec).unwrap_or_default();
        (chunk, g.state.is_terminal())
    }

    /// A change counter to wait on.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Waits until the job is over or `limit` passes; returns whether it is over.
    pub(crate) async fn wait_terminal(&self, limit: Duration) -> bool {
        let mut rx = self.subscribe();
        let wait = async {
            loop {
                if self.state().is_terminal() {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
        self.state().is_terminal()
    }

    /// The API view.
    pub(crate) fn view(&self) -> JobView {
        let g = self.lock();
        let output = String::from_utf8_lossy(&g.output).into_owned();
        self.view_of(&g, output)
    }

    /// [`JobEntry::view`] without the output (lists: a job's output is fetched alone).
    pub(crate) fn summary(&self) -> JobView {
        let g = self.lock();
        self.view_of(&g, String::new())
    }

    fn view_of(&self, g: &JobInner, output: String) -> JobView {
        JobView {
            id: self.id.clone(),
            owner: self.spec.owner.clone(),
            kind: self.spec.kind.clone(),
            state: g.state,
            runner_id: g.runner_id.clone(),
            exit_code: g.exit_code,
            message: g.message.clone(),
            created_at_ms: self.created_at_ms,
            started_at_ms: g.started_at,
            finished_at_ms: g.finished_at,
            output,
            output_truncated: g.output_truncated,
        }
    }
}

/// The terminal facts of a job.
#[derive(Debug, Clone)]
pub(crate) struct Finish {
    /// Terminal state.
    pub state: JobState,
    /// Exit code, where the process exited.
    pub exit_code: Option<i32>,
    /// How it ended, in words (the runner's message, or why the broker ended it).
    pub message: String,
    /// Whether the runner cut output.
    pub output_truncated: bool,
}

impl Finish {
    /// A finish with only a state and message.
    pub(crate) fn new(state: JobState, message: impl Into<String>) -> Self {
        Self { state, exit_code: None, message: message.into(), output_truncated: false }
    }
}

/// All jobs.
#[derive(Debug)]
pub(crate) struct JobTable {
    jobs: DashMap<String, Arc<JobEntry>>,
    finished: Mutex<VecDeque<(Instant, String)>>,
    retention: usize,
    retention_age: Duration,
}

impl JobTable {
    /// A table keeping `retention` finished jobs for at most `retention_age`.
    pub(crate) fn new(retention: usize, retention_age: Duration) -> Self {
        Self {
            jobs: DashMap::new(),
            finished: Mutex::new(VecDeque::new()),
            retention,
            retention_age,
        }
    }

    /// Creates and registers a queued job.
    pub(crate) fn create(
        &self,
        tenant: &str,
        spec: JobSpec,
        home: Option<(&str, i64)>,
    ) -> Arc<JobEntry> {
        let (changed, _) = watch::channel(0);
        let id = match home {
            None => crate::secret::new_id("job"),
            Some((node, epoch)) => format!("{}-e{epoch}-{node}", crate::secret::new_id("job")),
        };
        let entry = Arc::new(JobEntry {
            id,
            tenant: tenant.into(),
            spec,
            created_at_ms: now_ms(),
            accepted: Instant::now(),
            cancel: CancellationToken::new(),
            inner: Mutex::new(JobInner {
                state: JobState::Queued,
                runner_id: None,
                exit_code: None,
                message: String::new(),
                started_at: None,
                finished_at: None,
                output: Vec::new(),
                output_truncated: false,
            }),
            changed,
        });
        self.jobs.insert(entry.id.clone(), entry.clone());
        entry
    }

    /// (cluster) The home node and epoch a job id names: `job-<hex>-e<epoch>-<node>`. None
    /// for a single node's ids (`job-<hex>`) and for anything malformed.
    pub(crate) fn home_of(id: &str) -> Option<(&str, i64)> {
        let rest = id.strip_prefix("job-")?;
        let (_random, rest) = rest.split_once('-')?;
        let (epoch, node) = rest.strip_prefix('e')?.split_once('-')?;
        let epoch = epoch.parse::<i64>().ok()?;
        runnel_certs::identity::validate_segment("node", node).ok()?;
        Some((node, epoch))
    }

    /// Forgets a job that was never accepted (its dispatch was refused).
    pub(crate) fn discard(&self, id: &str) {
        self.jobs.remove(id);
    }

    /// A job of `tenant`; another tenant's job is simply not found.
    pub(crate) fn get(&self, tenant: &str, id: &str) -> Option<Arc<JobEntry>> {
        self.jobs.get(id).filter(|e| e.tenant == tenant).map(|e| e.clone())
    }

    /// Jobs of a tenant (optionally one owner), newest first, at most `limit`.
    pub(crate) fn list(&self, tenant: &str, owner: Option<&str>, limit: usize) -> Vec<JobView> {
        let mut v: Vec<JobView> = self
            .jobs
            .iter()
            .filter(|e| e.tenant == tenant && owner.is_none_or(|o| o == e.spec.owner))
            .map(|e| e.summary())
            .collect();
        v.sort_by_key(|j| std::cmp::Reverse(j.created_at_ms));
        v.truncate(limit);
        v
    }

    /// How many jobs of any tenant are not over yet (queued or running).
    pub(crate) fn unfinished_count(&self) -> usize {
        self.jobs.iter().filter(|e| !e.state().is_terminal()).count()
    }

    /// Non-terminal jobs of a tenant (used when its actor restarts).
    pub(crate) fn unfinished(&self, tenant: &str) -> Vec<Arc<JobEntry>> {
        self.jobs
            .iter()
            .filter(|e| e.tenant == tenant && !e.state().is_terminal())
            .map(|e| e.clone())
            .collect()
    }

    /// Moves a job to a terminal state. Only the first call for a job wins; it returns true.
    pub(crate) fn finish(&self, entry: &JobEntry, f: Finish) -> bool {
        debug_assert!(f.state.is_terminal());
        let mut g = entry.lock();
        if g.state.is_terminal() {
            return false;
        }
        if g.state == JobState::Running {
            metrics::gauge!(names::JOBS_IN_FLIGHT).decrement(1.0);
        }
        metrics::counter!(names::DISPATCHES, "outcome" => f.state.name()).increment(1);
        metrics::histogram!(names::DISPATCH_LATENCY).record(entry.accepted.elapsed().as_secs_f64());
        g.state = f.state;
        g.exit_code = f.exit_code;
        g.message = f.message;
        g.output_truncated |= f.output_truncated;
        g.finished_at = Some(now_ms());
        drop(g);
        entry.bump();
        tracing::debug!(job = %entry.id, state = f.state.name(), "job finished");
        self.retire(&entry.id);
        true
    }

    fn retire(&self, id: &str) {
        let now = Instant::now();
        let mut q = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        q.push_back((now, id.to_owned()));
        while let Some((at, old)) = q.front() {
            if q.len() > self.retention || now.duration_since(*at) > self.retention_age {
                self.jobs.remove(old);
                q.pop_front();
            } else {
                break;
            }
        }
    }

    /// Jobs in the table (all states).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            owner: "o".into(),
            runner_id: None,
            labels: BTreeMap::new(),
            kind: "exec".into(),
            payload: vec![],
            timeout: Duration::from_secs(1),
            queue_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn only_the_first_terminal_transition_wins() {
        let t = JobTable::new(10, Duration::from_secs(60));
        let homed = t.create("t", spec(), Some(("node-a.1", 42)));
        assert_eq!(JobTable::home_of(&homed.id), Some(("node-a.1", 42)));
        let j = t.create("t", spec(), None);
        assert_eq!(JobTable::home_of(&j.id), None);
        for bad in
            ["job-", "job-abc", "job-abc-42-n", "job-abc-ex-n", "job-abc-e1-a/b", "x-abc-e1-n"]
        {
            assert_eq!(JobTable::home_of(bad), None, "{bad}");
        }
        assert!(j.mark_running("r1"));
        assert!(!j.mark_running("r2"));
        assert!(t.finish(&j, Finish::new(JobState::Succeeded, "")));
        assert!(!t.finish(&j, Finish::new(JobState::RunnerLost, "late")));
        assert_eq!(j.view().state, JobState::Succeeded);
        assert_eq!(j.view().runner_id.as_deref(), Some("r1"));
    }

    #[test]
    fn other_tenants_jobs_are_not_found() {
        let t = JobTable::new(10, Duration::from_secs(60));
        let j = t.create("a", spec(), None);
        assert!(t.get("a", &j.id).is_some());
        assert!(t.get("b", &j.id).is_none());
        assert!(t.list("b", None, 10).is_empty());
    }

    #[test]
    fn retention_bounds_finished_jobs_but_never_unfinished_ones() {
        let t = JobTable::new(2, Duration::from_secs(60));
        let running = t.create("t", spec(), None);
        let ids: Vec<_> = (0..5)
            .map(|_| {
                let j = t.create("t", spec(), None);
                t.finish(&j, Finish::new(JobState::Failed, "x"));
                j.id.clone()
            })
            .collect();
        assert!(t.get("t", &running.id).is_some());
        assert!(t.get("t", &ids[0]).is_none());
        assert!(t.get("t", &ids[4]).is_some());
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn output_is_capped_and_marked() {
        let t = JobTable::new(2, Duration::from_secs(60));
        let j = t.create("t", spec(), None);
        j.append_output(&vec![b'a'; MAX_BUFFERED_OUTPUT - 1]);
        j.append_output(b"bcd");
        let v = j.view();
        assert_eq!(v.output.len(), MAX_BUFFERED_OUTPUT);
        assert!(v.output_truncated);
    }
}
