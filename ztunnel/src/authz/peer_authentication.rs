//! Istio's `PeerAuthentication`: which mutual-TLS mode a workload's inbound side runs in.
//!
//! The mode is composed exactly as istiod does it (`ComposePeerAuthentication`): the oldest
//! selector-less policy of the root namespace (mesh level), then the oldest selector-less
//! policy of the workload's namespace, then the oldest policy of the workload's namespace whose
//! selector matches the workload; each narrower level replaces the wider one unless its mode is
//! `UNSET`. The workload-level policy's `portLevelMtls` then applies to the port the connection
//! was addressed to (the workload's target port), an `UNSET` port inheriting the workload's
//! mode. A workload no policy covers runs `PERMISSIVE`. A selector in the root namespace makes a
//! policy apply to nothing (istiod ignores it), which the snapshot reports.
//!
//! Enforcement (in `proxy`): plaintext arriving at an enrolled pod is refused under `STRICT` and
//! accepted under `PERMISSIVE` and `DISABLE`; HBONE is mutual TLS whatever the mode.
use std::{collections::BTreeMap, fmt, sync::Arc};

use serde::{de, Deserialize, Deserializer};
use time::OffsetDateTime;

use super::{Namespaced, PolicyIndex};
use crate::model::{Labels, Origin, Pod};

/// `spec.mtls.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }

    /// Whether a plaintext connection is accepted under this (resolved) mode.
    pub fn accepts_plaintext(self) -> bool {
        self != MtlsMode::Strict
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for MtlsMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        // Istio's enum names, case as Istio writes them (the CRD schema rejects other cases).
        match s.as_str() {
            "UNSET" => Ok(MtlsMode::Unset),
            "DISABLE" => Ok(MtlsMode::Disable),
            "PERMISSIVE" => Ok(MtlsMode::Permissive),
            "STRICT" => Ok(MtlsMode::Strict),
            _ => Err(de::Error::custom(format!(
                "unknown mTLS mode {s:?} (expected UNSET, DISABLE, PERMISSIVE or STRICT)"
            ))),
        }
    }
}

/// One `PeerAuthentication` object, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp`; absent sorts as the oldest, like Go's zero time.
    pub created: Option<OffsetDateTime>,
    /// `selector.matchLabels`; empty means the whole namespace (or mesh, in the root namespace).
    pub selector: Labels,
    pub mode: MtlsMode,
    /// `portLevelMtls`, by the workload's target port.
    pub port_level: BTreeMap<u16, MtlsMode>,
    pub origin: Origin,
}

impl PeerAuthentication {
    /// `namespace/name`, the form used in logs and decisions.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn has_selector(&self) -> bool {
        !self.selector.is_empty()
    }

    pub fn selects(&self, pod: &Pod) -> bool {
        self.selector
            .iter()
            .all(|(k, v)| pod.labels.get(k) == Some(v))
    }

    /// Istio's precedence among policies of one level: oldest first, then by name.
    pub fn precedence_key(&self) -> (Option<OffsetDateTime>, &str) {
        (self.created, &self.name)
    }
}

/// `spec` as written. Unknown fields are errors: a misspelt `portLevelMtls` silently ignored
/// would leave a port in a mode the operator did not choose.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpecDoc {
    selector: Option<SelectorDoc>,
    mtls: Option<MtlsDoc>,
    #[serde(default)]
    port_level_mtls: Option<BTreeMap<PortKey, Option<MtlsDoc>>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SelectorDoc {
    #[serde(default)]
    match_labels: Option<Labels>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MtlsDoc {
    mode: Option<MtlsMode>,
}

/// A `portLevelMtls` key: a number in YAML, a string in JSON (`kubectl get -o json`).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct PortKey(u32);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        let n = match Raw::deserialize(d)? {
            Raw::Int(n) => n,
            Raw::Str(s) => s
                .parse()
                .map_err(|_| de::Error::custom(format!("port {s:?} is not a number")))?,
        };
        u32::try_from(n)
            .map(PortKey)
            .map_err(|_| de::Error::custom(format!("port {n} is out of range")))
    }
}

impl SpecDoc {
    /// Validates the spec as Istio's admission webhook does, into a policy.
    pub fn into_policy(
        self,
        namespace: String,
        name: String,
        created: Option<OffsetDateTime>,
        origin: Origin,
    ) -> Result<PeerAuthentication, String> {
        let selector = self
            .selector
            .and_then(|s| s.match_labels)
            .unwrap_or_default();
        let mode = self.mtls.and_then(|m| m.mode).unwrap_or(MtlsMode::Unset);
        let mut port_level = BTreeMap::new();
        if let Some(ports) = self.port_level_mtls {
            if !ports.is_empty() && selector.is_empty() {
                return Err(
                    "portLevelMtls needs a workload selector (selector.matchLabels), as in Istio"
                        .into(),
                );
            }
            for (PortKey(port), mtls) in ports {
                let port = u16::try_from(port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("portLevelMtls: port {port} is not in 1-65535"))?;
                let mode = mtls.and_then(|m| m.mode).unwrap_or(MtlsMode::Unset);
                port_level.insert(port, mode);
            }
        }
        Ok(PeerAuthentication {
            namespace,
            name,
            created,
            selector,
            mode,
            port_level,
            origin,
        })
    }
}

/// How wide the policy that decided a mode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// No policy covers the workload: Istio's default.
    Default,
    Mesh,
    Namespace,
    Workload,
    Port,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Default => "default",
            Scope::Mesh => "mesh",
            Scope::Namespace => "namespace",
            Scope::Workload => "workload",
            Scope::Port => "port",
        }
    }
}

/// The mode in force for one workload port, and which policy put it there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MtlsDecision {
    /// Never `Unset`.
    pub mode: MtlsMode,
    pub scope: Scope,
    /// `namespace/name` of the deciding policy; `None` for the default.
    pub policy: Option<String>,
}

impl fmt::Display for MtlsDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.policy {
            Some(p) => write!(
                f,
                "{} ({}-level PeerAuthentication {p})",
                self.mode,
                self.scope.as_str()
            ),
            None => write!(f, "{} (no PeerAuthentication applies)", self.mode),
        }
    }
}

/// The policies of the configuration, indexed by namespace, each list in Istio's precedence
/// order (oldest first), so "the first that applies" is the one Istio picks.
pub type PeerAuthentications = PolicyIndex<PeerAuthentication>;

impl Namespaced for PeerAuthentication {
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn order(&self, other: &Self) -> std::cmp::Ordering {
        self.precedence_key().cmp(&other.precedence_key())
    }
}

impl PolicyIndex<PeerAuthentication> {
    /// The selector-less policy of `ns` that is in force (the oldest).
    fn namespace_wide(&self, ns: &str) -> Option<&Arc<PeerAuthentication>> {
        self.in_namespace(ns).iter().find(|p| !p.has_selector())
    }

    /// The workload-level policy in force for `pod`: the oldest of its namespace whose selector
    /// matches. None in the root namespace: istiod ignores selectors there.
    fn workload_policy(&self, pod: &Pod, root_namespace: &str) -> Option<&Arc<PeerAuthentication>> {
        if pod.namespace == root_namespace {
            return None;
        }
        self.in_namespace(&pod.namespace)
            .iter()
            .find(|p| p.has_selector() && p.selects(pod))
    }

    /// The mode in force for connections to `pod` on (target) `port`.
    pub fn resolve(&self, pod: &Pod, port: u16, root_namespace: &str) -> MtlsDecision {
        let mut decision = MtlsDecision {
            mode: MtlsMode::Permissive,
            scope: Scope::Default,
            policy: None,
        };
        let mut apply = |p: &PeerAuthentication, mode: MtlsMode, scope: Scope| {
            if mode != MtlsMode::Unset {
                decision = MtlsDecision {
                    mode,
                    scope,
                    policy: Some(p.id()),
                };
            }
        };
        if let Some(mesh) = self.namespace_wide(root_namespace) {
            apply(mesh, mesh.mode, Scope::Mesh);
        }
        if pod.namespace != root_namespace {
            if let Some(ns) = self.namespace_wide(&pod.namespace) {
                apply(ns, ns.mode, Scope::Namespace);
            }
        }
        if let Some(w) = self.workload_policy(pod, root_namespace) {
            apply(w, w.mode, Scope::Workload);
            // UNSET on a port inherits the workload's composed mode: `apply` leaves it.
            if let Some(&mode) = w.port_level.get(&port) {
                apply(w, mode, Scope::Port);
            }
        }
        decision
    }

    /// What an operator should know about this set: policies that lose to an older one at the
    /// same level (Istio uses the oldest), and selectors in the root namespace (ignored).
    pub fn problems<'a>(
        &self,
        root_namespace: &str,
        pods: impl Iterator<Item = &'a Arc<Pod>>,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        for (ns, list) in &self.by_namespace {
            let wide: Vec<_> = list.iter().filter(|p| !p.has_selector()).collect();
            if let [used, ignored @ ..] = wide.as_slice() {
                if !ignored.is_empty() {
                    let level = if ns == root_namespace {
                        "mesh-wide"
                    } else {
                        "namespace-wide"
                    };
                    problems.push(format!(
                        "namespace {ns} has {} {level} PeerAuthentications; {} ({}) is in force as the oldest, ignored: {}",
                        wide.len(),
                        used.id(),
                        used.origin,
                        names(ignored)
                    ));
                }
            }
            if ns == root_namespace {
                for p in list.iter().filter(|p| p.has_selector()) {
                    problems.push(format!(
                        "PeerAuthentication {} ({}) has a selector in the root namespace {ns}; Istio applies it to no workload",
                        p.id(),
                        p.origin
                    ));
                }
            }
        }
        for pod in pods {
            if pod.namespace == root_namespace {
                continue;
            }
            let matching: Vec<_> = self
                .in_namespace(&pod.namespace)
                .iter()
                .filter(|p| p.has_selector() && p.selects(pod))
                .collect();
            if let [used, ignored @ ..] = matching.as_slice() {
                if !ignored.is_empty() {
                    problems.push(format!(
                        "pod {} is selected by {} PeerAuthentications; {} ({}) is in force as the oldest, ignored: {}",
                        pod.workload(),
                        matching.len(),
                        used.id(),
                        used.origin,
                        names(ignored)
                    ));
                }
            }
        }
        problems
    }
}

fn names(policies: &[&Arc<PeerAuthentication>]) -> String {
    policies
        .iter()
        .map(|p| format!("{} ({})", p.id(), p.origin))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "istio-system";

    fn pa(ns: &str, name: &str, selector: &[(&str, &str)], mode: MtlsMode) -> PeerAuthentication {
        PeerAuthentication {
            namespace: ns.into(),
            name: name.into(),
            created: None,
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            mode,
            port_level: BTreeMap::new(),
            origin: Origin::default(),
        }
    }

    fn at(mut p: PeerAuthentication, unix: i64) -> PeerAuthentication {
        p.created = Some(OffsetDateTime::from_unix_timestamp(unix).unwrap());
        p
    }

    fn ports(mut p: PeerAuthentication, ports: &[(u16, MtlsMode)]) -> PeerAuthentication {
        p.port_level = ports.iter().copied().collect();
        p
    }

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            uid: String::new(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: Labels::new(),
            service_account: "default".into(),
            node_name: None,
            host_network: false,
            ips: vec![],
            netns_path: None,
            container_ports: vec![],
            origin: Origin::default(),
        }
    }

    use MtlsMode::*;

    fn web() -> Pod {
        pod("shop", "web", &[("app", "webapp")])
    }

    fn mode(policies: Vec<PeerAuthentication>, pod: &Pod, port: u16) -> (MtlsMode, Scope, String) {
        let d = PeerAuthentications::new(policies).resolve(pod, port, ROOT);
        (d.mode, d.scope, d.policy.unwrap_or_default())
    }

    /// Each row: the policies, and the (mode, scope, policy) web:8080 gets.
    #[test]
    fn resolution_table() {
        type Expected = (MtlsMode, Scope, &'static str);
        let rows: Vec<(&str, Vec<PeerAuthentication>, Expected)> = vec![
            (
                "nothing: PERMISSIVE",
                vec![],
                (Permissive, Scope::Default, ""),
            ),
            (
                "mesh STRICT",
                vec![pa(ROOT, "default", &[], Strict)],
                (Strict, Scope::Mesh, "istio-system/default"),
            ),
            (
                "namespace overrides mesh",
                vec![
                    pa(ROOT, "default", &[], Strict),
                    pa("shop", "ns", &[], Permissive),
                ],
                (Permissive, Scope::Namespace, "shop/ns"),
            ),
            (
                "workload overrides namespace",
                vec![
                    pa("shop", "ns", &[], Strict),
                    pa("shop", "w", &[("app", "webapp")], Disable),
                ],
                (Disable, Scope::Workload, "shop/w"),
            ),
            (
                "workload selector that does not match",
                vec![
                    pa("shop", "ns", &[], Strict),
                    pa("shop", "w", &[("app", "catalog")], Permissive),
                ],
                (Strict, Scope::Namespace, "shop/ns"),
            ),
            (
                "UNSET namespace inherits mesh",
                vec![pa(ROOT, "m", &[], Strict), pa("shop", "ns", &[], Unset)],
                (Strict, Scope::Mesh, "istio-system/m"),
            ),
            (
                "UNSET workload inherits namespace",
                vec![
                    pa("shop", "ns", &[], Disable),
                    pa("shop", "w", &[("app", "webapp")], Unset),
                ],
                (Disable, Scope::Namespace, "shop/ns"),
            ),
            (
                "UNSET everywhere: PERMISSIVE",
                vec![
                    pa(ROOT, "m", &[], Unset),
                    pa("shop", "ns", &[], Unset),
                    pa("shop", "w", &[("app", "webapp")], Unset),
                ],
                (Permissive, Scope::Default, ""),
            ),
            (
                "another namespace's policy does not apply",
                vec![pa("other", "ns", &[], Strict)],
                (Permissive, Scope::Default, ""),
            ),
            (
                "a selector in the root namespace applies to nothing",
                vec![pa(ROOT, "sel", &[("app", "webapp")], Strict)],
                (Permissive, Scope::Default, ""),
            ),
            (
                "port-level override on this port",
                vec![ports(
                    pa("shop", "w", &[("app", "webapp")], Strict),
                    &[(8080, Permissive)],
                )],
                (Permissive, Scope::Port, "shop/w"),
            ),
            (
                "port-level on another port leaves the workload mode",
                vec![ports(
                    pa("shop", "w", &[("app", "webapp")], Strict),
                    &[(9090, Permissive)],
                )],
                (Strict, Scope::Workload, "shop/w"),
            ),
            (
                "UNSET port inherits the workload's inherited mode",
                vec![
                    pa("shop", "ns", &[], Strict),
                    ports(
                        pa("shop", "w", &[("app", "webapp")], Unset),
                        &[(8080, Unset)],
                    ),
                ],
                (Strict, Scope::Namespace, "shop/ns"),
            ),
            (
                "oldest mesh policy wins",
                vec![
                    at(pa(ROOT, "a-new", &[], Permissive), 200),
                    at(pa(ROOT, "z-old", &[], Strict), 100),
                ],
                (Strict, Scope::Mesh, "istio-system/z-old"),
            ),
            (
                "oldest workload policy wins",
                vec![
                    at(pa("shop", "a", &[("app", "webapp")], Permissive), 200),
                    at(pa("shop", "b", &[("app", "webapp")], Disable), 100),
                ],
                (Disable, Scope::Workload, "shop/b"),
            ),
            (
                "same age: first by name",
                vec![
                    at(pa("shop", "b", &[], Permissive), 100),
                    at(pa("shop", "a", &[], Strict), 100),
                ],
                (Strict, Scope::Namespace, "shop/a"),
            ),
            (
                "no timestamp counts as oldest (Go's zero time)",
                vec![
                    at(pa("shop", "a", &[], Permissive), 100),
                    pa("shop", "b", &[], Strict),
                ],
                (Strict, Scope::Namespace, "shop/b"),
            ),
        ];
        for (what, policies, (m, s, p)) in rows {
            assert_eq!(
                mode(policies, &web(), 8080),
                (m, s, p.to_string()),
                "{what}"
            );
        }
    }

    #[test]
    fn root_namespace_workloads_take_only_the_mesh_policy() {
        let gw = pod(ROOT, "gateway", &[("app", "gw")]);
        let policies = vec![
            pa(ROOT, "mesh", &[], Strict),
            pa(ROOT, "sel", &[("app", "gw")], Permissive),
        ];
        assert_eq!(
            mode(policies, &gw, 80),
            (Strict, Scope::Mesh, "istio-system/mesh".into())
        );
    }

    #[test]
    fn conflicts_and_ignored_selectors_are_reported() {
        let set = PeerAuthentications::new(vec![
            at(pa(ROOT, "m1", &[], Strict), 1),
            at(pa(ROOT, "m2", &[], Permissive), 2),
            pa(ROOT, "sel", &[("app", "x")], Strict),
            pa("shop", "w1", &[("app", "webapp")], Strict),
            pa("shop", "w2", &[("app", "webapp")], Disable),
            pa("shop", "other", &[("app", "catalog")], Disable),
        ]);
        let pods = [
            Arc::new(web()),
            Arc::new(pod("shop", "cat", &[("app", "catalog")])),
        ];
        let problems = set.problems(ROOT, pods.iter());
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(problems[0].contains("2 mesh-wide") && problems[0].contains("istio-system/m1"));
        assert!(problems[0].contains("ignored: istio-system/m2"));
        assert!(problems[1].contains("istio-system/sel") && problems[1].contains("no workload"));
        assert!(problems[2].contains("pod shop/web") && problems[2].contains("ignored: shop/w2"));
    }

    fn parse(spec: &str) -> Result<PeerAuthentication, String> {
        let doc: SpecDoc = serde_yaml::from_str(spec).map_err(|e| e.to_string())?;
        doc.into_policy("shop".into(), "p".into(), None, Origin::default())
    }

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        let p = parse("selector: {matchLabels: {app: web}}\nmtls: {mode: STRICT}\nportLevelMtls:\n  8080: {mode: PERMISSIVE}\n  \"9090\": {}\n").unwrap();
        assert_eq!(p.mode, Strict);
        assert_eq!(p.port_level[&8080], Permissive);
        assert_eq!(p.port_level[&9090], Unset);
        assert_eq!(p.selector["app"], "web");
        assert_eq!(parse("{}").unwrap().mode, Unset, "an empty spec is UNSET");
        assert_eq!(parse("mtls: {}").unwrap().mode, Unset);
        assert!(!parse("selector: {}\nmtls: {mode: DISABLE}")
            .unwrap()
            .has_selector());

        for (spec, expect) in [
            ("mtls: {mode: strict}", "unknown mTLS mode"),
            ("mtls: {mode: STRICT, extra: 1}", "unknown field"),
            ("mtl: {mode: STRICT}", "unknown field"),
            (
                "portLevelMtls: {8080: {mode: STRICT}}",
                "needs a workload selector",
            ),
            (
                "selector: {matchLabels: {a: b}}\nportLevelMtls: {0: {mode: STRICT}}",
                "not in 1-65535",
            ),
            (
                "selector: {matchLabels: {a: b}}\nportLevelMtls: {70000: {mode: STRICT}}",
                "not in 1-65535",
            ),
            (
                "selector: {matchLabels: {a: b}}\nportLevelMtls: {http: {mode: STRICT}}",
                "not a number",
            ),
        ] {
            let e = parse(spec).unwrap_err();
            assert!(e.contains(expect), "{spec}: {e}");
        }
    }
}
