//! The node proxy on a real Kubernetes: `cargo xtask cluster up` (two nodes, each with its own
//! kubelet, containerd and cgroup root, the chart installed with helm), then what a platform
//! engineer does in the first hour, checked on the wire, in the proxies' logs, in bpffs and in
//! the metrics. The cluster is torn down at the end, also when a step fails; a cluster that
//! does not start fails the suite. README "Install on Kubernetes" is what [`LocalCluster::up`]
//! and the steps below run.
mod kube;

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, ensure, Context as _, Result};
use kube::{
    apply, contains, exec, helm, http, kubectl, kubectl_json, pod_ip, proxy_log, wait_for,
    wait_ready, Capture, LocalCluster, Streamed,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// The suite's workloads: `shop` (enrolled later) with a client on node 1 and a web server on
/// node 2; `outside`, never enrolled, with a client on node 1; `authz` with the ext-authz
/// provider (not enrolled: the proxies call it directly). Servers are busybox `nc -ll -e` with
/// a tiny HTTP responder from a ConfigMap.
const WORKLOADS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: outside}
---
apiVersion: v1
kind: Namespace
metadata: {name: authz}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: frontend, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: http, namespace: shop}
data:
  http.sh: |
    # One HTTP/1.1 exchange on stdin/stdout: 200 with the server's name, method and path.
    read -r method path proto
    len=0
    while read -r line; do
      line=$(printf '%s' "$line" | tr -d '\r')
      [ -z "$line" ] && break
      case "$line" in [Cc]ontent-[Ll]ength:*) len=${line#*: } ;; esac
    done
    [ "$len" -gt 0 ] && head -c "$len" >/dev/null
    body="$NAME $method $path"
    printf 'HTTP/1.1 200 OK\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s\n' $(( ${#body} + 1 )) "$body"
---
apiVersion: v1
kind: ConfigMap
metadata: {name: authz, namespace: authz}
data:
  authz.sh: |
    # An HTTP ext-authz check: 200 when the request carried `x-ext-authz: allow`, else 403.
    read -r method path proto
    verdict="403 Forbidden"
    while read -r line; do
      line=$(printf '%s' "$line" | tr -d '\r')
      [ -z "$line" ] && break
      case "$line" in [Xx]-[Ee]xt-[Aa]uthz:*allow*) verdict="200 OK" ;; esac
    done
    echo "check $method $path: $verdict" >&2
    printf 'HTTP/1.1 %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' "$verdict"
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec:
  nodeName: ztk-node1
  serviceAccountName: frontend
  terminationGracePeriodSeconds: 0
  containers:
  - {name: c, image: ztk.local/busybox:1, imagePullPolicy: Never, command: [sleep, "100000"]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  nodeName: ztk-node2
  serviceAccountName: web
  terminationGracePeriodSeconds: 0
  containers:
  - name: c
    image: ztk.local/busybox:1
    imagePullPolicy: Never
    command: [nc, -ll, -p, "8080", -e, /bin/sh, /srv/http.sh]
    env: [{name: NAME, value: web}]
    ports: [{containerPort: 8080, name: http}]
    volumeMounts: [{name: http, mountPath: /srv}]
  volumes: [{name: http, configMap: {name: http}}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: outside}
spec:
  nodeName: ztk-node1
  terminationGracePeriodSeconds: 0
  containers:
  - {name: c, image: ztk.local/busybox:1, imagePullPolicy: Never, command: [sleep, "100000"]}
---
apiVersion: v1
kind: Pod
metadata: {name: ext-authz, namespace: authz, labels: {app: ext-authz}}
spec:
  nodeName: ztk-node2
  terminationGracePeriodSeconds: 0
  containers:
  - name: c
    image: ztk.local/busybox:1
    imagePullPolicy: Never
    command: [nc, -ll, -p, "8000", -e, /bin/sh, /srv/authz.sh]
    ports: [{containerPort: 8000, name: http}]
    volumeMounts: [{name: authz, mountPath: /srv}]
  volumes: [{name: authz, configMap: {name: authz}}]
---
apiVersion: v1
kind: Service
metadata: {name: ext-authz, namespace: authz}
spec:
  selector: {app: ext-authz}
  ports: [{name: http, port: 8000, targetPort: http}]
"#;

struct Timer {
    started: Instant,
    steps: Vec<(String, Duration)>,
}

impl Timer {
    fn step(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let t = Instant::now();
        eprintln!("--- {name}");
        f().with_context(|| format!("step `{name}`"))?;
        let took = t.elapsed();
        eprintln!("--- {name}: ok ({:.1} s)", took.as_secs_f64());
        self.steps.push((name.to_owned(), took));
        Ok(())
    }
}

#[test]
fn real_cluster_suite() -> Result<()> {
    let cluster = LocalCluster::up()?;
    eprintln!(
        "cluster up (images, two nodes, chart) in {:.1} s",
        cluster.bring_up.as_secs_f64()
    );
    let mut t = Timer {
        started: Instant::now(),
        steps: Vec::new(),
    };
    t.step(
        "the CA runs with its key readable by its group only",
        ca_key_scheme,
    )?;
    t.step(
        "the node proxies read only the `istio` ConfigMap",
        mesh_config_rbac,
    )?;
    t.step(
        "each node's programs attach at its own cgroup",
        per_node_attachment,
    )?;
    t.step(
        "a private bpffs mount is explained; propagation None works",
        bpffs_propagation,
    )?;
    t.step("workloads start", || {
        apply(WORKLOADS)?;
        wait_ready("shop", &["client", "web"])?;
        wait_ready("outside", &["stranger"])?;
        wait_ready("authz", &["ext-authz"])?;
        Ok(())
    })?;
    let web = pod_ip("shop", "web")?;
    t.step("before enrolment the wire carries plaintext", || {
        plaintext_baseline(web)
    })?;
    t.step(
        "labelling the namespace captures running pods",
        label_namespace,
    )?;
    t.step(
        "pod to pod across nodes is mTLS with the workloads' SPIFFE ids",
        || mtls_on_the_wire(web),
    )?;
    t.step("STRICT PeerAuthentication applies live", || {
        strict_mtls(web)
    })?;
    t.step(
        "a new pod is captured from its first instruction (CNI plugin)",
        || first_instruction(web),
    )?;
    t.step(
        "kubelet probes pass STRICT; another process on the node does not",
        probes_under_strict,
    )?;
    t.step("L7 AuthorizationPolicy applies live", || {
        l7_authorization(web)
    })?;
    t.step("RequestAuthentication with a JWT", || jwt(web))?;
    t.step("CUSTOM ext-authz provider as a Service", || ext_authz(web))?;
    t.step(
        "VirtualServices and DestinationRules are watched; bad ones rejected",
        traffic_rules,
    )?;
    t.step("metrics on each node's 15020", metrics)?;
    t.step(
        "rollout restart under load: no plaintext, no failure once Ready",
        || rollout_restart(web),
    )?;
    t.step("unlabel + helm uninstall leaves no pins or links", || {
        uninstall(web)
    })?;
    eprintln!(
        "suite: bring-up {:.1} s, steps {:.1} s",
        cluster.bring_up.as_secs_f64(),
        t.started.elapsed().as_secs_f64()
    );
    for (name, took) in &t.steps {
        eprintln!("  {:>5.1} s  {name}", took.as_secs_f64());
    }
    drop(cluster);
    Ok(())
}

/// Finding: the CA crash-looped on its key's mode. The kubelet makes the Secret's files
/// root:<fsGroup> 0440; the CA accepts exactly that and nothing wider.
fn ca_key_scheme() -> Result<()> {
    let pods = kubectl_json(&[
        "-n",
        "istio-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/component=ca",
    ])?;
    let pod = &pods["items"][0];
    ensure!(
        pod["status"]["containerStatuses"][0]["ready"] == true
            && pod["status"]["containerStatuses"][0]["restartCount"] == 0,
        "the CA pod is not ready or restarted: {}",
        pod["status"]
    );
    let (uid, node) = (
        pod["metadata"]["uid"].as_str().unwrap_or(""),
        pod["spec"]["nodeName"].as_str().unwrap_or(""),
    );
    let key = Path::new(kube::RUN_DIR).join(format!(
        "{node}/kubelet/root/pods/{uid}/volumes/kubernetes.io~secret/ca-key/root-key.pem"
    ));
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(&key).with_context(|| format!("{}", key.display()))?;
    ensure!(
        (meta.mode() & 0o777, meta.uid(), meta.gid()) == (0o440, 0, 65532),
        "the key file is {:o} {}:{}, not 0440 root:65532",
        meta.mode() & 0o777,
        meta.uid(),
        meta.gid()
    );
    Ok(())
}

fn can_i(verb: &str, what: &str) -> Result<bool> {
    let out = kube::kubectl_cmd()?
        .args(["auth", "can-i", verb, what, "-n", "istio-system"])
        .args(["--as", "system:serviceaccount:istio-system:ztunnel"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "yes")
}

/// Finding: the Role granted every ConfigMap of the root namespace. Now only `istio`, and the
/// proxies (which list and watch it by field selector) still load it.
fn mesh_config_rbac() -> Result<()> {
    ensure!(can_i("get", "configmaps/istio")?);
    ensure!(can_i("watch", "configmaps/istio")?);
    ensure!(!can_i("get", "configmaps/ztunnel-ca-root")?);
    ensure!(!can_i("list", "configmaps")?);
    ensure!(!can_i("get", "secrets/ztunnel-ca")?);
    for node in kube::NODES {
        let log = proxy_log(node)?;
        ensure!(
            log.iter().any(|l| l["message"] == "proxy ready"),
            "{node}'s proxy is not ready"
        );
        let forbidden: Vec<&Value> = log
            .iter()
            .filter(|l| l.to_string().contains("forbidden"))
            .collect();
        ensure!(forbidden.is_empty(), "{node}: {forbidden:?}");
    }
    Ok(())
}

fn bpftool(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("bpftool").args(args).output()?;
    ensure!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// This host's cgroup v2 mount (`/sys/fs/cgroup/unified` on hybrid hosts).
fn cgroup2() -> Result<std::path::PathBuf> {
    ztunnel_tests::cleanup::cgroup2_root()
}

/// Findings: the cgroup v2 path on hybrid hosts, and one pin directory and cgroup per node
/// where nodes share a host (`$(NODE_NAME)` in the chart's values).
fn per_node_attachment() -> Result<()> {
    for node in kube::NODES {
        let pins = Path::new("/sys/fs/bpf").join(node);
        ensure!(
            pins.join("prog_connect4").exists(),
            "no pins in {}",
            pins.display()
        );
        let cgroup = cgroup2()?.join(node).display().to_string();
        let attached = bpftool(&["cgroup", "show", &cgroup])?;
        for prog in ["zt_connect4", "zt_sockops"] {
            ensure!(
                attached.contains(prog),
                "{prog} not at {cgroup}: {attached}"
            );
        }
    }
    let root = bpftool(&["cgroup", "show", &cgroup2()?.display().to_string()])?;
    ensure!(
        !root.contains("zt_connect4"),
        "attached at the machine's root: {root}"
    );
    Ok(())
}

fn mount_propagation(shared: bool) -> Result<()> {
    let flag = if shared {
        "--make-shared"
    } else {
        "--make-private"
    };
    let out = std::process::Command::new("mount")
        .args([flag, "/sys/fs/bpf"])
        .output()?;
    ensure!(
        out.status.success(),
        "mount {flag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn upgrade_propagation(value: &str) -> Result<()> {
    let chart = ztunnel_tests::workspace_root().join("deploy/helm/ztunnel");
    helm(&[
        "upgrade",
        "ztunnel",
        &chart.display().to_string(),
        "-n",
        "istio-system",
        "--reuse-values",
        "--set",
        &format!("nodeProxy.bpffsMountPropagation={value}"),
        "--wait",
        "--timeout",
        "90s",
    ])?;
    kubectl(&[
        "-n",
        "istio-system",
        "rollout",
        "status",
        "daemonset/ztunnel",
        "--timeout=90s",
    ])
    .map(drop)
}

/// Finding: `HostToContainer` on the bpffs hostPath needs a shared mount, and nodes without
/// systemd have private ones. The runtime's refusal is what docs/kubernetes.md quotes, and
/// `nodeProxy.bpffsMountPropagation=None` starts the proxy on such a node. (`cluster up` made
/// the mount shared; it is shared again at the end of this step.)
fn bpffs_propagation() -> Result<()> {
    mount_propagation(false)?;
    let result = (|| {
        let old = kube::proxy_pod("ztk-node1")?;
        kubectl(&["-n", "istio-system", "delete", "pod", &old, "--wait=false"])?;
        wait_for("the runtime to refuse the bpffs mount", WAIT, || {
            let events = kubectl(&[
                "-n",
                "istio-system",
                "get",
                "events",
                "--field-selector",
                "reason=Failed",
            ])?;
            Ok(events
                .contains("is not a shared or slave mount")
                .then_some(()))
        })?;
        upgrade_propagation("None")?;
        for node in kube::NODES {
            let log = proxy_log(node)?;
            ensure!(
                log.iter().any(|l| l["message"] == "proxy ready"),
                "{node} not ready"
            );
        }
        Ok(())
    })();
    mount_propagation(true)?;
    result?;
    upgrade_propagation("HostToContainer")
}

/// The capture method sees plaintext when there is some: an unenrolled request crosses the
/// underlay as HTTP.
fn plaintext_baseline(web: Ipv4Addr) -> Result<()> {
    let cap = Capture::start("baseline", &format!("tcp and host {web}"))?;
    let (code, body) = http("shop", "client", &format!("http://{web}:8080/before"), &[])?;
    std::thread::sleep(Duration::from_millis(300));
    let packets = cap.stop()?;
    ensure!(
        code == 200 && body.contains("web GET /before"),
        "{code} {body}"
    );
    ensure!(
        packets
            .iter()
            .any(|p| p.dst.1 == 8080 && contains(&p.payload, b"GET /before")),
        "the plaintext request was not seen on the underlay ({} packets)",
        packets.len()
    );
    Ok(())
}

fn pod_status(ns: &str, pod: &str) -> Result<(String, String, i64)> {
    let p = kubectl_json(&["-n", ns, "get", "pod", pod])?;
    let c = &p["status"]["containerStatuses"][0];
    Ok((
        p["metadata"]["uid"].as_str().unwrap_or("").to_owned(),
        c["state"]["running"]["startedAt"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
        c["restartCount"].as_i64().unwrap_or(-1),
    ))
}

fn enrolled_in_log(node: &str, pod: &str) -> Result<bool> {
    Ok(proxy_log(node)?
        .iter()
        .any(|l| l["message"] == "pod enrolled" && l["pod"] == pod))
}

/// `kubectl label namespace`: the running pods are captured (proxy log, pinned sk_lookup link)
/// without being restarted.
fn label_namespace() -> Result<()> {
    let before = [pod_status("shop", "client")?, pod_status("shop", "web")?];
    kubectl(&[
        "label",
        "namespace",
        "shop",
        "istio.io/dataplane-mode=ambient",
    ])?;
    for (node, pod, pin) in [
        ("ztk-node1", "shop/client", "shop_client"),
        ("ztk-node2", "shop/web", "shop_web"),
    ] {
        wait_for(&format!("{pod} enrolled on {node}"), WAIT, || {
            Ok(enrolled_in_log(node, pod)?.then_some(()))
        })?;
        let link = format!("/sys/fs/bpf/{node}/pods/{pin}");
        let shown = bpftool(&["link", "show", "pinned", &link])?;
        ensure!(shown.contains("sk_lookup"), "{link}: {shown}");
    }
    let after = [pod_status("shop", "client")?, pod_status("shop", "web")?];
    ensure!(before == after, "pods restarted: {before:?} → {after:?}");
    Ok(())
}

/// Only HBONE (15008) between the client's node and the web pod, TLS from the first byte, no
/// byte of the HTTP exchange in clear; the proxies log both workloads' SPIFFE ids.
fn mtls_on_the_wire(web: Ipv4Addr) -> Result<()> {
    let cap = Capture::start("mtls", &format!("tcp and host {web}"))?;
    let (c1, b1) = http("shop", "client", &format!("http://{web}:8080/by-ip"), &[])?;
    let (c2, b2) = http(
        "shop",
        "client",
        "http://web.shop.svc.cluster.local/by-name",
        &[],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let packets = cap.stop()?;
    ensure!(c1 == 200 && b1.contains("web GET /by-ip"), "{c1} {b1}");
    ensure!(c2 == 200 && b2.contains("web GET /by-name"), "{c2} {b2}");
    check_only_hbone(&packets, web)?;
    let first = packets
        .iter()
        .find(|p| p.dst == (web, 15008) && !p.payload.is_empty())
        .context("no HBONE payload seen")?;
    ensure!(
        first.payload.starts_with(&[0x16, 0x03]),
        "the first bytes to 15008 are not a TLS handshake: {:02x?}",
        &first.payload[..first.payload.len().min(8)]
    );
    // The tunnel leaves from inside the client pod's netns, from its address.
    let client = pod_ip("shop", "client")?;
    ensure!(
        packets
            .iter()
            .all(|p| p.src.0 == client || p.dst.0 == client),
        "traffic to the web pod from elsewhere than the client pod ({client})"
    );
    for (node, direction) in [("ztk-node1", "outbound"), ("ztk-node2", "inbound")] {
        let log = proxy_log(node)?;
        let seen = log.iter().any(|l| {
            l["message"] == "connection closed"
                && l["direction"] == direction
                && l["hbone"] == true
                && l["src_identity"] == FRONTEND
                && (direction == "inbound" || l["dst_identity"] == WEB)
                && l["outcome"] == "ok"
        });
        ensure!(
            seen,
            "{node}: no {direction} HBONE connection frontend → web logged"
        );
    }
    Ok(())
}

fn check_only_hbone(packets: &[kube::Packet], web: Ipv4Addr) -> Result<()> {
    ensure!(!packets.is_empty(), "nothing captured");
    let clear: Vec<&kube::Packet> = packets
        .iter()
        .filter(|p| {
            !p.has_port(15008)
                || contains(&p.payload, b"GET /")
                || contains(&p.payload, b"HTTP/1.1")
        })
        .collect();
    ensure!(
        clear.is_empty(),
        "{} packets to or from {web} outside HBONE or in clear, e.g. {:?}",
        clear.len(),
        clear.first()
    );
    Ok(())
}

fn example(name: &str) -> Result<String> {
    let path = ztunnel_tests::workspace_root()
        .join("deploy/examples")
        .join(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// deploy/examples/strict-mtls.yaml: an unenrolled client is refused, the mesh client is not.
fn strict_mtls(web: Ipv4Addr) -> Result<()> {
    let url = format!("http://{web}:8080/strict");
    ensure!(
        http("outside", "stranger", &url, &[])?.0 == 200,
        "plaintext refused before STRICT"
    );
    apply(&example("strict-mtls.yaml")?)?;
    wait_for("STRICT to refuse the unenrolled client", WAIT, || {
        Ok((http("outside", "stranger", &url, &[])?.0 == 0).then_some(()))
    })?;
    ensure!(
        http("shop", "client", &url, &[])?.0 == 200,
        "the mesh client was refused"
    );
    let log = proxy_log("ztk-node2")?;
    ensure!(
        log.iter()
            .any(|l| l.to_string().contains("mTLS mode STRICT")),
        "no STRICT refusal logged on node 2"
    );
    Ok(())
}

/// Finding: new pods started uncaptured (enrolment waited for `status.podIPs`; 4 of 20 early
/// connections bypassed the mesh). With `ztunnel-cni` chained into each node's CNI
/// configuration, a pod that connects 20 times from its very first instruction sends nothing
/// outside HBONE, and every request is served.
fn first_instruction(web: Ipv4Addr) -> Result<()> {
    for node in kube::NODES {
        let conflist = Path::new(kube::RUN_DIR).join(format!("{node}/cni/net.d/10-ztk.conflist"));
        let text = std::fs::read_to_string(&conflist)?;
        ensure!(
            text.contains("ztunnel-cni"),
            "{}: not chained: {text}",
            conflist.display()
        );
    }
    let cap = Capture::start("first-instruction", &format!("tcp and host {web}"))?;
    apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: early, namespace: shop}}\nspec:\n  \
         nodeName: ztk-node1\n  serviceAccountName: frontend\n  restartPolicy: Never\n  \
         containers:\n  - name: c\n    image: ztk.local/busybox:1\n    \
         imagePullPolicy: Never\n    command: [sh, -c, 'for i in $(seq 1 20); do timeout 2 \
         wget -q -O- http://{web}:8080/early-$i; done']\n"
    ))?;
    wait_for("the early pod to finish", WAIT, || {
        let p = kubectl_json(&["-n", "shop", "get", "pod", "early"])?;
        Ok(p["status"]["phase"]
            .as_str()
            .filter(|s| *s == "Succeeded" || *s == "Failed")
            .map(str::to_owned))
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let packets = cap.stop()?;
    check_only_hbone(&packets, web)?;
    let out = kubectl(&["-n", "shop", "logs", "early"])?;
    ensure!(
        out.matches("web GET /early-").count() == 20,
        "not every early request was served: {out}"
    );
    let log = proxy_log("ztk-node1")?;
    ensure!(
        log.iter()
            .any(|l| l["message"] == "CNI: pod captured before it starts"
                && l["pod"] == "shop/early"),
        "node 1's proxy did not capture the early pod through the CNI plugin"
    );
    kubectl(&["-n", "shop", "delete", "pod", "early", "--wait=false"])?;
    Ok(())
}

/// Finding: under mesh-wide STRICT the kubelet's HTTP probes of enrolled pods were refused, so
/// they never became Ready. The probes now pass (the proxy recognises sockets of the kubelet's
/// cgroup, `nodeProxy.nodeCgroupPath`), while a host-network pod on the same node, whose
/// connections carry the very same node address, is still refused.
fn probes_under_strict() -> Result<()> {
    apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: probed, namespace: shop, labels: {app: probed}}\n\
         spec:\n  nodeName: ztk-node2\n  terminationGracePeriodSeconds: 0\n  containers:\n  - name: c\n    \
         image: ztk.local/busybox:1\n    imagePullPolicy: Never\n    \
         command: [nc, -ll, -p, \"8080\", -e, /bin/sh, /srv/http.sh]\n    \
         env: [{name: NAME, value: probed}]\n    \
         readinessProbe: {httpGet: {path: /ready, port: 8080}, periodSeconds: 1}\n    \
         volumeMounts: [{name: http, mountPath: /srv}]\n  \
         volumes: [{name: http, configMap: {name: http}}]\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {name: on-node, namespace: outside}\nspec:\n  \
         nodeName: ztk-node2\n  hostNetwork: true\n  terminationGracePeriodSeconds: 0\n  \
         containers:\n  - {name: c, image: ztk.local/busybox:1, imagePullPolicy: Never, \
         command: [sleep, \"100000\"]}\n",
    )?;
    wait_ready("shop", &["probed"])?;
    wait_ready("outside", &["on-node"])?;
    let log = proxy_log("ztk-node2")?;
    ensure!(
        log.iter().any(|l| l["transport"] == "node"
            && l["dst_workload"] == "shop/probed"
            && l["outcome"] == "ok"),
        "no kubelet probe of shop/probed logged as a node connection"
    );
    let url = format!("http://{}:8080/not-the-kubelet", pod_ip("shop", "probed")?);
    ensure!(
        http("outside", "on-node", &url, &[])?.0 == 0,
        "a host-network pod got through STRICT with the node's address"
    );
    // The same connection is fine where the port is PERMISSIVE: the refusal was STRICT's.
    apply(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: \
         {name: probed, namespace: shop}\nspec:\n  selector: {matchLabels: {app: probed}}\n  \
         mtls: {mode: PERMISSIVE}\n",
    )?;
    wait_for("PERMISSIVE to admit the host-network pod", WAIT, || {
        Ok((http("outside", "on-node", &url, &[])?.0 == 200).then_some(()))
    })?;
    kubectl(&["-n", "shop", "delete", "peerauthentication", "probed"])?;
    kubectl(&["-n", "shop", "delete", "pod", "probed", "--wait=false"])?;
    kubectl(&["-n", "outside", "delete", "pod", "on-node", "--wait=false"])?;
    Ok(())
}

/// deploy/examples/l7-authorization.yaml, applied live: the frontend may GET /api/*, /admin is
/// denied, anything else has no ALLOW rule.
fn l7_authorization(web: Ipv4Addr) -> Result<()> {
    apply(&example("l7-authorization.yaml")?)?;
    let get = |path: &str| http("shop", "client", &format!("http://{web}:8080{path}"), &[]);
    wait_for("the ALLOW policy to deny GET /", WAIT, || {
        Ok((get("/")?.0 == 403).then_some(()))
    })?;
    let (code, body) = get("/api/items")?;
    ensure!(
        code == 200 && body.contains("web GET /api/items"),
        "{code} {body}"
    );
    ensure!(get("/admin")?.0 == 403, "/admin allowed");
    ensure!(get("/admin/x")?.0 == 403, "/admin/x allowed");
    Ok(())
}

/// An identity provider for the JWT case: an ES256 key and its JWKS.
struct Idp {
    key: jsonwebtoken::EncodingKey,
    jwks: String,
}

impl Idp {
    fn new() -> Idp {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let kp = rcgen::KeyPair::generate().expect("key");
        let raw = kp.public_key_raw();
        let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
            "alg": "ES256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]});
        Idp {
            key: jsonwebtoken::EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes())
                .expect("key"),
            jwks: jwks.to_string(),
        }
    }

    fn token(&self, scope: &str) -> String {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("k1".into());
        let claims = serde_json::json!({"iss": "https://auth.shop.example", "sub": "alice",
            "aud": "web", "scope": scope, "exp": now + 600});
        jsonwebtoken::encode(&h, &claims, &self.key).expect("signing")
    }
}

/// The example's RequestAuthentication with the provider's keys inline (its jwksUri is not
/// reachable from here): a valid token with scope orders.write may POST /orders, a bad token
/// is 401, a valid one without the scope 403.
fn jwt(web: Ipv4Addr) -> Result<()> {
    let idp = Idp::new();
    let inline = example("l7-authorization.yaml")?
        .split("\n---\n")
        .next()
        .context("the example's first document")?
        .replace(
            "      jwksUri: https://auth.shop.example/.well-known/jwks.json\n",
            &format!("      jwks: '{}'\n", idp.jwks),
        );
    ensure!(inline.contains("jwks: '"), "the example changed: {inline}");
    apply(&inline)?;
    let url = format!("http://{web}:8080/orders");
    let post = |token: &str| {
        let auth = format!("Authorization: Bearer {token}");
        http(
            "shop",
            "client",
            &url,
            &["--post-data", "x=1", "--header", &auth],
        )
    };
    let good = idp.token("orders.write");
    wait_for("a valid token to be accepted", WAIT, || {
        Ok((post(&good)?.0 == 200).then_some(()))
    })?;
    let (code, body) = post(&good)?;
    ensure!(
        code == 200 && body.contains("web POST /orders"),
        "{code} {body}"
    );
    ensure!(
        post(&format!("{good}x"))?.0 == 401,
        "a bad signature was not 401"
    );
    ensure!(
        post(&idp.token("orders.read"))?.0 == 403,
        "the wrong scope was allowed"
    );
    ensure!(
        http("shop", "client", &url, &["--post-data", "x=1"])?.0 == 403,
        "no token was allowed"
    );
    Ok(())
}

/// deploy/examples/ext-authz.yaml with the provider (the chart's meshConfig) as a real
/// Service: /checkout is allowed only when the provider says so.
fn ext_authz(web: Ipv4Addr) -> Result<()> {
    kubectl(&[
        "delete",
        "-n",
        "shop",
        "authorizationpolicy",
        "web",
        "deny-admin",
    ])?;
    kubectl(&["delete", "-n", "shop", "requestauthentication", "web-jwt"])?;
    apply(&example("ext-authz.yaml")?)?;
    let url = format!("http://{web}:8080/checkout");
    let allow = ["--header", "x-ext-authz: allow"];
    wait_for("CUSTOM to deny /checkout", WAIT, || {
        Ok((http("shop", "client", &url, &[])?.0 == 403).then_some(()))
    })?;
    let (code, body) = http("shop", "client", &url, &allow)?;
    ensure!(
        code == 200 && body.contains("web GET /checkout"),
        "{code} {body}"
    );
    let (other, _) = http("shop", "client", &format!("http://{web}:8080/other"), &[])?;
    ensure!(other == 200, "a path outside the CUSTOM rule got {other}");
    let provider_log = kubectl(&["-n", "authz", "logs", "ext-authz"])?;
    ensure!(
        provider_log.contains("check GET /checkout: 200 OK")
            && provider_log.contains("check GET /checkout: 403 Forbidden"),
        "the provider did not see both checks: {provider_log}"
    );
    kubectl(&[
        "delete",
        "-n",
        "shop",
        "authorizationpolicy",
        "checkout-ext-authz",
    ])?;
    Ok(())
}

/// The node proxies may watch Istio's traffic rules (RBAC, the chart's CRDs) and read them as
/// from files: deploy/examples/bookinfo-traffic.yaml names Services this cluster lacks, which
/// each proxy reports as a configuration problem; a DestinationRule with a misspelt load
/// balancer (accepted by the CRD, whose traffic policies are free-form) is rejected by name.
fn traffic_rules() -> Result<()> {
    for what in [
        "virtualservices.networking.istio.io",
        "destinationrules.networking.istio.io",
    ] {
        ensure!(can_i("watch", what)?, "the node proxy may not watch {what}");
    }
    apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: bookinfo}\n")?;
    apply(&example("bookinfo-traffic.yaml")?)?;
    apply("apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: typo, namespace: bookinfo}\nspec: {host: details, trafficPolicy: {loadBalancer: {simple: ROUND_ROBN}}}\n")?;
    for node in kube::NODES {
        wait_for("the proxy to report the traffic rules", WAIT, || {
            let log = proxy_log(node)?;
            let problem = log.iter().any(|l| {
                let p = l["problem"].as_str().unwrap_or_default();
                p.contains("VirtualService bookinfo/reviews") && p.contains("not a known Service")
            });
            let rejected = log.iter().any(|l| {
                l["kind"] == "DestinationRule"
                    && l["name"] == "typo"
                    && l["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("ROUND_ROBN"))
            });
            Ok((problem && rejected).then_some(()))
        })
        .with_context(|| format!("on {node}"))?;
    }
    kubectl(&["delete", "namespace", "bookinfo", "--wait=false"])?;
    Ok(())
}

fn scrape(node_ip: &str) -> Result<String> {
    let out = std::process::Command::new("curl")
        .args(["-sf", "--max-time", "5"])
        .arg(format!("http://{node_ip}:15020/metrics"))
        .output()?;
    ensure!(out.status.success(), "scraping {node_ip}:15020 failed");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Each node proxy's Prometheus endpoint (the node's address, port 15020), as the pods'
/// prometheus.io annotations announce it.
fn metrics() -> Result<()> {
    let pod = kubectl_json(&[
        "-n",
        "istio-system",
        "get",
        "pod",
        &kube::proxy_pod("ztk-node1")?,
    ])?;
    let ann = &pod["metadata"]["annotations"];
    ensure!(
        ann["prometheus.io/scrape"] == "true" && ann["prometheus.io/port"] == "15020",
        "{ann}"
    );
    let n1 = scrape("10.99.0.1")?;
    let n2 = scrape("10.99.0.2")?;
    let src = format!("source_principal=\"{FRONTEND}\"");
    ensure!(
        metric_sum(
            &n1,
            "istio_tcp_connections_opened_total",
            &["reporter=\"source\"", &src]
        ) >= 2.0,
        "node 1 counted no mesh connections"
    );
    ensure!(
        metric_sum(
            &n2,
            "istio_tcp_connections_opened_total",
            &["reporter=\"destination\"", &src]
        ) >= 2.0,
        "node 2 counted no mesh connections"
    );
    ensure!(metric_sum(&n1, "ztunnel_enrolled_pods", &[]) == 1.0);
    ensure!(metric_sum(&n2, "ztunnel_enrolled_pods", &[]) == 1.0);
    ensure!(metric_sum(&n2, "ztunnel_ext_authz_checks_total", &[]) >= 2.0);
    ensure!(metric_sum(&n2, "ztunnel_authorization_decisions_total", &[]) >= 1.0);
    Ok(())
}

/// `kubectl rollout restart daemonset/ztunnel` while the client sends 10 requests a second:
/// nothing crosses the underlay outside HBONE, and once both new proxies are Ready no request
/// fails; the failures during the hand-over are counted and reported.
fn rollout_restart(web: Ipv4Addr) -> Result<()> {
    let cap = Capture::start("rollout", &format!("tcp and host {web}"))?;
    // Bounded: at most 600 requests, each with a 2 s limit, 100 ms apart.
    let script = format!(
        "for i in $(seq 1 600); do if timeout 2 wget -q -O /dev/null http://{web}:8080/load; \
         then echo ok $i; else echo fail $i; fi; [ -e /tmp/stop ] && break; usleep 100000; done"
    );
    let _ = exec("shop", "client", &["rm", "-f", "/tmp/stop"])?;
    let load = Streamed::exec("shop", "client", &script)?;
    std::thread::sleep(Duration::from_secs(2));
    let old: Vec<String> = kube::NODES
        .iter()
        .map(|n| kube::proxy_pod(n))
        .collect::<Result<_>>()?;
    kubectl(&[
        "-n",
        "istio-system",
        "rollout",
        "restart",
        "daemonset/ztunnel",
    ])?;
    kubectl(&[
        "-n",
        "istio-system",
        "rollout",
        "status",
        "daemonset/ztunnel",
        "--timeout=120s",
    ])?;
    // When the last new proxy turned Ready (the API server's time, to the second).
    let mut ready_at = SystemTime::UNIX_EPOCH;
    for node in kube::NODES {
        let pod = kube::proxy_pod(node)?;
        ensure!(!old.contains(&pod), "{node}'s proxy was not replaced");
        let p = kubectl_json(&["-n", "istio-system", "get", "pod", &pod])?;
        let cond = p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Ready" && c["status"] == "True")
            .context("new proxy not Ready")?;
        let t = kube::parse_k8s_time(cond["lastTransitionTime"].as_str().unwrap_or(""))?;
        ready_at = ready_at.max(t);
    }
    std::thread::sleep(Duration::from_secs(5));
    exec("shop", "client", &["touch", "/tmp/stop"])?;
    let lines = load.finish(Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_millis(300));
    let packets = cap.stop()?;
    // Ready times are whole seconds, and a line is stamped when its request ended (up to its
    // 2 s limit after it began): a failure stamped later than Ready + 1 s + 2 s began after
    // both new proxies were Ready.
    let after_ready = ready_at + Duration::from_secs(1);
    let (mut ok, mut failed_during, mut failed_after) = (0, 0, Vec::new());
    for (at, line) in &lines {
        match (
            line.starts_with("ok"),
            *at > after_ready + Duration::from_secs(2),
        ) {
            (true, _) => ok += 1,
            (false, false) => failed_during += 1,
            (false, true) => failed_after.push(line.clone()),
        }
    }
    eprintln!(
        "rollout: {} requests, {ok} ok, {failed_during} failed during the hand-over, {} after \
         both new proxies were Ready; {} packets on the underlay, all HBONE",
        lines.len(),
        failed_after.len(),
        packets.len()
    );
    ensure!(
        lines.len() >= 50,
        "the load ran too briefly: {} requests",
        lines.len()
    );
    ensure!(
        failed_after.is_empty(),
        "failed after Ready: {failed_after:?}"
    );
    check_only_hbone(&packets, web)?;
    Ok(())
}

/// Removal as the README says: unlabel (the proxies un-enrol the pods), take the CNI plugin
/// out of each node's chain, then helm uninstall. Nothing is left: no pin, no cgroup program,
/// no pod link, no plugin; traffic flows unmeshed again.
fn uninstall(web: Ipv4Addr) -> Result<()> {
    kubectl(&["label", "namespace", "shop", "istio.io/dataplane-mode-"])?;
    for node in kube::NODES {
        let pods = Path::new("/sys/fs/bpf").join(node).join("pods");
        wait_for(&format!("{node}'s pods un-enrolled"), WAIT, || {
            Ok(std::fs::read_dir(&pods)
                .map(|d| d.count() == 0)
                .unwrap_or(true)
                .then_some(()))
        })?;
    }
    for node in kube::NODES {
        let pod = kube::proxy_pod(node)?;
        let d = format!("{}/{node}", kube::RUN_DIR);
        kubectl(&[
            "-n",
            "istio-system",
            "exec",
            &pod,
            "-c",
            "ztunnel",
            "--",
            "ztunnel",
            "cni",
            "uninstall",
            &format!("--bin-dir={d}/cni/bin"),
            &format!("--conf-dir={d}/cni/net.d"),
            &format!("--socket={d}/ztunnel/cni.sock"),
        ])?;
        let conflist = std::fs::read_to_string(format!("{d}/cni/net.d/10-ztk.conflist"))?;
        ensure!(
            !conflist.contains("ztunnel-cni"),
            "{node}: still chained: {conflist}"
        );
        ensure!(
            !Path::new(&format!("{d}/cni/bin/ztunnel-cni")).exists(),
            "{node}: plugin left"
        );
    }
    helm(&[
        "uninstall",
        "ztunnel",
        "-n",
        "istio-system",
        "--wait",
        "--timeout",
        "60s",
    ])?;
    wait_for("the node proxies gone", WAIT, || {
        let pods = kube::proxy_pods(None)?;
        Ok(pods["items"]
            .as_array()
            .is_some_and(|a| a.is_empty())
            .then_some(()))
    })?;
    for node in kube::NODES {
        let dir = Path::new("/sys/fs/bpf").join(node);
        let left: Vec<String> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ensure!(left.is_empty(), "{} still holds {left:?}", dir.display());
        let cgroup = cgroup2()?.join(node).display().to_string();
        let attached = bpftool(&["cgroup", "show", &cgroup])?;
        ensure!(!attached.contains("zt_"), "{cgroup} still has {attached}");
    }
    let (code, body) = http("shop", "client", &format!("http://{web}:8080/after"), &[])?;
    if code != 200 || !body.contains("web GET /after") {
        bail!("traffic after removal: {code} {body}");
    }
    Ok(())
}
