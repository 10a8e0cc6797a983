//! `cargo xtask bench`: what the mesh costs, measured on a virtual cluster.
//!
//! Every figure is measured on the same topology (client pod on one node, server pod on
//! another) for each path, in the same run: `direct` (namespace not enrolled: no proxy on the
//! path), `mesh` (ambient, both of our node proxies on the path) and, with `--peer`, `peer`
//! (ambient, Istio's ztunnel as both node proxies). Measurements run one after another, never
//! together, in rounds: every round measures every path, the mesh paths in alternating order,
//! and the table shows the medians and the spread between rounds. Bounded: about a minute with
//! the defaults, about four with `--peer`. See docs/benchmarks.md.
use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    process::{Command, ExitCode},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use serde_json::{json, Value};
use ztunnel_tests::{
    benchmark::{git_state, rss_by_mapping, vm_rss_kib, write_json},
    pod,
    profile::{Profiler, Recording},
    service, wait_until, Cluster, PodRef, Proc,
};

#[path = "bench/same_node.rs"]
mod same_node;
#[path = "bench/soak.rs"]
mod soak;

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
const IPERF_PORT: u16 = 5201;
const WAIT: Duration = Duration::from_secs(15);
/// The routing step's Services (port `http` 80 → the server's 8080): requests to the first
/// are carried as connections, to the second each is routed by a VirtualService.
const PLAIN_SERVICE: &str = "plain";
const ROUTED_SERVICE: &str = "routed";
const SERVICE_PORT: u16 = 80;
/// Two routes, as a canary rollout has: a header match first, then the default.
const ROUTED_VS: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: routed
  namespace: mesh
spec:
  hosts:
  - routed
  http:
  - match:
    - headers:
        x-canary:
          exact: \"true\"
    route:
    - destination:
        host: routed
  - route:
    - destination:
        host: routed
";

const USAGE: &str = "\
usage: bench [options]           (normally run as `cargo xtask bench [-- options]`)
  --peer [PATH]       also measure Istio's ztunnel as both node proxies (a third path), round
                      by round with ours; its binary: PATH, else $ZTUNNEL_PEER_BIN, else
                      ../shared/peers/istio-ztunnel.xz beside the checkout
  --rounds N          rounds of every measurement (default 1; 5 with --peer; at most 20)
  --iperf-seconds N   length of each iperf3 run (default 5; 3 with --peer; at most 30)
  --rate R            requests per second of the latency test (default 500, at most 20000)
  --latency-ms D      length of the latency test (default 5000; 4000 with --peer; at most 30000)
  --connections C     keep-alive connections of the latency test (default 4, at most 64)
  --conn-ms D         length of the connections-per-second test (default 3000; 2000 with
                      --peer; at most 30000)
  --concurrency N     parallel loops of that test (default 8, at most 64)
  --hold N            idle connections held for the memory test (default 1000, at most 10000)
  --settle SECONDS    after each path's hold ends, go on sampling its proxies' RSS and
                      descriptors every second for SECONDS (at most 600): what a burst leaves
                      and when the HBONE pool's idle expiry frees it (default 0: not watched)
  --mesh-fast-path    run our mesh path's two proxies with `--fast-path on` (the sk_msg fast
                      path between each application and its proxy; off by default because it
                      changes blocking readers' semantics, docs/capture.md): an opt-in measure
  --only STEPS        run only these steps, comma-separated: idle, memory, throughput,
                      latency, routing, conn-rate, same-node (default: all)
  --soak SECONDS      after the rounds (alone, without --only), a soak of mixed load in
                      cycles with the proxies' RSS sampled throughout: flat or growing (60 to
                      1800 s; docs/benchmarks.md)
  --out DIR           where the JSON goes (default <workspace>/target/bench)
  --profile DIR       also sample both proxies of each mesh path with `perf record` while the
                      first round's throughput, latency and conn-rate runs: flame graphs
                      (DIR/<step>-<path>.svg), folded stacks and a summary in the JSON";

/// What to run; every knob has an upper bound so a run stays bounded.
struct Params {
    rounds: u64,
    iperf_seconds: u64,
    rate: u64,
    latency_ms: u64,
    connections: u64,
    conn_ms: u64,
    concurrency: u64,
    hold: u64,
    /// `--settle`: seconds of sampling after each hold (0: none).
    settle: u64,
    /// The steps to run (`--only`), every one by default.
    steps: Vec<Step>,
    out: PathBuf,
    /// `--peer`: the peer binary (explicit, or found the harness's way).
    peer: Option<PathBuf>,
    /// `--profile`: where the recordings and flame graphs go.
    profile: Option<PathBuf>,
    /// `--soak`: its length in seconds.
    soak: Option<u64>,
    /// `--mesh-fast-path`: our mesh path's proxies run with the sk_msg fast path on.
    mesh_fast_path: bool,
}

impl Params {
    fn parse(args: &[String]) -> Result<Self> {
        let mut set: BTreeMap<&str, u64> = BTreeMap::new();
        let mut out = ztunnel_tests::workspace_root().join("target/bench");
        let mut peer: Option<Option<PathBuf>> = None;
        let mut profile = None;
        let mut mesh_fast_path = false;
        let mut steps = Step::ALL.to_vec();
        let mut only = false;
        let mut it = args.iter().peekable();
        while let Some(flag) = it.next() {
            if flag == "-h" || flag == "--help" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            if flag == "--peer" {
                let path = it.next_if(|a| !a.starts_with("--")).map(PathBuf::from);
                peer = Some(path);
                continue;
            }
            if flag == "--mesh-fast-path" {
                mesh_fast_path = true;
                continue;
            }
            let value = it
                .next()
                .ok_or_else(|| anyhow!("{flag} needs a value\n{USAGE}"))?;
            let (key, lo, hi) = match flag.as_str() {
                "--rounds" => ("rounds", 1, 20),
                "--iperf-seconds" => ("iperf_seconds", 1, 30),
                "--rate" => ("rate", 1, 20_000),
                "--latency-ms" => ("latency_ms", 100, 30_000),
                "--connections" => ("connections", 1, 64),
                "--conn-ms" => ("conn_ms", 100, 30_000),
                "--concurrency" => ("concurrency", 1, 64),
                "--hold" => ("hold", 1, 10_000),
                "--settle" => ("settle", 0, 600),
                "--soak" => ("soak", 60, 1800),
                "--out" => {
                    out = PathBuf::from(value);
                    continue;
                }
                "--profile" => {
                    profile = Some(PathBuf::from(value));
                    continue;
                }
                "--only" => {
                    steps = value
                        .split(',')
                        .map(|name| {
                            Step::ALL
                                .into_iter()
                                .find(|s| s.name() == name)
                                .ok_or_else(|| anyhow!("--only: unknown step {name:?}\n{USAGE}"))
                        })
                        .collect::<Result<_>>()?;
                    only = true;
                    continue;
                }
                other => bail!("unknown option {other}\n{USAGE}"),
            };
            let n: u64 = value
                .parse()
                .with_context(|| format!("{flag} {value}: not a number"))?;
            ensure!(
                (lo..=hi).contains(&n),
                "{flag} must be between {lo} and {hi}"
            );
            set.insert(key, n);
        }
        // With --peer every measurement runs at least five times per path: shorter runs keep
        // the whole invocation within a few minutes.
        let with_peer = peer.is_some();
        let soak = set.get("soak").copied();
        if soak.is_some() && !only {
            steps.clear();
        }
        let get = |key: &str, alone: u64, peer: u64| {
            set.get(key)
                .copied()
                .unwrap_or(if with_peer { peer } else { alone })
        };
        let peer = match peer {
            None => None,
            Some(explicit) => Some(ztunnel_tests::peer::peer_bin_from(
                explicit.or_else(|| std::env::var_os("ZTUNNEL_PEER_BIN").map(PathBuf::from)),
            )?),
        };
        Ok(Self {
            rounds: get("rounds", 1, 5),
            iperf_seconds: get("iperf_seconds", 5, 3),
            rate: get("rate", 500, 500),
            latency_ms: get("latency_ms", 5000, 4000),
            connections: get("connections", 4, 4),
            conn_ms: get("conn_ms", 3000, 2000),
            concurrency: get("concurrency", 8, 8),
            hold: get("hold", 1000, 1000),
            settle: get("settle", 0, 0),
            steps,
            out,
            peer,
            profile,
            soak,
            mesh_fast_path,
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "rounds": self.rounds, "iperf_seconds": self.iperf_seconds, "rate": self.rate,
            "latency_ms": self.latency_ms, "connections": self.connections,
            "conn_ms": self.conn_ms, "concurrency": self.concurrency, "hold": self.hold, "settle_s": self.settle,
            "steps": self.steps.iter().map(|s| s.name()).collect::<Vec<_>>(),
            "peer": self.peer.as_ref().map(|p| p.display().to_string()),
            "profile": self.profile.as_ref().map(|p| p.display().to_string()),
            "soak_s": self.soak,
            "mesh_fast_path": self.mesh_fast_path,
        })
    }
}

/// One measurement of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Background CPU while no path carries anything.
    Idle,
    Memory,
    Throughput,
    Latency,
    Routing,
    ConnRate,
    /// Same-node throughput with the sk_msg fast path against plain loopback proxying.
    SameNode,
}

impl Step {
    const ALL: [Step; 7] = [
        Step::Idle,
        Step::Memory,
        Step::Throughput,
        Step::Latency,
        Step::Routing,
        Step::ConnRate,
        Step::SameNode,
    ];

    fn name(self) -> &'static str {
        match self {
            Step::Idle => "idle",
            Step::Memory => "memory",
            Step::Throughput => "throughput",
            Step::Latency => "latency",
            Step::Routing => "routing",
            Step::ConnRate => "conn-rate",
            Step::SameNode => "same-node",
        }
    }
}

/// A path between the client and the server pod: its namespace, and the nodes whose proxies
/// carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Way {
    /// No proxy: the baseline.
    Direct,
    /// Our node proxies.
    Mesh,
    /// Istio's ztunnel as both node proxies.
    Peer,
}

impl Way {
    /// The namespace (and JSON key) of the path.
    fn ns(self) -> &'static str {
        match self {
            Way::Direct => "direct",
            Way::Mesh => "mesh",
            Way::Peer => "peer",
        }
    }

    /// Client node and server node. The direct path runs where ours does; its proxies are a
    /// control (they carry nothing).
    fn nodes(self) -> [usize; 2] {
        match self {
            Way::Direct | Way::Mesh => [1, 2],
            Way::Peer => [3, 4],
        }
    }
}

/// Which way a figure is better, for reading the ratio.
#[derive(Clone, Copy)]
enum Better {
    Higher,
    Lower,
}

impl Better {
    fn as_str(self) -> &'static str {
        match self {
            Better::Higher => "higher",
            Better::Lower => "lower",
        }
    }
}

/// One line of the table: the same figure for every path, one value per round.
struct Row {
    key: &'static str,
    label: String,
    unit: &'static str,
    better: Better,
    values: BTreeMap<Way, Vec<f64>>,
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

impl Row {
    fn median(&self, way: Way) -> Option<f64> {
        self.values.get(&way).and_then(|v| median(v))
    }

    /// (max − min) / median of the rounds: 0.10 = the rounds spread over 10 % of the median.
    fn spread(&self, way: Way) -> Option<f64> {
        let v = self.values.get(&way)?;
        let m = self.median(way)?;
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        (v.len() > 1 && m != 0.0).then(|| (hi - lo) / m.abs())
    }

    fn ratio(&self, a: Way, b: Way) -> Option<f64> {
        match (self.median(a), self.median(b)) {
            (Some(x), Some(y)) if y != 0.0 => Some(x / y),
            _ => None,
        }
    }
}

/// The rows, in reading order: (key, label, unit, better).
const ROWS: [(&str, &str, &str, Better); 20] = [
    (
        "throughput_p1",
        "throughput, 1 stream",
        "Gbit/s",
        Better::Higher,
    ),
    (
        "throughput_p8",
        "throughput, 8 streams",
        "Gbit/s",
        Better::Higher,
    ),
    ("latency_p50", "HTTP latency p50", "µs", Better::Lower),
    ("latency_p99", "HTTP latency p99", "µs", Better::Lower),
    (
        "added_p50",
        "added latency p50 (path − direct)",
        "µs",
        Better::Lower,
    ),
    (
        "added_p99",
        "added latency p99 (path − direct)",
        "µs",
        Better::Lower,
    ),
    (
        "cpu_per_1k",
        "CPU-s per 1000 requests, both proxies",
        "s",
        Better::Lower,
    ),
    ("conn_rate", "new connections/s", "1/s", Better::Higher),
    (
        "cpu_per_conn",
        "CPU-ms per new connection, both proxies",
        "ms",
        Better::Lower,
    ),
    (
        "cpu_per_gib_p1",
        "CPU-s per GiB, 1 stream, both proxies",
        "s",
        Better::Lower,
    ),
    (
        "cpu_per_gib_p8",
        "CPU-s per GiB, 8 streams, both proxies",
        "s",
        Better::Lower,
    ),
    (
        "idle_cpu",
        "background CPU-s per 5 s idle, both proxies",
        "s",
        Better::Lower,
    ),
    ("rss_idle", "idle RSS, both proxies", "MiB", Better::Lower),
    (
        "rss_after",
        "RSS after the load steps, both proxies",
        "MiB",
        Better::Lower,
    ),
    (
        "rss_after_over_idle",
        "RSS after the load steps ÷ idle RSS",
        "",
        Better::Lower,
    ),
    (
        "rss_held",
        "RSS holding the connections, both",
        "MiB",
        Better::Lower,
    ),
    (
        "rss_per_conn",
        "RSS per held connection, both",
        "KiB",
        Better::Lower,
    ),
    (
        "rss_per_conn_client",
        "  of which the client node's proxy",
        "KiB",
        Better::Lower,
    ),
    (
        "rss_per_conn_server",
        "  of which the server node's proxy",
        "KiB",
        Better::Lower,
    ),
    (
        "fds_per_conn",
        "descriptors per held connection, both",
        "",
        Better::Lower,
    ),
];

/// Everything measured, and what went wrong.
struct Report {
    rows: Vec<Row>,
    /// Per step, per path: one raw result per round.
    details: BTreeMap<String, BTreeMap<String, Vec<Value>>>,
    problems: Vec<String>,
    /// The routing step's latencies (µs), by `plain_p50`, `routed_p50`, `plain_p99`,
    /// `routed_p99`: one per round.
    routing: BTreeMap<&'static str, Vec<f64>>,
    /// `--profile`: samples the mesh paths' proxies during their measurements.
    profiler: Option<Profiler>,
}

impl Report {
    fn new() -> Self {
        Self {
            routing: BTreeMap::new(),
            profiler: None,
            rows: ROWS
                .iter()
                .map(|(key, label, unit, better)| Row {
                    key,
                    label: (*label).to_owned(),
                    unit,
                    better: *better,
                    values: BTreeMap::new(),
                })
                .collect(),
            details: BTreeMap::new(),
            problems: Vec::new(),
        }
    }

    fn add(&mut self, key: &str, way: Way, value: f64) {
        if let Some(r) = self.rows.iter_mut().find(|r| r.key == key) {
            r.values.entry(way).or_default().push(value);
        }
    }

    fn detail(&mut self, step: &str, what: String, v: Value) {
        self.details
            .entry(step.to_owned())
            .or_default()
            .entry(what)
            .or_default()
            .push(v);
    }

    /// With `--profile`, starts sampling `way`'s proxies for `step` (the first time only; never
    /// the direct path, which has no proxy on it). A recording that cannot start is a problem
    /// of the run, not a reason to skip the measurement.
    fn profile(&mut self, step: &str, way: Way, pids: &[u32; 2]) -> Option<Recording> {
        if way == Way::Direct {
            return None;
        }
        let started = self
            .profiler
            .as_mut()?
            .start(&format!("{step}-{}", way.ns()), pids);
        started.unwrap_or_else(|e| {
            self.problem(&format!("profiling {step} on {}", way.ns()), &e);
            None
        })
    }

    /// Stops a recording started by [`Report::profile`].
    fn profiled(&mut self, recording: Option<Recording>) {
        if let Some(Err(e)) = recording.map(Recording::stop) {
            self.problem("perf record", &e);
        }
    }

    /// Records a failed measurement; the run goes on with the next one.
    fn problem(&mut self, what: &str, e: &anyhow::Error) {
        let text = format!("{what}: {e:#}");
        println!("   FAILED {text}");
        self.problems.push(text);
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let params = match Params::parse(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(&params) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--mesh-fast-path`: restarts the mesh path's two proxies (nodes 1 and 2) with the fast
/// path on and checks that both say so.
fn mesh_fast_path_on(c: &Cluster) -> Result<()> {
    for (node, pod) in [(1, "mesh/client"), (2, "mesh/server")] {
        c.stop_proxy(node)?;
        let mark = c.log_mark(node);
        c.start_proxy_with(node, &["--fast-path", "on"])?;
        c.wait_enrolled(node, mark, pod, WAIT)?;
        let on = same_node::fast_path_metric(c, node, "ztunnel_fast_path_enabled")?;
        ensure!(
            on == 1.0,
            "the fast path should be on on node{node} (gauge {on})"
        );
    }
    println!("   mesh: both proxies run with --fast-path on (opt-in; docs/capture.md)");
    Ok(())
}

/// With `--mesh-fast-path`: how many bytes and messages the mesh path's proxies redirected,
/// so the JSON shows the fast path carried the traffic.
fn mesh_fast_path_counters(c: &Cluster) -> Result<Value> {
    let mut nodes = serde_json::Map::new();
    const NAMES: [&str; 5] = [
        "ztunnel_fast_path_sockets_total",
        "ztunnel_fast_path_redirected_messages_total",
        "ztunnel_fast_path_redirected_bytes_total",
        "ztunnel_fast_path_tcp_messages_total",
        "ztunnel_fast_path_active_tcp_total",
    ];
    for node in [1, 2] {
        let values = same_node::fast_path_metrics(c, node, NAMES)?;
        let counters = NAMES
            .iter()
            .zip(values)
            .map(|(n, v)| ((*n).to_owned(), json!(v)));
        nodes.insert(format!("node{node}"), Value::Object(counters.collect()));
    }
    Ok(Value::Object(nodes))
}

fn heading(title: &str) {
    println!("\n\x1b[1m{title}\x1b[0m");
}

/// The cluster: direct and mesh pairs on nodes 1 → 2 (ours), and with the peer a peer pair on
/// nodes 3 → 4 (Istio's ztunnel on both); the same-node step's two nodes after those.
fn cluster(p: &Params) -> Result<(Cluster, Option<same_node::SameNode>)> {
    if let Some(bin) = &p.peer {
        // The harness finds the peer through the environment.
        std::env::set_var("ZTUNNEL_PEER_BIN", bin);
    }
    let mut b = Cluster::builder()
        .namespace("direct", &[])
        .namespace("mesh", &[AMBIENT])
        .pod(pod("direct", "client").node(1))
        .pod(pod("direct", "server").node(2))
        .pod(pod("mesh", "client").node(1))
        .pod(pod("mesh", "server").node(2).labels(&[("app", "server")]));
    // The same server behind two Services, one with a VirtualService: the routing step.
    for svc in [PLAIN_SERVICE, ROUTED_SERVICE] {
        b = b.service(
            service("mesh", svc)
                .selector(&[("app", "server")])
                .named_port("http", SERVICE_PORT, HTTP_PORT),
        );
    }
    b = match p.peer {
        None => b.nodes(2),
        Some(_) => b
            .nodes(4)
            .peer_node(3)
            .peer_node(4)
            .namespace("peer", &[AMBIENT])
            .pod(pod("peer", "client").node(3))
            .pod(pod("peer", "server").node(4)),
    };
    let mut same = None;
    if p.steps.contains(&Step::SameNode) {
        let first = if p.peer.is_some() { 5 } else { 3 };
        let (with, step) = same_node::SameNode::add(b, first);
        b = with;
        same = Some(step);
    }
    Ok((b.start()?, same))
}

/// Runs the whole benchmark; true if every measurement succeeded.
fn run(p: &Params) -> Result<bool> {
    let began = Instant::now();
    let unix_time = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    raise_nofile();
    let iperf = Command::new("iperf3").arg("--version").output();
    ensure!(
        iperf.is_ok_and(|o| o.status.success()),
        "iperf3 is not installed (`cargo xtask setup` installs it)"
    );
    let git = git_state();
    println!(
        "bench at {} ({} changed files in the work tree)",
        git["head"].as_str().unwrap_or("an unknown commit"),
        git["changed_files"]
    );
    let ways: Vec<Way> = match p.peer {
        None => vec![Way::Direct, Way::Mesh],
        Some(_) => vec![Way::Direct, Way::Mesh, Way::Peer],
    };
    heading(&match &p.peer {
        None => "Virtual cluster: 2 nodes; client pods on node1, server pods on node2".to_owned(),
        Some(bin) => format!(
            "Virtual cluster: 4 nodes; ours on node1 → node2, Istio's ztunnel ({}) on node3 → \
             node4",
            bin.display()
        ),
    });
    let (c, mut same) = cluster(p)?;
    c.wait_enrolled(1, 0, "mesh/client", WAIT)?;
    c.wait_enrolled(2, 0, "mesh/server", WAIT)?;
    if let Some(same) = &same {
        same.prepare(&c)?;
    }
    if p.mesh_fast_path {
        mesh_fast_path_on(&c)?;
    }
    let pids: BTreeMap<Way, [u32; 2]> = ways
        .iter()
        .map(|w| Ok((*w, proxy_pids(&c, *w)?)))
        .collect::<Result<_>>()?;
    let started: BTreeMap<Way, Sample> = pids
        .iter()
        .map(|(w, pids)| Ok((*w, sample(pids)?)))
        .collect::<Result<_>>()?;
    for way in &ways {
        let (client, server) = (c.pod(way.ns(), "client"), c.pod(way.ns(), "server"));
        println!(
            "   {:<6}  {} ({}, node{}) → {} ({}, node{})  {}",
            way.ns(),
            client.workload(),
            client.ip(),
            client.node(),
            server.workload(),
            server.ip(),
            server.node(),
            match way {
                Way::Direct => "namespace not enrolled: no proxy on the path",
                Way::Mesh => "ambient: our proxies",
                Way::Peer => "ambient: Istio's ztunnel",
            }
        );
    }
    let mut servers = Vec::new();
    for way in &ways {
        let server = c.pod(way.ns(), "server");
        let port = HTTP_PORT.to_string();
        let mut http = server.spawn_probe(&["http-server-ka", "--port", &port])?;
        http.wait_for_json(0, WAIT, |v| v["event"] == "listening")?;
        servers.push(http);
        servers.push(server.tcp_echo(ECHO_PORT)?);
    }
    let transport = check_paths(&c, &ways)?;
    println!(
        "   checked: direct traffic bypasses every proxy; each mesh path goes through both of its \
         proxies ({})",
        transport
            .iter()
            .map(|(w, t)| format!("{}: {t}", w.ns()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    c.apply("routed.yaml", Some(ROUTED_VS))?;
    std::thread::sleep(Duration::from_millis(500));
    let mut report = Report::new();
    if let Some(dir) = &p.profile {
        report.profiler = Some(Profiler::new(dir)?);
    }
    let mut warm = BTreeMap::new();
    for (way, pids) in &pids {
        let s = sample(pids)?;
        if *way != Way::Direct {
            report.add(
                "rss_idle",
                *way,
                s.rss_kib.iter().sum::<u64>() as f64 / 1024.0,
            );
        }
        warm.insert(*way, s);
    }
    record_rss_by_mapping(&pids, "warm_idle", &mut report);

    for round in 0..p.rounds {
        // Alternate which mesh path goes first, so a drift over the run favours neither.
        let mut order = ways.clone();
        if round % 2 == 1 {
            order[1..].reverse();
        }
        heading(&format!(
            "Round {} of {} ({})",
            round + 1,
            p.rounds,
            order.iter().map(|w| w.ns()).collect::<Vec<_>>().join(", ")
        ));
        for step in &p.steps {
            match step {
                Step::Idle => idle(&pids, &mut report),
                Step::Memory => memory(&c, p, &order, &pids, &mut report),
                Step::Throughput => throughput(&c, p, &order, &pids, &mut report),
                Step::Latency => latency(&c, p, &order, &pids, &mut report),
                Step::Routing => routing(&c, p, round, &mut report),
                Step::ConnRate => connection_rate(&c, p, &order, &pids, &mut report),
                Step::SameNode => {
                    if let Some(same) = &mut same {
                        same.measure(&c, p.iperf_seconds, round, &mut report.problems);
                    }
                }
            }
        }
    }

    let soaked = p.soak.map(|seconds| {
        let v = soak::run(&c, seconds, &ways, &pids);
        if let Ok(v) = &v {
            if v["paths"]["mesh"]["verdict"] != "flat" {
                report.problems.push(format!(
                    "soak: our proxies' RSS after idle is {} over the last cycles",
                    v["paths"]["mesh"]["verdict"]
                ));
            }
            for f in v["failures"].as_array().into_iter().flatten() {
                report
                    .problems
                    .push(format!("soak: {}", f.as_str().unwrap_or("?")));
            }
        }
        v
    });
    if let Some(Err(e)) = &soaked {
        report.problem("soak", e);
    }
    // What the proxies keep once the last load is over (and a trim it set off is done).
    std::thread::sleep(IDLE_SETTLE);
    let mut end = BTreeMap::new();
    for (way, pids) in &pids {
        match sample(pids) {
            Ok(s) => {
                if *way != Way::Direct {
                    let after = s.rss_kib.iter().sum::<u64>() as f64;
                    report.add("rss_after", *way, after / 1024.0);
                    if let Some(idle) = warm.get(way) {
                        let idle = idle.rss_kib.iter().sum::<u64>() as f64;
                        report.add("rss_after_over_idle", *way, after / idle);
                    }
                }
                end.insert(*way, s);
            }
            Err(e) => report.problem("sampling the proxies at the end", &e),
        }
    }
    record_rss_by_mapping(&pids, "after_all", &mut report);
    for i in 1..=c.node_count() {
        if !c.proxy_running(i) {
            report
                .problems
                .push(format!("the proxy of node{i} is no longer running"));
        }
    }
    let emfile: usize = (1..=c.node_count())
        .map(|i| count_emfile(&c.log_text(i)))
        .sum();
    if emfile > 0 {
        report.problems.push(format!(
            "the proxies logged {emfile} \"too many open files\" (EMFILE) errors during the run"
        ));
    }
    let fast_path = if p.mesh_fast_path {
        match mesh_fast_path_counters(&c) {
            Ok(v) => {
                if v["node1"]["ztunnel_fast_path_redirected_bytes_total"].as_f64() == Some(0.0) {
                    report
                        .problems
                        .push("--mesh-fast-path: node1 redirected no bytes".to_owned());
                }
                v
            }
            Err(e) => {
                report.problem("reading the mesh path's fast-path counters", &e);
                Value::Null
            }
        }
    } else {
        Value::Null
    };
    drop(servers);
    drop(c);

    print_table(p, &ways, &report, &started, &warm, &end, &transport);
    let proxies: BTreeMap<&str, Value> = ways
        .iter()
        .map(|w| {
            let s = |m: &BTreeMap<Way, Sample>| m.get(w).map_or(Value::Null, |s| s.to_json());
            (
                w.ns(),
                json!({"started": s(&started), "warm_idle": s(&warm), "after_all": s(&end)}),
            )
        })
        .collect();
    let mut details = serde_json::to_value(&report.details)?;
    details["proxies"] = json!(proxies);
    let mut out = json!({
        "unix_time": unix_time,
        "git": git,
        "host": {"cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
                 "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned())},
        "mesh_transport": transport.get(&Way::Mesh),
        "mesh_fast_path": fast_path,
        "params": p.to_json(),
        "rows": report.rows.iter().map(|r| {
            let mut row = json!({
                "key": r.key, "metric": r.label, "unit": r.unit, "better": r.better.as_str(),
                "direct": r.median(Way::Direct), "mesh": r.median(Way::Mesh),
                "mesh_over_direct": r.ratio(Way::Mesh, Way::Direct),
                "rounds": r.values.iter().map(|(w, v)| (w.ns().to_owned(), json!(v))).collect::<serde_json::Map<_, _>>(),
            });
            if p.peer.is_some() {
                row["peer"] = json!(r.median(Way::Peer));
                row["peer_over_direct"] = json!(r.ratio(Way::Peer, Way::Direct));
            }
            row
        }).collect::<Vec<_>>(),
        "details": details,
        "memory_goal": memory_goal(p, &report),
        "problems": report.problems,
        "elapsed_s": began.elapsed().as_secs_f64(),
    });
    let routing = routing_summary(&report);
    println!("\nper-request routing (mesh path, same run): {routing}");
    out["routing"] = routing;
    if let Some(same) = &same {
        same.print();
        out["same_node"] = same.to_json();
    }
    if let Some(Ok(v)) = soaked {
        out["soak"] = v;
    }
    if p.peer.is_some() {
        out["peer_transport"] = json!(transport.get(&Way::Peer));
        out["versus_peer"] = versus_peer(&report);
    }
    if let Some(profiler) = &report.profiler {
        println!("\nprofiles: folding and drawing the recordings");
        out["profile"] = profiler.render();
        println!("{}", serde_json::to_string_pretty(&out["profile"])?);
    }
    let written = write_json(&p.out, "bench", unix_time, &out)?;
    println!(
        "\nwrote {} (and latest.json beside it) in {:.0} s",
        written.display(),
        began.elapsed().as_secs_f64()
    );
    if !report.problems.is_empty() {
        println!("\nproblems:");
        for pr in &report.problems {
            println!("  - {pr}");
        }
    }
    Ok(report.problems.is_empty())
}

/// `versus_peer`: per metric, our median, the peer's, ours ÷ peer and which way is better.
fn versus_peer(report: &Report) -> Value {
    let mut v = serde_json::Map::new();
    for r in &report.rows {
        let (Some(ours), Some(peer)) = (r.median(Way::Mesh), r.median(Way::Peer)) else {
            continue;
        };
        let rounds = r.values.get(&Way::Mesh).map_or(0, Vec::len);
        v.insert(
            r.key.to_owned(),
            json!({
                "ours": ours, "peer": peer,
                "ratio": (peer != 0.0).then(|| ours / peer),
                "better": r.better.as_str(), "rounds": rounds, "unit": r.unit,
                "ours_spread": r.spread(Way::Mesh), "peer_spread": r.spread(Way::Peer),
                "ours_over_direct": r.ratio(Way::Mesh, Way::Direct),
                "peer_over_direct": r.ratio(Way::Peer, Way::Direct),
            }),
        );
    }
    Value::Object(v)
}

/// How long the idle step watches the proxies carry nothing (reported per [`IDLE_PER`]).
const IDLE_WINDOW: Duration = Duration::from_secs(10);
const IDLE_PER: Duration = Duration::from_secs(5);
/// What the last load may still be finishing (a trim, a connection's close) before the window.
const IDLE_SETTLE: Duration = Duration::from_secs(2);

/// Background CPU: every mesh path's proxies over the same window with no traffic anywhere,
/// so the paths are compared on equal terms (one clock tick, 10 ms, per proxy resolution).
fn idle(pids: &BTreeMap<Way, [u32; 2]>, report: &mut Report) {
    println!("   idle: {} s with no traffic", IDLE_WINDOW.as_secs());
    std::thread::sleep(IDLE_SETTLE);
    let cpu = |pids: &[u32; 2]| sample(pids).map(|s| s.cpu_s.iter().sum::<f64>());
    let ways: Vec<(Way, [u32; 2])> = pids
        .iter()
        .filter(|(w, _)| **w != Way::Direct)
        .map(|(w, p)| (*w, *p))
        .collect();
    let before: Vec<Result<f64>> = ways.iter().map(|(_, p)| cpu(p)).collect();
    std::thread::sleep(IDLE_WINDOW);
    for ((way, p), before) in ways.iter().zip(before) {
        match before.and_then(|b| Ok(cpu(p)? - b)) {
            Ok(used) => {
                let per = used * IDLE_PER.as_secs_f64() / IDLE_WINDOW.as_secs_f64();
                println!("   {:<6} {per:.3} CPU-s per 5 s", way.ns());
                report.add("idle_cpu", *way, per);
                report.detail(
                    "idle",
                    way.ns().to_owned(),
                    json!({"cpu_s": used,
                    "window_s": IDLE_WINDOW.as_secs_f64()}),
                );
            }
            Err(e) => report.problem(&format!("idle CPU on {}", way.ns()), &e),
        }
    }
}

/// Where each proxy's RSS is at `when` (`details.rss_by_mapping`, docs/benchmarks.md), printed
/// for the idle proxies.
fn record_rss_by_mapping(pids: &BTreeMap<Way, [u32; 2]>, when: &str, report: &mut Report) {
    for (way, pids) in pids.iter().filter(|(w, _)| **w != Way::Direct) {
        let by_node: Result<Vec<Value>> = pids.iter().map(|pid| rss_by_mapping(*pid)).collect();
        match by_node {
            Ok(v) => {
                if when == "warm_idle" {
                    let kib = |k: &str| -> String {
                        let sum: u64 = v.iter().filter_map(|n| n[k].as_u64()).sum();
                        format!("{k} {:.1}", sum as f64 / 1024.0)
                    };
                    println!(
                        "   {:<6}  idle RSS of both proxies, MiB: {}",
                        way.ns(),
                        ["text", "rodata", "data", "heap", "anon", "libs", "rss"]
                            .map(kib)
                            .join(", ")
                    );
                }
                report.detail(
                    "rss_by_mapping",
                    way.ns().to_owned(),
                    json!({"when": when, "client_node": v[0], "server_node": v[1]}),
                );
            }
            Err(e) => report.problem(&format!("{}: reading smaps ({when})", way.ns()), &e),
        }
    }
}

fn proxy_pids(c: &Cluster, way: Way) -> Result<[u32; 2]> {
    let pid = |i: usize| {
        c.proxy_pid(i)
            .ok_or_else(|| anyhow!("the proxy of node {i} is not running"))
    };
    let [a, b] = way.nodes();
    Ok([pid(a)?, pid(b)?])
}

/// True if node `i`'s proxy logged a connection in `direction` after `mark` (our log schema,
/// or the peer's access log).
fn logged(c: &Cluster, i: usize, mark: usize, direction: &str) -> Option<Value> {
    c.logs_since(i, mark).into_iter().find(|l| {
        l["direction"] == direction
            && (l["message"] == "connection closed" || l["message"] == "connection complete")
    })
}

/// Sends one request on each path and checks, in the proxies' logs, that `direct` bypassed
/// every proxy and each mesh path went through both of its proxies. Returns how each mesh path
/// crossed between its nodes.
fn check_paths(c: &Cluster, ways: &[Way]) -> Result<BTreeMap<Way, String>> {
    let mut transport = BTreeMap::new();
    for way in ways {
        let nodes: Vec<usize> = (1..=c.node_count()).collect();
        let marks: Vec<usize> = nodes.iter().map(|i| c.log_mark(*i)).collect();
        let server = c.pod(way.ns(), "server");
        let addr = format!("{}:{HTTP_PORT}", server.ip());
        let out = c.pod(way.ns(), "client").probe(&["get", "--addr", &addr])?;
        ensure!(
            out.code == Some(0),
            "{}: GET {addr} failed: {}{}",
            way.ns(),
            out.stdout,
            out.stderr
        );
        if *way == Way::Direct {
            std::thread::sleep(Duration::from_millis(500));
            for (i, mark) in nodes.iter().zip(&marks) {
                ensure!(
                    logged(c, *i, *mark, "outbound").is_none()
                        && logged(c, *i, *mark, "inbound").is_none(),
                    "direct traffic went through node{i}'s proxy: the baseline would be wrong"
                );
            }
            continue;
        }
        let [from, to] = way.nodes();
        wait_until(WAIT, "the client node's proxy to log the request", || {
            logged(c, from, marks[from - 1], "outbound")
        })?;
        let inbound = wait_until(WAIT, "the server node's proxy to log the request", || {
            logged(c, to, marks[to - 1], "inbound")
        })?;
        let hbone = inbound["hbone"] == true
            || inbound["dst.addr"]
                .as_str()
                .is_some_and(|a| a.ends_with(":15008"));
        transport.insert(
            *way,
            if hbone { "HBONE (mTLS)" } else { "plaintext" }.to_owned(),
        );
    }
    Ok(transport)
}

// ---- proxy memory and CPU ---------------------------------------------------------------

/// RSS, open descriptors and CPU time of a path's two proxies at one moment.
#[derive(Clone, Copy)]
struct Sample {
    rss_kib: [u64; 2],
    fds: [u64; 2],
    /// utime + stime, seconds.
    cpu_s: [f64; 2],
}

impl Sample {
    fn to_json(self) -> Value {
        json!({"client_node": {"rss_kib": self.rss_kib[0], "fds": self.fds[0], "cpu_s": self.cpu_s[0]},
               "server_node": {"rss_kib": self.rss_kib[1], "fds": self.fds[1], "cpu_s": self.cpu_s[1]}})
    }
}

/// utime + stime of every thread of `pid`, in seconds (/proc/<pid>/stat fields 14 and 15).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state): utime is field 14, stime field 15.
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("no field {i} in /proc/{pid}/stat"))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(14)? + ticks(15)?) / hz)
}

const GIB: f64 = (1u64 << 30) as f64;

/// utime + stime of both proxies of a path, in seconds (`None` if one is gone).
fn proxies_cpu(pids: &[u32; 2]) -> Option<f64> {
    Some(cpu_seconds(pids[0]).ok()? + cpu_seconds(pids[1]).ok()?)
}

fn sample(pids: &[u32; 2]) -> Result<Sample> {
    let mut s = Sample {
        rss_kib: [0; 2],
        fds: [0; 2],
        cpu_s: [0.0; 2],
    };
    for (i, pid) in pids.iter().enumerate() {
        s.rss_kib[i] = vm_rss_kib(*pid)?;
        s.fds[i] = fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
        s.cpu_s[i] = cpu_seconds(*pid)?;
    }
    Ok(s)
}

fn count_emfile(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("Too many open files") || l.contains("os error 24"))
        .count()
}

/// Proxy memory while the client pod holds `p.hold` idle connections to the echo server, on
/// every path (on the direct path the proxies are not involved: a control).
fn memory(
    c: &Cluster,
    p: &Params,
    order: &[Way],
    pids: &BTreeMap<Way, [u32; 2]>,
    report: &mut Report,
) {
    println!(
        "   memory: {} idle connections held open, client → server",
        p.hold
    );
    for way in order {
        match hold_once(c, p, &pids[way], *way) {
            Ok(v) => {
                let sum =
                    |key: &str| -> f64 { (0..2).map(|i| v[key][i].as_f64().unwrap_or(0.0)).sum() };
                let opened = v["opened"].as_u64().unwrap_or(0);
                if opened == p.hold {
                    let held: u64 = (0..2)
                        .map(|i| v["held"]["rss_kib"][i].as_u64().unwrap_or(0))
                        .sum();
                    report.add("rss_held", *way, held as f64 / 1024.0);
                    report.add("rss_per_conn", *way, sum("rss_kib_per_conn"));
                    let per_proxy = |i: usize| v["rss_kib_per_conn"][i].as_f64().unwrap_or(0.0);
                    report.add("rss_per_conn_client", *way, per_proxy(0));
                    report.add("rss_per_conn_server", *way, per_proxy(1));
                    report.add("fds_per_conn", *way, sum("fds_per_conn"));
                } else {
                    report.problems.push(format!(
                        "{}: only {opened} of {} connections opened (first error: {}){}",
                        way.ns(),
                        p.hold,
                        v["first_error"],
                        if v["emfile_logged"].as_u64().unwrap_or(0) > 0 {
                            "; the proxies logged EMFILE (too many open files)"
                        } else {
                            ""
                        }
                    ));
                }
                report.detail("hold", way.ns().to_owned(), v);
            }
            Err(e) => report.problem(&format!("{} hold", way.ns()), &e),
        }
    }
}

fn hold_once(c: &Cluster, p: &Params, pids: &[u32; 2], way: Way) -> Result<Value> {
    let nodes = way.nodes();
    let emfile = || -> usize { nodes.iter().map(|i| count_emfile(&c.log_text(*i))).sum() };
    let emfile_before = emfile();
    let before = sample(pids)?;
    let addr = format!("{}:{ECHO_PORT}", c.pod(way.ns(), "server").ip());
    let count = p.hold.to_string();
    // Held until this function kills it; the hold time is only a bound.
    let mut client = c.pod(way.ns(), "client").spawn_probe(&[
        "hold",
        "--addr",
        &addr,
        "--count",
        &count,
        "--hold-ms",
        "60000",
    ])?;
    let opened = client.wait_for_json(0, Duration::from_secs(45), |v| v["event"] == "opened")?;
    std::thread::sleep(Duration::from_millis(500));
    let held = sample(pids)?;
    client.kill();
    drop(client);
    let settled = settle(pids, &before);
    // The direct path's control has no pool to watch.
    let after_close = match p.settle {
        s if s > 0 && way != Way::Direct => {
            watch_after_hold(pids, &before, Duration::from_secs(s), way)
        }
        _ => Value::Null,
    };
    let emfile = emfile() - emfile_before;
    let n = opened["opened"].as_u64().unwrap_or(0);
    let per_conn = |i: usize| -> Value {
        if n == 0 {
            return Value::Null;
        }
        let kib = held.rss_kib[i] as f64 - before.rss_kib[i] as f64;
        json!((kib / n as f64 * 10.0).round() / 10.0)
    };
    let fds_per_conn = |i: usize| -> Value {
        if n == 0 {
            return Value::Null;
        }
        json!(((held.fds[i] as f64 - before.fds[i] as f64) / n as f64 * 100.0).round() / 100.0)
    };
    let v = json!({
        "opened": n, "errors": opened["errors"], "first_error": opened["first_error"],
        "open_ms": opened["open_ms"],
        "before": {"rss_kib": before.rss_kib, "fds": before.fds},
        "held": {"rss_kib": held.rss_kib, "fds": held.fds},
        "rss_kib_per_conn": [per_conn(0), per_conn(1)],
        "fds_per_conn": [fds_per_conn(0), fds_per_conn(1)],
        "settled_after_close": settled,
        "after_close": after_close,
        "emfile_logged": emfile,
    });
    println!(
        "   {:<6}  {n} opened in {} ms; RSS {} → {} KiB, {} → {} KiB; fds {} → {}, {} → {}",
        way.ns(),
        opened["open_ms"],
        before.rss_kib[0],
        held.rss_kib[0],
        before.rss_kib[1],
        held.rss_kib[1],
        before.fds[0],
        held.fds[0],
        before.fds[1],
        held.fds[1],
    );
    Ok(v)
}

/// `--settle`: samples the path's proxies every second for `length` after a hold ended (and its
/// descriptors settled). The burst leaves the client's pooled HBONE connections (100 streams
/// each) open until the pool's idle expiry; the series shows what they keep and when it goes.
fn watch_after_hold(pids: &[u32; 2], before: &Sample, length: Duration, way: Way) -> Value {
    let began = Instant::now();
    let mut series = Vec::new();
    let mut fds_back_s = None;
    let mut printed = 0;
    while began.elapsed() < length {
        let Ok(s) = sample(pids) else { break };
        let t = began.elapsed().as_secs_f64();
        series.push(json!([
            (t * 10.0).round() / 10.0,
            s.rss_kib[0],
            s.rss_kib[1],
            s.fds[0],
            s.fds[1]
        ]));
        if fds_back_s.is_none() && (0..2).all(|i| s.fds[i] <= before.fds[i] + 2) {
            fds_back_s = Some(t);
        }
        if t as u64 >= printed {
            println!(
                "   {:<6}  +{t:>4.0} s after the hold: RSS {} / {} KiB (idle before {} / {}), fds {} / {} (before {} / {})",
                way.ns(),
                s.rss_kib[0],
                s.rss_kib[1],
                before.rss_kib[0],
                before.rss_kib[1],
                s.fds[0],
                s.fds[1],
                before.fds[0],
                before.fds[1],
            );
            printed += 15;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let last = series.last().cloned().unwrap_or(Value::Null);
    json!({
        "series_t_s_rss_kib_fds": series,
        "fds_back_within_2_at_s": fds_back_s,
        "last": last,
    })
}

/// Waits (at most 15 s) until the proxies have let go of the closed connections' descriptors.
fn settle(pids: &[u32; 2], before: &Sample) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        match sample(pids) {
            Ok(s) if (0..2).all(|i| s.fds[i] <= before.fds[i] + 8) => return true,
            Ok(_) => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => return false,
        }
    }
    false
}

// ---- throughput -------------------------------------------------------------------------

fn throughput(
    c: &Cluster,
    p: &Params,
    order: &[Way],
    pids: &BTreeMap<Way, [u32; 2]>,
    report: &mut Report,
) {
    println!("   throughput: iperf3, {} s per run", p.iperf_seconds);
    let mut servers: Vec<Proc> = Vec::new();
    for way in order {
        match iperf_server(&c.pod(way.ns(), "server")) {
            Ok(s) => servers.push(s),
            Err(e) => return report.problem(&format!("{}: starting iperf3 -s", way.ns()), &e),
        }
    }
    for streams in [1u32, 8] {
        let key = if streams == 1 {
            "throughput_p1"
        } else {
            "throughput_p8"
        };
        for way in order {
            let recording = report.profile(&format!("throughput{streams}"), *way, &pids[way]);
            let cpu_before = proxies_cpu(&pids[way]);
            let result = iperf_client(c, p, *way, streams);
            let cpu = cpu_before.and_then(|b| Some(proxies_cpu(&pids[way])? - b));
            report.profiled(recording);
            match result {
                Ok(mut v) => {
                    let gbps = v["received_bps"].as_f64().unwrap_or(0.0) / 1e9;
                    let gib = gbps * 1e9 * v["seconds"].as_f64().unwrap_or(0.0) / 8.0 / GIB;
                    let per_gib = cpu.filter(|_| gib > 0.0).map(|s| s / gib);
                    v["proxies_cpu_s"] = json!(cpu);
                    println!(
                        "   {:<6}  -P {streams}: {gbps:.2} Gbit/s received, {} retransmits; proxies' CPU {}",
                        way.ns(),
                        v["retransmits"],
                        per_gib.map_or("—".to_owned(), |x| format!("{x:.3} s per GiB")),
                    );
                    report.add(key, *way, gbps);
                    if let Some(x) = per_gib {
                        report.add(&format!("cpu_per_gib_p{streams}"), *way, x);
                    }
                    report.detail("throughput", format!("{}_p{streams}", way.ns()), v);
                }
                Err(e) => report.problem(&format!("{} iperf3 -P {streams}", way.ns()), &e),
            }
        }
    }
}

fn iperf_server(server: &PodRef<'_>) -> Result<Proc> {
    let port = IPERF_PORT.to_string();
    let iperf = server.spawn(&["iperf3", "-s", "-p", &port, "--forceflush"])?;
    wait_until(WAIT, "iperf3 -s to listen", || {
        iperf
            .lines()
            .iter()
            .any(|l| l.contains("Server listening"))
            .then_some(())
    })?;
    Ok(iperf)
}

/// An `iperf3 -J` client's report and the bits per second it received.
fn iperf_report(out: &std::process::Output) -> Result<(Value, f64)> {
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("no end.sum_received.bits_per_second in iperf3's report"))?;
    Ok((v, bps))
}

fn iperf_client(c: &Cluster, p: &Params, way: Way, streams: u32) -> Result<Value> {
    let ip = c.pod(way.ns(), "server").ip().to_string();
    let (port, secs, streams_s) = (
        IPERF_PORT.to_string(),
        p.iperf_seconds.to_string(),
        streams.to_string(),
    );
    let out = c.pod(way.ns(), "client").run(
        &[
            "iperf3", "-c", &ip, "-p", &port, "-t", &secs, "-P", &streams_s, "-J",
        ],
        Duration::from_secs(p.iperf_seconds + 25),
    )?;
    let (v, bps) = iperf_report(&out)?;
    Ok(json!({
        "received_bps": bps,
        "sent_bps": v["end"]["sum_sent"]["bits_per_second"],
        "retransmits": v["end"]["sum_sent"]["retransmits"],
        "seconds": v["end"]["sum_received"]["seconds"],
    }))
}

// ---- latency, CPU and connection rate ---------------------------------------------------

/// Runs `vc-probe <args>` in a pod and returns its last JSON line (whatever its exit code).
fn probe_json(pod: &PodRef<'_>, args: &[&str], timeout: Duration) -> Result<Value> {
    let bin = ztunnel_tests::probe_bin_checked()?;
    let bin = bin.to_string_lossy();
    let mut all = vec![bin.as_ref()];
    all.extend_from_slice(args);
    let out = pod.run(&all, timeout)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| {
            anyhow!(
                "vc-probe {} printed no JSON ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// `vc-probe http-load` from `client` to `addr` with the latency test's parameters.
fn http_load(client: &PodRef<'_>, p: &Params, addr: &str) -> Result<Value> {
    let (rate, ms, conns) = (
        p.rate.to_string(),
        p.latency_ms.to_string(),
        p.connections.to_string(),
    );
    let args = [
        "http-load",
        "--addr",
        addr,
        "--rate",
        &rate,
        "--duration-ms",
        &ms,
        "--connections",
        &conns,
    ];
    probe_json(client, &args, Duration::from_millis(p.latency_ms + 20_000))
}

/// Latency of small HTTP/1.1 GETs at a fixed rate, and what the path's proxies spent on them
/// (utime + stime of both, read from /proc before and after).
fn latency(
    c: &Cluster,
    p: &Params,
    order: &[Way],
    pids: &BTreeMap<Way, [u32; 2]>,
    report: &mut Report,
) {
    println!(
        "   latency: small HTTP/1.1 GETs, {} req/s for {} ms over {} keep-alive connections (open loop)",
        p.rate, p.latency_ms, p.connections
    );
    let mut direct: Option<(f64, f64)> = None;
    // The direct figures of this round come first in `order`.
    for way in order {
        let addr = format!("{}:{HTTP_PORT}", c.pod(way.ns(), "server").ip());
        let recording = report.profile("latency", *way, &pids[way]);
        let cpu_before = proxies_cpu(&pids[way]);
        let result = http_load(&c.pod(way.ns(), "client"), p, &addr);
        let cpu = cpu_before.and_then(|b| Some(proxies_cpu(&pids[way])? - b));
        report.profiled(recording);
        match result {
            Ok(mut v) => {
                let requests = v["requests"].as_u64().unwrap_or(0);
                let per_1k = cpu
                    .filter(|_| requests > 0)
                    .map(|s| s / requests as f64 * 1000.0);
                v["proxies_cpu_s"] = json!(cpu);
                println!(
                    "   {:<6}  {} requests, {} errors: p50 {} µs, p90 {} µs, p99 {} µs, max {} µs; proxies' CPU {}",
                    way.ns(), v["requests"], v["errors"], v["p50_us"], v["p90_us"], v["p99_us"], v["max_us"],
                    per_1k.map_or("—".to_owned(), |x| format!("{x:.3} s per 1000 requests")),
                );
                if v["errors"].as_u64() != Some(0) || requests == 0 {
                    report.problems.push(format!(
                        "{} latency: {} errors (first: {})",
                        way.ns(),
                        v["errors"],
                        v["first_error"]
                    ));
                }
                if let Some(x) = per_1k {
                    report.add("cpu_per_1k", *way, x);
                }
                if let (Some(p50), Some(p99)) = (v["p50_us"].as_f64(), v["p99_us"].as_f64()) {
                    report.add("latency_p50", *way, p50);
                    report.add("latency_p99", *way, p99);
                    match (way, direct) {
                        (Way::Direct, _) => direct = Some((p50, p99)),
                        (_, Some((d50, d99))) => {
                            report.add("added_p50", *way, p50 - d50);
                            report.add("added_p99", *way, p99 - d99);
                        }
                        (_, None) => {}
                    }
                }
                report.detail("latency", way.ns().to_owned(), v);
            }
            Err(e) => report.problem(&format!("{} http-load", way.ns()), &e),
        }
    }
}

/// What a VirtualService on the path costs: the latency test's load on the mesh path to the
/// same server through a Service without rules (connections carried whole) and one with a
/// VirtualService (each request parsed, decided and routed by the client's node proxy), in
/// alternating order round by round.
fn routing(c: &Cluster, p: &Params, round: u64, report: &mut Report) {
    let mut order = [(PLAIN_SERVICE, "plain"), (ROUTED_SERVICE, "routed")];
    if round % 2 == 1 {
        order.reverse();
    }
    for (svc, name) in order {
        let addr = format!("{}:{SERVICE_PORT}", c.service_vip("mesh", svc));
        match http_load(&c.pod("mesh", "client"), p, &addr) {
            Ok(v) => {
                println!(
                    "   routing {name:<6} {} requests, {} errors: p50 {} µs, p99 {} µs",
                    v["requests"], v["errors"], v["p50_us"], v["p99_us"]
                );
                if v["errors"].as_u64() != Some(0) {
                    report
                        .problems
                        .push(format!("routing {name}: {} errors", v["errors"]));
                }
                let (p50, p99) = match name {
                    "plain" => ("plain_p50", "plain_p99"),
                    _ => ("routed_p50", "routed_p99"),
                };
                for (key, field) in [(p50, "p50_us"), (p99, "p99_us")] {
                    if let Some(x) = v[field].as_f64() {
                        report.routing.entry(key).or_default().push(x);
                    }
                }
                report.detail("routing", name.to_owned(), v);
            }
            Err(e) => report.problem(&format!("routing {name} http-load"), &e),
        }
    }
}

/// The routing step's medians and the ratios routed ÷ plain.
fn routing_summary(report: &Report) -> Value {
    let m = |k: &str| report.routing.get(k).and_then(|v| median(v));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    json!({
        "plain_p50_us": m("plain_p50"), "routed_p50_us": m("routed_p50"),
        "plain_p99_us": m("plain_p99"), "routed_p99_us": m("routed_p99"),
        "routed_over_plain_p50": ratio(m("routed_p50"), m("plain_p50")),
        "routed_over_plain_p99": ratio(m("routed_p99"), m("plain_p99")),
    })
}

fn connection_rate(
    c: &Cluster,
    p: &Params,
    order: &[Way],
    pids: &BTreeMap<Way, [u32; 2]>,
    report: &mut Report,
) {
    println!(
        "   new connections: connect, GET, read to EOF, close; {} loops for {} ms",
        p.concurrency, p.conn_ms
    );
    for way in order {
        let addr = format!("{}:{HTTP_PORT}", c.pod(way.ns(), "server").ip());
        let (ms, n) = (p.conn_ms.to_string(), p.concurrency.to_string());
        let args = [
            "conn-rate",
            "--addr",
            &addr,
            "--duration-ms",
            &ms,
            "--concurrency",
            &n,
        ];
        let timeout = Duration::from_millis(p.conn_ms + 20_000);
        let recording = report.profile("conn-rate", *way, &pids[way]);
        let cpu_before = proxies_cpu(&pids[way]);
        let result = probe_json(&c.pod(way.ns(), "client"), &args, timeout);
        report.profiled(recording);
        // Let the proxies log and release the closed connections before the next run; what
        // that costs them is the connections' too.
        std::thread::sleep(Duration::from_millis(500));
        let cpu = cpu_before.and_then(|b| Some(proxies_cpu(&pids[way])? - b));
        match result {
            Ok(mut v) => {
                let conns = v["connections"].as_f64().unwrap_or(0.0);
                let per_conn = cpu.filter(|_| conns > 0.0).map(|s| s / conns * 1000.0);
                v["proxies_cpu_s"] = json!(cpu);
                println!(
                    "   {:<6}  {} connections, {} errors: {:.0}/s (each: p50 {} µs, p99 {} µs); proxies' CPU {}",
                    way.ns(),
                    v["connections"],
                    v["errors"],
                    v["per_second"].as_f64().unwrap_or(0.0),
                    v["p50_us"],
                    v["p99_us"],
                    per_conn.map_or("—".to_owned(), |x| format!("{x:.3} ms per connection")),
                );
                if let Some(x) = per_conn {
                    report.add("cpu_per_conn", *way, x);
                }
                if v["errors"].as_u64() != Some(0) {
                    report.problems.push(format!(
                        "{} connection rate: {} errors (first: {})",
                        way.ns(),
                        v["errors"],
                        v["first_error"]
                    ));
                }
                if let Some(rate) = v["per_second"].as_f64() {
                    report.add("conn_rate", *way, rate);
                }
                report.detail("conn_rate", way.ns().to_owned(), v);
            }
            Err(e) => report.problem(&format!("{} conn-rate", way.ns()), &e),
        }
    }
}

// ---- output -------------------------------------------------------------------------------

fn fmt_value(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "—".into(),
        Some(x) if unit == "Gbit/s" => format!("{x:.2}"),
        Some(x) if unit == "MiB" || unit == "KiB" => format!("{x:.1}"),
        Some(x) if unit == "s" || unit.is_empty() => format!("{x:.3}"),
        Some(x) => format!("{x:.0}"),
    }
}

fn fmt_ratio(v: Option<f64>) -> String {
    v.map_or("—".into(), |x| format!("{x:.2}"))
}

fn fmt_spread(v: Option<f64>) -> String {
    v.map_or("—".into(), |x| format!("{:.0}%", x * 100.0))
}

fn print_table(
    p: &Params,
    ways: &[Way],
    report: &Report,
    started: &BTreeMap<Way, Sample>,
    warm: &BTreeMap<Way, Sample>,
    end: &BTreeMap<Way, Sample>,
    transport: &BTreeMap<Way, String>,
) {
    let peer = ways.contains(&Way::Peer);
    heading(&format!(
        "Results: medians of {} round{} (mesh: {})",
        p.rounds,
        if p.rounds == 1 { "" } else { "s" },
        transport
            .iter()
            .map(|(w, t)| format!("{} {t}", w.ns()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if peer {
        println!(
            "   {:<46} {:>8} {:>8} {:>8} {:>11} {:>11} {:>9} {:>13}",
            "metric",
            "direct",
            "ours",
            "peer",
            "ours/direct",
            "peer/direct",
            "ours/peer",
            "spread o/p"
        );
        println!("   {}", "─".repeat(122));
    } else {
        println!(
            "   {:<46} {:>9} {:>9} {:>12} {:>8}",
            "metric", "direct", "mesh", "mesh/direct", "spread"
        );
        println!("   {}", "─".repeat(88));
    }
    for r in &report.rows {
        let label = if r.unit.is_empty() {
            r.label.clone()
        } else {
            format!("{} ({})", r.label, r.unit)
        };
        let hint = match r.better {
            Better::Higher => "higher is better",
            Better::Lower => "lower is better",
        };
        let direct = r.median(Way::Direct);
        if peer {
            println!(
                "   {:<46} {:>8} {:>8} {:>8} {:>11} {:>11} {:>9} {:>13}   ({hint})",
                label,
                fmt_value(direct, r.unit),
                fmt_value(r.median(Way::Mesh), r.unit),
                fmt_value(r.median(Way::Peer), r.unit),
                fmt_ratio(r.ratio(Way::Mesh, Way::Direct)),
                fmt_ratio(r.ratio(Way::Peer, Way::Direct)),
                fmt_ratio(r.ratio(Way::Mesh, Way::Peer)),
                format!(
                    "{}/{}",
                    fmt_spread(r.spread(Way::Mesh)),
                    fmt_spread(r.spread(Way::Peer))
                ),
            );
        } else {
            println!(
                "   {:<46} {:>9} {:>9} {:>12} {:>8}   ({hint})",
                label,
                fmt_value(direct, r.unit),
                fmt_value(r.median(Way::Mesh), r.unit),
                fmt_ratio(r.ratio(Way::Mesh, Way::Direct)),
                fmt_spread(r.spread(Way::Mesh)),
            );
        }
    }
    println!("\n   proxy memory (VmRSS)                        client node  server node");
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    for way in ways.iter().filter(|w| **w != Way::Direct) {
        let line = |label: &str, s: Option<&Sample>| {
            if let Some(s) = s {
                println!(
                    "   {:<44} {:>12} {:>12}",
                    format!("{} {label}", way.ns()),
                    mib(s.rss_kib[0]),
                    mib(s.rss_kib[1])
                );
            }
        };
        line("after start", started.get(way));
        line("idle, after one request each way", warm.get(way));
        line("after every test", end.get(way));
    }
    println!(
        "\n   ratios divide medians of this run: throughput and connections/s below 1 are the \
         mesh's cost, latency, CPU and memory above 1 are{}. Spread = (max − min) / median over \
         the rounds. {} held connections; see docs/benchmarks.md.",
        if peer {
            "; ours/peer is better for us above 1 on higher-is-better rows, below 1 on the others"
        } else {
            ""
        },
        p.hold
    );
    print_memory_goal(&memory_goal(p, report));
}

/// The memory target (issue 14): each of the mesh path's two proxies holds at most this much
/// per idle connection while the client pod holds [`GOAL_HOLD`] of them.
const GOAL_KIB_PER_PROXY: f64 = 4.0;
const GOAL_HOLD: u64 = 10_000;

/// The memory target against this run's medians on our mesh path; `met` is null when the memory
/// step did not run (or failed), and only counts at [`GOAL_HOLD`] held connections or more.
fn memory_goal(p: &Params, report: &Report) -> Value {
    let median = |key: &str| {
        report
            .rows
            .iter()
            .find(|r| r.key == key)
            .and_then(|r| r.median(Way::Mesh))
    };
    let (client, server) = (median("rss_per_conn_client"), median("rss_per_conn_server"));
    let within = match (client, server) {
        (Some(c), Some(s)) => Some(c <= GOAL_KIB_PER_PROXY && s <= GOAL_KIB_PER_PROXY),
        _ => None,
    };
    json!({
        "limit_kib_per_proxy": GOAL_KIB_PER_PROXY, "goal_held": GOAL_HOLD, "held": p.hold,
        "client_kib": client, "server_kib": server, "within_limit": within,
        "met": within.map(|w| w && p.hold >= GOAL_HOLD),
    })
}

fn print_memory_goal(goal: &Value) {
    let (Some(client), Some(server)) = (goal["client_kib"].as_f64(), goal["server_kib"].as_f64())
    else {
        return;
    };
    let held = goal["held"].as_u64().unwrap_or(0);
    let verdict = match (goal["met"].as_bool(), goal["within_limit"].as_bool()) {
        (Some(true), _) => "MET".to_owned(),
        (_, Some(true)) => format!(
            "within the limit, but at {held} held connections: the goal counts at {GOAL_HOLD} \
             (--hold {GOAL_HOLD})"
        ),
        _ => "NOT MET".to_owned(),
    };
    println!(
        "\n   memory goal: ≤ {GOAL_KIB_PER_PROXY} KiB per held connection per proxy at {GOAL_HOLD} \
         held; mesh at {held}: client node {client:.1} KiB, server node {server:.1} KiB: {verdict}"
    );
}

/// Raises the soft open-files limit to the hard one; every pod process and proxy inherits it
/// (the servers hold a descriptor per connection).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
