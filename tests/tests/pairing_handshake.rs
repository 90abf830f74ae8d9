//! The pairing check inside the TLS handshake: foreign CAs, forged identities, expired and
//! unknown certificates never get an application byte read.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use runnel_certs::{ClusterCa, RunnerIdentity, key, pem};
use runnel_protocol::{ServerControl, read_frame, write_frame};
use runnel_tests::{TestBroker, connect_with_cert, hello};

/// Connects with `cert_pem` + `key_pem`, sends Hello, and says whether Welcome came back
/// (Err: why the connection closed).
async fn try_session(b: &TestBroker, cert_pem: &str, key_pem: &str) -> Result<(), String> {
    let conn = connect_with_cert(b, cert_pem, key_pem).await.map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(&mut send, &hello()).await.map_err(|e| e.to_string())?;
    match read_frame::<ServerControl, _>(&mut recv).await {
        Ok(Some(ServerControl::Welcome(_))) => Ok(()),
        other => Err(format!("{other:?} / {:?}", conn.close_reason())),
    }
}

#[tokio::test]
async fn foreign_forged_expired_and_unknown_certificates_fail_the_handshake() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let victim_admin = b.tenant("victim").await;
    let dir = tempfile::tempdir().unwrap();
    let (runner_id, state) = b.enrolled(&admin, "alice", dir.path()).await;
    let (victim_id, _) = b.enrolled(&victim_admin, "boss", &dir.path().join("v")).await;
    let key_pem = std::fs::read_to_string(state.key_path()).unwrap();
    let cert_pem = std::fs::read_to_string(state.cert_path()).unwrap();
    // The genuine pair works.
    try_session(&b, &cert_pem, &key_pem).await.unwrap();

    let csr = key::csr_pem(&key::key_from_pem(&key_pem).unwrap()).unwrap();
    let life = Duration::from_secs(3600);

    // 1. A cert for our own identity from a different CA.
    let foreign = ClusterCa::generate("runnel").unwrap();
    let me = RunnerIdentity::new("runnel", "acme", "alice", &runner_id).unwrap();
    let c = foreign.issue_runner_cert(&csr, &me, life).unwrap();
    let err = try_session(&b, &c.cert_pem, &key_pem).await.unwrap_err();
    assert!(err.contains("48") || err.to_lowercase().contains("unknown"), "{err}");

    // 2. A cert naming another tenant's real runner, signed by the wrong key.
    let them = RunnerIdentity::new("runnel", "victim", "boss", &victim_id).unwrap();
    let c = foreign.issue_runner_cert(&csr, &them, life).unwrap();
    assert!(try_session(&b, &c.cert_pem, &key_pem).await.is_err());

    // 3. Our CA, our identity, but expired.
    let ca = b.ca();
    let c = ca.issue_runner_cert(&csr, &me, Duration::ZERO).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let err = try_session(&b, &c.cert_pem, &key_pem).await.unwrap_err();
    assert!(err.contains("45") || err.to_lowercase().contains("expired"), "{err}");

    // 4. Our CA, a runner id the broker never created.
    let ghost = RunnerIdentity::new("runnel", "acme", "alice", "r-ghost").unwrap();
    let c = ca.issue_runner_cert(&csr, &ghost, life).unwrap();
    assert!(try_session(&b, &c.cert_pem, &key_pem).await.is_err());

    // 5. Our CA, a real runner, but the owner in the cert is not the record's owner.
    let wrong_owner = RunnerIdentity::new("runnel", "acme", "mallory", &runner_id).unwrap();
    let c = ca.issue_runner_cert(&csr, &wrong_owner, life).unwrap();
    assert!(try_session(&b, &c.cert_pem, &key_pem).await.is_err());

    // Denials are audited: at cluster level for the foreign CA, at tenant level otherwise.
    runnel_tests::wait_for(Duration::from_secs(5), "denials in the audit log", || {
        let b = &b;
        let admin = admin.clone();
        async move {
            let (_, audit) = b.api.get("/v1/audit", &admin).await;
            let s = audit.to_string();
            (s.contains("(expired)") && s.contains("(unknown)")).then_some(())
        }
    })
    .await;
    let (_, cluster) = b.api.get("/v1/audit", &b.operator_key).await;
    assert!(cluster.to_string().contains("(foreign_ca)"), "{cluster}");
    let (_, victim_audit) = b.api.get("/v1/audit", &victim_admin).await;
    assert!(
        !victim_audit.to_string().contains("foreign_ca"),
        "a forged claim must not land in the victim's log"
    );
}

#[tokio::test]
async fn runner_alpn_without_a_client_certificate_is_closed_unread() {
    let b = TestBroker::start().await;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pem::certs_from_pem(b.ca().cert_pem()).unwrap().remove(0)).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![runnel_protocol::ALPN_RUNNER.to_vec()];
    let cfg = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep.connect_with(cfg, b.handle().quic_addr(), "localhost").unwrap().await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.unwrap();
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, runnel_protocol::ErrorCode::Unauthenticated.as_u32().into())
        }
        other => panic!("{other:?}"),
    }
}
