//! End-to-end tests of PeerAuthentication: a `sleep` pod outside the mesh calls enrolled pods in
//! plaintext while policies move from PERMISSIVE to STRICT and back, as in Istio's walkthrough;
//! mesh traffic (HBONE between nodes, in-process on one node) keeps working under STRICT.
use anyhow::{ensure, Result};
use serde_json::Value;
use ztunnel_tests::{Cluster, ProbeOutput};

mod common;

use common::{start, WAIT};

fn peer_authentication(ns: &str, name: &str, body: &str) -> String {
    common::istio("PeerAuthentication", ns, name, body)
}

fn addr(c: &Cluster, name: &str, port: u16) -> String {
    common::addr(c, "istioinaction", name, port)
}

/// `sleep` fetches `target`; Ok(body server name) or Err(what the client saw).
fn sleep_get(c: &Cluster, target: &str) -> Result<std::result::Result<String, String>> {
    let out: ProbeOutput = c.pod("default", "sleep").get(target)?;
    Ok(if out.code == Some(0) {
        Ok(out.body()["server"].as_str().unwrap_or_default().to_owned())
    } else {
        Err(format!("{} {}", out.stdout, out.stderr))
    })
}

/// The inbound log line of node 2 for the connection from `sleep` to `target`, after `mark`.
fn inbound_line(c: &Cluster, mark: usize, target: &str) -> Result<Value> {
    let sleep_ip = c.pod("default", "sleep").ip().to_string();
    c.wait_for_connection(2, mark, WAIT, |l| {
        l["direction"] == "inbound"
            && l["dst_addr"] == target
            && l["src_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("{sleep_ip}:")))
    })
}

/// Asserts `sleep` → `target` is allowed, and which mode and policy the proxy says decided.
fn expect_allowed(c: &Cluster, target: &str, mode: &str, policy: Option<&str>) -> Result<()> {
    let mark = c.log_mark(2);
    let got = sleep_get(c, target)?;
    ensure!(got.is_ok(), "sleep -> {target} should be allowed: {got:?}");
    let line = inbound_line(c, mark, target)?;
    ensure!(line["outcome"] == "ok", "{line}");
    ensure!(line["mtls_mode"] == mode, "expected {mode}: {line}");
    ensure!(
        line["mtls_policy"].as_str() == policy,
        "expected policy {policy:?}: {line}"
    );
    ensure!(line["src_workload"] == "default/sleep", "{line}");
    Ok(())
}

/// Asserts `sleep` → `target` is refused under STRICT by `policy`.
fn expect_refused(c: &Cluster, target: &str, policy: &str) -> Result<()> {
    let mark = c.log_mark(2);
    let got = sleep_get(c, target)?;
    ensure!(got.is_err(), "sleep -> {target} should be refused: {got:?}");
    let line = inbound_line(c, mark, target)?;
    ensure!(line["outcome"] == "refused", "{line}");
    ensure!(line["mtls_mode"] == "STRICT", "{line}");
    ensure!(line["mtls_policy"] == policy, "{line}");
    ensure!(
        line["error"]
            .as_str()
            .is_some_and(|e| e.contains("plaintext refused")),
        "{line}"
    );
    Ok(())
}

/// A mesh client still reaches `target`: `client` from node 1 (HBONE) and `neighbour` on node 2
/// (same node, no TLS but an authenticated source).
fn expect_mesh_allowed(c: &Cluster, target: &str) -> Result<()> {
    for (name, node) in [("client", 1), ("neighbour", 2)] {
        let mark = c.log_mark(2);
        let out = c.pod("istioinaction", name).get(target)?;
        ensure!(
            out.code == Some(0),
            "{name} -> {target} failed: {} {}",
            out.stdout,
            out.stderr
        );
        let line = c.wait_for_connection(2, mark, WAIT, |l| {
            l["direction"] == "inbound" && l["dst_addr"] == target
        })?;
        ensure!(line["outcome"] == "ok", "{line}");
        ensure!(
            line["src_identity"]
                == format!("spiffe://cluster.local/ns/istioinaction/sa/{name}").as_str(),
            "{line}"
        );
        if node == 2 {
            ensure!(line["same_node"] == true, "{line}");
        } else {
            ensure!(line["hbone"] == true, "{line}");
        }
    }
    Ok(())
}

#[test]
fn strict_permissive_walkthrough_with_a_legacy_client() -> Result<()> {
    let c = start()?;
    let _web = c
        .pod("istioinaction", "webapp")
        .http_server(8080, "webapp")?;
    let _cat = c
        .pod("istioinaction", "catalog")
        .http_server(8080, "catalog")?;
    let (webapp, catalog) = (addr(&c, "webapp", 8080), addr(&c, "catalog", 8080));

    // 1. No policy: PERMISSIVE, plaintext from outside the mesh is accepted.
    expect_allowed(&c, &webapp, "PERMISSIVE", None)?;

    // 2. Mesh-wide STRICT in the root namespace: the legacy client is refused, the mesh is not.
    c.apply(
        "pa-mesh.yaml",
        Some(&peer_authentication(
            "istio-system",
            "default",
            "  mtls:\n    mode: STRICT\n",
        )),
    )?;
    expect_refused(&c, &webapp, "istio-system/default")?;
    expect_refused(&c, &catalog, "istio-system/default")?;
    expect_mesh_allowed(&c, &webapp)?;

    // 3. A namespace-wide PERMISSIVE overrides the mesh.
    c.apply(
        "pa-namespace.yaml",
        Some(&peer_authentication(
            "istioinaction",
            "default",
            "  mtls:\n    mode: PERMISSIVE\n",
        )),
    )?;
    expect_allowed(&c, &webapp, "PERMISSIVE", Some("istioinaction/default"))?;
    expect_allowed(&c, &catalog, "PERMISSIVE", Some("istioinaction/default"))?;

    // 4. Instead, a workload-selector PERMISSIVE for webapp only: catalog is STRICT again.
    c.apply("pa-namespace.yaml", None)?;
    c.apply(
        "pa-webapp.yaml",
        Some(&peer_authentication(
            "istioinaction",
            "webapp",
            "  selector:\n    matchLabels:\n      app: webapp\n  mtls:\n    mode: PERMISSIVE\n",
        )),
    )?;
    expect_allowed(&c, &webapp, "PERMISSIVE", Some("istioinaction/webapp"))?;
    expect_refused(&c, &catalog, "istio-system/default")?;

    // 5. DISABLE accepts plaintext too; mesh traffic stays mutual TLS.
    c.apply(
        "pa-webapp.yaml",
        Some(&peer_authentication(
            "istioinaction",
            "webapp",
            "  selector:\n    matchLabels:\n      app: webapp\n  mtls:\n    mode: DISABLE\n",
        )),
    )?;
    expect_allowed(&c, &webapp, "DISABLE", Some("istioinaction/webapp"))?;
    expect_mesh_allowed(&c, &webapp)?;
    Ok(())
}

#[test]
fn port_level_mtls_opens_one_port_of_a_strict_workload() -> Result<()> {
    let c = start()?;
    let webapp = c.pod("istioinaction", "webapp");
    let _http = webapp.http_server(8080, "webapp")?;
    let _metrics = webapp.http_server(9090, "webapp-metrics")?;
    c.apply(
        "pa.yaml",
        Some(&peer_authentication(
            "istioinaction",
            "webapp",
            "  selector:\n    matchLabels:\n      app: webapp\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    9090:\n      mode: PERMISSIVE\n",
        )),
    )?;
    expect_refused(&c, &addr(&c, "webapp", 8080), "istioinaction/webapp")?;
    expect_allowed(
        &c,
        &addr(&c, "webapp", 9090),
        "PERMISSIVE",
        Some("istioinaction/webapp"),
    )?;
    // The override names the target port, and only that one.
    expect_mesh_allowed(&c, &addr(&c, "webapp", 8080))?;
    Ok(())
}

#[test]
fn policy_changes_apply_to_running_pods_and_open_connections() -> Result<()> {
    let c = start()?;
    let pids = [c.proxy_pid(1), c.proxy_pid(2)];
    let _echo = c.pod("istioinaction", "webapp").tcp_echo(9000)?;
    let echo = addr(&c, "webapp", 9000);
    let sleep = c.pod("default", "sleep");
    let chat = |gap_ms: &str| {
        sleep.spawn_probe(&[
            "chat",
            "--addr",
            &echo,
            "--messages",
            "one,two,three",
            "--gap-ms",
            gap_ms,
            "--timeout-ms",
            "10000",
        ])
    };

    // An unrelated change (a policy for another namespace) leaves an open connection alone.
    let mut open = chat("1500")?;
    open.wait_for_json(0, WAIT, |v| v["event"] == "connected")?;
    c.apply(
        "pa-other.yaml",
        Some(&peer_authentication(
            "elsewhere",
            "default",
            "  mtls:\n    mode: STRICT\n",
        )),
    )?;
    let done = open.wait_for_json(0, WAIT, |v| v.get("event").is_none())?;
    assert_eq!(
        done["replies"],
        serde_json::json!(["one", "two", "three"]),
        "{done}"
    );

    // Making the workload STRICT ends the plaintext connection that is open, with a reset.
    let mut open = chat("3000")?;
    open.wait_for_json(0, WAIT, |v| v["event"] == "connected")?;
    let mark = c.log_mark(2);
    c.apply(
        "pa-strict.yaml",
        Some(&peer_authentication(
            "istioinaction",
            "default",
            "  mtls:\n    mode: STRICT\n",
        )),
    )?;
    let ended = open.wait_for_json(0, WAIT, |v| v.get("event").is_none())?;
    assert!(ended["error"].is_string(), "the chat must fail: {ended}");
    let line = inbound_line(&c, mark, &echo)?;
    assert_eq!(line["outcome"], "revoked", "{line}");
    assert!(
        line["error"]
            .as_str()
            .is_some_and(|e| e.contains("STRICT") && e.contains("istioinaction/default")),
        "{line}"
    );
    // New plaintext connections are refused; no proxy or pod was restarted for any of it.
    expect_refused(&c, &echo, "istioinaction/default")?;
    assert_eq!([c.proxy_pid(1), c.proxy_pid(2)], pids);
    Ok(())
}

#[test]
fn a_bad_policy_is_reported_and_the_last_good_one_stays_in_force() -> Result<()> {
    let c = start()?;
    let _web = c
        .pod("istioinaction", "webapp")
        .http_server(8080, "webapp")?;
    let webapp = addr(&c, "webapp", 8080);
    c.apply(
        "pa.yaml",
        Some(&peer_authentication(
            "istioinaction",
            "default",
            "  mtls:\n    mode: STRICT\n",
        )),
    )?;
    expect_refused(&c, &webapp, "istioinaction/default")?;
    // A typo in the mode: rejected with its file and line; STRICT stays in force.
    let mark = c.log_mark(2);
    c.write_raw(
        "pa.yaml",
        &peer_authentication("istioinaction", "default", "  mtls:\n    mode: PERMISIVE\n"),
    )?;
    let rejected = c.wait_for_log_since(2, mark, WAIT, |l| {
        l["file"].as_str().is_some_and(|f| f.ends_with("pa.yaml"))
            && l["reason"]
                .as_str()
                .is_some_and(|r| r.contains("unknown mTLS mode"))
    })?;
    assert_eq!(rejected["line"], 8, "{rejected}");
    expect_refused(&c, &webapp, "istioinaction/default")?;
    assert!(c.proxy_running(1) && c.proxy_running(2));
    Ok(())
}
