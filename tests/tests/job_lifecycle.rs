//! Cancel, run timeout, runner loss, full queue, streamed output, drain.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use runnel_tests::{TestBroker, runner_bin, spawn_runner_process, wait_for, wait_runner_status};
use serde_json::{Value, json};

async fn start_job(b: &TestBroker, key: &str, script: &str, extra: Value) -> String {
    let mut body = json!({ "owner": "alice", "kind": "exec", "exec": { "program": "sh", "args": ["-c", script] } });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (s, v) = b.api.post("/v1/jobs", key, body).await;
    assert_eq!(s, 201, "{v}");
    v["id"].as_str().unwrap().to_owned()
}

fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

async fn read_pid(path: &std::path::Path) -> i32 {
    wait_for(Duration::from_secs(10), "the job to write its pid", || async {
        std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok())
    })
    .await
}

#[tokio::test]
async fn cancel_kills_the_process_group_and_timeouts_end_as_timed_out() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, _h) = b.runner(&admin, "alice", &dir.path().join("r"), 4).await;

    // A shell that starts a child sleeper: cancel must kill both (the whole group).
    let pidfile = dir.path().join("pid");
    let script = format!("sleep 60 & echo $! > {}; echo started; wait", pidfile.display());
    let id = start_job(&b, &admin, &script, json!({})).await;
    let sleeper = read_pid(&pidfile).await;
    assert!(alive(sleeper));
    let (s, v) = b.api.post(&format!("/v1/jobs/{id}/cancel"), &admin, json!({})).await;
    assert_eq!(s, 202, "{v}");
    let v = b.job_end(&admin, &id, Duration::from_secs(10)).await;
    assert_eq!(v["state"], "cancelled", "{v}");
    assert_eq!(v["output"], "started\n");
    wait_for(Duration::from_secs(5), "the sleeper to die", || async {
        (!alive(sleeper)).then_some(())
    })
    .await;
    // Cancelling again is harmless.
    assert_eq!(
        b.api.post(&format!("/v1/jobs/{id}/cancel"), &admin, json!({})).await.1["state"],
        "cancelled"
    );

    // Run timeout.
    let t0 = Instant::now();
    let id = start_job(&b, &admin, "sleep 30", json!({ "timeout_ms": 300 })).await;
    let v = b.job_end(&admin, &id, Duration::from_secs(10)).await;
    assert_eq!(v["state"], "timed_out", "{v}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn killing_a_runner_mid_job_gives_runner_lost_within_seconds() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (id, state) = b.enrolled(&admin, "alice", &dir.path().join("r")).await;
    let mut child = spawn_runner_process(runner_bin!(), state.path(), 2);
    wait_runner_status(&b, &admin, &id, "online").await;
    let pidfile = dir.path().join("pid");
    let job =
        start_job(&b, &admin, &format!("echo $$ > {}; sleep 60", pidfile.display()), json!({}))
            .await;
    read_pid(&pidfile).await;
    let t0 = Instant::now();
    child.start_kill().unwrap(); // SIGKILL: no goodbye on the wire
    child.wait().await.unwrap();
    let v = b.job_end(&admin, &job, Duration::from_secs(15)).await;
    assert_eq!(v["state"], "runner_lost", "{v}");
    let took = t0.elapsed();
    eprintln!("SIGKILL → runner_lost in {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    wait_runner_status(&b, &admin, &id, "offline").await;
}

#[tokio::test]
async fn a_full_tenant_queue_answers_429_and_loses_nothing_it_accepted() {
    let b = TestBroker::start_with(|c| c.queue_limit = 2).await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, _h) = b.runner(&admin, "alice", &dir.path().join("r"), 1).await;
    let running = start_job(&b, &admin, "sleep 1", json!({})).await;
    let q1 = start_job(&b, &admin, "echo q1", json!({})).await;
    let q2 = start_job(&b, &admin, "echo q2", json!({})).await;
    let (s, v) = b.run(&admin, "alice", "true", &[]).await;
    assert_eq!((s, v["error"]["code"].as_str()), (429, Some("queue_full")), "{v}");
    // Every accepted job still ends.
    for (id, out) in [(running, ""), (q1, "q1\n"), (q2, "q2\n")] {
        let v = b.job_end(&admin, &id, Duration::from_secs(15)).await;
        assert_eq!(v["state"], "succeeded", "{v}");
        assert_eq!(v["output"], out);
    }
}

#[tokio::test]
async fn output_streams_live_and_draining_runners_finish_but_take_nothing_new() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (id, h) = b.runner(&admin, "alice", &dir.path().join("r"), 2).await;
    let job = start_job(&b, &admin, "echo one; sleep 1; echo two", json!({})).await;
    // The stream shows "one" before the job ends.
    let mut stream = Box::pin(b.api.as_key(&admin).output_stream(&job).await.unwrap());
    use futures::StreamExt;
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(&first[..], b"one\n");
    let (_, v) = b.api.get(&format!("/v1/jobs/{job}"), &admin).await;
    assert_eq!(v["state"], "running");
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(rest, b"two\n");

    // Drain while a job runs: it finishes; the runner takes nothing new and then leaves.
    let long = start_job(&b, &admin, "sleep 1; echo done", json!({})).await;
    wait_for(Duration::from_secs(5), "job to start", || async {
        let (_, v) = b.api.get(&format!("/v1/jobs/{long}"), &admin).await;
        (v["state"] == "running").then_some(())
    })
    .await;
    h.drain();
    wait_runner_status(&b, &admin, &id, "draining").await;
    let queued = start_job(&b, &admin, "echo never", json!({ "queue_timeout_ms": 1500 })).await;
    let v = b.job_end(&admin, &long, Duration::from_secs(10)).await;
    assert_eq!((v["state"].as_str(), v["output"].as_str()), (Some("succeeded"), Some("done\n")));
    tokio::time::timeout(Duration::from_secs(10), h.join()).await.unwrap().unwrap();
    let v = b.job_end(&admin, &queued, Duration::from_secs(10)).await;
    assert_eq!(v["state"], "timed_out", "a draining runner took a new job: {v}");
}

/// A runner that takes a job and then says nothing: a cancel it never confirms ends the
/// job `cancelled` once the cancel grace is over, and a job past its run timeout (plus the
/// result grace) ends `timed_out`; both with the broker's reason.
#[tokio::test]
async fn a_silent_runner_cannot_hold_a_job_past_its_cancel_grace_or_timeout() {
    use runnel_protocol::{BrokerJobFrame, read_frame};
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (id, state) = b.enrolled(&admin, "alice", &dir.path().join("r")).await;
    let (conn, _control) = runnel_tests::welcomed(&b, &state).await;
    let body = |timeout_ms: u64| {
        json!({ "owner": "alice", "runner_id": id, "kind": "exec",
                "exec": { "program": "true" }, "timeout_ms": timeout_ms })
    };
    // Cancel: the runner reads the Cancel and does not answer.
    let (s, v) = b.api.post("/v1/jobs", &admin, body(3_600_000)).await;
    assert_eq!(s, 201, "{v}");
    let job = v["id"].as_str().unwrap().to_owned();
    let (_jsend, mut jrecv) =
        tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await.unwrap().unwrap();
    let first = read_frame::<BrokerJobFrame, _>(&mut jrecv).await.unwrap();
    assert!(matches!(first, Some(BrokerJobFrame::Job(_))), "{first:?}");
    let t0 = std::time::Instant::now();
    b.api.post(&format!("/v1/jobs/{job}/cancel"), &admin, json!({})).await;
    let cancel = read_frame::<BrokerJobFrame, _>(&mut jrecv).await.unwrap();
    assert!(matches!(cancel, Some(BrokerJobFrame::Cancel)), "{cancel:?}");
    let v = b.job_end(&admin, &job, Duration::from_secs(20)).await;
    assert_eq!(v["state"], "cancelled", "{v}");
    assert!(v["message"].as_str().unwrap().contains("did not confirm the cancel"), "{v}");
    assert!(t0.elapsed() >= Duration::from_secs(4), "ended before the grace: {v}");
    // Timeout: 1 s to run, nothing comes back.
    let (s, v) = b.api.post("/v1/jobs", &admin, body(1000)).await;
    assert_eq!(s, 201, "{v}");
    let job = v["id"].as_str().unwrap().to_owned();
    let (_jsend, _jrecv) =
        tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await.unwrap().unwrap();
    let v = b.job_end(&admin, &job, Duration::from_secs(20)).await;
    assert_eq!(v["state"], "timed_out", "{v}");
    assert!(v["message"].as_str().unwrap().contains("no result within the run timeout"), "{v}");
}

/// After a job's Result the broker ends its half of the job stream by itself, with no
/// other job on the connection (it keeps it a few ms for one: `STREAM_END_DELAY`), so the
/// runner's stream credit comes back. Both ways a runner may leave the stream are tried:
/// reading on to the end (the broker's FIN) and stopping it (then the broker resets it).
/// And the broker reads the runner's FIN that came with the Result, so it sends no
/// `STOP_SENDING` (a frame per job, which had cost a datagram per job in a big fleet).
/// Fails, hanging until the 5 s limit, if a kept send half is never let go, and on the
/// frame count if the broker drops a finished stream unread.
#[tokio::test]
async fn the_broker_ends_a_job_stream_after_its_result_without_a_next_job() {
    use runnel_protocol::{
        BrokerJobFrame, JobOutcome, JobResult, OutputStream, RunnerJobFrame, read_frame,
        write_frame,
    };
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (id, state) = b.enrolled(&admin, "alice", &dir.path().join("r")).await;
    let (conn, _control) = runnel_tests::welcomed(&b, &state).await;
    for stop_reading in [false, true] {
        let (api, admin, id) = (b.api.clone(), admin.clone(), id.clone());
        let job = tokio::spawn(async move {
            api.post("/v1/jobs", &admin, json!({ "owner": "alice", "runner_id": id, "kind": "exec", "exec": { "program": "true" }, "wait": true })).await
        });
        let (mut jsend, mut jrecv) =
            tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await.unwrap().unwrap();
        let first = read_frame::<BrokerJobFrame, _>(&mut jrecv).await.unwrap();
        assert!(matches!(first, Some(BrokerJobFrame::Job(_))), "{first:?}");
        if stop_reading {
            jrecv.stop(0u32.into()).unwrap();
        }
        let out = RunnerJobFrame::Output { stream: OutputStream::Stdout, data: b"hi\n".to_vec() };
        write_frame(&mut jsend, &out).await.unwrap();
        let result = RunnerJobFrame::Result(JobResult {
            outcome: JobOutcome::Succeeded,
            exit_code: Some(0),
            message: String::new(),
            output_truncated: false,
        });
        write_frame(&mut jsend, &result).await.unwrap();
        jsend.finish().unwrap();
        let (s, v) = job.await.unwrap();
        assert_eq!(
            (s, v["state"].as_str(), v["output"].as_str()),
            (200, Some("succeeded"), Some("hi\n")),
            "{v}"
        );
        let limit = Duration::from_secs(5);
        if stop_reading {
            // The stopped receive half cannot be read any more: the broker's RESET_STREAM
            // shows in the connection's frame counts.
            wait_for(limit, "the broker's reset of the stopped stream", || {
                let resets = conn.stats().frame_rx.reset_stream;
                async move { (resets >= 1).then_some(()) }
            })
            .await;
        } else {
            let end = tokio::time::timeout(limit, read_frame::<BrokerJobFrame, _>(&mut jrecv))
                .await
                .expect("the broker ended its half of the stream");
            assert!(matches!(end, Ok(None)), "{end:?}");
            assert_eq!(conn.stats().frame_rx.reset_stream, 0);
        }
    }
    assert_eq!(conn.stats().frame_rx.stop_sending, 0, "the broker stopped a finished stream");
}

/// A handler whose jobs all end together: each waits until `n` of them are running.
struct Together(std::sync::Arc<tokio::sync::Barrier>);

#[async_trait::async_trait]
impl runnel_runner::JobHandler for Together {
    async fn run(&self, _job: runnel_runner::Job) -> runnel_protocol::JobResult {
        self.0.wait().await;
        runnel_runner::handler::succeeded()
    }
}

/// A broker, tenant acme's admin key, and alice's runner of `jobs` slots whose `together`
/// jobs end `jobs` at a time (the temporary directory holds its state).
async fn together_runner(
    jobs: usize,
) -> (TestBroker, String, runnel_runner::RunnerHandle, tempfile::TempDir) {
    let b = TestBroker::start().await;
    let acme = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, state) = b.enrolled(&acme, "alice", &dir.path().join("r")).await;
    let together = Together(std::sync::Arc::new(tokio::sync::Barrier::new(jobs)));
    let runner = runnel_runner::Runner::builder(state)
        .capacity(jobs as u32)
        .handler("together", together)
        .spawn()
        .unwrap();
    runner.wait_connected(Duration::from_secs(10)).await.unwrap();
    (b, acme, runner, dir)
}

/// Jobs that end together send their Results together: the runner writes each job's last
/// frame through one outbox per connection (`runnel_protocol::Outbox`), and reads the
/// broker's end of each job stream instead of dropping it unread, which made quinn send a
/// `STOP_SENDING` at once, alone, ahead of the Result. With either undone, each Result went
/// in a datagram of its own. One worker thread: tokio runs the task a wake-up names next
/// on it, as on a busy runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn results_of_jobs_that_end_together_share_datagrams() {
    const JOBS: usize = 16;
    const ROUNDS: usize = 5;
    let (b, acme, runner, _dir) = together_runner(JOBS).await;
    let h = b.handle();
    let c =
        runnel_client::Client::connect(h.advertise(), &h.ca_fingerprint(), &acme).await.unwrap();
    let before = runner.stats().unwrap();
    for _ in 0..ROUNDS {
        let all = futures::future::join_all((0..JOBS).map(|_| {
            let c = c.clone();
            async move {
                let mut spec = runnel_client::job("alice", "together", Vec::new());
                spec.wait = true;
                c.submit(spec).await
            }
        }));
        for job in all.await {
            assert_eq!(job.unwrap().state, runnel_client::JobState::Succeeded);
        }
    }
    let sent = runner.stats().unwrap().datagrams_sent - before.datagrams_sent;
    let jobs = (JOBS * ROUNDS) as u64;
    assert!(sent * 2 <= jobs, "{jobs} results took {sent} datagrams");
}

/// Jobs dispatched at about the same time through the HTTP API reach their runner
/// together: the connection's I/O task, woken by the first, lets the other ready tasks
/// (each HTTP connection's) hand theirs over before it writes, so the Job frames share
/// datagrams. It wrote each one as it came, a datagram per job.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn jobs_dispatched_together_reach_the_runner_together() {
    const JOBS: usize = 16;
    const ROUNDS: usize = 5;
    let (b, acme, runner, _dir) = together_runner(JOBS).await;
    let before = runner.stats().unwrap();
    for _ in 0..ROUNDS {
        let posts: Vec<_> = (0..JOBS)
            .map(|_| {
                let (api, key) = (b.api.clone(), acme.clone());
                tokio::spawn(async move {
                    let body = json!({ "owner": "alice", "kind": "together", "wait": true });
                    api.post("/v1/jobs", &key, body).await
                })
            })
            .collect();
        for post in posts {
            let (s, v) = post.await.unwrap();
            assert_eq!((s, v["state"].as_str()), (200, Some("succeeded")), "{v}");
        }
    }
    let received = runner.stats().unwrap().datagrams_received - before.datagrams_received;
    let jobs = (JOBS * ROUNDS) as u64;
    assert!(received * 2 <= jobs, "{jobs} jobs came in {received} datagrams");
}
