//! Protocol 3's job lane, spoken by hand: a connection's jobs travel on one stream, each
//! frame naming its job; the limits of a stream per job hold on it (the cancel's grace,
//! the run timeout), a frame for a job the broker never gave or already ended is ignored,
//! and a malformed frame closes the connection, its jobs `runner_lost`.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use runnel_protocol::{
    BrokerJobFrame, ClientControl, Hello, JobOutcome, JobRequest, JobResult, LaneFrame,
    OutputStream, RunnerJobFrame, encode_append, read_frame,
};
use runnel_tests::TestBroker;
use serde_json::{Value, json};

/// A Hello speaking protocol 3.
fn hello3(capacity: u32) -> ClientControl {
    ClientControl::Hello(Hello {
        min_version: 2,
        max_version: 3,
        runner_version: "test".into(),
        labels: Default::default(),
        capacity,
        kinds: vec!["exec".into()],
    })
}

/// A broker, tenant `acme`'s admin key, and a runner of owner alice (`id`) that said Hello
/// by hand, speaking protocol 3 with `capacity`.
struct Speaking {
    b: TestBroker,
    admin: String,
    id: String,
    conn: quinn::Connection,
    /// Kept: the runner's control stream, and its state dir.
    _held: (quinn::SendStream, quinn::RecvStream, tempfile::TempDir),
}

async fn speaking(capacity: u32) -> Speaking {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (id, state) = b.enrolled(&admin, "alice", &dir.path().join("r")).await;
    let (conn, control, from_broker) =
        runnel_tests::welcomed_speaking(&b, &state, hello3(capacity)).await;
    Speaking { b, admin, id, conn, _held: (control, from_broker, dir) }
}

/// A job for runner `id`, not waited for.
fn job(id: &str, arg: &str, timeout_ms: u64) -> Value {
    json!({ "owner": "alice", "runner_id": id, "kind": "exec",
            "exec": { "program": "echo", "args": [arg] }, "timeout_ms": timeout_ms })
}

/// The job lane the broker opens on `conn` with its first job.
async fn lane_of(conn: &quinn::Connection) -> (quinn::SendStream, quinn::RecvStream) {
    tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await.unwrap().unwrap()
}

/// How the broker closed `conn` within `limit` (for `why`).
async fn closed_by_broker(
    conn: &quinn::Connection,
    limit: Duration,
    why: &str,
) -> quinn::ApplicationClose {
    match tokio::time::timeout(limit, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => c,
        other => panic!("the broker did not close the connection for {why}: {other:?}"),
    }
}

async fn next_frame(recv: &mut quinn::RecvStream) -> LaneFrame<BrokerJobFrame> {
    let read = read_frame::<LaneFrame<BrokerJobFrame>, _>(recv);
    tokio::time::timeout(Duration::from_secs(10), read).await.unwrap().unwrap().unwrap()
}

fn job_of(f: LaneFrame<BrokerJobFrame>) -> (u32, JobRequest) {
    match f.frame {
        BrokerJobFrame::Job(req) => (f.job, req),
        other => panic!("expected a job, got {other:?}"),
    }
}

/// Output `data` then a successful Result, for job `n`.
fn answer(out: &mut Vec<u8>, n: u32, data: &[u8]) {
    let output = RunnerJobFrame::Output { stream: OutputStream::Stdout, data: data.to_vec() };
    let result = RunnerJobFrame::Result(JobResult {
        outcome: JobOutcome::Succeeded,
        exit_code: Some(0),
        message: "exited 0".into(),
        output_truncated: false,
    });
    encode_append(out, &LaneFrame { job: n, frame: output }).unwrap();
    encode_append(out, &LaneFrame { job: n, frame: result }).unwrap();
}

#[tokio::test]
async fn a_connections_jobs_share_one_lane_each_frame_naming_its_job() {
    let Speaking { b, admin, id, conn, _held } = speaking(8).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let (s, v) = b.api.post("/v1/jobs", &admin, job(&id, &format!("j{i}"), 60_000)).await;
        assert_eq!(s, 201, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let (mut lane_send, mut lane_recv) = lane_of(&conn).await;
    let mut given = Vec::new();
    for _ in 0..4 {
        given.push(job_of(next_frame(&mut lane_recv).await));
    }
    let numbers: std::collections::HashSet<u32> = given.iter().map(|g| g.0).collect();
    assert_eq!(numbers.len(), 4, "each job has a number of its own: {given:?}");
    // Answered in reverse order, each with its own id as output: each lands on its job.
    let mut out = Vec::new();
    for (n, req) in given.iter().rev() {
        answer(&mut out, *n, req.job_id.as_bytes());
    }
    lane_send.write_all(&out).await.unwrap();
    for id in &ids {
        let v = b.job_end(&admin, id, Duration::from_secs(10)).await;
        assert_eq!(
            (v["state"].as_str(), v["output"].as_str()),
            (Some("succeeded"), Some(id.as_str())),
            "{v}"
        );
    }
    // No stream per job: the jobs came on the one lane.
    let more = tokio::time::timeout(Duration::from_millis(300), conn.accept_bi()).await;
    assert!(more.is_err(), "a job came on a stream of its own");

    // A Result for a number never given, and one for a job already ended: ignored.
    let mut out = Vec::new();
    answer(&mut out, 999_999, b"nobody's");
    answer(&mut out, given[0].0, b"again");
    lane_send.write_all(&out).await.unwrap();
    let (s, v) = b.api.post("/v1/jobs", &admin, job(&id, "after", 60_000)).await;
    assert_eq!(s, 201, "{v}");
    let later = v["id"].as_str().unwrap().to_owned();
    let (n, req) = job_of(next_frame(&mut lane_recv).await);
    assert_eq!(req.job_id, later);
    assert!(!numbers.contains(&n), "a number came twice while its job was running");
    let mut out = Vec::new();
    answer(&mut out, n, b"after");
    lane_send.write_all(&out).await.unwrap();
    let v = b.job_end(&admin, &later, Duration::from_secs(10)).await;
    assert_eq!(
        (v["state"].as_str(), v["output"].as_str()),
        (Some("succeeded"), Some("after")),
        "{v}"
    );
    let v = b.job_end(&admin, &ids[3], Duration::from_secs(10)).await;
    assert_eq!(v["output"].as_str(), Some(ids[3].as_str()), "an ended job took more output: {v}");
}

/// As `job_lifecycle.rs::a_silent_runner_cannot_hold_a_job_past_its_cancel_grace_or_timeout`,
/// on a lane: the cancel reaches the runner as a `Cancel` naming the job, and a runner
/// that does not confirm it is done with after the grace; a job past its run timeout ends
/// `timed_out`, and the runner is told to stop it.
#[tokio::test]
async fn on_a_lane_a_silent_runner_cannot_hold_a_job_past_its_cancel_grace_or_timeout() {
    let Speaking { b, admin, id, conn, _held } = speaking(4).await;
    let (s, v) = b.api.post("/v1/jobs", &admin, job(&id, "x", 3_600_000)).await;
    assert_eq!(s, 201, "{v}");
    let cancelled = v["id"].as_str().unwrap().to_owned();
    let (_lane_send, mut lane_recv) = lane_of(&conn).await;
    let (n, _) = job_of(next_frame(&mut lane_recv).await);
    let t0 = std::time::Instant::now();
    b.api.post(&format!("/v1/jobs/{cancelled}/cancel"), &admin, json!({})).await;
    let cancel = next_frame(&mut lane_recv).await;
    assert_eq!(cancel, LaneFrame { job: n, frame: BrokerJobFrame::Cancel });
    let v = b.job_end(&admin, &cancelled, Duration::from_secs(20)).await;
    assert_eq!(v["state"], "cancelled", "{v}");
    assert!(v["message"].as_str().unwrap().contains("did not confirm the cancel"), "{v}");
    assert!(t0.elapsed() >= Duration::from_secs(4), "ended before the grace: {v}");

    let (s, v) = b.api.post("/v1/jobs", &admin, job(&id, "y", 1000)).await;
    assert_eq!(s, 201, "{v}");
    let slow = v["id"].as_str().unwrap().to_owned();
    let (m, _) = job_of(next_frame(&mut lane_recv).await);
    let v = b.job_end(&admin, &slow, Duration::from_secs(20)).await;
    assert_eq!(v["state"], "timed_out", "{v}");
    assert!(v["message"].as_str().unwrap().contains("no result within the run timeout"), "{v}");
    assert_eq!(
        next_frame(&mut lane_recv).await,
        LaneFrame { job: m, frame: BrokerJobFrame::Cancel }
    );
}

#[tokio::test]
async fn a_malformed_lane_frame_closes_the_connection_and_its_jobs_are_lost() {
    let Speaking { b, admin, id, conn, _held } = speaking(4).await;
    let (s, v) = b.api.post("/v1/jobs", &admin, job(&id, "x", 60_000)).await;
    assert_eq!(s, 201, "{v}");
    let lost = v["id"].as_str().unwrap().to_owned();
    let (mut lane_send, mut lane_recv) = lane_of(&conn).await;
    job_of(next_frame(&mut lane_recv).await);
    lane_send.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
    let c = closed_by_broker(&conn, Duration::from_secs(5), "its bad frame").await;
    assert_eq!(c.error_code, runnel_protocol::ErrorCode::Protocol.as_u32().into());
    let v = b.job_end(&admin, &lost, Duration::from_secs(10)).await;
    assert_eq!(v["state"], "runner_lost", "{v}");
}

/// A runner that takes its lane and never reads it cannot make the broker pile up job
/// requests (each job past its time frees the runner's slot for the next): once a job's
/// time is up before the runner has even read its request, the connection is closed.
#[tokio::test]
async fn a_runner_that_does_not_read_its_lane_is_closed_once_a_job_could_not_reach_it() {
    let Speaking { b, admin, id, conn, _held } = speaking(16).await;
    // 16 requests of 200 KB: more than the runner's stream window lets through unread.
    let big = "a".repeat(200_000);
    let mut ids = Vec::new();
    for _ in 0..16 {
        let (s, v) = b.api.post("/v1/jobs", &admin, job(&id, &big, 1000)).await;
        assert_eq!(s, 201, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let (_lane_send, _lane_recv) = lane_of(&conn).await;
    // Run timeout 1 s + the result grace of 5 s, and slack for a loaded machine.
    let c = closed_by_broker(&conn, Duration::from_secs(20), "reading nothing").await;
    assert_eq!(c.error_code, runnel_protocol::ErrorCode::Timeout.as_u32().into());
    assert_eq!(&c.reason[..], b"runner does not read its job lane");
    for id in &ids {
        let v = b.job_end(&admin, id, Duration::from_secs(10)).await;
        assert!(v["state"] == "timed_out" || v["state"] == "runner_lost", "{v}");
    }
}
