//! Enrollment tokens: single use, expiring, unguessable; bad requests lose nothing.
#![allow(missing_docs, clippy::unwrap_used)]

use runnel_protocol::{EnrollRequest, EnrollResponse, ErrorCode, PROTOCOL_VERSION, read_frame};
use runnel_runner::{RunnerError, StateDir, enroll};
use runnel_tests::TestBroker;
use serde_json::json;

/// Every token refusal looks the same to the peer: one code, one message (which one it was
/// is for the server's log, metrics and audit only).
fn refused_code(r: Result<runnel_protocol::Enrolled, RunnerError>) -> ErrorCode {
    match r {
        Err(RunnerError::EnrollRefused { code, message }) => {
            assert_eq!(
                message,
                "enrollment refused: the token is not valid (ask your admin for a new one)"
            );
            code
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn replayed_expired_unknown_and_wrong_pin_are_refused() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (addr, fp) = (b.handle().advertise().to_owned(), b.handle().ca_fingerprint());

    let v = b.create_runner(&admin, "alice", json!({})).await;
    let token = v["token"].as_str().unwrap();
    enroll(&addr, &fp, token, &StateDir::new(dir.path().join("a"))).await.unwrap();
    // Replay from another machine (another state dir).
    let code = refused_code(enroll(&addr, &fp, token, &StateDir::new(dir.path().join("b"))).await);
    assert_eq!(code, ErrorCode::Unauthenticated);

    // Unknown: right shape, wrong secret; and a token that is not even the right shape.
    let mut forged = token.to_owned();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    let v2 = b.create_runner(&admin, "alice", json!({})).await;
    let mut wrong_secret = v2["token"].as_str().unwrap().to_owned();
    let l = wrong_secret.pop().unwrap();
    wrong_secret.push(if l == '0' { '1' } else { '0' });
    assert_eq!(
        refused_code(enroll(&addr, &fp, &wrong_secret, &StateDir::new(dir.path().join("c"))).await),
        ErrorCode::Unauthenticated
    );
    assert_eq!(
        refused_code(enroll(&addr, &fp, "rt_nope", &StateDir::new(dir.path().join("d"))).await),
        ErrorCode::Unauthenticated
    );
    // The failed guesses did not burn the real token.
    enroll(&addr, &fp, v2["token"].as_str().unwrap(), &StateDir::new(dir.path().join("e")))
        .await
        .unwrap();

    // Expired.
    let (s, v3) = b
        .api
        .post(
            "/v1/runners",
            &admin,
            json!({ "owner": "alice", "name": "late", "token_ttl_secs": 1 }),
        )
        .await;
    assert_eq!(s, 201);
    runnel_tests::wait_past_unix(v3["expires_at_unix"].as_i64().unwrap(), "the token to expire")
        .await;
    let code = refused_code(
        enroll(&addr, &fp, v3["token"].as_str().unwrap(), &StateDir::new(dir.path().join("f")))
            .await,
    );
    assert_eq!(code, ErrorCode::Unauthenticated);

    // A wrong CA pin never gets as far as sending the token.
    let v4 = b.create_runner(&admin, "alice", json!({})).await;
    let bad_pin = format!("sha256:{}", "00".repeat(32));
    let r = enroll(
        &addr,
        &bad_pin,
        v4["token"].as_str().unwrap(),
        &StateDir::new(dir.path().join("g")),
    )
    .await;
    assert!(matches!(r, Err(RunnerError::Connection(_))), "{r:?}");
    enroll(&addr, &fp, v4["token"].as_str().unwrap(), &StateDir::new(dir.path().join("h")))
        .await
        .unwrap();

    // Refusals where the token's secret was right are in the tenant's log (counted per
    // window); the wrong guesses in the cluster's.
    let audit =
        runnel_tests::wait_for(std::time::Duration::from_secs(5), "refusals audited", || {
            let (b, admin) = (&b, admin.clone());
            async move {
                let (_, audit) = b.api.get("/v1/audit", &admin).await;
                let s = audit.to_string();
                (s.contains("replayed from") && s.contains("expired from")).then_some(audit)
            }
        })
        .await;
    let (_, cluster) = b.api.get("/v1/audit", &b.operator_key).await;
    assert!(cluster.to_string().contains("unknown from"), "{cluster}");
    // No token ever appears in the audit log.
    assert!(!audit.to_string().contains(token));
}

async fn raw_enroll(b: &TestBroker, bytes: &[u8]) -> Option<EnrollResponse> {
    let pin = runnel_certs::parse_fingerprint(&b.handle().ca_fingerprint()).unwrap();
    let cfg = runnel_runner::tls::enroll_config(pin).unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep.connect_with(cfg, b.handle().quic_addr(), "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    read_frame::<EnrollResponse, _>(&mut recv).await.ok().flatten()
}

#[tokio::test]
async fn malformed_enroll_requests_are_refused_and_keep_the_token_usable() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let v = b.create_runner(&admin, "alice", json!({})).await;
    let token = v["token"].as_str().unwrap();

    // Garbage bytes in a well-formed length prefix.
    let mut garbage = 5u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff, 0xfe, 0xfd, 0xfc, 0xfb]);
    match raw_enroll(&b, &garbage).await {
        Some(EnrollResponse::Refused { code, .. }) => assert_eq!(code, ErrorCode::BadRequest),
        other => panic!("{other:?}"),
    }
    // A valid token with a CSR that is not a CSR.
    let req = EnrollRequest {
        version: PROTOCOL_VERSION,
        token: token.into(),
        csr_pem: "not a csr".into(),
    };
    match raw_enroll(&b, &runnel_protocol::encode(&req).unwrap()).await {
        Some(EnrollResponse::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(message.contains("CSR"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // An oversized frame is refused before the broker reads it.
    let huge = (u32::MAX).to_be_bytes();
    assert!(matches!(raw_enroll(&b, &huge).await, Some(EnrollResponse::Refused { .. }) | None));

    // The token survived all of it.
    let dir = tempfile::tempdir().unwrap();
    enroll(
        b.handle().advertise(),
        &b.handle().ca_fingerprint(),
        token,
        &StateDir::new(dir.path().join("r")),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn concurrent_enrollments_with_one_token_have_one_winner() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let v = b.create_runner(&admin, "alice", json!({})).await;
    let token = v["token"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (addr, fp, token) =
            (b.handle().advertise().to_owned(), b.handle().ca_fingerprint(), token.clone());
        let state = StateDir::new(dir.path().join(i.to_string()));
        tasks.push(tokio::spawn(async move { enroll(&addr, &fp, &token, &state).await.is_ok() }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1);
}

#[tokio::test]
async fn an_enrollment_connection_that_sends_nothing_is_closed_within_its_deadline() {
    let b = TestBroker::start().await;
    let pin = runnel_certs::parse_fingerprint(&b.handle().ca_fingerprint()).unwrap();
    let mut cfg = runnel_runner::tls::enroll_config(pin).unwrap();
    // Keep-alives, so that QUIC's idle timeout is not what ends it.
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(std::time::Duration::from_millis(300)));
    cfg.transport_config(std::sync::Arc::new(transport));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep.connect_with(cfg, b.handle().quic_addr(), "localhost").unwrap().await.unwrap();
    let started = std::time::Instant::now();
    // The broker's deadline is 5 s from the handshake; allow a loaded machine its slack.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(8), conn.closed()).await;
    let why = closed.expect(
        "an idle enrollment connection was still open after 8 s (the old deadline was 10 s)",
    );
    let took = started.elapsed();
    assert!(took >= std::time::Duration::from_secs(4), "closed early: {why:?} after {took:?}");
    assert!(matches!(why, quinn::ConnectionError::ApplicationClosed(_)), "{why:?}");
}
