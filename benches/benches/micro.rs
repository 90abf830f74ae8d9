//! Micro-benchmarks: frame encode/decode, the handshake verifier's decision, and runner
//! selection in a tenant with 10,000 runners.
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

fn verifier(c: &mut Criterion) {
    let ca = ClusterCa::generate("runnel").unwrap();
    let index = Arc::new(RunnerIndex::new());
    for i in 0..10_000 {
        index
            .apply(&record(i, if i % 7 == 0 { RunnerState::Revoked } else { RunnerState::Paired }));
    }
    let v = PairingVerifier::new(ca.cert_der(), "runnel", index, None).unwrap();
    let csr = key::csr_pem(&key::generate_key().unwrap()).unwrap();
    let issue = |i: usize| {
        let r = record(i, RunnerState::Paired);
        let id = RunnerIdentity::new("runnel", &r.tenant, &r.owner, &r.id).unwrap();
        ca.issue_runner_cert(&csr, &id, Duration::from_secs(3600)).unwrap().cert_der
    };
    let (paired, revoked) = (issue(1), issue(7));
    let foreign = {
        let other = ClusterCa::generate("runnel").unwrap();
        let r = record(1, RunnerState::Paired);
        let id = RunnerIdentity::new("runnel", &r.tenant, &r.owner, &r.id).unwrap();
        other.issue_runner_cert(&csr, &id, Duration::from_secs(3600)).unwrap().cert_der
    };
    assert!(v.decide(&paired, &[], UnixTime::now()).is_ok());
    assert!(v.decide(&revoked, &[], UnixTime::now()).is_err());
    c.bench_function("verifier/accept paired (10k index)", |b| {
        b.iter(|| v.decide(black_box(&paired), &[], UnixTime::now()).is_ok())
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

criterion_group! {
    name = micro;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = frames, verifier, selection
}
criterion_main!(micro);
