//! [`Snapshot::apply`] against [`Snapshot::build`]: random sequences of changes to a
//! directory-like source (files edited, added, removed, rewritten unchanged), each applied
//! as a delta to the snapshot before and built whole from all objects; every lookup the data
//! path makes must answer the same from both.
use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use super::*;
use crate::model::{ContainerPort, Labels, Origin, ServicePort, TargetPort};
use crate::traffic::{virtual_service::Source, SourceWorkload};

/// Defined by the base file; `ghost` only now and then, by the others (so its pods come and go
/// between enrolled and a conflict).
const NAMESPACES: [&str; 4] = ["istio-system", "a", "b", "c"];
const POD_NAMESPACES: [&str; 5] = ["istio-system", "a", "b", "c", "ghost"];
/// Services `s0`..; rules name the first few.
const SERVICES: u16 = 100;
const NAMED_BY_RULES: u16 = 8;
const BASE: &str = "base.yaml";
const APPS: [&str; 3] = ["web", "db", "api"];
const PORTS: [u16; 3] = [80, 8080, 9090];

/// One object of a file, as parameters: "parsing" it makes a new object, equal each time.
#[derive(Clone, Debug)]
enum Spec {
    Namespace {
        ns: usize,
        ambient: bool,
    },
    Pod {
        ns: usize,
        name: u16,
        ip: u16,
        app: usize,
        version: u8,
        node: u8,
        host_network: bool,
    },
    Service {
        ns: usize,
        name: u16,
        vip: u16,
        app: usize,
        named_target: bool,
    },
    Authorization {
        ns: usize,
        name: u8,
        template: u8,
    },
    Peer {
        ns: usize,
        name: u8,
        template: u8,
    },
    RequestAuthn {
        ns: usize,
        name: u8,
        app: usize,
    },
    VirtualService {
        ns: usize,
        name: u8,
        to_ns: usize,
        to: u16,
        subset: bool,
    },
    DestinationRule {
        ns: usize,
        name: u8,
        to_ns: usize,
        to: u16,
    },
    MeshConfig {
        good: bool,
    },
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

impl Spec {
    fn random(rng: &mut fastrand::Rng) -> Spec {
        match rng.u8(0..100) {
            // Mostly `ghost`; else a Namespace defined twice (a conflict).
            0..2 => Spec::Namespace {
                ns: if rng.u8(0..4) == 0 {
                    rng.usize(0..NAMESPACES.len())
                } else {
                    POD_NAMESPACES.len() - 1
                },
                ambient: rng.bool(),
            },
            2..50 => Spec::Pod {
                // Seldom in the namespace without its Namespace (a conflict).
                ns: match rng.usize(0..150) {
                    0 => POD_NAMESPACES.len() - 1,
                    n => n % NAMESPACES.len(),
                },
                name: rng.u16(0..1000),
                ip: rng.u16(0..3000),
                app: rng.usize(0..APPS.len()),
                version: rng.u8(1..3),
                node: rng.u8(1..3),
                host_network: rng.u8(0..20) == 0,
            },
            50..64 => Spec::Service {
                ns: rng.usize(1..NAMESPACES.len()),
                name: rng.u16(0..SERVICES),
                vip: rng.u16(0..2000),
                app: rng.usize(0..APPS.len()),
                named_target: rng.bool(),
            },
            64..74 => Spec::Authorization {
                ns: rng.usize(0..NAMESPACES.len()),
                name: rng.u8(0..6),
                template: rng.u8(0..5),
            },
            74..80 => Spec::Peer {
                ns: rng.usize(0..NAMESPACES.len()),
                name: rng.u8(0..4),
                template: rng.u8(0..4),
            },
            80..84 => Spec::RequestAuthn {
                ns: rng.usize(1..NAMESPACES.len()),
                name: rng.u8(0..3),
                app: rng.usize(0..APPS.len()),
            },
            84..92 => Spec::VirtualService {
                ns: rng.usize(0..NAMESPACES.len()),
                name: rng.u8(0..4),
                to_ns: rng.usize(1..NAMESPACES.len()),
                to: rng.u16(0..NAMED_BY_RULES),
                subset: rng.bool(),
            },
            92..98 => Spec::DestinationRule {
                ns: rng.usize(0..NAMESPACES.len()),
                name: rng.u8(0..4),
                to_ns: rng.usize(1..NAMESPACES.len()),
                to: rng.u16(0..NAMED_BY_RULES),
            },
            _ => Spec::MeshConfig { good: rng.bool() },
        }
    }

    /// Adds the object to `out`, as parsing it from `file` at `line` would.
    fn parse(&self, file: &str, line: usize, out: &mut Objects) {
        let origin = Origin {
            file: file.into(),
            line,
        };
        match *self {
            Spec::Namespace { ns, ambient } => out.namespaces.push(Arc::new(Namespace {
                name: POD_NAMESPACES[ns].into(),
                labels: if ambient {
                    labels(&[("istio.io/dataplane-mode", "ambient")])
                } else {
                    Labels::new()
                },
                origin,
            })),
            Spec::Pod {
                ns,
                name,
                ip,
                app,
                version,
                node,
                host_network,
            } => out.pods.push(Arc::new(Pod {
                namespace: POD_NAMESPACES[ns].into(),
                name: format!("p{name}"),
                uid: format!("uid-{ns}-{name}"),
                labels: labels(&[("app", APPS[app]), ("version", &format!("v{version}"))]),
                annotations: Labels::new(),
                service_account: APPS[app].into(),
                node_name: Some(format!("n{node}")),
                host_network,
                ips: vec![format!("10.1.{}.{}", ip / 256, ip % 256).parse().unwrap()],
                netns_path: None,
                container_ports: vec![ContainerPort {
                    name: Some("http".into()),
                    port: 8080 + u16::from(version),
                }],
                origin,
            })),
            Spec::Service {
                ns,
                name,
                vip,
                app,
                named_target,
            } => out.services.push(Arc::new(Service {
                namespace: NAMESPACES[ns].into(),
                name: format!("s{name}"),
                vips: vec![format!("10.96.{}.{}", vip / 256, vip % 256)
                    .parse()
                    .unwrap()],
                selector: labels(&[("app", APPS[app])]),
                ports: vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: if named_target {
                        TargetPort::Name("http".into())
                    } else {
                        TargetPort::Number(8080)
                    },
                    app_protocol: None,
                }],
                origin,
            })),
            Spec::Authorization { ns, name, template } => {
                let spec = match template {
                    0 => "selector: {matchLabels: {app: web}}\naction: ALLOW\nrules:\n- from: [{source: {principals: [\"cluster.local/ns/a/*\"]}}]\n".to_owned(),
                    1 => "action: DENY\nrules:\n- from: [{source: {namespaces: [\"b*\"]}}]\n".to_owned(),
                    2 => "selector: {matchLabels: {app: db}}\nrules:\n- from: [{source: {ipBlocks: [\"10.1.0.0/24\"]}}]\n".to_owned(),
                    3 => "targetRefs: [{kind: Service, group: \"\", name: s1}]\naction: ALLOW\nrules:\n- to: [{operation: {ports: [\"8080\"]}}]\n".to_owned(),
                    _ => "selector: {matchLabels: {app: api}}\naction: CUSTOM\nprovider: {name: authz}\nrules: [{}]\n".to_owned(),
                };
                let doc: crate::authz::authorization_policy::SpecDoc = yaml(&spec);
                let p = doc
                    .into_policy(NAMESPACES[ns].into(), format!("ap{name}"), origin)
                    .unwrap();
                out.authorization_policies.push(Arc::new(p));
            }
            Spec::Peer { ns, name, template } => {
                let spec = match template {
                    0 => "mtls: {mode: STRICT}\n",
                    1 => "mtls: {mode: PERMISSIVE}\n",
                    2 => "selector: {matchLabels: {app: web}}\nmtls: {mode: STRICT}\nportLevelMtls:\n  8081: {mode: PERMISSIVE}\n",
                    _ => "selector: {matchLabels: {version: v2}}\nmtls: {mode: DISABLE}\n",
                };
                let doc: crate::authz::peer_authentication::SpecDoc = yaml(spec);
                let p = doc
                    .into_policy(NAMESPACES[ns].into(), format!("pa{name}"), None, origin)
                    .unwrap();
                out.peer_authentications.push(Arc::new(p));
            }
            Spec::RequestAuthn { ns, name, app } => {
                let spec = format!(
                    "selector: {{matchLabels: {{app: {}}}}}\njwtRules:\n- issuer: issuer-{name}\n  jwks: '{{\"keys\":[]}}'\n",
                    APPS[app]
                );
                let doc: crate::authz::request_authentication::SpecDoc = yaml(&spec);
                let p = doc
                    .into_policy(NAMESPACES[ns].into(), format!("ra{name}"), origin)
                    .unwrap();
                out.request_authentications.push(Arc::new(p));
            }
            Spec::VirtualService {
                ns,
                name,
                to_ns,
                to,
                subset,
            } => {
                let host = format!("s{to}.{}.svc.cluster.local", NAMESPACES[to_ns]);
                let spec = if subset {
                    format!("hosts: [{host}]\nhttp:\n- route:\n  - {{destination: {{host: {host}, subset: v1}}, weight: 70}}\n  - {{destination: {{host: {host}, subset: v2}}, weight: 30}}\n")
                } else {
                    format!("hosts: [{host}]\ntcp:\n- route: [{{destination: {{host: {host}, port: {{number: 80}}}}}}]\n")
                };
                let doc: crate::traffic::virtual_service::SpecDoc = yaml(&spec);
                let vs = doc
                    .into_virtual_service(NAMESPACES[ns].into(), format!("vs{name}"), None, origin)
                    .unwrap();
                out.virtual_services.push(Arc::new(vs));
            }
            Spec::DestinationRule {
                ns,
                name,
                to_ns,
                to,
            } => {
                let host = format!("s{to}.{}.svc.cluster.local", NAMESPACES[to_ns]);
                let spec = format!("host: {host}\nsubsets:\n- name: v1\n  labels: {{version: v1}}\n- name: v2\n  labels: {{version: v2}}\n");
                let doc: crate::traffic::destination_rule::SpecDoc = yaml(&spec);
                let dr = doc
                    .into_destination_rule(NAMESPACES[ns].into(), format!("dr{name}"), None, origin)
                    .unwrap();
                out.destination_rules.push(Arc::new(dr));
            }
            Spec::MeshConfig { good } => {
                let mesh = if good {
                    "extensionProviders: [{name: authz, envoyExtAuthzHttp: {service: s0.a.svc.cluster.local, port: 80}}]"
                } else {
                    "extensionProviders: 5"
                };
                out.other.push(OtherObject {
                    api_version: "v1".into(),
                    kind: "ConfigMap".into(),
                    namespace: Some("istio-system".into()),
                    name: "istio".into(),
                    body: yaml(&format!("data: {{mesh: {mesh:?}}}")),
                    origin,
                });
            }
        }
    }
}

/// A source of files read in name order, as the directory source reads them.
#[derive(Default)]
struct Files {
    specs: BTreeMap<String, Vec<Spec>>,
    /// Each file's objects as last "parsed".
    parsed: BTreeMap<String, Objects>,
    next_file: usize,
}

fn parse_file(name: &str, specs: &[Spec]) -> Objects {
    let mut out = Objects::default();
    for (i, s) in specs.iter().enumerate() {
        s.parse(name, i + 1, &mut out);
    }
    out
}

impl Files {
    fn all(&self) -> Objects {
        let mut all = Objects::default();
        for parsed in self.parsed.values() {
            all.extend_from(parsed);
        }
        all
    }

    fn add_file(&mut self, rng: &mut fastrand::Rng, delta: &mut Delta) {
        let name = format!("f{:03}.yaml", self.next_file);
        self.next_file += 1;
        let specs: Vec<Spec> = (0..rng.usize(1..6)).map(|_| Spec::random(rng)).collect();
        let parsed = parse_file(&name, &specs);
        delta.added.extend_from(&parsed);
        self.specs.insert(name.clone(), specs);
        self.parsed.insert(name, parsed);
    }

    /// The Namespaces every other file's objects live in.
    fn add_base(&mut self, delta: &mut Delta) {
        let specs: Vec<Spec> = (0..NAMESPACES.len())
            .map(|ns| Spec::Namespace { ns, ambient: true })
            .collect();
        let parsed = parse_file(BASE, &specs);
        delta.added.extend_from(&parsed);
        self.specs.insert(BASE.into(), specs);
        self.parsed.insert(BASE.into(), parsed);
    }

    /// One random change, recorded in `delta` as the directory source records it.
    fn change(&mut self, rng: &mut fastrand::Rng, delta: &mut Delta) {
        let names: Vec<String> = self.specs.keys().cloned().collect();
        if names.len() < 2 || rng.u8(0..10) == 0 {
            return self.add_file(rng, delta);
        }
        let name = names[rng.usize(0..names.len())].clone();
        let specs = self.specs.get_mut(&name).unwrap();
        if name == BASE {
            // A Namespace relabelled, or (seldom) gone with its pods, and back.
            let i = rng.usize(0..specs.len());
            if rng.u8(0..8) != 0 {
                if let Spec::Namespace { ambient, .. } = &mut specs[i] {
                    *ambient = !*ambient;
                }
            } else if specs.len() == NAMESPACES.len() {
                specs.remove(i);
            } else {
                *specs = (0..NAMESPACES.len())
                    .map(|ns| Spec::Namespace { ns, ambient: true })
                    .collect();
            }
            let mut parsed = parse_file(&name, specs);
            delta.record(&self.parsed[&name], &mut parsed);
            self.parsed.insert(name, parsed);
            return;
        }
        match rng.u8(0..20) {
            0 => {
                self.specs.remove(&name);
                delta
                    .removed
                    .extend_from(&self.parsed.remove(&name).unwrap());
                return;
            }
            // Rewritten unchanged.
            1 => {}
            2..8 if !specs.is_empty() => {
                let i = rng.usize(0..specs.len());
                specs.remove(i);
            }
            8..14 => {
                let i = rng.usize(0..=specs.len());
                specs.insert(i, Spec::random(rng));
            }
            _ if !specs.is_empty() => {
                // The same object changed in one field, most of the time; else another.
                let i = rng.usize(0..specs.len());
                match &mut specs[i] {
                    Spec::Pod {
                        ip,
                        app,
                        version,
                        node,
                        ..
                    } => match rng.u8(0..4) {
                        0 => *ip = rng.u16(0..3000),
                        1 => {
                            *app = rng.usize(0..APPS.len());
                            *version = rng.u8(1..3);
                        }
                        _ => {
                            *version = 3 - *version;
                            *node = 3 - *node;
                        }
                    },
                    Spec::Service {
                        vip,
                        app,
                        named_target,
                        ..
                    } => {
                        if rng.bool() {
                            *vip = rng.u16(0..2000);
                        }
                        if rng.bool() {
                            *app = rng.usize(0..APPS.len());
                        }
                        *named_target = rng.bool();
                    }
                    other => *other = Spec::random(rng),
                }
            }
            _ => specs.push(Spec::random(rng)),
        }
        let mut parsed = parse_file(&name, specs);
        delta.record(&self.parsed[&name], &mut parsed);
        self.parsed.insert(name, parsed);
    }
}

/// Everything the data path (enrolment, admission, routing, the route check) asks a snapshot,
/// asked of both.
pub(crate) fn assert_same(applied: &Snapshot, built: &Snapshot, step: &str) {
    assert_eq!(applied.generation, built.generation, "{step}");
    assert_eq!(applied.namespaces, built.namespaces, "{step}: namespaces");
    assert_eq!(applied.pods, built.pods, "{step}: pods");
    assert_eq!(applied.services, built.services, "{step}: services");
    assert_eq!(applied.problems, built.problems, "{step}: problems");
    for s in [applied, built] {
        // The address indexes hold the snapshot's own objects: endpoints compare by pointer.
        for (ip, pod) in &s.pod_by_ip {
            let own = &s.pods[&(pod.namespace.clone(), pod.name.clone())];
            assert!(Arc::ptr_eq(own, pod), "{step}: {ip} points at an old pod");
        }
        for (vip, svc) in &s.service_by_vip {
            let own = &s.services[&(svc.namespace.clone(), svc.name.clone())];
            assert!(
                Arc::ptr_eq(own, svc),
                "{step}: {vip} points at an old Service"
            );
        }
    }
    let by_ip = |s: &Snapshot| {
        let mut v: Vec<_> = s
            .pod_by_ip
            .iter()
            .map(|(ip, p)| (*ip, p.workload()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(by_ip(applied), by_ip(built), "{step}: pods by IP");
    let by_vip = |s: &Snapshot| {
        let mut v: Vec<_> = s
            .service_by_vip
            .iter()
            .map(|(ip, s)| (*ip, format!("{}/{}", s.namespace, s.name)))
            .collect();
        v.sort();
        v
    };
    assert_eq!(by_vip(applied), by_vip(built), "{step}: Services by VIP");
    let ids = |s: &Snapshot| {
        (
            s.peer_authentications
                .iter()
                .map(|p| p.id())
                .collect::<Vec<_>>(),
            s.authorization_policies
                .iter()
                .map(|p| p.id())
                .collect::<Vec<_>>(),
            s.request_authentications
                .iter()
                .map(|p| p.id())
                .collect::<Vec<_>>(),
            s.traffic
                .virtual_services
                .iter()
                .map(|v| v.id())
                .collect::<Vec<_>>(),
            s.traffic
                .destination_rules
                .iter()
                .map(|d| d.id())
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(ids(applied), ids(built), "{step}: policy and rule indexes");
    assert_eq!(
        format!("{:?}", applied.other),
        format!("{:?}", built.other),
        "{step}"
    );
    let enrol = EnrolmentPolicy::default();
    for (key, pa) in &applied.pods {
        let pb = &built.pods[key];
        let at = format!("{step}: pod {}/{}", key.0, key.1);
        assert_eq!(
            applied.enrolment(pa, "n1", &enrol),
            built.enrolment(pb, "n1", &enrol),
            "{at}"
        );
        assert_eq!(
            applied.in_mesh(pa, &enrol),
            built.in_mesh(pb, &enrol),
            "{at}"
        );
        let authz = |s: &Snapshot, p: &Pod| {
            let ids = |set: &PolicySet| set.policies().iter().map(|p| p.id()).collect::<Vec<_>>();
            // Twice: compiled, then from the snapshot's cache.
            (ids(&s.authorization_for(p)), ids(&s.authorization_for(p)))
        };
        assert_eq!(authz(applied, pa), authz(built, pb), "{at}: authorization");
        let authn = |s: &Snapshot, p: &Pod| {
            s.request_authentications_for(p)
                .iter()
                .map(|r| r.id())
                .collect::<Vec<_>>()
        };
        assert_eq!(authn(applied, pa), authn(built, pb), "{at}: authentication");
        for port in PORTS.into_iter().chain([8081, 8082]) {
            assert_eq!(
                applied.mtls_mode(pa, port),
                built.mtls_mode(pb, port),
                "{at}:{port} mTLS"
            );
            assert_eq!(
                applied.declared_protocol(pa, port),
                built.declared_protocol(pb, port),
                "{at}:{port} protocol"
            );
            let names = |v: Vec<Arc<Service>>| v.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
            assert_eq!(
                names(applied.services_of(pa, port)),
                names(built.services_of(pb, port)),
                "{at}:{port} Services"
            );
        }
    }
    let sources: Vec<(&str, Labels)> = NAMESPACES
        .iter()
        .flat_map(|ns| APPS.iter().map(move |app| (*ns, labels(&[("app", app)]))))
        .collect();
    for (key, sa) in &applied.services {
        let sb = &built.services[key];
        let at = format!("{step}: Service {}/{}", key.0, key.1);
        let endpoints = |s: &Snapshot, svc: &Service| {
            s.endpoints(svc, 80)
                .iter()
                .map(|e| (e.pod.workload(), e.addr))
                .collect::<Vec<_>>()
        };
        assert_eq!(endpoints(applied, sa), endpoints(built, sb), "{at}");
        for (ns, l) in &sources {
            let src = Source {
                namespace: ns,
                labels: l,
            };
            let sel = |s: &Snapshot, svc: &Service| {
                let sel = s.virtual_service_for(ns, svc);
                (
                    sel.chosen.map(|v| v.id()),
                    sel.shadowed.iter().map(|v| v.id()).collect::<Vec<_>>(),
                    s.destination_rule_for(&src, svc).map(|d| d.id()),
                )
            };
            assert_eq!(sel(applied, sa), sel(built, sb), "{at} from {ns}");
            let cluster = |s: &Snapshot, svc: &Service| {
                let d = Snapshot::default_destination(svc, 80);
                s.resolve_destination(&src, &d, 80).map(|c| {
                    let eps: Vec<_> = s
                        .cluster_endpoints(&c)
                        .iter()
                        .map(|e| (e.pod.workload(), e.addr))
                        .collect();
                    (format!("{c:?}"), eps)
                })
            };
            assert_eq!(
                format!("{:?}", cluster(applied, sa)),
                format!("{:?}", cluster(built, sb)),
                "{at} from {ns}: cluster"
            );
            let tcp = |s: &Snapshot, svc: &Service| {
                let dst = SocketAddr::new(svc.vips[0], 80);
                let w = SourceWorkload {
                    namespace: ns,
                    labels: l,
                };
                format!("{:?}", s.tcp_route(w, svc, dst))
            };
            assert_eq!(
                tcp(applied, sa),
                tcp(built, sb),
                "{at} from {ns}: TCP route"
            );
        }
    }
}

/// How many steps took each way, to show both are exercised.
#[derive(Debug, Default)]
struct Ways {
    incremental: usize,
    full: usize,
}

fn run(seed: u64, steps: usize, ways: &mut Ways) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let settings = MeshSettings::default();
    let mut files = Files::default();
    let mut ignored = Delta::default();
    files.add_base(&mut ignored);
    for _ in 0..8 {
        files.add_file(&mut rng, &mut ignored);
    }
    let mut snapshot = Snapshot::build(1, files.all(), &settings);
    for step in 0..steps {
        let mut delta = Delta::default();
        for _ in 0..rng.usize(1..3) {
            files.change(&mut rng, &mut delta);
        }
        let generation = step as u64 + 2;
        let built = Snapshot::build(generation, files.all(), &settings);
        let applied = match snapshot.apply_delta(generation, files.all(), &delta, &settings) {
            Ok(s) => {
                ways.incremental += 1;
                s
            }
            Err(objects) => {
                ways.full += 1;
                Snapshot::build(generation, *objects, &settings)
            }
        };
        assert_same(&applied, &built, &format!("seed {seed} step {step}"));
        snapshot = applied;
    }
}

#[test]
fn applying_deltas_answers_as_building_whole() {
    let mut ways = Ways::default();
    for seed in 0..48 {
        run(seed, 80, &mut ways);
    }
    eprintln!("{ways:?}");
    // Both ways must be exercised for the comparison to mean anything.
    assert!(
        ways.incremental > 1000 && ways.full > 200,
        "{ways:?}: the generator no longer exercises both ways"
    );
}
