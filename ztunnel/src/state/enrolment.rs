//! Who is in the mesh, and which pods this node's proxy captures.
use std::fmt;

use super::Snapshot;
use crate::model::Pod;

impl Snapshot {
    /// Whether `pod` is part of the mesh wherever it runs (its namespace is enrolled and it did
    /// not opt out), so traffic to it must be tunnelled. Unlike [`Snapshot::enrolment`], this
    /// does not depend on node-local facts such as the pod's netns path: a remote pod's node
    /// proxy knows those, and an unknown detail must not turn tunnelled traffic into plaintext.
    pub fn in_mesh(&self, pod: &Pod, policy: &EnrolmentPolicy) -> bool {
        let (ns_key, ns_value) = &policy.namespace_label;
        let (opt_key, opt_value) = &policy.pod_opt_out_label;
        !pod.host_network
            && self
                .namespaces
                .get(&pod.namespace)
                .is_some_and(|ns| ns.labels.get(ns_key) == Some(ns_value))
            && pod.labels.get(opt_key) != Some(opt_value)
    }

    /// Whether the proxy of `node` is to capture `pod` by its labels, node and namespace (the
    /// part of [`Snapshot::enrolment`] that does not ask where its addresses and netns come
    /// from; for a pod the CNI plugin reported, those are the plugin's).
    pub fn membership(
        &self,
        pod: &Pod,
        node: &str,
        policy: &EnrolmentPolicy,
    ) -> Result<(), Enrolment> {
        if pod.node_name.as_deref() != Some(node) {
            return Err(Enrolment::OtherNode(
                pod.node_name.clone().unwrap_or_default(),
            ));
        }
        if pod.host_network {
            return Err(Enrolment::HostNetwork);
        }
        let Some(ns) = self.namespaces.get(&pod.namespace) else {
            return Err(Enrolment::NamespaceUnknown);
        };
        let (key, value) = &policy.namespace_label;
        if ns.labels.get(key) != Some(value) {
            return Err(Enrolment::NamespaceNotLabelled);
        }
        let (key, value) = &policy.pod_opt_out_label;
        if pod.labels.get(key) == Some(value) {
            return Err(Enrolment::OptedOut);
        }
        Ok(())
    }

    /// Whether the proxy of `node` captures `pod`, and if not, why.
    pub fn enrolment(&self, pod: &Pod, node: &str, policy: &EnrolmentPolicy) -> Enrolment {
        if let Err(why) = self.membership(pod, node, policy) {
            return why;
        }
        if pod.ips.is_empty() {
            return Enrolment::NoIp;
        }
        if let Some(owner) = pod
            .ips
            .iter()
            .filter_map(|ip| self.pod_by_ip.get(ip))
            .find(|owner| owner.namespace != pod.namespace || owner.name != pod.name)
        {
            return Enrolment::DuplicateIp(owner.workload());
        }
        if pod.netns_path.is_none() {
            return Enrolment::NoNetns;
        }
        Enrolment::Enrolled
    }
}

/// Which labels enrol a namespace and opt a pod out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrolmentPolicy {
    pub namespace_label: (String, String),
    pub pod_opt_out_label: (String, String),
}

impl Default for EnrolmentPolicy {
    fn default() -> Self {
        Self {
            namespace_label: ("istio.io/dataplane-mode".into(), "ambient".into()),
            pod_opt_out_label: ("istio.io/dataplane-mode".into(), "none".into()),
        }
    }
}

impl EnrolmentPolicy {
    /// Parses `key=value`.
    pub fn parse_label(s: &str) -> Result<(String, String), String> {
        match s.split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() && !v.contains('=') => {
                Ok((k.trim().to_owned(), v.trim().to_owned()))
            }
            _ => Err(format!("expected a label as key=value, got {s:?}")),
        }
    }
}

/// The outcome of [`Snapshot::enrolment`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enrolment {
    Enrolled,
    NamespaceNotLabelled,
    /// The pod's namespace has no Namespace object, so its labels are unknown.
    NamespaceUnknown,
    OptedOut,
    OtherNode(String),
    HostNetwork,
    NoNetns,
    NoIp,
    /// Another pod (named) owns one of this pod's addresses.
    DuplicateIp(String),
}

impl Enrolment {
    /// The pod should be captured but the configuration does not let us: worth an error.
    pub fn is_misconfiguration(&self) -> bool {
        matches!(
            self,
            Enrolment::NamespaceUnknown
                | Enrolment::NoNetns
                | Enrolment::NoIp
                | Enrolment::DuplicateIp(_)
        )
    }
}

impl fmt::Display for Enrolment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Enrolment::Enrolled => f.write_str("enrolled"),
            Enrolment::NamespaceNotLabelled => f.write_str("namespace is not labelled for ambient"),
            Enrolment::NamespaceUnknown => {
                f.write_str("the pod's namespace has no Namespace object")
            }
            Enrolment::OptedOut => f.write_str("pod opted out by label"),
            Enrolment::OtherNode(n) => write!(f, "pod runs on node {n:?}"),
            Enrolment::HostNetwork => f.write_str("pod uses the host network"),
            Enrolment::NoNetns => write!(
                f,
                "pod has no network namespace path (annotation {}, or in a cluster not found on this node yet)",
                crate::model::NETNS_ANNOTATION
            ),
            Enrolment::NoIp => f.write_str("pod has no IP address in status.podIPs"),
            Enrolment::DuplicateIp(owner) => write!(f, "pod's IP address belongs to pod {owner}"),
        }
    }
}
