//! `cargo xtask cluster up | down | status`: a real two-node Kubernetes on this machine.
//!
//! The control plane (etcd, kube-apiserver on loopback, controller-manager, scheduler, the
//! Service plumbing of [`services`]) runs in the root network namespace. Each node is a network
//! namespace with its own containerd, kubelet, cgroup root (`/ztk-nodeN` in every hierarchy),
//! CNI bridge and pod /24, joined to the other by a veth on an underlay bridge; the daemons
//! enter only the node's network namespace, so the host's mounts, bpffs and cgroup2 are the
//! node's. Everything lives below [`layout::RUN_DIR`] or carries the prefix `ztk`, and `down`
//! removes all of it. docs/kubernetes.md ("The local cluster") has the picture.
pub mod binaries;
mod config;
mod host;
pub mod layout;
mod pki;
pub mod services;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use self::{
    host::{ip, ip_quiet},
    layout::{Node, NODES},
};
use crate::{deploy_tools, image, output, root};

fn kubectl(bins: &binaries::Binaries) -> Command {
    layout::kubectl(&bins.path("kubectl"))
}

/// Why `up` must not start: a cluster (or what is left of one) is there.
fn existing_cluster() -> Option<String> {
    let daemons = host::running_daemons();
    if !daemons.is_empty() {
        let names: Vec<String> = daemons.iter().map(|(n, p)| format!("{n} ({p})")).collect();
        return Some(format!("its daemons run: {}", names.join(", ")));
    }
    if layout::run_dir().exists() {
        return Some(format!("{} exists", layout::RUN_DIR));
    }
    NODES
        .iter()
        .find(|n| n.netns_path().exists())
        .map(|n| format!("network namespace {} exists", n.netns()))
}

fn step<T>(what: &str, started: Instant, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t = Instant::now();
    let v = f().with_context(|| what.to_owned())?;
    println!(
        "cluster: {what} ({:.1} s, {:.1} s in all)",
        t.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(v)
}

/// What `up` brings up.
#[derive(Clone, Debug, Default)]
pub enum Scope {
    /// Both nodes, the whole control plane and the chart.
    #[default]
    Full,
    /// etcd and kube-apiserver alone (`scale-bench --source kubernetes`): no node, kubelet,
    /// controller-manager or scheduler, the ServiceAccount admission plugin off (objects may
    /// name service accounts that do not exist), Services allocated from `service_cidr`, and
    /// `unreachable` routes for `guards` as well as the cluster's own ranges.
    ApiOnly {
        service_cidr: String,
        guards: Vec<String>,
    },
}

/// The extra guard routes of an API-only cluster, for `down` (one range a line).
fn extra_guards_file() -> PathBuf {
    layout::state_dir().join("extra-guards")
}

pub fn up(scope: &Scope) -> Result<()> {
    if let Some(why) = existing_cluster() {
        bail!(
            "a local cluster already exists ({why}): `cargo xtask cluster status` shows it, \
             `cargo xtask cluster down` removes it"
        );
    }
    let started = Instant::now();
    let bins = binaries::locate()?;
    if let Scope::ApiOnly {
        service_cidr,
        guards,
    } = scope
    {
        return up_api_only(&bins, service_cidr, guards, started);
    }
    let tools = deploy_tools::install()?;
    // Routes first: nothing may dial a cluster address and follow the default route out.
    guard_routes(&[])?;
    let result = (|| {
        let images = step("images built", started, image::build_all)?;
        step(
            "certificates and configuration written",
            started,
            write_files,
        )?;
        record_bin_dir(&bins)?;
        step("network and cgroups set up", started, network_and_cgroups)?;
        step("control plane started", started, || {
            api_server(&bins, layout::SERVICE_CIDR, &[])?;
            control_plane(&bins)
        })?;
        step("containerd started, images imported", started, || {
            containerd(&images)
        })?;
        step("kubelets started, nodes Ready", started, || kubelets(&bins))?;
        step(
            "chart installed, node proxies and CA Ready",
            started,
            || install_chart(&bins, &tools.helm),
        )?;
        Ok(())
    })();
    if let Err(e) = result {
        eprintln!(
            "cluster: bring-up failed; logs in {}",
            layout::log_dir().display()
        );
        eprintln!("cluster: tearing down what was started");
        if let Err(d) = down() {
            eprintln!("cluster: tear-down: {d:#}");
        }
        return Err(e);
    }
    println!("cluster: up in {:.1} s", started.elapsed().as_secs_f64());
    println!("export KUBECONFIG={}", layout::kubeconfig().display());
    Ok(())
}

fn up_api_only(
    bins: &binaries::Binaries,
    service_cidr: &str,
    guards: &[String],
    started: Instant,
) -> Result<()> {
    let result = (|| {
        // The state directory first: `down` must find the extra routes even if adding one fails.
        std::fs::create_dir_all(layout::state_dir())?;
        let mut all: Vec<String> = guards.to_vec();
        all.push(service_cidr.to_owned());
        std::fs::write(extra_guards_file(), all.join("\n"))?;
        guard_routes(&all)?;
        step(
            "certificates and configuration written",
            started,
            write_files,
        )?;
        record_bin_dir(bins)?;
        step("etcd and kube-apiserver started", started, || {
            api_server(
                bins,
                service_cidr,
                &["--disable-admission-plugins=ServiceAccount".into()],
            )
        })
    })();
    if let Err(e) = result {
        eprintln!("cluster: bring-up failed; tearing down what was started");
        if let Err(d) = down() {
            eprintln!("cluster: tear-down: {d:#}");
        }
        return Err(e);
    }
    println!(
        "cluster: API server alone up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!("export KUBECONFIG={}", layout::kubeconfig().display());
    Ok(())
}

/// Where the Kubernetes binaries are, for `status` and the test suites' kubectl.
fn record_bin_dir(bins: &binaries::Binaries) -> Result<()> {
    let file = layout::state_dir().join("k8s-bin-dir");
    Ok(std::fs::write(
        file,
        bins.dir().as_os_str().as_encoded_bytes(),
    )?)
}

/// `unreachable` routes for the cluster's ranges and `extra`.
fn guard_routes(extra: &[String]) -> Result<()> {
    let extra = extra.iter().map(String::as_str);
    for range in layout::GUARDED_RANGES.into_iter().chain(extra) {
        ip_quiet(&["route", "del", "unreachable", range]);
        ip(&["route", "add", "unreachable", range])?;
    }
    Ok(())
}

fn write_files() -> Result<()> {
    for d in [
        layout::run_dir(),
        layout::pki_dir(),
        layout::log_dir(),
        layout::pid_dir(),
        layout::state_dir(),
    ] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    host::record_foreign_dirs(&layout::state_dir())?;
    let pki = layout::pki_dir();
    pki::init(&pki)?;
    let api_sans = [
        "IP:127.0.0.1".to_owned(),
        format!("IP:{}", layout::API_SERVICE_IP),
        "DNS:kubernetes".to_owned(),
        "DNS:kubernetes.default".to_owned(),
        "DNS:kubernetes.default.svc".to_owned(),
        format!("DNS:kubernetes.default.svc.{}", layout::CLUSTER_DOMAIN),
    ];
    let mut leaves = vec![
        (
            "apiserver".to_owned(),
            "kube-apiserver".to_owned(),
            None,
            api_sans.to_vec(),
        ),
        (
            "apiserver-kubelet-client".into(),
            "kube-apiserver-kubelet-client".into(),
            Some("system:masters"),
            vec![],
        ),
        (
            "admin".into(),
            "admin".into(),
            Some("system:masters"),
            vec![],
        ),
        (
            "controller-manager".into(),
            "system:kube-controller-manager".into(),
            None,
            vec![],
        ),
        (
            "scheduler".into(),
            "system:kube-scheduler".into(),
            None,
            vec![],
        ),
    ];
    for node in NODES {
        let name = node.name();
        leaves.push((
            name.clone(),
            format!("system:node:{name}"),
            Some("system:nodes"),
            vec![],
        ));
        leaves.push((
            format!("{name}-serving"),
            name.clone(),
            None,
            vec![format!("IP:{}", node.ip()), format!("DNS:{name}")],
        ));
    }
    for (name, cn, org, sans) in &leaves {
        pki::leaf(
            &pki,
            &pki::Leaf {
                name,
                cn,
                org: *org,
                sans,
            },
        )?;
    }
    let local_api = format!("https://127.0.0.1:{}", layout::API_PORT);
    std::fs::write(
        layout::kubeconfig(),
        pki::kubeconfig(&pki, "admin", &local_api),
    )?;
    for who in ["controller-manager", "scheduler"] {
        std::fs::write(
            layout::run_dir().join(format!("{who}.kubeconfig")),
            pki::kubeconfig(&pki, who, &local_api),
        )?;
    }
    // In-cluster DNS only: a pod or a host-network pod never asks a resolver off the machine.
    std::fs::write(
        layout::run_dir().join("resolv.conf"),
        format!("nameserver {}\n", layout::DNS_SERVICE_IP),
    )?;
    for node in NODES {
        let d = node.dir();
        for sub in ["containerd", "kubelet", "pod-logs", "cni/ipam"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        std::fs::create_dir_all(node.cni_bin_dir())?;
        std::fs::create_dir_all(node.cni_conf_dir())?;
        for plugin in std::fs::read_dir("/usr/lib/cni").context("reading /usr/lib/cni")? {
            let plugin = plugin?;
            std::os::unix::fs::symlink(plugin.path(), node.cni_bin_dir().join(plugin.file_name()))?;
        }
        std::fs::write(d.join("containerd/config.toml"), config::containerd(node))?;
        std::fs::write(
            node.cni_conf_dir().join("10-ztk.conflist"),
            config::cni_conflist(node),
        )?;
        std::fs::write(d.join("kubelet/config.yaml"), config::kubelet(node))?;
        // Through the `kubernetes` Service address, as in-cluster clients reach the API.
        std::fs::write(
            d.join("kubelet/kubeconfig"),
            pki::kubeconfig(
                &pki,
                &node.name(),
                &format!("https://{}:443", layout::API_SERVICE_IP),
            ),
        )?;
    }
    Ok(())
}

fn network_and_cgroups() -> Result<()> {
    let u = layout::UNDERLAY_BRIDGE;
    ip(&["link", "add", u, "type", "bridge"])?;
    ip(&[
        "addr",
        "add",
        &format!("{}/24", layout::HOST_UNDERLAY_IP),
        "dev",
        u,
    ])?;
    ip(&["link", "set", u, "up"])?;
    // The service range is local in the root netns (the Service plumbing binds ClusterIPs);
    // the unreachable route stays below it as the guard.
    ip(&["route", "add", "local", layout::SERVICE_CIDR, "dev", "lo"])?;
    for node in NODES {
        let ns = node.netns();
        ip(&["netns", "add", &ns])?;
        ip(&[
            "link",
            "add",
            &node.veth(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ])?;
        ip(&["link", "set", &node.veth(), "master", u, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", node.ip()),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            layout::SERVICE_CIDR,
            "via",
            layout::HOST_UNDERLAY_IP,
        ])?;
        for other in NODES.iter().filter(|o| o.0 != node.0) {
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                &other.pod_subnet(),
                "via",
                &other.ip(),
            ])?;
        }
        // Forwarding between the node's pods and the underlay: inside the node's netns only.
        output(
            host::in_netns(&node.netns_path(), "sysctl").args(["-qw", "net.ipv4.ip_forward=1"]),
        )?;
        ip(&["route", "add", &node.pod_subnet(), "via", &node.ip()])?;
        host::create_cgroup_everywhere(&node.cgroup_root())?;
    }
    // The kubelet rewrites a few kernel settings: remember them for `down`.
    let mut saved = String::new();
    for name in layout::KUBELET_SYSCTLS {
        saved.push_str(&format!("{name} {}\n", host::read_sysctl(name)?));
    }
    std::fs::write(layout::state_dir().join("sysctls"), saved)?;
    // The node proxies mount the run directory (CNI directories, pods' netns mounts below the
    // containerd state): a shared mount of its own, so later mounts propagate into them.
    let run = layout::run_dir();
    output(Command::new("mount").arg("--bind").arg(&run).arg(&run))?;
    output(Command::new("mount").arg("--make-shared").arg(&run))?;
    // HostToContainer propagation (the chart's bpffs mount) needs a shared mount; without
    // systemd every mount here is private.
    if !host::mount_is_shared(layout::BPFFS) {
        output(Command::new("mount").args(["--make-shared", layout::BPFFS]))?;
        std::fs::write(layout::state_dir().join("bpffs-made-shared"), "")?;
    }
    Ok(())
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        match ready() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        if Instant::now() > deadline {
            let why = last.map(|e| format!(": {e:#}")).unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}{why}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// etcd and kube-apiserver, until the API server is ready; `extra` are more flags for it.
fn api_server(bins: &binaries::Binaries, service_cidr: &str, extra: &[String]) -> Result<()> {
    let run_dir = layout::run_dir();
    let pki = layout::pki_dir();
    let p = |f: &str| pki.join(f).display().to_string();
    let etcd_url = format!("http://127.0.0.1:{}", layout::ETCD_CLIENT_PORT);
    let peer_url = format!("http://127.0.0.1:{}", layout::ETCD_PEER_PORT);
    host::spawn_daemon(
        "etcd",
        None,
        Path::new("/usr/bin/etcd"),
        &[
            "--name=ztk".into(),
            format!("--data-dir={}", run_dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=ztk={peer_url}"),
            "--unsafe-no-fsync".into(),
            "--logger=zap".into(),
            "--log-level=warn".into(),
        ],
    )?;
    let issuer = format!("https://kubernetes.default.svc.{}", layout::CLUSTER_DOMAIN);
    host::spawn_daemon(
        "kube-apiserver",
        None,
        &bins.path("kube-apiserver"),
        &[
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", layout::API_PORT),
            "--advertise-address=127.0.0.1".into(),
            "--endpoint-reconciler-type=none".into(),
            format!("--service-cluster-ip-range={service_cidr}"),
            format!("--cert-dir={}", run_dir.join("apiserver").display()),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!(
                "--kubelet-client-certificate={}",
                p("apiserver-kubelet-client.crt")
            ),
            format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
            format!("--kubelet-certificate-authority={}", p("ca.crt")),
            "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
            format!("--service-account-issuer={issuer}"),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
        ]
        .into_iter()
        .chain(extra.iter().cloned())
        .collect::<Vec<_>>(),
    )?;
    wait_for("the API server", Duration::from_secs(60), || {
        Ok(kubectl(bins)
            .args(["get", "--raw", "/readyz"])
            .output()?
            .status
            .success())
    })
}

/// The rest of the control plane, once the API server answers.
fn control_plane(bins: &binaries::Binaries) -> Result<()> {
    let run_dir = layout::run_dir();
    let pki = layout::pki_dir();
    let p = |f: &str| pki.join(f).display().to_string();
    let xtask = std::env::current_exe().context("locating the xtask binary")?;
    host::spawn_daemon(
        "services",
        None,
        &xtask,
        &[
            "cluster".into(),
            "services".into(),
            "--kubectl".into(),
            bins.path("kubectl").display().to_string(),
        ],
    )?;
    let kc = |who: &str| {
        run_dir
            .join(format!("{who}.kubeconfig"))
            .display()
            .to_string()
    };
    host::spawn_daemon(
        "kube-controller-manager",
        None,
        &bins.path("kube-controller-manager"),
        &[
            format!("--kubeconfig={}", kc("controller-manager")),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            "--use-service-account-credentials=true".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=0".into(),
            "--controllers=*".into(),
        ],
    )?;
    host::spawn_daemon(
        "kube-scheduler",
        None,
        &bins.path("kube-scheduler"),
        &[
            format!("--kubeconfig={}", kc("scheduler")),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
        ],
    )?;
    // The cluster DNS address is a Service's, so the API server never gives it to another.
    let dns = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: kube-dns, namespace: kube-system}}\n\
         spec:\n  clusterIP: {}\n  ports: [{{name: dns, port: 53, protocol: UDP}}]\n",
        layout::DNS_SERVICE_IP
    );
    apply_stdin(bins, &dns)
}

fn apply_stdin(bins: &binaries::Binaries, yaml: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = kubectl(bins)
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(yaml.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl apply: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ctr(node: Node) -> Command {
    let mut c = Command::new("ctr");
    c.arg("--address")
        .arg(node.containerd_socket())
        .args(["--namespace", "k8s.io"]);
    c
}

fn containerd(images: &[(String, PathBuf, String)]) -> Result<()> {
    for node in NODES {
        host::spawn_daemon(
            &format!("{}-containerd", node.name()),
            Some(&node.netns_path()),
            Path::new("/usr/bin/containerd"),
            &[
                "--config".into(),
                node.dir()
                    .join("containerd/config.toml")
                    .display()
                    .to_string(),
            ],
        )?;
    }
    for node in NODES {
        wait_for(
            &format!("{}'s containerd", node.name()),
            Duration::from_secs(30),
            || Ok(ctr(node).arg("version").output()?.status.success()),
        )?;
        for (_, archive, _) in images {
            output(ctr(node).args(["images", "import"]).arg(archive))?;
        }
    }
    Ok(())
}

fn kubelets(bins: &binaries::Binaries) -> Result<()> {
    for node in NODES {
        let d = node.dir();
        host::spawn_daemon(
            &format!("{}-kubelet", node.name()),
            Some(&node.netns_path()),
            &bins.path("kubelet"),
            &[
                format!("--config={}", d.join("kubelet/config.yaml").display()),
                format!("--kubeconfig={}", d.join("kubelet/kubeconfig").display()),
                format!("--root-dir={}", d.join("kubelet/root").display()),
                format!("--cert-dir={}", d.join("kubelet/pki").display()),
                format!("--node-ip={}", node.ip()),
                format!("--hostname-override={}", node.name()),
            ],
        )?;
    }
    wait_for("both nodes Ready", Duration::from_secs(90), || {
        Ok(node_readiness(bins)?
            .iter()
            .filter(|(_, r)| r == "True")
            .count()
            == NODES.len())
    })
}

/// (node, Ready condition status) for every node the API server knows.
fn node_readiness(bins: &binaries::Binaries) -> Result<Vec<(String, String)>> {
    let out = output(kubectl(bins).args([
        "get",
        "nodes",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
    ]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, r)| (n.to_owned(), r.to_owned()))
        .collect())
}

/// The chart, installed as the README's "Install on Kubernetes" says, with the values this
/// machine needs (deploy/helm/ztunnel/ci/local-cluster-values.yaml).
fn install_chart(bins: &binaries::Binaries, helm: &Path) -> Result<()> {
    let k = || kubectl(bins);
    output(k().args(["create", "namespace", "istio-system"]))?;
    let mesh_ca = layout::run_dir().join("mesh-ca");
    output(
        Command::new(crate::release_dir().join("ztunnel"))
            .args(["ca", "init", "--ca-dir"])
            .arg(&mesh_ca)
            .args(["--trust-domain", "cluster.local"]),
    )?;
    let f = |n: &str| format!("{n}={}", mesh_ca.join(n).display());
    output(
        k().args([
            "-n",
            "istio-system",
            "create",
            "secret",
            "generic",
            "ztunnel-ca",
        ])
        .args([
            format!("--from-file={}", f("root-cert.pem")),
            format!("--from-file={}", f("root-key.pem")),
        ]),
    )?;
    output(
        k().args([
            "-n",
            "istio-system",
            "create",
            "configmap",
            "ztunnel-ca-root",
        ])
        .arg(format!("--from-file={}", f("root-cert.pem"))),
    )?;
    output(
        Command::new(helm)
            .env("KUBECONFIG", layout::kubeconfig())
            .env("HELM_CACHE_HOME", layout::run_dir().join("helm/cache"))
            .env("HELM_CONFIG_HOME", layout::run_dir().join("helm/config"))
            .env("HELM_DATA_HOME", layout::run_dir().join("helm/data"))
            .env("KUBECACHEDIR", layout::run_dir().join("kubectl-cache"))
            .args(["install", "ztunnel"])
            .arg(root().join("deploy/helm/ztunnel"))
            .args(["-n", "istio-system", "-f"])
            .arg(root().join("deploy/helm/ztunnel/ci/local-cluster-values.yaml"))
            .arg("--set")
            .arg(format!(
                "nodeProxy.cgroupRoot={}",
                host::cgroup2_root()?.display()
            ))
            .args(["--wait", "--timeout", "120s"]),
    )?;
    output(k().args([
        "-n",
        "istio-system",
        "rollout",
        "status",
        "daemonset/ztunnel",
        "--timeout=60s",
    ]))?;
    output(k().args([
        "-n",
        "istio-system",
        "rollout",
        "status",
        "deployment/ztunnel-ca",
        "--timeout=60s",
    ]))?;
    Ok(())
}

pub fn status() -> Result<()> {
    let daemons = host::running_daemons();
    if daemons.is_empty() {
        println!("no local cluster runs (cargo xtask cluster up starts one)");
        if let Some(why) = existing_cluster() {
            println!("but something of one is left ({why}): cargo xtask cluster down");
        }
        return Ok(());
    }
    for (name, pid) in &daemons {
        println!("daemon {name}: pid {pid}");
    }
    let bin_dir = std::fs::read_to_string(layout::state_dir().join("k8s-bin-dir"))
        .context("reading the cluster's state")?;
    let bins = binaries::Binaries::at(PathBuf::from(bin_dir));
    match node_readiness(&bins) {
        Ok(nodes) => {
            for node in NODES {
                let ready = nodes.iter().find(|(n, _)| *n == node.name()).map_or(
                    "not registered",
                    |(_, r)| if r == "True" { "Ready" } else { "NotReady" },
                );
                println!("node {}: {ready}", node.name());
            }
        }
        Err(e) => println!("the API server does not answer: {e:#}"),
    }
    println!("export KUBECONFIG={}", layout::kubeconfig().display());
    Ok(())
}

/// Removes everything `up` made, whatever state it is in; carries on past errors and reports
/// them all at the end.
pub fn down() -> Result<()> {
    let started = Instant::now();
    let mut errors: Vec<String> = Vec::new();
    let mut note = |what: &str, r: Result<()>| {
        if let Err(e) = r {
            errors.push(format!("{what}: {e:#}"));
        }
    };
    // Processes: SIGTERM to the daemons, SIGKILL after a grace (the API server holds watches
    // open for a long time), then everything left in their cgroups and the pods' cgroups.
    let daemons = host::running_daemons();
    for (_, pid) in &daemons {
        // SAFETY: a PID this cluster recorded and that is still alive.
        unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && daemons.iter().any(|(_, p)| host::alive(*p)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Ok(cg2) = host::cgroup2_root() {
        note(
            "killing the daemons",
            host::kill_cgroup(&cg2.join(layout::DAEMONS_CGROUP), Duration::from_secs(10)),
        );
        for node in NODES {
            note(
                &format!("killing {}'s pods", node.name()),
                host::kill_cgroup(&cg2.join(node.name()), Duration::from_secs(10)),
            );
        }
    }
    note("unmounting", host::unmount_below(&layout::run_dir()));
    for node in NODES {
        if node.netns_path().exists() {
            note(
                &format!("deleting netns {}", node.netns()),
                ip(&["netns", "del", &node.netns()]),
            );
        }
        ip_quiet(&["link", "del", &node.veth()]);
        ip_quiet(&["route", "del", &node.pod_subnet()]);
    }
    ip_quiet(&["link", "del", layout::UNDERLAY_BRIDGE]);
    ip_quiet(&[
        "route",
        "del",
        "local",
        layout::SERVICE_CIDR,
        "dev",
        "lo",
        "table",
        "local",
    ]);
    for range in layout::GUARDED_RANGES {
        ip_quiet(&["route", "del", "unreachable", range]);
    }
    if let Ok(extra) = std::fs::read_to_string(extra_guards_file()) {
        for range in extra.lines() {
            ip_quiet(&["route", "del", "unreachable", range]);
            let gone = if route_exists(range) {
                Err(anyhow::anyhow!("the guard route {range} is still there"))
            } else {
                Ok(())
            };
            note("removing the extra guard routes", gone);
        }
    }
    for h in host::cgroup_hierarchies() {
        note(
            "removing cgroups",
            host::remove_cgroup_tree(&h.join(layout::DAEMONS_CGROUP)),
        );
        for node in NODES {
            note(
                "removing cgroups",
                host::remove_cgroup_tree(&h.join(node.name())),
            );
        }
    }
    for entry in std::fs::read_dir(layout::BPFFS)
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(layout::PREFIX)
        {
            note(
                "removing pins",
                std::fs::remove_dir_all(entry.path()).map_err(Into::into),
            );
        }
    }
    let state = layout::state_dir();
    if let Ok(saved) = std::fs::read_to_string(state.join("sysctls")) {
        for (name, value) in saved.lines().filter_map(|l| l.split_once(' ')) {
            note(
                &format!("restoring {name}"),
                std::fs::write(host::sysctl_path(name), value).map_err(Into::into),
            );
        }
    }
    if state.join("bpffs-made-shared").exists() {
        note(
            "making bpffs private again",
            output(Command::new("mount").args(["--make-private", layout::BPFFS])).map(drop),
        );
    }
    note(
        "removing what was added outside the run directory",
        host::restore_foreign_dirs(&state),
    );
    if layout::run_dir().exists() {
        note(
            "removing the run directory",
            std::fs::remove_dir_all(layout::run_dir()).map_err(Into::into),
        );
    }
    let left = leftovers();
    if !errors.is_empty() || !left.is_empty() {
        bail!(
            "tear-down incomplete:\n  {}",
            errors
                .into_iter()
                .chain(left)
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
    println!("cluster: down in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// What of a local cluster exists now, one description each (the leak check of `cargo xtask
/// test` and the last step of `down`).
pub fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    for (name, pid) in host::running_daemons() {
        found.push(format!("cluster daemon {name} (pid {pid})"));
    }
    if layout::run_dir().exists() {
        found.push(format!("run directory {}", layout::RUN_DIR));
    }
    for m in host::mounts_below(&layout::run_dir()) {
        found.push(format!("mount {}", m.display()));
    }
    for node in NODES {
        if node.netns_path().exists() {
            found.push(format!("network namespace {}", node.netns()));
        }
    }
    let links = output(Command::new("ip").args(["-o", "link", "show"])).unwrap_or_default();
    for l in links.lines() {
        if let Some(name) = l
            .split(':')
            .nth(1)
            .map(|n| n.trim().split('@').next().unwrap_or(""))
        {
            if name.starts_with(layout::PREFIX) {
                found.push(format!("link {name}"));
            }
        }
    }
    let routes =
        output(Command::new("ip").args(["route", "show", "table", "all"])).unwrap_or_default();
    for r in routes.lines().filter(|r| route_is_cluster(r)) {
        found.push(format!("route {r}"));
    }
    for h in host::cgroup_hierarchies() {
        for e in std::fs::read_dir(&h).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(layout::PREFIX) {
                found.push(format!("cgroup {}", e.path().display()));
            }
        }
    }
    for e in std::fs::read_dir(layout::BPFFS)
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with(layout::PREFIX) {
            found.push(format!("pins {}", e.path().display()));
        }
    }
    // Outside the run directory: libcni's cached results of our network, the kubelet's links
    // to our pod logs.
    let entries = |dir: &str| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .collect::<Vec<_>>()
    };
    for e in entries("/var/lib/cni/results") {
        if e.file_name().to_string_lossy().starts_with("ztk-") {
            found.push(format!("CNI result {}", e.path().display()));
        }
    }
    for e in entries("/var/log/containers") {
        if std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(layout::RUN_DIR)) {
            found.push(format!("log link {}", e.path().display()));
        }
    }
    for pid in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let raw = std::fs::read(pid.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(layout::RUN_DIR) {
            found.push(format!(
                "process {}: {}",
                pid.file_name().to_string_lossy(),
                cmdline.trim()
            ));
        }
    }
    found
}

/// Whether the main table has a route for exactly `range`.
fn route_exists(range: &str) -> bool {
    output(Command::new("ip").args(["route", "show", "exact", range]))
        .is_ok_and(|o| !o.trim().is_empty())
}

/// A route of the cluster's ranges, in any table.
fn route_is_cluster(line: &str) -> bool {
    let dst = line
        .split_whitespace()
        .find(|w| w.starts_with("10."))
        .unwrap_or("");
    ["10.96.", "10.88.", "10.99."]
        .iter()
        .any(|p| dst.starts_with(p))
        || line.contains(layout::UNDERLAY_BRIDGE)
}

pub fn run_services(kubectl: &Path) -> Result<()> {
    services::serve(kubectl)
}
