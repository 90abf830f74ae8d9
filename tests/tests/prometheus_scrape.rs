//! A real Prometheus scrapes a real broker over TLS (`--http-tls auto`, the cluster CA as
//! Prometheus's `ca_file`) with a metrics key as its bearer token: the dispatch counter
//! and histogram arrive with the right values, a scrape job without the token fails, and
//! `promtool check metrics` accepts the exposition.
//! (One test in this file: the metrics recorder is process-wide.)
#![allow(missing_docs, clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use runnel_tests::{TestBroker, installed, wait_for};
use serde_json::Value;

async fn query(http: &reqwest::Client, base: &str, q: &str) -> Option<f64> {
    let v: Value = http
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test]
async fn prometheus_scrapes_dispatch_counters_and_histograms() {
    if !installed("prometheus") || !installed("promtool") {
        // CI installs Debian's prometheus; a developer machine may not have it.
        assert!(
            std::env::var_os("CI").is_none(),
            "prometheus/promtool missing in CI: .ci/run must install them"
        );
        eprintln!("SKIPPED: prometheus not installed (apt-get install prometheus)");
        return;
    }
    let b = TestBroker::start_with(|c| c.http_tls = runnel_broker::HttpTls::Auto).await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, _runner) = b.runner(&admin, "alice", &dir.path().join("r"), 2).await;
    for args in [&["0"][..], &["0"], &["3"]] {
        let (s, _) = b.run(&admin, "alice", "sh", &["-c", &format!("exit {}", args[0])]).await;
        assert_eq!(s, 200);
    }
    let (s, _) = b.run(&admin, "nobody", "true", &[]).await;
    assert_eq!(s, 409);

    // promtool accepts what we expose.
    let body = b.api.raw("/metrics", &b.operator_key).await;
    for name in [
        "runnel_dispatches_total",
        "runnel_dispatch_latency_seconds_bucket",
        "runnel_handshakes_total",
        "runnel_build_info",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics:\n{body}");
    }
    let mut check = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    check.stdin.take().unwrap().write_all(body.as_bytes()).await.unwrap();
    let out = check.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus on a loopback port, scraping every second.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let pdir = tempfile::tempdir().unwrap();
    let cfg = pdir.path().join("prometheus.yml");
    let (s, key) = b
        .api
        .post("/v1/operator-keys", &b.operator_key, serde_json::json!({ "role": "metrics" }))
        .await;
    assert_eq!(s, 201, "{key}");
    std::fs::write(pdir.path().join("runnel-metrics.key"), key["key"].as_str().unwrap()).unwrap();
    std::fs::write(pdir.path().join("runnel-ca.pem"), b.ca().cert_pem()).unwrap();
    // The shape of deploy/prometheus/prometheus.yml, and the same job without the token.
    let target = b.handle().http_addr();
    let job = |name: &str, auth: &str| {
        format!(
            "  - job_name: {name}\n    scheme: https\n{auth}    tls_config:\n      ca_file: runnel-ca.pem\n    static_configs:\n      - targets: ['{target}']\n"
        )
    };
    let bearer =
        "    authorization:\n      type: Bearer\n      credentials_file: runnel-metrics.key\n";
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n{}{}",
            job("runnel", bearer),
            job("anonymous", "")
        ),
    )
    .unwrap();
    let mut prom = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.tsdb.path={}", pdir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let succeeded =
        wait_for(Duration::from_secs(60), "prometheus to scrape the broker", || async {
            query(&http, &base, r#"runnel_dispatches_total{job="runnel",outcome="succeeded"}"#)
                .await
        })
        .await;
    assert_eq!(succeeded, 2.0);
    assert_eq!(
        query(&http, &base, r#"runnel_dispatches_total{outcome="failed"}"#).await,
        Some(1.0)
    );
    assert_eq!(
        query(&http, &base, r#"runnel_dispatches_total{outcome="no_runner"}"#).await,
        Some(1.0)
    );
    assert_eq!(query(&http, &base, "runnel_dispatch_latency_seconds_count").await, Some(3.0));
    // The histogram has real buckets: all three jobs took under a minute.
    assert_eq!(
        query(&http, &base, r#"runnel_dispatch_latency_seconds_bucket{le="60"}"#).await,
        Some(3.0)
    );
    let p99 = query(
        &http,
        &base,
        "histogram_quantile(0.99, sum(runnel_dispatch_latency_seconds_bucket) by (le))",
    )
    .await;
    assert!(p99.is_some_and(|v| v > 0.0 && v < 60.0), "{p99:?}");
    assert_eq!(query(&http, &base, r#"runnel_runners_connected{tenant="acme"}"#).await, Some(1.0));
    assert_eq!(query(&http, &base, r#"runnel_handshakes_total{result="ok"}"#).await, Some(1.0));
    // The scrape with the token is up; the one without it is down (401).
    assert_eq!(query(&http, &base, r#"up{job="runnel"}"#).await, Some(1.0));
    let anonymous = wait_for(Duration::from_secs(30), "the anonymous scrape", || async {
        query(&http, &base, r#"up{job="anonymous"}"#).await
    })
    .await;
    assert_eq!(anonymous, 0.0, "a scrape without the metrics key must fail");
    prom.kill().await.unwrap();
}
