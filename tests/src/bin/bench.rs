//! `cargo xtask bench`: what the mesh costs, measured on a virtual two-node cluster.
//!
//! Every figure is measured twice in the same run, on the same topology (client pod on node1,
//! server pod on node2): once between the pods of namespace `direct` (not enrolled: no proxy
//! on the path) and once between those of namespace `mesh` (ambient: both node proxies on the
//! path), and reported as mesh/direct. Measurements run one after another, never together.
//! The run is bounded: about a minute with the defaults. See docs/benchmarks.md.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use serde_json::{json, Value};
use ztunnel_tests::{pod, wait_until, Cluster, PodRef, Proc};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const PATHS: [&str; 2] = ["direct", "mesh"];
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
const IPERF_PORT: u16 = 5201;
const WAIT: Duration = Duration::from_secs(15);

const USAGE: &str = "\
usage: bench [options]           (normally run as `cargo xtask bench [-- options]`)
  --iperf-seconds N   length of each iperf3 run (default 5, at most 30)
  --rate R            requests per second of the latency test (default 500, at most 20000)
  --latency-ms D      length of the latency test (default 5000, at most 30000)
  --connections C     keep-alive connections of the latency test (default 4, at most 64)
  --conn-ms D         length of the connections-per-second test (default 3000, at most 30000)
  --concurrency N     parallel loops of that test (default 8, at most 64)
  --hold N            idle connections held for the memory test (default 1000, at most 10000)
  --out DIR           where the JSON goes (default <workspace>/target/bench)";

/// What to run; every knob has an upper bound so a run stays bounded.
struct Params {
    iperf_seconds: u64,
    rate: u64,
    latency_ms: u64,
    connections: u64,
    conn_ms: u64,
    concurrency: u64,
    hold: u64,
    out: PathBuf,
}

impl Params {
    fn parse(args: &[String]) -> Result<Self> {
        let mut p = Self {
            iperf_seconds: 5,
            rate: 500,
            latency_ms: 5000,
            connections: 4,
            conn_ms: 3000,
            concurrency: 8,
            hold: 1000,
            out: ztunnel_tests::workspace_root().join("target/bench"),
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "-h" || flag == "--help" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            let value = it
                .next()
                .ok_or_else(|| anyhow!("{flag} needs a value\n{USAGE}"))?;
            let num = |lo: u64, hi: u64| -> Result<u64> {
                let n: u64 = value
                    .parse()
                    .with_context(|| format!("{flag} {value}: not a number"))?;
                ensure!(
                    (lo..=hi).contains(&n),
                    "{flag} must be between {lo} and {hi}"
                );
                Ok(n)
            };
            match flag.as_str() {
                "--iperf-seconds" => p.iperf_seconds = num(1, 30)?,
                "--rate" => p.rate = num(1, 20_000)?,
                "--latency-ms" => p.latency_ms = num(100, 30_000)?,
                "--connections" => p.connections = num(1, 64)?,
                "--conn-ms" => p.conn_ms = num(100, 30_000)?,
                "--concurrency" => p.concurrency = num(1, 64)?,
                "--hold" => p.hold = num(1, 10_000)?,
                "--out" => p.out = PathBuf::from(value),
                other => bail!("unknown option {other}\n{USAGE}"),
            }
        }
        Ok(p)
    }

    fn to_json(&self) -> Value {
        json!({
            "iperf_seconds": self.iperf_seconds, "rate": self.rate, "latency_ms": self.latency_ms,
            "connections": self.connections, "conn_ms": self.conn_ms,
            "concurrency": self.concurrency, "hold": self.hold,
        })
    }
}

/// Which way a figure is better, for reading the ratio.
#[derive(Clone, Copy)]
enum Better {
    Higher,
    Lower,
}

/// One line of the table: the same figure for both paths.
struct Row {
    key: String,
    label: String,
    unit: &'static str,
    better: Better,
    direct: Option<f64>,
    mesh: Option<f64>,
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        match (self.direct, self.mesh) {
            (Some(d), Some(m)) if d > 0.0 => Some(m / d),
            _ => None,
        }
    }
}

/// Everything measured, and what went wrong.
struct Report {
    rows: Vec<Row>,
    details: serde_json::Map<String, Value>,
    problems: Vec<String>,
}

impl Report {
    fn row(&mut self, key: &str, label: String, unit: &'static str, better: Better) -> &mut Row {
        self.rows.push(Row {
            key: key.to_owned(),
            label,
            unit,
            better,
            direct: None,
            mesh: None,
        });
        self.rows.last_mut().expect("just pushed")
    }

    fn set(&mut self, key: &str, path: &str, value: f64) {
        if let Some(r) = self.rows.iter_mut().find(|r| r.key == key) {
            match path {
                "direct" => r.direct = Some(value),
                _ => r.mesh = Some(value),
            }
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

fn heading(title: &str) {
    println!("\n\x1b[1m{title}\x1b[0m");
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
    heading("Virtual cluster: 2 nodes; client pods on node1, server pods on node2");
    let c = Cluster::builder()
        .nodes(2)
        .namespace("direct", &[])
        .namespace("mesh", &[AMBIENT])
        .pod(pod("direct", "client").node(1))
        .pod(pod("direct", "server").node(2))
        .pod(pod("mesh", "client").node(1))
        .pod(pod("mesh", "server").node(2))
        .start()?;
    c.wait_enrolled(1, 0, "mesh/client", WAIT)?;
    c.wait_enrolled(2, 0, "mesh/server", WAIT)?;
    let pids = [proxy_pid(&c, 1)?, proxy_pid(&c, 2)?];
    let started = sample(&pids)?;
    for path in PATHS {
        let (client, server) = (c.pod(path, "client"), c.pod(path, "server"));
        println!(
            "   {path:<6}  {} ({}) → {} ({}){}",
            client.workload(),
            client.ip(),
            server.workload(),
            server.ip(),
            if path == "mesh" {
                "  namespace labelled istio.io/dataplane-mode=ambient"
            } else {
                "  namespace not enrolled: no proxy on the path"
            }
        );
    }
    let mut servers = Vec::new();
    for path in PATHS {
        let server = c.pod(path, "server");
        let port = HTTP_PORT.to_string();
        let mut http = server.spawn_probe(&["http-server-ka", "--port", &port])?;
        http.wait_for_json(0, WAIT, |v| v["event"] == "listening")?;
        servers.push(http);
        servers.push(server.tcp_echo(ECHO_PORT)?);
    }
    let transport = check_paths(&c)?;
    println!("   checked: direct traffic bypasses both proxies; mesh traffic goes through both ({transport} between nodes)");
    std::thread::sleep(Duration::from_millis(500));
    let warm = sample(&pids)?;

    let mut report = Report {
        rows: Vec::new(),
        details: serde_json::Map::new(),
        problems: Vec::new(),
    };
    report.details.insert(
        "proxies".into(),
        json!({"started": started.to_json(), "warm_idle": warm.to_json()}),
    );

    memory(&c, p, &pids, &mut report);
    throughput(&c, p, &mut report);
    latency(&c, p, &mut report);
    connection_rate(&c, p, &mut report);

    let end = match sample(&pids) {
        Ok(s) => Some(s),
        Err(e) => {
            report.problem("sampling the proxies at the end", &e);
            None
        }
    };
    report.details["proxies"]["after_all"] = end.map_or(Value::Null, Sample::to_json);
    for i in 1..=2 {
        if !c.proxy_running(i) {
            report
                .problems
                .push(format!("the proxy of node{i} is no longer running"));
        }
    }
    let emfile: usize = (1..=2).map(|i| count_emfile(&c.log_text(i))).sum();
    if emfile > 0 {
        report.problems.push(format!(
            "the proxies logged {emfile} \"too many open files\" (EMFILE) errors during the run"
        ));
    }
    drop(servers);
    drop(c);

    print_table(p, &report, &started, &warm, end.as_ref(), &transport);
    let out = json!({
        "unix_time": unix_time,
        "git": git,
        "host": {"cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
                 "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned())},
        "mesh_transport": transport,
        "params": p.to_json(),
        "rows": report.rows.iter().map(|r| json!({
            "key": r.key, "metric": r.label, "unit": r.unit,
            "better": match r.better { Better::Higher => "higher", Better::Lower => "lower" },
            "direct": r.direct, "mesh": r.mesh, "mesh_over_direct": r.ratio(),
        })).collect::<Vec<_>>(),
        "details": report.details,
        "problems": report.problems,
        "elapsed_s": began.elapsed().as_secs_f64(),
    });
    let written = write_json(&p.out, unix_time, &out)?;
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

fn proxy_pid(c: &Cluster, i: usize) -> Result<u32> {
    c.proxy_pid(i)
        .ok_or_else(|| anyhow!("the proxy of node {i} is not running"))
}

/// Sends one request on each path and checks, in the proxies' logs, that `direct` bypassed
/// them and `mesh` went through both. Returns how the mesh crossed between the nodes.
fn check_paths(c: &Cluster) -> Result<String> {
    let logged = |i: usize, mark: usize, direction: &str| {
        c.logs_since(i, mark)
            .into_iter()
            .find(|l| l["direction"] == direction)
    };
    for path in PATHS {
        let (marks, server) = ([c.log_mark(1), c.log_mark(2)], c.pod(path, "server"));
        let addr = format!("{}:{HTTP_PORT}", server.ip());
        let out = c.pod(path, "client").probe(&["get", "--addr", &addr])?;
        ensure!(
            out.code == Some(0),
            "{path}: GET {addr} failed: {}{}",
            out.stdout,
            out.stderr
        );
        if path == "direct" {
            std::thread::sleep(Duration::from_millis(500));
            for i in 1..=2 {
                ensure!(
                    logged(i, marks[i - 1], "outbound").is_none()
                        && logged(i, marks[i - 1], "inbound").is_none(),
                    "direct traffic went through node{i}'s proxy: the baseline would be wrong"
                );
            }
        } else {
            wait_until(WAIT, "node1's proxy to log the mesh request", || {
                logged(1, marks[0], "outbound")
            })?;
            let inbound = wait_until(WAIT, "node2's proxy to log the mesh request", || {
                logged(2, marks[1], "inbound")
            })?;
            return Ok(if inbound["hbone"] == true {
                "HBONE (mTLS)".into()
            } else {
                "plaintext".into()
            });
        }
    }
    unreachable!("PATHS ends with mesh")
}

// ---- proxy memory -----------------------------------------------------------------------

/// RSS and open descriptors of both proxies at one moment.
#[derive(Clone, Copy)]
struct Sample {
    rss_kib: [u64; 2],
    fds: [u64; 2],
}

impl Sample {
    fn to_json(self) -> Value {
        json!({"node1": {"rss_kib": self.rss_kib[0], "fds": self.fds[0]},
               "node2": {"rss_kib": self.rss_kib[1], "fds": self.fds[1]}})
    }
}

fn sample(pids: &[u32; 2]) -> Result<Sample> {
    let mut s = Sample {
        rss_kib: [0; 2],
        fds: [0; 2],
    };
    for (i, pid) in pids.iter().enumerate() {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading the status of proxy pid {pid}"))?;
        s.rss_kib[i] = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))?;
        s.fds[i] = fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    }
    Ok(s)
}

fn count_emfile(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("Too many open files") || l.contains("os error 24"))
        .count()
}

/// Proxy memory while the client pod holds `p.hold` idle connections to the echo server: first
/// on the direct path (the proxies are not involved: a control), then on the mesh path.
fn memory(c: &Cluster, p: &Params, pids: &[u32; 2], report: &mut Report) {
    heading(&format!(
        "Proxy memory: {} idle connections held open, client → server",
        p.hold
    ));
    let key = "rss_held";
    report.row(
        key,
        format!("proxies' RSS, {} conns held (MiB)", p.hold),
        "MiB",
        Better::Lower,
    );
    let mut held = serde_json::Map::new();
    for path in PATHS {
        match hold_once(c, p, pids, path) {
            Ok(v) => {
                let rss: u64 = (0..2)
                    .map(|i| v["held"]["rss_kib"][i].as_u64().unwrap_or(0))
                    .sum();
                let opened = v["opened"].as_u64().unwrap_or(0);
                if opened == p.hold {
                    report.set(key, path, rss as f64 / 1024.0);
                } else {
                    report.problems.push(format!(
                        "{path}: only {opened} of {} connections opened (first error: {}){}",
                        p.hold,
                        v["first_error"],
                        if v["emfile_logged"].as_u64().unwrap_or(0) > 0 {
                            "; the proxies logged EMFILE (too many open files)"
                        } else {
                            ""
                        }
                    ));
                }
                held.insert(path.into(), v);
            }
            Err(e) => report.problem(&format!("{path} hold"), &e),
        }
    }
    report.details.insert("hold".into(), Value::Object(held));
}

fn hold_once(c: &Cluster, p: &Params, pids: &[u32; 2], path: &str) -> Result<Value> {
    let emfile_before: usize = (1..=2).map(|i| count_emfile(&c.log_text(i))).sum();
    let before = sample(pids)?;
    let addr = format!("{}:{ECHO_PORT}", c.pod(path, "server").ip());
    let count = p.hold.to_string();
    // Held until this function kills it; the hold time is only a bound.
    let mut client = c.pod(path, "client").spawn_probe(&[
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
    let emfile: usize =
        (1..=2).map(|i| count_emfile(&c.log_text(i))).sum::<usize>() - emfile_before;
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
        "emfile_logged": emfile,
    });
    println!(
        "   {path:<6}  {n} opened in {} ms; RSS node1 {} → {} KiB, node2 {} → {} KiB; fds node1 {} → {}, node2 {} → {}",
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

fn throughput(c: &Cluster, p: &Params, report: &mut Report) {
    heading(&format!(
        "Bulk throughput: iperf3, {} s per run",
        p.iperf_seconds
    ));
    let mut servers: Vec<Proc> = Vec::new();
    for path in PATHS {
        match iperf_server(&c.pod(path, "server")) {
            Ok(s) => servers.push(s),
            Err(e) => return report.problem(&format!("{path}: starting iperf3 -s"), &e),
        }
    }
    let mut details = serde_json::Map::new();
    for streams in [1u32, 8] {
        let key = format!("throughput_p{streams}");
        let label = match streams {
            1 => "throughput, 1 stream (Gbit/s)".to_owned(),
            n => format!("throughput, {n} streams (Gbit/s)"),
        };
        report.row(&key, label, "Gbit/s", Better::Higher);
        for path in PATHS {
            match iperf_client(c, p, path, streams) {
                Ok(v) => {
                    let gbps = v["received_bps"].as_f64().unwrap_or(0.0) / 1e9;
                    println!(
                        "   {path:<6}  -P {streams}: {gbps:.2} Gbit/s received, {} retransmits",
                        v["retransmits"]
                    );
                    report.set(&key, path, gbps);
                    details.insert(format!("{path}_p{streams}"), v);
                }
                Err(e) => report.problem(&format!("{path} iperf3 -P {streams}"), &e),
            }
        }
    }
    report
        .details
        .insert("throughput".into(), Value::Object(details));
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

fn iperf_client(c: &Cluster, p: &Params, path: &str, streams: u32) -> Result<Value> {
    let ip = c.pod(path, "server").ip().to_string();
    let (port, secs, streams_s) = (
        IPERF_PORT.to_string(),
        p.iperf_seconds.to_string(),
        streams.to_string(),
    );
    let out = c.pod(path, "client").run(
        &[
            "iperf3", "-c", &ip, "-p", &port, "-t", &secs, "-P", &streams_s, "-J",
        ],
        Duration::from_secs(p.iperf_seconds + 25),
    )?;
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
    Ok(json!({
        "received_bps": bps,
        "sent_bps": v["end"]["sum_sent"]["bits_per_second"],
        "retransmits": v["end"]["sum_sent"]["retransmits"],
        "seconds": v["end"]["sum_received"]["seconds"],
    }))
}

// ---- latency and connection rate ----------------------------------------------------------

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

fn latency(c: &Cluster, p: &Params, report: &mut Report) {
    heading(&format!(
        "Request latency: small HTTP/1.1 GETs, {} req/s for {} ms over {} keep-alive connections (open loop)",
        p.rate, p.latency_ms, p.connections
    ));
    let (k50, k99) = ("latency_p50", "latency_p99");
    report.row(k50, "HTTP latency p50 (µs)".into(), "µs", Better::Lower);
    report.row(k99, "HTTP latency p99 (µs)".into(), "µs", Better::Lower);
    let mut details = serde_json::Map::new();
    for path in PATHS {
        let addr = format!("{}:{HTTP_PORT}", c.pod(path, "server").ip());
        let (rate, ms, conns) = (
            p.rate.to_string(),
            p.latency_ms.to_string(),
            p.connections.to_string(),
        );
        let args = [
            "http-load",
            "--addr",
            &addr,
            "--rate",
            &rate,
            "--duration-ms",
            &ms,
            "--connections",
            &conns,
        ];
        let timeout = Duration::from_millis(p.latency_ms + 20_000);
        match probe_json(&c.pod(path, "client"), &args, timeout) {
            Ok(v) => {
                println!(
                    "   {path:<6}  {} requests, {} errors: p50 {} µs, p90 {} µs, p99 {} µs, max {} µs",
                    v["requests"], v["errors"], v["p50_us"], v["p90_us"], v["p99_us"], v["max_us"]
                );
                if v["errors"].as_u64() != Some(0) || v["requests"].as_u64() == Some(0) {
                    report.problems.push(format!(
                        "{path} latency: {} errors (first: {})",
                        v["errors"], v["first_error"]
                    ));
                }
                if let (Some(p50), Some(p99)) = (v["p50_us"].as_f64(), v["p99_us"].as_f64()) {
                    report.set(k50, path, p50);
                    report.set(k99, path, p99);
                }
                details.insert(path.into(), v);
            }
            Err(e) => report.problem(&format!("{path} http-load"), &e),
        }
    }
    report
        .details
        .insert("latency".into(), Value::Object(details));
}

fn connection_rate(c: &Cluster, p: &Params, report: &mut Report) {
    heading(&format!(
        "New connections: connect, GET, read to EOF, close; {} loops for {} ms",
        p.concurrency, p.conn_ms
    ));
    let key = "conn_rate";
    report.row(
        key,
        format!("new connections/s ({} parallel)", p.concurrency),
        "1/s",
        Better::Higher,
    );
    let mut details = serde_json::Map::new();
    for path in PATHS {
        let addr = format!("{}:{HTTP_PORT}", c.pod(path, "server").ip());
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
        match probe_json(&c.pod(path, "client"), &args, timeout) {
            Ok(v) => {
                println!(
                    "   {path:<6}  {} connections, {} errors: {:.0}/s (each: p50 {} µs, p99 {} µs)",
                    v["connections"],
                    v["errors"],
                    v["per_second"].as_f64().unwrap_or(0.0),
                    v["p50_us"],
                    v["p99_us"]
                );
                if v["errors"].as_u64() != Some(0) {
                    report.problems.push(format!(
                        "{path} connection rate: {} errors (first: {})",
                        v["errors"], v["first_error"]
                    ));
                }
                if let Some(rate) = v["per_second"].as_f64() {
                    report.set(key, path, rate);
                }
                details.insert(path.into(), v);
            }
            Err(e) => report.problem(&format!("{path} conn-rate"), &e),
        }
        // Let the proxies log and release the closed connections before the next run.
        std::thread::sleep(Duration::from_millis(500));
    }
    report
        .details
        .insert("conn_rate".into(), Value::Object(details));
}

// ---- output -------------------------------------------------------------------------------

const ROW_ORDER: [&str; 6] = [
    "throughput_p1",
    "throughput_p8",
    "latency_p50",
    "latency_p99",
    "conn_rate",
    "rss_held",
];

fn fmt_value(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "—".into(),
        Some(x) if unit == "Gbit/s" => format!("{x:.2}"),
        Some(x) if unit == "MiB" => format!("{x:.1}"),
        Some(x) => format!("{x:.0}"),
    }
}

fn print_table(
    p: &Params,
    report: &Report,
    started: &Sample,
    warm: &Sample,
    end: Option<&Sample>,
    transport: &str,
) {
    heading(&format!(
        "Results (mesh = both node proxies on the path, {transport} between nodes)"
    ));
    println!(
        "   {:<40} {:>10} {:>10} {:>12}",
        "metric", "direct", "mesh", "mesh/direct"
    );
    println!("   {}", "─".repeat(75));
    // In reading order, whatever order they were measured in.
    let order = |r: &&Row| {
        ROW_ORDER
            .iter()
            .position(|k| *k == r.key)
            .unwrap_or(usize::MAX)
    };
    let mut rows: Vec<&Row> = report.rows.iter().collect();
    rows.sort_by_key(order);
    for r in rows {
        let ratio = r.ratio().map_or("—".into(), |x| format!("{x:.2}"));
        let hint = match r.better {
            Better::Higher => "higher is better",
            Better::Lower => "lower is better",
        };
        println!(
            "   {:<40} {:>10} {:>10} {:>12}   ({hint})",
            r.label,
            fmt_value(r.direct, r.unit),
            fmt_value(r.mesh, r.unit),
            ratio
        );
    }
    println!("\n   proxy memory (VmRSS)                            node1        node2");
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let line = |label: &str, s: &Sample| {
        println!(
            "   {label:<44} {:>12} {:>12}",
            mib(s.rss_kib[0]),
            mib(s.rss_kib[1])
        );
    };
    line("after start", started);
    line("idle, after one request each way", warm);
    if let Some(mesh) = report.details.get("hold").and_then(|h| h.get("mesh")) {
        let rss = |i: usize| mib(mesh["held"]["rss_kib"][i].as_u64().unwrap_or(0));
        println!(
            "   {:<44} {:>12} {:>12}",
            format!("holding {} mesh connections", mesh["opened"]),
            rss(0),
            rss(1)
        );
        let per = |key: &str, i: usize, unit: &str| match mesh[key][i].as_f64() {
            Some(x) => format!("{x:.1}{unit}"),
            None => "—".into(),
        };
        println!(
            "   {:<44} {:>12} {:>12}",
            "per mesh connection",
            per("rss_kib_per_conn", 0, " KiB"),
            per("rss_kib_per_conn", 1, " KiB")
        );
        println!(
            "   {:<44} {:>12} {:>12}",
            "open descriptors per mesh connection",
            per("fds_per_conn", 0, ""),
            per("fds_per_conn", 1, "")
        );
    }
    if let Some(direct) = report.details.get("hold").and_then(|h| h.get("direct")) {
        let per = |i: usize| match direct["rss_kib_per_conn"][i].as_f64() {
            Some(x) => format!("{x:.1} KiB"),
            None => "—".into(),
        };
        println!(
            "   {:<44} {:>12} {:>12}",
            "per direct connection (control: expect ~0)",
            per(0),
            per(1)
        );
    }
    if let Some(end) = end {
        line("after every test", end);
    }
    println!(
        "\n   ratios are mesh/direct from this run: throughput and connections/s below 1 are the \
         mesh's cost; latency and memory above 1 are. {} held connections; see docs/benchmarks.md.",
        p.hold
    );
}

fn git_state() -> Value {
    let root = ztunnel_tests::workspace_root();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    json!({
        "head": git(&["log", "--oneline", "-1"]),
        "changed_files": git(&["status", "--porcelain"]).map(|s| s.lines().count()),
    })
}

fn write_json(dir: &Path, unix_time: u64, v: &Value) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = serde_json::to_string_pretty(v)? + "\n";
    let file = dir.join(format!("bench-{unix_time}.json"));
    fs::write(&file, &text).with_context(|| format!("writing {}", file.display()))?;
    let latest = dir.join("latest.json");
    fs::write(&latest, &text).with_context(|| format!("writing {}", latest.display()))?;
    Ok(file)
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
