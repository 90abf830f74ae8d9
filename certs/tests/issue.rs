//! The CA issues what it should, and ignores what a CSR asks for.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use runnel_certs::{ClusterCa, Identity, RunnerIdentity, key, parse_cert, pem};

#[test]
fn runner_cert_carries_only_the_brokers_identity() {
    let ca = ClusterCa::generate("c1").expect("ca");
    let runner_key = key::generate_key().expect("key");
    // A hostile CSR asking for another tenant's identity and a DNS name.
    let mut params = CertificateParams::new(vec!["evil.example".to_string()]).expect("params");
    params.subject_alt_names.push(SanType::URI(
        "spiffe://c1/tenant/victim/owner/boss/runner/x".to_string().try_into().expect("ia5"),
    ));
    let csr = params.serialize_request(&runner_key).expect("csr").pem().expect("pem");

    let id = RunnerIdentity::new("c1", "acme", "alice", "r1").expect("id");
    let issued = ca.issue_runner_cert(&csr, &id, Duration::from_secs(3600)).expect("issue");
    let parsed = parse_cert(&issued.cert_der).expect("parse");
    assert_eq!(parsed.identity, Identity::Runner(id));
    assert_eq!(parsed.serial_hex, issued.serial_hex);
    assert_eq!(parsed.serial_hex.len(), 32);
    let life = parsed.not_after - parsed.not_before;
    assert!(
        life >= time::Duration::hours(1)
            && life <= time::Duration::hours(1) + time::Duration::minutes(6)
    );
    // Serials are random.
    let again = ca
        .issue_runner_cert(&csr, &parsed_identity(&parsed), Duration::from_secs(60))
        .expect("again");
    assert_ne!(again.serial_hex, issued.serial_hex);
}

fn parsed_identity(p: &runnel_certs::ParsedCert) -> RunnerIdentity {
    match &p.identity {
        Identity::Runner(r) => r.clone(),
        Identity::Node(_) => panic!("runner expected"),
    }
}

#[test]
fn non_ed25519_and_garbage_csrs_are_refused() {
    let ca = ClusterCa::generate("c1").expect("ca");
    let id = RunnerIdentity::new("c1", "acme", "alice", "r1").expect("id");
    let p256 = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("p256");
    let csr =
        CertificateParams::default().serialize_request(&p256).expect("csr").pem().expect("pem");
    assert!(matches!(
        ca.issue_runner_cert(&csr, &id, Duration::from_secs(60)),
        Err(runnel_certs::CertError::KeyAlgorithm)
    ));
    assert!(ca.issue_runner_cert("garbage", &id, Duration::from_secs(60)).is_err());
    let other = RunnerIdentity::new("c2", "acme", "alice", "r1").expect("id");
    let good = key::csr_pem(&key::generate_key().expect("k")).expect("csr");
    assert!(ca.issue_runner_cert(&good, &other, Duration::from_secs(60)).is_err());
}

#[test]
fn ca_round_trips_through_pem_files() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ClusterCa::generate("c1").expect("ca");
    pem::write_public(&dir.path().join("ca.pem"), ca.cert_pem()).expect("write");
    pem::write_private(&dir.path().join("ca.key"), &ca.key_pem()).expect("write");
    let loaded = ClusterCa::from_pem(
        "c1",
        &pem::read(&dir.path().join("ca.pem")).expect("read"),
        &pem::read(&dir.path().join("ca.key")).expect("read"),
    )
    .expect("load");
    assert_eq!(loaded.fingerprint(), ca.fingerprint());
    assert_ne!(ClusterCa::generate("c1").expect("other").fingerprint(), ca.fingerprint());
}

#[test]
fn server_cert_names_hosts_and_ips() {
    let ca = ClusterCa::generate("c1").expect("ca");
    let (cert, key_pem) = ca
        .issue_server_cert(&["localhost".into()], &["127.0.0.1".parse().expect("ip")])
        .expect("server");
    assert!(key_pem.contains("PRIVATE KEY"));
    assert!(cert.cert_pem.contains("BEGIN CERTIFICATE"));
    // It carries no runnel identity, so parse_cert refuses it.
    assert!(parse_cert(&cert.cert_der).is_err());
}

#[test]
fn a_certificate_and_its_csr_name_the_same_key_and_another_keys_csr_does_not() {
    let ca = ClusterCa::generate("c1").expect("ca");
    let mine = key::generate_key().expect("key");
    let other = key::generate_key().expect("key");
    let id = RunnerIdentity::new("c1", "acme", "alice", "r1").expect("id");
    let csr = key::csr_pem(&mine).expect("csr");
    let cert = ca.issue_runner_cert(&csr, &id, Duration::from_secs(3600)).expect("issue");
    let parsed = parse_cert(&cert.cert_der).expect("parse");
    assert_eq!(parsed.public_key.len(), 32, "ed25519 raw key");
    assert_eq!(runnel_certs::csr_public_key(&csr).expect("csr key"), parsed.public_key);
    let theirs = key::csr_pem(&other).expect("csr");
    assert_ne!(runnel_certs::csr_public_key(&theirs).expect("csr key"), parsed.public_key);
    assert!(runnel_certs::csr_public_key("not a csr").is_err());
}
