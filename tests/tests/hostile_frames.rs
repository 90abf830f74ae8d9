//! A peer with a valid certificate that sends garbage is disconnected with a protocol error;
//! the broker and the other runners carry on.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use runnel_protocol::{ClientControl, ErrorCode, ServerControl, read_frame, write_frame};
use runnel_tests::{TestBroker, closed_with, connect_as, hello, welcomed, welcomed_full};

#[tokio::test]
async fn renewal_floods_are_refused() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, state) = b.enrolled(&admin, "alice", &dir.path().join("r")).await;
    let key = runnel_certs::key::key_from_pem(&std::fs::read_to_string(state.key_path()).unwrap())
        .unwrap();
    let csr_pem = runnel_certs::key::csr_pem(&key).unwrap();
    let (_conn, mut send, mut recv) = welcomed_full(&b, &state).await;
    for _ in 0..3 {
        write_frame(&mut send, &ClientControl::RenewCert { csr_pem: csr_pem.clone() })
            .await
            .unwrap();
    }
    let first = read_frame::<ServerControl, _>(&mut recv).await.unwrap();
    assert!(matches!(first, Some(ServerControl::RenewedCert { .. })), "{first:?}");
    for _ in 0..2 {
        let next = read_frame::<ServerControl, _>(&mut recv).await.unwrap();
        assert!(matches!(next, Some(ServerControl::RenewRefused { .. })), "{next:?}");
    }
    let (_, audit) = b.api.get("/v1/audit", &admin).await;
    let renewed =
        audit["events"].as_array().unwrap().iter().filter(|e| e["event"] == "renewed").count();
    assert_eq!(renewed, 1);
}

#[tokio::test]
async fn garbage_and_oversized_frames_close_only_the_offender() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (good_id, good) = b.runner(&admin, "alice", &dir.path().join("good"), 2).await;
    let (evil_id, evil) = b.enrolled(&admin, "alice", &dir.path().join("evil")).await;

    // Garbage instead of Hello.
    let conn = connect_as(&b, &evil).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
    assert_eq!(closed_with(&conn).await, ErrorCode::Protocol.as_u32());

    // An oversized length prefix instead of Hello.
    let conn = connect_as(&b, &evil).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    assert_eq!(closed_with(&conn).await, ErrorCode::FrameTooLarge.as_u32());

    // A proper session that turns hostile after Welcome.
    let (conn, mut send) = welcomed(&b, &evil).await;
    send.write_all(&[0, 0, 0, 2, 0xee, 0xee]).await.unwrap();
    assert_eq!(closed_with(&conn).await, ErrorCode::Protocol.as_u32());

    // A session that answers a job with garbage: the job is lost, the connection closed.
    // The job names the evil runner, so the good one stays online throughout.
    let (conn, _control) = welcomed(&b, &evil).await;
    let api = b.api.clone();
    let admin2 = admin.clone();
    let job = tokio::spawn(async move {
        api.post("/v1/jobs", &admin2, serde_json::json!({ "owner": "alice", "runner_id": evil_id, "kind": "exec", "exec": { "program": "true" }, "wait": true })).await
    });
    let (mut jsend, _jrecv) =
        tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await.unwrap().unwrap();
    jsend.write_all(&[0, 0, 0, 1, 0x99]).await.unwrap();
    let (_, v) = job.await.unwrap();
    assert_eq!(v["state"], "runner_lost", "{v}");
    assert_eq!(closed_with(&conn).await, ErrorCode::Protocol.as_u32());

    // A second Hello is out of order.
    let (conn, mut send) = welcomed(&b, &evil).await;
    write_frame(&mut send, &hello()).await.unwrap();
    assert_eq!(closed_with(&conn).await, ErrorCode::Protocol.as_u32());

    // An unsupported protocol version gets an Error frame, not a hang.
    let conn = connect_as(&b, &evil).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let ClientControl::Hello(mut h) = hello() else { unreachable!() };
    h.min_version = 99;
    h.max_version = 100;
    write_frame(&mut send, &ClientControl::Hello(h)).await.unwrap();
    match read_frame::<ServerControl, _>(&mut recv).await {
        Ok(Some(ServerControl::Error { code, .. })) => {
            assert_eq!(code, ErrorCode::UnsupportedVersion)
        }
        other => panic!("{other:?}"),
    }

    // Through all of it the good runner kept its first session (never dropped, never
    // reconnected), and it still takes work.
    let status = good.status();
    assert!(
        matches!(&status, runnel_runner::RunnerStatus::Connected { runner_id, session: 1, .. } if *runner_id == good_id),
        "{status:?}"
    );
    let (s, v) = b
        .api
        .post("/v1/jobs", &admin, serde_json::json!({ "owner": "alice", "runner_id": good_id, "kind": "exec", "exec": { "program": "echo", "args": ["still fine"] }, "wait": true }))
        .await;
    assert_eq!((s, v["output"].as_str()), (200, Some("still fine\n")), "{v}");
    let status = good.status();
    assert!(
        matches!(&status, runnel_runner::RunnerStatus::Connected { runner_id, session: 1, .. } if *runner_id == good_id),
        "{status:?}"
    );
}

/// A runner is allowed the one stream it opens (its control stream): quinn keeps a table
/// entry per stream a peer may open, on every connection, so a runner gets no credit for
/// a second one. Jobs still flow: they are streams the broker opens. (Fails with the
/// earlier headroom of 4: the second stream opens at once.)
#[tokio::test]
async fn a_runner_may_open_only_its_control_stream() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (id, state) = b.enrolled(&admin, "alice", &dir.path().join("r")).await;
    let (conn, _control) = welcomed(&b, &state).await;
    let second = tokio::time::timeout(Duration::from_millis(500), conn.open_bi()).await;
    assert!(second.is_err(), "a second stream was granted");
    // A job reaches it all the same, on a stream the broker opens.
    let body = serde_json::json!({ "owner": "alice", "runner_id": id, "kind": "exec", "exec": { "program": "true" } });
    let (s, v) = b.api.post("/v1/jobs", &admin, body).await;
    assert_eq!(s, 201, "{v}");
    let (_jsend, mut jrecv) =
        tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await.unwrap().unwrap();
    let job_frame = read_frame::<runnel_protocol::BrokerJobFrame, _>(&mut jrecv).await.unwrap();
    assert!(matches!(job_frame, Some(runnel_protocol::BrokerJobFrame::Job(_))), "{job_frame:?}");
}
