//! Jobs: dispatch (optionally waiting), get, list, cancel, and streamed output.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use runnel_protocol::{DispatchSpec, PeerResponse};

use super::answers::UNCOUNTED;
use super::{ApiError, ApiJson, Caller};
use crate::actors::Tenants;
use crate::config::MAX_JOB_TIMEOUT;
use crate::homed::{self, Hop, JobAnswer, Output};
use crate::jobs::{JobInfoRef, JobView, Page};
use crate::records::Role;
use crate::shared::Shared;

/// Largest page of `GET /v1/jobs`.
const MAX_LIST: usize = 1000;

/// Largest encoded job payload (it must fit one frame with room to spare).
pub(super) const MAX_PAYLOAD: usize = 256 * 1024;

/// The `exec` part of a job body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExecBody {
    program: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<String>,
}

/// Body of `POST /v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateJob {
    owner: Option<String>,
    runner_id: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    kind: String,
    exec: Option<ExecBody>,
    /// Payload of a custom kind (UTF-8 text; handlers define its format).
    payload: Option<String>,
    timeout_ms: Option<u64>,
    queue_timeout_ms: Option<u64>,
    /// Hold the request until the job ends (up to its timeouts, at most 5 minutes).
    #[serde(default)]
    wait: bool,
}

impl CreateJob {
    /// Everything about the body that needs no state (the owner waits for the caller's
    /// role): kind, labels, the payload it encodes, both timeouts (the config's defaults
    /// where absent). The fuzz target `api_json` runs exactly this.
    pub(super) fn checked(
        &self,
        config: &crate::config::Config,
    ) -> Result<(Vec<u8>, Duration, Duration), ApiError> {
        runnel_certs::identity::validate_segment("kind", &self.kind)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        super::runners::validate_labels(&self.labels)?;
        let payload = job_payload(self)?;
        let timeout = millis(self.timeout_ms, config.job_timeout, "timeout_ms")?;
        let queue_timeout =
            millis(self.queue_timeout_ms, config.queue_timeout, "queue_timeout_ms")?;
        Ok((payload, timeout, queue_timeout))
    }
}

fn job_payload(body: &CreateJob) -> Result<Vec<u8>, ApiError> {
    let payload = match (body.kind.as_str(), &body.exec, &body.payload) {
        ("exec", Some(e), None) => {
            if e.program.is_empty() {
                return Err(ApiError::bad_request("exec.program must not be empty"));
            }
            let spec = runnel_protocol::ExecSpec {
                program: e.program.clone(),
                args: e.args.clone(),
                env: e.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                cwd: e.cwd.clone(),
            };
            postcard::to_allocvec(&spec).map_err(|e| ApiError::bad_request(e.to_string()))?
        }
        ("exec", _, _) => {
            return Err(ApiError::bad_request("kind exec needs an exec object and no payload"));
        }
        (_, Some(_), _) => return Err(ApiError::bad_request("exec is only for kind exec")),
        (_, None, p) => p.clone().unwrap_or_default().into_bytes(),
    };
    if payload.len() > MAX_PAYLOAD {
        return Err(ApiError::bad_request(format!("job payload exceeds {MAX_PAYLOAD} bytes")));
    }
    Ok(payload)
}

fn millis(v: Option<u64>, default: Duration, what: &str) -> Result<Duration, ApiError> {
    match v {
        None => Ok(default),
        Some(0) => Err(ApiError::bad_request(format!("{what} must be positive"))),
        Some(ms) if Duration::from_millis(ms) > MAX_JOB_TIMEOUT => {
            Err(ApiError::bad_request(format!("{what} must be at most 24h")))
        }
        Some(ms) => Ok(Duration::from_millis(ms)),
    }
}

/// `POST /v1/jobs`: one message to exactly one TenantActor, the caller's.
pub(super) async fn create(
    State(shared): State<Arc<Shared>>,
    State(tenants): State<Arc<Tenants>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateJob>,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Admin, Role::Dispatcher, Role::Member])?;
    caller.tenant()?;
    let spec = dispatch_spec(&shared, &caller, body)?;
    let answer = homed::dispatch(&shared, &tenants, &caller, spec, Hop::Api).await?;
    answered(&shared, &caller, &answer, |view| {
        if view.state.is_terminal() { StatusCode::OK } else { StatusCode::CREATED }
    })
    .await
}

/// The [`DispatchSpec`] of a `POST /v1/jobs` body, checked (owner, kind, labels, payload,
/// timeouts).
fn dispatch_spec(
    shared: &Shared,
    caller: &Caller,
    mut body: CreateJob,
) -> Result<DispatchSpec, ApiError> {
    let owner = dispatch_owner(caller, body.owner.take())?;
    let (payload, timeout, queue_timeout) = body.checked(&shared.config)?;
    // Moved, not copied, out of the body (this runs for every HTTP dispatch).
    let CreateJob { runner_id, labels, kind, wait, .. } = body;
    Ok(DispatchSpec {
        owner,
        runner_id,
        labels,
        kind,
        payload,
        timeout_ms: ms(timeout),
        queue_timeout_ms: ms(queue_timeout),
        wait,
    })
}

/// Most jobs in one `POST /v1/jobs/batch`.
pub(crate) const MAX_BATCH: usize = 32;

/// A batch's job carries its output in the answer up to this many bytes; a larger output
/// is left out of it (`"output_omitted": true`; `GET /v1/jobs/{id}` has it), so that a
/// batch's answer stays within [`MAX_BATCH`] times this (escaped: at most 6 bytes a byte).
pub(crate) const BATCH_OUTPUT: usize = UNCOUNTED;

/// Body of `POST /v1/jobs/batch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateJobs {
    jobs: Vec<CreateJob>,
}

impl CreateJobs {
    /// How many jobs: 1 to [`MAX_BATCH`].
    fn count(&self) -> Result<usize, ApiError> {
        match self.jobs.len() {
            n @ 1..=MAX_BATCH => Ok(n),
            n => Err(ApiError::bad_request(format!("a batch has 1 to {MAX_BATCH} jobs, not {n}"))),
        }
    }

    /// Everything about the batch that needs no state: its size and each job's
    /// [`CreateJob::checked`], a refusal naming its job. The fuzz target `api_json` runs
    /// exactly this; the handler runs the same checks, with the caller's, job by job
    /// ([`dispatch_spec`]), so that no job's payload is encoded twice.
    #[cfg(feature = "bench-internals")]
    pub(super) fn checked(&self, config: &crate::config::Config) -> Result<(), ApiError> {
        self.count()?;
        for (i, job) in self.jobs.iter().enumerate() {
            job.checked(config).map_err(|e| of_job(i, e))?;
        }
        Ok(())
    }
}

/// `e`, as the refusal of a batch's job `i`.
fn of_job(i: usize, e: ApiError) -> ApiError {
    ApiError { message: format!("jobs[{i}]: {}", e.message), ..e }
}

/// `POST /v1/jobs/batch`: up to [`MAX_BATCH`] jobs, each the body of a `POST /v1/jobs`
/// and dispatched as that would dispatch it (the same checks, the same message to the
/// caller's TenantActor, forwarded to the tenant's home in a cluster), all at once. Every
/// job is checked before any is dispatched: one bad job refuses the whole batch (400 or
/// 403, naming it) and nothing runs. Each job counts as a request against the key's rate
/// limit. The answer (200) lists, in the batch's order, each job as `POST /v1/jobs` would
/// answer it (waited for where it asked to be), or the error that job met
/// (`{"error":{"code","message","status"}}`: a full queue, no runner, …).
pub(super) async fn create_batch(
    State(shared): State<Arc<Shared>>,
    State(tenants): State<Arc<Tenants>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateJobs>,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Admin, Role::Dispatcher, Role::Member])?;
    caller.tenant()?;
    let n = body.count()?;
    let specs = body
        .jobs
        .into_iter()
        .enumerate()
        .map(|(i, job)| dispatch_spec(&shared, &caller, job).map_err(|e| of_job(i, e)))
        .collect::<Result<Vec<_>, _>>()?;
    shared.rate_limits.check_key_rest(&caller.key_id, n)?;
    let answers = futures::future::join_all(
        specs.into_iter().map(|spec| homed::dispatch(&shared, &tenants, &caller, spec, Hop::Api)),
    )
    .await;
    shared.http_answers.json(caller.tenant.as_deref(), || batch_json(&answers)).await
}

/// A job of a batch's answer: its view, its output left out past [`BATCH_OUTPUT`].
#[derive(serde::Serialize)]
struct BatchJob<'a> {
    #[serde(flatten)]
    job: JobInfoRef<'a>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    output_omitted: bool,
}

/// A job a batch could not dispatch.
#[derive(serde::Serialize)]
struct BatchError<'a> {
    code: &'a str,
    message: &'a str,
    status: u16,
}

/// `{"jobs":[…]}` of a batch's answers, in its order.
fn batch_json(
    answers: &[Result<JobAnswer, ApiError>],
) -> Result<(StatusCode, Vec<u8>), serde_json::Error> {
    let mut json = Vec::with_capacity(512 * answers.len());
    serde_json::to_writer(&mut json, &BatchAnswer { jobs: BatchJobs(answers) })?;
    Ok((StatusCode::OK, json))
}

#[derive(serde::Serialize)]
struct BatchAnswer<'a> {
    jobs: BatchJobs<'a>,
}

/// A batch's answers, each written from its job's entry under its lock (no copy), as a
/// single dispatch's answer is.
struct BatchJobs<'a>(&'a [Result<JobAnswer, ApiError>]);

impl serde::Serialize for BatchJobs<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for answer in self.0 {
            match answer {
                Ok(JobAnswer::Here(entry)) => {
                    entry.with_view_up_to(BATCH_OUTPUT, |job, omitted| {
                        seq.serialize_element(&BatchJob { job, output_omitted: omitted })
                    })?
                }
                Ok(JobAnswer::There(view)) => {
                    let job = view.borrowed();
                    let omitted = job.output.len() > BATCH_OUTPUT;
                    let job = if omitted { JobInfoRef { output: "", ..job } } else { job };
                    seq.serialize_element(&BatchJob { job, output_omitted: omitted })?
                }
                Err(e) => {
                    let error =
                        BatchError { code: e.code, message: &e.message, status: e.status.as_u16() };
                    seq.serialize_element(&BatchRefused { error })?
                }
            }
        }
        seq.end()
    }
}

#[derive(serde::Serialize)]
struct BatchRefused<'a> {
    error: BatchError<'a>,
}

/// A job's JSON, held to the caller's tenant's budget of unread answers
/// ([`super::answers`]); `status` of the view the answer was made from.
async fn answered(
    shared: &Shared,
    caller: &Caller,
    job: &JobAnswer,
    status: impl Fn(&JobInfoRef<'_>) -> StatusCode,
) -> Result<Response, ApiError> {
    let write = |view: JobInfoRef<'_>| {
        // Sized once for the view (its names, ids and times take less than 512 bytes):
        // `to_vec` starts at 128 bytes and grew three times for a job with 256 bytes of
        // output.
        let mut json = Vec::with_capacity(512 + view.output.len() + view.message.len());
        serde_json::to_writer(&mut json, &view)?;
        Ok((status(&view), json))
    };
    let make = || match job {
        JobAnswer::There(view) => write(view.borrowed()),
        // Written from the entry, lent, under its lock; a job with more output is copied
        // out first and escaped outside the lock, which its runner's output appends (and
        // so that runner's connection task) would otherwise wait on for milliseconds.
        JobAnswer::Here(entry) => entry
            .with_view(true, |view| (view.output.len() <= UNCOUNTED).then(|| write(view)))
            .unwrap_or_else(|| write(entry.view().borrowed())),
    };
    shared.http_answers.json(caller.tenant.as_deref(), make).await
}

/// Whose runners a dispatch is for: a member key's own owner (another is refused), else
/// the owner asked for, which must be a valid name.
fn dispatch_owner(caller: &Caller, asked: Option<String>) -> Result<String, ApiError> {
    let owner = match (&caller.role, asked, &caller.owner) {
        (Role::Member, Some(o), Some(mine)) if o != *mine => {
            return Err(ApiError::forbidden("a member key dispatches only to its own owner"));
        }
        (Role::Member, _, Some(mine)) => mine.clone(),
        (_, Some(o), _) => o,
        _ => return Err(ApiError::bad_request("owner is required")),
    };
    runnel_certs::identity::validate_segment("owner", &owner)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(owner)
}

/// A [`DispatchSpec`] from a native API client, held to the rules `POST /v1/jobs` applies
/// to its body: the owner (an empty one is the member key's own), kind, labels, payload
/// size, an `exec` payload that decodes with a program, and timeouts (0: the default).
pub(crate) fn checked_spec(
    config: &crate::config::Config,
    caller: &Caller,
    mut spec: DispatchSpec,
) -> Result<DispatchSpec, ApiError> {
    let asked = Some(std::mem::take(&mut spec.owner)).filter(|o| !o.is_empty());
    spec.owner = dispatch_owner(caller, asked)?;
    runnel_certs::identity::validate_segment("kind", &spec.kind)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    super::runners::validate_labels(&spec.labels)?;
    if spec.payload.len() > MAX_PAYLOAD {
        return Err(ApiError::bad_request(format!("job payload exceeds {MAX_PAYLOAD} bytes")));
    }
    if spec.kind == "exec" {
        let exec: runnel_protocol::ExecSpec = postcard::from_bytes(&spec.payload)
            .map_err(|e| ApiError::bad_request(format!("exec payload: {e}")))?;
        if exec.program.is_empty() {
            return Err(ApiError::bad_request("exec.program must not be empty"));
        }
    }
    let given = |v: u64| (v != 0).then_some(v);
    spec.timeout_ms = ms(millis(given(spec.timeout_ms), config.job_timeout, "timeout_ms")?);
    spec.queue_timeout_ms =
        ms(millis(given(spec.queue_timeout_ms), config.queue_timeout, "queue_timeout_ms")?);
    Ok(spec)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `GET /v1/jobs/{id}`.
pub(super) async fn get(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = homed::get_job(&shared, &caller, &id, Hop::Api).await?;
    answered(&shared, &caller, &job, |_| StatusCode::OK).await
}

/// `GET /v1/jobs[?owner=o&limit=n&before=<job id>]`: newest first, without output, at
/// most `limit` (1..=1000, default 100); `next_before` is the cursor of the next page.
pub(super) async fn list(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIST).contains(n))
            .ok_or_else(|| ApiError::bad_request(format!("limit must be 1..={MAX_LIST}")))?,
        None => 100,
    };
    let page = Page { owner: q.get("owner").cloned(), limit, before: q.get("before").cloned() };
    let jobs = homed::list_jobs(&shared, &caller, page, Hop::Api).await?;
    let next_before = (jobs.len() == limit).then(|| jobs.last().map(|j| j.id.as_str())).flatten();
    let page = ListAnswer { jobs: &jobs, next_before };
    shared.http_answers.value(caller.tenant.as_deref(), &page).await
}

/// A page of `GET /v1/jobs`.
#[derive(serde::Serialize)]
struct ListAnswer<'a> {
    jobs: &'a [JobView],
    next_before: Option<&'a str>,
}

/// `POST /v1/jobs/{id}/cancel`: idempotent; answers the job as it stands.
pub(super) async fn cancel(
    State(shared): State<Arc<Shared>>,
    State(tenants): State<Arc<Tenants>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = homed::cancel_job(&shared, &tenants, &caller, &id, Hop::Api).await?;
    answered(&shared, &caller, &job, |_| StatusCode::ACCEPTED).await
}

type Chunk = Result<Bytes, std::io::Error>;

/// `GET /v1/jobs/{id}/output`: the output so far, then live until the job ends (from the
/// node that holds the job, in a cluster).
pub(super) async fn output(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let body = match homed::job_output(&shared, &caller, &id, Hop::Api).await? {
        Output::Here(job) => {
            // The output as it comes; the body ends once the job is over and all of it
            // was sent.
            let stream = futures::stream::unfold(Some((job, 0usize)), |at| async move {
                let (job, offset) = at?;
                let (chunk, finished) = job.next_output(offset).await;
                if chunk.is_empty() {
                    return None;
                }
                let next = (!finished).then(|| (job, offset + chunk.len()));
                Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), next))
            });
            Body::from_stream(stream)
        }
        Output::There(answer) => {
            let stream = futures::stream::unfold(Some(answer), |answer| async move {
                let mut answer = answer?;
                match answer.next().await {
                    Ok(PeerResponse::Output(chunk)) => {
                        Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), Some(answer)))
                    }
                    Ok(_) => None,
                    // The home went away mid-stream: the client sees a cut body.
                    Err(e) => Some((Err::<Bytes, _>(std::io::Error::other(e.to_string())), None)),
                }
            });
            Body::from_stream(stream)
        }
        Output::Nothing => Body::from_stream(futures::stream::empty::<Chunk>()),
    };
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}
