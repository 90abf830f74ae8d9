//! Micro-benchmarks: frame encode/decode, the handshake verifier's decision, runner
//! selection in a tenant with 10,000 runners, and a TLS 1.3 handshake in memory with each
//! cipher-suite order.
//!
//! `cargo bench -p runnel-bench --bench micro`
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use runnel_broker::bench_internals::{
    Needs, PairingVerifier, Pool, RunnerIndex, RunnerRecord, RunnerState, Slot,
};
use runnel_certs::{ClusterCa, RunnerIdentity, key};
use runnel_protocol::{BrokerJobFrame, JobRequest, OutputStream, RunnerJobFrame, decode, encode};
use rustls_pki_types::UnixTime;

fn frames(c: &mut Criterion) {
    let job = BrokerJobFrame::Job(JobRequest {
        job_id: "job-0123456789abcdef".into(),
        kind: "echo".into(),
        payload: vec![b'x'; 256],
        timeout_ms: 600_000,
    });
    let out = RunnerJobFrame::Output { stream: OutputStream::Stdout, data: vec![b'y'; 256] };
    let job_bytes = encode(&job).unwrap();
    let out_bytes = encode(&out).unwrap();
    c.bench_function("frame/encode job 256B", |b| b.iter(|| encode(black_box(&job)).unwrap()));
    c.bench_function("frame/decode job 256B", |b| {
        b.iter(|| decode::<BrokerJobFrame>(black_box(&job_bytes)).unwrap())
    });
    c.bench_function("frame/decode output 256B", |b| {
        b.iter(|| decode::<RunnerJobFrame>(black_box(&out_bytes)).unwrap())
    });
    let garbage = vec![0xffu8; 300];
    c.bench_function("frame/reject garbage", |b| {
        b.iter(|| decode::<BrokerJobFrame>(black_box(&garbage)).is_err())
    });
}

fn record(i: usize, state: RunnerState) -> RunnerRecord {
    RunnerRecord {
        id: format!("r-{i:016x}"),
        tenant: "t".into(),
        owner: format!("o{}", i % 10),
        name: "bench".into(),
        labels: BTreeMap::new(),
        state,
        created_at: 0,
        enrolled_at: None,
        revoked_at: None,
        cert_serial: None,
        cert_not_after: None,
        last_seen: None,
    }
}

/// Runner `i`'s record naming `der` as its current certificate.
fn record_with_cert(i: usize, state: RunnerState, der: &[u8]) -> RunnerRecord {
    let mut r = record(i, state);
    r.cert_serial = Some(runnel_certs::parse_cert(der).unwrap().serial_hex);
    r
}

fn verifier(c: &mut Criterion) {
    let ca = ClusterCa::generate("runnel").unwrap();
    let index = Arc::new(RunnerIndex::new());
    for i in 0..10_000 {
        index
            .apply(&record(i, if i % 7 == 0 { RunnerState::Revoked } else { RunnerState::Paired }));
    }
    let csr = key::csr_pem(&key::generate_key().unwrap()).unwrap();
    // The index accepts only a runner's current certificate: its record carries the serial.
    let issue = |i: usize, state| {
        let r = record(i, state);
        let id = RunnerIdentity::new("runnel", &r.tenant, &r.owner, &r.id).unwrap();
        let der = ca.issue_runner_cert(&csr, &id, Duration::from_secs(3600)).unwrap().cert_der;
        index.apply(&record_with_cert(i, state, &der));
        der
    };
    let (paired, revoked) = (issue(1, RunnerState::Paired), issue(7, RunnerState::Revoked));
    let current = record_with_cert(1, RunnerState::Paired, &paired);
    let v = PairingVerifier::new(ca.cert_der(), "runnel", index.clone(), None).unwrap();
    let foreign = {
        let other = ClusterCa::generate("runnel").unwrap();
        let r = record(1, RunnerState::Paired);
        let id = RunnerIdentity::new("runnel", &r.tenant, &r.owner, &r.id).unwrap();
        other.issue_runner_cert(&csr, &id, Duration::from_secs(3600)).unwrap().cert_der
    };
    assert!(v.decide(&paired, &[], UnixTime::now()).is_ok());
    assert!(v.decide(&revoked, &[], UnixTime::now()).is_err());
    // After its first handshake the index knows a certificate's bytes: no chain check.
    c.bench_function("verifier/accept paired (10k index)", |b| {
        b.iter(|| v.decide(black_box(&paired), &[], UnixTime::now()).is_ok())
    });
    // A certificate this broker has neither issued nor verified yet (a restarted broker, a
    // runner enrolled on another node): the chain is checked. A record with another serial
    // and then the current one again makes the index forget the bytes (not timed; one
    // setup per iteration, since criterion runs a batch's setups before its routines).
    let mut other = current.clone();
    other.cert_serial = Some("00".into());
    c.bench_function("verifier/accept paired, first handshake (chain checked)", |b| {
        b.iter_batched(
            || {
                index.apply(&other);
                index.apply(&current);
            },
            |()| v.decide(black_box(&paired), &[], UnixTime::now()).is_ok(),
            criterion::BatchSize::PerIteration,
        )
    });
    c.bench_function("verifier/refuse revoked", |b| {
        b.iter(|| v.decide(black_box(&revoked), &[], UnixTime::now()).is_err())
    });
    c.bench_function("verifier/refuse foreign CA", |b| {
        b.iter(|| v.decide(black_box(&foreign), &[], UnixTime::now()).is_err())
    });
}

fn selection(c: &mut Criterion) {
    let none = BTreeMap::new();
    for (owners, label) in [(1usize, "1 owner"), (100, "100 owners")] {
        let mut pool = Pool::new();
        for i in 0..10_000u64 {
            pool.insert(
                i,
                Slot {
                    runner_id: format!("r{i}").into(),
                    owner: format!("o{}", i as usize % owners),
                    labels: BTreeMap::new(),
                    kinds: vec!["exec".into()],
                    capacity: 4,
                    in_flight: (i % 3) as u32,
                    draining: false,
                    last_assigned: i,
                    last_failed: false,
                },
            );
        }
        let needs = Needs { owner: "o0", runner_id: None, labels: &none, kind: "exec" };
        let mut seq = 10_000;
        c.bench_function(&format!("select/pick+assign+release, 10k runners, {label}"), |b| {
            b.iter(|| {
                let conn = pool.pick(black_box(&needs)).unwrap();
                seq += 1;
                pool.assign(conn, seq);
                pool.release(conn, Some(false));
            })
        });
    }
}

/// A whole TLS 1.3 handshake in memory (both sides' CPU, Ed25519 certificates as the
/// broker's), on the suite a runnel server picks and on the one rustls's default order
/// picks.
fn tls_handshake(c: &mut Criterion) {
    let ca = ClusterCa::generate("bench").unwrap();
    let (leaf, key) = ca.issue_server_cert(&["broker.test".into()], &[]).unwrap();
    let key = runnel_certs::pem::private_key_from_pem(&key).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let default = Arc::new(rustls::crypto::ring::default_provider());
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(default.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    for (label, provider, ours) in [
        ("AES-128-GCM-SHA256 (runnel's order)", runnel_certs::tls::provider(), true),
        ("AES-256-GCM-SHA384 (rustls's default order)", default.clone(), false),
    ] {
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.cert_der.clone()], key.clone_key())
            .unwrap();
        server.send_tls13_tickets = 0;
        if ours {
            runnel_certs::tls::keep_our_order(&mut server);
        }
        let server = Arc::new(server);
        c.bench_function(&format!("tls/handshake in memory, {label}"), |b| {
            b.iter(|| {
                let name = "broker.test".try_into().unwrap();
                let mut cl = rustls::ClientConnection::new(client.clone(), name).unwrap();
                let mut sv = rustls::ServerConnection::new(server.clone()).unwrap();
                while cl.is_handshaking() || sv.is_handshaking() {
                    let mut buf = Vec::new();
                    cl.write_tls(&mut buf).unwrap();
                    sv.read_tls(&mut buf.as_slice()).unwrap();
                    sv.process_new_packets().unwrap();
                    buf.clear();
                    sv.write_tls(&mut buf).unwrap();
                    cl.read_tls(&mut buf.as_slice()).unwrap();
                    cl.process_new_packets().unwrap();
                }
                black_box(sv.negotiated_cipher_suite())
            })
        });
    }
}

criterion_group! {
    name = micro;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = frames, verifier, selection, tls_handshake
}
criterion_main!(micro);
