//! The native API (`runnel-api/1` on the broker's QUIC port): an API key in the first
//! frame, then a call per stream, under the HTTP API's tenant and owner rules.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use runnel_protocol::{
    ALPN_API, ApiHello, ApiRequest, ApiWelcome, DispatchSpec, ExecSpec, JobState, PROTOCOL_VERSION,
    PeerResponse, read_frame, write_frame,
};
use runnel_runner::Runner;
use runnel_tests::{TestBroker, metric_value};
use serde_json::json;

/// Dials the broker's QUIC port with the native ALPN, pinning its CA, and says hello.
async fn connect(b: &TestBroker, key: &str) -> (quinn::Endpoint, quinn::Connection, ApiWelcome) {
    let h = b.handle.as_ref().unwrap();
    let pin = runnel_certs::parse_fingerprint(&h.ca_fingerprint()).unwrap();
    let mut tls = runnel_certs::pin::client_config(pin).unwrap();
    tls.alpn_protocols = vec![ALPN_API.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let cfg = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    let conn = endpoint.connect_with(cfg, h.quic_addr(), "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = ApiHello { version: PROTOCOL_VERSION, key: key.to_owned() };
    write_frame(&mut send, &hello).await.unwrap();
    send.finish().unwrap();
    let welcome = read_frame::<ApiWelcome, _>(&mut recv).await.unwrap().unwrap();
    (endpoint, conn, welcome)
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

fn echo(owner: &str, text: &str, wait: bool) -> DispatchSpec {
    let exec = ExecSpec { program: "echo".into(), args: vec![text.into()], env: vec![], cwd: None };
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
    let acme = b.tenant("acme").await;
    let other = b.tenant("other").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, state) = b.enrolled(&acme, "alice", &dir.path().join("r")).await;
    let runner = Runner::builder(state).capacity(2).spawn().unwrap();
    runner.wait_connected(Duration::from_secs(10)).await.unwrap();

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

    // A key revoked while its connection is open stops working on the next call.
    b.revoke_key_of_role(&acme, "acme", "member").await;
    let frames = call(&conn, &ApiRequest::GetJob { id: "j-nothing".into() }).await;
    assert_eq!(refusal(&frames), Some((401, "unauthorized")), "{frames:?}");

    // What an operator sees of it: the refused hellos and the malformed call (only this
    // test makes them; the recorder is the process's, shared with the other test), the
    // calls by kind, the connection still open.
    let text = b.api.raw("/metrics", &b.operator_key).await;
    let value = |series: &str| metric_value(&text, series).unwrap_or(0.0);
    assert_eq!(value(r#"runnel_native_calls_total{call="refused_hello"}"#), 2.0, "{text}");
    assert_eq!(value(r#"runnel_native_calls_total{call="malformed"}"#), 1.0);
    assert!(value(r#"runnel_native_calls_total{call="dispatch"}"#) >= 4.0);
    assert!(value(r#"runnel_native_calls_total{call="get"}"#) >= 2.0);
    assert!(value("runnel_native_connections") >= 1.0);
}
