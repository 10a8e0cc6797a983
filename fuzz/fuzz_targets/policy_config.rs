//! The configuration file parser and the policy decisions made from what it accepts.
//!
//! Input: one configuration file (bytes, read as the proxy reads a file, invalid UTF-8
//! replaced). What parses is indexed into a snapshot as the proxy does, then every pod (up to a
//! few) is a destination for calls from mTLS peers (the pods' own identities, the principals the
//! policies name and peers of the namespaces they name) and from plaintext clients, from
//! addresses inside and just outside the policies' IP blocks, at L4 and as HTTP requests built
//! from the values the policies match on, through `admit` (the proxy's decision) and
//! `policy check` (the CLI's).
//!
//! Nothing may panic; bad files are errors. A decision made at connection time without the
//! HTTP request (not deferred to L7) must be the decision for every request on it, and every
//! decision must equal that of a full scan of the policies (no caller index).
#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
};

use libfuzzer_sys::fuzz_target;
use ztunnel::{
    authz::{
        admit,
        authorization_policy::{IpBlock, StrMatch},
        evaluate, Admission, Attributes, HttpRequest, InboundCall, PolicySet, RequestAuth,
        Transport, Unknowns, Verdict,
    },
    identity::SpiffeId,
    model::Pod,
    policy_check::{check, Caller, CheckRequest},
    state::{EnrolmentPolicy, MeshSettings, Objects, Snapshot},
};

/// Bounds per input, so one large file cannot make a slow unit.
const MAX_PODS: usize = 6;
const MAX_PEERS: usize = 4;
const MAX_VALUES: usize = 4;

/// A value `m` matches, or (`miss`) one it does not, to aim requests at the rules.
fn sample(m: &StrMatch, miss: bool) -> String {
    match (m, miss) {
        (StrMatch::Exact(s), false) => s.clone(),
        (StrMatch::Prefix(s), false) => format!("{s}x"),
        (StrMatch::Suffix(s), false) => format!("x{s}"),
        (StrMatch::Presence, false) => "x".into(),
        (StrMatch::Exact(s) | StrMatch::Prefix(s) | StrMatch::Suffix(s), true) => format!("~{s}"),
        (StrMatch::Presence, true) => String::new(),
    }
}

/// An address just outside `block` (its first bit past the prefix flipped), or beside it for a
/// single address.
fn outside(block: &IpBlock) -> IpAddr {
    let flip = |octets: &mut [u8]| {
        let bit = (block.prefix as usize).min(octets.len() * 8 - 1);
        octets[bit / 8] ^= 0x80 >> (bit % 8);
    };
    match block.addr {
        IpAddr::V4(a) => {
            let mut o = a.octets();
            flip(&mut o);
            IpAddr::from(o)
        }
        IpAddr::V6(a) => {
            let mut o = a.octets();
            flip(&mut o);
            IpAddr::from(o)
        }
    }
}

/// Strings the policies match on, by attribute, to build callers and requests that hit them.
#[derive(Default)]
struct Probes {
    principals: Vec<String>,
    /// Namespaces of `namespaces` (callers are peers of them) and of `serviceAccounts`.
    namespaces: Vec<String>,
    /// Source addresses inside and just outside the `ipBlocks` and `remoteIpBlocks`.
    ips: Vec<IpAddr>,
    request_principals: Vec<String>,
    methods: Vec<String>,
    paths: Vec<String>,
    hosts: Vec<String>,
    ports: Vec<u16>,
}

impl Probes {
    fn from(snapshot: &Snapshot) -> Self {
        let mut p = Probes::default();
        let add = |list: &mut Vec<String>, values: &[StrMatch]| {
            for (i, m) in values.iter().enumerate() {
                if list.len() < MAX_VALUES {
                    list.push(sample(m, i % 2 == 1));
                }
            }
        };
        for policy in snapshot.authorization_policies.iter() {
            for rule in &policy.rules {
                for s in &rule.from {
                    add(&mut p.principals, &s.principals.any_of);
                    add(&mut p.principals, &s.principals.none_of);
                    add(&mut p.namespaces, &s.namespaces.any_of);
                    add(&mut p.namespaces, &s.namespaces.none_of);
                    for b in [&s.ip_blocks, &s.remote_ip_blocks]
                        .into_iter()
                        .flat_map(|v| v.any_of.iter().chain(&v.none_of))
                    {
                        if p.ips.len() < MAX_VALUES {
                            p.ips.push(b.addr);
                            p.ips.push(outside(b));
                        }
                    }
                    add(&mut p.request_principals, &s.request_principals.any_of);
                }
                for o in &rule.to {
                    add(&mut p.methods, &o.methods.any_of);
                    add(&mut p.paths, &o.paths.any_of);
                    add(&mut p.paths, &o.paths.none_of);
                    add(&mut p.hosts, &o.hosts.any_of);
                    for port in o.ports.any_of.iter().chain(&o.ports.none_of) {
                        if p.ports.len() < MAX_VALUES {
                            p.ports.push(*port);
                        }
                    }
                }
            }
        }
        p
    }
}

/// HTTP requests to try: a plain one, then the policies' own values.
fn requests(probes: &Probes) -> Vec<HttpRequest> {
    let mut out = vec![HttpRequest {
        method: "GET".into(),
        path: "/".into(),
        host: "web.shop.svc.cluster.local".into(),
        headers: vec![("user-agent".into(), "fuzz".into())],
        auth: None,
    }];
    let n = probes
        .methods
        .len()
        .max(probes.paths.len())
        .max(probes.hosts.len())
        .max(probes.request_principals.len());
    let pick = |list: &[String], i: usize, default: &str| {
        list.get(i).cloned().unwrap_or_else(|| default.to_owned())
    };
    for i in 0..n {
        let principal = probes.request_principals.get(i);
        out.push(HttpRequest {
            method: pick(&probes.methods, i, "POST"),
            path: pick(&probes.paths, i, "/api/items"),
            host: pick(&probes.hosts, i, "web"),
            headers: vec![
                ("x-user".into(), pick(&probes.paths, i, "alice")),
                ("content-type".into(), "application/json".into()),
            ],
            auth: principal.map(|p| RequestAuth {
                principal: p.clone(),
                audiences: vec!["webapp".into()],
                presenter: Some("cli".into()),
                claims: serde_json::json!({"iss": p, "sub": "alice", "groups": ["admin"]}),
            }),
        });
    }
    out
}

/// The decision at connection time, when it does not wait for the HTTP request.
fn decided(v: &Verdict) -> Option<bool> {
    match v {
        Verdict::Decided(d) => Some(d.allowed),
        _ => None,
    }
}

fn exercise(snapshot: &Snapshot) {
    let probes = Probes::from(snapshot);
    let requests = requests(&probes);
    let pods: Vec<_> = snapshot.pods.values().take(MAX_PODS).collect();
    // Callers: the pods' own identities (as `policy check` and the proxy name them) and the
    // principals the policies name.
    let mut peers: Vec<SpiffeId> = pods
        .iter()
        .filter_map(|p| SpiffeId::new("cluster.local", &p.namespace, &p.service_account).ok())
        .take(MAX_PEERS)
        .collect();
    peers.extend(
        probes
            .principals
            .iter()
            .filter_map(|p| format!("spiffe://{p}").parse().ok()),
    );
    peers.extend(
        probes
            .namespaces
            .iter()
            .filter_map(|ns| SpiffeId::new("cluster.local", ns, "fuzz").ok()),
    );
    // Source addresses: one outside every block, then those the policies' blocks name, each
    // call taking the next, so the number of calls does not grow with them.
    let mut sources = vec![IpAddr::V4(Ipv4Addr::new(10, 9, 0, 7))];
    sources.extend(&probes.ips);
    let enrolment = EnrolmentPolicy::default();

    for pod in &pods {
        let _ = snapshot.enrolment(pod, "node-1", &enrolment);
        let ip = pod
            .ips
            .first()
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 2)));
        let mut ports: Vec<u16> = pod.container_ports.iter().map(|c| c.port).take(2).collect();
        ports.extend(probes.ports.iter().take(2));
        ports.push(8080);
        for &port in &ports {
            let _ = snapshot.mtls_mode(pod, port);
            let destination = SocketAddr::new(ip, port);
            let source = |i: usize| Some(sources[i % sources.len()]);
            let calls = sources
                .iter()
                .map(|ip| InboundCall::new(Transport::Plaintext, None, Some(*ip), destination))
                .chain(peers.iter().enumerate().map(|(i, id)| {
                    InboundCall::new(Transport::Mesh, Some(id), source(i), destination)
                }));
            for call in calls {
                decide(snapshot, pod, call, &requests);
            }
        }
    }

    // `ztunnel policy check` between the pods, as a connection and as a request.
    for to in &pods {
        for from in pods.iter().take(MAX_PEERS) {
            for method in [None, Some("GET".to_owned())] {
                let req = CheckRequest {
                    to: to.workload(),
                    port: Some(8080),
                    from: Caller::Pod(from.workload()),
                    from_ip: None,
                    method,
                    path: probes.paths.first().cloned(),
                    host: None,
                    headers: vec!["x-user: alice".into()],
                    jwt: None,
                    sni: None,
                    trust_domain: "cluster.local".into(),
                    enrolment: enrolment.clone(),
                };
                let _ = check(snapshot, &req, &|_| None);
            }
        }
    }

    for svc in snapshot.services.values().take(MAX_PODS) {
        for port in svc.ports.iter().take(2) {
            let _ = snapshot.endpoints(svc, port.port);
        }
    }
}

/// The pod's policies as a full scan (no caller index), to compare decisions with.
fn unindexed(snapshot: &Snapshot, pod: &Pod) -> PolicySet {
    let policies =
        snapshot
            .authorization_policies
            .for_workload(pod, &snapshot.root_namespace, |name| {
                snapshot
                    .services
                    .get(&(pod.namespace.clone(), name.to_owned()))
                    .map(|s| s.as_ref())
            });
    PolicySet::unindexed(policies.into_iter().cloned())
}

/// Decides `call` at connection time and as each of `requests`, and checks the decisions
/// agree with each other and with a full scan of the policies.
fn decide(snapshot: &Snapshot, pod: &Pod, mut call: InboundCall, requests: &[HttpRequest]) {
    let as_tcp = admit(snapshot, pod, &call, Unknowns::Conservative);
    assert!(
        !matches!(as_tcp, Admission::PerRequest),
        "traffic that is not HTTP was deferred to L7: {as_tcp:?}"
    );
    let _ = admit(snapshot, pod, &call, Unknowns::Defer);
    let policies = snapshot.authorization_for(pod);
    let scanned = unindexed(snapshot, pod);
    let verdict = |a: &Attributes, unknowns: Unknowns| {
        let v = evaluate(&policies, a, unknowns);
        assert_eq!(
            v,
            evaluate(&scanned, a, unknowns),
            "the caller index changed the decision ({unknowns:?}) for {a:?}"
        );
        v
    };
    let l4 = call.attributes.clone();
    let early = decided(&verdict(&l4, Unknowns::Defer));
    let _ = verdict(&l4, Unknowns::Conservative);
    for req in requests {
        call.attributes.http = Some(req.clone());
        let _ = admit(snapshot, pod, &call, Unknowns::Defer);
        let _ = verdict(&call.attributes, Unknowns::Defer);
        let per_request = verdict(&call.attributes, Unknowns::Conservative);
        assert!(
            !matches!(per_request, Verdict::NeedsHttp),
            "a request with its HTTP attributes was deferred: {per_request:?}"
        );
        let Some(early) = early else { continue };
        // A connection DENY rule decides before the request is read; on the request CUSTOM
        // comes first, and whatever its provider answers, DENY then decides the same way.
        let per_request = match per_request {
            Verdict::Custom { .. } if !early => {
                let mut provider_allowed = call.attributes.clone();
                provider_allowed.custom_allowed = true;
                verdict(&provider_allowed, Unknowns::Conservative)
            }
            v => v,
        };
        match &per_request {
            Verdict::Decided(d) => assert_eq!(
                early,
                d.allowed,
                "{} at connection time, {} for request {req:?} ({})\nattributes {l4:?}",
                if early { "allowed" } else { "denied" },
                if d.allowed { "allowed" } else { "denied" },
                d.reason
            ),
            other => panic!("decided at connection time, then {other:?} for request {req:?}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut objects = Objects::default();
    if ztunnel::config::parse_file(Path::new("fuzz.yaml"), &text, &mut objects).is_err() {
        return;
    }
    let snapshot = Snapshot::build(1, objects, &MeshSettings::default());
    exercise(&snapshot);
});
