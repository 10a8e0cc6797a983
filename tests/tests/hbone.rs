//! End-to-end tests of HBONE between nodes: mTLS with SPIFFE identities on the underlay,
//! connection pooling per identity, certificate rotation, and refusals.
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;
use ztunnel_tests::{pod, Cluster, ClusterBuilder, ProbeOutput};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const WAIT: Duration = Duration::from_secs(15);

/// shop (ambient): client-a and client-b (service account `client`) and other (`other`) on
/// node 1, web on node 2 and web-local on node 1; legacy (not enrolled): old on node 1 and
/// old-server on node 2.
fn mesh() -> ClusterBuilder {
    Cluster::builder()
        .nodes(2)
        .namespace("shop", &[AMBIENT])
        .namespace("legacy", &[])
        .pod(pod("shop", "client-a").node(1).service_account("client"))
        .pod(pod("shop", "client-b").node(1).service_account("client"))
        .pod(pod("shop", "other").node(1).service_account("other"))
        .pod(pod("shop", "web").node(2).service_account("web"))
        .pod(pod("shop", "web-local").node(1).service_account("web"))
        .pod(pod("legacy", "old").node(1))
        .pod(pod("legacy", "old-server").node(2))
}

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

fn enrolled(c: &Cluster) -> Result<()> {
    for (node, p) in [
        (1, "shop/client-a"),
        (1, "shop/client-b"),
        (1, "shop/other"),
        (2, "shop/web"),
    ] {
        c.wait_enrolled(node, 0, p, WAIT)?;
    }
    Ok(())
}

#[test]
fn cross_node_traffic_is_mutual_tls_with_the_source_identity() -> Result<()> {
    let c = mesh().start()?;
    enrolled(&c)?;
    let _server = c.pod("shop", "web").http_server(8080, "web")?;
    let web = format!("{}:8080", c.pod("shop", "web").ip());
    let m2 = c.log_mark(2);
    // A recognisable request path: it must not appear on the wire.
    let (out, bytes, text) = c.capture_underlay(1, || {
        ProbeOutput::succeeded(c.pod("shop", "client-a").probe(&[
            "get",
            "--addr",
            &web,
            "--path",
            "/secret-path-7f3a",
        ])?)
    })?;
    assert_eq!(
        out.json["peer"],
        web.as_str(),
        "getpeername still shows the original destination"
    );
    let inbound = c.wait_for_connection(2, m2, WAIT, |l| l["direction"] == "inbound")?;
    assert_eq!(inbound["hbone"], true, "{inbound}");
    assert_eq!(
        inbound["src_identity"],
        spiffe("shop", "client").as_str(),
        "{inbound}"
    );
    assert_eq!(inbound["src_workload"], "shop/client-a", "{inbound}");
    assert_eq!(inbound["outcome"], "ok", "{inbound}");
    assert!(
        bytes.len() > 1000,
        "the capture saw the traffic ({} bytes)",
        bytes.len()
    );
    let problem = ztunnel_tests::underlay_not_only_mtls(&bytes, &text, &[b"secret-path-7f3a"]);
    assert_eq!(problem, None);
    Ok(())
}

#[test]
fn one_tls_connection_per_source_pod_and_identity() -> Result<()> {
    let c = mesh().start()?;
    enrolled(&c)?;
    let _server = c.pod("shop", "web").http_server(8080, "web")?;
    let web = format!("{}:8080", c.pod("shop", "web").ip());
    let mut ids = Vec::new();
    for client in ["client-a", "client-b", "client-a", "other"] {
        let (m1, m2) = (c.log_mark(1), c.log_mark(2));
        ProbeOutput::succeeded(c.pod("shop", client).get(&web)?)?;
        let conn = c.wait_for_connection(1, m1, WAIT, |l| l["direction"] == "outbound")?;
        assert_eq!(conn["hbone"], true, "{conn}");
        assert_eq!(
            conn["dst_identity"],
            spiffe("shop", "web").as_str(),
            "{conn}"
        );
        ids.push(conn["hbone_connection"].clone());
        // Dialled from inside the source pod, from its own address (as Istio's ztunnel does).
        let inbound = c.wait_for_connection(2, m2, WAIT, |l| l["direction"] == "inbound")?;
        let src = c.pod("shop", client).ip().to_string();
        assert!(
            inbound["src_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("{src}:"))),
            "the tunnel comes from {src}: {inbound}"
        );
    }
    assert_eq!(ids[0], ids[2], "a pod reuses its connection");
    assert_ne!(
        ids[0], ids[1],
        "another pod of the same service account has its own connection"
    );
    assert_ne!(
        ids[0], ids[3],
        "another service account has its own connection"
    );
    let opened: Vec<Value> = c
        .logs(1)
        .into_iter()
        .filter(|l| l["message"] == "HBONE connection opened")
        .collect();
    assert_eq!(opened.len(), 3, "{opened:?}");
    Ok(())
}

#[test]
fn same_node_and_non_mesh_destinations_skip_the_tunnel() -> Result<()> {
    let c = mesh().start()?;
    enrolled(&c)?;
    c.wait_enrolled(1, 0, "shop/web-local", WAIT)?;
    let _local = c.pod("shop", "web-local").http_server(8080, "web-local")?;
    let _old = c
        .pod("legacy", "old-server")
        .http_server(8080, "old-server")?;
    for target in [
        c.pod("shop", "web-local").ip(),
        c.pod("legacy", "old-server").ip(),
    ] {
        let m1 = c.log_mark(1);
        ProbeOutput::succeeded(c.pod("shop", "client-a").get(&format!("{target}:8080"))?)?;
        let conn = c.wait_for_connection(1, m1, WAIT, |l| l["direction"] == "outbound")?;
        assert!(conn["hbone"].is_null() || conn["hbone"] == false, "{conn}");
    }
    assert!(!c
        .logs(1)
        .iter()
        .any(|l| l["message"] == "HBONE connection opened"));
    Ok(())
}

#[test]
fn plaintext_and_stalled_peers_on_the_hbone_port_are_refused() -> Result<()> {
    let c = mesh().start()?;
    enrolled(&c)?;
    let hbone = format!("{}:15008", c.pod("shop", "web").ip());
    let m2 = c.log_mark(2);
    // Plain HTTP to the tunnel port: not TLS, so no tunnel and no answer from the app.
    let out = c.pod("legacy", "old").probe(&[
        "connect",
        "--addr",
        &hbone,
        "--send",
        "CONNECT 10.2.0.2:8080 HTTP/1.1\r\n\r\n",
    ])?;
    assert!(!out.stdout.contains("200"), "{}", out.stdout);
    let refused =
        c.wait_for_log_since(2, m2, WAIT, |l| l["message"] == "HBONE connection refused")?;
    assert_ne!(refused["reason"], "handshake_timeout", "{refused}");
    assert_eq!(refused["dst_workload"], "shop/web", "{refused}");
    // A peer that connects and says nothing is cut off after the handshake timeout.
    let m2 = c.log_mark(2);
    let _stalled = c
        .pod("legacy", "old")
        .spawn_probe(&["chat", "--addr", &hbone, "--gap-ms", "20000"])?;
    let stalled = c.wait_for_log_since(2, m2, Duration::from_secs(20), |l| {
        l["message"] == "HBONE connection refused" && l["reason"] == "handshake_timeout"
    })?;
    assert_eq!(stalled["dst_workload"], "shop/web", "{stalled}");
    Ok(())
}

#[test]
fn open_connections_survive_certificate_rotation() -> Result<()> {
    let c = mesh().start_without_proxies()?;
    for node in [1, 2] {
        c.start_proxy_with(node, &["--cert-validity", "6s"])?;
    }
    enrolled(&c)?;
    let _echo = c.pod("shop", "web").tcp_echo(9000)?;
    let echo = format!("{}:9000", c.pod("shop", "web").ip());
    // One tunnelled connection, used again after its certificates have been replaced and the
    // first ones have expired (issued at the start, renewed at 3 s, expired at 6 s).
    let out = ProbeOutput::succeeded(c.pod("shop", "client-a").probe(&[
        "chat",
        "--addr",
        &echo,
        "--messages",
        "before,after",
        "--gap-ms",
        "7000",
    ])?)?;
    assert_eq!(
        out.json["replies"],
        serde_json::json!(["before", "after"]),
        "{}",
        out.stdout
    );
    let issued = |node: usize, id: &str| {
        c.logs(node)
            .iter()
            .filter(|l| l["message"] == "workload certificate issued" && l["identity"] == id)
            .count()
    };
    assert!(
        issued(1, &spiffe("shop", "client")) >= 2,
        "node1 renewed the client certificate"
    );
    assert!(
        issued(2, &spiffe("shop", "web")) >= 2,
        "node2 renewed the server certificate"
    );
    // New connections work with the new certificates.
    let _server = c.pod("shop", "web").http_server(8080, "web")?;
    ProbeOutput::succeeded(
        c.pod("shop", "client-b")
            .get(&format!("{}:8080", c.pod("shop", "web").ip()))?,
    )?;
    Ok(())
}

#[test]
fn a_ca_down_at_start_fails_clearly_and_recovers_without_restarts() -> Result<()> {
    let c = mesh().start_without_proxies()?;
    let ca_addr = format!("{}:15012", c.node(1).ip());
    let root = c.ca_dir().join("root-cert.pem").display().to_string();
    let ca_identity = spiffe("istio-system", "ztunnel-ca");
    for node in [1, 2] {
        c.start_proxy_with(
            node,
            &[
                "--ca-address",
                &ca_addr,
                "--ca-root",
                &root,
                "--ca-identity",
                &ca_identity,
            ],
        )?;
    }
    enrolled(&c)?;
    let _server = c.pod("shop", "web").http_server(8080, "web")?;
    let web = format!("{}:8080", c.pod("shop", "web").ip());
    // No CA yet: the connection that needs a certificate fails, and the log says why.
    let m1 = c.log_mark(1);
    let out = c.pod("shop", "client-a").get(&web)?;
    assert_eq!(
        out.code,
        Some(1),
        "without certificates nothing may pass: {}",
        out.stdout
    );
    let failed = c.wait_for_connection(1, m1, WAIT, |l| l["direction"] == "outbound")?;
    assert_eq!(failed["outcome"], "connect_failed", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or_default()
            .contains("certificate"),
        "the error names the missing certificate: {failed}"
    );
    // The CA comes up; the same proxies now get certificates and traffic flows.
    let bin = ztunnel_tests::ztunnel_bin().display().to_string();
    let ca_dir = c.ca_dir().display().to_string();
    let mut ca = c.node(1).spawn(&[
        &bin, "ca", "serve", "--ca-dir", &ca_dir, "--listen", &ca_addr,
    ])?;
    let out = ztunnel_tests::wait_until(WAIT, "a request once the CA is up", || {
        let out = c.pod("shop", "client-a").get(&web).ok()?;
        (out.code == Some(0)).then_some(out)
    })?;
    assert_eq!(out.body()["server"], "web");
    let m2 = c.log_mark(2);
    ProbeOutput::succeeded(c.pod("shop", "client-b").get(&web)?)?;
    let inbound = c.wait_for_connection(2, m2, WAIT, |l| l["direction"] == "inbound")?;
    assert_eq!(
        inbound["src_identity"],
        spiffe("shop", "client").as_str(),
        "{inbound}"
    );
    ca.kill();
    Ok(())
}

/// One CONNECT per authority from node 1 to `hbone` as `spiffe://…/ns/shop/sa/client`,
/// expecting the server to be `shop/<server_sa>`: the statuses.
fn connect_statuses(
    c: &Cluster,
    hbone: &str,
    server_sa: &str,
    authorities: &[String],
) -> Result<Vec<u16>> {
    ztunnel_tests::hbone_client::connect_statuses(
        c,
        1,
        hbone,
        ("shop", "client"),
        ("shop", server_sa),
        authorities,
    )
}

#[test]
fn connect_is_served_only_for_the_pod_that_received_it() -> Result<()> {
    let c = mesh().start()?;
    enrolled(&c)?;
    let _server = c.pod("shop", "web").http_server(8080, "web")?;
    let web = c.pod("shop", "web").ip();
    let m2 = c.log_mark(2);
    let statuses = connect_statuses(
        &c,
        &format!("{web}:15008"),
        "web",
        &[
            format!("{web}:8080"),                               // the pod itself: served
            format!("{}:8080", c.pod("shop", "web-local").ip()), // a pod on another node
            "10.2.0.250:8080".to_owned(),                        // no workload at all
            format!("{web}:15006"),                              // the proxy's own port
        ],
    )?;
    assert_eq!(statuses, [200, 403, 403, 403]);
    let refused: Vec<Value> = c
        .connections_since(2, m2)
        .into_iter()
        .filter(|l| l["outcome"] == "refused")
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert!(refused
        .iter()
        .all(|l| l["src_identity"] == spiffe("shop", "client").as_str()));
    // A server that answers as another identity than the destination's is not trusted.
    let wrong = connect_statuses(
        &c,
        &format!("{web}:15008"),
        "other",
        &[format!("{web}:8080")],
    );
    let err = format!(
        "{:#}",
        wrong.expect_err("secure naming must refuse the server")
    );
    assert!(err.contains("not one of the identities expected"), "{err}");
    Ok(())
}
