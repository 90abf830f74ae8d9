//! The audit log: newest first with cursor paging, bounded by retention, and not writable
//! without limit by strangers.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;
use runnel_tests::{TestBroker, wait_for};
use serde_json::{Value, json};

fn events(v: &Value) -> Vec<Value> {
    v["events"].as_array().unwrap().clone()
}

#[tokio::test]
async fn pages_run_newest_first_and_reach_the_oldest() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    for i in 0..25 {
        let (s, _) = b
            .api
            .post("/v1/runners", &admin, json!({ "owner": "o", "name": format!("n{i}") }))
            .await;
        assert_eq!(s, 201);
    }
    let (_, all) = b.api.get("/v1/audit?limit=1000", &admin).await;
    let all = events(&all);
    assert!(all.len() >= 26, "{}", all.len());
    // Newest first: the last runner created leads.
    assert!(all[0]["detail"].as_str().unwrap().contains("n24"), "{:?}", all[0]);
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/audit?limit=10&before={c}"),
            None => "/v1/audit?limit=10".to_owned(),
        };
        let (s, page) = b.api.get(&path, &admin).await;
        assert_eq!(s, 200, "{page}");
        paged.extend(events(&page));
        match page["next_before"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(paged.len() <= all.len(), "paging does not end");
    }
    assert_eq!(paged, all, "the pages, joined, are the whole log in the same order");
    assert!(paged.windows(2).all(|w| w[0]["at"].as_i64() >= w[1]["at"].as_i64()));
    // A bad cursor or limit is a clear 400.
    assert_eq!(b.api.get("/v1/audit?before=../x", &admin).await.0, 400);
    assert_eq!(b.api.get("/v1/audit?limit=0", &admin).await.0, 400);
}

#[tokio::test]
async fn retention_keeps_only_the_newest_events() {
    let b = TestBroker::start_with(|c| {
        c.audit_retention_count = 5;
        c.audit_prune_every = Duration::from_millis(100);
    })
    .await;
    let admin = b.tenant("acme").await;
    for i in 0..20 {
        b.api.post("/v1/runners", &admin, json!({ "owner": "o", "name": format!("n{i}") })).await;
    }
    let kept = wait_for(Duration::from_secs(10), "retention to prune", || async {
        let (_, v) = b.api.get("/v1/audit?limit=1000", &admin).await;
        let e = events(&v);
        (e.len() <= 5).then_some(e)
    })
    .await;
    assert_eq!(kept.len(), 5);
    assert!(kept[0]["detail"].as_str().unwrap().contains("n19"), "the newest stays: {kept:?}");
}

#[tokio::test]
async fn a_thousand_anonymous_failed_enrollments_add_a_bounded_number_of_events() {
    // One event per (source, reason) per window, however many attempts: the bound below is
    // in windows, so it holds however long 1,000 enrollments take on a busy machine (a fixed
    // bound with the test config's 250 ms window failed whenever they took over ~6 s).
    let window = Duration::from_secs(1);
    // Every attempt must reach the enrollment intake to be counted there: past the QUIC
    // connection rate per source (200/s), a proven source is refused before its handshake,
    // which only a metric counts (quic_limits.rs tests that limit). Whether 32 attempts at a
    // time from one address pass 200/s depends on how fast each one is (82 ms each without
    // the ACK-frequency extension, 22 ms with it), so this test turns that limit off.
    let b = TestBroker::start_with(|c| {
        c.audit_aggregate_every = window;
        c.quic_rate_per_source = 0;
    })
    .await;
    let started = std::time::Instant::now();
    let (_, before) = b.api.get("/v1/audit?limit=1000", &b.operator_key).await;
    let before = events(&before).len();
    let dir = tempfile::tempdir().unwrap();
    let fake = format!("rt_{}_{}", "0".repeat(16), "0".repeat(64));
    let (addr, fp) = (b.handle().advertise().to_owned(), b.handle().ca_fingerprint());
    let refused = futures::stream::iter(0..1000)
        .map(|i| {
            let (addr, fp, fake) = (addr.clone(), fp.clone(), fake.clone());
            let state = runnel_runner::StateDir::new(dir.path().join(format!("s{i}")));
            async move { runnel_runner::enroll(&addr, &fp, &fake, &state).await.is_err() }
        })
        .buffer_unordered(32)
        .filter(|r| std::future::ready(*r))
        .count()
        .await;
    assert_eq!(refused, 1000);
    // All of them are accounted for, in a handful of events that carry counts.
    let after = wait_for(Duration::from_secs(10), "the refusals to be written", || async {
        let (_, v) = b.api.get("/v1/audit?limit=1000", &b.operator_key).await;
        let e = events(&v);
        let counted: u64 = e
            .iter()
            .filter_map(|e| e["detail"].as_str())
            // Past the per-source enrollment rate, or with every enrollment slot taken, the
            // refusal is "try again", counted too.
            .filter(|d| {
                ["unknown from", "enrollment rate limited from", "enrollment slots full from"]
                    .iter()
                    .any(|reason| d.contains(reason))
            })
            .filter_map(|d| d.split('×').next()?.parse::<u64>().ok())
            .sum();
        (counted == 1000).then_some(e)
    })
    .await;
    let added = after.len() - before;
    // The windows the attempts spanned (plus the partial ones at each end), times the
    // reasons a refusal can give here: unknown token, rate limited, slots full.
    let windows = (started.elapsed().as_secs_f64() / window.as_secs_f64()).ceil() as usize + 2;
    let bound = windows * 3;
    assert!(added <= bound, "{added} audit events for 1000 refusals over {windows} windows");
    assert!(added < 100, "{added} audit events for 1000 refusals");
}
