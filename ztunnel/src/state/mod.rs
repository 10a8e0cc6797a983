//! The proxy's view of the cluster: one immutable, indexed snapshot of namespaces, pods,
//! services and policies, built by a configuration source (`config`) and swapped whole on
//! every change.
//!
//! Everything that needs the cluster (enrolment, routing, policy) reads one snapshot, so a
//! decision never mixes two versions of the configuration.
//!
//! * here: building and indexing a snapshot, pods by address;
//! * [`services`]: Services by cluster IP, and their endpoints;
//! * [`enrolment`]: who is in the mesh, and which pods this node captures;
//! * [`policy`]: the policies in force for a workload, which admission decides over;
//! * [`traffic`]: VirtualServices and DestinationRules, which the outbound side routes with.
#[cfg(test)]
pub(crate) mod apply_tests;
mod enrolment;
mod policy;
mod services;
mod traffic;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use imbl::OrdMap;

pub use enrolment::{Enrolment, EnrolmentPolicy};
pub use services::Endpoint;
pub use traffic::TrafficIndex;

use crate::authz::{
    AuthorizationPolicies, AuthorizationPolicy, PeerAuthentication, PeerAuthentications, PolicySet,
    RequestAuthentication, RequestAuthentications,
};
use crate::model::{Namespace, OtherObject, Pod, Service};
use crate::traffic::{DestinationRule, VirtualService};

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

/// Objects as read by a source, before indexing. Namespaces, pods and Services are shared:
/// a source keeps what it parsed and hands the same objects to every snapshot, so a change
/// to one object costs one parse, not one copy of the cluster.
#[derive(Debug, Default)]
pub struct Objects {
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    pub request_authentications: Vec<Arc<RequestAuthentication>>,
    pub virtual_services: Vec<Arc<VirtualService>>,
    pub destination_rules: Vec<Arc<DestinationRule>>,
    pub other: Vec<OtherObject>,
}

impl Objects {
    /// Adds `other`'s objects after these (shared objects are not copied).
    pub fn extend_from(&mut self, other: &Objects) {
        self.namespaces.extend(other.namespaces.iter().cloned());
        self.pods.extend(other.pods.iter().cloned());
        self.services.extend(other.services.iter().cloned());
        self.peer_authentications
            .extend(other.peer_authentications.iter().cloned());
        self.authorization_policies
            .extend(other.authorization_policies.iter().cloned());
        self.request_authentications
            .extend(other.request_authentications.iter().cloned());
        self.virtual_services
            .extend(other.virtual_services.iter().cloned());
        self.destination_rules
            .extend(other.destination_rules.iter().cloned());
        self.other.extend(other.other.iter().cloned());
    }

    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.pods.is_empty()
            && self.services.is_empty()
            && self.peer_authentications.is_empty()
            && self.authorization_policies.is_empty()
            && self.request_authentications.is_empty()
            && self.virtual_services.is_empty()
            && self.destination_rules.is_empty()
            && self.other.is_empty()
    }

    /// Everything but namespaces, pods and Services.
    fn rest(self) -> Rest {
        Rest {
            peer_authentications: self.peer_authentications,
            authorization_policies: self.authorization_policies,
            request_authentications: self.request_authentications,
            virtual_services: self.virtual_services,
            destination_rules: self.destination_rules,
            other: self.other,
        }
    }
}

/// The objects indexed after namespaces, pods and Services.
struct Rest {
    peer_authentications: Vec<Arc<PeerAuthentication>>,
    authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    request_authentications: Vec<Arc<RequestAuthentication>>,
    virtual_services: Vec<Arc<VirtualService>>,
    destination_rules: Vec<Arc<DestinationRule>>,
    other: Vec<OtherObject>,
}

/// Objects a source saw change since the snapshot it last published: those gone or replaced
/// (`removed`, as the source had them) and those new or replacing them (`added`). An object
/// whose value did not change is in neither, so the snapshot keeps sharing it.
#[derive(Debug, Default)]
pub struct Delta {
    pub removed: Objects,
    pub added: Objects,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.added.is_empty()
    }

    /// Records how one part of a source (a file) went from `old` to `new`. An object of `new`
    /// equal to one of `old` is replaced by that one, so snapshots keep sharing it; policies
    /// and traffic rules, which are indexed per kind, count as changed unless the part's whole
    /// list of that kind is equal.
    pub fn record(&mut self, old: &Objects, new: &mut Objects) {
        let (removed, added) = (&mut self.removed, &mut self.added);
        diff_by_key(
            &old.namespaces,
            &mut new.namespaces,
            |n| (n.name.clone(), String::new()),
            &mut removed.namespaces,
            &mut added.namespaces,
        );
        diff_by_key(
            &old.pods,
            &mut new.pods,
            |p| (p.namespace.clone(), p.name.clone()),
            &mut removed.pods,
            &mut added.pods,
        );
        diff_by_key(
            &old.services,
            &mut new.services,
            |s| (s.namespace.clone(), s.name.clone()),
            &mut removed.services,
            &mut added.services,
        );
        diff_lists(
            &old.peer_authentications,
            &mut new.peer_authentications,
            &mut removed.peer_authentications,
            &mut added.peer_authentications,
        );
        diff_lists(
            &old.authorization_policies,
            &mut new.authorization_policies,
            &mut removed.authorization_policies,
            &mut added.authorization_policies,
        );
        diff_lists(
            &old.request_authentications,
            &mut new.request_authentications,
            &mut removed.request_authentications,
            &mut added.request_authentications,
        );
        diff_lists(
            &old.virtual_services,
            &mut new.virtual_services,
            &mut removed.virtual_services,
            &mut added.virtual_services,
        );
        diff_lists(
            &old.destination_rules,
            &mut new.destination_rules,
            &mut removed.destination_rules,
            &mut added.destination_rules,
        );
    }
}

fn diff_by_key<T: PartialEq>(
    old: &[Arc<T>],
    new: &mut [Arc<T>],
    key: impl Fn(&T) -> Key,
    removed: &mut Vec<Arc<T>>,
    added: &mut Vec<Arc<T>>,
) {
    let mut before: HashMap<Key, &Arc<T>> = old.iter().map(|o| (key(o), o)).collect();
    for n in new.iter_mut() {
        match before.remove(&key(n)) {
            Some(o) if **o == **n => *n = o.clone(),
            Some(o) => {
                removed.push(o.clone());
                added.push(n.clone());
            }
            None => added.push(n.clone()),
        }
    }
    removed.extend(before.into_values().cloned());
}

fn diff_lists<T: PartialEq>(
    old: &[Arc<T>],
    new: &mut [Arc<T>],
    removed: &mut Vec<Arc<T>>,
    added: &mut Vec<Arc<T>>,
) {
    if old.len() == new.len() && old.iter().zip(new.iter()).all(|(o, n)| **o == **n) {
        new.clone_from_slice(old);
    } else {
        removed.extend_from_slice(old);
        added.extend_from_slice(new);
    }
}

/// Which kinds a delta touches.
#[derive(Clone, Copy, Debug)]
struct Touched {
    pods: bool,
    services: bool,
    peer_authentications: bool,
    authorization_policies: bool,
    request_authentications: bool,
    traffic: bool,
}

impl Touched {
    const ALL: Touched = Touched {
        pods: true,
        services: true,
        peer_authentications: true,
        authorization_policies: true,
        request_authentications: true,
        traffic: true,
    };

    fn of(d: &Delta) -> Self {
        let any = |f: fn(&Objects) -> bool| f(&d.removed) || f(&d.added);
        Touched {
            pods: any(|o| !o.pods.is_empty()),
            services: any(|o| !o.services.is_empty()),
            peer_authentications: any(|o| !o.peer_authentications.is_empty()),
            authorization_policies: any(|o| !o.authorization_policies.is_empty()),
            request_authentications: any(|o| !o.request_authentications.is_empty()),
            traffic: any(|o| !o.virtual_services.is_empty() || !o.destination_rules.is_empty()),
        }
    }
}

/// A snapshot's problems by what they come from, so a delta recomputes only the parts it
/// touches. [`Snapshot::problems`] is their concatenation, in this order.
#[derive(Clone, Debug, Default)]
struct Problems {
    /// Names and addresses claimed twice, pods without their Namespace.
    objects: Vec<String>,
    traffic: Vec<String>,
    peer_authentications: Vec<String>,
    authorization_policies: Vec<String>,
    /// The mesh configuration and the CUSTOM providers it must define.
    mesh: Vec<String>,
}

impl Problems {
    fn joined(&self) -> Vec<String> {
        [
            &self.objects,
            &self.traffic,
            &self.peer_authentications,
            &self.authorization_policies,
            &self.mesh,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }
}

type Key = (String, String);

#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases by one with every snapshot a source publishes.
    pub generation: u64,
    /// Namespaces, pods and Services in persistent maps: a snapshot made by
    /// [`Snapshot::apply`] shares every node the delta did not touch with the one before.
    pub namespaces: OrdMap<String, Arc<Namespace>>,
    pub pods: OrdMap<Key, Arc<Pod>>,
    pub services: OrdMap<Key, Arc<Service>>,
    /// The policy indexes, shared with the snapshot before when their kind did not change.
    pub peer_authentications: Arc<PeerAuthentications>,
    pub authorization_policies: Arc<AuthorizationPolicies>,
    pub request_authentications: Arc<RequestAuthentications>,
    /// VirtualServices and DestinationRules, indexed against the Services.
    pub traffic: TrafficIndex,
    pub other: Vec<OtherObject>,
    /// Istio's root namespace (from [`MeshSettings`]).
    pub root_namespace: String,
    /// The mesh configuration (`istio` ConfigMap, `mesh` key, in the root namespace).
    pub mesh_config: crate::authz::ext_authz::MeshConfig,
    /// Inconsistencies found while indexing; the snapshot is usable, the operator is told.
    pub problems: Vec<String>,
    problem_parts: Problems,
    pod_by_ip: imbl::HashMap<IpAddr, Arc<Pod>>,
    service_by_vip: imbl::HashMap<IpAddr, Arc<Service>>,
    /// Each pod's AuthorizationPolicies, compiled on first use (few pods of a snapshot are
    /// ever a destination on this node). Keyed by the address of the snapshot's own `Pod`:
    /// only those are kept, and they live as long as the snapshot, so no other pod can be
    /// at that address.
    authorization_by_pod: RwLock<HashMap<usize, Arc<PolicySet>>>,
}

/// The maps a delta changes, taken from the snapshot before (sharing all their nodes).
struct ObjectMaps {
    namespaces: OrdMap<String, Arc<Namespace>>,
    pods: OrdMap<Key, Arc<Pod>>,
    services: OrdMap<Key, Arc<Service>>,
    pod_by_ip: imbl::HashMap<IpAddr, Arc<Pod>>,
    service_by_vip: imbl::HashMap<IpAddr, Arc<Service>>,
}

/// Whether `old` is the object a source says it removed (the same one, or an equal copy).
fn is<T: PartialEq>(old: &Arc<T>, removed: &Arc<T>) -> bool {
    Arc::ptr_eq(old, removed) || **old == **removed
}

impl ObjectMaps {
    /// Applies `delta`; `None` when it makes a conflict (a name or address claimed twice, a pod
    /// without its Namespace) or names an object the maps do not hold: who wins a conflict is
    /// decided by reading order, which only a full build sees.
    fn apply(mut self, delta: &Delta) -> Option<Self> {
        let (removed, added) = (&delta.removed, &delta.added);
        for ns in &removed.namespaces {
            if !self
                .namespaces
                .remove(&ns.name)
                .is_some_and(|old| is(&old, ns))
            {
                return None;
            }
        }
        for pod in &removed.pods {
            let old = self
                .pods
                .remove(&(pod.namespace.clone(), pod.name.clone()))
                .filter(|old| is(old, pod))?;
            if !old.host_network {
                for ip in &old.ips {
                    self.pod_by_ip.remove(ip).filter(|o| Arc::ptr_eq(o, &old))?;
                }
            }
        }
        for svc in &removed.services {
            let old = self
                .services
                .remove(&(svc.namespace.clone(), svc.name.clone()))
                .filter(|old| is(old, svc))?;
            for vip in &old.vips {
                self.service_by_vip
                    .remove(vip)
                    .filter(|o| Arc::ptr_eq(o, &old))?;
            }
        }
        for ns in &added.namespaces {
            if self
                .namespaces
                .insert(ns.name.clone(), ns.clone())
                .is_some()
            {
                return None;
            }
        }
        for pod in &added.pods {
            if !self.namespaces.contains_key(&pod.namespace) {
                return None;
            }
            let key = (pod.namespace.clone(), pod.name.clone());
            if self.pods.insert(key, pod.clone()).is_some() {
                return None;
            }
            if !pod.host_network {
                for ip in &pod.ips {
                    if self.pod_by_ip.insert(*ip, pod.clone()).is_some() {
                        return None;
                    }
                }
            }
        }
        for svc in &added.services {
            let key = (svc.namespace.clone(), svc.name.clone());
            if self.services.insert(key, svc.clone()).is_some() {
                return None;
            }
            for vip in &svc.vips {
                if self.service_by_vip.insert(*vip, svc.clone()).is_some() {
                    return None;
                }
            }
        }
        // A Namespace removed for good must take its pods along.
        for ns in &removed.namespaces {
            if !self.namespaces.contains_key(&ns.name)
                && self
                    .pods
                    .range((ns.name.clone(), String::new())..)
                    .next()
                    .is_some_and(|((pod_ns, _), _)| *pod_ns == ns.name)
            {
                return None;
            }
        }
        Some(self)
    }
}

impl Snapshot {
    /// Indexes `objects`. Duplicates and conflicts are resolved deterministically (the object
    /// read first keeps the name or address) and each is recorded in `problems`.
    pub fn build(generation: u64, mut objects: Objects, settings: &MeshSettings) -> Self {
        let mut s = Snapshot {
            generation,
            root_namespace: settings.root_namespace.clone(),
            ..Default::default()
        };
        let problems = &mut s.problem_parts.objects;
        for ns in std::mem::take(&mut objects.namespaces) {
            if let Some(first) = s.namespaces.get(&ns.name) {
                problems.push(format!(
                    "namespace {} is defined twice ({} and {}); the first one is used",
                    ns.name, first.origin, ns.origin
                ));
                continue;
            }
            s.namespaces.insert(ns.name.clone(), ns);
        }
        for pod in std::mem::take(&mut objects.pods) {
            let key = (pod.namespace.clone(), pod.name.clone());
            if let Some(first) = s.pods.get(&key) {
                problems.push(format!(
                    "pod {} is defined twice ({} and {}); the first one is used",
                    pod.workload(),
                    first.origin,
                    pod.origin
                ));
                continue;
            }
            if !s.namespaces.contains_key(&pod.namespace) {
                problems.push(format!(
                    "pod {} ({}) is in namespace {} which has no Namespace object; it is not enrolled",
                    pod.workload(),
                    pod.origin,
                    pod.namespace
                ));
            }
            if !pod.host_network {
                for ip in &pod.ips {
                    match s.pod_by_ip.get(ip) {
                        Some(owner) => problems.push(format!(
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
        for svc in std::mem::take(&mut objects.services) {
            let key = (svc.namespace.clone(), svc.name.clone());
            if let Some(first) = s.services.get(&key) {
                problems.push(format!(
                    "service {}/{} is defined twice ({} and {}); the first one is used",
                    svc.namespace, svc.name, first.origin, svc.origin
                ));
                continue;
            }
            for vip in &svc.vips {
                match s.service_by_vip.get(vip) {
                    Some(owner) => problems.push(format!(
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
        s.index_rules(objects.rest(), Touched::ALL, None);
        s
    }

    /// The snapshot after `delta`, sharing with `self` everything the delta does not touch:
    /// what it costs follows the size of the change, not of the cluster. `objects` are all
    /// the source's objects, the delta applied, as [`Snapshot::build`] would take them: the
    /// result is equal to that build's. A delta that makes or removes a conflict, and any
    /// delta to a snapshot that has one, is applied by that full build, since who wins a
    /// conflict depends on reading order.
    pub fn apply(
        &self,
        generation: u64,
        objects: Objects,
        delta: &Delta,
        settings: &MeshSettings,
    ) -> Self {
        self.apply_delta(generation, objects, delta, settings)
            .unwrap_or_else(|objects| Snapshot::build(generation, *objects, settings))
    }

    /// [`Snapshot::apply`] without the fall-back: `Err` gives `objects` back when only a
    /// full build can apply `delta`.
    pub(crate) fn apply_delta(
        &self,
        generation: u64,
        objects: Objects,
        delta: &Delta,
        settings: &MeshSettings,
    ) -> Result<Self, Box<Objects>> {
        if !self.problem_parts.objects.is_empty() || settings.root_namespace != self.root_namespace
        {
            return Err(Box::new(objects));
        }
        let maps = ObjectMaps {
            namespaces: self.namespaces.clone(),
            pods: self.pods.clone(),
            services: self.services.clone(),
            pod_by_ip: self.pod_by_ip.clone(),
            service_by_vip: self.service_by_vip.clone(),
        };
        let Some(maps) = maps.apply(delta) else {
            return Err(Box::new(objects));
        };
        let mut s = Snapshot {
            generation,
            namespaces: maps.namespaces,
            pods: maps.pods,
            services: maps.services,
            pod_by_ip: maps.pod_by_ip,
            service_by_vip: maps.service_by_vip,
            root_namespace: self.root_namespace.clone(),
            ..Default::default()
        };
        s.index_rules(objects.rest(), Touched::of(delta), Some(self));
        Ok(s)
    }

    /// Indexes the policies, traffic rules and other objects, and gathers the problems: what
    /// `touched` names anew, the rest shared with `before`.
    fn index_rules(&mut self, rest: Rest, touched: Touched, before: Option<&Snapshot>) {
        let mut problems = std::mem::take(&mut self.problem_parts);
        let before = |kind: bool| before.filter(|_| !kind);
        match before(touched.peer_authentications) {
            Some(b) => self.peer_authentications = b.peer_authentications.clone(),
            None => {
                self.peer_authentications =
                    Arc::new(PeerAuthentications::new(rest.peer_authentications))
            }
        }
        match before(touched.authorization_policies) {
            Some(b) => {
                self.authorization_policies = b.authorization_policies.clone();
                problems.authorization_policies = b.problem_parts.authorization_policies.clone();
            }
            None => {
                self.authorization_policies =
                    Arc::new(AuthorizationPolicies::new(rest.authorization_policies));
                problems.authorization_policies = self.authorization_policies.problems();
            }
        }
        match before(touched.request_authentications) {
            Some(b) => self.request_authentications = b.request_authentications.clone(),
            None => {
                self.request_authentications =
                    Arc::new(RequestAuthentications::new(rest.request_authentications))
            }
        }
        match before(touched.traffic || touched.services) {
            Some(b) => {
                self.traffic = b.traffic.share();
                problems.traffic = b.problem_parts.traffic.clone();
            }
            None => {
                self.traffic = TrafficIndex::build(
                    rest.virtual_services,
                    rest.destination_rules,
                    &self.services,
                    &mut problems.traffic,
                )
            }
        }
        match before(touched.peer_authentications || touched.pods) {
            Some(b) => problems.peer_authentications = b.problem_parts.peer_authentications.clone(),
            None => {
                // Only the pods of namespaces with PeerAuthentications can be selected by two.
                let pods = self.peer_authentications.namespaces().flat_map(|ns| {
                    self.pods
                        .range((ns.to_owned(), String::new())..)
                        .take_while(move |((pod_ns, _), _)| pod_ns == ns)
                        .map(|(_, pod)| pod)
                });
                problems.peer_authentications = self
                    .peer_authentications
                    .problems(&self.root_namespace, pods);
            }
        }
        self.other = rest.other;
        problems.mesh.extend(self.read_mesh_config());
        problems.mesh.extend(self.custom_provider_problems());
        self.problems = problems.joined();
        self.problem_parts = problems;
    }

    /// Reads Istio's mesh configuration from the `istio` ConfigMap of the root namespace. A bad
    /// one is reported and not used: CUSTOM policies then deny (their providers are unknown).
    fn read_mesh_config(&mut self) -> Option<String> {
        let cm = self.other.iter().find(|o| {
            o.api_version == "v1"
                && o.kind == "ConfigMap"
                && o.name == "istio"
                && o.namespace.as_deref() == Some(self.root_namespace.as_str())
        })?;
        let mesh = cm
            .body
            .get("data")
            .and_then(|d| d.get("mesh"))
            .and_then(|m| m.as_str())?;
        match crate::authz::ext_authz::MeshConfig::parse(mesh) {
            Ok(m) => {
                self.mesh_config = m;
                None
            }
            Err(e) => Some(format!(
                "ConfigMap {}/istio ({}): the mesh configuration is not used: {e}",
                self.root_namespace, cm.origin
            )),
        }
    }

    /// The pod that owns `ip` (host-network pods own no address).
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Arc<Pod>> {
        self.pod_by_ip.get(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `vec!` of shared objects, as a source hands them over.
    macro_rules! arcs {
        ($($e:expr),* $(,)?) => { vec![$(Arc::new($e)),*] };
    }
    use crate::model::{ContainerPort, Labels, Origin, ServicePort, TargetPort};

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
                app_protocol: None,
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
                namespaces: arcs![ns("shop", &[AMBIENT]), ns("legacy", &[])],
                pods: arcs![
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
                namespaces: arcs![ns("shop", &[AMBIENT])],
                pods: arcs![
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
                namespaces: arcs![ns("shop", &[]), ns("other", &[])],
                pods: arcs![
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
                services: arcs![
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
    fn a_pods_port_speaks_what_the_services_targeting_it_declare() {
        let port = |name: &str, app: Option<&str>, target: TargetPort| ServicePort {
            name: Some(name.into()),
            port: 80,
            target_port: target,
            app_protocol: app.map(str::to_owned),
        };
        let with_ports = |name: &str, sel: &[(&str, &str)], ports: Vec<ServicePort>| Service {
            ports,
            ..svc("shop", name, "10.96.0.1", sel, TargetPort::Number(0))
        };
        let web = &[("app", "web")];
        let snapshot = |services: Vec<Service>| {
            Snapshot::build(
                1,
                Objects {
                    namespaces: arcs![ns("shop", &[])],
                    pods: arcs![pod("shop", "w", "n1", "10.1.0.2", &[("app", "web")])],
                    services: services.into_iter().map(Arc::new).collect(),
                    ..Default::default()
                },
                &MeshSettings::default(),
            )
        };
        let declared = |s: &Snapshot, p: u16| {
            let w = &s.pods[&("shop".to_owned(), "w".to_owned())];
            s.declared_protocol(w, p)
        };
        use crate::model::AppProtocol::*;
        let s = snapshot(vec![with_ports(
            "db",
            web,
            vec![
                port("tcp-db", None, TargetPort::Number(3000)),
                // By the container port's name (`http` is 8080 in `pod`).
                port(
                    "web",
                    Some("kubernetes.io/h2c"),
                    TargetPort::Name("http".into()),
                ),
                port("other", None, TargetPort::Number(7000)),
            ],
        )]);
        assert_eq!(declared(&s, 3000), Some(Tcp));
        assert_eq!(declared(&s, 8080), Some(Http2));
        assert_eq!(declared(&s, 7000), None, "undeclared: sniffed");
        assert_eq!(declared(&s, 9999), None, "no Service targets it");

        // Another Service that selects the pod: agreeing on the reading (both opaque) keeps
        // the declaration, one that declares nothing does not count, a disagreement sniffs.
        let services = vec![
            with_ports("a", web, vec![port("tcp", None, TargetPort::Number(3000))]),
            with_ports(
                "b",
                web,
                vec![port("mysql", None, TargetPort::Number(3000))],
            ),
            with_ports("c", web, vec![port("x", None, TargetPort::Number(3000))]),
            with_ports("d", web, vec![port("http", None, TargetPort::Number(7000))]),
            with_ports("e", web, vec![port("grpc", None, TargetPort::Number(7000))]),
            // Selects nothing here: does not count.
            with_ports(
                "f",
                &[("app", "db")],
                vec![port("http", None, TargetPort::Number(3000))],
            ),
        ];
        let s = snapshot(services.clone());
        assert_eq!(declared(&s, 3000), Some(Tcp));
        assert_eq!(declared(&s, 7000), Some(Http), "both are read as HTTP");
        let mut disagreeing = services;
        disagreeing.push(with_ports(
            "g",
            web,
            vec![port("http", None, TargetPort::Number(3000))],
        ));
        let s = snapshot(disagreeing);
        assert_eq!(
            declared(&s, 3000),
            None,
            "HTTP and opaque disagree: sniffed"
        );
    }

    #[test]
    fn vip_collisions_are_reported() {
        let s = Snapshot::build(
            1,
            Objects {
                services: arcs![
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
