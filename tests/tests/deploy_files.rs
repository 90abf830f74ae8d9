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
    let ok = std::process::Command::new("sh")
        .args(["-c", "command -v promtool"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "promtool missing in CI");
        eprintln!("SKIPPED: promtool not installed");
        return;
    }
    for args in [["check", "rules"], ["check", "config"]] {
        let file = if args[1] == "rules" {
            "prometheus/runnel-alerts.yml"
        } else {
            "prometheus/prometheus.yml"
        };
        let out =
            std::process::Command::new("promtool").args(args).arg(deploy(file)).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
