//! `cargo xtask demo`: a guided tour of the node proxy on a virtual two-node cluster.
//!
//! Every claim it prints is checked against what really happened (the proxies' logs, the
//! client's view, the kernel's pins); a step that does not behave fails the demo.
use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use ztunnel_tests::{pod, service, Cluster, ProbeOutput};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const WAIT: Duration = Duration::from_secs(15);

fn step(title: &str) {
    static STEP: AtomicU32 = AtomicU32::new(1);
    let n = STEP.fetch_add(1, Ordering::Relaxed);
    println!("\n\x1b[1m{n}. {title}\x1b[0m");
}

fn say(text: &str) {
    println!("   {text}");
}

/// Prints a command's output indented, at most `max` lines.
fn show(cmd: &[&str], max: usize) -> Result<String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .with_context(|| format!("running {}", cmd[0]))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("   $ {}", cmd.join(" "));
    for line in text.lines().take(max) {
        println!("     {line}");
    }
    Ok(text)
}

fn describe(conn: &Value) -> String {
    let s = |k: &str| conn[k].as_str().unwrap_or("-").to_owned();
    let via = conn["dst_service"]
        .as_str()
        .map(|svc| format!(" via service {svc}"))
        .unwrap_or_default();
    format!(
        "{} → {}{via} (workload {}, upstream {}): {} bytes sent, {} received, {} ms, {}",
        s("src_workload"),
        s("dst_addr"),
        s("dst_workload"),
        s("upstream"),
        conn["bytes_sent"],
        conn["bytes_received"],
        conn["duration_ms"],
        s("outcome"),
    )
}

fn expect_ok(out: &ProbeOutput, what: &str) -> Result<()> {
    ensure!(
        out.code == Some(0),
        "{what} failed: {}{}",
        out.stdout,
        out.stderr
    );
    Ok(())
}

fn main() -> Result<()> {
    println!(
        "\x1b[1mztunnel demo\x1b[0m: eBPF capture and mTLS tunnels in a node-level ambient proxy"
    );
    say("(network namespaces on this machine: an underlay bridge, 2 nodes, pods behind veths)");

    step("Start the cluster and one ztunnel per node");
    let c = Cluster::builder()
        .nodes(2)
        .namespace("shop", &[AMBIENT])
        .namespace("legacy", &[])
        .pod(pod("shop", "client").node(1).service_account("client"))
        .pod(
            pod("shop", "web-1")
                .node(2)
                .service_account("web")
                .labels(&[("app", "web")]),
        )
        .pod(
            pod("shop", "web-2")
                .node(2)
                .service_account("web")
                .labels(&[("app", "web")]),
        )
        .pod(pod("legacy", "old-client").node(1))
        .service(
            service("shop", "web")
                .selector(&[("app", "web")])
                .port(80, 8080),
        )
        .start()?;
    let client = c.pod("shop", "client");
    let web1 = c.pod("shop", "web-1");
    let web2 = c.pod("shop", "web-2");
    let legacy = c.pod("legacy", "old-client");
    let vip = c.service_vip("shop", "web");
    say(&format!(
        "namespace shop is labelled {}={}: shop/client ({}) on node1, shop/web-1 ({}) and shop/web-2 ({}) on node2",
        AMBIENT.0,
        AMBIENT.1,
        client.ip(),
        web1.ip(),
        web2.ip()
    ));
    say(&format!(
        "service shop/web has the virtual IP {vip}, port 80 → 8080"
    ));
    say(&format!(
        "namespace legacy is not labelled: legacy/old-client ({}) on node1",
        legacy.ip()
    ));
    let _servers = [
        web1.http_server(8080, "web-1")?,
        web2.http_server(8080, "web-2")?,
    ];
    for (node, pod) in [(1, "shop/client"), (2, "shop/web-1"), (2, "shop/web-2")] {
        c.wait_enrolled(node, 0, pod, WAIT)?;
    }
    say("both proxies are up and have enrolled the three shop pods (and not legacy/old-client)");

    step("What the kernel holds: pinned programs, links and maps (no iptables, no nftables)");
    let bpf = c.bpf_dir(1);
    show(
        &[
            "ls",
            &bpf.display().to_string(),
            &bpf.join("pods").display().to_string(),
        ],
        30,
    )?;
    show(
        &[
            "bpftool",
            "prog",
            "show",
            "pinned",
            &bpf.join("prog_connect4").display().to_string(),
        ],
        3,
    )?;
    let enrolled = show(
        &[
            "bpftool",
            "map",
            "dump",
            "pinned",
            &bpf.join("enrolled_netns").display().to_string(),
        ],
        5,
    )?;
    ensure!(
        enrolled.contains("Found 1 element"),
        "node1 should have exactly one enrolled netns"
    );
    say(
        "node1 enrols one network namespace (shop/client's); legacy/old-client's is not in the map",
    );

    step("shop/client calls shop/web-1 by pod IP");
    let (m1, m2) = (c.log_mark(1), c.log_mark(2));
    let target = format!("{}:8080", web1.ip());
    let out = client.get(&target)?;
    expect_ok(&out, "client → web-1")?;
    say(&format!(
        "the client got HTTP 200 from {}",
        out.body()["server"]
    ));
    say(&format!(
        "the client's getpeername() says {} — the address it dialled, not the proxy's 127.0.0.1:15001",
        out.json["peer"].as_str().unwrap_or("?")
    ));
    ensure!(
        out.json["peer"] == target.as_str(),
        "getpeername was not restored"
    );
    let outbound = c.wait_for_connection(1, m1, WAIT, |l| l["direction"] == "outbound")?;
    say(&format!(
        "node1 proxy (outbound, captured by cgroup/connect4): {}",
        describe(&outbound)
    ));
    let inbound = c.wait_for_connection(2, m2, WAIT, |l| l["direction"] == "inbound")?;
    say(&format!(
        "node2 proxy (inbound, steered by sk_lookup):        {}",
        describe(&inbound)
    ));
    say("the source workload is known from the listener that accepted it, not from a source IP");
    ensure!(
        outbound["hbone"] == true && inbound["hbone"] == true,
        "cross-node traffic should travel through HBONE"
    );
    say(&format!(
        "between the nodes it travelled as HBONE (HTTP/2 CONNECT over mutual TLS 1.3, port 15008):\n     \
         node1 presented {} and checked that node2 presented {};\n     \
         node2 saw the client's identity {} in its certificate",
        outbound["src_identity"].as_str().unwrap_or("?"),
        outbound["dst_identity"].as_str().unwrap_or("?"),
        inbound["src_identity"].as_str().unwrap_or("?"),
    ));

    step("What crossed the wire (tcpdump on node1's underlay port)");
    let (out, bytes, summary) = c.capture_underlay(1, || {
        client.probe(&["get", "--addr", &target, "--path", "/orders/42?card=4111"])
    })?;
    expect_ok(&out, "client → web-1 (captured)")?;
    let on_wire = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    ensure!(
        !on_wire(b"/orders/42"),
        "the request crossed the underlay in plaintext"
    );
    ensure!(
        !summary.is_empty() && summary.lines().all(|l| l.contains(".15008")),
        "traffic other than the tunnel crossed the underlay:\n{summary}"
    );
    for line in summary.lines().take(4) {
        say(line);
    }
    say(&format!(
        "… {} packets, all to or from port 15008; the request path /orders/42 appears in none",
        summary.lines().count()
    ));

    step("shop/client calls the service VIP twice: round-robin over web-1 and web-2");
    let mut servers = Vec::new();
    for _ in 0..2 {
        let m = c.log_mark(1);
        let out = client.get(&format!("{vip}:80"))?;
        expect_ok(&out, "client → service")?;
        let conn = c.wait_for_connection(1, m, WAIT, |l| l["direction"] == "outbound")?;
        say(&format!(
            "answered by {}; node1: {}",
            out.body()["server"],
            describe(&conn)
        ));
        servers.push(out.body()["server"].clone());
    }
    ensure!(
        servers[0] != servers[1],
        "round-robin should reach both endpoints"
    );

    step("legacy/old-client (namespace not enrolled) calls shop/web-1");
    let (m1, m2) = (c.log_mark(1), c.log_mark(2));
    expect_ok(&legacy.get(&target)?, "legacy → web-1")?;
    let inbound = c.wait_for_connection(2, m2, WAIT, |l| l["direction"] == "inbound")?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        c.connections_since(1, m1).is_empty(),
        "node1 must not capture a non-enrolled pod"
    );
    say("node1 proxy logged nothing: old-client's traffic is not captured");
    say(&format!(
        "node2 proxy still sees it arrive at the enrolled web-1: {}",
        describe(&inbound)
    ));

    step("PeerAuthentication: a mesh-wide STRICT refuses plaintext from outside the mesh");
    let m2 = c.log_mark(2);
    c.write_raw(
        "peer-authentication.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n",
    )?;
    c.wait_for_log_since(2, m2, WAIT, |l| l["message"] == "configuration applied")?;
    say("wrote PeerAuthentication istio-system/default with mtls.mode STRICT (root namespace: mesh-wide)");
    let m2 = c.log_mark(2);
    let out = legacy.get(&target)?;
    ensure!(
        out.code != Some(0),
        "under STRICT the legacy client was let in: {}",
        out.stdout
    );
    let refused = c.wait_for_connection(2, m2, WAIT, |l| l["direction"] == "inbound")?;
    ensure!(
        refused["outcome"] == "refused" && refused["mtls_mode"] == "STRICT",
        "node2 should refuse the plaintext connection under STRICT: {refused}"
    );
    say(&format!(
        "legacy/old-client → web-1 is reset; node2 says: {}",
        refused["error"].as_str().unwrap_or("?")
    ));
    let m2 = c.log_mark(2);
    expect_ok(&client.get(&target)?, "client → web-1 under STRICT")?;
    let inbound = c.wait_for_connection(2, m2, WAIT, |l| l["direction"] == "inbound")?;
    say(&format!(
        "shop/client → web-1 still works: it arrives over mutual TLS as {}",
        inbound["src_identity"].as_str().unwrap_or("?")
    ));
    let m2 = c.log_mark(2);
    c.remove_raw("peer-authentication.yaml")?;
    c.wait_for_log_since(2, m2, WAIT, |l| l["message"] == "configuration applied")?;
    expect_ok(
        &legacy.get(&target)?,
        "legacy → web-1 after the policy is removed",
    )?;
    say("policy removed: back to the default PERMISSIVE, the legacy client gets in again (no restarts)");

    step("Remove the ambient label from namespace shop (hot reload, no pod restarts)");
    let m1 = c.log_mark(1);
    c.set_namespace_labels("shop", &[])?;
    c.wait_for_log_since(1, m1, WAIT, |l| l["message"] == "pod un-enrolled")?;
    let pods_left = std::fs::read_dir(bpf.join("pods"))?.count();
    ensure!(pods_left == 0, "per-pod pins remain after un-enrolment");
    let m1 = c.log_mark(1);
    expect_ok(&client.get(&target)?, "client → web-1 un-enrolled")?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        c.connections_since(1, m1).is_empty(),
        "un-enrolled traffic was still captured"
    );
    say("shop/client was un-enrolled: its sk_lookup link pin is gone, the request went direct");

    step("Label it again, then kill node1's proxy: enrolled pods fail closed");
    let m1 = c.log_mark(1);
    c.set_namespace_labels("shop", &[AMBIENT])?;
    c.wait_enrolled(1, m1, "shop/client", WAIT)?;
    c.kill_proxy(1)?;
    let out = client.get(&target)?;
    if out.code == Some(0) {
        bail!(
            "with the proxy down, the connection bypassed it: {}",
            out.stdout
        );
    }
    say(&format!(
        "with no proxy on node1, shop/client's request fails ({}) instead of leaving in plaintext",
        out.json["error"].as_str().unwrap_or("error")
    ));
    let m1 = c.log_mark(1);
    c.start_proxy(1)?;
    c.wait_enrolled(1, m1, "shop/client", WAIT)?;
    expect_ok(&client.get(&target)?, "client → web-1 after restart")?;
    say("a new proxy re-adopted the pins, re-opened the pod's listeners, and traffic flows again");

    step("AuthorizationPolicy at L7, in the node proxy: who may call, and which requests");
    c.apply(
        "authorization.yaml",
        Some(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-api, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]\n    to: [{operation: {methods: [GET], paths: [\"/api/*\"]}}]\n",
        ),
    )?;
    say("policy shop/web-api: only spiffe://cluster.local/ns/shop/sa/client, only GET /api/*");
    let status = |out: &ProbeOutput| out.json["status"].as_u64().unwrap_or(0);
    let ok_api = client.probe(&["get", "--addr", &target, "--path", "/api/orders"])?;
    let admin = client.probe(&["get", "--addr", &target, "--path", "/admin"])?;
    let legacy_api = legacy.probe(&["get", "--addr", &target, "--path", "/api/orders"])?;
    ensure!(
        status(&ok_api) == 200,
        "client GET /api/orders: {}",
        ok_api.stdout
    );
    ensure!(status(&admin) == 403, "client GET /admin: {}", admin.stdout);
    ensure!(
        legacy_api.code != Some(0),
        "the legacy client must be refused: {}",
        legacy_api.stdout
    );
    say("shop/client GET /api/orders → 200 (the request went on to web-1)");
    say(&format!(
        "shop/client GET /admin      → {} {:?}: decided per request by node2's proxy, never reached web-1",
        status(&admin),
        admin.json["body"].as_str().unwrap_or("")
    ));
    let denial = c.wait_for_log(2, WAIT, |l| {
        l["message"] == "authorization denied" && l["path"] == "/admin"
    })?;
    say(&format!(
        "node2 logged: authorization denied for {} ({})",
        denial["src_principal"].as_str().unwrap_or("?"),
        denial["reason"].as_str().unwrap_or("?")
    ));
    say("legacy/old-client (no identity) → refused: no ALLOW rule matches a caller without a principal");
    c.apply("authorization.yaml", None)?;
    say("ztunnel policy check answers the same questions offline; see docs/policy.md");

    step("Clean up");
    let prefix = c.prefix().to_owned();
    drop(c);
    let netns =
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
            .into_owned();
    ensure!(
        !netns.contains(&prefix),
        "network namespaces of the demo remain"
    );
    say(&format!(
        "removed every network namespace, cgroup, pin and process named {prefix}-*"
    ));
    println!("\n\x1b[1mdemo finished\x1b[0m");
    Ok(())
}
