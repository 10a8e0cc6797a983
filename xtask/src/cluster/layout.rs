//! Names and addresses of the local cluster. Everything it creates carries the prefix `ztk`
//! (network namespaces, links, cgroups, pin directories) or lives below [`RUN_DIR`], so `down`
//! and the leak checks of `cargo xtask test` find all of it from these constants alone.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

pub const PREFIX: &str = "ztk";
pub const RUN_DIR: &str = "/tmp/ztk";

/// Ranges that must never leave the machine: `unreachable` in the root netns before anything
/// starts (more specific routes then carry what stays local).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const POD_CIDR: &str = "10.88.0.0/16";
pub const UNDERLAY_CIDR: &str = "10.99.0.0/16";
pub const GUARDED_RANGES: [&str; 3] = [SERVICE_CIDR, POD_CIDR, UNDERLAY_CIDR];

/// The root netns's address on the underlay bridge: the nodes' route to the service range.
pub const HOST_UNDERLAY_IP: &str = "10.99.0.254";
pub const UNDERLAY_BRIDGE: &str = "ztk-underlay";
/// The `kubernetes` Service's address (first of the range) and the cluster DNS.
pub const API_SERVICE_IP: &str = "10.96.0.1";
pub const DNS_SERVICE_IP: &str = "10.96.0.10";
pub const CLUSTER_DOMAIN: &str = "cluster.local";

pub const ETCD_CLIENT_PORT: u16 = 12379;
pub const ETCD_PEER_PORT: u16 = 12380;
pub const API_PORT: u16 = 16443;

/// The kubelet changes these at start (protectKernelDefaults is off): recorded before the
/// first kubelet starts and written back by `down`.
pub const KUBELET_SYSCTLS: [&str; 6] = [
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
];

pub const BPFFS: &str = "/sys/fs/bpf";
/// Host paths the kubelet, containerd and its CNI library write to whatever directories they
/// are given (`/var/log/containers` links, the shims' sockets in `/run/containerd/s`, libcni's
/// result cache, the kubelet's device-plugin socket): `up` records what each holds, `down`
/// removes what was added (the whole directory if `up` found none).
pub const FOREIGN_DIRS: [&str; 4] = [
    "/var/log/containers",
    "/run/containerd",
    "/var/lib/cni",
    "/var/lib/kubelet",
];

#[derive(Clone, Copy, Debug)]
pub struct Node(pub u8);

pub const NODES: [Node; 2] = [Node(1), Node(2)];

impl Node {
    pub fn name(self) -> String {
        format!("{PREFIX}-node{}", self.0)
    }
    /// The node's network namespace (`/run/netns/<name>`).
    pub fn netns(self) -> String {
        self.name()
    }
    pub fn netns_path(self) -> PathBuf {
        Path::new("/run/netns").join(self.netns())
    }
    /// The root-netns end of the node's veth on the underlay.
    pub fn veth(self) -> String {
        format!("{PREFIX}-n{}", self.0)
    }
    pub fn ip(self) -> String {
        format!("10.99.0.{}", self.0)
    }
    pub fn pod_subnet(self) -> String {
        format!("10.88.{}.0/24", self.0)
    }
    pub fn pod_gateway(self) -> String {
        format!("10.88.{}.1", self.0)
    }
    pub fn dir(self) -> PathBuf {
        run_dir().join(self.name())
    }
    pub fn containerd_socket(self) -> PathBuf {
        self.dir().join("containerd/containerd.sock")
    }
    /// The kubelet's cgroup root: `/<name>` in every hierarchy.
    pub fn cgroup_root(self) -> String {
        format!("/{}", self.name())
    }
    /// The CNI plugins this node's containerd runs (symlinks to Debian's, plus whatever a
    /// chained plugin's installer adds) and its network configuration directory.
    pub fn cni_bin_dir(self) -> PathBuf {
        self.dir().join("cni/bin")
    }
    pub fn cni_conf_dir(self) -> PathBuf {
        self.dir().join("cni/net.d")
    }
}

pub fn run_dir() -> PathBuf {
    PathBuf::from(RUN_DIR)
}
pub fn pki_dir() -> PathBuf {
    run_dir().join("pki")
}
pub fn log_dir() -> PathBuf {
    run_dir().join("logs")
}
pub fn pid_dir() -> PathBuf {
    run_dir().join("pids")
}
pub fn state_dir() -> PathBuf {
    run_dir().join("state")
}
/// The administrator's kubeconfig, printed by `up` and `status`.
pub fn kubeconfig() -> PathBuf {
    run_dir().join("kubeconfig")
}
/// Where the daemons' cgroups live in the unified hierarchy: `<cgroup2>/ztk-daemons/<name>`.
pub const DAEMONS_CGROUP: &str = "ztk-daemons";

/// kubectl for this cluster: its kubeconfig, and its discovery cache in the run directory
/// (not `~/.kube/cache`).
pub fn kubectl(binary: &Path) -> Command {
    let mut c = Command::new(binary);
    c.arg("--kubeconfig")
        .arg(kubeconfig())
        .arg("--cache-dir")
        .arg(run_dir().join("kubectl-cache"));
    c
}
