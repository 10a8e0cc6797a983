//! End-to-end tests of the telemetry operators read: a real Prometheus server (Debian's) scrapes
//! the node proxies of a virtual cluster, and the PromQL that Istio's dashboards and ours use is
//! asked through its HTTP query API.
use std::time::Duration;

use anyhow::{ensure, Result};
use ztunnel_tests::{pod, wait_until, Cluster};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const WAIT: Duration = Duration::from_secs(15);
/// How often Prometheus scrapes the proxies in these tests.
const SCRAPE: Duration = Duration::from_millis(500);
/// The range of the rate() queries: longer than the traffic they measure.
const WINDOW: Duration = Duration::from_secs(8);

/// shop (ambient): client on node 1; echo and web on node 2. Service accounts and `app`
/// labels are named like the pods.
fn start() -> Result<Cluster> {
    let mesh_pod = |name: &str, node: usize| {
        pod("shop", name)
            .node(node)
            .service_account(name)
            .labels(&[("app", name), ("version", "v1")])
    };
    let c = Cluster::builder()
        .nodes(2)
        .namespace("shop", &[AMBIENT])
        .pod(mesh_pod("client", 1))
        .pod(mesh_pod("echo", 2))
        .pod(mesh_pod("web", 2))
        .start()?;
    for (node, p) in [(1, "shop/client"), (2, "shop/echo"), (2, "shop/web")] {
        c.wait_enrolled(node, 0, p, WAIT)?;
    }
    Ok(c)
}

/// `streams` connections from client to echo, each sending `bytes` and reading them back.
fn transfer(c: &Cluster, echo: &str, bytes: u64, streams: u64) -> Result<()> {
    let out = c.pod("shop", "client").probe(&[
        "transfer",
        "--addr",
        echo,
        "--bytes",
        &bytes.to_string(),
        "--streams",
        &streams.to_string(),
    ])?;
    ensure!(out.code == Some(0), "transfer failed: {out:?}");
    Ok(())
}

#[test]
fn prometheus_reads_the_tcp_metrics_of_both_reporters() -> Result<()> {
    let c = start()?;
    let _echo = c.pod("shop", "echo").tcp_echo(9000)?;
    let echo = format!("{}:9000", c.pod("shop", "echo").ip());
    let prom = c.start_prometheus(SCRAPE)?;

    // A first connection makes the series; Prometheus sees it before the measured traffic,
    // so rate() has a sample to start from (a counter's first sample is not an increase).
    transfer(&c, &echo, 1000, 1)?;
    let tcp = |reporter: &str, metric: &str| {
        format!(
            "sum(istio_tcp_{metric}_bytes_total{{reporter=\"{reporter}\",source_workload=\"client\",\
             destination_workload=\"echo\",destination_workload_namespace=\"shop\"}})"
        )
    };
    wait_until(WAIT, "the first connection in Prometheus", || {
        let counted = |reporter, metric| prom.value(&tcp(reporter, metric)).ok() == Some(1000.0);
        (counted("destination", "received") && counted("source", "sent")).then_some(())
    })?;
    // Samples of the series before the traffic, over a whole window.
    std::thread::sleep(WINDOW);
    // The measured traffic: 4 connections of 25 000 bytes each way.
    transfer(&c, &echo, 25_000, 4)?;
    wait_until(
        WAIT,
        "the measured traffic in the proxies' counters",
        || {
            let s = c.node(2).scrape().ok()?;
            let v = s.sum(
                "istio_tcp_received_bytes_total",
                &[
                    ("reporter", "destination"),
                    ("destination_workload", "echo"),
                ],
            );
            (v == 101_000.0).then_some(())
        },
    )?;
    wait_until(WAIT, "the measured traffic in node 1's counters", || {
        let s = c.node(1).scrape().ok()?;
        let v = s.sum(
            "istio_tcp_sent_bytes_total",
            &[("reporter", "source"), ("destination_workload", "echo")],
        );
        (v == 101_000.0).then_some(())
    })?;
    prom.wait_scraped()?;

    // The counters as Prometheus stored them: exact, from both proxies.
    for reporter in ["source", "destination"] {
        for metric in ["received", "sent"] {
            let v = prom.value(&tcp(reporter, metric))?;
            ensure!(v == 101_000.0, "{reporter} {metric}: {v}");
        }
    }
    // Istio's dashboards' TCP panels: bytes per second over a window that holds the measured
    // traffic (and the first connection's sample before it, which is not an increase).
    // rate() extrapolates the samples it has to the window's edges, by at most 1.1 scrape
    // interval each, so rate × window lies in [1, window / (window − 2.2 intervals)] × bytes.
    let window = WINDOW.as_secs_f64();
    let most = window / (window - 2.2 * SCRAPE.as_secs_f64());
    for (reporter, metric) in [("destination", "received"), ("source", "sent")] {
        let expr = format!(
            "sum(rate(istio_tcp_{metric}_bytes_total{{reporter=\"{reporter}\",\
             destination_workload=\"echo\"}}[{window}s]))"
        );
        let bytes = prom.value(&expr)? * window;
        ensure!(
            (100_000.0..=100_000.0 * most).contains(&bytes),
            "{expr} × {window}s = {bytes}, expected 100 000 (× at most {most:.2})"
        );
    }
    // The connections of the window: opened and closed, four each, by the destination.
    let opened = prom.value(&format!(
        "sum(increase(istio_tcp_connections_opened_total{{reporter=\"destination\",\
         destination_workload=\"echo\"}}[{window}s]))"
    ))?;
    ensure!((4.0..=4.0 * most).contains(&opened), "opened: {opened}");
    let up = prom.query("up{job=\"ztunnel\"} == 1")?;
    ensure!(up.len() == 2, "both node proxies are up: {up:?}");
    let nodes: Vec<&str> = up.iter().map(|s| s.label("node")).collect();
    ensure!(
        nodes.contains(&"node1") && nodes.contains(&"node2"),
        "{nodes:?}"
    );
    drop(prom);
    // Its process and its address are gone with the handle.
    let addrs = c.underlay_exec(&["ip", "-brief", "addr", "show", "br0"], WAIT)?;
    ensure!(
        !String::from_utf8_lossy(&addrs.stdout).contains("10.255.0.254"),
        "the monitoring address stayed"
    );
    Ok(())
}
