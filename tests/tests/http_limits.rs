//! The HTTP API under a slow or greedy client: half-sent requests and idle keep-alive
//! connections are closed after the header timeout, the API keeps answering while 500 of
//! them are open, the connection caps hold (all sources, one source), and the rate limits
//! answer 429 with `Retry-After`.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use runnel_tests::TestBroker;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Waits until the server closes `s` (EOF or reset); answers how long that took, or None
/// if it stayed open past `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let wait = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue, // a 408 or the like before the close
            }
        }
    };
    tokio::time::timeout(limit, wait).await.ok().map(|_| started.elapsed())
}

/// A connection to `addr` from the loopback address `127.0.0.<n>`.
async fn from(n: u8, addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, n], 0).into()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// A connection from `127.0.0.<n>` that sent half a request: its headers never end.
async fn half_sent(n: u8, addr: std::net::SocketAddr) -> TcpStream {
    let mut s = from(n, addr).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    s
}

/// `n` half-sent connections from `127.0.0.<source>` (the cap being tested), then one more
/// from there, which must be closed at once; answers the `n` held.
async fn full_then_refused(source: u8, n: usize, addr: std::net::SocketAddr) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(half_sent(source, addr).await);
    }
    // Let the accept loop take them all.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut extra = from(source, addr).await;
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        closed_within(&mut extra, Duration::from_secs(2)).await.is_some(),
        "connection {} from 127.0.0.{source} must be closed at once",
        n + 1
    );
    held
}

#[tokio::test]
async fn half_sent_requests_are_closed_after_the_header_timeout_and_the_api_keeps_answering() {
    let b = TestBroker::start_with(|c| c.http_header_timeout = Duration::from_secs(2)).await;
    let addr = b.handle().http_addr();
    let mut slow = Vec::new();
    // From five source addresses (one may open 256): the clients of a slowloris.
    for n in 0..500 {
        slow.push(half_sent(10 + (n % 5) as u8, addr).await);
    }
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // With all of them open, the API answers.
    let t = Instant::now();
    let (s, v) = b.api.get("/healthz", "").await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    assert!(t.elapsed() < Duration::from_secs(2), "healthz took {:?}", t.elapsed());
    // Every half-sent request, and a connection that sent nothing, is closed within the
    // timeout (plus scheduling slack on a loaded 2-core machine).
    for s in slow.iter_mut().chain(std::iter::once(&mut silent)) {
        let took = closed_within(s, Duration::from_secs(8)).await;
        assert!(took.is_some(), "a half-sent request was still open after 8 s");
    }
    // A new client: the first one's pooled connection was idle past the timeout and closed.
    let (s, _) = runnel_tests::Api::new(b.api.base().to_owned()).get("/healthz", "").await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let b = TestBroker::start_with(|c| c.http_header_timeout = Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(b.handle().http_addr()).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Keep-alive: the connection stays for the next request, but not forever.
    let took = closed_within(&mut s, Duration::from_secs(6)).await;
    assert!(took.is_some_and(|t| t >= Duration::from_millis(500)), "closed after {took:?}");
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once_and_a_freed_slot_serves_again() {
    let b = TestBroker::start_with(|c| c.http_max_connections = 4).await;
    let addr = b.handle().http_addr();
    let held = full_then_refused(1, 4, addr).await;
    drop(held);
    runnel_tests::wait_for(Duration::from_secs(5), "a slot to free", || async {
        let (s, _) = b.api.try_call(runnel_tests::Method::GET, "/healthz", "", None).await?;
        (s == 200).then_some(())
    })
    .await;
    let metrics = b.api.raw("/metrics", &b.operator_key).await;
    assert!(metrics.contains("runnel_http_connections_refused_total"), "{metrics}");
}

#[tokio::test]
async fn one_source_holds_at_most_its_share_of_connections_and_another_source_still_gets_in() {
    let b = TestBroker::start_with(|c| c.http_max_connections_per_source = 3).await;
    let addr = b.handle().http_addr();
    // 127.0.0.3 holds three; its fourth is closed at once, though the broker has room for
    // thousands.
    let mut held = full_then_refused(3, 3, addr).await;
    // Another source is served meanwhile.
    let mut other = from(2, addr).await;
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), other.read_to_end(&mut answer))
        .await
        .expect("another source answered")
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    // A closed connection gives the source its place back.
    drop(held.pop());
    runnel_tests::wait_for(Duration::from_secs(5), "a place to free", || async {
        let mut s = from(3, addr).await;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.ok()?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.ok()?;
        answer.starts_with(b"HTTP/1.1 200").then_some(())
    })
    .await;
    let metrics = b.api.raw("/metrics", &b.operator_key).await;
    let refused = runnel_tests::metric_value(
        &metrics,
        "runnel_http_connections_refused_total{limit=\"source\"}",
    );
    assert!(refused >= Some(1.0), "{metrics}");
}

#[tokio::test]
async fn the_per_key_and_per_source_limits_answer_429_with_retry_after() {
    let b = TestBroker::start_with(|c| {
        c.rate_limit_per_key = 5;
        c.rate_limit_per_source = 40;
    })
    .await;
    let admin = b.tenant("acme").await;
    let other = b.key("acme", json!({ "role": "admin" })).await;
    let client = reqwest::Client::new();
    let get = |key: &str| {
        client.get(format!("{}/v1/runners", b.api.base())).bearer_auth(key.to_owned()).send()
    };
    // The burst is twice the rate; well past it one key is refused...
    let mut refused = None;
    for _ in 0..20 {
        let r = get(&admin).await.unwrap();
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("the per-key limit never answered 429");
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    // ...while another key of the same tenant still passes.
    assert_eq!(get(&other).await.unwrap().status(), 200);
    // A stranger with no valid key spends only the source's budget, not the key's; past
    // it, everything from this address is refused, even /healthz.
    let mut source_refused = false;
    for _ in 0..200 {
        let r = client.get(format!("{}/healthz", b.api.base())).send().await.unwrap();
        if r.status() == 429 {
            assert!(r.headers().contains_key("retry-after"));
            source_refused = true;
            break;
        }
    }
    assert!(source_refused, "the per-source limit never answered 429");
    // The buckets refill.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(get(&admin).await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_request_body_that_stops_arriving_is_answered_after_the_body_timeout() {
    let b = TestBroker::start_with(|c| c.http_body_timeout = Duration::from_secs(1)).await;
    let admin = b.tenant("acme").await;
    let mut s = TcpStream::connect(b.handle().http_addr()).await.unwrap();
    // 100 bytes promised, 9 sent.
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"owner\""
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut answer)).await;
    let took = started.elapsed();
    assert!(read.is_ok(), "still waiting for the body after 8 s");
    assert!(took >= Duration::from_millis(800), "gave up on the body after {took:?}");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 4"), "{answer}");
    // Nothing was dispatched from the half body.
    let (_, jobs) = b.api.get("/v1/jobs", &admin).await;
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(0), "{jobs}");
}
