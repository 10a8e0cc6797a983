//! The virtual cluster: an underlay bridge, nodes and pods as network namespaces wired like a
//! simple routed CNI, every process in its own cgroup v2 directory, one real `ztunnel` per node.
//!
//! ```text
//!  <prefix>-u        br0 ──┬── n1 ══ eth0 10.255.0.1/24  <prefix>-n1   (ip_forward=1)
//!                          └── n2 ══ eth0 10.255.0.2/24  <prefix>-n2
//!  <prefix>-n<i>     p<j> (proxy_arp, route 10.<i>.0.<j+2>/32) ══ eth0  <prefix>-n<i>-p<j>
//!  pod netns         eth0 10.<i>.0.<j+2>/32, default via 169.254.1.1 onlink
//!  node netns        10.<k>.0.0/24 via 10.255.0.<k> for every other node k
//! ```
//! cgroups: `<cgroup2>/<prefix>/node<i>/<ns>_<pod>` (pod processes), `<prefix>/proxies`,
//! `<prefix>/tools` (commands run in a node netns). Nothing is created in the host netns.
use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use crate::{
    cleanup::{cgroup2_root, cleanup_prefix, sweep_stale, BPFFS, NETNS_DIR, TMP},
    config::{self, labels, Labels, PodObject, ServiceObject},
    process::{confine, host, output_with_timeout, Proc},
};

/// How long a proxy may take to log "proxy ready".
pub const PROXY_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline for commands run inside the cluster.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(20);
/// MAC of every node-side pod veth (as Calico does); pods resolve their gateway to it statically.
const GATEWAY_MAC: &str = "ee:ee:ee:ee:ee:ee";
const GATEWAY_IP: &str = "169.254.1.1";
/// Below each node's cgroup: the node's own processes (as the kubelet lives below the cgroup
/// root the proxy attaches to), next to the pods' cgroups `<ns>_<pod>`.
const NODE_PROCESSES_CGROUP: &str = "host";

/// A pod to create.
#[derive(Clone, Debug)]
pub struct PodSpec {
    namespace: String,
    name: String,
    node: usize,
    service_account: Option<String>,
    labels: Labels,
    netns_annotation: Option<String>,
    reported_ips: Option<Vec<String>>,
    container_ports: Vec<u16>,
    listed: bool,
    pending: bool,
}

/// Declares pod `namespace/name` (on node 1 unless [`PodSpec::node`] says otherwise).
pub fn pod(namespace: &str, name: &str) -> PodSpec {
    PodSpec {
        namespace: namespace.into(),
        name: name.into(),
        node: 1,
        service_account: None,
        labels: Labels::new(),
        netns_annotation: None,
        reported_ips: None,
        container_ports: Vec::new(),
        listed: true,
        pending: false,
    }
}

impl PodSpec {
    /// Node index, from 1.
    pub fn node(mut self, i: usize) -> Self {
        self.node = i;
        self
    }
    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = Some(sa.into());
        self
    }
    pub fn labels(mut self, l: &[(&str, &str)]) -> Self {
        self.labels.extend(labels(l));
        self
    }
    /// Overrides the `ztunnel.dev/netns` annotation (the netns is still created).
    pub fn netns_annotation(mut self, path: &str) -> Self {
        self.netns_annotation = Some(path.into());
        self
    }
    /// Overrides the IPs in the pod's status (its netns keeps its real address).
    pub fn reported_ips(mut self, ips: &[&str]) -> Self {
        self.reported_ips = Some(ips.iter().map(|s| (*s).to_owned()).collect());
        self
    }
    pub fn container_port(mut self, port: u16) -> Self {
        self.container_ports.push(port);
        self
    }
    /// Creates the pod's netns and cgroup but leaves it out of the configuration
    /// (see [`Cluster::add_pod`]).
    pub fn unlisted(mut self) -> Self {
        self.listed = false;
        self
    }
    /// Lists the pod as the API shows it before its sandbox exists: no addresses, no netns
    /// (see [`Cluster::report_pod_running`]).
    pub fn pending(mut self) -> Self {
        self.pending = true;
        self
    }
}

/// A Service to create; it gets the VIP `10.96.0.<10+n>` unless [`ServiceSpec::vip`] is given.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    namespace: String,
    name: String,
    selector: Labels,
    ports: Vec<(u16, u16)>,
    vip: Option<String>,
}

pub fn service(namespace: &str, name: &str) -> ServiceSpec {
    ServiceSpec {
        namespace: namespace.into(),
        name: name.into(),
        selector: Labels::new(),
        ports: Vec::new(),
        vip: None,
    }
}

impl ServiceSpec {
    pub fn selector(mut self, l: &[(&str, &str)]) -> Self {
        self.selector.extend(labels(l));
        self
    }
    /// Service port → target (container) port.
    pub fn port(mut self, port: u16, target: u16) -> Self {
        self.ports.push((port, target));
        self
    }
    pub fn vip(mut self, vip: &str) -> Self {
        self.vip = Some(vip.into());
        self
    }
}

/// Declares a cluster; [`ClusterBuilder::start`] creates it.
#[derive(Clone, Debug)]
pub struct ClusterBuilder {
    nodes: usize,
    namespaces: Vec<(String, Labels)>,
    pods: Vec<PodSpec>,
    services: Vec<ServiceSpec>,
}

impl ClusterBuilder {
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }
    /// A Namespace object with these labels (pods in undeclared namespaces have none).
    pub fn namespace(mut self, name: &str, l: &[(&str, &str)]) -> Self {
        self.namespaces.push((name.into(), labels(l)));
        self
    }
    pub fn pod(mut self, p: PodSpec) -> Self {
        self.pods.push(p);
        self
    }
    pub fn service(mut self, s: ServiceSpec) -> Self {
        self.services.push(s);
        self
    }

    /// Creates everything and starts one proxy per node, waiting until each is ready.
    pub fn start(self) -> Result<Cluster> {
        let c = self.start_without_proxies()?;
        let nodes: Vec<usize> = (1..=c.nodes).collect();
        c.start_proxies(&nodes)?;
        Ok(c)
    }

    /// Creates the topology, cgroups and configuration, but no proxy.
    pub fn start_without_proxies(self) -> Result<Cluster> {
        sweep_stale();
        if self.nodes == 0 || self.nodes > 250 {
            bail!("a cluster needs between 1 and 250 nodes");
        }
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!(
            "ztt-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let tmp = Path::new(TMP).join(&prefix);
        let mut c = Cluster {
            config_dir: tmp.join("config"),
            tmp,
            cgroup: cgroup2_root()?.join(&prefix),
            prefix,
            nodes: self.nodes,
            pods: Vec::new(),
            model: Mutex::new(Model::default()),
            proxies: Mutex::new((0..self.nodes).map(|_| None).collect()),
        };
        // From here on, dropping `c` removes whatever was created.
        c.build(self)?;
        Ok(c)
    }
}

/// One pod as created.
#[derive(Clone, Debug)]
struct PodInfo {
    namespace: String,
    name: String,
    node: usize,
    netns: String,
    ip: Ipv4Addr,
    cgroup: PathBuf,
}

#[derive(Default)]
struct Model {
    namespaces: BTreeMap<String, Labels>,
    pods: BTreeMap<(String, String), PodObject>,
    services: BTreeMap<(String, String), ServiceObject>,
}

/// A running virtual cluster. Dropping it removes everything it created (see [`cleanup_prefix`]).
pub struct Cluster {
    prefix: String,
    tmp: PathBuf,
    config_dir: PathBuf,
    cgroup: PathBuf,
    nodes: usize,
    pods: Vec<PodInfo>,
    model: Mutex<Model>,
    proxies: Mutex<Vec<Option<Child>>>,
}

fn ip(args: &[&str]) -> Result<()> {
    host("ip", args).map(drop)
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            nodes: 1,
            namespaces: Vec::new(),
            pods: Vec::new(),
            services: Vec::new(),
        }
    }

    fn build(&mut self, b: ClusterBuilder) -> Result<()> {
        fs::create_dir_all(&self.config_dir)
            .with_context(|| format!("creating {}", self.config_dir.display()))?;
        // One mesh root for the whole cluster, as `ztunnel ca init` makes it for an operator.
        let ca = self.ca_dir();
        let out = output_with_timeout(
            Command::new(crate::ztunnel_bin())
                .args(["ca", "init", "--ca-dir"])
                .arg(&ca),
            Duration::from_secs(20),
        )?;
        if !out.status.success() {
            bail!(
                "ztunnel ca init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for dir in ["proxies", "tools"] {
            let d = self.cgroup.join(dir);
            fs::create_dir_all(&d).with_context(|| format!("creating cgroup {}", d.display()))?;
        }
        let u = self.underlay_netns();
        ip(&["netns", "add", &u])?;
        ip(&["-n", &u, "link", "set", "lo", "up"])?;
        ip(&["-n", &u, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &u, "link", "set", "br0", "up"])?;
        for i in 1..=self.nodes {
            let ns = self.node_netns(i);
            let uplink = format!("n{i}");
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &uplink, "netns",
                &u,
            ])?;
            ip(&["-n", &u, "link", "set", &uplink, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.255.0.{i}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            for k in (1..=self.nodes).filter(|k| *k != i) {
                ip(&[
                    "-n",
                    &ns,
                    "route",
                    "add",
                    &format!("10.{k}.0.0/24"),
                    "via",
                    &format!("10.255.0.{k}"),
                ])?;
            }
            fs::create_dir_all(self.node_cgroup(i).join(NODE_PROCESSES_CGROUP))?;
        }
        let mut per_node = vec![0usize; self.nodes + 1];
        let mut sysctls: Vec<Vec<String>> = vec![Vec::new(); self.nodes + 1];
        for spec in &b.pods {
            if spec.node == 0 || spec.node > self.nodes {
                bail!(
                    "pod {}/{} is on node {}, which does not exist",
                    spec.namespace,
                    spec.name,
                    spec.node
                );
            }
            if self
                .pods
                .iter()
                .any(|p| p.namespace == spec.namespace && p.name == spec.name)
            {
                bail!("pod {}/{} declared twice", spec.namespace, spec.name);
            }
            let i = spec.node;
            let j = per_node[i];
            per_node[i] += 1;
            if j > 250 {
                bail!("too many pods on node {i}");
            }
            let info = PodInfo {
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                node: i,
                netns: format!("{}-n{i}-p{j}", self.prefix),
                ip: Ipv4Addr::new(10, i as u8, 0, (j + 2) as u8),
                cgroup: self
                    .node_cgroup(i)
                    .join(format!("{}_{}", spec.namespace, spec.name)),
            };
            let (pns, nns, veth) = (&info.netns, self.node_netns(i), format!("p{j}"));
            ip(&["netns", "add", pns])?;
            ip(&["-n", pns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                pns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &veth,
                "address",
                GATEWAY_MAC,
                "netns",
                &nns,
            ])?;
            ip(&[
                "-n",
                pns,
                "addr",
                "add",
                &format!("{}/32", info.ip),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", pns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                pns,
                "neigh",
                "replace",
                GATEWAY_IP,
                "lladdr",
                GATEWAY_MAC,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])?;
            ip(&[
                "-n", pns, "route", "add", "default", "via", GATEWAY_IP, "dev", "eth0", "onlink",
            ])?;
            ip(&["-n", &nns, "link", "set", &veth, "up"])?;
            ip(&[
                "-n",
                &nns,
                "route",
                "add",
                &format!("{}/32", info.ip),
                "dev",
                &veth,
            ])?;
            sysctls[i].push(format!("net.ipv4.conf.{veth}.proxy_arp=1"));
            fs::create_dir_all(&info.cgroup)
                .with_context(|| format!("creating cgroup {}", info.cgroup.display()))?;
            let object = PodObject {
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                uid: format!("{}-{}-{}", self.prefix, spec.namespace, spec.name), // PodRef::uid
                node: format!("node{i}"),
                service_account: spec
                    .service_account
                    .clone()
                    .unwrap_or_else(|| spec.name.clone()),
                labels: spec.labels.clone(),
                netns_path: spec
                    .netns_annotation
                    .clone()
                    .unwrap_or_else(|| format!("{NETNS_DIR}/{}", info.netns)),
                ips: spec
                    .reported_ips
                    .clone()
                    .unwrap_or_else(|| vec![info.ip.to_string()]),
                container_ports: spec.container_ports.clone(),
                pending: spec.pending,
            };
            self.pods.push(info);
            let key = (spec.namespace.clone(), spec.name.clone());
            if spec.listed {
                config::write_atomic(
                    &self.config_dir,
                    &config::pod_file(&key.0, &key.1),
                    &config::pod_yaml(&object),
                )?;
            }
            self.model().pods.insert(key, object);
        }
        for (i, node_sysctls) in sysctls.iter().enumerate().skip(1) {
            let mut args = vec![
                "netns".to_owned(),
                "exec".to_owned(),
                self.node_netns(i),
                "sysctl".to_owned(),
                "-qw".to_owned(),
                "net.ipv4.ip_forward=1".to_owned(),
                "net.ipv4.conf.all.rp_filter=0".to_owned(),
                "net.ipv4.conf.default.rp_filter=0".to_owned(),
            ];
            args.extend(node_sysctls.iter().cloned());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ip(&args)?;
        }
        for (name, l) in &b.namespaces {
            self.set_namespace_labels_map(name, l.clone())?;
        }
        for (n, s) in b.services.iter().enumerate() {
            let object = ServiceObject {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                vip: s
                    .vip
                    .clone()
                    .unwrap_or_else(|| format!("10.96.0.{}", 10 + n)),
                selector: s.selector.clone(),
                ports: s.ports.clone(),
            };
            self.put_service(object)?;
        }
        Ok(())
    }

    fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn proxies(&self) -> MutexGuard<'_, Vec<Option<Child>>> {
        self.proxies.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- names and paths -------------------------------------------------------------------

    /// `ztt-<pid>-<n>`: every object of this cluster is named with it.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn node_count(&self) -> usize {
        self.nodes
    }
    /// `/tmp/<prefix>`.
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }
    /// The embedded CA every node's proxy issues workload certificates from.
    pub fn ca_dir(&self) -> PathBuf {
        self.tmp.join("ca")
    }

    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }
    /// `<cgroup2 root>/<prefix>`.
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup
    }
    pub fn underlay_netns(&self) -> String {
        format!("{}-u", self.prefix)
    }
    pub fn node_netns(&self, i: usize) -> String {
        format!("{}-n{i}", self.prefix)
    }
    pub fn node_cgroup(&self, i: usize) -> PathBuf {
        self.cgroup.join(format!("node{i}"))
    }
    pub fn bpf_dir(&self, i: usize) -> PathBuf {
        Path::new(BPFFS).join(format!("{}-node{i}", self.prefix))
    }
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.tmp.join(format!("node{i}.log"))
    }
    /// Every netns of this cluster (underlay, nodes, pods).
    pub fn all_netns(&self) -> Vec<String> {
        let mut v = vec![self.underlay_netns()];
        v.extend((1..=self.nodes).map(|i| self.node_netns(i)));
        v.extend(self.pods.iter().map(|p| p.netns.clone()));
        v
    }

    pub fn node(&self, i: usize) -> NodeRef<'_> {
        assert!(i >= 1 && i <= self.nodes, "node {i} does not exist");
        NodeRef { cluster: self, i }
    }

    /// A pod of this cluster; panics if it was not declared (a mistake in the test).
    pub fn pod(&self, namespace: &str, name: &str) -> PodRef<'_> {
        let info = self
            .pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
            .unwrap_or_else(|| panic!("pod {namespace}/{name} was not declared"));
        PodRef {
            cluster: self,
            info,
        }
    }

    pub fn service_vip(&self, namespace: &str, name: &str) -> String {
        self.model()
            .services
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|s| s.vip.clone())
            .unwrap_or_else(|| panic!("service {namespace}/{name} was not declared"))
    }

    // ---- configuration at run time -----------------------------------------------------------

    /// Writes (creates or replaces) the Namespace object with exactly these labels.
    pub fn set_namespace_labels(&self, namespace: &str, l: &[(&str, &str)]) -> Result<()> {
        self.set_namespace_labels_map(namespace, labels(l))
    }

    fn set_namespace_labels_map(&self, namespace: &str, l: Labels) -> Result<()> {
        config::write_atomic(
            &self.config_dir,
            &config::namespace_file(namespace),
            &config::namespace_yaml(namespace, &l),
        )?;
        self.model().namespaces.insert(namespace.to_owned(), l);
        Ok(())
    }

    /// Deletes the Namespace object.
    pub fn remove_namespace(&self, namespace: &str) -> Result<()> {
        self.model().namespaces.remove(namespace);
        remove_if_exists(&self.config_dir.join(config::namespace_file(namespace)))
    }

    /// Replaces the pod's labels in the configuration.
    pub fn set_pod_labels(&self, namespace: &str, name: &str, l: &[(&str, &str)]) -> Result<()> {
        self.update_pod(namespace, name, |p| p.labels = labels(l))
    }

    /// Changes the pod's object with `f` and writes it.
    fn update_pod(
        &self,
        namespace: &str,
        name: &str,
        f: impl FnOnce(&mut PodObject),
    ) -> Result<()> {
        let object = {
            let mut m = self.model();
            let p = m
                .pods
                .get_mut(&(namespace.to_owned(), name.to_owned()))
                .ok_or_else(|| anyhow!("pod {namespace}/{name} was not declared"))?;
            f(p);
            p.clone()
        };
        self.write_pod(&object)
    }

    /// Writes the pod's object to the configuration (e.g. a pod declared `unlisted`).
    pub fn add_pod(&self, namespace: &str, name: &str) -> Result<()> {
        let object = self
            .model()
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
            .ok_or_else(|| anyhow!("pod {namespace}/{name} was not declared"))?;
        self.write_pod(&object)
    }

    /// Writes a [`PodSpec::pending`] pod as the API shows it once its sandbox runs: with its
    /// addresses and netns.
    pub fn report_pod_running(&self, namespace: &str, name: &str) -> Result<()> {
        self.update_pod(namespace, name, |p| p.pending = false)
    }

    /// Deletes the pod's object from the configuration (its netns and processes stay).
    pub fn remove_pod(&self, namespace: &str, name: &str) -> Result<()> {
        remove_if_exists(&self.config_dir.join(config::pod_file(namespace, name)))
    }

    fn write_pod(&self, p: &PodObject) -> Result<()> {
        config::write_atomic(
            &self.config_dir,
            &config::pod_file(&p.namespace, &p.name),
            &config::pod_yaml(p),
        )
        .map(drop)
    }

    fn put_service(&self, s: ServiceObject) -> Result<()> {
        config::write_atomic(
            &self.config_dir,
            &config::service_file(&s.namespace, &s.name),
            &config::service_yaml(&s),
        )?;
        self.model()
            .services
            .insert((s.namespace.clone(), s.name.clone()), s);
        Ok(())
    }

    /// Adds or replaces a Service at run time; returns its VIP.
    pub fn set_service(&self, s: ServiceSpec) -> Result<String> {
        let vip = match &s.vip {
            Some(v) => v.clone(),
            None => {
                let m = self.model();
                let key = (s.namespace.clone(), s.name.clone());
                match m.services.get(&key) {
                    Some(existing) => existing.vip.clone(),
                    None => format!("10.96.0.{}", 10 + m.services.len()),
                }
            }
        };
        self.put_service(ServiceObject {
            namespace: s.namespace,
            name: s.name,
            vip: vip.clone(),
            selector: s.selector,
            ports: s.ports,
        })?;
        Ok(vip)
    }

    /// Writes any text as `file` in the configuration directory (atomically).
    pub fn write_raw(&self, file: &str, text: &str) -> Result<PathBuf> {
        config::write_atomic(&self.config_dir, file, text)
    }

    pub fn remove_raw(&self, file: &str) -> Result<()> {
        remove_if_exists(&self.config_dir.join(file))
    }

    /// Writes (or, with `None`, removes) a configuration file and waits until every running
    /// proxy has applied the new configuration.
    pub fn apply(&self, file: &str, text: Option<&str>) -> Result<()> {
        let nodes: Vec<usize> = (1..=self.node_count())
            .filter(|i| self.proxy_running(*i))
            .collect();
        let marks: Vec<usize> = nodes.iter().map(|i| self.log_mark(*i)).collect();
        match text {
            Some(text) => {
                self.write_raw(file, text)?;
            }
            None => self.remove_raw(file)?,
        }
        for (node, mark) in nodes.into_iter().zip(marks) {
            self.wait_for_log_since(node, mark, Duration::from_secs(15), |l| {
                l["message"] == "configuration applied"
            })
            .with_context(|| format!("node {node} did not apply {file}"))?;
        }
        Ok(())
    }

    // ---- proxies -----------------------------------------------------------------------------

    /// The arguments the harness runs node `i`'s proxy with (after the binary).
    pub fn proxy_args(&self, i: usize) -> Vec<String> {
        vec![
            "run".into(),
            "--config-dir".into(),
            self.config_dir.display().to_string(),
            "--node-name".into(),
            format!("node{i}"),
            "--bpf-dir".into(),
            self.bpf_dir(i).display().to_string(),
            "--cgroup".into(),
            self.node_cgroup(i).display().to_string(),
            "--log-format".into(),
            "json".into(),
            "--ca-dir".into(),
            self.ca_dir().display().to_string(),
        ]
    }

    fn ztunnel_command(
        &self,
        i: usize,
        args: &[String],
    ) -> Result<(Command, crate::process::Confinement)> {
        let bin = crate::ztunnel_bin();
        if !bin.exists() {
            bail!(
                "{} does not exist: build it with `cargo build --release -p ztunnel` (or set ZTUNNEL_BIN)",
                bin.display()
            );
        }
        let mut cmd = Command::new(bin);
        cmd.args(args).env("RUST_LOG", "info,ztunnel=debug");
        let conf = confine(
            &mut cmd,
            Some(&Path::new(NETNS_DIR).join(self.node_netns(i))),
            Some(&self.cgroup.join("proxies")),
        )?;
        Ok((cmd, conf))
    }

    /// Starts node `i`'s proxy and waits for "proxy ready".
    pub fn start_proxy(&self, i: usize) -> Result<()> {
        self.start_proxy_with(i, &[])
    }

    /// Starts node `i`'s proxy with extra arguments and waits for "proxy ready".
    pub fn start_proxy_with(&self, i: usize, extra: &[&str]) -> Result<()> {
        let mark = self.log_mark(i);
        self.spawn_proxy(i, extra)?;
        self.wait_ready(i, mark)
    }

    fn start_proxies(&self, nodes: &[usize]) -> Result<()> {
        let marks: Vec<usize> = nodes.iter().map(|i| self.log_mark(*i)).collect();
        for i in nodes {
            self.spawn_proxy(*i, &[])?;
        }
        for (i, mark) in nodes.iter().zip(marks) {
            self.wait_ready(*i, mark)?;
        }
        Ok(())
    }

    fn spawn_proxy(&self, i: usize, extra: &[&str]) -> Result<()> {
        if self.proxy_running(i) {
            bail!("the proxy of node {i} is already running");
        }
        let mut args = self.proxy_args(i);
        if extra.contains(&"--ca-address") {
            // A remote CA replaces the embedded one (the two are exclusive).
            if let Some(at) = args.iter().position(|a| a == "--ca-dir") {
                args.drain(at..at + 2);
            }
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let (mut cmd, _conf) = self.ztunnel_command(i, &args)?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .with_context(|| format!("opening {}", self.log_path(i).display()))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("spawning ztunnel")?;
        self.proxies()[i - 1] = Some(child);
        Ok(())
    }

    fn wait_ready(&self, i: usize, mark: usize) -> Result<()> {
        let node = format!("node{i}");
        let deadline = Instant::now() + PROXY_START_TIMEOUT;
        loop {
            if self
                .logs_since(i, mark)
                .iter()
                .any(|l| l["message"] == "proxy ready" && l["node"] == node.as_str())
            {
                return Ok(());
            }
            if let Some(status) = self.proxy_exit_status(i) {
                bail!(
                    "the proxy of node {i} exited ({status}) before it was ready; log:\n{}",
                    self.log_tail(i, 40)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the proxy of node {i} was not ready after {PROXY_START_TIMEOUT:?}; log:\n{}",
                    self.log_tail(i, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Exit status of node `i`'s proxy if it has exited (and was started by the harness).
    pub fn proxy_exit_status(&self, i: usize) -> Option<ExitStatus> {
        let mut p = self.proxies();
        match p[i - 1].as_mut() {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => {
                    p[i - 1] = None;
                    Some(status)
                }
                _ => None,
            },
            None => None,
        }
    }

    pub fn proxy_running(&self, i: usize) -> bool {
        let mut p = self.proxies();
        matches!(p[i - 1].as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn proxy_pid(&self, i: usize) -> Option<u32> {
        self.proxies()[i - 1].as_ref().map(Child::id)
    }

    /// SIGTERM, then waits (10 s) for the exit; SIGKILL if it does not come (and fails).
    pub fn stop_proxy(&self, i: usize) -> Result<ExitStatus> {
        let mut child = self.proxies()[i - 1]
            .take()
            .ok_or_else(|| anyhow!("the proxy of node {i} is not running"))?;
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the proxy of node {i} ignored SIGTERM for 10 s; killed it. log:\n{}",
                    self.log_tail(i, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A rolling restart of node `i`'s proxy, as a DaemonSet update does it: SIGTERM to the
    /// running one and, without waiting for it to exit, a new one (with `--takeover-wait` and
    /// `extra`) that must become ready; then the old one must exit within `drain` plus a
    /// margin. Returns the old proxy's exit status.
    pub fn hand_over_proxy(&self, i: usize, extra: &[&str], drain: Duration) -> Result<ExitStatus> {
        let mut old = self.proxies()[i - 1]
            .take()
            .ok_or_else(|| anyhow!("the proxy of node {i} is not running"))?;
        let mark = self.log_mark(i);
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(old.id() as i32, libc::SIGTERM) };
        let mut args = vec!["--takeover-wait", "10s"];
        args.extend_from_slice(extra);
        let started = self
            .spawn_proxy(i, &args)
            .and_then(|()| self.wait_ready(i, mark));
        let deadline = Instant::now() + drain + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = old.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = old.kill();
                let _ = old.wait();
                bail!("the old proxy of node {i} did not exit after its drain; killed it");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        started?;
        Ok(status)
    }

    /// SIGKILL (a crash): nothing of the proxy's own cleanup runs.
    pub fn kill_proxy(&self, i: usize) -> Result<()> {
        let mut child = self.proxies()[i - 1]
            .take()
            .ok_or_else(|| anyhow!("the proxy of node {i} is not running"))?;
        child.kill().context("killing the proxy")?;
        child.wait().context("reaping the proxy")?;
        Ok(())
    }

    /// Runs the ztunnel binary to completion in node `i`'s netns (e.g. to see it refuse to start).
    pub fn run_ztunnel(&self, i: usize, args: &[String], timeout: Duration) -> Result<Output> {
        let (mut cmd, _conf) = self.ztunnel_command(i, args)?;
        output_with_timeout(&mut cmd, timeout)
    }

    /// `ztunnel bpf uninstall --bpf-dir <node i's pin dir>` (run on the host).
    pub fn bpf_uninstall(&self, i: usize) -> Result<Output> {
        output_with_timeout(
            Command::new(crate::ztunnel_bin())
                .args(["bpf", "uninstall", "--bpf-dir"])
                .arg(self.bpf_dir(i)),
            CMD_TIMEOUT,
        )
    }

    // ---- logs --------------------------------------------------------------------------------

    /// Raw log text of node `i`'s proxy (all runs, appended).
    pub fn log_text(&self, i: usize) -> String {
        fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    fn complete_lines(&self, i: usize) -> Vec<String> {
        self.log_text(i)
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| l.trim_end().to_owned())
            .collect()
    }

    /// A position in node `i`'s log: pass it to the `*_since` functions to see only later lines.
    pub fn log_mark(&self, i: usize) -> usize {
        self.complete_lines(i).len()
    }

    /// Every JSON log line of node `i`.
    pub fn logs(&self, i: usize) -> Vec<Value> {
        self.logs_since(i, 0)
    }

    pub fn logs_since(&self, i: usize, mark: usize) -> Vec<Value> {
        self.complete_lines(i)
            .iter()
            .skip(mark)
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The last `n` lines of node `i`'s log, for failure messages.
    pub fn log_tail(&self, i: usize, n: usize) -> String {
        let lines = self.complete_lines(i);
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// "connection closed" entries of node `i`.
    pub fn connections(&self, i: usize) -> Vec<Value> {
        self.connections_since(i, 0)
    }

    pub fn connections_since(&self, i: usize, mark: usize) -> Vec<Value> {
        self.logs_since(i, mark)
            .into_iter()
            .filter(|l| l["message"] == "connection closed")
            .collect()
    }

    /// Waits for a log line of node `i` matching `pred`, anywhere in the log.
    pub fn wait_for_log(
        &self,
        i: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        self.wait_for_log_since(i, 0, timeout, pred)
    }

    /// Waits for a log line of node `i`, after `mark`, matching `pred`.
    pub fn wait_for_log_since(
        &self,
        i: usize,
        mark: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.logs_since(i, mark).into_iter().find(|v| pred(v)) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for a matching log line of node {i}; log tail:\n{}",
                    self.log_tail(i, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a "connection closed" line of node `i`, after `mark`, matching `pred`.
    pub fn wait_for_connection(
        &self,
        i: usize,
        mark: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        self.wait_for_log_since(i, mark, timeout, |l| {
            l["message"] == "connection closed" && pred(l)
        })
    }

    /// Waits for "pod enrolled" of `workload` ("ns/name") on node `i` after `mark`.
    pub fn wait_enrolled(
        &self,
        i: usize,
        mark: usize,
        workload: &str,
        timeout: Duration,
    ) -> Result<Value> {
        self.wait_for_log_since(i, mark, timeout, |l| {
            l["message"] == "pod enrolled" && l["pod"] == workload
        })
    }

    // ---- commands in the underlay ------------------------------------------------------------

    /// Runs a command in the underlay netns (e.g. tcpdump on br0), in the tools cgroup.
    pub fn underlay_exec(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut cmd = command(args)?;
        let _conf = confine(
            &mut cmd,
            Some(&Path::new(NETNS_DIR).join(self.underlay_netns())),
            Some(&self.cgroup.join("tools")),
        )?;
        output_with_timeout(&mut cmd, timeout)
    }

    /// Captures node `node`'s traffic on the underlay (its bridge port: the bridge device
    /// itself does not see frames forwarded between ports) while `during` runs. Returns what
    /// `during` returned, the raw pcap bytes and tcpdump's one-line-per-packet summary.
    pub fn capture_underlay<T>(
        &self,
        node: usize,
        during: impl FnOnce() -> Result<T>,
    ) -> Result<(T, Vec<u8>, String)> {
        let pcap = self.tmp.join(format!("underlay-n{node}.pcap"));
        let pcap_s = pcap.display().to_string();
        let port = format!("n{node}");
        let mut tcpdump = self.underlay_spawn(&[
            "tcpdump",
            "-i",
            &port,
            "-U",
            "--immediate-mode",
            "-n",
            "-w",
            &pcap_s,
            "tcp",
        ])?;
        crate::wait_until(Duration::from_secs(10), "tcpdump to start", || {
            tcpdump
                .stderr_lines()
                .iter()
                .any(|l| l.contains("listening on"))
                .then_some(())
        })?;
        let result = during()?;
        // Let the last packets reach the file before stopping tcpdump.
        std::thread::sleep(Duration::from_millis(1000));
        tcpdump.kill();
        let bytes = fs::read(&pcap).with_context(|| format!("reading {pcap_s}"))?;
        let text = self.underlay_exec(&["tcpdump", "-n", "-r", &pcap_s], CMD_TIMEOUT)?;
        let _ = fs::remove_file(&pcap);
        Ok((
            result,
            bytes,
            String::from_utf8_lossy(&text.stdout).into_owned(),
        ))
    }

    /// Spawns a long-running command in the underlay netns.
    pub fn underlay_spawn(&self, args: &[&str]) -> Result<Proc> {
        let mut cmd = command(args)?;
        let _conf = confine(
            &mut cmd,
            Some(&Path::new(NETNS_DIR).join(self.underlay_netns())),
            Some(&self.cgroup.join("tools")),
        )?;
        Proc::spawn(&mut cmd, &format!("underlay: {}", args.join(" ")))
    }
}

fn command(args: &[&str]) -> Result<Command> {
    let (program, rest) = args.split_first().ok_or_else(|| anyhow!("empty command"))?;
    let mut cmd = Command::new(program);
    cmd.args(rest);
    Ok(cmd)
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 1..=self.nodes {
                eprintln!(
                    "---- {} node{i} proxy log (last 60 lines) ----\n{}",
                    self.prefix,
                    self.log_tail(i, 60)
                );
            }
        }
        for child in self.proxies().iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let errors = cleanup_prefix(&self.prefix);
        for e in errors {
            eprintln!("ztunnel-tests: cleaning up {}: {e}", self.prefix);
        }
    }
}

/// A node of the cluster.
pub struct NodeRef<'a> {
    cluster: &'a Cluster,
    i: usize,
}

impl NodeRef<'_> {
    pub fn index(&self) -> usize {
        self.i
    }
    /// `node<i>`, the proxy's `--node-name`.
    pub fn name(&self) -> String {
        format!("node{}", self.i)
    }
    pub fn netns(&self) -> String {
        self.cluster.node_netns(self.i)
    }
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(self.netns())
    }
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 255, 0, self.i as u8)
    }
    pub fn bpf_dir(&self) -> PathBuf {
        self.cluster.bpf_dir(self.i)
    }
    /// The cgroup the node's proxy attaches its programs to (pods live below it).
    pub fn cgroup(&self) -> PathBuf {
        self.cluster.node_cgroup(self.i)
    }
    pub fn logs(&self) -> Vec<Value> {
        self.cluster.logs(self.i)
    }

    /// The cgroup of the node's own processes (below [`NodeRef::cgroup`], as the kubelet is
    /// below the cgroup root on a real node).
    pub fn processes_cgroup(&self) -> PathBuf {
        self.cluster.node_cgroup(self.i).join(NODE_PROCESSES_CGROUP)
    }

    /// Runs a command as one of the node's own processes (a kubelet probe): in the node's
    /// netns and in [`NodeRef::processes_cgroup`].
    pub fn exec_as_node(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut cmd = command(args)?;
        let _conf = confine(
            &mut cmd,
            Some(&self.netns_path()),
            Some(&self.processes_cgroup()),
        )?;
        output_with_timeout(&mut cmd, timeout)
    }

    /// Runs a command in the node's netns (tools cgroup, outside the node's pod cgroups).
    pub fn exec(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut cmd = command(args)?;
        let _conf = confine(
            &mut cmd,
            Some(&self.netns_path()),
            Some(&self.cluster.cgroup.join("tools")),
        )?;
        output_with_timeout(&mut cmd, timeout)
    }

    /// An HTTP request from inside the node's netns (to the proxy's metrics, readiness and
    /// admin ports): the status and the body.
    pub fn http(&self, method: &str, url: &str) -> Result<(u16, String)> {
        let out = self.exec(
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-X",
                method,
                "-w",
                "\n%{http_code}",
                url,
            ],
            Duration::from_secs(10),
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code = code.trim().parse().with_context(|| {
            format!(
                "curl {url}: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok((code, body.to_owned()))
    }

    /// The node proxy's metrics (port 15020).
    pub fn scrape(&self) -> Result<crate::metrics::Scrape> {
        let (code, body) = self.http("GET", "http://127.0.0.1:15020/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}: {body}");
        }
        crate::metrics::Scrape::parse(&body)
    }

    /// Spawns a long-running command in the node netns (e.g. `ztunnel ca serve`).
    pub fn spawn(&self, args: &[&str]) -> Result<Proc> {
        let mut cmd = command(args)?;
        let _conf = confine(
            &mut cmd,
            Some(&self.netns_path()),
            Some(&self.cluster.cgroup.join("tools")),
        )?;
        Proc::spawn(
            &mut cmd,
            &format!("node {}: {}", self.index(), args.join(" ")),
        )
    }
}

/// What a `vc-probe get`/`connect` printed, and how it exited.
#[derive(Debug)]
pub struct ProbeOutput {
    pub code: Option<i32>,
    /// The JSON line it printed (Null if none).
    pub json: Value,
    pub stdout: String,
    pub stderr: String,
}

impl ProbeOutput {
    /// The response body parsed as JSON (Null if it is not).
    pub fn body(&self) -> Value {
        self.json["body"]
            .as_str()
            .and_then(|b| serde_json::from_str(b).ok())
            .unwrap_or(Value::Null)
    }
}

/// A pod of the cluster.
pub struct PodRef<'a> {
    cluster: &'a Cluster,
    info: &'a PodInfo,
}

impl<'a> PodRef<'a> {
    pub fn cluster(&self) -> &'a Cluster {
        self.cluster
    }
    pub fn namespace(&self) -> &str {
        &self.info.namespace
    }
    pub fn name(&self) -> &str {
        &self.info.name
    }
    /// `namespace/name`, as the proxy logs it.
    pub fn workload(&self) -> String {
        format!("{}/{}", self.info.namespace, self.info.name)
    }
    pub fn node(&self) -> usize {
        self.info.node
    }
    pub fn ip(&self) -> Ipv4Addr {
        self.info.ip
    }
    pub fn netns(&self) -> &str {
        &self.info.netns
    }
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.info.netns)
    }
    pub fn cgroup(&self) -> &Path {
        &self.info.cgroup
    }
    /// The pod's `metadata.uid` in the configuration.
    pub fn uid(&self) -> String {
        format!(
            "{}-{}-{}",
            self.cluster.prefix, self.info.namespace, self.info.name
        )
    }

    fn confined(&self, args: &[&str]) -> Result<(Command, crate::process::Confinement)> {
        let mut cmd = command(args)?;
        let conf = confine(&mut cmd, Some(&self.netns_path()), Some(&self.info.cgroup))?;
        Ok((cmd, conf))
    }

    /// Starts a process in the pod (its netns and cgroup); killed when the guard drops.
    pub fn spawn(&self, args: &[&str]) -> Result<Proc> {
        let (mut cmd, _conf) = self.confined(args)?;
        Proc::spawn(
            &mut cmd,
            &format!("{}: {}", self.workload(), args.join(" ")),
        )
    }

    /// Runs a command in the pod to completion (killed after `timeout`).
    pub fn run(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let (mut cmd, _conf) = self.confined(args)?;
        output_with_timeout(&mut cmd, timeout)
    }

    /// Starts `vc-probe <args>` in the pod.
    pub fn spawn_probe(&self, args: &[&str]) -> Result<Proc> {
        let bin = crate::probe_bin_checked()?;
        let bin = bin.to_string_lossy();
        let mut all = vec![bin.as_ref()];
        all.extend_from_slice(args);
        self.spawn(&all)
    }

    /// `vc-probe http-server` on `port`, once it is listening.
    pub fn http_server(&self, port: u16, name: &str) -> Result<Proc> {
        let port = port.to_string();
        let mut p = self.spawn_probe(&["http-server", "--port", &port, "--name", name])?;
        p.wait_for_json(0, Duration::from_secs(10), |v| v["event"] == "listening")?;
        Ok(p)
    }

    /// `vc-probe tcp-echo` on `port`, once it is listening.
    pub fn tcp_echo(&self, port: u16) -> Result<Proc> {
        let port = port.to_string();
        let mut p = self.spawn_probe(&["tcp-echo", "--port", &port])?;
        p.wait_for_json(0, Duration::from_secs(10), |v| v["event"] == "listening")?;
        Ok(p)
    }

    /// A long-lived `vc-probe repl` client: `proc.request("get 10.2.0.2:8080", timeout)`.
    pub fn repl(&self) -> Result<Proc> {
        let mut p = self.spawn_probe(&["repl", "--timeout-ms", "5000"])?;
        p.wait_for_json(0, Duration::from_secs(10), |v| v["event"] == "ready")?;
        Ok(p)
    }

    /// Runs `vc-probe <args>` to completion.
    pub fn probe(&self, args: &[&str]) -> Result<ProbeOutput> {
        let bin = crate::probe_bin_checked()?;
        let bin = bin.to_string_lossy();
        let mut all = vec![bin.as_ref()];
        all.extend_from_slice(args);
        let out = self.run(&all, CMD_TIMEOUT)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null);
        Ok(ProbeOutput {
            code: out.status.code(),
            json,
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// `vc-probe get --addr <addr>` from this pod (5 s connect/read timeout).
    pub fn get(&self, addr: &str) -> Result<ProbeOutput> {
        self.probe(&["get", "--addr", addr, "--timeout-ms", "5000"])
    }
}
