//! End-to-end tests of IPv6 and dual-stack pods (issue 20): the capture, HBONE and policy
//! checks that run over IPv4 elsewhere, run per IP family. Pods get ULA addresses inside the
//! test netns (`fd10::/16`, see `ztunnel_tests::cluster::addresses`), Services get one cluster
//! IP per family, and the underlay between nodes carries the families the cluster has, so an
//! IPv6 tunnel crosses an IPv6 underlay.
use anyhow::{ensure, Context as _, Result};
use serde_json::Value;
use ztunnel_tests::{pod, service, socket_addr, Cluster, Family, ProbeOutput};

mod common;

use common::{istio, mesh_pod, AMBIENT, WAIT};

/// The callers of every check: across nodes (HBONE), on the destination's node, and a pod
/// outside the mesh (plaintext).
const CALLERS: [(&str, &str, Via); 3] = [
    ("shop", "client", Via::Hbone),
    ("shop", "neighbour", Via::SameNode),
    ("legacy", "sleep", Via::Plaintext),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Hbone,
    SameNode,
    Plaintext,
}

/// shop (ambient): `web` (node 2, `app: web`) behind Service `web` (80 → 8080), `client`
/// (node 1) and `neighbour` (node 2); legacy (not enrolled): `sleep` (node 1); istio-system
/// (for mesh-wide policy). Every pod and the Service have one address of each of `families`,
/// the first the primary.
fn start(families: &[Family]) -> Result<Cluster> {
    let c = Cluster::builder()
        .nodes(2)
        .families(families)
        .namespace("shop", &[AMBIENT])
        .namespace("legacy", &[])
        .namespace("istio-system", &[])
        .pod(mesh_pod("shop", "web", 2))
        .pod(mesh_pod("shop", "client", 1))
        .pod(mesh_pod("shop", "neighbour", 2))
        .pod(pod("legacy", "sleep").node(1))
        .service(
            service("shop", "web")
                .selector(&[("app", "web")])
                .port(80, 8080),
        )
        .start()?;
    for (node, p) in [(2, "shop/web"), (2, "shop/neighbour"), (1, "shop/client")] {
        let enrolled = c.wait_enrolled(node, 0, p, WAIT)?;
        // Every address of the pod is captured, not only the primary.
        let (ns, name) = p.split_once('/').expect("ns/name");
        for ip in c.pod(ns, name).ips() {
            ensure!(
                enrolled.to_string().contains(&ip.to_string()),
                "{p} enrolled without {ip}: {enrolled}"
            );
        }
    }
    Ok(c)
}

/// What the probe printed, or an error saying `what` failed and everything it printed.
fn ok(out: ProbeOutput, what: &str) -> Result<Value> {
    Ok(out.succeeded().context(what.to_owned())?.json)
}

fn ip_of(addr: &Value) -> Option<String> {
    let sa: std::net::SocketAddr = addr.as_str()?.parse().ok()?;
    Some(sa.ip().to_string())
}

/// The inbound "connection closed" line node 2 logged after `mark` for `dst`.
fn inbound_line(c: &Cluster, mark: usize, dst: &str) -> Result<Value> {
    c.wait_for_connection(2, mark, WAIT, |l| {
        l["direction"] == "inbound" && l["dst_addr"] == dst
    })
}

/// Every caller reaches `web` at its `family` address, each on its own path, and what the
/// applications see and the proxies log is what they are over IPv4: the client's
/// `getpeername()` is what it dialled and its `getsockname()` its own pod address of that
/// family; the inbound side logs the path, the source workload and identity. Then the
/// Service's cluster IP of `family` leads to web's address of the same family.
fn every_path_carries(c: &Cluster, family: Family) -> Result<()> {
    let _server = c.pod("shop", "web").http_server(8080, "web")?;
    let web = c.pod("shop", "web").addr(family, 8080);
    for (ns, name, via) in CALLERS {
        let from = c.pod(ns, name);
        let what = format!("{family} {via:?} from {}", from.workload());
        let mark = c.log_mark(2);
        let out = ok(from.get(&web)?, &what)?;
        ensure!(out["peer"] == web.as_str(), "{what}: getpeername(): {out}");
        let own = from.ip_of(family).to_string();
        ensure!(
            ip_of(&out["local"]).as_deref() == Some(own.as_str()),
            "{what}: getsockname() should be the pod's {family} address {own}: {out}"
        );
        ensure!(
            out["body"].as_str().is_some_and(|b| b.contains("web")),
            "{what}: {out}"
        );
        let line = inbound_line(c, mark, &web).with_context(|| what.clone())?;
        ensure!(line["outcome"] == "ok", "{what}: {line}");
        // Flags are logged when set.
        let flag = |name: &str| line[name].as_bool().unwrap_or(false);
        ensure!(flag("hbone") == (via == Via::Hbone), "{what}: {line}");
        ensure!(
            flag("same_node") == (via == Via::SameNode),
            "{what}: {line}"
        );
        if via != Via::Plaintext {
            ensure!(
                line["src_workload"] == from.workload().as_str(),
                "{what}: {line}"
            );
            ensure!(
                line["src_identity"] == format!("spiffe://cluster.local/ns/shop/sa/{name}"),
                "{what}: {line}"
            );
        }
        if via == Via::Hbone {
            // The tunnel is dialled from the client pod's address of the same family.
            ensure!(
                ip_of(&line["src_addr"]).as_deref() == Some(own.as_str()),
                "{what}: the tunnel should come from {own}: {line}"
            );
        }
    }
    let vip = socket_addr(c.service_vip_of("shop", "web", family), 80);
    let client = c.pod("shop", "client");
    let mark = c.log_mark(1);
    let out = ok(client.get(&vip)?, &format!("{family} Service VIP"))?;
    ensure!(out["peer"] == vip.as_str(), "{out}");
    let line = c.wait_for_connection(1, mark, WAIT, |l| {
        l["direction"] == "outbound" && l["dst_addr"] == vip.as_str()
    })?;
    ensure!(line["dst_service"] == "shop/web", "{line}");
    ensure!(
        line["upstream"] == web.as_str(),
        "a {family} VIP leads to the {family} endpoint: {line}"
    );
    ensure!(line["hbone"] == true, "{line}");
    Ok(())
}

/// What crosses node 1's underlay port while client fetches web at its `family` address:
/// only mutual TLS on the tunnel port, all of it over `family`.
fn the_tunnel_crosses_the_underlay_as(c: &Cluster, family: Family) -> Result<()> {
    let _server = c.pod("shop", "web").http_server(8080, "web")?;
    let web = c.pod("shop", "web").addr(family, 8080);
    let (out, bytes, text) = c.capture_underlay(1, || {
        c.pod("shop", "client")
            .probe(&["get", "--addr", &web, "--path", "/secret-path-6c1d"])?
            .succeeded()
    })?;
    ensure!(out.json["peer"] == web.as_str(), "{}", out.stdout);
    let problem = ztunnel_tests::underlay_not_only_mtls(&bytes, &text, &[b"secret-path-6c1d"]);
    ensure!(problem.is_none(), "{family}: {problem:?}");
    // tcpdump writes `IP6 a.port > b.port` for IPv6 and `IP a.port > b.port` for IPv4.
    let marker = match family {
        Family::V4 => "IP ",
        Family::V6 => "IP6 ",
    };
    let node2 = c.pod("shop", "web").ip_of(family).to_string();
    ensure!(
        text.lines().all(|l| l.contains(marker)) && text.contains(&format!("{node2}.15008")),
        "the tunnel to {node2} should cross the underlay over {family} only:\n{text}"
    );
    Ok(())
}

#[test]
fn ipv6_only_pods_are_captured_tunnelled_and_served() -> Result<()> {
    let c = start(&[Family::V6])?;
    every_path_carries(&c, Family::V6)?;
    the_tunnel_crosses_the_underlay_as(&c, Family::V6)?;
    // Nothing of IPv4 exists: a v4-mapped destination fails at once, as it would unmeshed.
    let out = c.pod("shop", "client").get("[::ffff:10.2.0.2]:8080")?;
    ensure!(out.code != Some(0), "{}", out.stdout);
    // Outside the cluster's namespaces (this test process, in the host netns) a cluster IPv6
    // address goes nowhere: the guard route answers, not the host's IPv6 default route. The
    // route is checked first, so a missing guard fails without sending anything.
    let owners = ztunnel_tests::cluster::addresses::guard_route_owners();
    ensure!(
        owners.contains(&std::process::id()),
        "no unreachable route for {} in the host netns: {owners:?}",
        ztunnel_tests::cluster::addresses::V6_RANGE
    );
    for ip in [
        c.pod("shop", "web").ip_of(Family::V6),
        c.service_vip_of("shop", "web", Family::V6),
    ] {
        let dst = std::net::SocketAddr::new(ip, 8080);
        let e = std::net::TcpStream::connect_timeout(&dst, std::time::Duration::from_secs(2))
            .err()
            .with_context(|| format!("{dst} answered in the host netns"))?;
        // An IPv6 `unreachable` route answers EHOSTUNREACH at once.
        ensure!(
            e.kind() == std::io::ErrorKind::HostUnreachable,
            "{dst} from the host: {e}"
        );
    }
    Ok(())
}

#[test]
fn dual_stack_pods_reach_each_other_by_either_family() -> Result<()> {
    let c = start(&[Family::V4, Family::V6])?;
    for family in [Family::V4, Family::V6] {
        every_path_carries(&c, family)?;
        the_tunnel_crosses_the_underlay_as(&c, family)?;
    }
    // An IPv6 socket dialling a v4-mapped address travels as IPv4 (HBONE over the IPv4
    // underlay) and sees v4-mapped addresses on both ends.
    let _server = c.pod("shop", "web").http_server(8080, "web")?;
    let web_v4 = c.pod("shop", "web").addr(Family::V4, 8080);
    let mapped = format!("[::ffff:{}]:8080", c.pod("shop", "web").ip());
    let client = c.pod("shop", "client");
    let mark = c.log_mark(2);
    let out = ok(client.get(&mapped)?, "v4-mapped")?;
    ensure!(out["peer"] == mapped.as_str(), "{out}");
    ensure!(
        out["local"]
            .as_str()
            .is_some_and(|l| l.starts_with(&format!("[::ffff:{}]:", client.ip()))),
        "v4-mapped getsockname(): {out}"
    );
    let line = inbound_line(&c, mark, &web_v4)?;
    ensure!(line["hbone"] == true && line["outcome"] == "ok", "{line}");
    Ok(())
}

/// How many connection decisions node 2 counted as `decision` (`allowed`, `denied`). A denial
/// because no rule of an ALLOW policy matched names no policy.
fn decisions(c: &Cluster, decision: &str) -> Result<f64> {
    Ok(c.node(2).scrape()?.sum(
        "ztunnel_authorization_decisions_total",
        &[("decision", decision), ("layer", "connection")],
    ))
}

#[test]
fn ip_blocks_decide_by_the_callers_address_of_either_family() -> Result<()> {
    let c = start(&[Family::V4, Family::V6])?;
    let _server = c.pod("shop", "web").http_server(8080, "web")?;
    let client = c.pod("shop", "client");
    let client_v6 = client.ip_of(Family::V6).to_string();
    // Allowed: node 1's IPv6 pod range only; then denied: the client's own IPv6 address.
    let allow = istio(
        "AuthorizationPolicy",
        "shop",
        "web-from-node1-v6",
        "  selector:\n    matchLabels:\n      app: web\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"fd10:1::/64\"]\n",
    );
    c.apply("web-allow.yaml", Some(&allow))?;
    let allowed = |from: (&str, &str), family: Family| -> Result<bool> {
        let target = c.pod("shop", "web").addr(family, 8080);
        Ok(c.pod(from.0, from.1).get(&target)?.code == Some(0))
    };
    let before = decisions(&c, "denied")?;
    for (from, family, expected) in [
        (("shop", "client"), Family::V6, true),
        (("legacy", "sleep"), Family::V6, true),
        (("shop", "client"), Family::V4, false),
        (("shop", "neighbour"), Family::V6, false),
        (("legacy", "sleep"), Family::V4, false),
    ] {
        let mark = c.log_mark(2);
        ensure!(
            allowed(from, family)? == expected,
            "{}/{} over {family} should be {}",
            from.0,
            from.1,
            if expected { "allowed" } else { "denied" }
        );
        if !expected {
            // Denied with the same log line as over IPv4, naming the caller's address.
            let src_ip = c.pod(from.0, from.1).ip_of(family).to_string();
            let d = c.wait_for_log_since(2, mark, WAIT, |l| {
                l["message"] == "authorization denied" && l["src_ip"] == src_ip.as_str()
            })?;
            ensure!(d["dst_workload"] == "shop/web", "{d}");
        }
    }
    let after = decisions(&c, "denied")?;
    ensure!(
        after - before == 3.0,
        "three denials counted: {before} → {after}"
    );

    let deny = istio(
        "AuthorizationPolicy",
        "shop",
        "web-not-client-v6",
        &format!(
            "  selector:\n    matchLabels:\n      app: web\n  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{client_v6}/128\"]\n"
        ),
    );
    c.apply("web-allow.yaml", None)?;
    c.apply("web-deny.yaml", Some(&deny))?;
    let mark = c.log_mark(2);
    ensure!(
        !allowed(("shop", "client"), Family::V6)?,
        "client over IPv6 is denied"
    );
    let d = c.wait_for_log_since(2, mark, WAIT, |l| {
        l["message"] == "authorization denied" && l["src_ip"] == client_v6.as_str()
    })?;
    ensure!(
        d["policy"] == "shop/web-not-client-v6" && d["action"] == "DENY",
        "{d}"
    );
    for (from, family) in [
        (("shop", "client"), Family::V4),
        (("legacy", "sleep"), Family::V6),
        (("shop", "neighbour"), Family::V6),
    ] {
        ensure!(
            allowed(from, family)?,
            "{}/{} over {family} is not the denied address",
            from.0,
            from.1
        );
    }
    Ok(())
}

#[test]
fn the_nodes_own_ipv6_connections_are_told_from_plaintext_callers() -> Result<()> {
    // Mesh-wide STRICT: only the node itself (a kubelet probe) may connect in plaintext, which
    // `zt_node_sockops` tells by the node's own socket, here over IPv6.
    let c = start(&[Family::V4, Family::V6])?;
    let _server = c.pod("shop", "web").http_server(8080, "web")?;
    let strict = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n";
    c.apply("peer-authentication-strict.yaml", Some(strict))?;
    let web = c.pod("shop", "web").addr(Family::V6, 8080);
    let probe = ztunnel_tests::probe_bin_checked()?.display().to_string();
    let mark = c.log_mark(2);
    let out = c.node(2).exec_as_node(
        &[&probe, "get", "--addr", &web, "--timeout-ms", "5000"],
        std::time::Duration::from_secs(10),
    )?;
    ensure!(
        out.status.success(),
        "the node's probe over IPv6 must pass: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let line = inbound_line(&c, mark, &web)?;
    ensure!(
        line["transport"] == "node" && line["outcome"] == "ok",
        "{line}"
    );
    let node_ip = c.node(2).ip_of(Family::V6).to_string();
    ensure!(
        ip_of(&line["src_addr"]).as_deref() == Some(node_ip.as_str()),
        "from the node's IPv6 address {node_ip}: {line}"
    );
    // A pod outside the mesh, over IPv6: refused, as over IPv4.
    let mark = c.log_mark(2);
    let out = c.pod("legacy", "sleep").get(&web)?;
    ensure!(
        out.code != Some(0),
        "plaintext must be refused: {}",
        out.stdout
    );
    let line = inbound_line(&c, mark, &web)?;
    ensure!(
        line["outcome"] == "refused"
            && line["error"]
                .as_str()
                .is_some_and(|e| e.contains("plaintext refused")),
        "{line}"
    );
    Ok(())
}
