//! Per-tenant job budgets on a real broker with real runners: one tenant's flood does not
//! evict another's results, retained output stays within the tenant's byte budget (oldest
//! first), a list page costs its page, a runner that grants no stream credit cannot keep
//! a job running or make cancel hang, and a client (native or HTTP) that does not read
//! its answers holds at most its budget of them.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use runnel_protocol::{ClientControl, Hello, write_frame};
use runnel_runner::RunnerHandle;
use runnel_tests::TestBroker;
use serde_json::{Value, json};

fn exec(program: &str, args: &[&str], extra: Value) -> Value {
    let mut v = json!({ "owner": "alice", "kind": "exec",
                        "exec": { "program": program, "args": args } });
    if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
        v.extend(extra.clone());
    }
    v
}

#[tokio::test]
async fn a_tenants_flood_leaves_another_tenants_results_and_a_list_page_costs_its_page() {
    const FLOOD: usize = 10_000;
    let b = TestBroker::start().await;
    let (a_key, b_key) = (b.tenant("a").await, b.tenant("b").await);
    let dir = tempfile::tempdir().unwrap();
    let (_, _ra) = b.runner(&a_key, "alice", &dir.path().join("a"), 1).await;
    let (_, _rb) = b.runner(&b_key, "alice", &dir.path().join("b"), 1).await;
    let (s, kept) =
        b.api.post("/v1/jobs", &b_key, exec("echo", &["mine"], json!({"wait": true}))).await;
    assert_eq!((s, kept["state"].as_str()), (200, Some("succeeded")), "{kept}");
    let kept = kept["id"].as_str().unwrap().to_owned();
    // Tenant a's one runner is busy; its flood times out in the queue and is retained.
    let (s, _) = b.api.post("/v1/jobs", &a_key, exec("sleep", &["60"], json!({}))).await;
    assert_eq!(s, 201);
    let flood = json!({ "owner": "alice", "kind": "exec", "queue_timeout_ms": 1,
                        "exec": { "program": "true" } });
    // As a client would: a 429 (rate limit, queue full) is retried after a pause.
    let (api, key) = (&b.api, a_key.as_str());
    let post = |body: Value| async move {
        loop {
            match api.post("/v1/jobs", key, body.clone()).await {
                (429, _) => tokio::time::sleep(Duration::from_millis(200)).await,
                (s, v) => return (s, v),
            }
        }
    };
    let accepted = futures::stream::iter(0..FLOOD)
        .map(|_| post(flood.clone()))
        .buffer_unordered(32)
        // 201 accepted; 200 when it had already timed out by the time of the answer.
        .filter(|(s, _)| std::future::ready(*s == 201 || *s == 200))
        .count()
        .await;
    assert_eq!(accepted, FLOOD);
    runnel_tests::wait_for(Duration::from_secs(30), "the flood to time out", || async {
        let (_, v) = b.api.get("/v1/jobs?limit=2", &a_key).await;
        (v["jobs"][0]["state"] == "timed_out").then_some(())
    })
    .await;
    // Tenant b's finished job is still there.
    let (s, v) = b.api.get(&format!("/v1/jobs/{kept}"), &b_key).await;
    assert_eq!((s, v["output"].as_str()), (200, Some("mine\n")), "{v}");
    // One job per page, no output, and a cursor that pages on to older jobs.
    let page = b.api.raw("/v1/jobs?limit=1", &a_key).await;
    assert!(page.len() < 2048, "a one-job page is small: {} bytes", page.len());
    let page: Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(page["jobs"][0]["output"], "");
    let next = page["next_before"].as_str().unwrap();
    let (_, older) = b.api.get(&format!("/v1/jobs?limit=5&before={next}"), &a_key).await;
    let older = older["jobs"].as_array().unwrap();
    assert_eq!(older.len(), 5);
    assert!(older.iter().all(|j| j["id"] != next));
    assert_eq!(b.api.get("/v1/jobs?limit=0", &a_key).await.0, 400);
    assert_eq!(b.api.get("/v1/jobs?limit=1&before=job-gone", &a_key).await.0, 400);
}

#[tokio::test]
async fn retained_output_stays_within_the_tenants_byte_budget_oldest_first() {
    const BUDGET: usize = 16 << 20;
    const JOBS: usize = 300;
    let b = TestBroker::start_with(|c| c.job_budget_bytes = BUDGET).await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, _runner) = b.runner(&admin, "alice", &dir.path().join("r"), 8).await;
    // 1 MiB of text each (answers without `wait`: a 1 MiB view per call is the test's own
    // cost, not the broker's).
    let mib =
        exec("sh", &["-c", "yes runnel | head -c 1048576"], json!({ "queue_timeout_ms": 600_000 }));
    let accepted = futures::stream::iter(0..JOBS)
        .map(|_| b.api.post("/v1/jobs", &admin, mib.clone()))
        .buffer_unordered(8)
        .filter(|(s, _)| std::future::ready(*s == 201))
        .count()
        .await;
    assert_eq!(accepted, JOBS);
    let jobs = runnel_tests::wait_for(Duration::from_secs(300), "every job to end", || async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, v) = b.api.get(&format!("/v1/jobs?limit={JOBS}"), &admin).await;
        let jobs = v["jobs"].as_array()?.clone();
        jobs.iter()
            .all(|j| !matches!(j["state"].as_str(), Some("queued" | "running")))
            .then_some(jobs)
    })
    .await;
    assert!(jobs.iter().all(|j| j["state"] == "succeeded"), "every job succeeded");
    // The tenant's output held, from its own jobs (a kept job holds its 1 MiB, an expired
    // one nothing; payloads are let go of when jobs end). The gauge is process-wide (other
    // tests' brokers share the recorder), so it is only checked to be there.
    let held = jobs.iter().filter(|j| j["output_expired"] == false).count() << 20;
    assert!(held <= BUDGET, "{held} bytes of output held, budget {BUDGET}");
    assert!(held >= BUDGET / 2, "the budget is used, not emptied: {held}");
    assert!(metric(&b.api.raw("/metrics", &b.operator_key).await, "runnel_jobs_held_bytes") > 0.0);
    // The output that went is the oldest: every expired job ended no later than every kept
    // one.
    let ended = |expired: bool| {
        jobs.iter()
            .filter(move |j| j["output_expired"] == expired)
            .map(|j| j["finished_at_ms"].as_i64().unwrap())
    };
    let (newest_expired, oldest_kept) = (ended(true).max(), ended(false).min());
    assert!(newest_expired.is_some() && oldest_kept.is_some());
    assert!(newest_expired <= oldest_kept, "the oldest output went first");
    // A kept job has all of its output; an expired one says so and has none.
    let kept = jobs.iter().find(|j| j["output_expired"] == false).unwrap();
    let (_, v) = b.api.get(&format!("/v1/jobs/{}", kept["id"].as_str().unwrap()), &admin).await;
    assert_eq!(v["output"].as_str().unwrap().len(), 1 << 20);
    let gone = jobs.iter().find(|j| j["output_expired"] == true).unwrap();
    let (_, v) = b.api.get(&format!("/v1/jobs/{}", gone["id"].as_str().unwrap()), &admin).await;
    assert_eq!((v["state"].as_str(), v["output"].as_str()), (Some("succeeded"), Some("")));
}

/// The value of an unlabelled gauge in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    runnel_tests::metric_value(text, name).unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[tokio::test]
async fn a_runner_that_grants_no_stream_cannot_keep_a_job_running_or_block_cancel() {
    a_runner_that_grants_no_stream(2).await;
}

/// The same on protocol 3, where the one stream that the runner does not grant is the job
/// lane: the connection's jobs wait for it without holding up their deadlines or cancels.
#[tokio::test]
async fn a_runner_that_grants_no_job_lane_cannot_keep_a_job_running_or_block_cancel() {
    a_runner_that_grants_no_stream(3).await;
}

async fn a_runner_that_grants_no_stream(version: u16) {
    use runnel_certs::pem;
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (runner_id, state) = b.enrolled(&admin, "alice", &dir.path().join("r")).await;
    // A runner that allows the broker no bidirectional stream: open_bi never completes.
    let ca = pem::certs_from_pem(b.ca().cert_pem()).unwrap().remove(0);
    let chain = pem::certs_from_pem(&std::fs::read_to_string(state.cert_path()).unwrap()).unwrap();
    let key = pem::private_key_from_pem(&std::fs::read_to_string(state.key_path()).unwrap());
    let cfg = runnel_runner::tls::runner_config(ca, chain, key.unwrap(), Duration::from_secs(1), 0)
        .unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep.connect_with(cfg, b.handle().quic_addr(), "localhost").unwrap().await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let hello =
        ClientControl::Hello(Hello { capacity: 2, ..hello_of(runnel_tests::hello_v(version)) });
    write_frame(&mut send, &hello).await.unwrap();
    runnel_tests::wait_runner_status(&b, &admin, &runner_id, "online").await;

    let started = Instant::now();
    let body = exec("true", &[], json!({ "timeout_ms": 1000 }));
    let (s, v) = b.api.post("/v1/jobs", &admin, body).await;
    assert_eq!(s, 201, "{v}");
    let stuck = v["id"].as_str().unwrap().to_owned();
    let (s, v) = b.api.post("/v1/jobs", &admin, exec("true", &[], json!({}))).await;
    assert_eq!(s, 201, "{v}");
    let cancelled = v["id"].as_str().unwrap().to_owned();
    runnel_tests::wait_for(Duration::from_secs(5), "both jobs to be sent", || async {
        let (_, v) = b.api.get(&format!("/v1/jobs/{cancelled}"), &admin).await;
        (v["state"] == "running").then_some(())
    })
    .await;
    let (s, _) = b.api.post(&format!("/v1/jobs/{cancelled}/cancel"), &admin, json!({})).await;
    assert_eq!(s, 202);
    let v = b.job_end(&admin, &cancelled, Duration::from_secs(3)).await;
    assert_eq!(v["state"], "cancelled", "{v}");
    // Run timeout 1 s + the broker's 5 s result grace, and slack for a loaded machine.
    let v = b.job_end(&admin, &stuck, Duration::from_secs(15)).await;
    assert_eq!(v["state"], "timed_out", "{v}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

fn hello_of(c: ClientControl) -> Hello {
    match c {
        ClientControl::Hello(h) => h,
        other => panic!("not a hello: {other:?}"),
    }
}

/// A native API connection whose client grants the broker little receive credit (16 KiB
/// per stream, 64 KiB in all), as a client that does not read its answers would.
async fn native_reading_little(b: &TestBroker, key: &str) -> (quinn::Endpoint, quinn::Connection) {
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(16_384u32.into())
        .receive_window(65_536u32.into())
        .keep_alive_interval(Some(Duration::from_millis(500)));
    let version = runnel_protocol::PROTOCOL_VERSION;
    let (endpoint, conn, welcome) =
        runnel_tests::native_hello(b, key, version, Some(transport)).await;
    assert!(matches!(welcome, runnel_protocol::ApiWelcome::Welcome { .. }), "{welcome:?}");
    (endpoint, conn)
}

/// The output bytes of one job answer read from `recv`, up to its `End`.
async fn answer_output(recv: &mut quinn::RecvStream) -> usize {
    use runnel_protocol::{PeerResponse, read_frame};
    let mut bytes = 0;
    loop {
        match read_frame::<PeerResponse, _>(recv).await.unwrap().expect("a frame") {
            PeerResponse::Output(o) => bytes += o.len(),
            PeerResponse::End => return bytes,
            PeerResponse::Job(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A read of a job whose output is 1 MiB of text, dispatched with `admin`'s key (its
/// tenant needs a runner of owner alice).
async fn one_mib_job(b: &TestBroker, admin: &str) -> runnel_protocol::ApiRequest {
    let (s, job) = b
        .api
        .post(
            "/v1/jobs",
            admin,
            exec("sh", &["-c", "yes runnel | head -c 1048576"], json!({"wait": true})),
        )
        .await;
    assert_eq!((s, job["state"].as_str()), (200, Some("succeeded")), "{job}");
    runnel_protocol::ApiRequest::GetJob { id: job["id"].as_str().unwrap().to_owned() }
}

/// `calls` reads of `get` on streams of their own, then `calls` on a lane, none read:
/// the streams' receive halves, and the lane's two halves.
async fn unread_calls(
    conn: &quinn::Connection,
    get: &runnel_protocol::ApiRequest,
    calls: u32,
) -> (Vec<quinn::RecvStream>, quinn::SendStream, quinn::RecvStream) {
    use runnel_protocol::{ApiRequest, LaneCall, encode};
    let mut streams = Vec::new();
    for _ in 0..calls {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        write_frame(&mut send, get).await.unwrap();
        send.finish().unwrap();
        streams.push(recv);
    }
    let (mut lane_send, lane_recv) = conn.open_bi().await.unwrap();
    write_frame(&mut lane_send, &ApiRequest::Lane).await.unwrap();
    let mut lane = Vec::new();
    for call in 0..calls {
        lane.extend(encode(&LaneCall { call, request: get }).unwrap());
    }
    lane_send.write_all(&lane).await.unwrap();
    (streams, lane_send, lane_recv)
}

#[tokio::test]
async fn a_native_client_that_does_not_read_holds_at_most_its_connections_answer_budget() {
    use runnel_protocol::limits::{ANSWER_BUDGET, LANE_MAX_UNWRITTEN};
    use runnel_protocol::{LaneAnswer, read_frame};
    const CALLS: u32 = 32;
    const MIB: usize = 1 << 20;
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, _runner) = b.runner(&admin, "alice", &dir.path().join("r"), 1).await;
    let get = one_mib_job(&b, &admin).await;

    // 32 reads of the 1 MiB job on streams of their own and 32 on a lane, none read.
    let (_endpoint, conn) = native_reading_little(&b, &admin).await;
    let (streams, _lane_send, mut lane_recv) = unread_calls(&conn, &get, CALLS).await;

    // What the broker holds for them settles at the connection's budget: 4 MiB for the
    // streams, 1 MiB and one answer for the lane (64 MiB if every answer were encoded).
    let most = most_held(&b, "runnel_native_answer_bytes").await;
    let bound = ANSWER_BUDGET + LANE_MAX_UNWRITTEN + MIB + 64 * 1024;
    assert!(most >= 2 * MIB, "the calls were answered up to the budget: {most}");
    assert!(most <= bound, "{most} bytes of answers held, bound {bound}");

    // Nothing was lost: read now, every call gets the whole output.
    for mut recv in streams {
        assert_eq!(answer_output(&mut recv).await, MIB);
    }
    let mut answered = std::collections::HashSet::new();
    for _ in 0..CALLS {
        let LaneAnswer { call } = read_frame(&mut lane_recv).await.unwrap().expect("an answer");
        assert_eq!(answer_output(&mut lane_recv).await, MIB, "call {call}");
        answered.insert(call);
    }
    assert_eq!(answered.len(), CALLS as usize);
    runnel_tests::wait_for(Duration::from_secs(5), "the held answers let go of", || async {
        (held(&b, "runnel_native_answer_bytes").await == 0).then_some(())
    })
    .await;
}

/// Bytes of answers the broker holds now, by its gauge `metric`.
async fn held(b: &TestBroker, metric: &str) -> usize {
    let text = b.api.raw("/metrics", &b.operator_key).await;
    runnel_tests::metric_value(&text, metric).unwrap_or(0.0) as usize
}

/// The most `metric` showed over 3 s of looking, every 50 ms.
async fn most_held(b: &TestBroker, metric: &str) -> usize {
    let mut most = 0;
    let settled = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settled {
        most = most.max(held(b, metric).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    most
}

/// An HTTP/1.1 answer read off a raw connection: its status and its JSON body (by its
/// Content-Length).
async fn read_http_answer(s: &mut tokio::net::TcpStream) -> (u16, Value) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut more = [0u8; 4096];
        let n = s.read(&mut more).await.unwrap();
        assert!(n > 0, "the connection closed before the answer's head");
        buf.extend_from_slice(&more[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let status = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    let mut body = buf.split_off(head_end);
    let have = body.len();
    body.resize(length, 0);
    s.read_exact(&mut body[have..]).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

/// A job of 1 MiB of NULs, waited for: ~6 MiB of JSON (`\u0000` each), more than the
/// kernel's socket buffers take off the broker's hands (up to 4 MiB on loopback). Its id.
async fn six_mib_answer_job(b: &TestBroker, key: &str) -> String {
    let big = exec("sh", &["-c", "head -c 1048576 /dev/zero"], json!({"wait": true}));
    let (s, job) = b.api.post("/v1/jobs", key, big).await;
    assert_eq!((s, job["state"].as_str()), (200, Some("succeeded")), "{job}");
    job["id"].as_str().unwrap().to_owned()
}

/// A raw HTTP/1.1 `GET /v1/jobs/{id}` on a connection that takes almost nothing off the
/// wire (a 4 KiB receive buffer) and reads nothing yet.
async fn get_reading_little(b: &TestBroker, key: &str, id: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(b.handle().http_addr()).await.unwrap();
    let get =
        format!("GET /v1/jobs/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n");
    s.write_all(get.as_bytes()).await.unwrap();
    s
}

#[tokio::test]
async fn an_http_client_that_does_not_read_holds_at_most_its_tenants_answer_budget() {
    const MIB: usize = 1 << 20;
    const BUDGET: usize = 8 * MIB;
    const CALLS: usize = 12;
    let b = TestBroker::start_with(|c| c.http_answer_budget_bytes = BUDGET).await;
    let (acme, other) = (b.tenant("acme").await, b.tenant("other").await);
    let dir = tempfile::tempdir().unwrap();
    let (_, _ra) = b.runner(&acme, "alice", &dir.path().join("a"), 1).await;
    let (_, _rb) = b.runner(&other, "alice", &dir.path().join("b"), 1).await;
    let ids = [six_mib_answer_job(&b, &acme).await, six_mib_answer_job(&b, &other).await];

    // acme reads its job on 12 connections that take almost nothing off the wire.
    let mut conns = Vec::new();
    for _ in 0..CALLS {
        conns.push(get_reading_little(&b, &acme, &ids[0]).await);
    }

    // What the broker holds for them settles at the tenant's budget (72 MiB if every
    // answer were made and kept).
    let most = most_held(&b, "runnel_http_answer_bytes").await;
    assert!(most >= 2 * MIB, "the reads were answered up to the budget: {most}");
    assert!(most <= BUDGET, "{most} bytes of answers held, budget {BUDGET}");

    // Another tenant's answers are not held up by acme's.
    let (s, job) = tokio::time::timeout(
        Duration::from_secs(5),
        b.api.get(&format!("/v1/jobs/{}", ids[1]), &other),
    )
    .await
    .expect("another tenant's read answered while acme's budget is full");
    assert_eq!((s, job["output"].as_str().map(str::len)), (200, Some(MIB)));

    // Nothing was lost: read now, every connection gets the whole job.
    for mut s in conns {
        let (status, job) = read_http_answer(&mut s).await;
        assert_eq!((status, job["output"].as_str().map(str::len)), (200, Some(MIB)));
    }
    runnel_tests::wait_for(Duration::from_secs(5), "the held answers let go of", || async {
        (held(&b, "runnel_http_answer_bytes").await == 0).then_some(())
    })
    .await;
}

/// A broker whose API gives up on a client after 1 s of taking nothing
/// (`--api-send-timeout`), tenant `acme` (its admin key) and one runner of alice's.
async fn send_timeout_of_a_second() -> (TestBroker, String, tempfile::TempDir, RunnerHandle) {
    let b = TestBroker::start_with(|c| c.api_send_timeout = Duration::from_secs(1)).await;
    let acme = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, runner) = b.runner(&acme, "alice", &dir.path().join("r"), 1).await;
    (b, acme, dir, runner)
}

#[tokio::test]
async fn a_client_that_stops_taking_its_answer_is_closed_after_the_send_timeout() {
    use tokio::io::AsyncReadExt;
    let (b, acme, _dir, _runner) = send_timeout_of_a_second().await;
    let id = six_mib_answer_job(&b, &acme).await;
    let mut s = get_reading_little(&b, &acme, &id).await;
    runnel_tests::wait_for(Duration::from_secs(5), "the answer held", || async {
        (held(&b, "runnel_http_answer_bytes").await > 0).then_some(())
    })
    .await;
    // The client takes nothing for 3 s; the broker gives up on it after its 1 s and lets
    // the answer go.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(held(&b, "runnel_http_answer_bytes").await, 0, "the stalled answer let go of");
    // What was sent before the cut arrives, then the connection's end (not a whole answer).
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection was not closed");
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got[..64.min(got.len())])
    );
    assert!(got.len() < 6 << 20, "the whole answer came: {}", got.len());
}

#[tokio::test]
async fn a_native_client_that_stops_taking_its_answers_has_them_reset_after_the_send_timeout() {
    let (b, admin, _dir, _runner) = send_timeout_of_a_second().await;
    let get = one_mib_job(&b, &admin).await;

    // Four reads on streams of their own and four on a lane, none taken.
    let (_endpoint, conn) = native_reading_little(&b, &admin).await;
    let (mut streams, _lane_send, lane_recv) = unread_calls(&conn, &get, 4).await;
    streams.push(lane_recv);
    runnel_tests::wait_for(Duration::from_secs(5), "the answers held", || async {
        (held(&b, "runnel_native_answer_bytes").await > 0).then_some(())
    })
    .await;

    // The broker gives up on them after its 1 s: the answers are let go of and every
    // stream, the lane too, is reset with `Timeout`.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(held(&b, "runnel_native_answer_bytes").await, 0, "the stalled answers let go of");
    let timeout = quinn::VarInt::from_u32(runnel_protocol::ErrorCode::Timeout.as_u32());
    for mut recv in streams {
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match recv.read_chunk(1 << 20, true).await {
                    Ok(Some(_)) => continue, // what was sent before the reset
                    other => return other,
                }
            }
        })
        .await
        .expect("the stream ended");
        assert!(
            matches!(ended, Err(quinn::ReadError::Reset(code)) if code == timeout),
            "{ended:?}"
        );
    }
    // The connection itself still serves.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &get).await.unwrap();
    send.finish().unwrap();
    drop(recv.read_chunk(1, true).await.expect("a new call is answered"));
}
