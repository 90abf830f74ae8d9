//! The native API (`runnel-api/1` on the broker's QUIC port): an API key in the first
//! frame, then a call per stream or many on a lane, under the HTTP API's tenant and owner
//! rules.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use runnel_protocol::limits::LANE_MAX_CALLS;
use runnel_protocol::version::MIN_PROTOCOL_VERSION;
use runnel_protocol::{
    ApiRequest, ApiWelcome, DispatchSpec, ExecSpec, JobState, LaneAnswer, LaneCall,
    PROTOCOL_VERSION, PeerResponse, encode, read_frame, write_frame,
};
use runnel_runner::{Runner, RunnerHandle};
use runnel_tests::{TestBroker, metric_value};
use serde_json::json;

/// Dials the broker's QUIC port with the native ALPN, pinning its CA, and says hello.
async fn connect(b: &TestBroker, key: &str) -> (quinn::Endpoint, quinn::Connection, ApiWelcome) {
    connect_speaking(b, key, PROTOCOL_VERSION).await
}

/// [`connect`], saying hello in protocol `version`.
async fn connect_speaking(
    b: &TestBroker,
    key: &str,
    version: u16,
) -> (quinn::Endpoint, quinn::Connection, ApiWelcome) {
    runnel_tests::native_hello(b, key, version, None).await
}

/// One call: every answer frame up to the end of the stream.
async fn call(conn: &quinn::Connection, req: &ApiRequest) -> Vec<PeerResponse> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, req).await.unwrap();
    send.finish().unwrap();
    let mut frames = Vec::new();
    let read = async {
        while let Some(f) = read_frame::<PeerResponse, _>(&mut recv).await.unwrap() {
            frames.push(f);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.unwrap();
    frames
}

/// Opens a lane: a stream whose first frame is `ApiRequest::Lane`.
async fn lane(conn: &quinn::Connection) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &ApiRequest::Lane).await.unwrap();
    (send, recv)
}

/// Calls on a lane, written together.
async fn lane_calls(send: &mut quinn::SendStream, calls: &[(u32, ApiRequest)]) {
    let mut bytes = Vec::new();
    for (call, request) in calls {
        bytes.extend(encode(&LaneCall { call: *call, request }).unwrap());
    }
    send.write_all(&bytes).await.unwrap();
}

/// The next answer on a lane: its call, and its frames up to `End` or a refusal.
async fn lane_answer(recv: &mut quinn::RecvStream) -> (u32, Vec<PeerResponse>) {
    let read = async {
        let LaneAnswer { call } = read_frame(recv).await.unwrap().expect("an answer");
        let mut frames = Vec::new();
        loop {
            let f = read_frame::<PeerResponse, _>(recv).await.unwrap().expect("a frame");
            let last = matches!(f, PeerResponse::End | PeerResponse::Refused { .. });
            frames.push(f);
            if last {
                return (call, frames);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.expect("answered in time")
}

/// Tenants acme and other (their admin keys), and a runner of acme's for owner alice with
/// room for two jobs (with the directory it lives in).
async fn acme_with_a_runner(b: &TestBroker) -> (String, String, (RunnerHandle, tempfile::TempDir)) {
    let acme = b.tenant("acme").await;
    let other = b.tenant("other").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, state) = b.enrolled(&acme, "alice", &dir.path().join("r")).await;
    let runner = Runner::builder(state).capacity(2).spawn().unwrap();
    runner.wait_connected(Duration::from_secs(10)).await.unwrap();
    (acme, other, (runner, dir))
}

fn echo(owner: &str, text: &str, wait: bool) -> DispatchSpec {
    spec(owner, "echo", text, wait)
}

fn spec(owner: &str, program: &str, arg: &str, wait: bool) -> DispatchSpec {
    let exec = ExecSpec { program: program.into(), args: vec![arg.into()], env: vec![], cwd: None };
    DispatchSpec {
        owner: owner.into(),
        runner_id: None,
        labels: Default::default(),
        kind: "exec".into(),
        payload: postcard::to_allocvec(&exec).unwrap(),
        timeout_ms: 0,
        queue_timeout_ms: 0,
        wait,
    }
}

fn refusal(frames: &[PeerResponse]) -> Option<(u16, &str)> {
    match frames.first()? {
        PeerResponse::Refused { status, code, .. } => Some((*status, code.as_str())),
        _ => None,
    }
}

fn job(frames: &[PeerResponse]) -> &runnel_protocol::JobInfo {
    match frames.first() {
        Some(PeerResponse::Job(j)) => j,
        other => panic!("expected a job, got {other:?}"),
    }
}

fn output(frames: &[PeerResponse]) -> String {
    let bytes: Vec<u8> = frames
        .iter()
        .filter_map(|f| if let PeerResponse::Output(o) = f { Some(o.clone()) } else { None })
        .flatten()
        .collect();
    String::from_utf8(bytes).unwrap()
}

#[tokio::test]
async fn a_key_dispatches_follows_and_reads_its_own_tenants_jobs_only() {
    let b = TestBroker::start().await;
    let (acme, other, _runner) = acme_with_a_runner(&b).await;

    let (_e, conn, welcome) = connect(&b, &acme).await;
    assert!(
        matches!(&welcome, ApiWelcome::Welcome { tenant: Some(t), role, .. } if t == "acme" && role == "admin"),
        "{welcome:?}"
    );
    // Dispatch and wait: the ended job, its output, the end.
    let frames =
        call(&conn, &ApiRequest::Dispatch { spec: echo("alice", "native", true), follow: false })
            .await;
    let done = job(&frames).clone();
    assert_eq!(done.state, JobState::Succeeded, "{frames:?}");
    assert_eq!(output(&frames), "native\n");
    assert_eq!(frames.last(), Some(&PeerResponse::End));
    // Follow: accepted, the output live, then the ended job.
    let frames =
        call(&conn, &ApiRequest::Dispatch { spec: echo("alice", "follow", false), follow: true })
            .await;
    assert!(!job(&frames).state.is_terminal(), "{frames:?}");
    assert_eq!(output(&frames), "follow\n");
    let ended =
        frames.iter().rev().find_map(|f| if let PeerResponse::Job(j) = f { Some(j) } else { None });
    assert_eq!(ended.map(|j| j.state), Some(JobState::Succeeded), "{frames:?}");
    // Many calls at once on the one connection.
    let many = futures::future::join_all((0..32).map(|i| {
        let conn = conn.clone();
        async move {
            call(
                &conn,
                &ApiRequest::Dispatch {
                    spec: echo("alice", &format!("n{i}"), true),
                    follow: false,
                },
            )
            .await
        }
    }))
    .await;
    for (i, frames) in many.iter().enumerate() {
        assert_eq!(output(frames), format!("n{i}\n"), "{frames:?}");
    }
    // Get, wait, cancel (of an ended job: answered as it stands) through the owner's key.
    for req in [
        ApiRequest::GetJob { id: done.id.clone() },
        ApiRequest::WaitJob { id: done.id.clone() },
        ApiRequest::CancelJob { id: done.id.clone() },
    ] {
        let frames = call(&conn, &req).await;
        assert_eq!(job(&frames).state, JobState::Succeeded, "{req:?}: {frames:?}");
    }

    // Another tenant's key: the job does not exist for it (404), whatever the call.
    let (_e2, theirs, _) = connect(&b, &other).await;
    for req in [
        ApiRequest::GetJob { id: done.id.clone() },
        ApiRequest::WaitJob { id: done.id.clone() },
        ApiRequest::CancelJob { id: done.id.clone() },
    ] {
        let frames = call(&theirs, &req).await;
        assert_eq!(refusal(&frames), Some((404, "not_found")), "{req:?}: {frames:?}");
    }
    // Nor can it reach acme's runners: its own tenant has no runner for alice.
    let frames =
        call(&theirs, &ApiRequest::Dispatch { spec: echo("alice", "x", true), follow: false })
            .await;
    assert_eq!(refusal(&frames).map(|r| r.0), Some(409), "{frames:?}");
    assert_eq!(output(&frames), "");
}

#[tokio::test]
async fn a_lane_answers_many_calls_on_one_stream_each_to_its_number() {
    let b = TestBroker::start().await;
    let (acme, other, _runner) = acme_with_a_runner(&b).await;
    let (_e, conn, _) = connect(&b, &acme).await;
    let (mut send, mut recv) = lane(&conn).await;

    // 32 dispatches and a read of a job that is not there, at once: each answer names its
    // call, in whatever order they end.
    let mut calls: Vec<_> = (0..32u32)
        .map(|i| {
            let spec = echo("alice", &format!("lane{i}"), true);
            (1000 + i, ApiRequest::Dispatch { spec, follow: false })
        })
        .collect();
    calls.push((7, ApiRequest::GetJob { id: "j-nothing".into() }));
    lane_calls(&mut send, &calls).await;
    let mut seen = std::collections::HashSet::new();
    let mut done = None;
    for _ in 0..calls.len() {
        let (call, frames) = lane_answer(&mut recv).await;
        assert!(seen.insert(call), "call {call} answered twice");
        if call == 7 {
            assert_eq!(refusal(&frames), Some((404, "not_found")), "{frames:?}");
            continue;
        }
        assert_eq!(job(&frames).state, JobState::Succeeded, "{frames:?}");
        assert_eq!(output(&frames), format!("lane{}\n", call - 1000), "call {call}");
        done = Some(job(&frames).id.clone());
    }
    let done = done.unwrap();
    // What a lane does not carry: a followed dispatch, a lane in a lane. Refused, and the
    // lane goes on.
    lane_calls(
        &mut send,
        &[
            (1, ApiRequest::Dispatch { spec: echo("alice", "x", false), follow: true }),
            (2, ApiRequest::Lane),
            (3, ApiRequest::WaitJob { id: done.clone() }),
        ],
    )
    .await;
    let mut answers: Vec<_> = Vec::new();
    for _ in 0..3 {
        answers.push(lane_answer(&mut recv).await);
    }
    answers.sort_by_key(|a| a.0);
    assert_eq!(refusal(&answers[0].1), Some((400, "bad_request")), "{answers:?}");
    assert_eq!(refusal(&answers[1].1), Some((400, "bad_request")), "{answers:?}");
    assert_eq!(job(&answers[2].1).state, JobState::Succeeded, "{answers:?}");

    // Another tenant's lane: the job is not found, whatever the call.
    let (_e2, theirs, _) = connect(&b, &other).await;
    let (mut their_send, mut their_recv) = lane(&theirs).await;
    let reads = [
        ApiRequest::GetJob { id: done.clone() },
        ApiRequest::WaitJob { id: done.clone() },
        ApiRequest::CancelJob { id: done.clone() },
    ];
    let reads: Vec<_> = reads.into_iter().enumerate().map(|(i, r)| (i as u32, r)).collect();
    lane_calls(&mut their_send, &reads).await;
    for _ in 0..reads.len() {
        let (call, frames) = lane_answer(&mut their_recv).await;
        assert_eq!(refusal(&frames), Some((404, "not_found")), "call {call}: {frames:?}");
    }

    // A lane holds at most LANE_MAX_CALLS calls unanswered: with that many waiting for a
    // queued job, the next call is not read until they are answered.
    let sleep = |n| ApiRequest::Dispatch { spec: spec("alice", "sleep", "30", false), follow: n };
    let busy: Vec<_> = [call(&conn, &sleep(false)).await, call(&conn, &sleep(false)).await]
        .iter()
        .map(|f| job(f).id.clone())
        .collect();
    let queued = job(&call(&conn, &sleep(false)).await).id.clone();
    assert_eq!(
        job(&call(&conn, &ApiRequest::GetJob { id: queued.clone() }).await).state,
        JobState::Queued
    );
    let waits: Vec<_> = (0..LANE_MAX_CALLS as u32)
        .map(|i| (i, ApiRequest::WaitJob { id: queued.clone() }))
        .collect();
    lane_calls(&mut send, &waits).await;
    lane_calls(&mut send, &[(9999, ApiRequest::GetJob { id: done.clone() })]).await;
    let early = tokio::time::timeout(Duration::from_millis(500), lane_answer(&mut recv)).await;
    assert!(early.is_err(), "a call past the lane's limit was answered: {early:?}");
    // The job ends (cancelled over a stream of its own): every call is answered.
    call(&conn, &ApiRequest::CancelJob { id: queued.clone() }).await;
    let mut got = std::collections::HashSet::new();
    for _ in 0..=LANE_MAX_CALLS {
        let (call, frames) = lane_answer(&mut recv).await;
        let want = if call == 9999 { JobState::Succeeded } else { JobState::Cancelled };
        assert_eq!(job(&frames).state, want, "call {call}: {frames:?}");
        got.insert(call);
    }
    assert_eq!(got.len(), LANE_MAX_CALLS + 1);
    for id in busy {
        call(&conn, &ApiRequest::CancelJob { id }).await;
    }
    // The client ends its side: the broker ends the lane.
    send.finish().unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), read_frame::<LaneAnswer, _>(&mut recv));
    assert!(matches!(end.await, Ok(Ok(None))), "the lane did not end");
}

#[tokio::test]
async fn bad_keys_specs_and_frames_get_clear_refusals() {
    let b = TestBroker::start().await;
    let acme = b.tenant("acme").await;
    // A wrong key, a malformed one: refused at hello, nothing served.
    for key in ["rk_nope_nope", "not a key"] {
        let (_e, conn, welcome) = connect(&b, key).await;
        assert!(matches!(welcome, ApiWelcome::Refused { status: 401, .. }), "{welcome:?}");
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        assert!(closed.is_ok(), "the connection stays open after a refused hello");
    }
    // A client of any version this broker speaks is served (an older client, in a rolling
    // upgrade that does the brokers first); one of a version it does not speak is refused,
    // told which it does.
    let (_e, older, welcome) = connect_speaking(&b, &acme, MIN_PROTOCOL_VERSION).await;
    assert!(matches!(welcome, ApiWelcome::Welcome { .. }), "{welcome:?}");
    let frames = call(&older, &ApiRequest::GetJob { id: "j-nothing".into() }).await;
    assert_eq!(refusal(&frames), Some((404, "not_found")), "{frames:?}");
    for version in [MIN_PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1] {
        let (_e, _conn, welcome) = connect_speaking(&b, &acme, version).await;
        match welcome {
            ApiWelcome::Refused { status: 400, message, .. } => {
                assert!(message.contains("is not spoken here"), "{message}")
            }
            other => panic!("version {version}: {other:?}"),
        }
    }
    let member = b.key("acme", json!({ "role": "member", "owner": "alice" })).await;
    let (_e, conn, _) = connect(&b, &member).await;
    // A member key dispatches only to its own owner; an empty owner is its own.
    let frames =
        call(&conn, &ApiRequest::Dispatch { spec: echo("bob", "x", false), follow: false }).await;
    assert_eq!(refusal(&frames), Some((403, "forbidden")), "{frames:?}");
    // The spec is held to the HTTP API's rules.
    let mut bad = echo("", "x", false);
    bad.payload = vec![0xff; 3];
    let frames = call(&conn, &ApiRequest::Dispatch { spec: bad, follow: false }).await;
    assert_eq!(refusal(&frames).map(|r| r.0), Some(400), "{frames:?}");
    let mut bad = echo("", "x", false);
    bad.kind = "no/slash".into();
    let frames = call(&conn, &ApiRequest::Dispatch { spec: bad, follow: false }).await;
    assert_eq!(refusal(&frames).map(|r| r.0), Some(400), "{frames:?}");
    let mut bad = echo("", "x", false);
    bad.timeout_ms = 25 * 3600 * 1000;
    let frames = call(&conn, &ApiRequest::Dispatch { spec: bad, follow: false }).await;
    assert_eq!(refusal(&frames).map(|r| r.0), Some(400), "{frames:?}");
    // A malformed request resets its stream only; the connection goes on serving.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
    send.finish().unwrap();
    assert!(read_frame::<PeerResponse, _>(&mut recv).await.is_err());
    let frames = call(&conn, &ApiRequest::GetJob { id: "j-nothing".into() }).await;
    assert_eq!(refusal(&frames).map(|r| r.0), Some(404), "{frames:?}");
    // So does a lane: a call that does not decode resets the lane (the calls after it in
    // the same write go unanswered); the connection and a new lane go on.
    let (mut send, mut recv) = lane(&conn).await;
    lane_calls(&mut send, &[(1, ApiRequest::GetJob { id: "j-nothing".into() })]).await;
    assert_eq!(refusal(&lane_answer(&mut recv).await.1).map(|r| r.0), Some(404));
    send.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
    lane_calls(&mut send, &[(2, ApiRequest::GetJob { id: "j-nothing".into() })]).await;
    let reset =
        tokio::time::timeout(Duration::from_secs(5), read_frame::<LaneAnswer, _>(&mut recv));
    assert!(matches!(reset.await, Ok(Err(_))), "the lane was not reset");
    let (mut send, mut recv) = lane(&conn).await;
    lane_calls(&mut send, &[(3, ApiRequest::GetJob { id: "j-nothing".into() })]).await;
    let (call_no, frames) = lane_answer(&mut recv).await;
    assert_eq!((call_no, refusal(&frames).map(|r| r.0)), (3, Some(404)), "{frames:?}");
    // One lane per connection: a second, while the first is open, is reset unread (a
    // lane holds up to LANE_MAX_CALLS calls; more lanes would multiply what one connection
    // may have under way).
    let (mut second, mut second_recv) = lane(&conn).await;
    lane_calls(&mut second, &[(1, ApiRequest::GetJob { id: "j-nothing".into() })]).await;
    let reset =
        tokio::time::timeout(Duration::from_secs(5), read_frame::<LaneAnswer, _>(&mut second_recv));
    assert!(matches!(reset.await, Ok(Err(_))), "a second lane was served");

    // A key revoked while its connection is open stops working on the next call.
    b.revoke_key_of_role(&acme, "acme", "member").await;
    let frames = call(&conn, &ApiRequest::GetJob { id: "j-nothing".into() }).await;
    assert_eq!(refusal(&frames), Some((401, "unauthorized")), "{frames:?}");
    lane_calls(&mut send, &[(4, ApiRequest::GetJob { id: "j-nothing".into() })]).await;
    let (call_no, frames) = lane_answer(&mut recv).await;
    assert_eq!((call_no, refusal(&frames)), (4, Some((401, "unauthorized"))), "{frames:?}");

    // What an operator sees of it: the refused hellos and the malformed call (only this
    // test makes them; the recorder is the process's, shared with the other test), the
    // calls by kind, the connection still open.
    let text = b.api.raw("/metrics", &b.operator_key).await;
    let value = |series: &str| metric_value(&text, series).unwrap_or(0.0);
    assert_eq!(value(r#"runnel_native_calls_total{call="refused_hello"}"#), 4.0, "{text}");
    assert_eq!(value(r#"runnel_native_calls_total{call="malformed"}"#), 3.0);
    assert!(value(r#"runnel_native_calls_total{call="dispatch"}"#) >= 4.0);
    assert!(value(r#"runnel_native_calls_total{call="get"}"#) >= 2.0);
    assert!(value("runnel_native_connections") >= 1.0);
}

/// A client that goes away while its dispatches wait in the tenant actor's mailbox leaves
/// no job queued for ever: the accepted one runs (as if the client had gone a moment
/// later) and the refused one leaves the table, counted as refused. Before, the actor
/// skipped both once it saw their callers gone, and both stayed `queued`, each counting
/// against the tenant's unfinished jobs until the broker restarted.
#[tokio::test]
async fn dispatches_whose_client_left_while_they_waited_for_the_actor_are_not_left_queued() {
    let b = TestBroker::start().await;
    let (acme, _other, _runner) = acme_with_a_runner(&b).await;
    let (endpoint, conn, _) = connect(&b, &acme).await;
    assert!(b.handle().stall_tenant("acme", Duration::from_secs(2)));
    let (mut send, _recv) = lane(&conn).await;
    // A runner that is not alice's: refused (404), once the actor reads it. The only
    // dispatch of this test binary refused so, for the metric below.
    let mut elsewhere = echo("alice", "refused", true);
    elsewhere.runner_id = Some("r-00000000000000aa".into());
    let calls = [
        (1, ApiRequest::Dispatch { spec: echo("alice", "left", true), follow: false }),
        (2, ApiRequest::Dispatch { spec: elsewhere, follow: false }),
    ];
    lane_calls(&mut send, &calls).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    conn.close(0u32.into(), b"gone");
    endpoint.wait_idle().await;
    let settled = runnel_tests::wait_for(Duration::from_secs(10), "the jobs settled", || async {
        let (_, v) = b.api.get("/v1/jobs", &acme).await;
        let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
        jobs.iter().all(|j| j["state"] == "succeeded").then_some(jobs)
    })
    .await;
    let args: Vec<_> = settled.iter().map(|j| j["id"].as_str().unwrap_or("?")).collect();
    assert_eq!(args.len(), 1, "only the accepted job stays: {settled:?}");
    // The refusal nobody heard is counted all the same.
    let text = b.api.raw("/metrics", &b.operator_key).await;
    let refused = metric_value(&text, r#"runnel_dispatches_total{outcome="not_found"}"#);
    assert_eq!(refused, Some(1.0), "{text}");
}
