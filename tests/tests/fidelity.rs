//! End-to-end tests of data-path fidelity (issue 20): what an application sees through the
//! mesh is what it would see without it. Protocol selection by the Service port's declaration
//! (a server-first protocol on a declared TCP port does not wait for the client; a declared
//! HTTP port is read as HTTP however slow the client), and half-close and resets carried end
//! to end, across nodes (HBONE), on one node and in plaintext; and a captured client's
//! `getsockname()`.
use anyhow::{ensure, Context as _, Result};
use serde_json::Value;
use ztunnel_tests::{jwt::IdentityProvider, pod, service, Cluster, PodRef, ProbeOutput};

mod common;

use common::{addr, istio, mesh_pod, AMBIENT, WAIT};

/// The callers of every check: across nodes (HBONE), on the destination's node, and a pod
/// outside the mesh (plaintext).
const CALLERS: [(&str, &str, &str); 3] = [
    ("shop", "client", "HBONE"),
    ("shop", "neighbour", "same node"),
    ("legacy", "sleep", "plaintext"),
];

/// shop (ambient): `web` (node 2, `app: web`) behind Service `web`, whose ports declare
/// `tcp-greet` 7000, `appProtocol: mysql` 7002 and `http-web` 8080, and leave 7001 and 8081
/// undeclared; `client` (node 1) and `neighbour` (node 2). legacy (not enrolled): `sleep`
/// (node 1).
fn start() -> Result<Cluster> {
    let c = Cluster::builder()
        .nodes(2)
        .namespace("shop", &[AMBIENT])
        .namespace("legacy", &[])
        .pod(mesh_pod("shop", "web", 2))
        .pod(mesh_pod("shop", "client", 1))
        .pod(mesh_pod("shop", "neighbour", 2))
        .pod(pod("legacy", "sleep").node(1))
        .service(
            service("shop", "web")
                .selector(&[("app", "web")])
                .named_port("tcp-greet", 7000, 7000)
                .port(7001, 7001)
                .app_protocol_port("mysql", 7002, 7002)
                .named_port("http-web", 8080, 8080)
                .port(8081, 8081),
        )
        .start()?;
    for (node, p) in [(2, "shop/web"), (2, "shop/neighbour"), (1, "shop/client")] {
        c.wait_enrolled(node, 0, p, WAIT)?;
    }
    Ok(c)
}

/// Fails with everything the probe said unless it exited 0.
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

/// The inbound "connection closed" line node 2 logged after `mark` for `dst` (the checks
/// run one at a time).
fn inbound_line(c: &Cluster, mark: usize, dst: &str) -> Result<Value> {
    c.wait_for_connection(2, mark, WAIT, |l| {
        l["direction"] == "inbound" && l["dst_addr"] == dst
    })
}

#[test]
fn declared_ports_are_not_sniffed_and_undeclared_ones_still_are() -> Result<()> {
    let c = start()?;
    let web = c.pod("shop", "web");
    let mut servers = Vec::new();
    for port in ["7000", "7001", "7002"] {
        let mut p = web.spawn_probe(&["tcp-app", "--port", port, "--banner", "220 db ready"])?;
        p.wait_for_json(0, WAIT, |v| v["event"] == "listening")?;
        servers.push(p);
    }
    for port in ["8080", "8081"] {
        let mut p = web.spawn_probe(&["http-server-ka", "--port", port, "--name", "web"])?;
        p.wait_for_json(0, WAIT, |v| v["event"] == "listening")?;
        servers.push(p);
    }
    // L7 policy on web: tokens are checked on every HTTP request (so every connection to it
    // is read as HTTP unless its port says otherwise), and only /api requests or the database
    // ports are allowed.
    let idp = IdentityProvider::new("auth@istioinaction.io");
    let policies = format!(
        "{}---\n{}",
        istio(
            "RequestAuthentication",
            "shop",
            "web-jwt",
            &format!(
                "  selector:\n    matchLabels:\n      app: web\n  jwtRules:\n  - issuer: auth@istioinaction.io\n    jwks: '{}'\n",
                idp.jwks
            ),
        ),
        istio(
            "AuthorizationPolicy",
            "shop",
            "web-api-and-db",
            "  selector:\n    matchLabels:\n      app: web\n  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        paths: [\"/api/*\"]\n  - to:\n    - operation:\n        ports: [\"7000\", \"7001\", \"7002\"]\n",
        ),
    );
    c.apply("web-l7.yaml", Some(&policies))?;
    // The policy is in force once a request outside /api is refused.
    let api = |port: u16| addr(&c, "shop", "web", port);
    ztunnel_tests::wait_until(WAIT, "the L7 policy to apply", || {
        let out = c
            .pod("shop", "client")
            .probe(&["get", "--addr", &api(8080), "--path", "/x"]);
        out.ok().filter(|o| o.json["status"] == 403)
    })?;

    for (ns, name, via) in CALLERS {
        let from = c.pod(ns, name);
        // A server-first protocol on a declared TCP port: the greeting comes at once.
        for (port, declared) in [(7000, "tcp"), (7002, "mysql")] {
            let dst = addr(&c, "shop", "web", port);
            let mark = c.log_mark(2);
            let g = ok(from.probe(&["greeting", "--addr", &dst])?, via)?;
            ensure!(g["banner"] == "220 db ready", "{via} {port}: {g}");
            let ms = g["first_byte_ms"].as_f64().context("first_byte_ms")?;
            ensure!(
                ms < 50.0,
                "{via}: the greeting on {port} (declared {declared}) took {ms:.1} ms"
            );
            let line = inbound_line(&c, mark, &dst)?;
            ensure!(
                line["app_protocol"] == declared && line["per_request"] == false,
                "{via} {port}: {line}"
            );
            ensure!(line["outcome"] == "ok", "{via} {port}: {line}");
        }
        // Undeclared: still sniffed, so the greeting waits for the sniff to give up.
        let dst = addr(&c, "shop", "web", 7001);
        let mark = c.log_mark(2);
        let g = ok(from.probe(&["greeting", "--addr", &dst])?, via)?;
        let ms = g["first_byte_ms"].as_f64().context("first_byte_ms")?;
        ensure!(
            (900.0..3000.0).contains(&ms),
            "{via}: the greeting on undeclared 7001 should wait for the 1 s sniff, took {ms:.1} ms"
        );
        let line = inbound_line(&c, mark, &dst)?;
        ensure!(
            line["app_protocol"].is_null() && line["per_request"] == true,
            "{via} 7001: {line}"
        );

        // A client slower than the sniff deadline: on the declared HTTP port it is still read
        // as HTTP and its request decided (allowed, /api); on an undeclared port it has become
        // opaque by then, which the /api rule cannot allow.
        let slow_get = |port: u16| {
            from.probe(&[
                "get",
                "--addr",
                &api(port),
                "--path",
                "/api/items",
                "--delay-ms",
                "1500",
            ])
        };
        let declared = slow_get(8080)?;
        ensure!(
            declared.code == Some(0) && declared.json["status"] == 200,
            "{via}: a slow request on declared http-web: {}",
            declared.stdout
        );
        let undeclared = slow_get(8081)?;
        ensure!(
            undeclared.code == Some(1),
            "{via}: a slow request on undeclared 8081 should be refused as opaque: {}",
            undeclared.stdout
        );
        // A prompt one on the undeclared port is sniffed as HTTP and allowed.
        let prompt = from.probe(&["get", "--addr", &api(8081), "--path", "/api/items"])?;
        ensure!(
            prompt.json["status"] == 200,
            "{via}: a prompt request on 8081: {}",
            prompt.stdout
        );
    }
    Ok(())
}

/// The first `{"event":"ended"}` line `server` printed from its output line `from` on (the
/// checks run one at a time).
fn ended(server: &mut ztunnel_tests::Proc, from: usize) -> Result<Value> {
    server.wait_for_json(from, WAIT, |v| v["event"] == "ended")
}

#[test]
fn half_close_and_resets_are_carried_end_to_end() -> Result<()> {
    const REPLY: u64 = 4 << 20;
    let c = start()?;
    let web = c.pod("shop", "web");
    // 7001: replies with REPLY bytes once the client has finished sending; 7000: resets the
    // connection as soon as it reads a byte.
    let reply = REPLY.to_string();
    let mut replier = web.spawn_probe(&["tcp-app", "--port", "7001", "--reply-bytes", &reply])?;
    replier.wait_for_json(0, WAIT, |v| v["event"] == "listening")?;
    let mut resetter =
        web.spawn_probe(&["tcp-app", "--port", "7000", "--reset-after-read", "true"])?;
    resetter.wait_for_json(0, WAIT, |v| v["event"] == "listening")?;
    let (replies, resets) = (addr(&c, "shop", "web", 7001), addr(&c, "shop", "web", 7000));

    for (ns, name, via) in CALLERS {
        let from = c.pod(ns, name);

        // The client shuts its write side: the app sees the end of the request (EOF) and the
        // client still gets the whole reply.
        let seen = replier.lines().len();
        let out = ok(
            from.probe(&["connect", "--addr", &replies, "--send", "request"])?,
            via,
        )?;
        ensure!(
            out["received_bytes"] == REPLY,
            "{via}: half-closed client got {} of {REPLY} bytes",
            out["received_bytes"]
        );
        let e = ended(&mut replier, seen)?;
        ensure!(e["how"] == "eof" && e["read"] == 7, "{via}: {e}");

        // The app resets: the client sees a reset, not a clean end of stream.
        let seen = resetter.lines().len();
        let out = from.probe(&["connect", "--addr", &resets, "--send", "x"])?;
        ensure!(
            out.code == Some(1) && out.json["kind"] == "connection reset",
            "{via}: the app's RST should reach the client: {}",
            out.stdout
        );
        let e = ended(&mut resetter, seen)?;
        ensure!(e["how"] == "reset sent", "{via}: {e}");

        // The client resets: the app sees a reset, not a FIN it would answer.
        let seen = replier.lines().len();
        let out = ok(
            from.probe(&[
                "connect", "--addr", &replies, "--send", "x", "--reset", "true",
            ])?,
            via,
        )?;
        ensure!(out["reset_sent"] == true, "{via}: {out}");
        let e = ended(&mut replier, seen)?;
        ensure!(
            e["how"] == "connection reset",
            "{via}: the client's RST should reach the app: {e}"
        );
    }
    Ok(())
}

/// `ip` of an `ip:port` or `[ip]:port` text.
fn ip_of(addr: &Value) -> Option<String> {
    let sa: std::net::SocketAddr = addr.as_str()?.parse().ok()?;
    Some(sa.ip().to_string())
}

#[test]
fn a_captured_client_sees_its_pod_address_as_its_local_address() -> Result<()> {
    let c = start()?;
    let _web = c.pod("shop", "web").http_server(8080, "web")?;
    let vip = format!("{}:8080", c.service_vip("shop", "web"));
    let web = addr(&c, "shop", "web", 8080);
    for (name, via) in [("client", "HBONE"), ("neighbour", "same node")] {
        let from = c.pod("shop", name);
        let ip = from.ip().to_string();
        for dst in [&web, &vip] {
            let out = ok(from.get(dst)?, via)?;
            // What getsockname() said right after connect: the pod's address (not 127.0.0.1)
            // and a real port; getpeername() is what it dialled.
            ensure!(
                ip_of(&out["local"]).as_deref() == Some(ip.as_str()),
                "{via} to {dst}: getsockname() should be the pod address {ip}: {out}"
            );
            let port = out["local"].as_str().and_then(|l| l.rsplit_once(':'));
            ensure!(
                port.is_some_and(|(_, p)| p != "0"),
                "{via}: a real local port: {out}"
            );
            ensure!(out["peer"] == dst.as_str(), "{via}: {out}");
        }
        // An IPv6 socket dialling a v4-mapped address: the v4-mapped pod address.
        let mapped = format!("[::ffff:{}]:8080", c.pod("shop", "web").ip());
        let out = ok(from.get(&mapped)?, via)?;
        ensure!(
            out["local"]
                .as_str()
                .is_some_and(|l| l.starts_with(&format!("[::ffff:{ip}]:"))),
            "{via}: v4-mapped getsockname() should be [::ffff:{ip}]: {out}"
        );
    }
    // Outside the mesh nothing is rewritten: the legacy pod's own address, as always.
    let sleep = c.pod("legacy", "sleep");
    let out = ok(sleep.get(&web)?, "plaintext")?;
    ensure!(
        ip_of(&out["local"]).as_deref() == Some(sleep.ip().to_string().as_str()),
        "{out}"
    );
    Ok(())
}

/// `args` run in `pod`, its stdout (a failure is an error).
fn run_in(pod: &PodRef, args: &[&str]) -> Result<String> {
    let out = pod.run(args, WAIT)?;
    ensure!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What of the inbound return path a pod netns holds: the rule, the route, the sysctl.
fn return_path_state(pod: &PodRef) -> Result<(bool, bool, String)> {
    let rules = run_in(pod, &["ip", "-4", "rule", "show"])?;
    let routes = run_in(pod, &["ip", "-4", "route", "show", "table", "all"])?;
    let sysctl = run_in(pod, &["cat", "/proc/sys/net/ipv4/tcp_fwmark_accept"])?;
    Ok((
        rules.contains("fwmark 0x53a lookup 15006"),
        routes.contains("local default dev lo table 15006"),
        sysctl.trim().to_owned(),
    ))
}

#[test]
fn the_application_sees_the_callers_address() -> Result<()> {
    const BYTES: &str = "4194304";
    let c = start()?;
    let web = c.pod("shop", "web");
    ensure!(
        return_path_state(&web)? == (true, true, "1".into()),
        "the enrolled pod's return path: {:?}",
        return_path_state(&web)?
    );
    let echo = web.tcp_echo(7001)?;
    let dst = addr(&c, "shop", "web", 7001);
    for (ns, name, via) in CALLERS {
        let from = c.pod(ns, name);
        let (seen, mark) = (echo.lines().len(), c.log_mark(2));
        // Two connections that each echo 4 MiB end to end, byte for byte: the replies find
        // their way back to the proxy.
        let out = ok(
            from.probe(&[
                "transfer",
                "--addr",
                &dst,
                "--bytes",
                BYTES,
                "--streams",
                "2",
            ])?,
            via,
        )?;
        ensure!(out["intact"] == 2, "{via}: {out}");
        // getpeername() of every connection the app accepted: the caller's pod address.
        let caller = from.ip().to_string();
        let peers = ztunnel_tests::wait_until(WAIT, "the app's two accepts", || {
            let peers: Vec<String> = echo.lines()[seen..]
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v["event"] == "accept")
                .map(|v| ip_of(&v["peer"]).unwrap_or_default())
                .collect();
            (peers.len() >= 2).then_some(peers)
        })?;
        ensure!(
            peers.len() == 2 && peers.iter().all(|p| *p == caller),
            "{via}: the app should see the caller {caller}, saw {peers:?}"
        );
        let line = inbound_line(&c, mark, &dst)?;
        ensure!(
            line["src_preserved"] == true && line["src_fallback"].is_null(),
            "{via}: {line}"
        );
    }
    let scrape = c.node(2).scrape()?;
    let delivered = scrape.sum(
        "ztunnel_inbound_delivery_source_total",
        &[("reason", "caller")],
    );
    ensure!(
        delivered >= 6.0,
        "deliveries from the caller's address: {delivered}"
    );

    // Released with the pod's enrolment: the netns holds none of it any more.
    let m2 = c.log_mark(2);
    c.set_namespace_labels("shop", &[])?;
    c.wait_for_log_since(2, m2, WAIT, |l| {
        l["message"] == "pod un-enrolled" && l["pod"] == "shop/web"
    })?;
    ztunnel_tests::wait_until(WAIT, "the return path to be removed", || {
        return_path_state(&web)
            .ok()
            .filter(|s| *s == (false, false, "0".into()))
    })?;
    Ok(())
}
