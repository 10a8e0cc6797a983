//! The policies in force for a workload, as a snapshot answers for them: its
//! AuthorizationPolicies compiled once per pod, its RequestAuthentications, the mTLS mode of
//! each port. These are what admission ([`crate::authz::admit`]) decides over.
use std::sync::Arc;

use super::Snapshot;
use crate::{
    authz::{MtlsDecision, Policies, PolicySet, RequestAuthentication},
    model::{Pod, Service},
};

impl Snapshot {
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
        let at = pod as *const Pod as usize;
        let cached = {
            let cache = self.authorization_by_pod.read();
            cache.unwrap_or_else(|e| e.into_inner()).get(&at).cloned()
        };
        if let Some(set) = cached {
            return set;
        }
        let set = compile();
        let own = self
            .pods
            .get(&(pod.namespace.clone(), pod.name.clone()))
            .is_some_and(|own| std::ptr::eq(own.as_ref(), pod));
        if own {
            self.authorization_by_pod
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(at, set.clone());
        }
        set
    }

    /// The RequestAuthentications that apply to `pod`.
    pub fn request_authentications_for(&self, pod: &Pod) -> Vec<&Arc<RequestAuthentication>> {
        self.request_authentications
            .for_workload(pod, &self.root_namespace, |name| self.service_in(pod, name))
    }

    /// CUSTOM policies whose provider the mesh configuration does not define as an HTTP
    /// ext-authz provider: every request they apply to is denied, which the operator must see
    /// in the configuration's problems, not only when a request is refused.
    pub(super) fn custom_provider_problems(&self) -> Vec<String> {
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
}

impl Policies for Snapshot {
    fn mtls_mode(&self, pod: &Pod, port: u16) -> MtlsDecision {
        Snapshot::mtls_mode(self, pod, port)
    }

    fn authorization_for(&self, pod: &Pod) -> Arc<PolicySet> {
        Snapshot::authorization_for(self, pod)
    }

    fn authenticates(&self, pod: &Pod) -> bool {
        !self.request_authentications_for(pod).is_empty()
    }
}
