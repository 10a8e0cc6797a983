//! End-to-end tests of the same-netns fast path (docs/capture.md, "Fast path"): with
//! `--fast-path on` the sockhash + sk_msg redirect between an application's socket and the
//! proxy's inside its pod carries the bytes (the kernel programs' own counters say so), intact
//! in both directions and through half-close, on the same node and across nodes, never for an
//! unenrolled pod's socket; off (the default) keeps every byte on loopback TCP.
//!
//! The clients retry a read that fails with EAGAIN (`--retry-eagain`), as an event loop does:
//! tcp_bpf's receive returns EAGAIN to a blocking reader woken without data, the reason the
//! fast path is off by default.
use anyhow::{ensure, Result};
use serde_json::Value;
use ztunnel_tests::{pod, Cluster, ProbeOutput};

mod common;

use common::{mesh_pod, AMBIENT, WAIT};

/// Bytes each stream sends (and gets echoed back) in the transfers.
const BYTES: u64 = 32 << 20;
const STREAMS: u64 = 2;

/// shop (ambient): `web` and `neighbour` on node 2, `client` on node 1; legacy (not enrolled):
/// `sleep` on node 2.
fn start() -> Result<Cluster> {
    let c = Cluster::builder()
        .nodes(2)
        .namespace("shop", &[AMBIENT])
        .namespace("legacy", &[])
        .pod(mesh_pod("shop", "web", 2))
        .pod(mesh_pod("shop", "neighbour", 2))
        .pod(mesh_pod("shop", "client", 1))
        .pod(pod("legacy", "sleep").node(2))
        .start()?;
    for (node, p) in [(2, "shop/web"), (2, "shop/neighbour"), (1, "shop/client")] {
        c.wait_enrolled(node, 0, p, WAIT)?;
    }
    Ok(c)
}

/// Restarts node `i`'s proxy with `--fast-path <switch>` and waits until it enrolled `pod`.
fn restart_with(c: &Cluster, i: usize, switch: &str, pod: &str) -> Result<()> {
    c.stop_proxy(i)?;
    let mark = c.log_mark(i);
    c.start_proxy_with(i, &["--fast-path", switch])?;
    c.wait_enrolled(i, mark, pod, WAIT).map(drop)
}

/// [`start`] with the fast path on in both proxies.
fn start_on() -> Result<Cluster> {
    let c = start()?;
    restart_with(&c, 1, "on", "shop/client")?;
    restart_with(&c, 2, "on", "shop/web")?;
    Ok(c)
}

/// The fast path's counters of node `i`'s proxy (`ztunnel_fast_path_*`).
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    sockets: f64,
    redirected_bytes: f64,
    redirected_messages: f64,
    tcp_messages: f64,
    active_tcp: f64,
}

impl Counters {
    fn of(c: &Cluster, i: usize) -> Result<Self> {
        let s = c.node(i).scrape()?;
        let get = |name: &str| s.sum(&format!("ztunnel_fast_path_{name}_total"), &[]);
        Ok(Self {
            sockets: get("sockets"),
            redirected_bytes: get("redirected_bytes"),
            redirected_messages: get("redirected_messages"),
            tcp_messages: get("tcp_messages"),
            active_tcp: get("active_tcp"),
        })
    }

    fn since(self, before: Self) -> Self {
        Self {
            sockets: self.sockets - before.sockets,
            redirected_bytes: self.redirected_bytes - before.redirected_bytes,
            redirected_messages: self.redirected_messages - before.redirected_messages,
            tcp_messages: self.tcp_messages - before.tcp_messages,
            active_tcp: self.active_tcp - before.active_tcp,
        }
    }
}

/// The bytes that a connection opener whose first message beat its peer's handshake sent
/// through TCP (that one direction of that connection stays on TCP; it is counted).
fn lost_of(d: Counters) -> f64 {
    d.active_tcp * BYTES as f64
}

fn ok(out: ProbeOutput, what: &str) -> Result<Value> {
    ensure!(
        out.code == Some(0),
        "{what}: vc-probe exited {:?}: {} {}",
        out.code,
        out.stdout,
        out.stderr
    );
    Ok(out.json)
}

/// `STREAMS` connections from `from` to the echo server at `dst`, each sending `BYTES` and
/// half-closing, each reading the echo to EOF and comparing it byte for byte.
fn transfer(c: &Cluster, from: (&str, &str), dst: &str, what: &str) -> Result<()> {
    let out = ok(
        c.pod(from.0, from.1).probe(&[
            "transfer",
            "--addr",
            dst,
            "--bytes",
            &BYTES.to_string(),
            "--streams",
            &STREAMS.to_string(),
            "--retry-eagain",
            "true",
        ])?,
        what,
    )?;
    ensure!(out["intact"] == STREAMS, "{what}: {out}");
    Ok(())
}

#[test]
fn the_fast_path_carries_the_bytes_intact_both_ways() -> Result<()> {
    let c = start_on()?;
    let web = c.pod("shop", "web");
    let _echo = web.tcp_echo(7001)?;
    let dst = format!("{}:7001", web.ip());
    for i in [1, 2] {
        let on = c.node(i).scrape()?.sum("ztunnel_fast_path_enabled", &[]);
        ensure!(on == 1.0, "node{i}: the fast path is on");
    }
    // Each stream's bytes cross an app↔proxy pair twice on its way out (caller → its proxy,
    // proxy → web) and twice on the way back; each crossing is one redirect when the fast path
    // carries it.
    let moved = (2 * BYTES * STREAMS) as f64;

    // Same node: all four crossings are on node 2, two app↔proxy pairs per connection.
    let before = Counters::of(&c, 2)?;
    transfer(&c, ("shop", "neighbour"), &dst, "same node")?;
    let d = Counters::of(&c, 2)?.since(before);
    ensure!(
        d.sockets >= (4 * STREAMS) as f64,
        "same node: both ends of both pairs of each connection join: {d:?}"
    );
    // An opener whose first message beat its peer's handshake keeps that one direction on
    // TCP (it is counted); every other byte is redirected.
    let lost = lost_of(d);
    ensure!(
        d.redirected_bytes + lost >= 2.0 * moved,
        "same node: the redirected bytes should cover both pairs both ways: {d:?}"
    );
    ensure!(d.redirected_bytes >= moved, "same node: {d:?}");

    // Across nodes (HBONE): the caller's pair on node 1, web's on node 2; the HBONE
    // connection between the proxies is never on the fast path.
    let (b1, b2) = (Counters::of(&c, 1)?, Counters::of(&c, 2)?);
    transfer(&c, ("shop", "client"), &dst, "HBONE")?;
    let (d1, d2) = (
        Counters::of(&c, 1)?.since(b1),
        Counters::of(&c, 2)?.since(b2),
    );
    for (node, d) in [(1, d1), (2, d2)] {
        ensure!(
            d.sockets == (2 * STREAMS) as f64,
            "HBONE, node{node}: exactly the app↔proxy pair of each connection joins: {d:?}"
        );
        ensure!(
            d.redirected_bytes + lost_of(d) >= moved,
            "HBONE, node{node}: {d:?}"
        );
    }

    // A pod outside the mesh: its sockets never qualify, nor the proxy's socket that
    // accepted from it; only the proxy→web delivery pair of each connection joins.
    let before = Counters::of(&c, 2)?;
    transfer(&c, ("legacy", "sleep"), &dst, "plaintext")?;
    let d = Counters::of(&c, 2)?.since(before);
    ensure!(
        d.sockets == (2 * STREAMS) as f64 && d.redirected_bytes + lost_of(d) >= moved,
        "plaintext: exactly the delivery pair of each connection joins: {d:?}"
    );
    Ok(())
}

#[test]
fn fast_path_off_keeps_every_byte_on_loopback_tcp() -> Result<()> {
    // Off by default; then on; then off again (which must take down what on put up).
    let c = start()?;
    let web = c.pod("shop", "web");
    let _echo = web.tcp_echo(7001)?;
    let dst = format!("{}:7001", web.ip());
    let bpf_dir = c.node(2).bpf_dir();
    let pins = [
        "link_cgroup_fast_path_sockops",
        "link_proxy_cgroup_fast_path_sockops",
        "prog_fast_path_sockops",
        "prog_fast_path_msg",
    ];
    for round in ["default", "on", "off"] {
        if round != "default" {
            restart_with(&c, 2, round, "shop/web")?;
        }
        let on = round == "on";
        for pin in pins {
            ensure!(
                bpf_dir.join(pin).exists() == on,
                "{round}: {pin} should {}exist",
                if on { "" } else { "not " }
            );
        }
        ensure!(
            c.node(2).scrape()?.sum("ztunnel_fast_path_enabled", &[]) == on as u8 as f64,
            "{round}: the gauge"
        );
        let before = Counters::of(&c, 2)?;
        transfer(&c, ("shop", "neighbour"), &dst, round)?;
        let d = Counters::of(&c, 2)?.since(before);
        if on {
            ensure!(d.redirected_bytes > 0.0, "{round}: {d:?}");
        } else {
            ensure!(
                d.sockets == 0.0 && d.redirected_bytes == 0.0,
                "{round}: nothing joins with the fast path off: {d:?}"
            );
        }
    }
    Ok(())
}
