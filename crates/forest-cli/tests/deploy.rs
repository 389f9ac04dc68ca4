//! Checks of `deploy/` that need no Docker or cluster: every YAML file parses, the Grafana
//! dashboard is valid JSON, and the dashboard and the Prometheus alert rules name only metrics
//! the code emits (names are the `"forest_..."` constants in `crates/*/src`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Every `forest_[a-z0-9_]+` token in `text`.
fn metric_tokens(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("forest_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        // Not part of a longer identifier (e.g. `my_forest_x`).
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// Metric names the code defines: quoted `"forest_..."` literals in the crates' sources.
fn code_metrics() -> BTreeSet<String> {
    let mut srcs = Vec::new();
    files(&root().join("crates"), &mut srcs);
    let mut names = BTreeSet::new();
    for p in srcs.iter().filter(|p| {
        p.extension().is_some_and(|e| e == "rs") && p.components().any(|c| c.as_os_str() == "src")
    }) {
        let text = std::fs::read_to_string(p).expect("source");
        for part in text.split('"').skip(1).step_by(2) {
            if part.starts_with("forest_")
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                names.insert(part.to_string());
            }
        }
    }
    names
}

fn known(name: &str, code: &BTreeSet<String>) -> bool {
    code.contains(name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|s| name.strip_suffix(s).is_some_and(|b| code.contains(b)))
}

fn exprs_json(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => exprs_json(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs_json(v, out)),
        _ => {}
    }
}

#[test]
fn yaml_parses_and_dashboards_and_alerts_name_only_emitted_metrics() {
    let mut all = Vec::new();
    files(&root().join("deploy"), &mut all);
    let code = code_metrics();
    assert!(code.len() > 20, "found the code's metric names: {code:?}");

    let mut yaml_docs = 0;
    let mut alert_exprs = Vec::new();
    for p in all
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
    {
        let text = std::fs::read_to_string(p).expect("yaml file");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", p.display()));
            yaml_docs += 1;
            if let Some(groups) = v.get("groups").and_then(|g| g.as_sequence()) {
                for g in groups {
                    for r in g
                        .get("rules")
                        .and_then(|r| r.as_sequence())
                        .into_iter()
                        .flatten()
                    {
                        if let Some(e) = r.get("expr").and_then(|e| e.as_str()) {
                            let name = r.get("alert").and_then(|a| a.as_str()).unwrap_or("?");
                            alert_exprs.push((name.to_string(), e.to_string()));
                        }
                    }
                }
            }
        }
    }
    assert!(
        yaml_docs >= 10,
        "deploy/ YAML documents parsed: {yaml_docs}"
    );
    assert!(alert_exprs.len() >= 5, "alert rules found: {alert_exprs:?}");

    let dash = root().join("deploy/grafana/dashboards/forest.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dash).expect("dashboard"))
            .expect("the dashboard is valid JSON");
    let mut exprs = Vec::new();
    exprs_json(&json, &mut exprs);
    assert!(exprs.len() >= 20, "dashboard queries: {}", exprs.len());

    let mut unknown = Vec::new();
    let mut used = BTreeSet::new();
    for (what, e) in exprs
        .iter()
        .map(|e| ("dashboard".to_string(), e))
        .chain(alert_exprs.iter().map(|(n, e)| (format!("alert {n}"), e)))
    {
        for m in metric_tokens(e) {
            if known(&m, &code) {
                used.insert(m);
            } else {
                unknown.push(format!("{what}: {m} in {e}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics the code does not emit:\n{}",
        unknown.join("\n")
    );
    eprintln!(
        "deploy: {yaml_docs} YAML documents, {} dashboard queries, {} alerts, {} distinct Forest metrics referenced",
        exprs.len(),
        alert_exprs.len(),
        used.len()
    );
}

#[test]
fn probes_point_at_the_endpoints_the_binary_serves() {
    for f in [
        "deploy/k8s/processor-statefulset.yaml",
        "deploy/k8s/fulfilment-statefulset.yaml",
    ] {
        let text = std::fs::read_to_string(root().join(f)).expect(f);
        assert!(text.contains("/healthz") && text.contains("/readyz"), "{f}");
    }
}

/// The ConfigMap's forest.toml is accepted by the binary: every key is a flag of its
/// subcommand (an unknown key fails like an unknown flag, before `--help` is reached).
#[test]
fn the_configmap_config_file_is_accepted_by_the_binary() {
    let text = std::fs::read_to_string(root().join("deploy/k8s/configmap.yaml")).expect("cm");
    let cm: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("configmap parses");
    let toml = cm
        .get("data")
        .and_then(|d| d.get("forest.toml"))
        .and_then(|t| t.as_str())
        .expect("data.forest.toml");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("forest.toml");
    std::fs::write(&file, toml).expect("write");
    for sub in ["processor", "fulfilment"] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_forest"))
            .args([sub, "--config", file.to_str().unwrap(), "--help"])
            .output()
            .expect("forest runs");
        assert!(
            o.status.success(),
            "forest {sub} rejects the ConfigMap's file: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
