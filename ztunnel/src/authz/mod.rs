//! Istio's security policies, decided in the node proxy (docs/policy.md).
//!
//! * [`peer_authentication`]: `PeerAuthentication`, the mutual-TLS mode of a workload's inbound
//!   side (STRICT refuses plaintext).
//! * [`authorization_policy`]: `AuthorizationPolicy` as written, validated and compiled.
//! * [`matching`]: what a call is matched on, and whether one rule matches it.
//! * [`policy_set`]: one workload's policies, indexed by the callers their rules name
//!   (principals, namespaces, service accounts, IP blocks: [`caller_index`]).
//! * [`evaluate`]: deciding a connection or a request against the policies of its destination.
//! * [`admission`]: the whole inbound decision (PeerAuthentication, then authorization).
pub mod admission;
pub mod authorization_policy;
mod caller_index;
pub mod evaluate;
pub mod ext_authz;
pub mod jwks;
pub mod matching;
pub mod peer_authentication;
pub mod policy_set;
pub mod request_authentication;

use std::{cmp::Ordering, collections::BTreeMap, sync::Arc};

pub use admission::{admit, Admission, CustomCheck, InboundCall, Policies, Transport};
pub use authorization_policy::{Action, AuthorizationPolicy, Target};
pub use evaluate::{evaluate, Decision, Unknowns, Verdict};
pub use matching::{Attributes, HttpRequest, RequestAuth};
pub use peer_authentication::{MtlsDecision, MtlsMode, PeerAuthentication, PeerAuthentications};
pub use policy_set::PolicySet;
pub use request_authentication::RequestAuthentication;

use crate::model::{Labels, Pod, Service};

/// The namespaces whose policies may apply to `pod`: the root namespace (mesh-wide) and its own.
fn workload_namespaces<'a>(pod: &'a Pod, root_namespace: &'a str) -> Vec<&'a str> {
    if pod.namespace == root_namespace {
        vec![root_namespace]
    } else {
        vec![root_namespace, &pod.namespace]
    }
}

/// Whether a policy of namespace `ns` aimed at `target` applies to `pod`: its selector matches
/// the pod (no selector: every pod), or it targets a Service of the pod's namespace that
/// selects the pod.
fn applies<'a>(
    target: &Target,
    ns: &str,
    pod: &Pod,
    services: &impl Fn(&str) -> Option<&'a Service>,
) -> bool {
    let selects = |labels: &Labels| labels.iter().all(|(k, v)| pod.labels.get(k) == Some(v));
    match target {
        Target::Selector(labels) => selects(labels),
        Target::Services(names) => {
            ns == pod.namespace
                && names.iter().any(|n| {
                    services(n).is_some_and(|s| !s.selector.is_empty() && selects(&s.selector))
                })
        }
        Target::NotHere(_) => false,
    }
}

/// A namespaced policy object, and the order Istio gives policies of its kind within a
/// namespace (by name, unless the kind says otherwise).
pub trait Namespaced {
    fn namespace(&self) -> &str;
    fn name(&self) -> &str;
    fn order(&self, other: &Self) -> Ordering {
        self.name().cmp(other.name())
    }
}

/// A policy kind that is aimed at workloads by selector or targetRef.
pub trait Targeted: Namespaced {
    fn target(&self) -> &Target;
}

impl Namespaced for AuthorizationPolicy {
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl Targeted for AuthorizationPolicy {
    fn target(&self) -> &Target {
        &self.target
    }
}

impl Namespaced for RequestAuthentication {
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl Targeted for RequestAuthentication {
    fn target(&self) -> &Target {
        &self.target
    }
}

/// Policies of one kind, indexed by namespace (each list in the kind's order), so finding a
/// workload's policies looks at two namespaces, never at unrelated ones.
#[derive(Debug)]
pub struct PolicyIndex<P> {
    by_namespace: BTreeMap<String, Vec<Arc<P>>>,
}

impl<P> Default for PolicyIndex<P> {
    fn default() -> Self {
        Self {
            by_namespace: BTreeMap::new(),
        }
    }
}

pub type AuthorizationPolicies = PolicyIndex<AuthorizationPolicy>;
pub type RequestAuthentications = PolicyIndex<RequestAuthentication>;

impl<P: Namespaced> PolicyIndex<P> {
    /// Indexes `policies` (shared with the source that parsed them, or owned).
    pub fn new(policies: impl IntoIterator<Item = impl Into<Arc<P>>>) -> Self {
        let mut by_namespace: BTreeMap<String, Vec<Arc<P>>> = BTreeMap::new();
        for p in policies {
            let p = p.into();
            match by_namespace.get_mut(p.namespace()) {
                Some(list) => list.push(p),
                None => {
                    by_namespace.insert(p.namespace().to_owned(), vec![p]);
                }
            }
        }
        for list in by_namespace.values_mut() {
            list.sort_by(|a, b| a.order(b));
        }
        Self { by_namespace }
    }

    pub fn len(&self) -> usize {
        self.by_namespace.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<P>> {
        self.by_namespace.values().flatten()
    }

    /// The namespaces that have policies of this kind, in order.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.by_namespace.keys().map(String::as_str)
    }

    /// The policies of `ns`, in order.
    fn in_namespace(&self, ns: &str) -> &[Arc<P>] {
        self.by_namespace.get(ns).map(Vec::as_slice).unwrap_or(&[])
    }
}

impl<P: Targeted> PolicyIndex<P> {
    /// The policies that apply to `pod`: those of the root namespace (mesh-wide) and of the
    /// pod's namespace whose selector matches it, or that target a Service (looked up with
    /// `services` in the pod's namespace) selecting it.
    pub fn for_workload<'a>(
        &'a self,
        pod: &Pod,
        root_namespace: &str,
        services: impl Fn(&str) -> Option<&'a Service>,
    ) -> Vec<&'a Arc<P>> {
        let mut out = Vec::new();
        for ns in workload_namespaces(pod, root_namespace) {
            for p in self.by_namespace.get(ns).into_iter().flatten() {
                if applies(p.target(), ns, pod, &services) {
                    out.push(p);
                }
            }
        }
        out
    }
}

impl AuthorizationPolicies {
    /// What an operator should know: policies this proxy never enforces (they target
    /// gateways), and principals written with `spiffe://` (Istio never matches those).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for p in self.iter() {
            if let Target::NotHere(what) = &p.target {
                problems.push(format!(
                    "AuthorizationPolicy {} ({}) targets {what}: gateways and waypoints enforce it, this proxy does not",
                    p.id(),
                    p.origin
                ));
            }
            let spiffe = p.rules.iter().flat_map(|r| &r.from).any(|s| {
                s.principals
                    .any_of
                    .iter()
                    .chain(&s.principals.none_of)
                    .any(|m| matches!(m, authorization_policy::StrMatch::Exact(v) | authorization_policy::StrMatch::Prefix(v) if v.starts_with("spiffe://")))
            });
            if spiffe {
                problems.push(format!(
                    "AuthorizationPolicy {} ({}) has principals starting with spiffe://; Istio matches principals written without it (cluster.local/ns/<ns>/sa/<sa>), so these never match",
                    p.id(),
                    p.origin
                ));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Origin;

    fn labels(l: &[(&str, &str)]) -> Labels {
        l.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn policy(ns: &str, name: &str, target: Target) -> AuthorizationPolicy {
        AuthorizationPolicy {
            namespace: ns.into(),
            name: name.into(),
            target,
            action: Action::Allow,
            provider: None,
            rules: vec![],
            origin: Origin::default(),
        }
    }

    fn pod(ns: &str, l: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: ns.into(),
            name: "p".into(),
            uid: String::new(),
            labels: labels(l),
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

    #[test]
    fn policies_apply_by_root_namespace_namespace_selector_and_service() {
        let sel = |l: &[(&str, &str)]| Target::Selector(labels(l));
        let set = AuthorizationPolicies::new(vec![
            policy("istio-system", "mesh", sel(&[])),
            policy("istio-system", "mesh-webapps", sel(&[("app", "webapp")])),
            policy("shop", "ns", sel(&[])),
            policy("shop", "webapp", sel(&[("app", "webapp")])),
            policy("shop", "catalog", sel(&[("app", "catalog")])),
            policy("shop", "by-service", Target::Services(vec!["web".into()])),
            policy("shop", "gateway", Target::NotHere("Gateway gw".into())),
            policy("other", "ns", sel(&[])),
        ]);
        let web_svc = Service {
            namespace: "shop".into(),
            name: "web".into(),
            vips: vec![],
            selector: labels(&[("app", "webapp")]),
            ports: vec![],
            origin: Origin::default(),
        };
        let services = |n: &str| (n == "web").then_some(&web_svc);
        let names = |p: &Pod| -> Vec<String> {
            set.for_workload(p, "istio-system", services)
                .iter()
                .map(|p| p.id())
                .collect()
        };
        assert_eq!(
            names(&pod("shop", &[("app", "webapp")])),
            [
                "istio-system/mesh",
                "istio-system/mesh-webapps",
                "shop/by-service",
                "shop/ns",
                "shop/webapp"
            ]
        );
        assert_eq!(
            names(&pod("shop", &[("app", "catalog")])),
            ["istio-system/mesh", "shop/catalog", "shop/ns"]
        );
        assert_eq!(
            names(&pod("istio-system", &[("app", "webapp")])),
            ["istio-system/mesh", "istio-system/mesh-webapps"]
        );
        assert_eq!(set.problems().len(), 1, "{:?}", set.problems());
    }
}
