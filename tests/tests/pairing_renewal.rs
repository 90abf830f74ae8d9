//! Identity you can take back: a renewal keeps the runner's key, retires the old
//! certificate at once, and a runner has one live session, the newest.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use runnel_certs::key;
use runnel_protocol::{ClientControl, ErrorCode, ServerControl, read_frame, write_frame};
use runnel_tests::{TestBroker, closed_with, connect_with_cert, hello, welcomed_full};
use serde_json::json;

/// Sends a renewal request on a welcomed session and returns the answer.
async fn renew(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    csr_pem: String,
) -> ServerControl {
    write_frame(send, &ClientControl::RenewCert { csr_pem }).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), read_frame::<ServerControl, _>(recv))
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn renewal_for_another_key_is_refused_and_the_session_carries_on() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (runner_id, state) = b.enrolled(&admin, "alice", &dir.path().join("r")).await;
    let (conn, mut send, mut recv) = welcomed_full(&b, &state).await;

    // Someone holding a copy of key.pem + cert.pem tries to move the identity to their key.
    let thief = key::csr_pem(&key::generate_key().unwrap()).unwrap();
    match renew(&mut send, &mut recv, thief).await {
        ServerControl::RenewRefused { code, message } => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(message.contains("key"), "{message}");
        }
        other => panic!("a CSR for another key was answered {other:?}"),
    }
    // The session is still alive: a heartbeat goes through and the connection stays open.
    write_frame(
        &mut send,
        &ClientControl::Heartbeat(runnel_protocol::Heartbeat { in_flight: 0, load_milli: 0 }),
    )
    .await
    .unwrap();
    assert!(conn.close_reason().is_none());
    let (_, audit) = b.api.get("/v1/audit", &admin).await;
    assert!(
        audit["events"].as_array().unwrap().iter().any(|e| e["event"] == "denied"
            && e["runner_id"] == runner_id.as_str()
            && e["detail"].as_str().unwrap().contains("another key")),
        "{audit}"
    );
}

#[tokio::test]
async fn after_a_renewal_the_old_certificate_is_refused_in_the_handshake() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, state) = b.enrolled(&admin, "alice", &dir.path().join("r")).await;
    let key_pem = std::fs::read_to_string(state.key_path()).unwrap();
    let old_cert = std::fs::read_to_string(state.cert_path()).unwrap();
    let (_conn, mut send, mut recv) = welcomed_full(&b, &state).await;
    let csr = key::csr_pem(&key::key_from_pem(&key_pem).unwrap()).unwrap();
    let ServerControl::RenewedCert { cert_pem: new_cert, .. } =
        renew(&mut send, &mut recv, csr).await
    else {
        panic!("renewal refused")
    };

    // The old certificate (still inside its validity) no longer opens a session: the
    // handshake refuses it with access_denied (CRYPTO_ERROR 0x100 + 49).
    let conn = connect_with_cert(&b, &old_cert, &key_pem).await;
    let refused = match conn {
        Err(e) => e,
        Ok(conn) => {
            let (mut s, mut r) = match conn.open_bi().await {
                Ok(x) => x,
                Err(e) => panic!("unexpected: {e:?}"),
            };
            let _ = write_frame(&mut s, &hello()).await;
            assert!(
                read_frame::<ServerControl, _>(&mut r).await.is_err()
                    || conn.close_reason().is_some()
            );
            conn.close_reason().expect("closed")
        }
    };
    match refused {
        quinn::ConnectionError::ConnectionClosed(c) => assert_eq!(
            c.error_code,
            quinn::TransportErrorCode::crypto(u8::from(rustls::AlertDescription::AccessDenied))
        ),
        other => panic!("old certificate: {other:?}"),
    }
    // The new one does.
    let conn = connect_with_cert(&b, &new_cert, &key_pem).await.unwrap();
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    write_frame(&mut s, &hello()).await.unwrap();
    assert!(matches!(
        read_frame::<ServerControl, _>(&mut r).await,
        Ok(Some(ServerControl::Welcome(_)))
    ));
}

#[tokio::test]
async fn a_second_session_replaces_the_first_and_only_the_newest_gets_jobs() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (runner_id, state) = b.enrolled(&admin, "alice", &dir.path().join("r")).await;
    let (first, _s1, _r1) = welcomed_full(&b, &state).await;
    let (second, _s2, _r2) = welcomed_full(&b, &state).await;
    assert_eq!(closed_with(&first).await, ErrorCode::Replaced.as_u32());
    assert!(second.close_reason().is_none(), "the newest session stays");

    // A job for the runner goes to the second connection.
    let api = b.api.clone();
    let key = admin.clone();
    let job = tokio::spawn(async move {
        api.post(
            "/v1/jobs",
            &key,
            json!({ "owner": "alice", "kind": "exec", "exec": { "program": "true" } }),
        )
        .await
    });
    let (_js, _jr) =
        tokio::time::timeout(Duration::from_secs(5), second.accept_bi()).await.unwrap().unwrap();
    assert_eq!(job.await.unwrap().0, 201);

    // The replacement is audited and counted.
    let (_, audit) = b.api.get("/v1/audit", &admin).await;
    assert!(
        audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "replaced" && e["runner_id"] == runner_id.as_str()),
        "{audit}"
    );
    let metrics = b.api.raw("/metrics", &b.operator_key).await;
    assert!(
        metrics.lines().any(|l| l.starts_with("runnel_sessions_replaced_total ")
            && l.split(' ').nth(1).and_then(|v| v.parse::<f64>().ok()) >= Some(1.0)),
        "{metrics}"
    );
}
