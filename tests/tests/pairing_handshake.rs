//! The pairing check inside the TLS handshake: foreign CAs, forged identities, expired and
//! unknown certificates never get an application byte read.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use quinn::{ConnectionError, TransportErrorCode};
use runnel_certs::{ClusterCa, RunnerIdentity, Validity, key, pem};
use runnel_protocol::{ServerControl, read_frame, write_frame};
use runnel_tests::{TestBroker, connect_with_cert, hello};
use rustls::AlertDescription;

/// How a session attempt ended.
#[derive(Debug, PartialEq)]
enum Session {
    /// Welcome came back.
    Welcomed,
    /// The broker refused the certificate inside the TLS handshake with this alert.
    Alert(u8),
    /// Anything else (an application close, a timeout…): not what these tests expect.
    Other(String),
}

/// TLS alerts travel in QUIC as the transport error `CRYPTO_ERROR` (0x100 + alert).
fn alert(a: AlertDescription) -> Session {
    Session::Alert(u8::from(a))
}

/// Connects with `cert_pem` + `key_pem`, sends Hello, and says how it ended. A refusal in
/// the handshake shows as a crypto transport error: the broker closed the connection
/// before its TLS handshake completed, so it cannot have read an application byte.
async fn try_session(b: &TestBroker, cert_pem: &str, key_pem: &str) -> Session {
    let refusal = |e: &ConnectionError| match e {
        ConnectionError::ConnectionClosed(c) => {
            let code = u64::from(c.error_code);
            match code.checked_sub(u64::from(TransportErrorCode::crypto(0))) {
                Some(a) if a < 256 => Session::Alert(a as u8),
                _ => Session::Other(format!("{e:?}")),
            }
        }
        other => Session::Other(format!("{other:?}")),
    };
    let conn = match connect_with_cert(b, cert_pem, key_pem).await {
        Ok(c) => c,
        Err(e) => return refusal(&e),
    };
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return refusal(&e),
    };
    // With TLS 1.3 the client may finish first and write; the refusal shows on the read.
    let _ = write_frame(&mut send, &hello()).await;
    match read_frame::<ServerControl, _>(&mut recv).await {
        Ok(Some(ServerControl::Welcome(_))) => Session::Welcomed,
        other => match conn.close_reason() {
            Some(e) => refusal(&e),
            None => Session::Other(format!("{other:?}, connection still open")),
        },
    }
}

#[tokio::test]
async fn foreign_forged_expired_and_unknown_certificates_fail_the_handshake() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let victim_admin = b.tenant("victim").await;
    let dir = tempfile::tempdir().unwrap();
    let (runner_id, state) = b.enrolled(&admin, "alice", &dir.path().join("r")).await;
    let (victim_id, _) = b.enrolled(&victim_admin, "boss", &dir.path().join("v")).await;
    let key_pem = std::fs::read_to_string(state.key_path()).unwrap();
    let cert_pem = std::fs::read_to_string(state.cert_path()).unwrap();
    // The genuine pair works.
    assert_eq!(try_session(&b, &cert_pem, &key_pem).await, Session::Welcomed);

    let csr = key::csr_pem(&key::key_from_pem(&key_pem).unwrap()).unwrap();
    let life = Duration::from_secs(3600);

    // 1. A cert for our own identity from a different CA.
    let foreign = ClusterCa::generate("runnel").unwrap();
    let me = RunnerIdentity::new("runnel", "acme", "alice", &runner_id).unwrap();
    let c = foreign.issue_runner_cert(&csr, &me, life).unwrap();
    assert_eq!(try_session(&b, &c.cert_pem, &key_pem).await, alert(AlertDescription::UnknownCA));

    // 2. A cert naming another tenant's real runner, signed by the wrong key.
    let them = RunnerIdentity::new("runnel", "victim", "boss", &victim_id).unwrap();
    let c = foreign.issue_runner_cert(&csr, &them, life).unwrap();
    assert_eq!(try_session(&b, &c.cert_pem, &key_pem).await, alert(AlertDescription::UnknownCA));

    // 3. Our CA, our identity, but expired (a validity window that ended an hour ago).
    let ca = b.ca();
    let now = time::OffsetDateTime::now_utc();
    let past = Validity {
        not_before: now - time::Duration::hours(2),
        not_after: now - time::Duration::hours(1),
    };
    let c = ca.issue_runner_cert_valid(&csr, &me, past).unwrap();
    assert_eq!(
        try_session(&b, &c.cert_pem, &key_pem).await,
        alert(AlertDescription::CertificateExpired)
    );

    // 4. Our CA, a runner id the broker never created.
    let ghost = RunnerIdentity::new("runnel", "acme", "alice", "r-ghost").unwrap();
    let c = ca.issue_runner_cert(&csr, &ghost, life).unwrap();
    let refused_unknown = alert(AlertDescription::AccessDenied);
    assert_eq!(try_session(&b, &c.cert_pem, &key_pem).await, refused_unknown);

    // 5. Our CA, a real runner, but the owner in the cert is not the record's owner.
    let wrong_owner = RunnerIdentity::new("runnel", "acme", "mallory", &runner_id).unwrap();
    let c = ca.issue_runner_cert(&csr, &wrong_owner, life).unwrap();
    assert_eq!(try_session(&b, &c.cert_pem, &key_pem).await, refused_unknown);

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
    // The foreign-CA claims are counted into the cluster log per window.
    runnel_tests::wait_for(Duration::from_secs(5), "foreign_ca in the cluster log", || async {
        let (_, cluster) = b.api.get("/v1/audit", &b.operator_key).await;
        cluster.to_string().contains("handshake refused: unknown_ca from 127.0.0.1").then_some(())
    })
    .await;
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

/// A self-signed certificate for `key` that claims `uri`, with `eku` and `validity`.
fn self_signed(
    key: &rcgen::KeyPair,
    uri: &str,
    eku: rcgen::ExtendedKeyUsagePurpose,
    validity: (time::OffsetDateTime, time::OffsetDateTime),
) -> String {
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.to_string().try_into().unwrap())];
    params.extended_key_usages = vec![eku];
    (params.not_before, params.not_after) = validity;
    params.self_signed(key).unwrap().pem()
}

#[tokio::test]
async fn strangers_claiming_a_tenant_cannot_write_into_its_audit_log() {
    let b = TestBroker::start().await;
    let victim_admin = b.tenant("victim").await;
    let dir = tempfile::tempdir().unwrap();
    let (victim_runner, _) = b.enrolled(&victim_admin, "boss", &dir.path().join("r")).await;
    let (_, before) = b.api.get("/v1/audit", &victim_admin).await;
    let before = before["events"].as_array().unwrap().len();

    let key = runnel_certs::key::generate_key().unwrap();
    let key_pem = key.serialize_pem();
    let uri = format!("spiffe://runnel/tenant/victim/owner/boss/runner/{victim_runner}");
    let now = time::OffsetDateTime::now_utc();
    let current = (now - time::Duration::hours(1), now + time::Duration::hours(1));
    let past = (now - time::Duration::hours(2), now - time::Duration::hours(1));
    // Expired (webpki says so before it looks at the issuer) and wrong-EKU forgeries.
    let expired = self_signed(&key, &uri, rcgen::ExtendedKeyUsagePurpose::ClientAuth, past);
    let server_eku = self_signed(&key, &uri, rcgen::ExtendedKeyUsagePurpose::ServerAuth, current);
    for forged in [&expired, &server_eku] {
        assert!(
            matches!(try_session(&b, forged, &key_pem).await, Session::Alert(_)),
            "a forgery must be refused in the handshake"
        );
    }
    // The refusals are recorded, at cluster level only, counted per source host.
    runnel_tests::wait_for(Duration::from_secs(5), "the refusals in the cluster log", || async {
        let (_, cluster) = b.api.get("/v1/audit", &b.operator_key).await;
        let n: u64 = cluster["events"]
            .as_array()?
            .iter()
            .filter_map(|e| e["detail"].as_str())
            .filter(|d| d.contains("handshake refused") && d.ends_with("from 127.0.0.1"))
            .filter_map(|d| d.split('×').next()?.parse::<u64>().ok())
            .sum();
        (n >= 2).then_some(())
    })
    .await;
    let (s, after) = b.api.get("/v1/audit", &victim_admin).await;
    assert_eq!(s, 200);
    assert_eq!(after["events"].as_array().unwrap().len(), before, "{after}");
}

/// Every handshake runs the pairing check, because the broker hands out no TLS session
/// tickets: rustls resumes a session without verifying the client certificate again, so
/// a client that kept a ticket (the real runner builds a fresh TLS config per session; a
/// hostile one need not) could come back on a certificate that has since expired or been
/// replaced by a renewal. Tickets would also cost every handshake their encryption and a
/// cache entry. Runner and native API connections alike (one server config).
#[tokio::test]
async fn the_broker_hands_out_no_session_tickets() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, state) = b.enrolled(&admin, "alice", &dir.path().join("r")).await;
    let ca = pem::certs_from_pem(b.ca().cert_pem()).unwrap().remove(0);
    let chain = pem::certs_from_pem(&std::fs::read_to_string(state.cert_path()).unwrap()).unwrap();
    let key =
        pem::private_key_from_pem(&std::fs::read_to_string(state.key_path()).unwrap()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let tickets = std::sync::Arc::new(runnel_tests::CountingTickets::default());
    let runner = builder.clone().with_client_auth_cert(chain, key).unwrap();
    let api = builder.with_no_client_auth();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    for (mut tls, alpn) in
        [(runner, runnel_protocol::ALPN_RUNNER), (api, runnel_protocol::ALPN_API)]
    {
        tls.alpn_protocols = vec![alpn.to_vec()];
        tls.resumption = rustls::client::Resumption::store(tickets.clone());
        let cfg = quinn::ClientConfig::new(std::sync::Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        ));
        let conn =
            ep.connect_with(cfg, b.handle().quic_addr(), "localhost").unwrap().await.unwrap();
        // Tickets come right after the handshake; a round trip on a stream lets them in.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let _ = write_frame(&mut send, &hello()).await;
        let _ =
            tokio::time::timeout(Duration::from_secs(5), read_frame::<ServerControl, _>(&mut recv))
                .await;
        conn.close(0u32.into(), b"done");
    }
    let given = tickets.given.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(given, 0, "the broker handed out {given} session tickets");
}
