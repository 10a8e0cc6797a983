//! The cluster's objects as the proxy models them: namespaces, pods and services with their
//! labels, and where each was read from. Plain data, with no index and no policy: the
//! configuration sources build these, [`crate::authz`] matches policies against them and
//! [`crate::state`] indexes them into a snapshot.
use std::{collections::BTreeMap, fmt, net::IpAddr, path::PathBuf};

/// Pod annotation naming the pod's network namespace on its node (the local source; the
/// Kubernetes source finds it from the pod's cgroup).
pub const NETNS_ANNOTATION: &str = "ztunnel.dev/netns";

pub type Labels = BTreeMap<String, String>;

/// Where an object was read from, for messages that point the operator at it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The file, or for an object of the Kubernetes API `k8s:<kind>/<namespace>/<name>`.
    pub file: PathBuf,
    /// 1-based; 0 when the object has no line (the Kubernetes API).
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}", self.file.display()),
            line => write!(f, "{}:{line}", self.file.display()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
    pub origin: Origin,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: Labels,
    pub annotations: Labels,
    pub service_account: String,
    pub node_name: Option<String>,
    pub host_network: bool,
    /// Primary address first, as in `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// The pod's network namespace on its node (annotation `ztunnel.dev/netns`).
    pub netns_path: Option<PathBuf>,
    pub container_ports: Vec<ContainerPort>,
    pub origin: Origin,
}

impl Pod {
    /// `namespace/name`, the form used in logs.
    pub fn workload(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved per pod.
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub vips: Vec<IpAddr>,
    /// Empty means "no selector": the service has no endpoints we can compute.
    pub selector: Labels,
    pub ports: Vec<ServicePort>,
    pub origin: Origin,
}

/// A Kubernetes object of a kind this snapshot does not model (yet): kept so later stages
/// (policy) can read it from the same snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct OtherObject {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub body: serde_yaml::Value,
    pub origin: Origin,
}
