//! The `same-node` step: throughput between two enrolled pods on one node through our proxy,
//! with the sockhash/sk_msg fast path (`--fast-path on`) against plain loopback proxying (the
//! same binary with `--fast-path off`), in the same run, rounds interleaved. Each variant has a
//! node of its own (client and server pod on it), so both run side by side with nothing else
//! changed; an unenrolled pair on the fast-path node is the no-proxy reference. The goal
//! (issue 16): fast path ≥ 1.3x plain loopback proxying. See docs/benchmarks.md.
use std::{collections::BTreeMap, time::Duration};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use ztunnel_tests::{pod, Cluster, ClusterBuilder, PodRef, Proc};

use super::{cpu_seconds, iperf_server, median, AMBIENT, IPERF_PORT, WAIT};

/// The namespace of the enrolled pairs.
const NS: &str = "same";
/// The unenrolled pair (namespace `direct`, which the other steps use too).
const DIRECT: (&str, &str, &str) = ("direct", "same-client", "same-server");
/// The goal line: fast path ÷ plain loopback proxying.
const GOAL: f64 = 1.3;

/// One variant: where it runs and what it is called in the output.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Variant {
    /// Our proxy, fast path on.
    On,
    /// Our proxy, fast path off: the baseline.
    Off,
    /// No proxy (the namespace is not enrolled).
    Direct,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::On, Variant::Off, Variant::Direct];
    fn key(self) -> &'static str {
        match self {
            Variant::On => "fast_path",
            Variant::Off => "loopback",
            Variant::Direct => "direct",
        }
    }
}

/// The nodes of the step: the fast-path node and the loopback node, after the other steps'.
pub struct SameNode {
    on_node: usize,
    off_node: usize,
    /// Per streams (1, 8), per variant: Gbit/s, one per round.
    gbps: BTreeMap<u32, BTreeMap<Variant, Vec<f64>>>,
    /// Per streams, per proxied variant: the node proxy's CPU seconds per GiB, one per round.
    cpu_per_gib: BTreeMap<u32, BTreeMap<Variant, Vec<f64>>>,
    /// Per round and streams: what the fast-path node's counters moved.
    counters: Vec<Value>,
}

impl SameNode {
    /// Adds the step's two nodes (`first`, `first + 1`) and pods to the cluster.
    pub fn add(b: ClusterBuilder, first: usize) -> (ClusterBuilder, Self) {
        let (on_node, off_node) = (first, first + 1);
        let b = b
            .nodes(off_node)
            .namespace(NS, &[AMBIENT])
            .pod(pod(NS, "client-on").node(on_node))
            .pod(pod(NS, "server-on").node(on_node))
            .pod(pod(NS, "client-off").node(off_node))
            .pod(pod(NS, "server-off").node(off_node))
            .pod(pod(DIRECT.0, DIRECT.1).node(on_node))
            .pod(pod(DIRECT.0, DIRECT.2).node(on_node));
        let step = Self {
            on_node,
            off_node,
            gbps: BTreeMap::new(),
            cpu_per_gib: BTreeMap::new(),
            counters: Vec::new(),
        };
        (b, step)
    }

    /// Restarts the fast-path node's proxy with `--fast-path on` (the default is off) and
    /// waits until both nodes captured their pods.
    pub fn prepare(&self, c: &Cluster) -> Result<()> {
        c.stop_proxy(self.on_node)?;
        let mark = c.log_mark(self.on_node);
        c.start_proxy_with(self.on_node, &["--fast-path", "on"])?;
        c.wait_enrolled(self.on_node, mark, &format!("{NS}/server-on"), WAIT)?;
        c.wait_enrolled(self.on_node, mark, &format!("{NS}/client-on"), WAIT)?;
        c.wait_enrolled(self.off_node, 0, &format!("{NS}/server-off"), WAIT)?;
        c.wait_enrolled(self.off_node, 0, &format!("{NS}/client-off"), WAIT)?;
        let on = fast_path_metric(c, self.on_node, "ztunnel_fast_path_enabled")?;
        let off = fast_path_metric(c, self.off_node, "ztunnel_fast_path_enabled")?;
        if on != 1.0 || off != 0.0 {
            bail!(
                "the fast path should be on on node{} and off on node{} (gauges {on}, {off})",
                self.on_node,
                self.off_node
            );
        }
        println!(
            "   same-node: node{} fast path on, node{} fast path off (plain loopback proxying), \
             unenrolled pair on node{}",
            self.on_node, self.off_node, self.on_node
        );
        Ok(())
    }

    fn pods<'a>(&self, c: &'a Cluster, v: Variant) -> (PodRef<'a>, PodRef<'a>, Option<usize>) {
        match v {
            Variant::On => (
                c.pod(NS, "client-on"),
                c.pod(NS, "server-on"),
                Some(self.on_node),
            ),
            Variant::Off => (
                c.pod(NS, "client-off"),
                c.pod(NS, "server-off"),
                Some(self.off_node),
            ),
            Variant::Direct => (c.pod(DIRECT.0, DIRECT.1), c.pod(DIRECT.0, DIRECT.2), None),
        }
    }

    /// One round: iperf3 with 1 and 8 streams on every variant, on and off in alternating
    /// order. Failures are pushed to `problems`; the run goes on.
    pub fn measure(&mut self, c: &Cluster, secs: u64, round: u64, problems: &mut Vec<String>) {
        println!("   same-node: iperf3, {secs} s per run");
        let mut order = Variant::ALL.to_vec();
        if round % 2 == 1 {
            order.swap(0, 1);
        }
        let mut servers: Vec<Proc> = Vec::new();
        for v in &order {
            match iperf_server(&self.pods(c, *v).1) {
                Ok(s) => servers.push(s),
                Err(e) => {
                    return problem(problems, &format!("same-node {}: iperf3 -s", v.key()), &e)
                }
            }
        }
        for streams in [1u32, 8] {
            for v in &order {
                match self.one(c, *v, secs, streams) {
                    Ok((gbps, cpu, counters)) => {
                        println!(
                            "   {:<9}  -P {streams}: {gbps:.2} Gbit/s{}",
                            v.key(),
                            cpu.map(|c| format!(", proxy {c:.2} CPU-s/GiB"))
                                .unwrap_or_default()
                        );
                        self.gbps
                            .entry(streams)
                            .or_default()
                            .entry(*v)
                            .or_default()
                            .push(gbps);
                        if let Some(cpu) = cpu {
                            self.cpu_per_gib
                                .entry(streams)
                                .or_default()
                                .entry(*v)
                                .or_default()
                                .push(cpu);
                        }
                        if let Some(counters) = counters {
                            self.counters
                                .push(json!({"round": round + 1, "streams": streams,
                                "fast_path_node": counters}));
                        }
                    }
                    Err(e) => problem(problems, &format!("same-node {} -P {streams}", v.key()), &e),
                }
            }
        }
    }

    /// One iperf3 run: Gbit/s received, the node proxy's CPU seconds per GiB, and (fast path)
    /// how the node's fast-path counters moved.
    fn one(
        &self,
        c: &Cluster,
        v: Variant,
        secs: u64,
        streams: u32,
    ) -> Result<(f64, Option<f64>, Option<Value>)> {
        let (client, server, node) = self.pods(c, v);
        let pid = node
            .map(|i| {
                c.proxy_pid(i)
                    .ok_or_else(|| anyhow!("the proxy of node{i} is not running"))
            })
            .transpose()?;
        let counters = |i| {
            fast_path_metrics(
                c,
                i,
                [
                    "ztunnel_fast_path_redirected_bytes_total",
                    "ztunnel_fast_path_tcp_messages_total",
                    "ztunnel_fast_path_active_tcp_total",
                ],
            )
        };
        let before_counters = counters(self.on_node)?;
        let cpu_before = pid.map(cpu_seconds).transpose()?;
        let ip = server.ip().to_string();
        let (port, secs_s, streams_s) = (
            IPERF_PORT.to_string(),
            secs.to_string(),
            streams.to_string(),
        );
        let out = client.run(
            &[
                "iperf3", "-c", &ip, "-p", &port, "-t", &secs_s, "-P", &streams_s, "-J",
            ],
            Duration::from_secs(secs + 25),
        )?;
        let cpu_after = pid.map(cpu_seconds).transpose()?;
        let (report, bps) = super::iperf_report(&out)?;
        let bytes = report["end"]["sum_received"]["bytes"]
            .as_f64()
            .unwrap_or(0.0);
        let cpu = match (cpu_before, cpu_after) {
            (Some(a), Some(b)) if bytes > 0.0 => Some((b - a) / (bytes / f64::from(1u32 << 30))),
            _ => None,
        };
        let moved = if v == Variant::On {
            let after = counters(self.on_node)?;
            Some(json!({
                "iperf_bytes": bytes,
                "redirected_bytes": after[0] - before_counters[0],
                "tcp_messages": after[1] - before_counters[1],
                "active_tcp": after[2] - before_counters[2],
            }))
        } else {
            None
        };
        Ok((bps / 1e9, cpu, moved))
    }

    fn ratio(&self, streams: u32, a: Variant, b: Variant) -> Option<f64> {
        let m = |v| self.gbps.get(&streams)?.get(&v).and_then(|x| median(x));
        Some(m(a)? / m(b)?)
    }

    /// Prints the step's table.
    pub fn print(&self) {
        println!("\nsame node (medians; goal: fast path ≥ {GOAL}x plain loopback proxying)");
        for (streams, by) in &self.gbps {
            let m = |v: Variant| by.get(&v).and_then(|x| median(x));
            let cpu = |v: Variant| {
                self.cpu_per_gib
                    .get(streams)
                    .and_then(|b| b.get(&v))
                    .and_then(|x| median(x))
            };
            let f = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.2}"));
            println!(
                "   -P {streams}: fast path {} Gbit/s ({} CPU-s/GiB), loopback {} Gbit/s ({} \
                 CPU-s/GiB), direct {} Gbit/s; fast path ÷ loopback {}",
                f(m(Variant::On)),
                f(cpu(Variant::On)),
                f(m(Variant::Off)),
                f(cpu(Variant::Off)),
                f(m(Variant::Direct)),
                f(self.ratio(*streams, Variant::On, Variant::Off)),
            );
        }
    }

    /// The step's JSON (`same_node` in the output).
    pub fn to_json(&self) -> Value {
        let per = |m: &BTreeMap<u32, BTreeMap<Variant, Vec<f64>>>| -> Value {
            m.iter()
                .map(|(s, by)| {
                    let v: serde_json::Map<String, Value> = by
                        .iter()
                        .map(|(v, x)| {
                            (
                                v.key().to_owned(),
                                json!({"median": median(x), "rounds": x}),
                            )
                        })
                        .collect();
                    (format!("p{s}"), Value::Object(v))
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let ratios: serde_json::Map<String, Value> = self
            .gbps
            .keys()
            .map(|s| {
                let r = self.ratio(*s, Variant::On, Variant::Off);
                (
                    format!("p{s}"),
                    json!({"fast_path_over_loopback": r,
                           "fast_path_over_direct": self.ratio(*s, Variant::On, Variant::Direct),
                           "loopback_over_direct": self.ratio(*s, Variant::Off, Variant::Direct),
                           "goal": GOAL, "met": r.map(|r| r >= GOAL)}),
                )
            })
            .collect();
        json!({
            "baseline": "the same proxy binary with --fast-path off (plain loopback proxying), \
                         on a node of its own; direct = an unenrolled pair on the fast-path node",
            "gbit_per_s": per(&self.gbps),
            "proxy_cpu_s_per_gib": per(&self.cpu_per_gib),
            "ratios": ratios,
            "fast_path_counters": self.counters,
        })
    }
}

fn problem(problems: &mut Vec<String>, what: &str, e: &anyhow::Error) {
    let text = format!("{what}: {e:#}");
    println!("   FAILED {text}");
    problems.push(text);
}

/// A metric of node `i`'s proxy, summed over its series (0 if absent).
pub(super) fn fast_path_metric(c: &Cluster, i: usize, name: &str) -> Result<f64> {
    Ok(fast_path_metrics(c, i, [name])?[0])
}

/// Several metrics of node `i`'s proxy from one scrape, each summed over its series.
pub(super) fn fast_path_metrics<const N: usize>(
    c: &Cluster,
    i: usize,
    names: [&str; N],
) -> Result<[f64; N]> {
    let scrape = c.node(i).scrape()?;
    Ok(names.map(|name| scrape.sum(name, &[])))
}
