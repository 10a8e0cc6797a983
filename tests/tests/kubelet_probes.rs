//! Kubelet probes under mesh-wide STRICT (docs/policy.md, "Kubelet probes"): a connection a
//! process of the node makes to an enrolled pod is admitted in plaintext, as Istio admits its
//! kubelet probes; a pod whose packets carry the node's address (hairpin NAT, as portmap and
//! kube-proxy make them) is still refused, and so is any other plaintext client.
//!
//! One node: `shop` (ambient) with `web`, `legacy` (not in the mesh) with `client`; the
//! README's mesh-wide STRICT PeerAuthentication in `istio-system`.
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use serde_json::Value;
use ztunnel_tests::{pod, Cluster, ProbeOutput};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const WAIT: Duration = Duration::from_secs(15);
const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n";

fn start() -> Result<(Cluster, ztunnel_tests::Proc)> {
    let c = Cluster::builder()
        .namespace("shop", &[AMBIENT])
        .namespace("legacy", &[])
        .namespace("istio-system", &[])
        .pod(pod("shop", "web").labels(&[("app", "web")]))
        .pod(pod("legacy", "client"))
        .start()?;
    c.wait_enrolled(1, 0, "shop/web", WAIT)?;
    let server = c.pod("shop", "web").http_server(8080, "web")?;
    c.apply("peer-authentication-strict.yaml", Some(STRICT))?;
    Ok((c, server))
}

fn web(c: &Cluster) -> String {
    format!("{}:8080", c.pod("shop", "web").ip())
}

/// `vc-probe get` as a process of node 1 (what the kubelet's HTTP probe does).
fn probe_from_node(c: &Cluster, addr: &str) -> Result<ProbeOutput> {
    let bin = ztunnel_tests::probe_bin_checked()?.display().to_string();
    let out = c.node(1).exec_as_node(
        &[&bin, "get", "--addr", addr, "--timeout-ms", "5000"],
        Duration::from_secs(10),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(ProbeOutput {
        code: out.status.code(),
        json: stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The proxy's "connection closed" line for `addr` after `mark`.
fn closed(c: &Cluster, mark: usize, addr: &str) -> Result<Value> {
    c.wait_for_connection(1, mark, WAIT, |l| {
        l["direction"] == "inbound" && l["dst_addr"] == addr
    })
}

fn expect_refused_strict(c: &Cluster, out: &ProbeOutput, line: &Value) -> Result<()> {
    let _ = c;
    ensure!(out.code != Some(0), "must be refused: {}", out.stdout);
    ensure!(line["outcome"] == "refused", "{line}");
    ensure!(line["mtls_mode"] == "STRICT", "{line}");
    ensure!(
        line["error"]
            .as_str()
            .is_some_and(|e| e.contains("plaintext refused")),
        "{line}"
    );
    Ok(())
}

#[test]
fn the_nodes_probes_reach_enrolled_pods_under_strict_and_nothing_else_does() -> Result<()> {
    let (c, _server) = start()?;
    let web = web(&c);
    let before = c.node(1).scrape()?;

    // The kubelet's probe: a process of the node.
    let mark = c.log_mark(1);
    let out = probe_from_node(&c, &web)?;
    ensure!(
        out.code == Some(0),
        "the probe must pass: {} {}",
        out.stdout,
        out.stderr
    );
    ensure!(out.json["status"] == 200, "{}", out.stdout);
    let line = closed(&c, mark, &web)?;
    ensure!(line["transport"] == "node", "{line}");
    ensure!(line["src_workload"] == "node", "{line}");
    ensure!(line["outcome"] == "ok", "{line}");
    ensure!(
        line["src_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{}:", c.node(1).ip()))),
        "from the node's address: {line}"
    );

    // Counted as the node's, not as plaintext from an unknown caller.
    let after = c.node(1).scrape()?;
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    ensure!(
        delta("ztunnel_node_connections_total", &[("outcome", "admitted")]) >= 1.0
            || delta("ztunnel_node_connections", &[("outcome", "admitted")]) >= 1.0,
        "ztunnel_node_connections{{outcome=admitted}} did not grow"
    );
    ensure!(
        delta(
            "istio_tcp_connections_opened_total",
            &[("transport", "node"), ("source_workload", "node")]
        ) + delta(
            "istio_tcp_connections_opened",
            &[("transport", "node"), ("source_workload", "node")]
        ) >= 1.0,
        "the connection is labelled as the node's"
    );
    for name in [
        "ztunnel_plaintext_connections_total",
        "ztunnel_plaintext_connections",
    ] {
        ensure!(delta(name, &[]) == 0.0, "{name} counted the probe");
    }
    for name in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_opened",
    ] {
        ensure!(
            delta(name, &[("source_workload", "unknown")]) == 0.0,
            "the probe was counted as coming from an unknown workload"
        );
    }

    // A plaintext client pod is still refused.
    let mark = c.log_mark(1);
    let out = c.pod("legacy", "client").get(&web)?;
    expect_refused_strict(&c, &out, &closed(&c, mark, &web)?)?;

    // As in Istio, probes are not subject to AuthorizationPolicy either: allow-nothing on web.
    c.apply(
        "allow-nothing.yaml",
        Some("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-nothing\n  namespace: shop\nspec: {}\n"),
    )?;
    let out = probe_from_node(&c, &web)?;
    ensure!(out.code == Some(0), "the probe must pass: {}", out.stdout);
    Ok(())
}

/// Runs `nft <args>` in node 1's netns.
fn nft(c: &Cluster, args: &[&str]) -> Result<()> {
    let mut all = vec!["nft"];
    all.extend_from_slice(args);
    let out = c.node(1).exec(&all, Duration::from_secs(10))?;
    if !out.status.success() {
        bail!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn a_pod_that_arrives_with_the_nodes_address_is_still_refused() -> Result<()> {
    let (c, _server) = start()?;
    let web = web(&c);
    let (client, web_ip, node_ip) = (
        c.pod("legacy", "client").ip().to_string(),
        c.pod("shop", "web").ip().to_string(),
        c.node(1).ip().to_string(),
    );
    // Hairpin NAT in the node (in this test's own node netns): the client pod's connections to
    // web leave the node with the node's address, as portmap or kube-proxy would send them.
    nft(&c, &["add", "table", "ip", "ztt_spoof"])?;
    nft(
        &c,
        &[
            "add",
            "chain",
            "ip",
            "ztt_spoof",
            "post",
            "{ type nat hook postrouting priority srcnat; policy accept; }",
        ],
    )?;
    nft(
        &c,
        &[
            "add",
            "rule",
            "ip",
            "ztt_spoof",
            "post",
            "ip",
            "saddr",
            &client,
            "ip",
            "daddr",
            &web_ip,
            "tcp",
            "dport",
            "8080",
            "snat",
            "to",
            &node_ip,
        ],
    )?;

    let mark = c.log_mark(1);
    let out = c.pod("legacy", "client").get(&web)?;
    let line = closed(&c, mark, &web)?;
    ensure!(
        line["src_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{node_ip}:"))),
        "the NAT is in force (the pod arrives with the node's address): {line}"
    );
    expect_refused_strict(&c, &out, &line)?;

    // The node's own probe still passes next to it.
    let out = probe_from_node(&c, &web)?;
    ensure!(out.code == Some(0), "the probe must pass: {}", out.stdout);

    // The exemption admits a connection to the application, nothing more: a probe of a port
    // where the application does not listen fails as it would without the mesh.
    let closed_port = format!("{web_ip}:9999");
    let mark = c.log_mark(1);
    let out = probe_from_node(&c, &closed_port)?;
    ensure!(out.code != Some(0), "{}", out.stdout);
    let line = closed(&c, mark, &closed_port)?;
    ensure!(line["outcome"] == "connect_failed", "{line}");
    Ok(())
}
