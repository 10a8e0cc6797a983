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
mod enrolment;
mod policy;
mod services;
mod traffic;

use std::{
    collections::{btree_map, hash_map, BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, OnceLock},
};

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
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
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
    /// VirtualServices and DestinationRules, indexed against the Services.
    pub traffic: TrafficIndex,
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
            s.namespaces.insert(ns.name.clone(), ns);
        }
        s.pod_by_ip.reserve(objects.pods.len());
        s.service_by_vip.reserve(objects.services.len());
        for pod in objects.pods {
            let key = (pod.namespace.clone(), pod.name.clone());
            let slot = match s.pods.entry(key) {
                btree_map::Entry::Occupied(first) => {
                    s.problems.push(format!(
                        "pod {} is defined twice ({} and {}); the first one is used",
                        pod.workload(),
                        first.get().origin,
                        pod.origin
                    ));
                    continue;
                }
                btree_map::Entry::Vacant(slot) => slot,
            };
            if !s.namespaces.contains_key(&pod.namespace) {
                s.problems.push(format!(
                    "pod {} ({}) is in namespace {} which has no Namespace object; it is not enrolled",
                    pod.workload(),
                    pod.origin,
                    pod.namespace
                ));
            }
            if !pod.host_network {
                for ip in &pod.ips {
                    match s.pod_by_ip.entry(*ip) {
                        hash_map::Entry::Occupied(owner) => {
                            let owner = owner.get();
                            s.problems.push(format!(
                            "pods {} ({}) and {} ({}) both claim IP {ip}; it stays with {} and {} is not enrolled",
                            owner.workload(),
                            owner.origin,
                            pod.workload(),
                            pod.origin,
                            owner.workload(),
                            pod.workload()
                        ))
                        }
                        hash_map::Entry::Vacant(free) => {
                            free.insert(pod.clone());
                        }
                    }
                }
            }
            slot.insert(pod);
        }
        for svc in objects.services {
            let key = (svc.namespace.clone(), svc.name.clone());
            let slot = match s.services.entry(key) {
                btree_map::Entry::Occupied(first) => {
                    s.problems.push(format!(
                        "service {}/{} is defined twice ({} and {}); the first one is used",
                        svc.namespace,
                        svc.name,
                        first.get().origin,
                        svc.origin
                    ));
                    continue;
                }
                btree_map::Entry::Vacant(slot) => slot,
            };
            for vip in &svc.vips {
                match s.service_by_vip.entry(*vip) {
                    hash_map::Entry::Occupied(owner) => {
                        let owner = owner.get();
                        s.problems.push(format!(
                        "services {}/{} and {}/{} both claim cluster IP {vip}; it stays with {}/{}",
                        owner.namespace,
                        owner.name,
                        svc.namespace,
                        svc.name,
                        owner.namespace,
                        owner.name
                    ))
                    }
                    hash_map::Entry::Vacant(free) => {
                        free.insert(svc.clone());
                    }
                }
            }
            slot.insert(svc);
        }
        s.traffic = TrafficIndex::build(
            objects.virtual_services,
            objects.destination_rules,
            &s.services,
            &mut s.problems,
        );
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
