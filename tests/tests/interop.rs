//! Interoperability with Istio's own ztunnel (the "peer", github.com/istio/ztunnel at 62d82653):
//! node 1 runs our proxy, node 2 runs theirs as Istio runs it on a node (`PROXY_MODE=shared`,
//! pods handed over by the harness's ZDS server, Istio's in-pod redirection in its pods,
//! configuration from a local file, certificates from our `ztunnel ca serve`, directly; where
//! a test says so, ours too).
//! Every test fails, never skips, when the peer binary is missing (see `ztunnel_tests::peer`).
//!
//! What is checked, both directions: HBONE between a pod behind our proxy and one behind theirs,
//! secure naming, authorization policies deciding on the caller's principal, pooled connections,
//! bulk transfers and parallel streams intact; and that the peer verifies our CA service by the
//! IP and the DNS names its certificate carries. docs/hbone.md lists what differs on the wire.
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;
use ztunnel_tests::{pod, Cluster, ClusterBuilder, ProbeOutput};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const WAIT: Duration = Duration::from_secs(15);
const OURS: usize = 1;
const PEER: usize = 2;
const HTTP: u16 = 8080;
const ECHO: u16 = 9000;

/// shop (ambient): ours-client, ours-server and ours-other (service account `other`) on node 1
/// behind our proxy; peer-client, peer-server and peer-other (`other`) on node 2 behind theirs.
/// Each pod carries `app: <name>` and, but for the `other`s, a service account named like it.
fn interop() -> ClusterBuilder {
    let mut b = Cluster::builder()
        .nodes(2)
        .peer_node(PEER)
        .namespace("shop", &[AMBIENT]);
    for (name, node, sa) in [
        ("ours-client", OURS, "ours-client"),
        ("ours-server", OURS, "ours-server"),
        ("ours-other", OURS, "other"),
        ("peer-client", PEER, "peer-client"),
        ("peer-server", PEER, "peer-server"),
        ("peer-other", PEER, "other"),
    ] {
        b = b.pod(
            pod("shop", name)
                .node(node)
                .service_account(sa)
                .labels(&[("app", name)]),
        );
    }
    b
}

fn enrolled(c: &Cluster) -> Result<()> {
    for p in ["ours-client", "ours-server", "ours-other"] {
        c.wait_enrolled(OURS, 0, &format!("shop/{p}"), WAIT)?;
    }
    Ok(())
}

fn start() -> Result<Cluster> {
    let c = interop().start()?;
    enrolled(&c)?;
    Ok(c)
}

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/shop/sa/{sa}")
}

fn addr(c: &Cluster, name: &str, port: u16) -> String {
    format!("{}:{port}", c.pod("shop", name).ip())
}

fn get(c: &Cluster, from: &str, to: &str) -> Result<ProbeOutput> {
    c.pod("shop", from).get(&addr(c, to, HTTP))
}

/// The peer's access log line ("connection complete") after `mark` matching `pred`.
fn peer_access(c: &Cluster, mark: usize, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    c.wait_for_log_since(PEER, mark, WAIT, |l| {
        l["scope"] == "access" && l["message"] == "connection complete" && pred(l)
    })
}

fn starts_with_ip(v: &Value, ip: &str) -> bool {
    v.as_str().is_some_and(|a| a.starts_with(&format!("{ip}:")))
}

fn servers(c: &Cluster) -> Result<Vec<ztunnel_tests::Proc>> {
    Ok(vec![
        c.pod("shop", "ours-server")
            .http_server(HTTP, "ours-server")?,
        c.pod("shop", "peer-server")
            .http_server(HTTP, "peer-server")?,
    ])
}

#[test]
fn hbone_both_ways_with_both_proxies_certified_by_our_ca_service() -> Result<()> {
    // One CA service for both: theirs verifies it by the IP it dials, ours by its SPIFFE id.
    let c = interop().start_without_proxies()?;
    c.start_ca_service(c.ca_service_addr(), &[])?;
    let args = c.ca_service_args();
    c.start_proxy_with(OURS, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    c.start_proxy(PEER)?;
    enrolled(&c)?;
    let _servers = servers(&c)?;
    let (m1, m2) = (c.log_mark(OURS), c.log_mark(PEER));
    let ((to_peer, to_ours), bytes, text) = c.capture_underlay(OURS, || {
        let to_peer = ProbeOutput::succeeded(c.pod("shop", "ours-client").probe(&[
            "get",
            "--addr",
            &addr(&c, "peer-server", HTTP),
            "--path",
            "/secret-path-to-peer",
        ])?)?;
        let to_ours = ProbeOutput::succeeded(c.pod("shop", "peer-client").probe(&[
            "get",
            "--addr",
            &addr(&c, "ours-server", HTTP),
            "--path",
            "/secret-path-to-ours",
        ])?)?;
        Ok((to_peer, to_ours))
    })?;
    assert_eq!(to_peer.body()["server"], "peer-server");
    assert_eq!(to_ours.body()["server"], "ours-server");

    // Ours → theirs: their inbound sees our caller as its workload, from its pod's address.
    let ours_client = c.pod("shop", "ours-client").ip().to_string();
    let inbound = peer_access(&c, m2, |l| l["direction"] == "inbound")?;
    assert_eq!(inbound["src.workload"], "ours-client", "{inbound}");
    assert!(
        starts_with_ip(&inbound["src.addr"], &ours_client),
        "{inbound}"
    );
    assert_eq!(inbound["src.identity"], spiffe("ours-client").as_str());
    assert_eq!(inbound["dst.identity"], spiffe("peer-server").as_str());
    let outbound = c.wait_for_connection(OURS, m1, WAIT, |l| l["direction"] == "outbound")?;
    assert_eq!(outbound["hbone"], true, "{outbound}");
    assert_eq!(outbound["dst_identity"], spiffe("peer-server").as_str());

    // Theirs → ours: our inbound learns the caller from its certificate and its address.
    let peer_client = c.pod("shop", "peer-client").ip().to_string();
    let inbound = c.wait_for_connection(OURS, m1, WAIT, |l| l["direction"] == "inbound")?;
    assert_eq!(inbound["hbone"], true, "{inbound}");
    assert_eq!(inbound["src_identity"], spiffe("peer-client").as_str());
    assert_eq!(inbound["src_workload"], "shop/peer-client", "{inbound}");
    assert!(
        starts_with_ip(&inbound["src_addr"], &peer_client),
        "{inbound}"
    );
    let outbound = peer_access(&c, m2, |l| l["direction"] == "outbound")?;
    assert_eq!(outbound["dst.identity"], spiffe("ours-server").as_str());
    assert_eq!(outbound["dst.workload"], "ours-server", "{outbound}");

    // Only mutual TLS on the tunnel port crossed the underlay.
    let problem = ztunnel_tests::underlay_not_only_mtls(&bytes, &text, &[b"secret-path"]);
    assert_eq!(problem, None);
    // Every certificate came from the CA service itself.
    let ca = c.ca_service_log();
    for sa in ["peer-client", "peer-server", "ours-client", "ours-server"] {
        assert!(
            ca.iter()
                .any(|l| l.contains("issued certificate") && l.contains(&spiffe(sa))),
            "the CA service issued {sa}'s certificate: {ca:?}"
        );
    }
    Ok(())
}

#[test]
fn the_peer_verifies_our_ca_service_by_its_service_dns_name() -> Result<()> {
    let c = interop().start_without_proxies()?;
    // On the wildcard address the service's certificate carries no IP, only the Service's DNS
    // names, so the peer that dials 10.255.0.1 must verify a name (ALT_CA_HOSTNAME).
    c.start_ca_service("0.0.0.0:15012".parse()?, &[])?;
    c.start_proxy(OURS)?;
    enrolled(&c)?;
    let _servers = servers(&c)?;
    let mark = c.log_mark(PEER);
    c.start_proxy(PEER)?;
    let out = get(&c, "peer-client", "ours-server")?;
    ensure!(
        out.code != Some(0),
        "no certificate, no tunnel: {}",
        out.stdout
    );
    let ip = c.node(1).ip().to_string();
    c.wait_for_log_since(PEER, mark, WAIT, |l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("not valid for name \"{ip}\"")))
    })?;
    c.stop_proxy(PEER)?;
    // The Service's name, which `ca serve` puts in its certificate by default.
    c.start_proxy_with(PEER, &["ALT_CA_HOSTNAME=ztunnel-ca.istio-system.svc"])?;
    let out = ProbeOutput::succeeded(get(&c, "peer-client", "ours-server")?)?;
    assert_eq!(out.body()["server"], "ours-server");
    ProbeOutput::succeeded(get(&c, "ours-client", "peer-server")?)?;
    Ok(())
}

#[test]
fn secure_naming_refuses_a_wrong_identity_on_both_sides() -> Result<()> {
    // Each side's configuration says the other side's server runs as `impostor`, while the
    // server proves its real identity: a pod answering on another pod's address with its own
    // certificate. The peer reads its configuration at start, ours at run time.
    let c = interop().start_without_proxies()?;
    c.set_peer_service_account("shop", "ours-server", "impostor");
    c.start_proxy(OURS)?;
    c.start_proxy(PEER)?;
    enrolled(&c)?;
    let _servers = servers(&c)?;
    let mark = c.log_mark(OURS);
    c.set_pod_service_account("shop", "peer-server", "impostor")?;
    c.wait_for_log_since(OURS, mark, WAIT, |l| {
        l["message"] == "configuration applied"
    })?;
    // Ours → theirs: their server proves it is peer-server; ours expected impostor.
    let m1 = c.log_mark(OURS);
    let out = get(&c, "ours-client", "peer-server")?;
    ensure!(
        out.code != Some(0),
        "secure naming must refuse: {}",
        out.stdout
    );
    let refused = c.wait_for_connection(OURS, m1, WAIT, |l| l["direction"] == "outbound")?;
    assert_eq!(refused["outcome"], "connect_failed", "{refused}");
    assert_eq!(refused["dst_identity"], spiffe("impostor").as_str());
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("not one of the identities expected")),
        "{refused}"
    );
    // Theirs → ours: our server proves it is ours-server; theirs expected impostor.
    let m2 = c.log_mark(PEER);
    let out = get(&c, "peer-client", "ours-server")?;
    ensure!(
        out.code != Some(0),
        "secure naming must refuse: {}",
        out.stdout
    );
    let refused = peer_access(&c, m2, |l| l["direction"] == "outbound")?;
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("impostor") && error.contains("ours-server"),
        "their refusal names both identities: {refused}"
    );
    Ok(())
}

/// The peer's local-format policy: ALLOW `principal` (without `spiffe://`) in namespace shop.
fn peer_allow(name: &str, principal: &str) -> String {
    format!(
        "{{name: {name}, namespace: shop, scope: Namespace, action: Allow, dryRun: false, \
         rules: [[[{{principals: [!Exact {principal}]}}]]]}}"
    )
}

#[test]
fn authorization_policies_decide_on_the_callers_principal_both_ways() -> Result<()> {
    let c = interop().start_without_proxies()?;
    c.set_peer_policies(&[&peer_allow(
        "from-ours-client",
        "cluster.local/ns/shop/sa/ours-client",
    )])?;
    c.start_proxy(OURS)?;
    c.start_proxy(PEER)?;
    enrolled(&c)?;
    let _servers = servers(&c)?;
    c.apply(
        "from-peer-client.yaml",
        Some(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  \
             name: from-peer-client\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      \
             app: ours-server\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        \
             principals: [\"cluster.local/ns/shop/sa/peer-client\"]\n",
        ),
    )?;
    // Their policy, our callers: ours-client is named, ours-other is not.
    ProbeOutput::succeeded(get(&c, "ours-client", "peer-server")?)?;
    let (m1, m2) = (c.log_mark(OURS), c.log_mark(PEER));
    let out = get(&c, "ours-other", "peer-server")?;
    ensure!(
        out.code != Some(0),
        "their policy must deny ours-other: {}",
        out.stdout
    );
    let denied = peer_access(&c, m2, |l| l["direction"] == "inbound")?;
    assert_eq!(denied["src.identity"], spiffe("other").as_str(), "{denied}");
    assert!(
        denied["error"]
            .as_str()
            .is_some_and(|e| e.contains("policy")),
        "{denied}"
    );
    let ours = c.wait_for_connection(OURS, m1, WAIT, |l| l["direction"] == "outbound")?;
    assert!(
        ours["error"]
            .as_str()
            .is_some_and(|e| e.contains("status 401")),
        "their RBAC refusal is a 401: {ours}"
    );
    // Our policy, their callers: peer-client is named, peer-other is not.
    ProbeOutput::succeeded(get(&c, "peer-client", "ours-server")?)?;
    let (m1, m2) = (c.log_mark(OURS), c.log_mark(PEER));
    let out = get(&c, "peer-other", "ours-server")?;
    ensure!(
        out.code != Some(0),
        "our policy must deny peer-other: {}",
        out.stdout
    );
    let denied = c.wait_for_connection(OURS, m1, WAIT, |l| l["direction"] == "inbound")?;
    assert_eq!(denied["outcome"], "denied", "{denied}");
    assert_eq!(denied["src_identity"], spiffe("other").as_str());
    assert_eq!(
        denied["authz_policy"].as_str(),
        None,
        "no ALLOW matched: {denied}"
    );
    let theirs = peer_access(&c, m2, |l| l["direction"] == "outbound")?;
    assert!(
        theirs["error"].as_str().is_some_and(|e| e.contains("403")),
        "our refusal is a 403 at their end: {theirs}"
    );
    Ok(())
}

#[test]
fn pooled_connections_are_reused_both_ways() -> Result<()> {
    let c = start()?;
    let _servers = servers(&c)?;
    // Ours → theirs: one pooled connection, so their inbound sees one source port.
    let (m1, m2) = (c.log_mark(OURS), c.log_mark(PEER));
    for _ in 0..3 {
        ProbeOutput::succeeded(get(&c, "ours-client", "peer-server")?)?;
    }
    let ours = wait_n(3, || ours_since(&c, m1, "outbound"))?;
    assert!(
        ours.iter()
            .all(|l| l["hbone_connection"] == ours[0]["hbone_connection"]),
        "{ours:?}"
    );
    let opened = c
        .logs_since(OURS, m1)
        .into_iter()
        .filter(|l| l["message"] == "HBONE connection opened")
        .count();
    assert_eq!(opened, 1);
    let theirs = wait_n(3, || access_since(&c, m2, "inbound"))?;
    assert!(
        theirs
            .iter()
            .all(|l| l["src.addr"] == theirs[0]["src.addr"]),
        "one TLS connection, one source port: {theirs:?}"
    );
    // Theirs → ours: their pool reuses its connection; our inbound sees one source port.
    let (m1, m2) = (c.log_mark(OURS), c.log_mark(PEER));
    for _ in 0..3 {
        ProbeOutput::succeeded(get(&c, "peer-client", "ours-server")?)?;
    }
    let inbound = wait_n(3, || ours_since(&c, m1, "inbound"))?;
    assert!(
        inbound
            .iter()
            .all(|l| l["src_addr"] == inbound[0]["src_addr"]),
        "{inbound:?}"
    );
    assert_eq!(wait_n(3, || access_since(&c, m2, "outbound"))?.len(), 3);
    Ok(())
}

/// Our proxy's "connection closed" lines in `direction` after `mark`.
fn ours_since(c: &Cluster, mark: usize, direction: &str) -> Vec<Value> {
    c.connections_since(OURS, mark)
        .into_iter()
        .filter(|l| l["direction"] == direction)
        .collect()
}

/// The peer's access lines in `direction` after `mark`.
fn access_since(c: &Cluster, mark: usize, direction: &str) -> Vec<Value> {
    c.logs_since(PEER, mark)
        .into_iter()
        .filter(|l| l["message"] == "connection complete" && l["direction"] == direction)
        .collect()
}

/// Polls `f` until it returns `n` or more lines.
fn wait_n(n: usize, f: impl Fn() -> Vec<Value>) -> Result<Vec<Value>> {
    ztunnel_tests::wait_until(WAIT, &format!("{n} log lines"), || {
        let v = f();
        (v.len() >= n).then_some(v)
    })
}

/// `vc-probe transfer` from `from` to the echo server of `to`: every byte checked.
fn transfer(c: &Cluster, from: &str, to: &str, bytes: u64, streams: u64) -> Result<Value> {
    let bin = ztunnel_tests::probe_bin_checked()?.display().to_string();
    let (target, bytes, streams) = (addr(c, to, ECHO), bytes.to_string(), streams.to_string());
    let out = c.pod("shop", from).run(
        &[
            &bin,
            "transfer",
            "--addr",
            &target,
            "--bytes",
            &bytes,
            "--streams",
            &streams,
            "--timeout-ms",
            "20000",
        ],
        Duration::from_secs(120),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| {
            format!(
                "transfer printed no result: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    ensure!(
        out.status.success() && v["failed"] == 0,
        "{from} → {to}: not every stream arrived intact: {v}"
    );
    Ok(v)
}

#[test]
fn large_transfers_and_many_parallel_streams_arrive_intact() -> Result<()> {
    let c = start()?;
    let _echo = [
        c.pod("shop", "ours-server").tcp_echo(ECHO)?,
        c.pod("shop", "peer-server").tcp_echo(ECHO)?,
    ];
    const GIB: u64 = 1 << 30;
    // Each echo crosses both proxies twice: out through the caller's, in through the
    // server's, and back.
    for (from, to) in [
        ("ours-client", "peer-server"),
        ("peer-client", "ours-server"),
    ] {
        let big = transfer(&c, from, to, GIB, 1)?;
        eprintln!("{from} → {to}: 1 GiB each way: {big}");
        let many = transfer(&c, from, to, 4 << 20, 64)?;
        eprintln!("{from} → {to}: 64 streams of 4 MiB each way: {many}");
    }
    Ok(())
}

/// One CONNECT per authority from `node`'s netns to `server`'s HBONE port, as `client`.
fn statuses(
    c: &Cluster,
    node: usize,
    client: &str,
    server: &str,
    authorities: &[String],
) -> Result<Vec<u16>> {
    fn sa(name: &str) -> &str {
        if name.ends_with("-other") {
            "other"
        } else {
            name
        }
    }
    ztunnel_tests::hbone_client::connect_statuses(
        c,
        node,
        &addr(c, server, 15008),
        ("shop", sa(client)),
        ("shop", sa(server)),
        authorities,
    )
}

#[test]
fn refusal_statuses_on_the_wire() -> Result<()> {
    let c = start()?;
    let _servers = servers(&c)?;
    // The same four CONNECTs to each side: the pod itself, a port where nothing listens,
    // another pod's address, and the proxy's own inbound port.
    let asks = |own: &str, other: &str| {
        vec![
            addr(&c, own, HTTP),
            addr(&c, own, 9999),
            addr(&c, other, HTTP),
            addr(&c, own, 15006),
        ]
    };
    let theirs = statuses(
        &c,
        OURS,
        "ours-client",
        "peer-server",
        &asks("peer-server", "ours-server"),
    )?;
    let ours = statuses(
        &c,
        PEER,
        "peer-client",
        "ours-server",
        &asks("ours-server", "peer-server"),
    )?;
    // Both serve the pod and answer 503 when its application does not; for an address that is
    // not the pod's theirs answers 400 and ours 403, and for the proxy's own port 503 and 403
    // (docs/hbone.md, "Interoperability").
    assert_eq!(theirs, [200, 503, 400, 503], "Istio's ztunnel");
    assert_eq!(ours, [200, 503, 403, 403], "ours");
    Ok(())
}
