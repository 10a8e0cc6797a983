//! Capture before the first byte (docs/capture.md, "New pods: the CNI plugin"): the virtual
//! cluster runs `ztunnel-cni` for a pod exactly as containerd does after its primary plugin,
//! before the pod's application starts, and the application's very first connection is in the
//! mesh. Also: failing closed when the proxy is down, DEL, CHECK, bad input, install/uninstall.
//!
//! The pods here are listed `pending` (as the API shows a pod whose sandbox does not exist
//! yet: no address, no netns), so without the plugin nothing could enrol them before their
//! first connection, which is what happened on the real cluster (issue 13).
use std::{path::Path, time::Duration};

use anyhow::{bail, Result};
use serde_json::{json, Value};
use ztunnel_tests::{
    cni::{CniOutput, CniRun},
    pod, Cluster, ClusterBuilder, Family,
};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const OPT_OUT: (&str, &str) = ("istio.io/dataplane-mode", "none");
const WAIT: Duration = Duration::from_secs(15);

/// Namespace `shop` (ambient) with `web` on node 2 (a running, enrolled server) and new pods
/// `new1`..`new3` on node 1, pending; `legacy` (not ambient) with `old` on node 1, pending.
fn cluster() -> ClusterBuilder {
    Cluster::builder()
        .nodes(2)
        .namespace("shop", &[AMBIENT])
        .namespace("legacy", &[])
        .pod(pod("shop", "web").node(2).labels(&[("app", "web")]))
        .pod(pod("shop", "new1").node(1).pending())
        .pod(pod("shop", "new2").node(1).pending())
        .pod(pod("shop", "new3").node(1).pending())
        .pod(pod("shop", "out").node(1).pending().labels(&[OPT_OUT]))
        .pod(pod("legacy", "old").node(1).pending())
}

/// Starts the cluster with the plugin installed on every node and the proxies serving it.
fn start(b: ClusterBuilder, pod_wait: &str) -> Result<Cluster> {
    let c = b.start_without_proxies()?;
    for i in 1..=c.node_count() {
        c.install_cni(i)?;
        let mut extra = c.cni_proxy_args(i);
        extra.extend(["--cni-pod-wait".to_owned(), pod_wait.to_owned()]);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        c.start_proxy_with(i, &extra)?;
    }
    Ok(c)
}

fn succeeded(out: CniOutput) -> Result<CniOutput> {
    if !out.success {
        bail!(
            "the plugin failed: stdout {} stderr {}",
            out.stdout,
            out.stderr
        );
    }
    Ok(out)
}

/// The API reports the pod's address and netns (as the kubelet's status update does); waits
/// until node 1's proxy has applied it.
fn report_running(c: &Cluster, ns: &str, name: &str) -> Result<()> {
    let m = c.log_mark(1);
    c.report_pod_running(ns, name)?;
    c.wait_for_log_since(1, m, WAIT, |l| l["message"] == "configuration applied")?;
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

fn enrolled_lines(c: &Cluster, node: usize, mark: usize, workload: &str) -> Vec<Value> {
    c.logs_since(node, mark)
        .into_iter()
        .filter(|l| l["message"] == "pod enrolled" && l["pod"] == workload)
        .collect()
}

#[test]
fn a_new_pods_first_connection_is_in_the_mesh() -> Result<()> {
    // Dual-stack: the plugin reports both of a pod's addresses, and both are captured.
    let c = start(cluster().families(&[Family::V4, Family::V6]), "10s")?;
    c.wait_enrolled(2, 0, "shop/web", WAIT)?;
    let _server = c.pod("shop", "web").http_server(8080, "web")?;
    let web = format!("{}:8080", c.pod("shop", "web").ip());
    for (name, family) in [
        ("new1", Family::V4),
        ("new2", Family::V6),
        ("new3", Family::V4),
    ] {
        let web = c.pod("shop", "web").addr(family, 8080);
        let p = c.pod("shop", name);
        let workload = p.workload();
        let (m1, m2) = (c.log_mark(1), c.log_mark(2));
        // The sandbox exists, the primary plugin gave it an address: the chain's last plugin.
        let out = succeeded(p.cni("ADD")?)?;
        assert_eq!(
            out.json,
            p.cni_prev_result(),
            "a chained plugin returns the previous result unchanged"
        );
        // When the plugin returns, capture is in force: the log says so already.
        let enrolled = enrolled_lines(&c, 1, m1, &workload);
        assert_eq!(enrolled.len(), 1, "{workload}: {enrolled:?}");
        assert_eq!(enrolled[0]["source"], "cni", "{:?}", enrolled[0]);
        assert_eq!(
            enrolled[0]["netns"],
            p.netns_path().display().to_string().as_str()
        );
        let ips: Vec<String> = p.ips().iter().map(|ip| ip.to_string()).collect();
        assert_eq!(
            enrolled[0]["ips"],
            format!("[{}]", ips.join(", ")).as_str(),
            "both addresses the plugin reported"
        );
        // The application's first instruction: a connection, right away.
        let got = p.probe(&["get", "--addr", &web, "--timeout-ms", "5000"])?;
        assert_eq!(
            got.code,
            Some(0),
            "{workload}: {} {}",
            got.stdout,
            got.stderr
        );
        assert_eq!(got.json["peer"], web.as_str(), "{}", got.stdout);
        let o = c.wait_for_connection(1, m1, WAIT, |l| {
            l["direction"] == "outbound" && l["src_workload"] == workload.as_str()
        })?;
        assert_eq!(o["hbone"], true, "{o}");
        let i = c.wait_for_connection(2, m2, WAIT, |l| {
            l["direction"] == "inbound" && l["dst_addr"] == web.as_str()
        })?;
        assert_eq!(
            i["src_identity"],
            format!("spiffe://cluster.local/ns/shop/sa/{name}").as_str(),
            "mTLS as the new pod: {i}"
        );
        assert_eq!(
            i["forwarded_for"],
            p.ip_of(family).to_string().as_str(),
            "dialled from {workload}'s own {family} address, before the API reports it: {i}"
        );
    }

    // The API reports the pod's addresses and netns later: nothing is enrolled again or
    // dropped, and traffic goes on.
    let m1 = c.log_mark(1);
    report_running(&c, "shop", "new1")?;
    let churn: Vec<Value> = c
        .logs_since(1, m1)
        .into_iter()
        .filter(|l| {
            (l["message"] == "pod enrolled" || l["message"] == "pod un-enrolled")
                && l["pod"] == "shop/new1"
        })
        .collect();
    assert!(
        churn.is_empty(),
        "a watch update must not re-enrol: {churn:?}"
    );
    let got = c.pod("shop", "new1").get(&web)?;
    assert_eq!(got.code, Some(0), "{}", got.stdout);

    // CHECK agrees.
    succeeded(c.pod("shop", "new1").cni("CHECK")?)?;
    Ok(())
}

#[test]
fn pods_the_configuration_does_not_capture_start_uncaptured() -> Result<()> {
    let c = start(cluster(), "10s")?;
    for (ns, name, why) in [
        ("legacy", "old", "namespace is not labelled"),
        ("shop", "out", "opted out"),
    ] {
        let p = c.pod(ns, name);
        let m = c.log_mark(1);
        let out = succeeded(p.cni("ADD")?)?;
        assert_eq!(out.json, p.cni_prev_result());
        let l = c.wait_for_log_since(1, m, WAIT, |l| {
            l["message"] == "CNI: pod not captured" && l["pod"] == p.workload().as_str()
        })?;
        assert!(l["reason"].as_str().unwrap_or("").contains(why), "{l}");
        assert!(enrolled_lines(&c, 1, m, &p.workload()).is_empty());
        succeeded(p.cni("CHECK")?)?;
    }
    // Labelling the namespace later enrols the pod with the sandbox the plugin reported (its
    // status has no address yet).
    let m = c.log_mark(1);
    c.set_namespace_labels("legacy", &[AMBIENT])?;
    let l = c.wait_enrolled(1, m, "legacy/old", WAIT)?;
    assert_eq!(l["source"], "cni", "{l}");
    Ok(())
}

#[test]
fn an_add_waits_for_a_pod_the_configuration_lacks_and_then_fails_closed() -> Result<()> {
    let c = start(
        cluster()
            .pod(pod("shop", "late").node(1).unlisted())
            .pod(pod("shop", "never").node(1).unlisted()),
        "2s",
    )?;
    // The kubelet may run the sandbox before the watch shows the pod: the ADD waits for it.
    let late = c.pod("shop", "late");
    let started = std::time::Instant::now();
    let result = std::thread::scope(|s| {
        let add = s.spawn(|| late.cni("ADD"));
        std::thread::sleep(Duration::from_millis(400));
        c.add_pod("shop", "late")?;
        add.join().expect("the ADD thread")
    })?;
    succeeded(result)?;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "answered before the pod existed"
    );
    assert_eq!(c.wait_enrolled(1, 0, "shop/late", WAIT)?["source"], "cni");

    // A pod that never shows up: the ADD fails after --cni-pod-wait; nothing stays enrolled.
    let never = c.pod("shop", "never");
    let out = never.cni("ADD")?;
    assert!(!out.success, "{out:?}");
    assert_eq!(out.code(), Some(11), "try again later: {}", out.stdout);
    assert!(
        out.error_text().contains("not in the configuration"),
        "{}",
        out.error_text()
    );
    assert!(!pod_pins(&c, 1).contains(&"shop_never".to_owned()));
    // It appears later (here with its address and netns already: the directory source's
    // annotation) and is enrolled through the configuration; the kubelet's next ADD names the
    // same namespace, which is answered without enrolling anything anew.
    let m = c.log_mark(1);
    c.add_pod("shop", "never")?;
    c.wait_enrolled(1, m, "shop/never", WAIT)?;
    succeeded(never.cni("ADD")?)?;
    let churn: Vec<Value> = c
        .logs_since(1, m)
        .into_iter()
        .filter(|l| l["message"] == "pod un-enrolled" && l["pod"] == "shop/never")
        .collect();
    assert!(
        churn.is_empty(),
        "same netns and addresses: no re-enrolment: {churn:?}"
    );
    Ok(())
}

fn pod_pins(c: &Cluster, node: usize) -> Vec<String> {
    std::fs::read_dir(c.bpf_dir(node).join("pods"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Keys of a pinned map, as bpftool prints them (hex bytes).
fn map_keys(pin: &Path) -> Result<Vec<String>> {
    let out = ztunnel_tests::process::host(
        "bpftool",
        &["-j", "map", "dump", "pinned", &pin.display().to_string()],
    )?;
    let v: Value = serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })?;
    Ok(v.as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| e["key"].to_string())
        .collect())
}

#[test]
fn del_unenrols_and_leaves_nothing_behind() -> Result<()> {
    let c = start(cluster(), "10s")?;
    let p = c.pod("shop", "new1");
    let dir = c.bpf_dir(1);
    let before = (
        map_keys(&dir.join("enrolled_netns"))?,
        map_keys(&dir.join("pod_addresses"))?,
    );
    succeeded(p.cni("ADD")?)?;
    assert!(pod_pins(&c, 1).contains(&"shop_new1".to_owned()));
    assert_eq!(
        map_keys(&dir.join("enrolled_netns"))?.len(),
        before.0.len() + 1
    );
    assert_eq!(
        map_keys(&dir.join("pod_addresses"))?.len(),
        before.1.len() + 1
    );

    let m = c.log_mark(1);
    succeeded(p.cni("DEL")?)?;
    c.wait_for_log_since(1, m, WAIT, |l| {
        l["message"] == "pod un-enrolled" && l["pod"] == "shop/new1"
    })?;
    assert!(!pod_pins(&c, 1).contains(&"shop_new1".to_owned()));
    let after = (
        map_keys(&dir.join("enrolled_netns"))?,
        map_keys(&dir.join("pod_addresses"))?,
    );
    assert_eq!(after, before, "maps as before the ADD");
    // Nothing of the proxy is left in the pod's netns either (its listeners close as their
    // tasks end).
    ztunnel_tests::wait_until(WAIT, "the proxy's listeners in the pod to close", || {
        let ss = p.run(&["ss", "-Htln"], Duration::from_secs(5)).ok()?;
        String::from_utf8_lossy(&ss.stdout)
            .trim()
            .is_empty()
            .then_some(())
    })?;

    // The sandbox is gone: the configuration's own view of the pod does not bring it back.
    report_running(&c, "shop", "new1")?;
    assert!(enrolled_lines(&c, 1, m, "shop/new1").is_empty());
    // DEL again, and DEL of a sandbox the proxy never saw, succeed (the runtime retries them).
    succeeded(p.cni("DEL")?)?;
    succeeded(c.pod("shop", "new2").cni("DEL")?)?;
    // A new sandbox for the same pod is enrolled anew.
    let run = CniRun {
        container_id: Some("sandbox-2".into()),
        ..Default::default()
    };
    succeeded(p.cni_run("ADD", &run)?)?;
    assert!(pod_pins(&c, 1).contains(&"shop_new1".to_owned()));
    Ok(())
}

#[test]
fn with_the_proxy_down_pods_of_captured_namespaces_do_not_start() -> Result<()> {
    let c = start(
        cluster()
            .namespace("created-later", &[])
            .pod(pod("unknown-ns", "x").node(1).pending()),
        "10s",
    )?;
    let state: Value = serde_json::from_str(&std::fs::read_to_string(
        c.node_cni(1)
            .socket
            .with_file_name("captured-namespaces.json"),
    )?)?;
    assert_eq!(state["captured"], json!(["shop"]), "{state}");
    c.stop_proxy(1)?;
    assert!(
        !c.node_cni(1).socket.exists(),
        "the socket goes with the proxy"
    );

    // A pod of a captured namespace must not start uncaptured.
    let out = c.pod("shop", "new1").cni("ADD")?;
    assert!(!out.success, "{out:?}");
    assert_eq!(out.code(), Some(11), "{}", out.stdout);
    let text = out.error_text();
    assert!(
        text.contains("not reachable") && text.contains("namespace shop is captured"),
        "{text}"
    );
    // Nor a pod of a namespace the proxy never heard of.
    let out = c.pod("unknown-ns", "x").cni("ADD")?;
    assert!(
        !out.success && out.error_text().contains("unknown"),
        "{out:?}"
    );
    // Pods of other namespaces start (kube-system keeps working without the proxy).
    let old = c.pod("legacy", "old");
    let out = succeeded(old.cni("ADD")?)?;
    assert_eq!(out.json, old.cni_prev_result());
    // DEL never blocks a sandbox's tear-down.
    succeeded(c.pod("shop", "new2").cni("DEL")?)?;

    // Once a proxy runs again, the refused pod's retry succeeds.
    let mut extra = c.cni_proxy_args(1);
    extra.extend(["--cni-pod-wait".to_owned(), "10s".to_owned()]);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    c.start_proxy_with(1, &extra)?;
    succeeded(c.pod("shop", "new1").cni("ADD")?)?;
    Ok(())
}

#[test]
fn bad_cni_input_gets_a_clear_error() -> Result<()> {
    let c = start(cluster(), "10s")?;
    let p = c.pod("shop", "new1");
    let fail = |run: CniRun, code: u64, text: &str| -> Result<()> {
        let out = p.cni_run("ADD", &run)?;
        assert!(!out.success, "{run:?} must fail: {out:?}");
        assert_eq!(out.code(), Some(code), "{run:?}: {}", out.stdout);
        assert!(
            out.error_text().contains(text),
            "{run:?}: expected {text:?} in {}",
            out.error_text()
        );
        assert!(
            out.stderr.contains("ztunnel-cni:"),
            "explained on stderr too: {}",
            out.stderr
        );
        Ok(())
    };
    let env = |k: &str, v: Option<&str>| CniRun {
        env: vec![(k.to_owned(), v.map(str::to_owned))],
        ..Default::default()
    };
    fail(
        CniRun {
            stdin: Some(b"{not json".to_vec()),
            ..Default::default()
        },
        6,
        "not valid",
    )?;
    fail(env("CNI_NETNS", None), 4, "CNI_NETNS is not set")?;
    fail(
        env("CNI_NETNS", Some("/nonexistent/netns")),
        4,
        "cannot open CNI_NETNS",
    )?;
    fail(
        env("CNI_ARGS", Some("K8S_POD_NAMESPACE=shop")),
        4,
        "half a pod",
    )?;
    fail(
        CniRun {
            prev_result: Some(json!({"cniVersion": "1.0.0", "ips": []})),
            ..Default::default()
        },
        7,
        "no address",
    )?;
    // Checked by the proxy: a file that is not a network namespace, and the node's own
    // network namespace (a host-network pod must never be captured).
    fail(
        env("CNI_NETNS", Some("/etc/hostname")),
        11,
        "not a namespace file",
    )?;
    let node_ns = c.node(1).netns_path().display().to_string();
    fail(
        env("CNI_NETNS", Some(&node_ns)),
        11,
        "node's own network namespace",
    )?;
    // None of it enrolled anything, and the proxy keeps serving.
    assert!(!pod_pins(&c, 1).contains(&"shop_new1".to_owned()));
    succeeded(p.cni("ADD")?)?;
    // CHECK of a pod that should be captured and is not fails with the reason.
    let out = c.pod("shop", "new2").cni("CHECK")?;
    assert!(!out.success, "{out:?}");
    assert_eq!(out.code(), Some(100), "{}", out.stdout);
    assert!(
        out.error_text().contains("should be captured"),
        "{}",
        out.error_text()
    );
    Ok(())
}

#[test]
fn install_chains_the_plugin_once_and_uninstall_removes_it() -> Result<()> {
    let c = Cluster::builder().start_without_proxies()?;
    let first = c.install_cni(1)?;
    let cni = c.node_cni(1);
    let list: Value = serde_json::from_str(&std::fs::read_to_string(cni.conflist())?)?;
    let types: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["bridge", "portmap", "ztunnel-cni"], "{list}");
    assert_eq!(
        list["plugins"][2]["socket"],
        cni.socket.display().to_string().as_str()
    );
    assert!(String::from_utf8_lossy(&first.stdout).contains("updated"));
    // The installed plugin is the built one and runs.
    let out = std::process::Command::new(cni.bin_dir.join("ztunnel-cni"))
        .env("CNI_COMMAND", "VERSION")
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert!(
        v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0")),
        "{v}"
    );

    let text = std::fs::read_to_string(cni.conflist())?;
    let again = c.install_cni(1)?;
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("unchanged"),
        "{again:?}"
    );
    assert_eq!(std::fs::read_to_string(cni.conflist())?, text, "idempotent");

    let out = c.ztunnel_cni_command(&[
        "uninstall",
        "--bin-dir",
        &cni.bin_dir.display().to_string(),
        "--conf-dir",
        &cni.conf_dir.display().to_string(),
        "--socket",
        &cni.socket.display().to_string(),
    ])?;
    assert!(out.status.success(), "{out:?}");
    let list: Value = serde_json::from_str(&std::fs::read_to_string(cni.conflist())?)?;
    assert_eq!(list["plugins"].as_array().unwrap().len(), 2, "{list}");
    assert!(!cni.bin_dir.join("ztunnel-cni").exists());
    Ok(())
}

#[test]
fn a_restarted_proxy_keeps_capturing_the_sandboxes_it_was_told_about() -> Result<()> {
    let c = start(cluster(), "10s")?;
    c.wait_enrolled(2, 0, "shop/web", WAIT)?;
    let _server = c.pod("shop", "web").http_server(8080, "web")?;
    let web = format!("{}:8080", c.pod("shop", "web").ip());
    let p = c.pod("shop", "new1");
    succeeded(p.cni("ADD")?)?;
    // The API has not reported the pod's address yet when the proxy crashes. Meanwhile the
    // pod's connections fail closed.
    c.kill_proxy(1)?;
    let down = p.probe(&["get", "--addr", &web, "--timeout-ms", "3000"])?;
    assert_eq!(
        down.code,
        Some(1),
        "must fail while the proxy is down: {}",
        down.stdout
    );
    assert_eq!(down.json["kind"], "connection refused", "{}", down.stdout);
    let m1 = c.log_mark(1);
    let mut extra = c.cni_proxy_args(1);
    extra.extend(["--cni-pod-wait".to_owned(), "10s".to_owned()]);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    c.start_proxy_with(1, &extra)?;
    let enrolled = enrolled_lines(&c, 1, m1, "shop/new1");
    assert_eq!(
        enrolled.len(),
        1,
        "enrolled again before ready: {enrolled:?}"
    );
    assert_eq!(enrolled[0]["source"], "cni", "{:?}", enrolled[0]);
    let (m1, m2) = (c.log_mark(1), c.log_mark(2));
    let got = p.get(&web)?;
    assert_eq!(got.code, Some(0), "{}", got.stdout);
    let o = c.wait_for_connection(1, m1, WAIT, |l| {
        l["direction"] == "outbound" && l["src_workload"] == "shop/new1"
    })?;
    assert_eq!(o["hbone"], true, "{o}");
    let i = c.wait_for_connection(2, m2, WAIT, |l| l["dst_addr"] == web.as_str())?;
    assert_eq!(
        i["src_identity"], "spiffe://cluster.local/ns/shop/sa/new1",
        "{i}"
    );

    // A DEL while the proxy is down: the next proxy does not adopt the sandbox (its netns is
    // gone) and nothing of it stays.
    c.kill_proxy(1)?;
    succeeded(p.cni("DEL")?)?;
    ztunnel_tests::process::host("ip", &["netns", "del", p.netns()])?;
    c.start_proxy_with(1, &extra)?;
    assert!(!pod_pins(&c, 1).contains(&"shop_new1".to_owned()));
    let store = c.node_cni(1).socket.with_file_name("cni-pods");
    let left: Vec<_> = std::fs::read_dir(&store)?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "stored sandboxes left: {left:?}");
    Ok(())
}
