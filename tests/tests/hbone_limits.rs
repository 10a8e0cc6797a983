//! HBONE under abuse and at scale (docs/hbone.md, "Limits and timeouts"): many tunnels from one
//! pod, a pod at its cap, peers that go silent after TLS, idle connections, peers that stop
//! answering PINGs, no ALPN, and HTTP/2 rapid reset. Each refusal is checked in the log and in
//! the metrics, and the proxy must keep serving.
use std::{
    fs,
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use ztunnel_tests::{
    hbone_client::{self, Freezable, RawClient},
    pod, Cluster, ClusterBuilder, Proc,
};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const WAIT: Duration = Duration::from_secs(15);
const ECHO: u16 = 9000;
const HTTP: u16 = 8080;

/// shop (ambient): client-a and client-b (service account `client`) on node 1, web on node 2.
fn mesh() -> ClusterBuilder {
    Cluster::builder()
        .nodes(2)
        .namespace("shop", &[AMBIENT])
        .pod(pod("shop", "client-a").node(1).service_account("client"))
        .pod(pod("shop", "client-b").node(1).service_account("client"))
        .pod(pod("shop", "web").node(2).service_account("web"))
}

fn enrolled(c: &Cluster) -> Result<()> {
    for (node, p) in [(1, "shop/client-a"), (1, "shop/client-b"), (2, "shop/web")] {
        c.wait_enrolled(node, 0, p, WAIT)?;
    }
    Ok(())
}

/// The mesh, started with default limits and every pod enrolled.
fn started() -> Result<Cluster> {
    let c = mesh().start()?;
    enrolled(&c)?;
    Ok(c)
}

fn web(c: &Cluster, port: u16) -> String {
    format!("{}:{port}", c.pod("shop", "web").ip())
}

/// client-a opens `count` connections to web's echo port and holds them for `hold_ms`
/// (reporting `opened`, then `done` with how many were still open).
fn hold(c: &Cluster, count: usize, hold_ms: u64) -> Result<Proc> {
    c.pod("shop", "client-a").spawn_probe(&[
        "hold",
        "--addr",
        &web(c, ECHO),
        "--count",
        &count.to_string(),
        "--hold-ms",
        &hold_ms.to_string(),
    ])
}

fn hbone_addr(c: &Cluster) -> SocketAddr {
    SocketAddr::new(c.pod("shop", "web").ip().into(), 15008)
}

/// A raw client on node 1 as shop/client, expecting shop/web.
async fn raw(c: &Cluster) -> Result<RawClient> {
    RawClient::new(c, 1, ("shop", "client"), ("shop", "web")).await
}

/// Resident memory (KiB) and open descriptors of node `i`'s proxy.
fn rss_fds(c: &Cluster, i: usize) -> Result<(u64, usize)> {
    let pid = c.proxy_pid(i).context("the proxy is not running")?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok((rss, fs::read_dir(format!("/proc/{pid}/fd"))?.count()))
}

fn closed_count(c: &Cluster, node: usize, direction: &str, reason: &str) -> Result<f64> {
    Ok(c.node(node).scrape()?.sum(
        "ztunnel_hbone_connections_closed_total",
        &[("direction", direction), ("reason", reason)],
    ))
}

fn log_count(c: &Cluster, node: usize, mark: usize, message: &str, reason: &str) -> usize {
    c.logs_since(node, mark)
        .iter()
        .filter(|l| l["message"] == message && l["reason"] == reason)
        .count()
}

#[test]
fn a_pod_holding_many_tunnels_starves_no_other_pod_and_5000_all_echo() -> Result<()> {
    let c = started()?;
    let _echo = c.pod("shop", "web").tcp_echo(ECHO)?;
    let _http = c.pod("shop", "web").http_server(HTTP, "web")?;
    let mut a = hold(&c, 1000, 60_000)?;
    let opened = a.wait_for_json(0, Duration::from_secs(45), |v| v["event"] == "opened")?;
    assert_eq!(opened["opened"], 1000, "{opened}");
    // Another pod of the same service account, while A holds its 1 000.
    let started = Instant::now();
    let out = c.pod("shop", "client-b").get(&web(&c, HTTP))?.succeeded()?;
    let took = started.elapsed();
    assert_eq!(out.body()["server"], "web");
    assert!(took < Duration::from_secs(1), "pod B waited {took:?}");
    a.kill();

    // 5 000 from A alone: more than one connection's streams, all open end to end.
    let mut a = hold(&c, 5000, 2_000)?;
    let opened = a.wait_for_json(0, Duration::from_secs(60), |v| v["event"] == "opened")?;
    assert_eq!(opened["opened"], 5000, "{opened}");
    let done = a.wait_for_json(0, Duration::from_secs(30), |v| v["event"] == "done")?;
    assert_eq!(done["still_open"], 5000, "every one still open: {done}");
    let pooled = c
        .node(1)
        .scrape()?
        .sum("ztunnel_hbone_connections_opened_total", &[]);
    assert!(
        pooled >= 50.0,
        "5 000 streams at 100 per connection take 50 connections or more: {pooled}"
    );
    Ok(())
}

#[test]
fn a_pod_at_its_cap_waits_a_bounded_time_then_fails_alone() -> Result<()> {
    let c = mesh().start_without_proxies()?;
    c.start_proxy_with(
        1,
        &[
            "--hbone-streams-per-connection",
            "10",
            "--hbone-connections-per-key",
            "2",
            "--hbone-pool-wait",
            "1s",
        ],
    )?;
    c.start_proxy(2)?;
    enrolled(&c)?;
    let _echo = c.pod("shop", "web").tcp_echo(ECHO)?;
    let _http = c.pod("shop", "web").http_server(HTTP, "web")?;
    let mut a = hold(&c, 20, 60_000)?;
    let opened = a.wait_for_json(0, WAIT, |v| v["event"] == "opened")?;
    assert_eq!(opened["opened"], 20, "{opened}");
    let m1 = c.log_mark(1);
    let started = Instant::now();
    let out = c.pod("shop", "client-a").get(&web(&c, HTTP))?;
    let took = started.elapsed();
    assert_ne!(
        out.code,
        Some(0),
        "the 21st tunnel must fail: {}",
        out.stdout
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "it waited the pool wait (1 s), then failed: {took:?}"
    );
    let line = c.wait_for_connection(1, m1, WAIT, |l| l["direction"] == "outbound")?;
    assert_eq!(line["outcome"], "connect_failed", "{line}");
    assert!(
        line["error"]
            .as_str()
            .is_some_and(|e| e.contains("no free HBONE stream")),
        "{line}"
    );
    assert!(c.logs_since(1, m1).iter().any(|l| l["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("HBONE pool exhausted"))));
    let refused = c.node(1).scrape()?.sum(
        "ztunnel_hbone_pool_refused_total",
        &[("reason", "exhausted")],
    );
    assert_eq!(refused, 1.0);
    // Pod B, same service account, has keys of its own.
    c.pod("shop", "client-b").get(&web(&c, HTTP))?.succeeded()?;
    a.kill();
    Ok(())
}

#[test]
fn peers_silent_after_tls_are_cut_at_the_deadline_and_their_memory_comes_back() -> Result<()> {
    const SILENT: usize = 200;
    let c = started()?;
    let _http = c.pod("shop", "web").http_server(HTTP, "web")?;
    let rt = hbone_client::runtime()?;
    rt.block_on(async {
        let raw = raw(&c).await?;
        // Warm up: the server's certificate is issued, one tunnel served.
        let tls = raw.tls(hbone_addr(&c)).await?;
        let (send, _task) = raw.h2(tls).await?;
        assert_eq!(hbone_client::connect(&send, &web(&c, HTTP)).await?.0, 200);
        drop(send);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rss_before, fds_before) = rss_fds(&c, 2)?;
        let m2 = c.log_mark(2);

        let started = Instant::now();
        let mut silent = Vec::new();
        for _ in 0..SILENT {
            silent.push(raw.tls(hbone_addr(&c)).await?);
        }
        let opened_in = started.elapsed();
        let (_, fds_held) = rss_fds(&c, 2)?;
        ensure!(
            fds_held >= fds_before + SILENT,
            "all {SILENT} held: {fds_before} → {fds_held} descriptors"
        );
        // Each ends from the server's side (EOF or a reset) at the first-request deadline.
        let ends: Vec<_> = silent
            .into_iter()
            .map(|mut tls| {
                tokio::spawn(async move {
                    // The server's SETTINGS, then the end.
                    let mut b = [0u8; 256];
                    while let Ok(1..) = tls.read(&mut b).await {}
                    Instant::now()
                })
            })
            .collect();
        let mut last = started;
        for end in ends {
            last = last.max(tokio::time::timeout(Duration::from_secs(20), end).await??);
        }
        let deadline = Duration::from_secs(10);
        let closed_after = last - started;
        ensure!(
            closed_after >= deadline - Duration::from_millis(500)
                && closed_after <= deadline + opened_in + Duration::from_secs(2),
            "closed {closed_after:?} after the first was opened (deadline {deadline:?}, opened in {opened_in:?})"
        );
        // The proxy logs and counts each just after closing it.
        let refused = ztunnel_tests::wait_until(WAIT, "a refusal logged for each", || {
            let n = log_count(&c, 2, m2, "HBONE connection refused", "no_request");
            (n >= SILENT).then_some(n)
        })?;
        ensure!(refused == SILENT, "{refused} log lines for {SILENT}");
        ensure!(closed_count(&c, 2, "inbound", "no_request")? == SILENT as f64);
        // Their descriptors and memory come back (the proxy returns freed memory to the
        // system within a few seconds of a fall in connections).
        ztunnel_tests::wait_until(WAIT, "descriptors back", || {
            rss_fds(&c, 2).ok().filter(|(_, fds)| *fds <= fds_before + 2)
        })?;
        let within = rss_before + rss_before / 10;
        let back = ztunnel_tests::wait_until(Duration::from_secs(5), "RSS back", || {
            rss_fds(&c, 2).ok().filter(|(rss, _)| *rss <= within)
        });
        let (rss_after, fds_after) = rss_fds(&c, 2)?;
        ensure!(
            back.is_ok(),
            "RSS {rss_before} KiB before, {rss_after} KiB after (fds {fds_before} → {fds_after})"
        );
        anyhow::Ok(())
    })?;
    // And the proxy still serves.
    c.pod("shop", "client-b").get(&web(&c, HTTP))?.succeeded()?;
    Ok(())
}

/// Short timers on both proxies, so idleness and dead peers show within seconds.
const FAST: &[&str] = &[
    "--hbone-idle-timeout",
    "2s",
    "--hbone-keepalive-interval",
    "1s",
    "--hbone-keepalive-timeout",
    "2s",
];

fn fast_mesh() -> Result<Cluster> {
    let c = mesh().start_without_proxies()?;
    for node in [1, 2] {
        c.start_proxy_with(node, FAST)?;
    }
    enrolled(&c)?;
    Ok(c)
}

#[test]
fn idle_connections_and_peers_that_stop_answering_pings_are_closed() -> Result<()> {
    let c = fast_mesh()?;
    let _echo = c.pod("shop", "web").tcp_echo(ECHO)?;
    let rt = hbone_client::runtime()?;
    rt.block_on(async {
        let raw = raw(&c).await?;
        // A connection that carried a tunnel, then nothing: closed after the idle timeout.
        let m2 = c.log_mark(2);
        let (send, task) = raw.h2(raw.tls(hbone_addr(&c)).await?).await?;
        let (status, mut out, mut back) = hbone_client::connect(&send, &web(&c, ECHO)).await?;
        ensure!(status == 200);
        out.send_data(bytes::Bytes::from_static(b"ping"), true)?;
        while let Some(chunk) = back.data().await {
            chunk?;
        }
        let idle_from = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(10), task).await??;
        let idle_for = idle_from.elapsed();
        ensure!(
            idle_for >= Duration::from_millis(1800) && idle_for < Duration::from_secs(6),
            "closed after {idle_for:?} idle (timeout 2 s), ended with {ended:?}"
        );
        // A GOAWAY, or (when the close crossed the client's last PING answer) the
        // connection reset: the server's log says which.
        ensure!(
            ended.as_ref().is_none_or(|e| e.is_go_away() || e.is_io()),
            "a GOAWAY: {ended:?}"
        );
        c.wait_for_log_since(2, m2, WAIT, |l| {
            l["message"] == "HBONE connection closed" && l["reason"] == "idle"
        })?;
        ensure!(closed_count(&c, 2, "inbound", "idle")? >= 1.0);

        // A client that stops answering: the server's PING goes unanswered, the connection
        // is dropped and its stream (and the application's connection) reset.
        let m2 = c.log_mark(2);
        let (io, frozen) = Freezable::new(raw.tls(hbone_addr(&c)).await?);
        let (send, _task) = raw.h2(io).await?;
        let (status, mut out, mut back) = hbone_client::connect(&send, &web(&c, ECHO)).await?;
        ensure!(status == 200);
        out.send_data(bytes::Bytes::from_static(b"hello"), false)?;
        let echoed = back.data().await.context("no echo")??;
        ensure!(&echoed[..] == b"hello");
        frozen.store(true, Ordering::Relaxed);
        let line = c.wait_for_log_since(2, m2, WAIT, |l| {
            l["message"] == "HBONE connection closed" && l["reason"] == "keepalive_timeout"
        })?;
        ensure!(line["dst_workload"] == "shop/web", "{line}");
        let reset = c.wait_for_connection(2, m2, WAIT, |l| l["direction"] == "inbound")?;
        ensure!(reset["outcome"] == "error", "its stream was reset: {reset}");
        ensure!(closed_count(&c, 2, "inbound", "keepalive_timeout")? == 1.0);
        anyhow::Ok(())
    })?;

    // A server that stops answering (its proxy stopped): the client's proxy notices and
    // resets the pod's connection.
    let m1 = c.log_mark(1);
    let mut chat = c.pod("shop", "client-a").spawn_probe(&[
        "chat",
        "--addr",
        &web(&c, ECHO),
        "--messages",
        "before,after",
        "--gap-ms",
        "8000",
    ])?;
    std::thread::sleep(Duration::from_millis(1500));
    let pid = c.proxy_pid(2).context("node 2's proxy")? as i32;
    // SAFETY: signals to our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let detected = c.wait_for_log_since(1, m1, WAIT, |l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("HBONE peer stopped answering PINGs"))
    });
    let outbound = c.wait_for_connection(1, m1, WAIT, |l| l["direction"] == "outbound");
    unsafe { libc::kill(pid, libc::SIGCONT) };
    detected?;
    let outbound = outbound?;
    assert_eq!(outbound["outcome"], "error", "{outbound}");
    assert!(closed_count(&c, 1, "outbound", "keepalive_timeout")? >= 1.0);
    let status = chat.wait_exit(WAIT)?;
    assert!(!status.success(), "the pod saw its connection fail");
    Ok(())
}

#[test]
fn clients_without_alpn_h2_are_refused() -> Result<()> {
    let c = started()?;
    let m2 = c.log_mark(2);
    hbone_client::runtime()?.block_on(async {
        let raw = raw(&c).await?;
        for alpn in [&[][..], &[&b"http/1.1"[..]][..]] {
            // rustls refuses a mismatch in the handshake; no ALPN at all passes TLS and is
            // then closed by the proxy.
            if let Ok(mut tls) = raw.tls_with_alpn(hbone_addr(&c), alpn).await {
                let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
                let mut b = [0u8; 64];
                let n = tokio::time::timeout(WAIT, tls.read(&mut b))
                    .await?
                    .unwrap_or(0);
                ensure!(n == 0, "no ALPN must get no HTTP/2: {:?}", &b[..n]);
            }
        }
        anyhow::Ok(())
    })?;
    ztunnel_tests::wait_until(WAIT, "two refusals logged", || {
        (log_count(&c, 2, m2, "HBONE connection refused", "no_alpn") == 2).then_some(())
    })?;
    let refused = c.node(2).scrape()?.sum(
        "ztunnel_tls_handshakes_total",
        &[("direction", "inbound"), ("outcome", "no_alpn")],
    );
    assert_eq!(refused, 2.0);
    let _http = c.pod("shop", "web").http_server(HTTP, "web")?;
    c.pod("shop", "client-b").get(&web(&c, HTTP))?.succeeded()?;
    Ok(())
}

#[test]
fn rapid_reset_is_answered_with_goaway_and_stays_bounded() -> Result<()> {
    const RESETS: usize = 2000;
    let c = started()?;
    let _echo = c.pod("shop", "web").tcp_echo(ECHO)?;
    let m2 = c.log_mark(2);
    let (rss_before, fds_before) = rss_fds(&c, 2)?;
    let (sent, error) = hbone_client::runtime()?.block_on(async {
        let raw = raw(&c).await?;
        let (send, task) = raw.h2(raw.tls(hbone_addr(&c)).await?).await?;
        let mut sent = 0;
        for _ in 0..RESETS {
            let request = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(web(&c, ECHO))
                .body(())?;
            let Ok(mut ready) = send.clone().ready().await else {
                break;
            };
            let Ok((_response, mut stream)) = ready.send_request(request, false) else {
                break;
            };
            stream.send_reset(h2::Reason::CANCEL);
            sent += 1;
        }
        let error = tokio::time::timeout(WAIT, task).await??;
        anyhow::Ok((sent, error))
    })?;
    // The client may learn of the GOAWAY, or only that the server closed while it was still
    // writing its resets: the server says which it sent.
    let error = error.context("the server must end the connection")?;
    assert!(
        (error.is_go_away() && error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM))
            || error.is_io(),
        "GOAWAY ENHANCE_YOUR_CALM, got {error:?} after {sent} streams"
    );
    let line = c.wait_for_log_since(2, m2, WAIT, |l| {
        l["message"] == "HBONE connection closed" && l["reason"] == "protocol_error"
    })?;
    assert_eq!(line["dst_workload"], "shop/web", "{line}");
    assert!(
        line["error"]
            .as_str()
            .is_some_and(|e| e.contains("excessive load generating behavior")),
        "h2's rapid-reset guard (GOAWAY ENHANCE_YOUR_CALM): {line}"
    );
    assert_eq!(closed_count(&c, 2, "inbound", "protocol_error")?, 1.0);
    // Bounded: few of the streams reached the application, and nothing stays.
    let delivered = c
        .connections_since(2, m2)
        .into_iter()
        .filter(|l: &Value| l["direction"] == "inbound")
        .count();
    assert!(
        delivered <= 200,
        "{delivered} of {sent} streams were delivered"
    );
    ztunnel_tests::wait_until(WAIT, "descriptors back", || {
        rss_fds(&c, 2)
            .ok()
            .filter(|(_, fds)| *fds <= fds_before + 2)
    })?;
    let (rss, _) = rss_fds(&c, 2)?;
    assert!(rss < rss_before + 16 * 1024, "RSS {rss_before} → {rss} KiB");
    let _http = c.pod("shop", "web").http_server(HTTP, "web")?;
    c.pod("shop", "client-b").get(&web(&c, HTTP))?.succeeded()?;
    Ok(())
}
