//! `runnel-client` against a real broker: dispatch and follow, the reads, isolation
//! between tenants, bad credentials, the in-flight bound, and a broker restart under it.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use runnel_client::{Client, Error, JobState, Options, exec};
use runnel_runner::Runner;
use runnel_tests::TestBroker;
use serde_json::json;

async fn client(b: &TestBroker, key: &str) -> Client {
    let h = b.handle();
    Client::connect(h.advertise(), &h.ca_fingerprint(), key).await.unwrap()
}

fn refused(r: Result<impl std::fmt::Debug, Error>) -> u16 {
    match r {
        Err(e) => e.status().unwrap_or_else(|| panic!("not a refusal: {e}")),
        Ok(v) => panic!("expected a refusal, got {v:?}"),
    }
}

#[tokio::test]
async fn dispatch_follows_output_live_and_a_key_sees_only_its_own_tenant() {
    let b = TestBroker::start().await;
    let acme = b.tenant("acme").await;
    let other = b.tenant("other").await;
    let dir = tempfile::tempdir().unwrap();
    let (acme_runner, _r1) = b.runner(&acme, "alice", &dir.path().join("a"), 4).await;
    // The other tenant has an owner of the same name, with a runner of its own.
    let (other_runner, _r2) = b.runner(&other, "alice", &dir.path().join("o"), 4).await;
    let c = client(&b, &acme).await;
    assert_eq!((c.tenant(), c.role()), (Some("acme"), "admin"));

    // The output arrives while the job still runs, then the result.
    let script = "echo one; sleep 1; echo two";
    let mut job = c.dispatch(exec("alice", "sh", &["-c", script])).await.unwrap();
    let id = job.id().to_owned();
    assert_eq!(job.job().owner, "alice");
    assert_eq!(job.output().await.unwrap().as_deref(), Some(&b"one\n"[..]));
    assert_eq!(c.get(&id).await.unwrap().state, JobState::Running);
    let ended = job.result().await.unwrap();
    assert_eq!((ended.state, ended.exit_code), (JobState::Succeeded, Some(0)), "{ended:?}");
    assert_eq!(ended.output, "two\n", "the output not yet taken");
    assert_eq!(ended.runner_id.as_deref(), Some(acme_runner.as_str()));
    // The reads answer the whole output.
    for got in [c.get(&id).await, c.wait(&id).await, c.cancel(&id).await] {
        let got = got.unwrap();
        assert_eq!((got.state, got.output.as_str()), (JobState::Succeeded, "one\ntwo\n"));
    }
    // Submit with wait: one answer, the ended job with its output; many at once on one
    // connection, every one on acme's runner, none on the other tenant's alice.
    let all = futures::future::join_all((0..48).map(|i| {
        let c = c.clone();
        async move {
            let mut spec = exec("alice", "echo", &[&format!("n{i}")]);
            spec.wait = true;
            c.submit(spec).await
        }
    }))
    .await;
    for (i, j) in all.into_iter().enumerate() {
        let j = j.unwrap();
        assert_eq!((j.state, j.output.as_str()), (JobState::Succeeded, &*format!("n{i}\n")));
        assert_eq!(j.runner_id.as_deref(), Some(acme_runner.as_str()));
    }

    // The other tenant's key: acme's job does not exist for it, whatever the call.
    let theirs = client(&b, &other).await;
    assert_eq!(refused(theirs.get(&id).await), 404);
    assert_eq!(refused(theirs.wait(&id).await), 404);
    assert_eq!(refused(theirs.cancel(&id).await), 404);
    // Aimed at acme's runner by id, it is refused; its own alice takes its jobs.
    let mut aimed = exec("alice", "echo", &["x"]);
    aimed.runner_id = Some(acme_runner.clone());
    aimed.wait = true;
    assert_eq!(refused(theirs.submit(aimed).await), 404);
    let mut own = exec("alice", "echo", &["mine"]);
    own.wait = true;
    let j = theirs.submit(own).await.unwrap();
    assert_eq!(j.runner_id.as_deref(), Some(other_runner.as_str()));
    assert_eq!(refused(c.get(&j.id).await), 404, "nor can acme see the other tenant's job");
}

#[tokio::test]
async fn bad_credentials_fail_clearly_and_a_revoked_key_stops_at_its_next_call() {
    let b = TestBroker::start().await;
    let acme = b.tenant("acme").await;
    let h = b.handle();
    let (addr, fp) = (h.advertise().to_owned(), h.ca_fingerprint());
    // Another CA's fingerprint: the handshake fails, no key is sent.
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let e = Client::connect(&addr, &wrong, &acme).await.unwrap_err();
    assert!(matches!(e, Error::Connect(_)), "{e}");
    assert!(matches!(Client::connect(&addr, "sha256:zz", &acme).await, Err(Error::Fingerprint(_))));
    assert!(matches!(Client::connect("no-port", &fp, &acme).await, Err(Error::Address { .. })));
    assert!(matches!(Client::connect(" , ", &fp, &acme).await, Err(Error::Address { .. })));
    // Several addresses (a cluster's nodes): one that does not answer is passed over.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let both = format!("{},{addr}", dead.local_addr().unwrap());
    let options = Options { connect_timeout: Duration::from_millis(500), ..Options::default() };
    let c = Client::connect_with(&both, &fp, &acme, options.clone()).await.unwrap();
    assert_eq!(refused(c.get("j-nothing").await), 404, "it reached the broker");
    let only_dead = dead.local_addr().unwrap().to_string();
    let e = Client::connect_with(&only_dead, &fp, &acme, options).await.unwrap_err();
    assert!(matches!(e, Error::Connect(_)), "{e}");
    // Wrong and malformed keys: 401 at the hello.
    for key in ["rk_nope_nope", "not a key", ""] {
        assert_eq!(refused(Client::connect(&addr, &fp, key).await), 401, "{key:?}");
    }
    // A member key dispatches to its own owner only.
    let member = b.key("acme", json!({ "role": "member", "owner": "alice" })).await;
    let m = client(&b, &member).await;
    assert_eq!(refused(m.submit(exec("bob", "echo", &["x"])).await), 403);
    let mut bad = exec("", "echo", &["x"]);
    bad.kind = "no/slash".into();
    assert_eq!(refused(m.submit(bad).await), 400);
    assert_eq!(refused(m.get("j-nothing").await), 404);
    // Revoked while its connection is open: the next call is refused.
    b.revoke_key_of_role(&acme, "acme", "member").await;
    assert_eq!(refused(m.get("j-nothing").await), 401);
    assert_eq!(refused(Client::connect(&addr, &fp, &member).await), 401);
}

#[tokio::test]
async fn calls_beyond_max_in_flight_wait_for_a_turn() {
    let b = TestBroker::start().await;
    let acme = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, _runner) = b.runner(&acme, "alice", &dir.path().join("a"), 4).await;
    let h = b.handle();
    let options = Options { max_in_flight: 2, ..Options::default() };
    let c = Client::connect_with(h.advertise(), &h.ca_fingerprint(), &acme, options).await.unwrap();
    assert_eq!(c.available_calls(), 2);
    let first = c.dispatch(exec("alice", "sleep", &["30"])).await.unwrap();
    let second = c.dispatch(exec("alice", "sleep", &["30"])).await.unwrap();
    assert_eq!(c.available_calls(), 0);
    // A third call waits (the runner could take it: capacity 4) until a turn is free.
    let waited = tokio::time::timeout(Duration::from_millis(500), c.get(first.id())).await;
    assert!(waited.is_err(), "a third call ran with two turns taken: {waited:?}");
    let id = first.id().to_owned();
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), c.cancel(&id)).await.unwrap().unwrap();
    let got = c.wait(&id).await.unwrap();
    assert_eq!(got.state, JobState::Cancelled, "{got:?}");
    // Dropping the handle stopped the following, not the job: cancel did. The other runs.
    assert_eq!(c.get(second.id()).await.unwrap().state, JobState::Running);
    let ended = {
        let id = second.id().to_owned();
        c.cancel(&id).await.unwrap();
        second.result().await.unwrap()
    };
    assert_eq!(ended.state, JobState::Cancelled);
    assert_eq!(c.available_calls(), 2);
}

/// Calls made at about the same time by different tasks leave together: they go on the
/// connection's lane (`lane.rs`), whose one writing task lets the tasks already woken post
/// theirs before it writes (`runnel_protocol::gather`), so quinn packs them into shared
/// datagrams. 640 calls take about 22 datagrams; without the gathering, 641. (Before the
/// lane, each call had a stream of its own, written through the same gathering in
/// `Outbox`; followed dispatches still are.) One worker thread: tokio runs the task a
/// wake-up names next on it, as on a busy runtime (with an idle second worker, quinn's
/// driver runs beside the writer and sends as it writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn calls_made_together_share_datagrams() {
    let b = TestBroker::start().await;
    let acme = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, _runner) = b.runner(&acme, "alice", &dir.path().join("a"), 4).await;
    let c = client(&b, &acme).await;
    let mut spec = exec("alice", "echo", &["hi"]);
    spec.wait = true;
    let done = c.submit(spec).await.unwrap();
    const CALLERS: usize = 64;
    const ROUNDS: usize = 10;
    let before = c.stats();
    for round in 0..ROUNDS {
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(CALLERS));
        // Half the callers read a job (an answer that ends with `End`), half one that is
        // not there (a refusal): both kinds of answer end their streams.
        let callers: Vec<_> = (0..CALLERS)
            .map(|i| {
                let (c, start) = (c.clone(), start.clone());
                let id = if i % 2 == 0 { done.id.clone() } else { format!("j-none-{round}-{i}") };
                tokio::spawn(async move {
                    start.wait().await;
                    c.get(&id).await
                })
            })
            .collect();
        for (i, caller) in callers.into_iter().enumerate() {
            match caller.await.unwrap() {
                Ok(job) if i % 2 == 0 => assert_eq!(job.output, "hi\n"),
                got => assert_eq!(refused(got), 404),
            }
        }
    }
    let sent = c.stats().datagrams_sent - before.datagrams_sent;
    let calls = (CALLERS * ROUNDS) as u64;
    assert!(sent * 4 <= calls, "{calls} calls took {sent} datagrams");
}

#[tokio::test]
async fn the_client_dials_again_after_the_broker_restarts() {
    let mut b = TestBroker::start().await;
    let acme = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, state) = b.enrolled(&acme, "alice", &dir.path().join("a")).await;
    let runner = Runner::builder(state).capacity(2).spawn().unwrap();
    runner.wait_connected(Duration::from_secs(10)).await.unwrap();
    let c = client(&b, &acme).await;
    let following = c.dispatch(exec("alice", "sleep", &["30"])).await.unwrap();

    b.restart().await;
    // The call under way when the connection went: lost, said so.
    let lost = tokio::time::timeout(Duration::from_secs(10), following.result()).await.unwrap();
    assert!(matches!(lost, Err(Error::Lost(_))), "{lost:?}");
    // The next call dials again, on the same client.
    runner.wait_connected(Duration::from_secs(20)).await.unwrap();
    let mut spec = exec("alice", "echo", &["back"]);
    spec.wait = true;
    let j = runnel_tests::wait_for(Duration::from_secs(20), "a dispatch after the restart", || {
        let (c, spec) = (c.clone(), spec.clone());
        async move { c.submit(spec).await.ok() }
    })
    .await;
    assert_eq!((j.state, j.output.as_str()), (JobState::Succeeded, "back\n"));
}

/// The client looks for a larger path MTU with one probe, as the broker and the runner do
/// (`runnel_protocol::transport::mtu_discovery`; quinn's default took four): on loopback
/// the one probe, at the full 1,452 bytes, succeeds.
#[tokio::test]
async fn the_client_probes_the_path_mtu_once() {
    use runnel_protocol::transport::MTU_PROBE_SIZE;
    let b = TestBroker::start().await;
    let acme = b.tenant("acme").await;
    let c = client(&b, &acme).await;
    runnel_tests::wait_for(Duration::from_secs(5), "the probe", || {
        let mtu = c.stats().path_mtu;
        async move { (mtu == MTU_PROBE_SIZE).then_some(()) }
    })
    .await;
    // A search that went on would send its next probe as soon as the last was acknowledged.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.stats().mtu_probes, 1);
}
