//! End-to-end tests of what operators see: Prometheus metrics moving with real traffic,
//! readiness, and the admin API (config dump, certificates without keys, pinned BPF state,
//! log level at run time).
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use ztunnel_tests::{metrics::Scrape, pod, wait_until, Cluster};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const WAIT: Duration = Duration::from_secs(15);
/// web refuses neighbour.
const DENY_NEIGHBOUR: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-neighbour\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: web\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/neighbour]\n";

/// shop (ambient): client on node 1, web and neighbour on node 2; default (not enrolled):
/// sleep on node 1. Service accounts are named like the pods.
fn start() -> Result<Cluster> {
    let mesh_pod = |name: &str, node: usize| {
        pod("shop", name)
            .node(node)
            .service_account(name)
            .labels(&[("app", name)])
    };
    let c = Cluster::builder()
        .nodes(2)
        .namespace("shop", &[AMBIENT])
        .namespace("default", &[])
        .pod(mesh_pod("client", 1))
        .pod(mesh_pod("web", 2))
        .pod(mesh_pod("neighbour", 2))
        .pod(pod("default", "sleep").node(1))
        .start()?;
    for (node, p) in [(1, "shop/client"), (2, "shop/web"), (2, "shop/neighbour")] {
        c.wait_enrolled(node, 0, p, WAIT)?;
    }
    Ok(c)
}

fn principal(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/shop/sa/{sa}")
}

/// `after - before` of `name` over samples with `labels`.
fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.sum(name, labels) - before.sum(name, labels)
}

/// Scrapes node `i` until `ok` holds (counters move a moment after the traffic that moves
/// them: a connection is counted closed once both directions are done).
fn scrape_until(c: &Cluster, i: usize, ok: impl Fn(&Scrape) -> bool) -> Result<Scrape> {
    let last = std::cell::RefCell::new(Scrape::default());
    let found = wait_until(WAIT, "the expected metrics", || {
        let s = c.node(i).scrape().unwrap_or_default();
        let hit = ok(&s);
        *last.borrow_mut() = s.clone();
        hit.then_some(s)
    });
    found.with_context(|| {
        let last = last.borrow();
        let samples: Vec<_> = last
            .samples
            .iter()
            .filter(|s| !s.name.starts_with("ztunnel_bpf"))
            .collect();
        format!("node {i}: last scrape {samples:#?}")
    })
}

#[test]
fn metrics_follow_traffic_decisions_and_configuration() -> Result<()> {
    let c = start()?;
    // Node 2 with the kernel's eBPF statistics on, for the per-program metrics.
    c.stop_proxy(2)?;
    c.start_proxy_with(2, &["--bpf-stats"])?;
    c.wait_enrolled(2, 0, "shop/web", WAIT)?;
    let _web = c.pod("shop", "web").http_server(8080, "web")?;
    let web = format!("{}:8080", c.pod("shop", "web").ip());
    let (n1_before, n2_before) = (c.node(1).scrape()?, c.node(2).scrape()?);

    // 3 requests across nodes (HBONE), 1 on the same node, 1 in plaintext from outside.
    for _ in 0..3 {
        ensure!(c.pod("shop", "client").get(&web)?.code == Some(0));
    }
    ensure!(c.pod("shop", "neighbour").get(&web)?.code == Some(0));
    ensure!(c.pod("default", "sleep").get(&web)?.code == Some(0));

    let (client, web_id, neighbour) = (
        principal("client"),
        principal("web"),
        principal("neighbour"),
    );
    let hbone = |reporter| {
        [
            ("reporter", reporter),
            ("transport", "hbone"),
            ("source_workload", "client"),
            ("source_workload_namespace", "shop"),
            ("source_principal", client.as_str()),
            ("destination_workload", "web"),
            ("destination_principal", web_id.as_str()),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    let closed = "istio_tcp_connections_closed_total";
    let n1 = scrape_until(&c, 1, |s| {
        delta(&n1_before, s, closed, &hbone("source")) >= 3.0
    })?;
    let n2 = scrape_until(&c, 2, |s| {
        delta(&n2_before, s, closed, &hbone("destination")) >= 3.0
            && delta(&n2_before, s, closed, &[("transport", "plaintext")]) >= 1.0
            && delta(&n2_before, s, closed, &[("transport", "same_node")]) >= 2.0
    })?;
    let opened = "istio_tcp_connections_opened_total";
    for (what, before, after, reporter) in [
        ("node 1", &n1_before, &n1, "source"),
        ("node 2", &n2_before, &n2, "destination"),
    ] {
        let labels = hbone(reporter);
        ensure!(
            delta(before, after, opened, &labels) == 3.0,
            "{what}: opened"
        );
        ensure!(
            delta(before, after, closed, &labels) == 3.0,
            "{what}: closed"
        );
        // A GET one way, a JSON reply the other.
        ensure!(
            delta(before, after, "istio_tcp_received_bytes_total", &labels) > 0.0,
            "{what}"
        );
        ensure!(
            delta(before, after, "istio_tcp_sent_bytes_total", &labels) > 0.0,
            "{what}"
        );
    }
    // The same-node connection, counted as both reporters, not as mutual TLS.
    for reporter in ["source", "destination"] {
        let labels = [
            ("reporter", reporter),
            ("transport", "same_node"),
            ("source_principal", neighbour.as_str()),
            ("destination_workload", "web"),
            ("connection_security_policy", "none"),
        ];
        ensure!(
            delta(&n2_before, &n2, opened, &labels) == 1.0,
            "same node {reporter}"
        );
    }
    // The plaintext caller has an address, not a principal.
    let plaintext = [
        ("reporter", "destination"),
        ("transport", "plaintext"),
        ("source_workload", "sleep"),
        ("source_principal", "unknown"),
        ("connection_security_policy", "none"),
    ];
    ensure!(
        delta(&n2_before, &n2, opened, &plaintext) == 1.0,
        "plaintext"
    );
    ensure!(
        delta(
            &n2_before,
            &n2,
            "ztunnel_plaintext_connections_total",
            &[("mode", "PERMISSIVE"), ("outcome", "allowed")]
        ) == 1.0,
        "plaintext by mTLS mode"
    );
    // HBONE: the streams rode pooled connections, each opened with a good handshake.
    ensure!(delta(&n1_before, &n1, "ztunnel_hbone_streams_opened_total", &[]) == 3.0);
    ensure!(
        n1.sum(
            "ztunnel_tls_handshakes_total",
            &[("direction", "outbound"), ("outcome", "ok")]
        ) >= 1.0
    );
    ensure!(
        n2.sum(
            "ztunnel_tls_handshakes_total",
            &[("direction", "inbound"), ("outcome", "ok")]
        ) >= 1.0
    );
    ensure!(n1.sum("ztunnel_hbone_pool_connections", &[]) >= 1.0);
    // The client's certificate, and when it expires.
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as f64;
    let expiry = n1.sum(
        "ztunnel_certificate_expiry_timestamp_seconds",
        &[("identity", client.as_str())],
    );
    ensure!(expiry > now, "certificate expiry {expiry} (now {now})");
    ensure!(n2.sum("ztunnel_enrolled_pods", &[]) == 2.0);
    // The kernel's counts for node 2's programs: it steered the inbound connections
    // (sk_lookup) and redirected neighbour's connect (connect4).
    ensure!(n2.sum("ztunnel_bpf_stats_enabled", &[]) == 1.0);
    for program in ["prog_sk_lookup", "prog_connect4"] {
        let runs = n2.sum("ztunnel_bpf_program_runs_total", &[("program", program)]);
        let time = n2.sum(
            "ztunnel_bpf_program_run_time_seconds_total",
            &[("program", program)],
        );
        ensure!(runs > 0.0 && time > 0.0, "{program}: {runs} runs, {time} s");
    }

    // A DENY policy: its decision is counted under its name, and its load as a reload.
    let before = c.node(2).scrape()?;
    c.apply("deny.yaml", Some(DENY_NEIGHBOUR))?;
    ensure!(
        c.pod("shop", "neighbour").get(&web)?.code != Some(0),
        "denied"
    );
    let decision = [
        ("policy", "shop/deny-neighbour"),
        ("action", "DENY"),
        ("decision", "denied"),
        ("layer", "connection"),
    ];
    let after = scrape_until(&c, 2, |s| {
        delta(
            &before,
            s,
            "ztunnel_authorization_decisions_total",
            &decision,
        ) == 1.0
    })?;
    ensure!(delta(&before, &after, "ztunnel_config_reloads_total", &[]) >= 1.0);
    ensure!(
        after.sum("ztunnel_config_generation", &[]) > before.sum("ztunnel_config_generation", &[])
    );
    // A bad file is rejected and counted; the configuration in force stays.
    c.write_raw("bad.yaml", "kind: [unterminated\n")?;
    scrape_until(&c, 2, |s| {
        delta(&before, s, "ztunnel_config_rejected_total", &[]) >= 1.0
    })?;
    c.remove_raw("bad.yaml")?;
    Ok(())
}

#[test]
fn readiness_and_admin_api() -> Result<()> {
    let c = start()?;
    let node = c.node(2);
    ensure!(node.http("GET", "http://127.0.0.1:15021/healthz/ready")?.0 == 200);
    // The admin API is on loopback only.
    let underlay = format!("http://{}:15000/config_dump", node.ip());
    ensure!(
        node.http("GET", &underlay)?.0 == 0,
        "the admin API answers off loopback"
    );

    let (code, body) = node.http("GET", "http://127.0.0.1:15000/config_dump")?;
    ensure!(code == 200, "{body}");
    let dump: Value = serde_json::from_str(&body).context("config_dump is JSON")?;
    ensure!(dump["node"] == "node2", "{dump}");
    ensure!(
        dump["enrolled"] == serde_json::json!(["shop/neighbour", "shop/web"]),
        "{}",
        dump["enrolled"]
    );
    let web = dump["pods"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["workload"] == "shop/web"))
        .context("web in the dump")?;
    ensure!(
        web["enrolled_here"] == true && web["service_account"] == "web",
        "{web}"
    );

    // Certificates: the chain, never a key.
    let _server = c.pod("shop", "web").http_server(8080, "web")?;
    let web_addr = format!("{}:8080", c.pod("shop", "web").ip());
    ensure!(c.pod("shop", "client").get(&web_addr)?.code == Some(0));
    let (code, body) = node.http("GET", "http://127.0.0.1:15000/certs")?;
    ensure!(code == 200 && !body.contains("PRIVATE KEY"), "{body}");
    let certs: Value = serde_json::from_str(&body)?;
    let web_cert = certs["certificates"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["identity"] == principal("web")))
        .context("web's certificate")?;
    ensure!(
        web_cert["chain_pem"][0]
            .as_str()
            .is_some_and(|p| p.starts_with("-----BEGIN CERTIFICATE-----")),
        "{web_cert}"
    );

    // The pinned BPF state, as the kernel reports it.
    let (code, body) = node.http("GET", "http://127.0.0.1:15000/bpf")?;
    ensure!(code == 200, "{body}");
    let bpf: Value = serde_json::from_str(&body)?;
    let pins = |kind: &str| -> Vec<String> {
        bpf[kind]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["pin"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    ensure!(
        pins("programs").contains(&"prog_sk_lookup".to_owned()),
        "{bpf}"
    );
    ensure!(
        pins("links")
            .iter()
            .filter(|p| p.starts_with("pods/"))
            .count()
            == 2,
        "{bpf}"
    );
    let enrolled = bpf["maps"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["pin"] == "enrolled_netns"))
        .context("enrolled_netns map")?;
    ensure!(enrolled["entries"] == 2, "{enrolled}");
    ensure!(bpf["errors"].as_array().is_some_and(Vec::is_empty), "{bpf}");

    // The operator's CLI reads the same pins, and the bpftool commands it suggests work.
    let dir = node.bpf_dir().display().to_string();
    let args: Vec<String> = ["bpf", "status", "--bpf-dir", &dir]
        .map(str::to_owned)
        .into();
    let out = c.run_ztunnel(2, &args, WAIT)?;
    let status = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{status}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        status.contains("prog_sk_lookup")
            && status.contains("enrolled pods (2")
            && status.contains("shop_web")
            && status.contains(&format!("bpftool map dump pinned {dir}/enrolled_netns")),
        "{status}"
    );
    println!("{status}");
    for cmd in [
        format!("bpftool prog show pinned {dir}/prog_connect4"),
        format!("bpftool map dump pinned {dir}/enrolled_netns"),
        format!("bpftool cgroup tree {}", node.cgroup().display()),
        format!("bpftool link show pinned {dir}/link_cgroup_connect4"),
    ] {
        let argv: Vec<&str> = cmd.split(' ').collect();
        let out = node.exec(&argv, WAIT)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("$ {cmd}\n{text}");
        ensure!(out.status.success(), "{cmd}: {text}");
    }

    // The log filter, changed at run time: debug lines appear, a bad filter is refused.
    let (code, level) = node.http("GET", "http://127.0.0.1:15000/logging")?;
    ensure!(
        code == 200 && level.trim() == "info,ztunnel=debug",
        "{level}"
    );
    let (code, body) = node.http("POST", "http://127.0.0.1:15000/logging?level=warn")?;
    ensure!(code == 200, "{body}");
    let mark = c.log_mark(2);
    ensure!(c.pod("shop", "client").get(&web_addr)?.code == Some(0));
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        !c.logs_since(2, mark)
            .iter()
            .any(|l| l["message"] == "connection closed"),
        "info lines after the filter became warn"
    );
    let (code, body) = node.http("POST", "http://127.0.0.1:15000/logging?level=info")?;
    ensure!(code == 200, "{body}");
    let mark = c.log_mark(2);
    ensure!(c.pod("shop", "client").get(&web_addr)?.code == Some(0));
    c.wait_for_connection(2, mark, WAIT, |_| true)?;
    let (code, body) = node.http("POST", "http://127.0.0.1:15000/logging?level=ztunnel=bogus")?;
    ensure!(code == 400, "{code} {body}");
    Ok(())
}

/// The pinned state as `ztunnel bpf status --output json` reports it: pin names by kind, and
/// the programs attached to the node's cgroup (as `bpftool cgroup tree` lists them).
fn pinned_state(c: &Cluster, i: usize) -> Result<(Vec<String>, Vec<String>)> {
    let dir = c.bpf_dir(i).display().to_string();
    let args: Vec<String> = ["bpf", "status", "--bpf-dir", &dir, "--output", "json"]
        .map(str::to_owned)
        .into();
    let out = c.run_ztunnel(i, &args, WAIT)?;
    let inv: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    let mut pins: Vec<String> = ["programs", "links", "maps"]
        .iter()
        .flat_map(|k| inv[*k].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["pin"].as_str().map(str::to_owned))
        .collect();
    pins.sort();
    let cgroup = c.node_cgroup(i).display().to_string();
    let tree = c
        .node(i)
        .exec(&["bpftool", "cgroup", "tree", &cgroup], WAIT)?;
    let mut attached: Vec<String> = String::from_utf8_lossy(&tree.stdout)
        .lines()
        .filter(|l| l.contains(" zt_"))
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        .collect();
    attached.sort();
    Ok((pins, attached))
}

/// A rolling restart under load: the old proxy hands over at SIGTERM and drains, the new one
/// adopts the pins. Nothing crosses the underlay in plaintext meanwhile, a connection open
/// across the restart carries on, new connections work after it, and the pinned state is the
/// same as before (nothing duplicated, nothing left over).
#[test]
fn restart_under_load_keeps_traffic_captured_and_state_single() -> Result<()> {
    let c = start()?;
    let marker = "restart-marker-7f3a9c";
    let _web = c.pod("shop", "web").http_server(8080, marker)?;
    let _echo = c.pod("shop", "web").tcp_echo(9000)?;
    let ip = c.pod("shop", "web").ip();
    let (web, echo) = (format!("{ip}:8080"), format!("{ip}:9000"));
    ensure!(c.pod("shop", "client").get(&web)?.code == Some(0));
    let before = pinned_state(&c, 1)?;
    // Each cgroup program once: connect, getpeername and getsockname for both families and
    // sock_ops for the pods, and sock_ops for the node's probes.
    let expected: Vec<String> = [
        "cgroup_inet4_connect multi zt_connect4",
        "cgroup_inet4_getpeername multi zt_getpeername4",
        "cgroup_inet4_getsockname multi zt_getsockname4",
        "cgroup_inet6_connect multi zt_connect6",
        "cgroup_inet6_getpeername multi zt_getpeername6",
        "cgroup_inet6_getsockname multi zt_getsockname6",
        "cgroup_sock_ops multi zt_node_sockops",
        "cgroup_sock_ops multi zt_sockops",
    ]
    .map(str::to_owned)
    .into();
    ensure!(
        before.1 == expected,
        "each cgroup program attached once: {:?}",
        before.1
    );

    let client = c.pod("shop", "client");
    let ((load, held, old_exit), pcap, summary) = c.capture_underlay(1, || {
        // New connections as fast as one client makes them (bounded: 4 s), and one
        // connection that stays open across the restart.
        let mut load = client.spawn_probe(&[
            "conn-rate",
            "--addr",
            &web,
            "--duration-ms",
            "4000",
            "--concurrency",
            "1",
        ])?;
        let mut held = client.spawn_probe(&[
            "chat",
            "--addr",
            &echo,
            "--messages",
            "one,two,three,four",
            "--gap-ms",
            "700",
        ])?;
        std::thread::sleep(Duration::from_millis(1000));
        let old_exit = c.hand_over_proxy(1, &[], Duration::from_secs(5))?;
        let load_exit = load.wait_exit(WAIT)?;
        let held_exit = held.wait_exit(WAIT)?;
        Ok((
            (load_exit, load.json_lines()),
            (held_exit, held.json_lines()),
            old_exit,
        ))
    })?;
    ensure!(old_exit.success(), "the old proxy exited with {old_exit}");
    // Not one byte of the HTTP exchanges (request line or the server's reply) in plaintext.
    let leaked = |needle: &[u8]| pcap.windows(needle.len()).any(|w| w == needle);
    ensure!(
        !leaked(marker.as_bytes()) && !leaked(b"GET / HTTP/1.1"),
        "plaintext on the underlay during the restart:\n{summary}"
    );
    ensure!(
        summary.contains(".15008"),
        "the load went through HBONE:\n{summary}"
    );
    let load = load.1.last().cloned().unwrap_or_default();
    ensure!(load["connections"].as_u64().unwrap_or(0) > 0, "{load}");
    ensure!(
        held.0.success(),
        "the connection open across the restart: {:?}",
        held.1
    );
    // The old proxy said how it drained.
    let logs = c.node(1).logs();
    ensure!(
        logs.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("shutting down: draining"))),
        "no drain in the old proxy's log"
    );

    // New connections work; the pinned state is what it was.
    let mark = c.log_mark(1);
    ensure!(client.get(&web)?.code == Some(0));
    c.wait_for_connection(1, mark, WAIT, |l| l["src_workload"] == "shop/client")?;
    let after = pinned_state(&c, 1)?;
    ensure!(
        before == after,
        "pinned state changed: {before:?} -> {after:?}"
    );
    println!(
        "restart under load: {} new connections ({} failed while no proxy listened), held connection kept",
        load["connections"], load["errors"]
    );
    Ok(())
}

#[test]
fn a_custom_policy_whose_provider_does_not_exist_is_a_problem_in_the_dump_and_metrics() -> Result<()>
{
    let c = start()?;
    let node = c.node(2);
    let before = node.scrape()?;
    c.apply(
        "custom-unknown-provider.yaml",
        Some(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: ext-authz\n  namespace: shop\nspec:\n  action: CUSTOM\n  provider:\n    name: no-such-provider\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin\"]\n",
        ),
    )?;
    let (code, body) = node.http("GET", "http://127.0.0.1:15000/config_dump")?;
    ensure!(code == 200, "{body}");
    let dump: Value = serde_json::from_str(&body)?;
    let problems: Vec<&str> = dump["problems"]
        .as_array()
        .map(|p| p.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    ensure!(
        problems.iter().any(|p| p.contains("shop/ext-authz")
            && p.contains("\"no-such-provider\"")
            && p.contains("custom-unknown-provider.yaml")),
        "config_dump.problems: {problems:#?}"
    );
    scrape_until(&c, 2, |s| {
        delta(&before, s, "ztunnel_config_problems", &[]) >= 1.0
    })?;
    Ok(())
}

/// `ztunnel config` in node 2's netns, as an operator on the node runs it.
fn config(c: &Cluster, args: &[&str]) -> Result<std::process::Output> {
    config_on(c, 2, args)
}

fn config_on(c: &Cluster, node: usize, args: &[&str]) -> Result<std::process::Output> {
    let bin = ztunnel_tests::ztunnel_bin();
    let mut argv = vec![bin.to_str().context("the binary's path")?, "config"];
    argv.extend(args);
    c.node(node).exec(&argv, WAIT)
}

#[test]
fn ztunnel_config_shows_the_live_view_as_tables_json_and_yaml() -> Result<()> {
    let c = start()?;
    c.apply("deny.yaml", Some(DENY_NEIGHBOUR))?;
    // A certificate to show: web's, fetched for a connection to it.
    let _server = c.pod("shop", "web").http_server(8080, "web")?;
    let web_addr = format!("{}:8080", c.pod("shop", "web").ip());
    ensure!(c.pod("shop", "client").get(&web_addr)?.code == Some(0));

    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    let out = config(&c, &["workloads"])?;
    ensure!(out.status.success(), "{out:?}");
    let table = text(&out);
    let lines: Vec<&str> = table.lines().collect();
    ensure!(
        lines[0].split_whitespace().collect::<Vec<_>>()
            == [
                "NAMESPACE",
                "POD",
                "NAME",
                "ADDRESS",
                "NODE",
                "SERVICE",
                "ACCOUNT",
                "ENROLLED",
                "HERE"
            ],
        "{table}"
    );
    // Aligned: every column starts where its header does.
    let at = lines[0].find("ADDRESS").context("ADDRESS")?;
    let web_ip = c.pod("shop", "web").ip().to_string();
    let web = lines
        .iter()
        .find(|l| l.starts_with("shop") && l.contains(" web "))
        .with_context(|| format!("web's row in\n{table}"))?;
    ensure!(web[at..].starts_with(&web_ip), "{table}");
    ensure!(web.ends_with("yes"), "web is enrolled on node 2: {table}");
    let sleep = lines
        .iter()
        .find(|l| l.starts_with("default") && l.contains(" sleep "))
        .with_context(|| format!("sleep's row in\n{table}"))?;
    ensure!(sleep.ends_with("no"), "{table}");

    let out = config(&c, &["policies", "-o", "json"])?;
    ensure!(out.status.success(), "{out:?}");
    let policies: Value = serde_json::from_str(&text(&out))?;
    ensure!(
        policies
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["kind"] == "AuthorizationPolicy"
                && p["policy"] == "shop/deny-neighbour"
                && p["action"] == "DENY")),
        "{policies}"
    );
    let out = config(&c, &["certificates", "-o", "yaml"])?;
    ensure!(out.status.success(), "{out:?}");
    let certs: Value = serde_yaml::from_str(&text(&out))?;
    ensure!(
        certs
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["identity"] == principal("web"))),
        "{certs}"
    );
    ensure!(!text(&out).contains("PRIVATE KEY"));
    let out = config(&c, &["all"])?;
    ensure!(out.status.success(), "{out:?}");
    eprintln!("ztunnel config all:\n{}", text(&out));
    for header in ["POD NAME", "SERVICE NAME", "KIND", "IDENTITY"] {
        ensure!(text(&out).contains(header), "{header} in\n{}", text(&out));
    }

    // Nothing listening there: one line, exit 2.
    let out = config(&c, &["workloads", "--admin", "127.0.0.1:1"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2)
            && out.stdout.is_empty()
            && err.lines().count() == 1
            && err.contains("cannot reach the admin API at 127.0.0.1:1"),
        "{out:?}"
    );
    Ok(())
}

/// `ztunnel config connections -o json` on `node`: the connections open there.
fn open_connections(c: &Cluster, node: usize) -> Result<Vec<Value>> {
    let out = config_on(c, node, &["connections", "-o", "json"])?;
    ensure!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout)?;
    v.as_array()
        .cloned()
        .with_context(|| format!("a list: {v}"))
}

/// Polls `ztunnel config connections` on `node` until `ok` holds of its list.
fn connections_until(
    c: &Cluster,
    node: usize,
    what: &str,
    ok: impl Fn(&[Value]) -> bool,
) -> Result<Vec<Value>> {
    let last = std::cell::RefCell::new(Vec::new());
    wait_until(WAIT, what, || {
        let list = open_connections(c, node).ok()?;
        let hit = ok(&list);
        *last.borrow_mut() = list.clone();
        hit.then_some(list)
    })
    .with_context(|| format!("node {node}: last list {:#?}", last.borrow()))
}

#[test]
fn ztunnel_config_connections_lists_open_connections_with_identities_bytes_and_age() -> Result<()> {
    let c = start()?;
    let web = c.pod("shop", "web");
    let _echo = web.tcp_echo(7000)?;
    let web_addr = format!("{}:7000", web.ip());
    let since = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    // Three held connections to web (node 2), each exchanging 5 bytes every 2 s, three times:
    // HBONE from client (node 1), same-node from neighbour, plaintext from sleep (not in the
    // mesh).
    let chat = |ns: &str, name: &str| -> Result<_> {
        let mut p = c.pod(ns, name).spawn_probe(&[
            "chat",
            "--addr",
            &web_addr,
            "--messages",
            "one-1,two-2,thr-3",
            "--gap-ms",
            "2000",
        ])?;
        p.wait_for_json(0, WAIT, |v| v["event"] == "connected")?;
        Ok(p)
    };
    let mut chats = vec![
        chat("shop", "client")?,
        chat("shop", "neighbour")?,
        chat("default", "sleep")?,
    ];

    let id = |v: &Value, field: &str| v[field].as_str().unwrap_or_default().to_owned();
    let row = |list: &[Value], direction: &str, transport: &str, workload: &str| {
        list.iter()
            .find(|c| {
                c["direction"] == direction
                    && c["transport"] == transport
                    && c["workload"] == workload
                    && c["dst_addr"] == web_addr.as_str()
            })
            .cloned()
    };
    // Node 2 serves web (three inbound sides) and neighbour (the same-node outbound side).
    let expected = |list: &[Value]| {
        Some([
            row(list, "inbound", "hbone", "shop/web")?,
            row(list, "inbound", "same_node", "shop/web")?,
            row(list, "outbound", "same_node", "shop/neighbour")?,
            row(list, "inbound", "plaintext", "shop/web")?,
        ])
    };
    let first = connections_until(&c, 2, "the three connections listed", |l| {
        expected(l).is_some()
    })?;
    let [hbone, inbound_same, outbound_same, plaintext] = expected(&first).context("listed")?;
    ensure!(id(&hbone, "src_identity") == principal("client"), "{hbone}");
    ensure!(id(&hbone, "dst_identity") == principal("web"), "{hbone}");
    ensure!(
        id(&hbone, "src_addr").starts_with(&format!("{}:", c.pod("shop", "client").ip())),
        "{hbone}"
    );
    for same in [&inbound_same, &outbound_same] {
        ensure!(id(same, "src_identity") == principal("neighbour"), "{same}");
        ensure!(id(same, "dst_identity") == principal("web"), "{same}");
    }
    ensure!(
        outbound_same["src_workload"] == "shop/neighbour",
        "{outbound_same}"
    );
    ensure!(
        plaintext["src_identity"].is_null(),
        "no identity in plaintext: {plaintext}"
    );
    ensure!(
        id(&plaintext, "src_addr").starts_with(&format!("{}:", c.pod("default", "sleep").ip())),
        "{plaintext}"
    );
    ensure!(
        id(&plaintext, "dst_identity") == principal("web"),
        "{plaintext}"
    );
    for r in [&hbone, &inbound_same, &outbound_same, &plaintext] {
        let opened = r["opened"].as_u64().unwrap_or(0);
        ensure!(opened >= since && r["age_ms"].as_u64().is_some(), "{r}");
        ensure!(
            r["bytes_sent"].as_u64() < Some(10),
            "listed before the second exchange: {r}"
        );
    }

    // The bytes grow as they are exchanged, read while the connections stay open.
    let exchanged = |list: &[Value], n: u64| {
        expected(list).is_some_and(|rows| {
            rows.iter()
                .all(|r| r["bytes_sent"] == n && r["bytes_received"] == n)
        })
    };
    let grown = connections_until(&c, 2, "10 bytes each way on each", |l| exchanged(l, 10))?;
    let [hbone_later, ..] = expected(&grown).context("listed")?;
    ensure!(
        hbone_later["age_ms"].as_u64() > hbone["age_ms"].as_u64(),
        "{hbone} then {hbone_later}"
    );
    // The caller's side of the HBONE one, on node 1.
    let outbound = connections_until(&c, 1, "client's outbound side", |l| {
        row(l, "outbound", "hbone", "shop/client")
            .is_some_and(|r| r["bytes_sent"].as_u64() >= Some(10))
    })?;
    let out_row = row(&outbound, "outbound", "hbone", "shop/client").context("row")?;
    ensure!(
        id(&out_row, "src_identity") == principal("client"),
        "{out_row}"
    );
    ensure!(
        id(&out_row, "dst_identity") == principal("web"),
        "{out_row}"
    );

    // The table, as an operator reads it.
    let out = config(&c, &["connections"])?;
    ensure!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("ztunnel config connections:\n{table}");
    let lines: Vec<&str> = table.lines().collect();
    for header in [
        "WORKLOAD",
        "DIRECTION",
        "TRANSPORT",
        "SOURCE IDENTITY",
        "DESTINATION IDENTITY",
        "SENT",
        "RECEIVED",
        "AGE",
    ] {
        ensure!(lines[0].contains(header), "{header} in\n{table}");
    }
    let at = lines[0].find("SOURCE IDENTITY").context("column")?;
    let hbone_line = lines
        .iter()
        .find(|l| l.contains(" inbound ") && l.contains(" hbone "))
        .with_context(|| format!("the HBONE row in\n{table}"))?;
    ensure!(
        hbone_line[at..].starts_with(&principal("client")),
        "{table}"
    );
    ensure!(hbone_line.contains(&principal("web")), "{table}");

    // Closed: gone from the list on both nodes.
    for p in &mut chats {
        ensure!(
            p.wait_exit(WAIT)?.success(),
            "the chats exchanged every message"
        );
    }
    let gone = |l: &[Value]| !l.iter().any(|c| c["dst_addr"] == web_addr.as_str());
    connections_until(&c, 2, "the connections gone", gone)?;
    connections_until(&c, 1, "the outbound side gone", gone)?;
    let out = config(&c, &["connections"])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).lines().count() == 1,
        "{out:?}"
    );
    Ok(())
}
