//! The Grafana dashboards the chart ships (`deploy/helm/ztunnel/dashboards/*.json`), read the
//! way Grafana reads them: every panel's PromQL, with the dashboard's variables, so tests can
//! parse each expression with promtool and ask a real Prometheus for it.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::process::output_with_timeout;

/// Where the chart keeps its dashboards (the ConfigMap template reads them from there).
pub fn dashboards_dir() -> PathBuf {
    crate::workspace_root().join("deploy/helm/ztunnel/dashboards")
}

/// One query of one panel.
#[derive(Clone, Debug)]
pub struct Query {
    pub dashboard: String,
    pub panel: String,
    pub ref_id: String,
    /// As written in the dashboard, with Grafana's `$variables`.
    pub expr: String,
}

impl Query {
    /// `<dashboard uid> / <panel title> / <refId>`, for messages.
    pub fn name(&self) -> String {
        format!("{} / {} / {}", self.dashboard, self.panel, self.ref_id)
    }
}

/// A dashboard file, parsed.
#[derive(Clone, Debug)]
pub struct Dashboard {
    pub file: PathBuf,
    pub json: Value,
    pub uid: String,
    /// The names of its template variables.
    pub variables: Vec<String>,
    pub queries: Vec<Query>,
}

/// Every dashboard of the chart, sorted by file name.
pub fn dashboards() -> Result<Vec<Dashboard>> {
    let dir = dashboards_dir();
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files.iter().map(|f| read(f)).collect()
}

fn read(file: &Path) -> Result<Dashboard> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let json: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    let uid = json["uid"]
        .as_str()
        .with_context(|| format!("{} has no uid", file.display()))?
        .to_owned();
    let variables = json["templating"]["list"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|v| v["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut queries = Vec::new();
    for panel in panels(&json) {
        let title = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push(Query {
                    dashboard: uid.clone(),
                    panel: title.clone(),
                    ref_id: target["refId"].as_str().unwrap_or("?").to_owned(),
                    expr: expr.to_owned(),
                });
            }
        }
    }
    Ok(Dashboard {
        file: file.to_owned(),
        json,
        uid,
        variables,
        queries,
    })
}

/// Every panel, those inside collapsed rows too.
pub fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// The `$name` / `${name}` variables an expression uses (Grafana's own `$__…` ones too).
pub fn variables_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let braced = rest.starts_with('{');
        let body = if braced { &rest[1..] } else { rest };
        let name: String = body
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

/// `expr` with each variable replaced by its value; an unknown one is an error (a query that
/// Grafana would send with a literal `$x` in it).
pub fn expand(expr: &str, values: &[(&str, &str)]) -> Result<String> {
    let mut out = expr.to_owned();
    // Longest names first: `$__rate_interval` before a hypothetical `$__rate`.
    let mut values = values.to_vec();
    values.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    for (name, value) in &values {
        out = out.replace(&format!("${{{name}}}"), value);
        out = out.replace(&format!("${name}"), value);
    }
    let left = variables_in(&out);
    if !left.is_empty() {
        bail!("{expr}: no value for {left:?}");
    }
    Ok(out)
}

/// Metric names an expression reads (`istio_*` and `ztunnel_*`), as exported: a histogram's
/// `_bucket`, `_sum` and `_count` series are named after the histogram.
pub fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word_start = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if word_start && (expr[i..].starts_with("istio_") || expr[i..].starts_with("ztunnel_")) {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            let name = &expr[i..end];
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(name.to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// Parses every expression with promtool (`check rules` over one recording rule each):
/// `Ok` only if all parse. Variables must have been expanded.
pub fn promtool_check(queries: &[(String, String)], work: &Path) -> Result<()> {
    let promtool = crate::cluster::prometheus::promtool_bin()?;
    let mut rules = String::from("groups:\n");
    for (i, (name, expr)) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "  - name: {}\n    rules:\n      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(name)?,
            serde_json::to_string(expr)?
        ));
    }
    fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let file = work.join("dashboard-rules.yml");
    fs::write(&file, rules).with_context(|| format!("writing {}", file.display()))?;
    let out = output_with_timeout(
        Command::new(promtool).args(["check", "rules"]).arg(&file),
        Duration::from_secs(30),
    )?;
    if !out.status.success() {
        bail!(
            "promtool refused the dashboards' PromQL:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_found_and_expanded() {
        let e = r#"sum(rate(x{a=~"$namespace",b="${workload}"}[$__rate_interval]))"#;
        let vars: Vec<String> = variables_in(e).into_iter().collect();
        assert_eq!(vars, ["__rate_interval", "namespace", "workload"]);
        let out = expand(
            e,
            &[
                ("namespace", "shop"),
                ("workload", "web"),
                ("__rate_interval", "1m"),
            ],
        )
        .unwrap();
        assert_eq!(out, r#"sum(rate(x{a=~"shop",b="web"}[1m]))"#);
        assert!(expand(e, &[("namespace", "shop")]).is_err());
    }

    #[test]
    fn metric_names_are_read_as_exported() {
        let m = metrics_in(
            "histogram_quantile(0.9, sum by (le) (rate(istio_request_duration_milliseconds_bucket[1m]))) / ztunnel_enrolled_pods + up + my_istio_x",
        );
        let m: Vec<&str> = m.iter().map(String::as_str).collect();
        assert_eq!(
            m,
            [
                "istio_request_duration_milliseconds",
                "ztunnel_enrolled_pods"
            ]
        );
    }
}
