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
    benchmark::{git_state, vm_rss_kib, write_json},
    pod,
    scale::{file_name, namespace_file, Size},
    Cluster,
};

const USAGE: &str = "\
usage: scale-bench [options]
  --pods N       remote pods (default 100000, 1000..=200000)
  --services N   Services (default 20000, at most --pods)
  --policies N   AuthorizationPolicies (default 10000, at most --pods)
  --changes N    one-object changes timed (default 5, 1..=20)
  --out DIR      where the JSON goes (default target/bench)";

/// The goals of the performance issue, per remote pod and per change.
const GOAL_KIB_PER_POD: f64 = 3.0;
const GOAL_CHANGE_MS: f64 = 100.0;
const GOAL_RELIST_MS: f64 = 5_000.0;

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");

struct Params {
    size: Size,
    changes: u32,
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
        Ok(Self { size, changes, out })
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

fn run(p: &Params) -> Result<bool> {
    let size = p.size;
    println!(
        "scale: {} remote pods in {} namespaces, {} Services, {} AuthorizationPolicies",
        size.pods,
        size.namespaces(),
        size.services,
        size.policies
    );
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
    let kib_per_pod = (rss_loaded as f64 - rss_idle as f64) / f64::from(size.pods);

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

    let change_median = median(&mut change_ms.clone());
    let change_max = change_ms.iter().copied().fold(f64::NAN, f64::max);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("\nconfiguration at scale (directory source)");
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
    println!(
        "  relist (every file changed)         {relist_ms:>9.0} ms   goal ≤ {GOAL_RELIST_MS} ms: {}",
        verdict(relist_ms <= GOAL_RELIST_MS)
    );
    let unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let report = json!({
        "kind": "scale",
        "unix_time": unix,
        "git": git_state(),
        "source": "directory",
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
        "details": {"changes": steps, "relist": relist_steps},
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
