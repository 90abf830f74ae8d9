//! The shipped Prometheus and Grafana files are valid and only name metrics that exist.
#![allow(missing_docs, clippy::unwrap_used)]

use std::path::PathBuf;

fn deploy(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(rel)
}

fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("runnel_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let base =
            ["_bucket", "_count", "_sum"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        out.push(base.to_owned());
        i = end;
    }
    out
}

#[test]
fn dashboard_and_rules_name_only_real_metrics() {
    let rules = std::fs::read_to_string(deploy("prometheus/runnel-alerts.yml")).unwrap();
    let dash = std::fs::read_to_string(deploy("grafana/runnel.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dash).unwrap();
    assert!(parsed["panels"].as_array().unwrap().len() >= 10);
    let used: Vec<String> = metric_names(&rules).into_iter().chain(metric_names(&dash)).collect();
    assert!(used.len() > 10);
    for name in &used {
        assert!(
            runnel_broker::metrics::names::ALL.contains(&name.as_str()),
            "{name} is not a runnel metric"
        );
    }
    // Every metric the broker exports is on the dashboard.
    for name in runnel_broker::metrics::names::ALL {
        assert!(metric_names(&dash).iter().any(|u| u == name), "{name} missing from the dashboard");
    }
}

#[test]
fn promtool_accepts_rules_and_config() {
    if !runnel_tests::installed("promtool") {
        assert!(std::env::var_os("CI").is_none(), "promtool missing in CI");
        eprintln!("SKIPPED: promtool not installed");
        return;
    }
    // The config names the scrape key and the CA next to it: check a copy of the
    // directory with stand-ins for both (promtool reads that they exist).
    let dir = tempfile::tempdir().unwrap();
    for f in ["prometheus.yml", "runnel-alerts.yml"] {
        std::fs::copy(deploy(&format!("prometheus/{f}")), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("runnel-metrics.key"), "rk_stand-in").unwrap();
    let ca = runnel_certs::ClusterCa::generate("runnel").unwrap();
    std::fs::write(dir.path().join("runnel-ca.pem"), ca.cert_pem()).unwrap();
    for (args, file) in
        [(["check", "rules"], "runnel-alerts.yml"), (["check", "config"], "prometheus.yml")]
    {
        let out = std::process::Command::new("promtool")
            .args(args)
            .arg(dir.path().join(file))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // It scrapes over TLS with a bearer token (tests/prometheus_scrape.rs runs the same
    // shape against a real broker).
    let cfg = std::fs::read_to_string(deploy("prometheus/prometheus.yml")).unwrap();
    assert!(cfg.contains("scheme: https") && cfg.contains("type: Bearer"), "{cfg}");
}
