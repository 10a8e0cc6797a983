//! `cargo xtask bench --scale`: what a node proxy pays for a cluster-sized configuration.
//!
//! One node of the virtual cluster runs our proxy with the directory source; a generated
//! cluster ([`ztunnel_tests::scale`], 100 000 remote pods, 20 000 Services and 10 000
//! pattern-naming AuthorizationPolicies by default) is dropped into its configuration directory
//! at once. Measured, each against the same proxy just before: the memory per remote pod
//! (VmRSS loaded − VmRSS with the small configuration, divided by the pods: Services and
//! policies are charged to the pods too), the time a one-object change takes to be applied, and
//! the time a full re-read ("relist": every file changed at once) takes. Times run from the
//! `rename` that publishes a file to the proxy's own "configuration applied" log timestamp.
//!
//! `--source kubernetes` loads the same cluster into a real kube-apiserver (etcd and the API
//! server alone, [`ztunnel_tests::api_server`]) and runs the proxy with `--kubernetes`
//! against it, reaching the API from its node's network namespace through a loopback relay.
//! The small configuration is the empty API server; the proxy is stopped while the cluster is
//! loaded and started on the loaded one. A change is a `PATCH` of one pod's label, timed from
//! the request to "configuration applied"; the relist is a proxy restart, timed from the
//! spawn to "proxy ready" (its first full snapshot applied): the source lists again only
//! after `410 Gone` or a restart, and a restart is the one a bench can cause on purpose.
//! See docs/benchmarks.md.
use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use serde_json::{json, Value};
use ztunnel_tests::{
    api_server::{write_all, ApiServer, NetnsRelay, API_ADDR},
    benchmark::{git_state, vm_rss_kib, write_json},
    cleanup::NETNS_DIR,
    pod,
    scale::{
        change_write, file_name, namespace_file, namespace_writes, Size, POD_RANGE, SERVICE_RANGE,
    },
    Cluster,
};

const USAGE: &str = "\
usage: scale-bench [options]
  --pods N       remote pods (default 100000, 1000..=200000)
  --services N   Services (default 20000, at most --pods)
  --policies N   AuthorizationPolicies (default 10000, at most --pods)
  --changes N    one-object changes timed (default 5, 1..=20)
  --source S     directory (default) or kubernetes (a real kube-apiserver)
  --out DIR      where the JSON goes (default target/bench)";

/// Where the proxy under test reads the generated cluster from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Directory,
    Kubernetes,
}

impl std::str::FromStr for Source {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "directory" => Ok(Source::Directory),
            "kubernetes" => Ok(Source::Kubernetes),
            other => bail!("--source {other}: directory or kubernetes"),
        }
    }
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Directory => "directory",
            Source::Kubernetes => "kubernetes",
        }
    }
}

/// Writes in flight while loading the API server.
const LOAD_CONCURRENCY: usize = 48;

/// The goals of the performance issue, per remote pod and per change.
const GOAL_KIB_PER_POD: f64 = 3.0;
const GOAL_CHANGE_MS: f64 = 100.0;
const GOAL_RELIST_MS: f64 = 5_000.0;

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");

struct Params {
    size: Size,
    changes: u32,
    source: Source,
    out: PathBuf,
}

impl Params {
    fn parse(args: &[String]) -> Result<Self> {
        let mut size = Size {
            pods: 100_000,
            services: 20_000,
            policies: 10_000,
            pods_per_namespace: 100,
        };
        let mut changes = 5;
        let mut source = Source::Directory;
        let mut out = ztunnel_tests::workspace_root().join("target/bench");
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "-h" || flag == "--help" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            let value = it
                .next()
                .ok_or_else(|| anyhow!("{flag} needs a value\n{USAGE}"))?;
            if flag == "--out" {
                out = PathBuf::from(value);
                continue;
            }
            if flag == "--source" {
                source = value.parse()?;
                continue;
            }
            let n: u32 = value
                .parse()
                .with_context(|| format!("{flag} {value}: not a number"))?;
            let (slot, lo, hi) = match flag.as_str() {
                "--pods" => (&mut size.pods, 1_000, 200_000),
                "--services" => (&mut size.services, 1, 200_000),
                "--policies" => (&mut size.policies, 0, 200_000),
                "--changes" => (&mut changes, 1, 20),
                other => bail!("unknown option {other}\n{USAGE}"),
            };
            ensure!(
                (lo..=hi).contains(&n),
                "{flag} must be between {lo} and {hi}"
            );
            *slot = n;
        }
        ensure!(
            size.services <= size.pods && size.policies <= size.pods,
            "--services and --policies may not exceed --pods"
        );
        Ok(Self {
            size,
            changes,
            source,
            out,
        })
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let params = match Params::parse(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("scale-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(&params) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("scale-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The proxy's own time for a log line (`timestamp`, RFC 3339).
fn logged_at(line: &Value) -> Result<SystemTime> {
    let ts = line["timestamp"]
        .as_str()
        .ok_or_else(|| anyhow!("log line without a timestamp: {line}"))?;
    let t = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("log timestamp {ts}"))?;
    Ok(UNIX_EPOCH + Duration::from_nanos(t.unix_timestamp_nanos().try_into()?))
}

fn millis_between(from: SystemTime, to: SystemTime) -> f64 {
    // A log line stamped before the rename would be a measurement error, not a fast proxy.
    to.duration_since(from)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

/// Publishes staged files with one `rename` each (the directory source ignores dotfiles) and
/// returns when the last one is in place.
fn publish(dir: &Path, files: &[String]) -> Result<SystemTime> {
    for f in files {
        fs::rename(dir.join(format!(".staged-{f}")), dir.join(f))
            .with_context(|| format!("publishing {f}"))?;
    }
    Ok(SystemTime::now())
}

fn stage(dir: &Path, file: &str, text: &str) -> Result<()> {
    let path = dir.join(format!(".staged-{file}"));
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// Waits for the proxy to apply a configuration of generation > `after`, returns the line.
fn applied_after(c: &Cluster, mark: usize, after: u64, timeout: Duration) -> Result<Value> {
    c.wait_for_log_since(1, mark, timeout, |l| {
        l["message"] == "configuration applied" && l["generation"].as_u64() > Some(after)
    })
}

/// Where a change's time went, from the proxy's log: reading the files, indexing the
/// snapshot (both from "configuration loaded"), and handing it to the data path (from
/// "configuration loaded" to "configuration applied").
fn breakdown(c: &Cluster, mark: usize, applied: &Value) -> Result<Value> {
    let generation = applied["generation"].as_u64();
    let loaded = c
        .logs_since(1, mark)
        .into_iter()
        .find(|l| l["message"] == "configuration loaded" && l["generation"].as_u64() == generation)
        .ok_or_else(|| anyhow!("no \"configuration loaded\" for {applied}"))?;
    Ok(json!({
        "files_read": loaded["files_read"],
        "read_ms": loaded["read_ms"],
        "index_ms": loaded["index_ms"],
        "apply_ms": millis_between(logged_at(&loaded)?, logged_at(applied)?),
    }))
}

/// VmRSS once it stops falling (freed memory is returned on a 1 s tick).
fn settled_rss(pid: u32) -> Result<u64> {
    let mut last = vm_rss_kib(pid)?;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(750));
        let now = vm_rss_kib(pid)?;
        if now.abs_diff(last) * 100 <= last {
            return Ok(now.min(last));
        }
        last = now;
    }
    Ok(last)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// What a run measured, whatever the source.
struct Figures {
    rss_idle: u64,
    rss_loaded: u64,
    rss_after: u64,
    first_load_ms: f64,
    change_ms: Vec<f64>,
    steps: Vec<Value>,
    relist_ms: f64,
    relist_steps: Value,
    /// What only this source has (the Kubernetes source: the load's own figures).
    extra: Value,
}

fn run(p: &Params) -> Result<bool> {
    let size = p.size;
    println!(
        "scale: {} remote pods in {} namespaces, {} Services, {} AuthorizationPolicies ({} source)",
        size.pods,
        size.namespaces(),
        size.services,
        size.policies,
        p.source.name()
    );
    let f = match p.source {
        Source::Directory => run_directory(p)?,
        Source::Kubernetes => run_kubernetes(p)?,
    };
    report(p, &f)
}

fn run_directory(p: &Params) -> Result<Figures> {
    let size = p.size;
    let c = Cluster::builder()
        .nodes(1)
        .namespace("mesh", &[AMBIENT])
        .pod(pod("mesh", "client").node(1))
        .start()?;
    let pid = c
        .proxy_pid(1)
        .ok_or_else(|| anyhow!("the proxy is not running"))?;
    let dir = c.config_dir().to_owned();
    let rss_idle = settled_rss(pid)?;

    // The whole cluster at once.
    let files: Vec<String> = (0..size.namespaces()).map(file_name).collect();
    for (n, f) in files.iter().enumerate() {
        stage(&dir, f, &namespace_file(&size, n as u32, 0))?;
    }
    let mark = c.log_mark(1);
    let published = publish(&dir, &files)?;
    let loaded = c.wait_for_log_since(1, mark, Duration::from_secs(300), |l| {
        l["message"] == "configuration loaded" && l["pods"].as_u64() > Some(u64::from(size.pods))
    })?;
    let generation = loaded["generation"].as_u64().unwrap_or_default();
    let applied = applied_after(&c, mark, generation - 1, Duration::from_secs(60))?;
    let first_load_ms = millis_between(published, logged_at(&applied)?);
    let rss_loaded = settled_rss(pid)?;

    // One object changed, several times: each a new generation.
    let mut last = applied["generation"].as_u64().unwrap_or_default();
    let mut change_ms = Vec::new();
    let mut steps = Vec::new();
    for k in 1..=p.changes {
        let n = k % size.namespaces();
        stage(&dir, &files[n as usize], &namespace_file(&size, n, k))?;
        let mark = c.log_mark(1);
        let published = publish(&dir, std::slice::from_ref(&files[n as usize]))?;
        let line = applied_after(&c, mark, last, Duration::from_secs(60))?;
        last = line["generation"].as_u64().unwrap_or_default();
        change_ms.push(millis_between(published, logged_at(&line)?));
        steps.push(breakdown(&c, mark, &line)?);
        std::thread::sleep(Duration::from_millis(300));
    }

    // A relist: every file changed at once (its mtime), so all of it is read again.
    let mark = c.log_mark(1);
    let now = SystemTime::now();
    for f in &files {
        fs::File::options()
            .write(true)
            .open(dir.join(f))?
            .set_modified(now)?;
    }
    let touched = SystemTime::now();
    let line = applied_after(&c, mark, last, Duration::from_secs(300))?;
    let relist_ms = millis_between(touched, logged_at(&line)?);
    let relist_steps = breakdown(&c, mark, &line)?;
    let rss_after = settled_rss(pid)?;
    Ok(Figures {
        rss_idle,
        rss_loaded,
        rss_after,
        first_load_ms,
        change_ms,
        steps,
        relist_ms,
        relist_steps,
        extra: Value::Null,
    })
}

fn report(p: &Params, f: &Figures) -> Result<bool> {
    let size = p.size;
    let Figures {
        rss_idle,
        rss_loaded,
        rss_after,
        first_load_ms,
        relist_ms,
        ..
    } = *f;
    let (change_ms, steps, relist_steps) = (&f.change_ms, &f.steps, &f.relist_steps);
    let kib_per_pod = (rss_loaded as f64 - rss_idle as f64) / f64::from(size.pods);
    let change_median = median(&mut change_ms.clone());
    let change_max = change_ms.iter().copied().fold(f64::NAN, f64::max);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("\nconfiguration at scale ({} source)", p.source.name());
    println!("  proxy RSS, small configuration      {:>9} KiB", rss_idle);
    println!(
        "  proxy RSS, generated cluster        {:>9} KiB",
        rss_loaded
    );
    println!("  proxy RSS, after the changes        {:>9} KiB", rss_after);
    println!(
        "  per remote pod                      {kib_per_pod:>9.2} KiB   goal ≤ {GOAL_KIB_PER_POD} KiB: {}",
        verdict(kib_per_pod <= GOAL_KIB_PER_POD)
    );
    println!("  first load (published → applied)    {first_load_ms:>9.0} ms");
    println!(
        "  one-object change, median / max     {change_median:>9.1} / {change_max:.1} ms   goal ≤ {GOAL_CHANGE_MS} ms: {}",
        verdict(change_max <= GOAL_CHANGE_MS)
    );
    for (k, step) in steps.iter().enumerate() {
        println!("    change {}: {step}", k + 1);
    }
    println!("    relist: {relist_steps}");
    let relist_what = match p.source {
        Source::Directory => "relist (every file changed)        ",
        Source::Kubernetes => "relist (proxy restart → applied)   ",
    };
    println!(
        "  {relist_what} {relist_ms:>9.0} ms   goal ≤ {GOAL_RELIST_MS} ms: {}",
        verdict(relist_ms <= GOAL_RELIST_MS)
    );
    let unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let report = json!({
        "kind": "scale",
        "unix_time": unix,
        "git": git_state(),
        "source": p.source.name(),
        "size": {
            "pods": size.pods, "services": size.services, "policies": size.policies,
            "namespaces": size.namespaces(),
        },
        "rss_kib": {"idle": rss_idle, "loaded": rss_loaded, "after_changes": rss_after},
        "kib_per_remote_pod": kib_per_pod,
        "first_load_ms": first_load_ms,
        "change_ms": change_ms,
        "change_ms_median": change_median,
        "relist_ms": relist_ms,
        "details": {"changes": steps, "relist": relist_steps, "source": f.extra},
        "goals": {
            "kib_per_remote_pod": GOAL_KIB_PER_POD,
            "change_ms": GOAL_CHANGE_MS,
            "relist_ms": GOAL_RELIST_MS,
        },
    });
    let file = write_json(&p.out, "scale", unix, &report)?;
    println!("\nwritten: {}", file.display());
    Ok(true)
}

/// Spawns the proxy with the Kubernetes source and waits for "proxy ready" (its first full
/// snapshot applied); the time from the spawn, and where it went: the lists and their parse
/// until "configuration loaded from Kubernetes" less its `index_ms`, the index, and handing
/// it to the data path.
fn start_on_api(c: &Cluster, kubeconfig: &Path, min_pods: u64) -> Result<(f64, Value)> {
    let mark = c.log_mark(1);
    let spawned = SystemTime::now();
    c.spawn_proxy_kubernetes(1, kubeconfig)?;
    let ready = c
        .wait_for_log_since(1, mark, Duration::from_secs(600), |l| {
            l["message"] == "proxy ready"
        })
        .with_context(|| format!("the proxy's log:\n{}", c.log_tail(1, 30)))?;
    let loaded = c
        .logs_since(1, mark)
        .into_iter()
        .find(|l| l["message"] == "configuration loaded from Kubernetes")
        .ok_or_else(|| anyhow!("no \"configuration loaded from Kubernetes\""))?;
    ensure!(
        loaded["pods"].as_u64() >= Some(min_pods),
        "the first snapshot has {} pods, fewer than the {min_pods} loaded",
        loaded["pods"]
    );
    let index_ms = loaded["index_ms"].as_f64().unwrap_or(f64::NAN);
    let loaded_at = logged_at(&loaded)?;
    let pid = c.proxy_pid(1).ok_or_else(|| anyhow!("no proxy"))?;
    let steps = json!({
        "proxy_cpu_s": proxy_cpu_s(pid)?,
        "peak_rss_kib": status_kib(pid, "VmHWM")?,
        "list_ms": millis_between(spawned, loaded_at) - index_ms,
        "index_ms": index_ms,
        "apply_ms": millis_between(loaded_at, logged_at(&ready)?),
        "pods": loaded["pods"],
        "services": loaded["services"],
        "authorization_policies": loaded["authorization_policies"],
    });
    Ok((millis_between(spawned, logged_at(&ready)?), steps))
}

/// The process's CPU time so far (user + system), in seconds.
fn proxy_cpu_s(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    Ok(ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

/// A `/proc/PID/status` figure in KiB (`VmHWM`: the peak RSS).
fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

/// Where a change's time went: from the request to the snapshot's start (the API server's
/// write and watch event, the source's burst handling), the snapshot (`index_ms`, from
/// "configuration updated from Kubernetes"), and handing it to the data path.
fn breakdown_kubernetes(
    c: &Cluster,
    mark: usize,
    sent: SystemTime,
    applied: &Value,
) -> Result<Value> {
    let generation = applied["generation"].as_u64();
    let updated = c
        .logs_since(1, mark)
        .into_iter()
        .find(|l| {
            l["message"] == "configuration updated from Kubernetes"
                && l["generation"].as_u64() == generation
        })
        .ok_or_else(|| anyhow!("no \"configuration updated from Kubernetes\" for {applied}"))?;
    let index_ms = updated["index_ms"].as_f64().unwrap_or(f64::NAN);
    let updated_at = logged_at(&updated)?;
    Ok(json!({
        "event_ms": millis_between(sent, updated_at) - index_ms,
        "index_ms": index_ms,
        "made": updated["made"],
        "apply_ms": millis_between(updated_at, logged_at(applied)?),
    }))
}

fn run_kubernetes(p: &Params) -> Result<Figures> {
    let size = p.size;
    // Routes for the generator's ranges before the API server (or anything) starts.
    let api = ApiServer::up(SERVICE_RANGE, &[POD_RANGE])?;
    let crds = ztunnel_tests::workspace_root().join("deploy/crds.yaml");
    api.kubectl(&["apply", "--server-side", "-f", &crds.display().to_string()])?;
    api.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd",
        "--all",
    ])?;
    let c = Cluster::builder().nodes(1).start_without_proxies()?;
    let relay = NetnsRelay::start(
        &Path::new(NETNS_DIR).join(c.node_netns(1)),
        API_ADDR.parse()?,
    )?;
    let kubeconfig = c.tmp_dir().join("kubeconfig");
    api.kubeconfig_for(&format!("https://127.0.0.1:{}", relay.port()), &kubeconfig)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = rt.block_on(api.client())?;

    // The small configuration: the API server's own objects.
    start_on_api(&c, &kubeconfig, 0)?;
    let rss_idle = settled_rss(c.proxy_pid(1).ok_or_else(|| anyhow!("no proxy"))?)?;
    c.stop_proxy(1)?;

    // The cluster, loaded with the proxy stopped: namespaces, then Services and policies, then
    // pods (each created, then given its status).
    let load_started = std::time::Instant::now();
    let mut steps: [Vec<Vec<_>>; 3] = Default::default();
    for n in 0..size.namespaces() {
        for (all, these) in steps.iter_mut().zip(namespace_writes(&size, n)) {
            all.extend(these);
        }
    }
    let writes: usize = steps.iter().flatten().map(Vec::len).sum();
    let mut step_s = Vec::new();
    for (what, chains) in ["namespaces", "services and policies", "pods"]
        .iter()
        .zip(steps)
    {
        let t = std::time::Instant::now();
        let n = chains.len();
        rt.block_on(write_all(&client, chains, LOAD_CONCURRENCY))
            .with_context(|| format!("loading the {what}"))?;
        println!("  loaded {n} {what} in {:.1} s", t.elapsed().as_secs_f64());
        step_s.push(t.elapsed().as_secs_f64());
    }
    let load_s = load_started.elapsed().as_secs_f64();
    println!(
        "  the API server took {writes} writes in {load_s:.1} s ({:.0}/s, {LOAD_CONCURRENCY} in flight)",
        writes as f64 / load_s
    );

    let (first_load_ms, first_steps) = start_on_api(&c, &kubeconfig, u64::from(size.pods))?;
    println!("  first start on the loaded cluster: {first_load_ms:.0} ms {first_steps}");
    let pid = c.proxy_pid(1).ok_or_else(|| anyhow!("no proxy"))?;
    let rss_loaded = settled_rss(pid)?;
    let ready = c
        .logs(1)
        .into_iter()
        .rev()
        .find(|l| l["message"] == "proxy ready")
        .ok_or_else(|| anyhow!("no \"proxy ready\""))?;
    let mut last = ready["generation"].as_u64().unwrap_or_default();

    let mut change_ms = Vec::new();
    let mut change_steps = Vec::new();
    for k in 1..=p.changes {
        let write = change_write(&size, k);
        let mark = c.log_mark(1);
        let sent = SystemTime::now();
        rt.block_on(write.send(&client))?;
        let line = applied_after(&c, mark, last, Duration::from_secs(60))?;
        last = line["generation"].as_u64().unwrap_or_default();
        change_ms.push(millis_between(sent, logged_at(&line)?));
        change_steps.push(breakdown_kubernetes(&c, mark, sent, &line)?);
        std::thread::sleep(Duration::from_millis(300));
    }
    let rss_after = settled_rss(pid)?;

    // The relist: a restart, to the first full snapshot applied.
    c.stop_proxy(1)?;
    let (relist_ms, relist_steps) = start_on_api(&c, &kubeconfig, u64::from(size.pods))?;
    Ok(Figures {
        rss_idle,
        rss_loaded,
        rss_after,
        first_load_ms,
        change_ms,
        steps: change_steps,
        relist_ms,
        relist_steps,
        extra: json!({
            "load_s": load_s,
            "load_step_s": {"namespaces": step_s[0], "services_and_policies": step_s[1], "pods": step_s[2]},
            "writes": writes,
            "load_concurrency": LOAD_CONCURRENCY,
            "first_start": first_steps,
            "relist_is": "proxy restart: spawn to \"proxy ready\" (first full snapshot applied)",
        }),
    })
}
