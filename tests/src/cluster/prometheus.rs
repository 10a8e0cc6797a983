//! A real Prometheus server (Debian's `prometheus`, installed by `cargo xtask setup`) scraping
//! the node proxies of a cluster, and its HTTP query API.
//!
//! It runs in the underlay netns, which gets the address [`MONITOR_IP`] on its bridge while
//! the server runs (a monitoring host on the nodes' network), and scrapes every node's
//! `10.255.0.<i>:15020/metrics` every [`Prometheus::interval`]; each target carries a `node`
//! label (`node1`...). It listens on 127.0.0.1 of the underlay only: the test queries it with
//! curl inside that netns. Its configuration and data live in `/tmp/<prefix>/prometheus`,
//! and the process is in the cluster's tools cgroup, so the cluster's clean-up removes all of
//! it even if the test panics; dropping the handle stops it earlier.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use super::{Cluster, CMD_TIMEOUT};
use crate::process::{host, Proc};

/// The monitoring host's address on the underlay bridge (nodes are 10.255.0.1..=250).
pub const MONITOR_IP: &str = "10.255.0.254";
/// Where the server listens, inside the underlay netns.
const LISTEN: &str = "127.0.0.1:9090";

/// Debian's server binary (and promtool next to it).
pub fn prometheus_bin() -> Result<PathBuf> {
    tool("prometheus")
}

/// Prometheus' own checker of configuration, rules and PromQL.
pub fn promtool_bin() -> Result<PathBuf> {
    tool("promtool")
}

fn tool(name: &str) -> Result<PathBuf> {
    let path = Path::new("/usr/bin").join(name);
    if !path.exists() {
        bail!(
            "{} does not exist: `cargo xtask setup` installs Debian's prometheus package",
            path.display()
        );
    }
    Ok(path)
}

/// One series of a query result: its labels and its value at the query's time.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Series {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map(String::as_str).unwrap_or("")
    }
}

/// A running Prometheus server; stopped when dropped.
pub struct Prometheus<'a> {
    cluster: &'a Cluster,
    process: Proc,
    interval: Duration,
}

impl Cluster {
    /// Starts Prometheus scraping every node proxy each `interval`, and waits until it is
    /// ready and has scraped each of them once.
    pub fn start_prometheus(&self, interval: Duration) -> Result<Prometheus<'_>> {
        let bin = prometheus_bin()?;
        let dir = self.tmp.join("prometheus");
        fs::create_dir_all(dir.join("data"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("prometheus.yml");
        fs::write(&config, scrape_config(self.nodes, interval))
            .with_context(|| format!("writing {}", config.display()))?;
        let u = self.underlay_netns();
        let cidr = format!("{MONITOR_IP}/24");
        host("ip", &["-n", &u, "addr", "replace", &cidr, "dev", "br0"])?;
        let arg = |flag: &str, path: &Path| format!("--{flag}={}", path.display());
        let process = self.underlay_spawn(&[
            &bin.to_string_lossy(),
            &arg("config.file", &config),
            &arg("storage.tsdb.path", &dir.join("data")),
            &format!("--web.listen-address={LISTEN}"),
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ])?;
        let p = Prometheus {
            cluster: self,
            process,
            interval,
        };
        p.wait_ready()?;
        p.wait_scraped_after(unix_now())?;
        Ok(p)
    }
}

/// Prometheus' configuration: one job, `ztunnel`, with every node's metrics port.
pub fn scrape_config(nodes: usize, interval: Duration) -> String {
    let ms = interval.as_millis().max(100);
    let mut s = format!(
        "global:\n  scrape_interval: {ms}ms\n  scrape_timeout: {}ms\n  evaluation_interval: {ms}ms\n\
         scrape_configs:\n  - job_name: ztunnel\n    metrics_path: /metrics\n    static_configs:\n",
        ms * 9 / 10
    );
    for i in 1..=nodes {
        s.push_str(&format!(
            "      - targets: ['10.255.0.{i}:15020']\n        labels: {{node: node{i}}}\n"
        ));
    }
    s
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Prometheus<'_> {
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// `GET <path>?<params>` against the server's API: the JSON answer's `data`.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value> {
        let url = format!("http://{LISTEN}{path}");
        let mut args = vec!["curl", "-sS", "--max-time", "10", "-G", &url];
        let encoded: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for p in &encoded {
            args.extend(["--data-urlencode", p]);
        }
        let out = self.cluster.underlay_exec(&args, CMD_TIMEOUT)?;
        let body = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "querying Prometheus ({path} {params:?}) failed: {}{body}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("Prometheus answered {path} {params:?} with {body}"))?;
        if v["status"] != "success" {
            bail!(
                "Prometheus refused {params:?}: {} {}",
                v["errorType"],
                v["error"]
            );
        }
        Ok(v["data"].clone())
    }

    /// An instant query (`/api/v1/query`) at the current time.
    pub fn query(&self, expr: &str) -> Result<Vec<Series>> {
        series(&self.api("/api/v1/query", &[("query", expr)])?)
            .with_context(|| format!("the result of {expr}"))
    }

    /// [`Prometheus::query`] that must give exactly one series: its value.
    pub fn value(&self, expr: &str) -> Result<f64> {
        let r = self.query(expr)?;
        match r.as_slice() {
            [one] => Ok(one.value),
            _ => bail!("{expr} gave {} series, not one: {r:?}", r.len()),
        }
    }

    /// Whether the server is ready to answer queries (`/-/ready`).
    fn wait_ready(&self) -> Result<()> {
        let url = format!("http://{LISTEN}/-/ready");
        crate::wait_until(Duration::from_secs(20), "Prometheus to be ready", || {
            self.cluster
                .underlay_exec(
                    &["curl", "-sf", "--max-time", "2", &url],
                    Duration::from_secs(5),
                )
                .ok()
                .filter(|o| o.status.success())
        })
        .with_context(|| format!("Prometheus' log: {:?}", self.process.stderr_lines()))?;
        Ok(())
    }

    /// Waits until every node proxy has been scraped successfully after `t` (Unix seconds),
    /// so what the proxies counted before `t` is in Prometheus.
    pub fn wait_scraped_after(&self, t: f64) -> Result<()> {
        let nodes = self.cluster.nodes;
        let last = std::cell::RefCell::new(Vec::new());
        // `timestamp(up)`: when each target was last scraped (of a selector, the sample's own
        // time; of any other expression, the query's); `up` 1: that scrape worked.
        let done = crate::wait_until(
            self.interval * 3 + Duration::from_secs(15),
            "Prometheus to scrape every node proxy",
            || {
                let scraped = self.query("timestamp(up)").ok()?;
                let up = self.query("up").ok()?;
                let fresh = scraped
                    .iter()
                    .filter(|s| s.value > t)
                    .filter(|s| {
                        up.iter()
                            .any(|u| u.label("instance") == s.label("instance") && u.value == 1.0)
                    })
                    .count();
                *last.borrow_mut() = scraped;
                (fresh == nodes).then_some(())
            },
        );
        done.with_context(|| {
            let targets = self.api("/api/v1/targets", &[]).unwrap_or_default();
            format!(
                "last `timestamp(up)`: {:?}; targets: {targets}",
                last.borrow()
            )
        })
    }

    /// [`Prometheus::wait_scraped_after`] now.
    pub fn wait_scraped(&self) -> Result<()> {
        self.wait_scraped_after(unix_now())
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        self.process.kill();
        let cidr = format!("{MONITOR_IP}/24");
        let u = self.cluster.underlay_netns();
        let _ = host("ip", &["-n", &u, "addr", "del", &cidr, "dev", "br0"]);
    }
}

/// The series of a query's `data` (a vector, or a scalar as one series without labels).
fn series(data: &Value) -> Result<Vec<Series>> {
    let number = |v: &Value| -> Result<f64> {
        let text = v[1]
            .as_str()
            .ok_or_else(|| anyhow!("a sample without a value: {v}"))?;
        // Prometheus writes NaN and the infinities as Go does.
        match text {
            "NaN" => Ok(f64::NAN),
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            t => t.parse().with_context(|| format!("the value {t:?}")),
        }
    };
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .ok_or_else(|| anyhow!("a vector without a result: {data}"))?
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(Series {
                    labels,
                    value: number(&s["value"])?,
                })
            })
            .collect(),
        Some("scalar") => Ok(vec![Series {
            labels: BTreeMap::new(),
            value: number(&data["result"])?,
        }]),
        other => bail!("a {other:?} result, expected an instant vector: {data}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scrape_configuration_names_every_node() {
        let c = scrape_config(2, Duration::from_secs(1));
        assert!(c.contains("scrape_interval: 1000ms"));
        assert!(c.contains("scrape_timeout: 900ms"));
        assert!(c.contains("targets: ['10.255.0.1:15020']\n        labels: {node: node1}"));
        assert!(c.contains("targets: ['10.255.0.2:15020']\n        labels: {node: node2}"));
        assert!(!c.contains("10.255.0.3"));
    }

    #[test]
    fn vectors_and_scalars_are_read() {
        let v: Value = serde_json::from_str(
            r#"{"resultType":"vector","result":[{"metric":{"code":"200"},"value":[1,"2.5"]},{"metric":{},"value":[1,"NaN"]}]}"#,
        )
        .unwrap();
        let s = series(&v).unwrap();
        assert_eq!(s[0].label("code"), "200");
        assert_eq!(s[0].value, 2.5);
        assert!(s[1].value.is_nan());
        let v: Value =
            serde_json::from_str(r#"{"resultType":"scalar","result":[1,"+Inf"]}"#).unwrap();
        assert_eq!(series(&v).unwrap()[0].value, f64::INFINITY);
        let v: Value = serde_json::from_str(r#"{"resultType":"matrix","result":[]}"#).unwrap();
        assert!(series(&v).is_err());
    }
}
