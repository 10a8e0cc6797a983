//! The soak (`--soak SECONDS`): mixed load on every mesh path (ours and, with `--peer`, Istio's
//! ztunnel) in cycles, with the RSS of each path's two proxies sampled every
//! [`SAMPLE_EVERY`] from start to end. One cycle: on each path in turn (order alternating
//! cycle by cycle) keep-alive HTTP requests, bulk iperf3 streams, connection churn and a burst
//! of held connections, then [`IDLE`] with no traffic anywhere and a sample: the cycle's
//! "after idle" RSS. A leak grows that figure cycle after cycle; allocator retention keeps it
//! above the first idle RSS but level. Verdict per path: over the last half of the cycles (the
//! first half fills pools and caches), a least-squares line through the after-idle RSS may rise
//! by at most [`FLAT_MIB`] or [`FLAT_FRACTION`] of its median, whichever is larger, from the
//! first of those cycles to the last. See docs/benchmarks.md.
use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use serde_json::{json, Value};
use ztunnel_tests::{Cluster, PodRef, Proc};

use super::{
    iperf_report, iperf_server, median, probe_json, sample, Way, ECHO_PORT, HTTP_PORT, IPERF_PORT,
};

/// How often the sampler reads the proxies' RSS.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// The quiet phase that ends each cycle, long enough for a trim or a decay to have run.
const IDLE: Duration = Duration::from_secs(10);
/// The verdict's bound on the rise of the after-idle RSS over the judged cycles.
const FLAT_MIB: f64 = 1.0;
const FLAT_FRACTION: f64 = 0.03;
/// Fewer cycles than this judge nothing: the soak was too short.
const MIN_CYCLES: usize = 4;
/// The load of one path in one cycle (about 10 s).
const HTTP_RATE: &str = "2000";
const HTTP_MS: &str = "3000";
const HTTP_CONNECTIONS: &str = "16";
const IPERF_SECONDS: &str = "3";
const IPERF_STREAMS: &str = "4";
const CHURN_MS: &str = "2000";
const CHURN_LOOPS: &str = "8";
const BURST: &str = "500";
const BURST_N: u64 = 500;
const BURST_HOLD_MS: &str = "1000";

/// One RSS reading of a path's two proxies.
#[derive(Clone, Copy)]
struct Point {
    t_s: f64,
    way: Way,
    rss_kib: u64,
}

/// Runs the soak for about `seconds` (whole cycles; at least one) and returns its JSON: the
/// series, the after-idle RSS of every cycle and the verdict of every path.
pub fn run(
    c: &Cluster,
    seconds: u64,
    ways: &[Way],
    pids: &BTreeMap<Way, [u32; 2]>,
) -> Result<Value> {
    let meshes: Vec<Way> = ways.iter().copied().filter(|w| *w != Way::Direct).collect();
    println!(
        "\n\x1b[1mSoak: {seconds} s of cycles (HTTP {HTTP_RATE} req/s for {HTTP_MS} ms, iperf3 -P \
         {IPERF_STREAMS} for {IPERF_SECONDS} s, {CHURN_LOOPS} loops of new connections for \
         {CHURN_MS} ms, {BURST} held connections) on {}, then {} s idle\x1b[0m",
        meshes
            .iter()
            .map(|w| w.ns())
            .collect::<Vec<_>>()
            .join(" and "),
        IDLE.as_secs()
    );
    let mut iperf: Vec<Proc> = Vec::new();
    for way in &meshes {
        iperf.push(iperf_server(&c.pod(way.ns(), "server"))?);
    }
    let start = Instant::now();
    let first: BTreeMap<Way, u64> = meshes
        .iter()
        .map(|w| Ok((*w, rss_kib(&pids[w])?)))
        .collect::<Result<_>>()?;
    let series = Arc::new(Mutex::new(Vec::<Point>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (series, stop) = (series.clone(), stop.clone());
        let watched: Vec<(Way, [u32; 2])> = meshes.iter().map(|w| (*w, pids[w])).collect();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (way, pids) in &watched {
                    if let Ok(rss_kib) = rss_kib(pids) {
                        let t_s = start.elapsed().as_secs_f64();
                        series.lock().unwrap().push(Point {
                            t_s,
                            way: *way,
                            rss_kib,
                        });
                    }
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        })
    };
    let mut cycles: Vec<Value> = Vec::new();
    let mut after_idle: BTreeMap<Way, Vec<f64>> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let deadline = start + Duration::from_secs(seconds);
    while cycles.is_empty() || Instant::now() < deadline {
        let n = cycles.len();
        let mut order = meshes.clone();
        if n % 2 == 1 {
            order.reverse();
        }
        let mut load = serde_json::Map::new();
        for way in &order {
            match load_once(c, *way) {
                Ok(v) => {
                    load.insert(way.ns().to_owned(), v);
                }
                Err(e) => failures.push(format!("cycle {}: {}: {e:#}", n + 1, way.ns())),
            }
        }
        std::thread::sleep(IDLE);
        let mut rss = serde_json::Map::new();
        for way in &meshes {
            let mib = rss_kib(&pids[way])? as f64 / 1024.0;
            after_idle.entry(*way).or_default().push(mib);
            rss.insert(way.ns().to_owned(), json!(mib));
        }
        println!(
            "   cycle {:>3} at {:>5.0} s: after idle {}",
            n + 1,
            start.elapsed().as_secs_f64(),
            meshes
                .iter()
                .map(|w| format!("{} {:.1} MiB", w.ns(), rss[w.ns()].as_f64().unwrap_or(0.0)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        cycles.push(
            json!({"t_s": start.elapsed().as_secs_f64(), "after_idle_mib": rss, "load": load}),
        );
    }
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    drop(iperf);
    let series = series.lock().unwrap().clone();
    let mut paths = serde_json::Map::new();
    for way in &meshes {
        let values = &after_idle[way];
        let points: Vec<Value> = series
            .iter()
            .filter(|p| p.way == *way)
            .map(|p| json!([(p.t_s * 10.0).round() / 10.0, p.rss_kib]))
            .collect();
        let peak = series
            .iter()
            .filter(|p| p.way == *way)
            .map(|p| p.rss_kib)
            .max()
            .unwrap_or(0);
        let mut v = verdict(values);
        v["first_idle_mib"] = json!(first[way] as f64 / 1024.0);
        v["peak_mib"] = json!(peak as f64 / 1024.0);
        v["after_idle_over_first_idle"] = json!(v["judged_median_mib"]
            .as_f64()
            .map(|m| m / (first[way] as f64 / 1024.0)));
        v["after_idle_mib"] = json!(values);
        v["series_t_s_rss_kib"] = json!(points);
        println!(
            "   {:<6} {}: first idle {:.1} MiB, peak {:.1} MiB, after idle (last {} cycles) median \
             {:.1} MiB, rise {:+.2} MiB (bound {:.2})",
            way.ns(),
            v["verdict"].as_str().unwrap_or("?"),
            first[way] as f64 / 1024.0,
            peak as f64 / 1024.0,
            v["judged_cycles"],
            v["judged_median_mib"].as_f64().unwrap_or(f64::NAN),
            v["rise_mib"].as_f64().unwrap_or(f64::NAN),
            v["bound_mib"].as_f64().unwrap_or(f64::NAN),
        );
        paths.insert(way.ns().to_owned(), v);
    }
    for f in &failures {
        println!("   FAILED {f}");
    }
    Ok(json!({
        "seconds": seconds, "elapsed_s": start.elapsed().as_secs_f64(),
        "sample_every_s": SAMPLE_EVERY.as_secs_f64(), "idle_s": IDLE.as_secs_f64(),
        "flat_bound": {"mib": FLAT_MIB, "fraction_of_median": FLAT_FRACTION},
        "load_per_path_per_cycle": {
            "http": {"rate": HTTP_RATE, "ms": HTTP_MS, "connections": HTTP_CONNECTIONS},
            "iperf3": {"seconds": IPERF_SECONDS, "streams": IPERF_STREAMS},
            "churn": {"ms": CHURN_MS, "loops": CHURN_LOOPS},
            "burst": {"connections": BURST, "hold_ms": BURST_HOLD_MS},
        },
        "paths": paths, "cycles": cycles, "failures": failures,
    }))
}

/// Sum of a path's two proxies' RSS.
fn rss_kib(pids: &[u32; 2]) -> Result<u64> {
    Ok(sample(pids)?.rss_kib.iter().sum())
}

/// One path's share of a cycle: every load in turn, each checked for errors.
fn load_once(c: &Cluster, way: Way) -> Result<Value> {
    let (client, server) = (c.pod(way.ns(), "client"), c.pod(way.ns(), "server"));
    let http = format!("{}:{HTTP_PORT}", server.ip());
    let echo = format!("{}:{ECHO_PORT}", server.ip());
    let requests = probe(
        &client,
        &[
            "http-load",
            "--addr",
            &http,
            "--rate",
            HTTP_RATE,
            "--duration-ms",
            HTTP_MS,
            "--connections",
            HTTP_CONNECTIONS,
        ],
    )?;
    let (ip, port) = (server.ip().to_string(), IPERF_PORT.to_string());
    let out = client.run(
        &[
            "iperf3",
            "-c",
            &ip,
            "-p",
            &port,
            "-t",
            IPERF_SECONDS,
            "-P",
            IPERF_STREAMS,
            "-J",
        ],
        Duration::from_secs(30),
    )?;
    let (_, bps) = iperf_report(&out)?;
    let churn = probe(
        &client,
        &[
            "conn-rate",
            "--addr",
            &http,
            "--duration-ms",
            CHURN_MS,
            "--concurrency",
            CHURN_LOOPS,
        ],
    )?;
    let burst = probe(
        &client,
        &[
            "hold",
            "--addr",
            &echo,
            "--count",
            BURST,
            "--hold-ms",
            BURST_HOLD_MS,
        ],
    )?;
    ensure!(
        burst["still_open"].as_u64() == Some(BURST_N),
        "the burst held {} of {BURST} connections",
        burst["still_open"]
    );
    Ok(json!({
        "requests": requests["requests"], "iperf_gbps": bps / 1e9,
        "connections": churn["connections"], "burst": burst["still_open"],
    }))
}

/// `vc-probe` in `pod`; its last JSON line, which must report no errors.
fn probe(pod: &PodRef<'_>, args: &[&str]) -> Result<Value> {
    let v = probe_json(pod, args, Duration::from_secs(40))?;
    ensure!(
        v["errors"].as_u64().unwrap_or(0) == 0,
        "vc-probe {}: {} errors (first: {})",
        args[0],
        v["errors"],
        v["first_error"]
    );
    Ok(v)
}

/// Flat or growing, from the after-idle RSS of every cycle (MiB).
fn verdict(after_idle: &[f64]) -> Value {
    if after_idle.len() < MIN_CYCLES {
        return json!({"verdict": "too short", "judged_cycles": after_idle.len()});
    }
    let judged = &after_idle[after_idle.len() / 2..];
    let n = judged.len() as f64;
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = judged.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (i, y) in judged.iter().enumerate() {
        let dx = i as f64 - mean_x;
        sxy += dx * (y - mean_y);
        sxx += dx * dx;
    }
    let slope = sxy / sxx;
    let rise = slope * (n - 1.0);
    let mid = median(judged).unwrap_or(mean_y);
    let bound = FLAT_MIB.max(FLAT_FRACTION * mid);
    json!({
        "verdict": if rise <= bound { "flat" } else { "growing" },
        "judged_cycles": judged.len(), "judged_median_mib": mid,
        "slope_mib_per_cycle": slope, "rise_mib": rise, "bound_mib": bound,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_level_series_is_flat_and_a_rising_one_is_not() {
        let level = [30.0, 34.0, 35.0, 35.2, 34.9, 35.1, 35.0, 35.2];
        assert_eq!(verdict(&level)["verdict"], "flat");
        let rising: Vec<f64> = (0..8).map(|i| 30.0 + i as f64 * 0.8).collect();
        assert_eq!(verdict(&rising)["verdict"], "growing");
        assert_eq!(verdict(&level[..3])["verdict"], "too short");
    }
}
