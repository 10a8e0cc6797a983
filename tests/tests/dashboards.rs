//! The Grafana dashboards of the chart (`deploy/helm/ztunnel/dashboards/`): well formed as
//! Grafana reads them, every PromQL expression parsed by Prometheus' own promtool, and every
//! metric they read documented in docs/operations.md. (That each expression returns data from
//! the proxies is checked against a real Prometheus in tests/tests/telemetry.rs.)
use std::collections::BTreeSet;

use anyhow::{ensure, Context as _, Result};
use ztunnel_tests::dashboards::{
    dashboards, expand, metrics_in, panels, promtool_check, variables_in,
};

/// Grafana's own variables, always defined.
const BUILTIN: &[&str] = &["__rate_interval", "__interval", "__range"];

fn work_dir(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("ztt-{}-{name}", std::process::id()))
}

/// Values for every variable, for parsing only (they stand inside label matchers or ranges).
fn placeholders(variables: &[String]) -> Vec<(&str, &str)> {
    let mut v: Vec<(&str, &str)> = variables.iter().map(|n| (n.as_str(), "x")).collect();
    v.extend([
        ("__rate_interval", "1m"),
        ("__interval", "15s"),
        ("__range", "1h"),
    ]);
    v
}

#[test]
fn every_dashboard_expression_parses_with_promtool() -> Result<()> {
    let boards = dashboards()?;
    ensure!(!boards.is_empty(), "no dashboards found");
    let mut all = Vec::new();
    for d in &boards {
        let vars = placeholders(&d.variables);
        for q in &d.queries {
            all.push((q.name(), expand(&q.expr, &vars)?));
        }
        // A query variable's selector (`label_values(<selector>, <label>)`) is PromQL too.
        for v in d.json["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let Some(def) = v["definition"].as_str() else {
                continue;
            };
            if let Some(args) = def
                .strip_prefix("label_values(")
                .and_then(|a| a.strip_suffix(')'))
            {
                let selector = args.rsplit_once(',').map_or(args, |(s, _)| s).trim();
                let name = format!("{} / variable {}", d.uid, v["name"]);
                all.push((name, expand(selector, &vars)?));
            }
        }
    }
    let work = work_dir("promtool");
    let result = promtool_check(&all, &work);
    // promtool must be able to say no, or this test proves nothing.
    let broken = promtool_check(
        &[("broken".into(), "sum(rate(istio_requests_total[1m])".into())],
        &work,
    );
    let _ = std::fs::remove_dir_all(&work);
    result.with_context(|| format!("{} expressions", all.len()))?;
    ensure!(broken.is_err(), "promtool accepted a broken expression");
    Ok(())
}

#[test]
fn dashboards_are_well_formed_and_read_documented_metrics() -> Result<()> {
    let docs = std::fs::read_to_string(ztunnel_tests::workspace_root().join("docs/operations.md"))?;
    let mut uids = BTreeSet::new();
    for d in dashboards()? {
        let file = d.file.display().to_string();
        ensure!(uids.insert(d.uid.clone()), "{file}: uid {} twice", d.uid);
        ensure!(
            d.json["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{file}: no title"
        );
        ensure!(
            d.variables.iter().any(|v| v == "datasource"),
            "{file}: no datasource variable (a dashboard provisioned by the sidecar must not name one data source)"
        );
        ensure!(!d.queries.is_empty(), "{file}: no queries");
        let mut ids = BTreeSet::new();
        for p in panels(&d.json) {
            let title = p["title"].as_str().unwrap_or_default();
            ensure!(!title.is_empty(), "{file}: a panel without a title");
            ensure!(
                ids.insert(p["id"].as_u64().context("a panel id")?),
                "{file}: panel id {} twice",
                p["id"]
            );
            let g = &p["gridPos"];
            let (x, w) = (g["x"].as_u64().unwrap_or(99), g["w"].as_u64().unwrap_or(0));
            ensure!(w > 0 && x + w <= 24, "{file}: {title}: gridPos {g}");
            if p["type"] == "row" {
                continue;
            }
            ensure!(
                p["datasource"]["uid"] == "${datasource}",
                "{file}: {title}: datasource {}",
                p["datasource"]
            );
            ensure!(
                p["description"].as_str().is_some_and(|t| !t.is_empty()),
                "{file}: {title}: no description"
            );
            let mut refs = BTreeSet::new();
            for t in p["targets"].as_array().into_iter().flatten() {
                ensure!(
                    refs.insert(t["refId"].as_str().unwrap_or_default()),
                    "{file}: {title}: refId {} twice",
                    t["refId"]
                );
            }
        }
        for q in &d.queries {
            for v in variables_in(&q.expr) {
                ensure!(
                    d.variables.contains(&v) || BUILTIN.contains(&v.as_str()),
                    "{}: ${v} is not a variable of the dashboard",
                    q.name()
                );
            }
            for m in metrics_in(&q.expr) {
                ensure!(
                    docs.contains(&format!("`{m}")),
                    "{}: {m} is not in docs/operations.md",
                    q.name()
                );
            }
        }
    }
    Ok(())
}
