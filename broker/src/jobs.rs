//! The job table: every accepted job, its state, its buffered output, and who is waiting.
//!
//! Delivery is at most once and every accepted job ends in exactly one terminal state:
//! [`JobTable::finish`] is the only way to a terminal state and it wins only once, however
//! many paths (runner result, stream error, connection loss, cancel, timeout) race for it.
//! Finished jobs are kept for `GET`, per tenant and bounded in count, age and bytes (see
//! [`Budget`]), so that one tenant's flood never evicts another tenant's results.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Context;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures::task::AtomicWaker;
use tokio::sync::Notify;

/// Output kept per job in the broker; later output is dropped and the job marked truncated.
pub(crate) const MAX_BUFFERED_OUTPUT: usize = 1024 * 1024;

pub(crate) use runnel_protocol::{JobInfo as JobView, JobInfoRef, JobState};

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

/// What a job lane watches for its jobs' cancels: one flag and one waker for all of them,
/// so that a lane holds no future per job (`actors/job_lane.rs`). A job taken by a lane
/// is hooked to it ([`JobEntry::hook_cancel`]); [`JobEntry::cancel`] fires the hook.
#[derive(Debug, Default)]
pub(crate) struct CancelHook {
    fired: AtomicBool,
    waker: AtomicWaker,
}

impl CancelHook {
    /// Whether a hooked job was cancelled since the last call; the task of `cx` is woken
    /// at the next one.
    pub(crate) fn take(&self, cx: &Context<'_>) -> bool {
        self.waker.register(cx.waker());
        self.fired.swap(false, Ordering::AcqRel)
    }

    fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.waker.wake();
    }
}

#[derive(Debug)]
struct JobInner {
    state: JobState,
    /// The lane that holds the job, told of its cancel.
    cancel_hook: Option<Arc<CancelHook>>,
    runner_id: Option<Arc<str>>,
    exit_code: Option<i32>,
    message: String,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    /// Sent to the runner; let go of when the job ends.
    payload: Vec<u8>,
    output: Vec<u8>,
    output_truncated: bool,
    output_expired: bool,
}

/// Most output one read of a job's live output takes: a follower's copy, and what a
/// reader that does not keep up leaves queued on its connection, stay this small
/// however much output the job has.
pub(crate) const OUTPUT_PIECE: usize = 64 * 1024;

/// One job.
#[derive(Debug)]
pub(crate) struct JobEntry {
    /// Job id.
    pub id: String,
    /// The id's random part: the job's key in [`JobTable`]'s map.
    key: u64,
    /// Creation order in the table (the list cursor).
    seq: u64,
    /// Tenant (from the dispatching key).
    pub tenant: String,
    /// What it asks (its payload is held in the entry until the job ends: see
    /// [`JobEntry::payload`]).
    pub spec: JobSpec,
    /// Creation time, unix milliseconds.
    pub created_at_ms: i64,
    /// When it was accepted (for queue-wait and latency).
    pub accepted: Instant,
    /// Set by `POST /v1/jobs/{id}/cancel` ([`JobEntry::cancel`]). A flag and the entry's
    /// `changed`, not a `CancellationToken`: a token is an `Arc`'d node with a mutex that
    /// every job would allocate and, long after, drop cold when retention forgets it
    /// (1.4% of the broker's CPU per job, BENCHMARKS.md).
    cancelled: AtomicBool,
    /// Who has the job's dispatch: its tenant actor's mailbox, the actor (deciding), or
    /// its caller, who gave up first ([`JobEntry::take_dispatch`]).
    handover: AtomicU8,
    inner: Mutex<JobInner>,
    /// Wakes whoever waits on the job (its output, its cancel, its end) at each output, at
    /// a cancel and at the end; not at its start, which nobody waits for. One `Notify`,
    /// not a `watch` channel: a watch allocates 8 of them per channel and locks every one
    /// at each send (BENCHMARKS.md, 2026-12-05 later). A second `Notify` for the end alone
    /// (a waiter for the end is woken by each output too) measured nothing (BENCHMARKS.md,
    /// ninth session).
    changed: Notify,
}

/// [`JobEntry::handover`]: the dispatch waits in its tenant actor's mailbox.
const IN_MAILBOX: u8 = 0;
/// The tenant actor took the dispatch to decide it; its caller waits for the verdict.
const TAKEN: u8 = 1;
/// The caller's time limit passed first: it answered and let go of the job.
const GIVEN_UP: u8 = 2;

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl JobEntry {
    fn lock(&self) -> MutexGuard<'_, JobInner> {
        // A panic while holding this lock would be a bug; keep serving the data anyway.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.notify_waiters();
    }

    /// The job's key in the table: its id's random part, unique among the table's jobs.
    pub(crate) fn key(&self) -> u64 {
        self.key
    }

    /// Current state.
    pub(crate) fn state(&self) -> JobState {
        self.lock().state
    }

    /// Queued → running on `runner_id`; false if the job is no longer queued.
    pub(crate) fn mark_running(&self, runner_id: &Arc<str>) -> bool {
        let mut g = self.lock();
        if g.state != JobState::Queued {
            return false;
        }
        g.state = JobState::Running;
        g.runner_id = Some(runner_id.clone());
        g.started_at = Some(now_ms());
        drop(g);
        let m = crate::metrics::jobs();
        m.queue_wait.record(self.accepted.elapsed().as_secs_f64());
        m.in_flight.increment(1.0);
        // Nobody waits for a start (only for output, a cancel or the end): no wakeup.
        true
    }

    /// Cancels the job: whoever waits on [`JobEntry::cancelled`] wakes, and the lane that
    /// holds it hears.
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.bump();
        if let Some(hook) = self.lock().cancel_hook.clone() {
            hook.fire();
        }
    }

    /// The tenant actor takes the job's dispatch to decide it: false when its caller gave
    /// up first (the job must not run). Exactly one of this and
    /// [`JobEntry::give_up_dispatch`] wins.
    pub(crate) fn take_dispatch(&self) -> bool {
        self.leave_mailbox(TAKEN)
    }

    /// The dispatch's caller stops waiting for the tenant actor: false when the actor has
    /// taken the dispatch already (then its verdict is on the way and must be waited for).
    pub(crate) fn give_up_dispatch(&self) -> bool {
        self.leave_mailbox(GIVEN_UP)
    }

    /// The dispatch leaves the mailbox to `to`, unless it left already.
    fn leave_mailbox(&self, to: u8) -> bool {
        self.handover.compare_exchange(IN_MAILBOX, to, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Whether the job was cancelled.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Waits until the job is cancelled.
    pub(crate) async fn cancelled(&self) {
        loop {
            // Made before the check, as in `next_output`.
            let changed = self.changed.notified();
            if self.is_cancelled() {
                return;
            }
            changed.await;
        }
    }

    /// A job lane takes the job: its cancel is told to `hook` from now on. Answers whether
    /// it was cancelled already.
    pub(crate) fn hook_cancel(&self, hook: &Arc<CancelHook>) -> bool {
        self.lock().cancel_hook = Some(hook.clone());
        self.is_cancelled()
    }

    /// `f` of the payload to send to the runner (empty once the job has ended), read in
    /// place under the entry's lock (keep `f` short).
    pub(crate) fn with_payload<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&self.lock().payload)
    }

    /// Appends output, up to [`MAX_BUFFERED_OUTPUT`] and `room` bytes; answers how many
    /// bytes it kept (the table accounts them to the tenant), None when the job is over.
    /// The first chunk that fits whole becomes the output as it is, not a copy. The
    /// caller wakes the job's followers ([`JobEntry::bump`]) once it holds no lock.
    fn append_output(&self, data: Vec<u8>, room: usize) -> Option<usize> {
        let mut g = self.lock();
        if g.state.is_terminal() {
            return None;
        }
        let room = MAX_BUFFERED_OUTPUT.saturating_sub(g.output.len()).min(room);
        if data.len() > room {
            g.output_truncated = true;
        }
        let take = data.len().min(room);
        if g.output.is_empty() && take == data.len() {
            g.output = data;
        } else {
            g.output.extend_from_slice(&data[..take]);
        }
        Some(take)
    }

    /// Lets go of a finished job's output; answers the bytes freed.
    fn expire_output(&self) -> usize {
        let mut g = self.lock();
        let freed = std::mem::take(&mut g.output).len();
        g.output_expired |= freed > 0;
        freed
    }

    /// Payload and output bytes the job holds.
    fn held_bytes(&self) -> usize {
        let g = self.lock();
        g.payload.len() + g.output.len()
    }

    /// Output from `offset` on, at most [`OUTPUT_PIECE`] bytes of it, and whether the job
    /// is over with nothing after this piece.
    pub(crate) fn output_since(&self, offset: usize) -> (Vec<u8>, bool) {
        let g = self.lock();
        let rest = g.output.get(offset..).unwrap_or_default();
        let piece = &rest[..rest.len().min(OUTPUT_PIECE)];
        (piece.to_vec(), g.state.is_terminal() && piece.len() == rest.len())
    }

    /// Output from `offset` on (at most [`OUTPUT_PIECE`] bytes) once there is some, or
    /// once the job is over; the bool says whether the job is over and this was the
    /// last of its output.
    pub(crate) async fn next_output(&self, offset: usize) -> (Vec<u8>, bool) {
        loop {
            // Made before the check: a `Notified` hears every `notify_waiters` from its
            // creation on, polled or not, so a change between the check and the await
            // is not missed.
            let changed = self.changed.notified();
            let (chunk, over) = self.output_since(offset);
            if over || !chunk.is_empty() {
                return (chunk, over);
            }
            changed.await;
        }
    }

    /// Waits until the job is over.
    pub(crate) async fn until_over(&self) {
        // No output lies past usize::MAX: this answers only once the job is over.
        let _ = self.next_output(usize::MAX).await;
    }

    /// The API view.
    pub(crate) fn view(&self) -> JobView {
        self.with_view(true, |v| v.to_info())
    }

    /// [`JobEntry::view`] without the output (lists: a job's output is fetched alone).
    pub(crate) fn summary(&self) -> JobView {
        self.with_view(false, |v| v.to_info())
    }

    /// `f` of the API view borrowed from the entry (under its lock: `f` must not block),
    /// with the output when `with_output`. An answer is encoded from it without copying the
    /// entry's strings first.
    pub(crate) fn with_view<R>(&self, with_output: bool, f: impl FnOnce(JobInfoRef<'_>) -> R) -> R {
        let most = if with_output { usize::MAX } else { 0 };
        self.with_view_up_to(most, |view, _| f(view))
    }

    /// [`JobEntry::with_view`] with the output only when it is at most `most` bytes; `f`
    /// is told whether it was left out (a larger output is neither copied nor checked).
    pub(crate) fn with_view_up_to<R>(
        &self,
        most: usize,
        f: impl FnOnce(JobInfoRef<'_>, bool) -> R,
    ) -> R {
        let g = self.lock();
        let left_out = g.output.len() > most;
        // Borrowed when the output is valid UTF-8, as it nearly always is. `from_utf8`
        // checks that a word at a time; `from_utf8_lossy` walks it in chunks even when
        // valid (its `Utf8Chunks` was ~0.5% of a native job's broker CPU).
        let output: Cow<'_, str> = if left_out {
            "".into()
        } else if let Ok(valid) = std::str::from_utf8(&g.output) {
            valid.into()
        } else {
            String::from_utf8_lossy(&g.output)
        };
        let view = JobInfoRef {
            id: &self.id,
            owner: &self.spec.owner,
            kind: &self.spec.kind,
            state: g.state,
            runner_id: g.runner_id.as_deref(),
            exit_code: g.exit_code,
            message: &g.message,
            created_at_ms: self.created_at_ms,
            started_at_ms: g.started_at,
            finished_at_ms: g.finished_at,
            output: &output,
            output_truncated: g.output_truncated,
            output_expired: g.output_expired,
        };
        f(view, left_out)
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

/// What one tenant may keep in the job table (`--job-retention`, `--job-retention-age`,
/// `--job-budget-bytes`, `--max-jobs-per-tenant`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// Finished jobs kept per tenant, newest.
    pub retention: usize,
    /// Finished jobs older than this are forgotten.
    pub retention_age: Duration,
    /// Bytes of payloads and output one tenant's jobs may hold. Past it the output of the
    /// tenant's oldest finished jobs goes first (the jobs stay, `output_expired`); then new
    /// output is cut (`output_truncated`) and new jobs are refused.
    pub bytes: usize,
    /// Queued plus running jobs per tenant.
    pub unfinished: usize,
}

/// Why a job was not accepted into the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OverBudget {
    /// The tenant has `Budget::unfinished` jobs queued or running.
    Unfinished(usize),
    /// Its payload does not fit the tenant's byte budget, even with every finished job's
    /// output let go.
    Bytes(usize),
}

/// One page of a tenant's jobs, newest first.
#[derive(Debug, Clone, Default)]
pub(crate) struct Page {
    /// Only this owner's jobs.
    pub owner: Option<String>,
    /// At most this many.
    pub limit: usize,
    /// Only jobs older than this job (the previous page's last id).
    pub before: Option<String>,
}

/// One tenant's share of the table.
#[derive(Debug, Default)]
struct TenantJobs {
    /// Every job of the tenant by creation sequence (the list order).
    by_seq: BTreeMap<u64, Arc<JobEntry>>,
    /// Finished jobs, oldest first: (finished at, seq), for retention.
    finished: VecDeque<(Instant, u64)>,
    /// Finished jobs that still hold output, oldest first (seq).
    with_output: VecDeque<u64>,
    /// Payload and output bytes the tenant's jobs hold.
    bytes: usize,
    /// Queued or running.
    unfinished: usize,
}

impl TenantJobs {
    /// `bytes` more held (and in the process-wide gauge).
    fn hold(&mut self, n: usize) {
        self.bytes += n;
        crate::metrics::jobs().held_bytes.increment(n as f64);
    }

    /// `n` bytes let go of.
    fn release(&mut self, n: usize) {
        let n = n.min(self.bytes);
        self.bytes -= n;
        crate::metrics::jobs().held_bytes.decrement(n as f64);
    }

    /// Lets go of the output of the oldest finished jobs until `need` more bytes fit.
    fn make_room(&mut self, need: usize, budget: usize) {
        while self.bytes + need > budget {
            let Some(seq) = self.with_output.pop_front() else { return };
            if let Some(e) = self.by_seq.get(&seq) {
                self.release(e.expire_output());
            }
        }
    }

    /// Takes job `seq` out of the tenant's share, its bytes let go of; the caller takes it
    /// out of the id map too ([`forget_id`]).
    fn take(&mut self, seq: u64) -> Option<Arc<JobEntry>> {
        let e = self.by_seq.remove(&seq)?;
        self.release(e.held_bytes());
        Some(e)
    }

    fn forget(&mut self, seq: u64, ids: &JobsById) {
        if let Some(e) = self.take(seq) {
            forget_id(ids, &e);
        }
    }
}

/// Takes a job out of the id map (unless its key names another job by now).
fn forget_id(ids: &JobsById, e: &Arc<JobEntry>) {
    ids.remove_if(&e.key, |_, v| Arc::ptr_eq(v, e));
}

/// Every job by its id's random part ([`crate::secret::id_key`]).
type JobsById = DashMap<u64, Arc<JobEntry>, BuildHasherDefault<RandomKeyHasher>>;

/// Hashes a job's key to itself. The keys in the map are random, made by
/// [`JobTable::create`], never chosen by a caller, so they need no mixing; a caller's
/// id only looks one up. Before this the map was keyed by the id string through SipHash:
/// an allocation, a hash of 20-odd bytes and a string compare per insert and remove, the
/// remove on a job long out of the cache (BENCHMARKS.md, 2026-12-05 later).
#[derive(Debug, Default)]
pub(crate) struct RandomKeyHasher(u64);

/// Jobs (or anything of a job) by their [`JobEntry::key`], hashed as [`JobsById`] is.
pub(crate) type ByJobKey<V> =
    std::collections::HashMap<u64, V, BuildHasherDefault<RandomKeyHasher>>;

impl Hasher for RandomKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is called for a u64 key; any other input still hashes.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// All jobs.
#[derive(Debug)]
pub(crate) struct JobTable {
    jobs: JobsById,
    tenants: DashMap<String, TenantJobs>,
    seq: std::sync::atomic::AtomicU64,
    budget: Budget,
}

impl JobTable {
    /// A table keeping, per tenant, what `budget` allows.
    pub(crate) fn new(budget: Budget) -> Self {
        Self {
            jobs: DashMap::default(),
            tenants: DashMap::new(),
            seq: std::sync::atomic::AtomicU64::new(1),
            budget,
        }
    }

    /// Creates and registers a queued job, unless the tenant is over its budget.
    pub(crate) fn create(
        &self,
        tenant: &str,
        mut spec: JobSpec,
        home: Option<(&str, i64)>,
    ) -> Result<Arc<JobEntry>, OverBudget> {
        // The tenant's name is copied only the first time (this runs for every dispatch).
        let mut t = match self.tenants.get_mut(tenant) {
            Some(t) => t,
            None => self.tenants.entry(tenant.to_owned()).or_default(),
        };
        if t.unfinished >= self.budget.unfinished {
            return Err(OverBudget::Unfinished(self.budget.unfinished));
        }
        let payload = std::mem::take(&mut spec.payload);
        t.make_room(payload.len(), self.budget.bytes);
        if t.bytes + payload.len() > self.budget.bytes {
            return Err(OverBudget::Bytes(self.budget.bytes));
        }
        let held = payload.len();
        let suffix = match home {
            None => String::new(),
            Some((node, epoch)) => format!("-e{epoch}-{node}"),
        };
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entry = loop {
            let (key, id) = crate::secret::new_keyed_id("job", &suffix);
            // Taken: another job's id has the same random part (n jobs in 2^64).
            let dashmap::Entry::Vacant(slot) = self.jobs.entry(key) else { continue };
            let entry = Arc::new(JobEntry {
                id,
                key,
                seq,
                tenant: tenant.into(),
                spec,
                created_at_ms: now_ms(),
                accepted: Instant::now(),
                cancelled: AtomicBool::new(false),
                handover: AtomicU8::new(IN_MAILBOX),
                inner: Mutex::new(JobInner {
                    state: JobState::Queued,
                    cancel_hook: None,
                    runner_id: None,
                    exit_code: None,
                    message: String::new(),
                    started_at: None,
                    finished_at: None,
                    payload,
                    output: Vec::new(),
                    output_truncated: false,
                    output_expired: false,
                }),
                changed: Notify::new(),
            });
            slot.insert(entry.clone());
            break entry;
        };
        t.hold(held);
        t.unfinished += 1;
        t.by_seq.insert(seq, entry.clone());
        Ok(entry)
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
    pub(crate) fn discard(&self, entry: &JobEntry) {
        if let Some(mut t) = self.tenants.get_mut(&entry.tenant)
            && t.by_seq.contains_key(&entry.seq)
        {
            if !entry.state().is_terminal() {
                t.unfinished = t.unfinished.saturating_sub(1);
            }
            t.forget(entry.seq, &self.jobs);
        }
    }

    /// A job of `tenant`; another tenant's job is simply not found.
    pub(crate) fn get(&self, tenant: &str, id: &str) -> Option<Arc<JobEntry>> {
        let key = crate::secret::id_key("job", id)?;
        self.jobs.get(&key).filter(|e| e.id == id && e.tenant == tenant).map(|e| e.clone())
    }

    /// One page of a tenant's jobs, newest first, without output; None when `before`
    /// names a job the table no longer has. Costs O(limit) without an owner filter.
    pub(crate) fn list(&self, tenant: &str, page: &Page) -> Option<Vec<JobView>> {
        let upto = match &page.before {
            Some(id) => self.get(tenant, id)?.seq,
            None => u64::MAX,
        };
        let Some(t) = self.tenants.get(tenant) else { return Some(Vec::new()) };
        let owner = page.owner.as_deref();
        Some(
            t.by_seq
                .range(..upto)
                .rev()
                .map(|(_, e)| e)
                .filter(|e| owner.is_none_or(|o| o == e.spec.owner))
                .take(page.limit)
                .map(|e| e.summary())
                .collect(),
        )
    }

    /// Appends output to a running job, within the job's cap and the tenant's budget
    /// (making room by letting go of the oldest finished jobs' output).
    pub(crate) fn append_output(&self, entry: &JobEntry, data: Vec<u8>) {
        let Some(mut t) = self.tenants.get_mut(&entry.tenant) else { return };
        t.make_room(data.len(), self.budget.bytes);
        let room = self.budget.bytes.saturating_sub(t.bytes);
        let Some(kept) = entry.append_output(data, room) else { return };
        t.hold(kept);
        // Followers are woken once the tenant's lock is let go of: a wakeup can be a
        // syscall (a parked worker unparked), and every dispatch and finish of the tenant
        // waits on this lock (held through one, its spinning was ~2.7% of a native job's
        // broker CPU).
        drop(t);
        entry.bump();
    }

    /// Bytes of payloads and output the tenant's jobs hold now.
    #[cfg(test)]
    pub(crate) fn held_bytes(&self, tenant: &str) -> usize {
        self.tenants.get(tenant).map_or(0, |t| t.bytes)
    }

    /// How many jobs of any tenant are not over yet (queued or running).
    pub(crate) fn unfinished_count(&self) -> usize {
        self.tenants.iter().map(|t| t.unfinished).sum()
    }

    /// Non-terminal jobs of a tenant (used when its actor restarts).
    pub(crate) fn unfinished(&self, tenant: &str) -> Vec<Arc<JobEntry>> {
        let Some(t) = self.tenants.get(tenant) else { return Vec::new() };
        t.by_seq.values().filter(|e| !e.state().is_terminal()).cloned().collect()
    }

    /// Moves a job to a terminal state. Only the first call for a job wins; it returns true.
    pub(crate) fn finish(&self, entry: &JobEntry, f: Finish) -> bool {
        debug_assert!(f.state.is_terminal());
        let mut g = entry.lock();
        if g.state.is_terminal() {
            return false;
        }
        let m = crate::metrics::jobs();
        if g.state == JobState::Running {
            m.in_flight.decrement(1.0);
        }
        m.ended(f.state);
        m.latency.record(entry.accepted.elapsed().as_secs_f64());
        g.state = f.state;
        g.exit_code = f.exit_code;
        g.message = cap_message(f.message);
        g.output_truncated |= f.output_truncated;
        g.finished_at = Some(now_ms());
        // The runner has it or never will: the payload is not needed any more.
        let freed = std::mem::take(&mut g.payload).len();
        g.cancel_hook = None;
        let has_output = !g.output.is_empty();
        drop(g);
        entry.bump();
        tracing::debug!(job = %entry.id, state = f.state.name(), "job finished");
        self.retire(entry, freed, has_output);
        true
    }

    fn retire(&self, entry: &JobEntry, freed: usize, has_output: bool) {
        let Some(mut t) = self.tenants.get_mut(&entry.tenant) else { return };
        if !t.by_seq.contains_key(&entry.seq) {
            return; // discarded already
        }
        t.release(freed);
        t.unfinished = t.unfinished.saturating_sub(1);
        let now = Instant::now();
        t.finished.push_back((now, entry.seq));
        if has_output {
            t.with_output.push_back(entry.seq);
        }
        let gone = self.expire(&mut t, now);
        // Out of the id map and dropped after the tenant's lock is let go of: the job
        // finished long ago, so both miss the cache, and every dispatch and finish of the
        // tenant waits on this lock.
        drop(t);
        if let Some(gone) = gone {
            forget_id(&self.jobs, &gone);
        }
    }

    /// Forgets the finished jobs past the count or age of retention. The first is handed
    /// back still in the id map, for the caller to take out ([`forget_id`]) once it has let
    /// go of the tenant's lock (each finish forgets one job in the steady state); any more
    /// are forgotten here.
    #[must_use]
    fn expire(&self, t: &mut TenantJobs, now: Instant) -> Option<Arc<JobEntry>> {
        let mut first = None;
        while let Some(&(at, seq)) = t.finished.front() {
            if t.finished.len() > self.budget.retention
                || now.duration_since(at) > self.budget.retention_age
            {
                t.finished.pop_front();
                if first.is_none() {
                    first = t.take(seq);
                } else {
                    t.forget(seq, &self.jobs);
                }
            } else {
                break;
            }
        }
        // Seqs forgotten above leave stale entries at the front of `with_output`.
        while t.with_output.front().is_some_and(|s| !t.by_seq.contains_key(s)) {
            t.with_output.pop_front();
        }
        first
    }

    /// Applies the age limit to every tenant (a quiet tenant finishes nothing that would).
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        for mut t in self.tenants.iter_mut() {
            if let Some(gone) = self.expire(&mut t, now) {
                forget_id(&self.jobs, &gone);
            }
        }
        self.tenants.retain(|_, t| !t.by_seq.is_empty());
    }

    /// Jobs in the table (all states).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }
}

/// Longest result message kept (the runner's words, or ours).
pub(crate) const MAX_MESSAGE: usize = 4096;

/// `m` cut to [`MAX_MESSAGE`] bytes on a character boundary.
fn cap_message(mut m: String) -> String {
    if m.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m.truncate(cut);
    }
    m
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An `exec` job for owner `o`, 1 s limits (the unit tests' job).
    pub(crate) fn spec() -> JobSpec {
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

    fn table(retention: usize, bytes: usize, unfinished: usize) -> JobTable {
        let retention_age = Duration::from_secs(60);
        JobTable::new(Budget { retention, retention_age, bytes, unfinished })
    }

    fn done(t: &JobTable, tenant: &str, output: usize) -> Arc<JobEntry> {
        let j = t.create(tenant, spec(), None).expect("budget");
        assert!(j.mark_running(&"r".into()));
        t.append_output(&j, vec![b'x'; output]);
        t.finish(&j, Finish::new(JobState::Succeeded, ""));
        j
    }

    #[test]
    fn only_the_first_terminal_transition_wins() {
        let t = table(10, 1 << 30, 100);
        let homed = t.create("t", spec(), Some(("node-a.1", 42))).unwrap();
        assert_eq!(JobTable::home_of(&homed.id), Some(("node-a.1", 42)));
        let j = t.create("t", spec(), None).unwrap();
        assert_eq!(JobTable::home_of(&j.id), None);
        for bad in
            ["job-", "job-abc", "job-abc-42-n", "job-abc-ex-n", "job-abc-e1-a/b", "x-abc-e1-n"]
        {
            assert_eq!(JobTable::home_of(bad), None, "{bad}");
        }
        assert!(j.mark_running(&"r1".into()));
        assert!(!j.mark_running(&"r2".into()));
        assert!(t.finish(&j, Finish::new(JobState::Succeeded, "")));
        assert!(!t.finish(&j, Finish::new(JobState::RunnerLost, "late")));
        assert_eq!(j.view().state, JobState::Succeeded);
        assert_eq!(j.view().runner_id.as_deref(), Some("r1"));
    }

    /// The view's output: valid UTF-8 exactly as the runner sent it, anything else with
    /// each bad sequence replaced (U+FFFD), never dropped; a summary has none.
    #[test]
    fn the_views_output_is_the_runners_text_with_bad_bytes_replaced() {
        let t = table(10, 1 << 30, 100);
        for (sent, shown) in [
            (&b"plain \xc3\xa9t\xc3\xa9 \xf0\x9f\x99\x82"[..], "plain \u{e9}t\u{e9} \u{1f642}"),
            (&b"ok \xff\xfe then \xc3"[..], "ok \u{fffd}\u{fffd} then \u{fffd}"),
        ] {
            let j = t.create("t", spec(), None).unwrap();
            assert!(j.mark_running(&"r".into()));
            t.append_output(&j, sent.to_vec());
            assert_eq!(j.view().output, shown);
            assert_eq!(j.summary().output, "");
        }
    }

    /// A follower of a finished job with more output than one piece reads it in pieces,
    /// and hears the end only with the last.
    #[tokio::test]
    async fn output_is_read_in_pieces_and_the_end_comes_with_the_last() {
        let t = table(10, 1 << 30, 100);
        let j = t.create("t", spec(), None).unwrap();
        assert!(j.mark_running(&"r".into()));
        let output: Vec<u8> = (0..(2 * OUTPUT_PIECE + 100)).map(|i| (i % 251) as u8).collect();
        t.append_output(&j, output.clone());
        t.finish(&j, Finish::new(JobState::Succeeded, ""));
        let mut got = Vec::new();
        let mut pieces = Vec::new();
        loop {
            let (piece, over) = j.next_output(got.len()).await;
            pieces.push((piece.len(), over));
            got.extend(piece);
            if over {
                break;
            }
        }
        assert_eq!(pieces, [(OUTPUT_PIECE, false), (OUTPUT_PIECE, false), (100, true)]);
        assert_eq!(got, output);
    }

    /// Followers waiting before a change hear it: output wakes `next_output`, the end wakes
    /// it and `until_over` (fails if a change is made without waking, or if a waiter
    /// checks before it listens and sleeps through the change).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_hear_output_and_the_end() {
        let t = Arc::new(table(10, 1 << 30, 100));
        for _ in 0..200 {
            let j = t.create("t", spec(), None).unwrap();
            assert!(j.mark_running(&"r".into()));
            let follower = tokio::spawn({
                let j = j.clone();
                async move {
                    let mut got = Vec::new();
                    loop {
                        let (chunk, over) = j.next_output(got.len()).await;
                        // Only the end may come with nothing.
                        assert!(over || !chunk.is_empty());
                        got.extend(chunk);
                        if over {
                            return got;
                        }
                    }
                }
            });
            let waiter = tokio::spawn({
                let j = j.clone();
                async move { j.until_over().await }
            });
            tokio::task::yield_now().await;
            t.append_output(&j, b"abc".to_vec());
            // Let the follower see the first chunk before the rest comes (or not: both
            // orders must end the same way).
            tokio::task::yield_now().await;
            t.append_output(&j, b"de".to_vec());
            t.finish(&j, Finish::new(JobState::Succeeded, ""));
            let limit = Duration::from_secs(5);
            let got = tokio::time::timeout(limit, follower).await.expect("follower woke").unwrap();
            assert_eq!(got, b"abcde");
            tokio::time::timeout(limit, waiter).await.expect("waiter woke").unwrap();
        }
    }

    /// A waker that counts its wakes.
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A job's start wakes nobody (nobody waits for it: each wakeup of a dispatch with
    /// `wait` is a poll of its call for nothing); output wakes its followers, the end
    /// every waiter.
    #[test]
    fn a_start_wakes_nobody_output_and_the_end_do() {
        let t = table(10, 1 << 30, 100);
        let j = t.create("t", spec(), None).unwrap();
        let wakes = Arc::new(Wakes(Default::default()));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let woken = || wakes.0.load(Ordering::SeqCst);
        let mut waiter = Box::pin(j.until_over());
        let mut follower = Box::pin(j.next_output(0));
        assert!(waiter.as_mut().poll(&mut cx).is_pending());
        assert!(follower.as_mut().poll(&mut cx).is_pending());
        assert!(j.mark_running(&"r".into()));
        assert_eq!(woken(), 0, "a start wakes nobody");
        t.append_output(&j, b"abc".to_vec());
        assert_eq!(woken(), 2, "output wakes both");
        assert!(waiter.as_mut().poll(&mut cx).is_pending());
        t.finish(&j, Finish::new(JobState::Succeeded, ""));
        assert_eq!(woken(), 3, "the end wakes the waiter");
        assert!(waiter.as_mut().poll(&mut cx).is_ready());
    }

    /// A cancel wakes whoever waits on it and the lane the job is hooked to, and a lane
    /// that takes a job already cancelled hears it from the hook's answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancel_reaches_its_waiters_and_its_lane() {
        let t = table(10, 1 << 30, 100);
        let hook = Arc::new(CancelHook::default());
        let noop = Context::from_waker(std::task::Waker::noop());
        let j = t.create("t", spec(), None).unwrap();
        assert!(!j.hook_cancel(&hook), "not cancelled yet");
        assert!(!hook.take(&noop));
        let waiter = tokio::spawn({
            let j = j.clone();
            async move { j.cancelled().await }
        });
        tokio::task::yield_now().await;
        j.cancel();
        assert!(j.is_cancelled());
        assert!(hook.take(&noop), "the lane hears it");
        assert!(!hook.take(&noop), "once");
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woke").unwrap();
        // Cancelled before a lane took it: the lane learns it when it hooks the job.
        let k = t.create("t", spec(), None).unwrap();
        k.cancel();
        assert!(k.hook_cancel(&hook));
        // A job that has ended lets go of its lane's hook.
        t.finish(&j, Finish::new(JobState::Cancelled, ""));
        j.cancel();
        assert!(!hook.take(&noop));
    }

    /// A job is found by its whole id only: not by another id with the same random part
    /// (another node's suffix, a cut or padded id, a different prefix), and forgetting a
    /// job leaves another under the same key alone.
    #[test]
    fn jobs_are_found_by_their_whole_id() {
        let t = table(1, 1 << 30, 100);
        let j = t.create("t", spec(), Some(("node-a", 7))).unwrap();
        assert!(j.id.ends_with("-e7-node-a"), "{}", j.id);
        assert!(t.get("t", &j.id).is_some());
        let random = &j.id[..4 + 16];
        let key = crate::secret::id_key("job", &j.id).unwrap();
        assert_eq!(crate::secret::id_key("job", random), Some(key));
        for wrong in [
            random.to_owned(),
            format!("{random}-e7-node-b"),
            format!("{}x", j.id),
            j.id.replacen("job-", "r-", 1),
            j.id.to_uppercase(),
            format!("job-+{}", &j.id[5..]),
            // The same key, other digits: upper case (unless there is no letter in it).
            format!("job-{}{}", random[4..].to_uppercase(), &j.id[random.len()..]),
        ]
        .into_iter()
        .filter(|w| *w != j.id)
        {
            assert!(t.get("t", &wrong).is_none(), "{wrong}");
        }
        assert_eq!(crate::secret::id_key("job", "job-12"), None);
        assert_eq!(crate::secret::id_key("job", "job-zzzzzzzzzzzzzzzz"), None);
        // Retention 1: the next finished job forgets the first; its key goes with it.
        t.finish(&j, Finish::new(JobState::Succeeded, ""));
        let k = t.create("t", spec(), None).unwrap();
        t.finish(&k, Finish::new(JobState::Succeeded, ""));
        assert!(t.get("t", &j.id).is_none());
        assert!(t.get("t", &k.id).is_some());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn other_tenants_jobs_are_not_found() {
        let t = table(10, 1 << 30, 100);
        let j = t.create("a", spec(), None).unwrap();
        assert!(t.get("a", &j.id).is_some());
        assert!(t.get("b", &j.id).is_none());
        let page = Page { limit: 10, ..Page::default() };
        assert_eq!(t.list("b", &page).map(|v| v.len()), Some(0));
        // A cursor naming another tenant's job is no cursor of this tenant's.
        let foreign = Page { limit: 10, before: Some(j.id.clone()), ..Page::default() };
        assert!(t.list("b", &foreign).is_none());
    }

    #[test]
    fn retention_is_per_tenant_and_never_drops_unfinished_jobs() {
        let t = table(2, 1 << 30, 100);
        let running = t.create("t", spec(), None).unwrap();
        let keep = done(&t, "b", 0);
        let ids: Vec<_> = (0..5).map(|_| done(&t, "t", 0).id.clone()).collect();
        assert!(t.get("t", &running.id).is_some());
        assert!(t.get("t", &ids[0]).is_none());
        assert!(t.get("t", &ids[4]).is_some());
        // Tenant t's flood left tenant b's finished job alone.
        assert!(t.get("b", &keep.id).is_some());
        assert_eq!(t.len(), 4);
        assert_eq!(t.unfinished_count(), 1);
    }

    #[test]
    fn the_byte_budget_lets_go_of_the_oldest_output_first_and_keeps_the_jobs() {
        let mib = 1 << 20;
        let t = table(1000, 8 * mib, 100);
        let jobs: Vec<_> = (0..30).map(|_| done(&t, "t", mib)).collect();
        assert!(t.held_bytes("t") <= 8 * mib, "{}", t.held_bytes("t"));
        let expired: Vec<bool> = jobs.iter().map(|j| j.view().output_expired).collect();
        // A prefix (the oldest) lost its output; the newest kept theirs.
        let first_kept = expired.iter().position(|e| !e).unwrap();
        assert!(first_kept >= 22 && expired[first_kept..].iter().all(|e| !e), "{expired:?}");
        assert!(jobs.iter().all(|j| t.get("t", &j.id).is_some()), "the jobs stay");
        assert_eq!(jobs[29].view().output.len(), mib);
        // Another tenant's budget is its own.
        done(&t, "u", mib);
        assert_eq!(t.held_bytes("u"), mib);
    }

    #[test]
    fn output_is_capped_per_job_and_by_a_running_tenants_budget() {
        let t = table(2, 4 << 20, 100);
        let j = t.create("t", spec(), None).unwrap();
        assert!(j.mark_running(&"r".into()));
        t.append_output(&j, vec![b'a'; MAX_BUFFERED_OUTPUT - 1]);
        t.append_output(&j, b"bcd".to_vec());
        let v = j.view();
        assert_eq!(v.output.len(), MAX_BUFFERED_OUTPUT);
        assert!(v.output_truncated);
        // Running jobs cannot be let go of: past the budget new output is cut.
        let (a, b, c, d) = (
            t.create("t", spec(), None).unwrap(),
            t.create("t", spec(), None).unwrap(),
            t.create("t", spec(), None).unwrap(),
            t.create("t", spec(), None).unwrap(),
        );
        for x in [&a, &b, &c, &d] {
            assert!(x.mark_running(&"r".into()));
            t.append_output(x, vec![b'z'; MAX_BUFFERED_OUTPUT]);
        }
        assert!(t.held_bytes("t") <= 4 << 20);
        assert!(d.view().output_truncated);
    }

    #[test]
    fn unfinished_jobs_and_payload_bytes_are_capped_and_freed_when_jobs_end() {
        let t = table(10, 4 << 20, 3);
        let js: Vec<_> = (0..3).map(|_| t.create("t", spec(), None).unwrap()).collect();
        assert_eq!(t.create("t", spec(), None).err(), Some(OverBudget::Unfinished(3)));
        assert!(t.create("other", spec(), None).is_ok(), "another tenant is not affected");
        t.finish(&js[0], Finish::new(JobState::Cancelled, ""));
        t.discard(&js[1]);
        assert!(t.create("t", spec(), None).is_ok());
        // A payload is held while the job is unfinished and let go of when it ends.
        let big = || JobSpec { payload: vec![0; 3 << 20], ..spec() };
        let t = table(10, 4 << 20, 10);
        let j = t.create("t", big(), None).unwrap();
        assert_eq!(j.with_payload(<[u8]>::len), 3 << 20);
        assert_eq!(t.create("t", big(), None).err(), Some(OverBudget::Bytes(4 << 20)));
        t.finish(&j, Finish::new(JobState::Succeeded, ""));
        assert!(j.with_payload(<[u8]>::is_empty));
        assert!(t.create("t", big(), None).is_ok());
    }

    #[test]
    fn lists_page_newest_first_by_cursor_without_output() {
        let t = table(100, 1 << 30, 100);
        let ids: Vec<String> = (0..7).map(|_| done(&t, "t", 10).id.clone()).collect();
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = Page { limit: 3, before: before.clone(), ..Page::default() };
            let got = t.list("t", &page).unwrap();
            assert!(got.iter().all(|j| j.output.is_empty()));
            seen.extend(got.iter().map(|j| j.id.clone()));
            if got.len() < 3 {
                break;
            }
            before = got.last().map(|j| j.id.clone());
        }
        let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
        assert_eq!(seen, newest_first);
        let only = Page { owner: Some("nobody".into()), limit: 3, before: None };
        assert!(t.list("t", &only).unwrap().is_empty());
    }

    #[test]
    fn messages_are_capped_on_a_character_boundary() {
        let t = table(10, 1 << 30, 10);
        let j = t.create("t", spec(), None).unwrap();
        t.finish(&j, Finish::new(JobState::Failed, "é".repeat(MAX_MESSAGE)));
        let m = j.view().message;
        assert!(m.len() <= MAX_MESSAGE && m.len() > MAX_MESSAGE - 2);
        assert!(m.chars().all(|c| c == 'é'));
    }
}
