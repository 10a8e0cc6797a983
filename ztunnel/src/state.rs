//! The proxy's view of the cluster: one immutable, indexed snapshot of namespaces, pods and
//! services, built by a configuration source (`config`) and swapped whole on every change.
//!
//! Everything that needs the cluster (enrolment, routing, later policy) reads one snapshot, so a
//! decision never mixes two versions of the configuration.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, OnceLock},
};

use crate::authz::{
    AuthorizationPolicies, AuthorizationPolicy, MtlsDecision, PeerAuthentication,
    PeerAuthentications, PolicySet, RequestAuthentication, RequestAuthentications,
};

pub type Labels = BTreeMap<String, String>;

/// Mesh-wide settings that shape how the configuration is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshSettings {
    /// Istio's root namespace: its policies apply mesh-wide.
    pub root_namespace: String,
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self {
            root_namespace: "istio-system".into(),
        }
    }
}

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

#[derive(Clone, Debug, PartialEq, Eq)]
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

/// One endpoint of a service port: a pod and the address to dial.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub pod: Arc<Pod>,
    pub addr: SocketAddr,
}

/// Objects as read by a source, before indexing.
#[derive(Debug, Default)]
pub struct Objects {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    pub request_authentications: Vec<RequestAuthentication>,
    pub other: Vec<OtherObject>,
}

type Key = (String, String);

#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases by one with every snapshot a source publishes.
    pub generation: u64,
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    pub pods: BTreeMap<Key, Arc<Pod>>,
    pub services: BTreeMap<Key, Arc<Service>>,
    pub peer_authentications: PeerAuthentications,
    pub authorization_policies: AuthorizationPolicies,
    pub request_authentications: RequestAuthentications,
    pub other: Vec<OtherObject>,
    /// Istio's root namespace (from [`MeshSettings`]).
    pub root_namespace: String,
    /// The mesh configuration (`istio` ConfigMap, `mesh` key, in the root namespace).
    pub mesh_config: crate::authz::ext_authz::MeshConfig,
    /// Inconsistencies found while indexing; the snapshot is usable, the operator is told.
    pub problems: Vec<String>,
    pod_by_ip: HashMap<IpAddr, Arc<Pod>>,
    service_by_vip: HashMap<IpAddr, Arc<Service>>,
    /// Each pod's AuthorizationPolicies, compiled on first use (few pods of a snapshot are
    /// ever a destination on this node). Keyed by the address of the snapshot's own `Pod`.
    authorization_by_pod: HashMap<usize, OnceLock<Arc<PolicySet>>>,
}

impl Snapshot {
    /// Indexes `objects`. Duplicates and conflicts are resolved deterministically (the object
    /// read first keeps the name or address) and each is recorded in `problems`.
    pub fn build(generation: u64, objects: Objects, settings: &MeshSettings) -> Self {
        let mut s = Snapshot {
            generation,
            other: objects.other,
            peer_authentications: PeerAuthentications::new(objects.peer_authentications),
            authorization_policies: AuthorizationPolicies::new(objects.authorization_policies),
            request_authentications: RequestAuthentications::new(objects.request_authentications),
            root_namespace: settings.root_namespace.clone(),
            ..Default::default()
        };
        for ns in objects.namespaces {
            if let Some(first) = s.namespaces.get(&ns.name) {
                s.problems.push(format!(
                    "namespace {} is defined twice ({} and {}); the first one is used",
                    ns.name, first.origin, ns.origin
                ));
                continue;
            }
            s.namespaces.insert(ns.name.clone(), Arc::new(ns));
        }
        for pod in objects.pods {
            let key = (pod.namespace.clone(), pod.name.clone());
            if let Some(first) = s.pods.get(&key) {
                s.problems.push(format!(
                    "pod {} is defined twice ({} and {}); the first one is used",
                    pod.workload(),
                    first.origin,
                    pod.origin
                ));
                continue;
            }
            if !s.namespaces.contains_key(&pod.namespace) {
                s.problems.push(format!(
                    "pod {} ({}) is in namespace {} which has no Namespace object; it is not enrolled",
                    pod.workload(),
                    pod.origin,
                    pod.namespace
                ));
            }
            let pod = Arc::new(pod);
            if !pod.host_network {
                for ip in &pod.ips {
                    match s.pod_by_ip.get(ip) {
                        Some(owner) => s.problems.push(format!(
                            "pods {} ({}) and {} ({}) both claim IP {ip}; it stays with {} and {} is not enrolled",
                            owner.workload(),
                            owner.origin,
                            pod.workload(),
                            pod.origin,
                            owner.workload(),
                            pod.workload()
                        )),
                        None => {
                            s.pod_by_ip.insert(*ip, pod.clone());
                        }
                    }
                }
            }
            s.pods.insert(key, pod);
        }
        for svc in objects.services {
            let key = (svc.namespace.clone(), svc.name.clone());
            if let Some(first) = s.services.get(&key) {
                s.problems.push(format!(
                    "service {}/{} is defined twice ({} and {}); the first one is used",
                    svc.namespace, svc.name, first.origin, svc.origin
                ));
                continue;
            }
            let svc = Arc::new(svc);
            for vip in &svc.vips {
                match s.service_by_vip.get(vip) {
                    Some(owner) => s.problems.push(format!(
                        "services {}/{} and {}/{} both claim cluster IP {vip}; it stays with {}/{}",
                        owner.namespace,
                        owner.name,
                        svc.namespace,
                        svc.name,
                        owner.namespace,
                        owner.name
                    )),
                    None => {
                        s.service_by_vip.insert(*vip, svc.clone());
                    }
                }
            }
            s.services.insert(key, svc);
        }
        let problems = s
            .peer_authentications
            .problems(&s.root_namespace, s.pods.values());
        s.problems.extend(problems);
        s.problems.extend(s.authorization_policies.problems());
        s.authorization_by_pod = s
            .pods
            .values()
            .map(|p| (Arc::as_ptr(p) as usize, OnceLock::new()))
            .collect();
        s.read_mesh_config();
        let problems = s.custom_provider_problems();
        s.problems.extend(problems);
        s
    }

    /// CUSTOM policies whose provider the mesh configuration does not define as an HTTP
    /// ext-authz provider: every request they apply to is denied, which the operator must see
    /// in the configuration's problems, not only when a request is refused.
    fn custom_provider_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for p in self.authorization_policies.iter() {
            let (crate::authz::Action::Custom, Some(name)) = (p.action, p.provider.as_deref())
            else {
                continue;
            };
            if self.mesh_config.http_providers.contains_key(name) {
                continue;
            }
            let why = if self.mesh_config.other_providers.iter().any(|o| o == name) {
                "is not an envoyExtAuthzHttp provider (the only kind this proxy calls)".to_owned()
            } else {
                format!(
                    "is not among the extensionProviders of the mesh configuration (ConfigMap {}/istio, key mesh)",
                    self.root_namespace
                )
            };
            problems.push(format!(
                "AuthorizationPolicy {} ({}): CUSTOM provider {name:?} {why}; the requests it applies to are denied",
                p.id(),
                p.origin
            ));
        }
        problems
    }

    /// Reads Istio's mesh configuration from the `istio` ConfigMap of the root namespace. A bad
    /// one is reported and not used: CUSTOM policies then deny (their providers are unknown).
    fn read_mesh_config(&mut self) {
        let Some(cm) = self.other.iter().find(|o| {
            o.api_version == "v1"
                && o.kind == "ConfigMap"
                && o.name == "istio"
                && o.namespace.as_deref() == Some(self.root_namespace.as_str())
        }) else {
            return;
        };
        let Some(mesh) = cm
            .body
            .get("data")
            .and_then(|d| d.get("mesh"))
            .and_then(|m| m.as_str())
        else {
            return;
        };
        match crate::authz::ext_authz::MeshConfig::parse(mesh) {
            Ok(m) => self.mesh_config = m,
            Err(e) => self.problems.push(format!(
                "ConfigMap {}/istio ({}): the mesh configuration is not used: {e}",
                self.root_namespace, cm.origin
            )),
        }
    }

    /// The AuthorizationPolicies that apply to `pod`, compiled for deciding. Cached for the
    /// snapshot's own pods; a pod of an older snapshot (a connection re-checked after a
    /// change) gets a set compiled from its labels then.
    pub fn authorization_for(&self, pod: &Pod) -> Arc<PolicySet> {
        let compile = || {
            Arc::new(PolicySet::new(
                self.authorization_policies
                    .for_workload(pod, &self.root_namespace, |name| self.service_in(pod, name))
                    .into_iter()
                    .cloned(),
            ))
        };
        match self.authorization_by_pod.get(&(pod as *const Pod as usize)) {
            Some(cell) => cell.get_or_init(compile).clone(),
            None => compile(),
        }
    }

    /// The RequestAuthentications that apply to `pod`.
    pub fn request_authentications_for(&self, pod: &Pod) -> Vec<&Arc<RequestAuthentication>> {
        self.request_authentications
            .for_workload(pod, &self.root_namespace, |name| self.service_in(pod, name))
    }

    fn service_in(&self, pod: &Pod, name: &str) -> Option<&Service> {
        self.services
            .get(&(pod.namespace.clone(), name.to_owned()))
            .map(|s| s.as_ref())
    }

    /// The mutual-TLS mode in force for connections to `pod` on (target) `port`.
    pub fn mtls_mode(&self, pod: &Pod, port: u16) -> MtlsDecision {
        self.peer_authentications
            .resolve(pod, port, &self.root_namespace)
    }

    /// The pod that owns `ip` (host-network pods own no address).
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Arc<Pod>> {
        self.pod_by_ip.get(&ip)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.service_by_vip.get(&ip)
    }

    pub fn service_port<'a>(&self, svc: &'a Service, port: u16) -> Option<&'a ServicePort> {
        svc.ports.iter().find(|p| p.port == port)
    }

    /// Endpoints of `svc`'s `port`: every addressed pod of the service's namespace whose labels
    /// match the selector, at the resolved target port. Pods without a matching named port are
    /// skipped, as Kubernetes does.
    pub fn endpoints(&self, svc: &Service, port: u16) -> Vec<Endpoint> {
        let Some(sp) = self.service_port(svc, port) else {
            return Vec::new();
        };
        if svc.selector.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for pod in self
            .pods
            .range((svc.namespace.clone(), String::new())..)
            .take_while(|((ns, _), _)| *ns == svc.namespace)
            .map(|(_, p)| p)
        {
            if !svc
                .selector
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v))
            {
                continue;
            }
            let target = match &sp.target_port {
                TargetPort::Number(n) => *n,
                TargetPort::Name(name) => match pod
                    .container_ports
                    .iter()
                    .find(|c| c.name.as_deref() == Some(name.as_str()))
                {
                    Some(c) => c.port,
                    None => continue,
                },
            };
            for ip in &pod.ips {
                // Only addresses the pod really owns: a pod that lost an IP conflict is not a
                // reachable endpoint at that address.
                if self
                    .pod_by_ip
                    .get(ip)
                    .is_some_and(|owner| Arc::ptr_eq(owner, pod))
                {
                    out.push(Endpoint {
                        pod: pod.clone(),
                        addr: SocketAddr::new(*ip, target),
                    });
                }
            }
        }
        out
    }

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
                crate::config::NETNS_ANNOTATION
            ),
            Enrolment::NoIp => f.write_str("pod has no IP address in status.podIPs"),
            Enrolment::DuplicateIp(owner) => write!(f, "pod's IP address belongs to pod {owner}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ns(name: &str, l: &[(&str, &str)]) -> Namespace {
        Namespace {
            name: name.into(),
            labels: labels(l),
            origin: Origin::default(),
        }
    }

    fn pod(ns: &str, name: &str, node: &str, ip: &str, l: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            labels: labels(l),
            annotations: Labels::new(),
            service_account: "default".into(),
            node_name: Some(node.into()),
            host_network: false,
            ips: vec![ip.parse().unwrap()],
            netns_path: Some(format!("/run/netns/{name}").into()),
            container_ports: vec![ContainerPort {
                name: Some("http".into()),
                port: 8080,
            }],
            origin: Origin {
                file: format!("{name}.yaml").into(),
                line: 1,
            },
        }
    }

    fn svc(ns: &str, name: &str, vip: &str, sel: &[(&str, &str)], target: TargetPort) -> Service {
        Service {
            namespace: ns.into(),
            name: name.into(),
            vips: vec![vip.parse().unwrap()],
            selector: labels(sel),
            ports: vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: target,
            }],
            origin: Origin::default(),
        }
    }

    const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");

    #[test]
    fn enrolment_follows_namespace_label_node_and_opt_out() {
        let s = Snapshot::build(
            1,
            Objects {
                namespaces: vec![ns("shop", &[AMBIENT]), ns("legacy", &[])],
                pods: vec![
                    pod("shop", "a", "n1", "10.1.0.2", &[]),
                    pod("shop", "b", "n2", "10.2.0.2", &[]),
                    pod(
                        "shop",
                        "c",
                        "n1",
                        "10.1.0.3",
                        &[("istio.io/dataplane-mode", "none")],
                    ),
                    pod("legacy", "d", "n1", "10.1.0.4", &[]),
                    pod("ghost", "e", "n1", "10.1.0.5", &[]),
                ],
                ..Default::default()
            },
            &MeshSettings::default(),
        );
        let p = EnrolmentPolicy::default();
        let e = |ns: &str, n: &str| s.enrolment(&s.pods[&(ns.into(), n.into())], "n1", &p);
        assert_eq!(e("shop", "a"), Enrolment::Enrolled);
        assert_eq!(e("shop", "b"), Enrolment::OtherNode("n2".into()));
        assert_eq!(e("shop", "c"), Enrolment::OptedOut);
        assert_eq!(e("legacy", "d"), Enrolment::NamespaceNotLabelled);
        assert_eq!(e("ghost", "e"), Enrolment::NamespaceUnknown);
        let in_mesh = |ns: &str, n: &str| s.in_mesh(&s.pods[&(ns.into(), n.into())], &p);
        assert!(in_mesh("shop", "a") && in_mesh("shop", "b"), "on any node");
        assert!(!in_mesh("shop", "c") && !in_mesh("legacy", "d") && !in_mesh("ghost", "e"));
        assert!(s
            .problems
            .iter()
            .any(|p| p.contains("ghost/e") && p.contains("no Namespace")));
    }

    #[test]
    fn duplicate_pod_ips_keep_the_first_owner_and_report_both() {
        let s = Snapshot::build(
            1,
            Objects {
                namespaces: vec![ns("shop", &[AMBIENT])],
                pods: vec![
                    pod("shop", "a", "n1", "10.1.0.2", &[]),
                    pod("shop", "b", "n1", "10.1.0.2", &[]),
                ],
                ..Default::default()
            },
            &MeshSettings::default(),
        );
        let ip = "10.1.0.2".parse().unwrap();
        assert_eq!(s.pod_by_ip(ip).unwrap().name, "a");
        let p = EnrolmentPolicy::default();
        let b = &s.pods[&("shop".into(), "b".into())];
        assert_eq!(
            s.enrolment(b, "n1", &p),
            Enrolment::DuplicateIp("shop/a".into())
        );
        assert_eq!(s.problems.len(), 1);
        assert!(s.problems[0].contains("shop/a") && s.problems[0].contains("shop/b"));
    }

    #[test]
    fn endpoints_match_selector_namespace_and_named_ports() {
        let mut other = pod("other", "x", "n1", "10.1.0.9", &[("app", "web")]);
        other.container_ports.clear();
        let mut unnamed = pod("shop", "u", "n2", "10.2.0.9", &[("app", "web")]);
        unnamed.container_ports.clear();
        let s = Snapshot::build(
            1,
            Objects {
                namespaces: vec![ns("shop", &[]), ns("other", &[])],
                pods: vec![
                    pod("shop", "w1", "n1", "10.1.0.2", &[("app", "web")]),
                    pod(
                        "shop",
                        "w2",
                        "n2",
                        "10.2.0.2",
                        &[("app", "web"), ("v", "2")],
                    ),
                    pod("shop", "db", "n2", "10.2.0.3", &[("app", "db")]),
                    unnamed,
                    other,
                ],
                services: vec![
                    svc(
                        "shop",
                        "web",
                        "10.96.0.1",
                        &[("app", "web")],
                        TargetPort::Number(8080),
                    ),
                    svc(
                        "shop",
                        "named",
                        "10.96.0.2",
                        &[("app", "web")],
                        TargetPort::Name("http".into()),
                    ),
                    svc("shop", "manual", "10.96.0.3", &[], TargetPort::Number(1)),
                ],
                ..Default::default()
            },
            &MeshSettings::default(),
        );
        let web = s.service_by_vip("10.96.0.1".parse().unwrap()).unwrap();
        let addrs: Vec<String> = s
            .endpoints(web, 80)
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert_eq!(addrs, ["10.2.0.9:8080", "10.1.0.2:8080", "10.2.0.2:8080"]);
        assert!(s.endpoints(web, 81).is_empty());
        let named = s.service_by_vip("10.96.0.2".parse().unwrap()).unwrap();
        let addrs: Vec<String> = s
            .endpoints(named, 80)
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert_eq!(
            addrs,
            ["10.1.0.2:8080", "10.2.0.2:8080"],
            "pods without the named port are skipped"
        );
        let manual = s.service_by_vip("10.96.0.3".parse().unwrap()).unwrap();
        assert!(s.endpoints(manual, 80).is_empty());
    }

    #[test]
    fn vip_collisions_are_reported() {
        let s = Snapshot::build(
            1,
            Objects {
                services: vec![
                    svc(
                        "a",
                        "one",
                        "10.96.0.1",
                        &[("x", "y")],
                        TargetPort::Number(1),
                    ),
                    svc(
                        "b",
                        "two",
                        "10.96.0.1",
                        &[("x", "y")],
                        TargetPort::Number(1),
                    ),
                ],
                ..Default::default()
            },
            &MeshSettings::default(),
        );
        assert_eq!(
            s.service_by_vip("10.96.0.1".parse().unwrap()).unwrap().name,
            "one"
        );
        assert!(s.problems[0].contains("a/one") && s.problems[0].contains("b/two"));
    }

    #[test]
    fn custom_policies_naming_a_provider_the_mesh_lacks_are_problems() {
        let yaml = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    extensionProviders:
    - name: http-authz
      envoyExtAuthzHttp: {service: ext-authz.foo.svc.cluster.local, port: 8000}
    - name: grpc-authz
      envoyExtAuthzGrpc: {service: ext-authz.foo.svc.cluster.local, port: 9000}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: known, namespace: foo}
spec: {action: CUSTOM, provider: {name: http-authz}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: foo}
spec: {action: CUSTOM, provider: {name: htpp-authz}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: grpc, namespace: foo}
spec: {action: CUSTOM, provider: {name: grpc-authz}, rules: [{}]}
"#;
        let mut objects = Objects::default();
        crate::config::parse_file(std::path::Path::new("policies.yaml"), yaml, &mut objects)
            .unwrap();
        let s = Snapshot::build(1, objects, &MeshSettings::default());
        assert_eq!(s.problems.len(), 2, "{:#?}", s.problems);
        assert!(
            s.problems[0].contains("foo/grpc")
                && s.problems[0].contains("not an envoyExtAuthzHttp"),
            "{:#?}",
            s.problems
        );
        assert!(
            s.problems[1].contains("foo/typo")
                && s.problems[1].contains("\"htpp-authz\"")
                && s.problems[1].contains("istio-system/istio")
                && s.problems[1].contains("policies.yaml"),
            "{:#?}",
            s.problems
        );
    }

    #[test]
    fn labels_parse_as_key_value() {
        assert_eq!(
            EnrolmentPolicy::parse_label("istio.io/dataplane-mode=ambient"),
            Ok(("istio.io/dataplane-mode".into(), "ambient".into()))
        );
        for bad in ["", "k", "=v", "k=", "a=b=c"] {
            assert!(EnrolmentPolicy::parse_label(bad).is_err(), "{bad:?}");
        }
    }
}
