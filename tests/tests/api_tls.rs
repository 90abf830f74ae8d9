//! TLS on the API and who may read metrics: `runnelctl` works over `--http-tls auto` with
//! the CA fingerprint and refuses a wrong one; operator PEM files serve too; a public bind
//! without TLS is refused with a clear message; `/metrics` needs a metrics (or operator)
//! key, and a metrics key reads nothing else; `/readyz` tells strangers nothing about
//! tenants.
#![allow(missing_docs, clippy::unwrap_used)]

use runnel_broker::HttpTls;
use runnel_tests::TestBroker;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the real `runnelctl` with `url`, `key` and (if given) the CA fingerprint.
async fn ctl(url: &str, key: &str, fingerprint: Option<&str>, args: &[&str]) -> Out {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_ctl-under-test"));
    cmd.args(args)
        .env("RUNNEL_URL", url)
        .env("RUNNEL_KEY", key)
        .env("RUNNEL_CONFIG_DIR", "/nonexistent")
        .env_remove("RUNNEL_CA_FINGERPRINT");
    if let Some(fp) = fingerprint {
        cmd.env("RUNNEL_CA_FINGERPRINT", fp);
    }
    let o = cmd.output().await.unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

#[tokio::test]
async fn runnelctl_speaks_tls_to_http_tls_auto_and_refuses_a_wrong_fingerprint() {
    let b = TestBroker::start_with(|c| c.http_tls = HttpTls::Auto).await;
    let url = b.handle().http_url();
    assert!(url.starts_with("https://"), "{url}");
    let fp = b.handle().ca_fingerprint();
    let op = &b.operator_key;

    let ok = ctl(&url, op, Some(&fp), &["tenants", "create", "acme"]).await;
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    let listed = ctl(&url, op, Some(&fp), &["-o", "json", "tenants", "list"]).await;
    assert!(listed.stdout.contains("acme"), "{}", listed.stderr);

    // Another CA's fingerprint: the handshake fails and nothing is sent.
    let other = runnel_certs::ClusterCa::generate("runnel").unwrap().fingerprint();
    let refused = ctl(&url, op, Some(&other), &["tenants", "create", "globex"]).await;
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("does not match the pinned CA fingerprint"),
        "{}",
        refused.stderr
    );
    // No fingerprint for an https URL: told what to pass.
    let none = ctl(&url, op, None, &["tenants", "list"]).await;
    assert_ne!(none.code, 0);
    assert!(none.stderr.contains("--ca-fingerprint"), "{}", none.stderr);
    // Plain HTTP to the TLS port gets no API answer.
    let plain = ctl(&url.replace("https://", "http://"), op, None, &["tenants", "list"]).await;
    assert_ne!(plain.code, 0, "{}", plain.stdout);
    // globex was never created.
    let listed = ctl(&url, op, Some(&fp), &["-o", "json", "tenants", "list"]).await;
    assert!(!listed.stdout.contains("globex"), "{}", listed.stdout);
}

#[tokio::test]
async fn the_api_serves_the_operators_own_certificate_files() {
    // The operator's PKI: another CA, a certificate for 127.0.0.1, chain = [leaf, CA].
    let pki = runnel_certs::ClusterCa::generate("ops").unwrap();
    let (leaf, key) =
        pki.issue_server_cert(&["localhost".into()], &[[127, 0, 0, 1].into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("api.pem"), dir.path().join("api.key"));
    std::fs::write(&cert_path, format!("{}{}", leaf.cert_pem, pki.cert_pem())).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let files = HttpTls::Files { cert: cert_path.clone(), key: key_path };
    let b = TestBroker::start_with(|c| c.http_tls = files.clone()).await;
    let url = b.handle().http_url();
    let ok = ctl(&url, &b.operator_key, Some(&pki.fingerprint()), &["tenants", "list"]).await;
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    // The cluster CA is not what this API presents.
    let wrong =
        ctl(&url, &b.operator_key, Some(&b.handle().ca_fingerprint()), &["tenants", "list"]).await;
    assert_ne!(wrong.code, 0);

    // A key file that is not there: the broker does not start, and says which file.
    let mut config = runnel_broker::Config::loopback(&dir.path().join("data2"));
    config.http_tls = HttpTls::Files { cert: cert_path, key: dir.path().join("missing.key") };
    let err = runnel_broker::Broker::spawn(config).await.expect_err("no key file").to_string();
    assert!(err.contains("--http-tls-key") && err.contains("missing.key"), "{err}");
}

/// A worker-thread count tokio cannot use is a configuration error with a clear message
/// (tokio itself would panic on it), and a good one starts the broker.
#[tokio::test]
async fn a_bad_worker_thread_count_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["0", "two", "-1", " 2", ""] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_broker-under-test"))
            .args(["serve", "--http-listen", "127.0.0.1:0", "--quic-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("d"))
            .env("TOKIO_WORKER_THREADS", bad)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{bad:?}: {stderr}");
        assert!(
            stderr.contains("TOKIO_WORKER_THREADS must be a positive whole number"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let mut ok = tokio::process::Command::new(env!("CARGO_BIN_EXE_broker-under-test"))
        .args(["serve", "--http-listen", "127.0.0.1:0", "--quic-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .env("TOKIO_WORKER_THREADS", "1")
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Still running after a moment: it started (a refusal exits at once).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(ok.try_wait().unwrap().is_none(), "the broker exited with one worker thread");
    ok.kill().await.unwrap();
}

#[tokio::test]
async fn a_public_bind_without_tls_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &'static [&'static str]| {
        let data = dir.path().join(format!("d{}", extra.len()));
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_broker-under-test"))
                .args(["serve", "--http-listen", "0.0.0.0:0", "--quic-listen", "127.0.0.1:0"])
                .args(extra)
                .arg("--data-dir")
                .arg(data)
                .env("RUST_LOG", "warn")
                .kill_on_drop(true)
                .output()
                .await
                .unwrap()
        }
    };
    let refused = run(&[]).await;
    assert_eq!(refused.status.code(), Some(64), "exit status for a bad configuration");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("0.0.0.0:0 is not a loopback address and the API has no TLS")
            && stderr.contains("--http-tls auto")
            && stderr.contains("--http-insecure"),
        "{stderr}"
    );
    // Contradictory TLS flags are refused the same way.
    let both = run(&["--http-tls", "auto", "--http-tls-cert", "/x"]).await;
    assert_eq!(both.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&both.stderr).contains("go together"));
}

#[tokio::test]
async fn metrics_need_a_metrics_key_and_a_metrics_key_reads_nothing_else() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let (s, v) = b
        .api
        .post("/v1/operator-keys", &b.operator_key, serde_json::json!({ "role": "metrics" }))
        .await;
    assert_eq!(s, 201, "{v}");
    let scrape = v["key"].as_str().unwrap().to_owned();

    let status = |key: &str, path: &'static str| {
        let api = b.api.clone();
        let key = key.to_owned();
        async move { api.get(path, &key).await.0 }
    };
    // Anonymous and tenant keys cannot read the cluster's series (they name tenants).
    assert_eq!(status("", "/metrics").await, 401);
    assert_eq!(status(&admin, "/metrics").await, 403);
    assert!(b.api.raw("/metrics", &scrape).await.contains("runnel_build_info"));
    assert!(b.api.raw("/metrics", &b.operator_key).await.contains("runnel_build_info"));
    // The scrape key opens nothing else.
    for path in
        ["/v1/tenants", "/v1/operator-keys", "/v1/jobs", "/v1/runners", "/v1/audit", "/v1/cluster"]
    {
        assert_eq!(status(&scrape, path).await, 403, "{path}");
    }
    // It cannot be made per tenant, and an admin cannot mint one.
    let (s, _) = b
        .api
        .post("/v1/tenants/acme/keys", &b.operator_key, serde_json::json!({ "role": "metrics" }))
        .await;
    assert_eq!(s, 400);
    let (s, _) =
        b.api.post("/v1/operator-keys", &admin, serde_json::json!({ "role": "metrics" })).await;
    assert_eq!(s, 403);
    // Readiness answers anyone, and says nothing about tenants or runners.
    let (s, ready) = b.api.get("/readyz", "").await;
    assert_eq!((s, ready.as_object().map(|o| o.len())), (200, Some(1)), "{ready}");
}

/// Records the length of each TLS secret a handshake derives: 32 bytes for a SHA-256 suite
/// (AES-128-GCM or ChaCha20), 48 for AES-256-GCM-SHA384.
#[derive(Debug, Default)]
struct SecretLengths(std::sync::Mutex<Vec<usize>>);

impl rustls::KeyLog for SecretLengths {
    fn log(&self, _label: &str, _client_random: &[u8], secret: &[u8]) {
        self.0.lock().unwrap().push(secret.len());
    }
}

/// A client on rustls's default provider (AES-256-GCM-SHA384 first), trusting `ca`,
/// logging its secrets' lengths into `lengths`.
fn aes_256_first_client(
    ca: &str,
    alpn: &[u8],
    lengths: &std::sync::Arc<SecretLengths>,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(runnel_certs::pem::certs_from_pem(ca).unwrap().remove(0)).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.key_log = lengths.clone();
    tls
}

#[tokio::test]
async fn both_endpoints_pick_a_sha256_suite_for_a_client_that_prefers_aes_256() {
    let b = TestBroker::start_with(|c| c.http_tls = HttpTls::Auto).await;
    let ca = b.ca().cert_pem().to_owned();

    // The QUIC endpoint (the native API's ALPN; runners' and peers' configs are built the
    // same way).
    let quic = std::sync::Arc::new(SecretLengths::default());
    let tls = aes_256_first_client(&ca, runnel_protocol::ALPN_API, &quic);
    let cfg = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep.connect_with(cfg, b.handle().quic_addr(), "localhost").unwrap().await.unwrap();
    conn.close(0u32.into(), b"done");

    // The HTTPS API (`--http-tls auto`).
    let https = std::sync::Arc::new(SecretLengths::default());
    let tls = aes_256_first_client(&ca, b"http/1.1", &https);
    let addr = b.handle().http_url().trim_start_matches("https://").to_owned();
    let host = addr.rsplit_once(':').unwrap().0.to_owned();
    tokio::task::spawn_blocking(move || {
        let name = rustls_pki_types::ServerName::try_from(host).unwrap();
        let mut client = rustls::ClientConnection::new(std::sync::Arc::new(tls), name).unwrap();
        let mut sock = std::net::TcpStream::connect(&addr).unwrap();
        while client.is_handshaking() {
            client.complete_io(&mut sock).unwrap();
        }
        let suite = client.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    })
    .await
    .unwrap();

    for (endpoint, lengths) in [("QUIC", quic), ("HTTPS", https)] {
        let lengths = lengths.0.lock().unwrap().clone();
        assert!(!lengths.is_empty(), "{endpoint}: no secrets logged");
        assert!(lengths.iter().all(|&n| n == 32), "{endpoint}: secret lengths {lengths:?}");
    }
}
