//! The QUIC endpoint under strangers: a flood of connection attempts and bad enrollments
//! leaves the runners that are already serving connected and their jobs succeeding; past
//! the incoming rate the broker makes sources prove their address (Retry); the intake cap
//! refuses what is past it and frees its slots; one source enrolling too often is told to
//! try again; one tenant opens at most its cap of native API connections. And the
//! transport settings both ends ask of each other (acknowledgement frequency) or run
//! themselves (one path MTU probe each way; an idle runner's heartbeats and no keep-alive
//! PINGs with the default settings) are in force on a real connection.
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use runnel_protocol::{
    ApiWelcome, EnrollRequest, EnrollResponse, ErrorCode, read_frame, write_frame,
};
use runnel_runner::{Runner, RunnerError, RunnerStatus, StateDir};
use runnel_tests::{Record, TestBroker, metric_value};
use serde_json::json;
use tokio::sync::Semaphore;

fn enroll_config(b: &TestBroker) -> quinn::ClientConfig {
    let pin = runnel_certs::parse_fingerprint(&b.handle().ca_fingerprint()).unwrap();
    runnel_runner::tls::enroll_config(pin).unwrap()
}

/// A `runnel-enroll/1` connection with the runner's own QUIC config, before any request.
async fn enroll_connection(b: &TestBroker) -> (quinn::Endpoint, quinn::Connection) {
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(enroll_config(b), b.handle().quic_addr(), "localhost")
        .unwrap()
        .await
        .unwrap();
    (ep, conn)
}

/// How one flood attempt ended.
enum Outcome {
    /// The handshake completed (then the stranger left, or its bad enrollment was
    /// refused: `enroll_refused` says which).
    Handshaken { enroll_refused: bool },
    /// The broker refused the connection before any TLS (CONNECTION_REFUSED).
    Refused,
    /// No answer within 10 s.
    Hung,
    /// Anything else.
    Other,
}

#[derive(Debug, Default, Clone, Copy)]
struct Outcomes {
    handshaken: usize,
    enroll_refused: usize,
    refused: usize,
    hung: usize,
    other: usize,
}

impl Outcomes {
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Handshaken { enroll_refused } => {
                self.handshaken += 1;
                self.enroll_refused += usize::from(enroll_refused);
            }
            Outcome::Refused => self.refused += 1,
            Outcome::Hung => self.hung += 1,
            Outcome::Other => self.other += 1,
        }
    }
}

/// One stranger's attempt: a handshake, then gone; or (`enroll`) an enrollment with a token
/// that does not exist, whose refusal it reads.
async fn flood_attempt(
    ep: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addr: std::net::SocketAddr,
    enroll: bool,
) -> Outcome {
    let conn = match ep.connect_with(cfg, addr, "localhost").unwrap().await {
        Ok(c) => c,
        Err(quinn::ConnectionError::ConnectionClosed(c))
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            return Outcome::Refused;
        }
        Err(_) => return Outcome::Other,
    };
    let mut enroll_refused = false;
    if enroll {
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            let req = EnrollRequest {
                version: runnel_protocol::PROTOCOL_VERSION,
                token: "rt_0123456789abcdef_notarealsecret".into(),
                csr_pem: "not a csr".into(),
            };
            write_frame(&mut send, &req).await.ok()?;
            send.finish().ok()?;
            read_frame::<EnrollResponse, _>(&mut recv).await.ok().flatten()
        };
        if let Some(EnrollResponse::Refused { code, .. }) = exchange.await {
            assert!(
                matches!(
                    code,
                    ErrorCode::Unauthenticated | ErrorCode::BadRequest | ErrorCode::Unavailable
                ),
                "{code:?}"
            );
            enroll_refused = true;
        }
    }
    conn.close(0u32.into(), b"");
    Outcome::Handshaken { enroll_refused }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_handshakes_and_bad_enrollments_leaves_serving_runners_connected() {
    // A low incoming rate so that the flood is well past it on any machine.
    let b = TestBroker::start_with(|c| c.quic_validate_above = 50).await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut runners = Vec::new();
    for i in 0..20 {
        let (id, state) = b.enrolled(&admin, "alice", &dir.path().join(i.to_string())).await;
        let rec = Record { runner: id, seen: seen.clone() };
        let h = Runner::builder(state).capacity(2).handler("record", rec).spawn().unwrap();
        h.wait_connected(Duration::from_secs(10)).await.unwrap();
        runners.push(h);
    }
    let addr = b.handle().quic_addr();
    let retries_before = metric_value(
        &b.api.raw("/metrics", &b.operator_key).await,
        r#"runnel_quic_intake_limited_total{limit="retry"}"#,
    )
    .unwrap_or(0.0);

    // The flood: 5,000 connection attempts (a handshake, then gone without a word) and
    // 1,000 enrollments with a token that does not exist, from many client sockets.
    let flood = tokio::spawn({
        let cfg = enroll_config(&b);
        async move {
            let gate = Arc::new(Semaphore::new(64));
            let endpoints: Vec<_> = (0..8)
                .map(|_| quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap())
                .collect();
            let outcomes = Arc::new(std::sync::Mutex::new(Outcomes::default()));
            let mut tasks = tokio::task::JoinSet::new();
            for n in 0..6_000usize {
                let permit = gate.clone().acquire_owned().await.unwrap();
                let (ep, cfg) = (endpoints[n % endpoints.len()].clone(), cfg.clone());
                let outcomes = outcomes.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    let attempt = flood_attempt(&ep, cfg, addr, n.is_multiple_of(6));
                    let outcome = tokio::time::timeout(Duration::from_secs(10), attempt)
                        .await
                        .unwrap_or(Outcome::Hung);
                    outcomes.lock().unwrap().add(outcome);
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
            *outcomes.lock().unwrap()
        }
    });

    // Meanwhile the tenant's jobs keep flowing through the 20 runners; every one succeeds.
    let started = Instant::now();
    let mut jobs = 0;
    while !flood.is_finished() {
        let mut batch = tokio::task::JoinSet::new();
        for n in 0..8 {
            let (api, admin) = (b.api.clone(), admin.clone());
            batch.spawn(async move {
                api.post(
                    "/v1/jobs",
                    &admin,
                    json!({ "owner": "alice", "kind": "record", "payload": format!("job {n}"), "wait": true }),
                )
                .await
            });
        }
        while let Some(r) = batch.join_next().await {
            let (s, v) = r.unwrap();
            assert_eq!((s, v["state"].as_str()), (200, Some("succeeded")), "during the flood: {v}");
            jobs += 1;
        }
        assert!(started.elapsed() < Duration::from_secs(240), "the flood did not end in 240 s");
    }
    let o = flood.await.unwrap();
    assert!(jobs >= 8, "only {jobs} jobs ran during the flood");
    // Every attempt got an answer — a handshake, a refusal, or an enrollment refusal —
    // and none hung (a few may fail otherwise on a loaded machine).
    assert!(o.hung + o.other <= 60, "{o:?}");
    // The flood came from one address: past its rate it was refused before any TLS.
    assert!(o.refused > 1000 && o.handshaken > 0 && o.enroll_refused > 0, "{o:?}");
    // No runner lost its session (a reconnect would make it session 2).
    for h in &runners {
        assert!(
            matches!(h.status(), RunnerStatus::Connected { session: 1, .. }),
            "{:?}",
            h.status()
        );
    }
    // The broker made the flood prove its addresses.
    let metrics = b.api.raw("/metrics", &b.operator_key).await;
    let retries =
        metric_value(&metrics, r#"runnel_quic_intake_limited_total{limit="retry"}"#).unwrap_or(0.0);
    assert!(retries - retries_before > 100.0, "{retries} Retry answers\n{metrics}");
    let (s, v) = b.api.get("/v1/runners", &admin).await;
    assert_eq!(s, 200);
    let connected =
        v["runners"].as_array().unwrap().iter().filter(|r| r["status"] == "online").count();
    assert_eq!(connected, 20, "{v}");
    eprintln!("flood over in {:?}: {o:?}, {jobs} jobs, {retries} Retry answers", started.elapsed());
}

#[tokio::test]
async fn the_intake_cap_refuses_what_is_past_it_and_gives_slots_back() {
    let b = TestBroker::start_with(|c| c.quic_max_handshakes = 2).await;
    let addr = b.handle().quic_addr();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let cfg = enroll_config(&b);
    // Two enrollment connections that say nothing hold both slots (up to the enrollment
    // deadline).
    let a = ep.connect_with(cfg.clone(), addr, "localhost").unwrap().await.unwrap();
    let c = ep.connect_with(cfg.clone(), addr, "localhost").unwrap().await.unwrap();
    let third = ep.connect_with(cfg.clone(), addr, "localhost").unwrap().await;
    match third {
        Err(quinn::ConnectionError::ConnectionClosed(close)) => {
            assert_eq!(close.error_code, quinn::TransportErrorCode::CONNECTION_REFUSED)
        }
        other => panic!("a third connection past the cap: {other:?}"),
    }
    // Once they are gone, their slots are free again.
    a.close(0u32.into(), b"");
    c.close(0u32.into(), b"");
    runnel_tests::wait_for(Duration::from_secs(5), "a free intake slot", || async {
        let conn = ep.connect_with(cfg.clone(), addr, "localhost").unwrap().await.ok()?;
        conn.close(0u32.into(), b"");
        Some(())
    })
    .await;
    // A runner with a real token still enrolls and connects.
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, h) = b.runner(&admin, "alice", &dir.path().join("r"), 1).await;
    drop(h);
}

#[tokio::test]
async fn a_source_that_enrolls_too_often_is_told_to_try_again() {
    let b = TestBroker::start_with(|c| c.enroll_rate_per_source = 1).await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (addr, fp) = (b.handle().advertise().to_owned(), b.handle().ca_fingerprint());
    // Burst 2: two enrollments pass, the third from the same address is turned away
    // before its token is looked at, so the token stays usable.
    for i in 0..2 {
        b.enrolled(&admin, "alice", &dir.path().join(i.to_string())).await;
    }
    let v = b.create_runner(&admin, "alice", json!({})).await;
    let token = v["token"].as_str().unwrap();
    let r = runnel_runner::enroll(&addr, &fp, token, &StateDir::new(dir.path().join("x"))).await;
    match r {
        Err(RunnerError::EnrollRefused { code: ErrorCode::Unavailable, message }) => {
            assert!(message.contains("too many enrollment attempts"), "{message}");
            assert!(message.contains("try again in"), "{message}");
        }
        other => panic!("expected a try-again refusal: {other:?}"),
    }
    // After the bucket refills (1 per second), the same token enrolls.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    runnel_runner::enroll(&addr, &fp, token, &StateDir::new(dir.path().join("y"))).await.unwrap();
    // The refusal is in the cluster's log, counted per source (no token in it).
    let audit = runnel_tests::wait_for(Duration::from_secs(5), "the refusal audited", || async {
        let (_, audit) = b.api.get("/v1/audit", &b.operator_key).await;
        audit.to_string().contains("enrollment rate limited").then_some(audit)
    })
    .await;
    assert!(!audit.to_string().contains(token));
}

/// The broker and the runner's QUIC config each ask the other to acknowledge less eagerly
/// (the ACK-frequency extension; `runnel_protocol::transport`). Without the broker's side,
/// the runner never receives an ACK_FREQUENCY frame; without the runner's, never sends one.
#[tokio::test]
async fn broker_and_runner_ask_each_other_for_fewer_acknowledgements() {
    let b = TestBroker::start().await;
    let (_ep, conn) = enroll_connection(&b).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    let frames = loop {
        let frames = conn.stats().frame_tx.ack_frequency.min(conn.stats().frame_rx.ack_frequency);
        if frames > 0 || Instant::now() > deadline {
            break conn.stats();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(frames.frame_rx.ack_frequency >= 1, "the broker did not ask: {:?}", frames.frame_rx);
    assert!(frames.frame_tx.ack_frequency >= 1, "the runner did not ask: {:?}", frames.frame_tx);
}

/// The broker and the runner each look for a larger path MTU with one probe
/// (`runnel_protocol::transport::mtu_discovery`): quinn's default search sent four padded
/// probes each way, which cost the broker ~20% of a handshake's CPU. On loopback the one
/// probe, at 1,452 bytes, succeeds. Without the runner's setting it acknowledges four
/// probes of its own; without the broker's it receives four PINGs (a probe is a PING with
/// padding; one more is allowed for a loss probe on a busy machine).
#[tokio::test]
async fn broker_and_runner_each_probe_the_path_mtu_once() {
    use runnel_protocol::transport::MTU_PROBE_SIZE;
    let b = TestBroker::start().await;
    let (_ep, conn) = enroll_connection(&b).await;
    runnel_tests::wait_for(Duration::from_secs(5), "both probes", || {
        let s = conn.stats();
        async move { (s.path.current_mtu == MTU_PROBE_SIZE && s.frame_rx.ping >= 1).then_some(()) }
    })
    .await;
    // A search that went on would send its next probe as soon as the last was acknowledged.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = conn.stats();
    let ours = s.path.sent_plpmtud_probes - s.path.lost_plpmtud_probes;
    assert_eq!(ours, 1, "the runner's acknowledged probes: {:?}", s.path);
    assert!(s.frame_rx.ping <= 2, "the broker's probes (PINGs): {}", s.frame_rx.ping);
    let stats = runnel_protocol::transport::Stats::from(&s);
    assert_eq!((stats.path_mtu, stats.mtu_probes), (MTU_PROBE_SIZE, 1));
}

#[tokio::test]
async fn an_idle_runner_with_the_default_settings_sends_its_heartbeats_and_no_keep_alives() {
    use runnel_protocol::transport::DEFAULT_HEARTBEAT_INTERVAL;
    let b = TestBroker::start_with(|c| {
        c.heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL;
        c.idle_timeout = Duration::from_secs(15);
    })
    .await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    // The runner's default keep-alive (the test helper sets none).
    let (_, h) = b.runner(&admin, "alice", &dir.path().join("r"), 1).await;
    // Past the handshake's path MTU probe (a PING too).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = h.stats().unwrap();
    // Two heartbeat periods and then some.
    tokio::time::sleep(DEFAULT_HEARTBEAT_INTERVAL * 2 + Duration::from_secs(1)).await;
    let after = h.stats().unwrap();
    assert!(matches!(h.status(), RunnerStatus::Connected { .. }), "{:?}", h.status());
    // A keep-alive shorter than the heartbeat interval sent a PING between every two
    // heartbeats, and the broker acknowledged each.
    assert_eq!(after.pings_sent - before.pings_sent, 0, "keep-alive PINGs");
    // Two or three heartbeats out, their acknowledgements in; nothing else.
    let sent = after.datagrams_sent - before.datagrams_sent;
    let received = after.datagrams_received - before.datagrams_received;
    assert!((2..=3).contains(&sent), "datagrams sent: {sent}");
    assert!(received <= 3, "datagrams received: {received}");
}

/// A native API client's hello with `key`.
async fn native(b: &TestBroker, key: &str) -> (quinn::Endpoint, quinn::Connection, ApiWelcome) {
    runnel_tests::native_hello(b, key, runnel_protocol::PROTOCOL_VERSION, None).await
}

#[tokio::test]
async fn a_tenant_opens_at_most_its_share_of_native_connections_and_another_tenant_still_gets_in() {
    let b = TestBroker::start_with(|c| c.native_max_connections_per_tenant = 2).await;
    let acme = b.tenant("acme").await;
    let other = b.tenant("other").await;
    let (_e1, first, w1) = native(&b, &acme).await;
    let (_e2, _second, w2) = native(&b, &acme).await;
    assert!(matches!(w1, ApiWelcome::Welcome { .. }) && matches!(w2, ApiWelcome::Welcome { .. }));
    // The third of acme's: refused, saying why; another tenant's key is not held back.
    let (_e3, _third, refused) = native(&b, &acme).await;
    match refused {
        ApiWelcome::Refused { status: 429, code, .. } => assert_eq!(code, "too_many_connections"),
        other => panic!("{other:?}"),
    }
    let (_e4, _theirs, welcome) = native(&b, &other).await;
    assert!(matches!(welcome, ApiWelcome::Welcome { .. }), "{welcome:?}");
    // One of acme's closes: its place is free again.
    first.close(0u32.into(), b"done");
    runnel_tests::wait_for(Duration::from_secs(10), "a freed connection slot", || async {
        let (_e, conn, welcome) = native(&b, &acme).await;
        matches!(welcome, ApiWelcome::Welcome { .. }).then_some((_e, conn))
    })
    .await;
}
