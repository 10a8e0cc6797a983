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
//! With IPv6 ([`ClusterBuilder::families`]) every address above has an IPv6 twin from
//! [`addresses`] (`fd10:ff::<i>/64`, `fd10:<i>::<j+2>/128`, default via `fe80::1`,
//! `fd10:<k>::/64` via `fd10:ff::<k>`).
//! cgroups: `<cgroup2>/<prefix>/node<i>/<ns>_<pod>` (pod processes), `<prefix>/proxies`,
//! `<prefix>/tools` (commands run in a node netns). Nothing is created in the host netns but,
//! with IPv6, the guard route `unreachable fd10::/16` ([`addresses::HostGuard`]).
//!
//! The harness is split by concern: [`topology`] creates the namespaces, veths and routes (and
//! runs commands in the underlay), [`model`] is the cluster's configuration (the objects the
//! proxies read, changed at run time), [`proxy`] starts and stops the node proxies, [`logs`]
//! reads what they logged, and [`handles`] are the node and pod handles tests run things in;
//! [`prometheus`] runs a real Prometheus server scraping the node proxies.
//! A node's proxy is ours or, for interoperability tests and `bench --peer`, Istio's own
//! ztunnel ([`peer_proxy`]).
pub mod addresses;
mod handles;
mod logs;
mod model;
mod peer_proxy;
pub mod prometheus;
mod proxy;
mod topology;

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex, MutexGuard,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{
    cleanup::{cgroup2_root, cleanup_prefix, sweep_stale, BPFFS, TMP},
    config::{labels, Labels},
};
use addresses::{Family, HostGuard};

pub use handles::{NodeRef, PodRef, ProbeOutput};
use model::Model;
pub use model::{pod, service, PodSpec, ServiceSpec};
pub(crate) use peer_proxy::Peers;
pub use topology::underlay_not_only_mtls;
use topology::PodInfo;

/// How long a proxy may take to log "proxy ready".
pub const PROXY_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline for commands run inside the cluster.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(20);

/// Declares a cluster; [`ClusterBuilder::start`] creates it.
#[derive(Clone, Debug)]
pub struct ClusterBuilder {
    nodes: usize,
    namespaces: Vec<(String, Labels)>,
    pods: Vec<PodSpec>,
    services: Vec<ServiceSpec>,
    peer_nodes: Vec<usize>,
    families: Vec<Family>,
}

/// Which ztunnel is a node's proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeProxy {
    /// This project's `ztunnel` ([`crate::ztunnel_bin`]).
    Ours,
    /// Istio's ztunnel ([`crate::peer::peer_bin`]), fed by the harness's ZDS server.
    Peer,
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
    /// The IP families of the underlay, the pods and the Services, the primary first (the
    /// order of `status.podIPs` and `spec.clusterIPs`): `[V4]` (the default), `[V6]`, or both
    /// for dual-stack. See [`addresses`] for the plan.
    pub fn families(mut self, families: &[Family]) -> Self {
        self.families = families.to_vec();
        self
    }
    /// Node `i` runs Istio's ztunnel instead of ours (see [`crate::peer`]).
    pub fn peer_node(mut self, i: usize) -> Self {
        self.peer_nodes.push(i);
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
        let mut families = self.families.clone();
        families.dedup();
        if families.is_empty() || families.len() != self.families.len() {
            bail!("a cluster needs one or two different IP families, not {families:?}");
        }
        if families.contains(&Family::V6) && !self.peer_nodes.is_empty() {
            bail!("the harness feeds Istio's ztunnel IPv4 pods only (peer nodes with IPv6)");
        }
        // Before any cluster address exists: nothing outside the cluster may reach it.
        let host_guard = match families.contains(&Family::V6) {
            true => Some(HostGuard::take()?),
            false => None,
        };
        if let Some(i) = self
            .peer_nodes
            .iter()
            .find(|i| **i == 0 || **i > self.nodes)
        {
            bail!("node {i} cannot run the peer: it does not exist");
        }
        // Before anything is created: a missing peer binary fails here, clearly.
        let peer_bin = match self.peer_nodes.is_empty() {
            true => None,
            false => Some(crate::peer::peer_bin()?),
        };
        let node_proxies = (1..=self.nodes)
            .map(|i| match self.peer_nodes.contains(&i) {
                true => NodeProxy::Peer,
                false => NodeProxy::Ours,
            })
            .collect();
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
            node_proxies,
            peers: Peers::new(peer_bin),
            families,
            host_guard,
        };
        // From here on, dropping `c` removes whatever was created.
        c.build(self)?;
        Ok(c)
    }
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
    node_proxies: Vec<NodeProxy>,
    /// What the peer nodes need besides their process (empty without peer nodes).
    peers: Peers,
    families: Vec<Family>,
    /// Dropped after everything else of the cluster is removed ([`Drop`]).
    host_guard: Option<HostGuard>,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            nodes: 1,
            namespaces: Vec::new(),
            pods: Vec::new(),
            services: Vec::new(),
            peer_nodes: Vec::new(),
            families: vec![Family::V4],
        }
    }

    /// The cluster's IP families, the primary first.
    pub fn families(&self) -> &[Family] {
        &self.families
    }

    /// Which ztunnel node `i` runs.
    pub fn node_proxy(&self, i: usize) -> NodeProxy {
        self.node_proxies[i - 1]
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

    /// The Service's primary cluster IP (the first of `spec.clusterIPs`).
    pub fn service_vip(&self, namespace: &str, name: &str) -> String {
        self.service_vips(namespace, name)[0].clone()
    }

    /// The Service's cluster IP of `family`; panics if it has none.
    pub fn service_vip_of(&self, namespace: &str, name: &str, family: Family) -> IpAddr {
        self.service_vips(namespace, name)
            .iter()
            .filter_map(|v| v.parse::<IpAddr>().ok())
            .find(|ip| Family::of(*ip) == family)
            .unwrap_or_else(|| panic!("service {namespace}/{name} has no {family} cluster IP"))
    }

    fn service_vips(&self, namespace: &str, name: &str) -> Vec<String> {
        self.model()
            .services
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|s| s.vips.clone())
            .unwrap_or_else(|| panic!("service {namespace}/{name} was not declared"))
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
        self.peers.shutdown();
        let errors = cleanup_prefix(&self.prefix);
        for e in errors {
            eprintln!("ztunnel-tests: cleaning up {}: {e}", self.prefix);
        }
        // Last: the cluster's addresses are gone.
        self.host_guard.take();
    }
}
