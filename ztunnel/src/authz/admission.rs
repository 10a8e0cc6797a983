//! The inbound admission decision, as a pure function of the policies in force:
//! PeerAuthentication for plaintext callers, then the destination's AuthorizationPolicies. The
//! proxy runs it for every connection and request; `ztunnel policy check` runs the very same
//! code.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::{evaluate, Attributes, Decision, MtlsDecision, PolicySet, Unknowns, Verdict};
use crate::{identity::SpiffeId, model::Pod};

/// The policies in force for destination workloads, as admission reads them. The
/// configuration snapshot ([`crate::state::Snapshot`]) provides them, compiled and cached;
/// admission itself never sees the rest of the configuration.
pub trait Policies {
    /// The mutual-TLS mode in force for plaintext to `pod`'s (target) `port`.
    fn mtls_mode(&self, pod: &Pod, port: u16) -> MtlsDecision;
    /// The AuthorizationPolicies that apply to `pod`, compiled for deciding.
    fn authorization_for(&self, pod: &Pod) -> Arc<PolicySet>;
    /// Whether a RequestAuthentication applies to `pod`: its HTTP requests' tokens are checked.
    fn authenticates(&self, pod: &Pod) -> bool;
}

/// How a connection entered the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Plaintext from outside the mesh (15006): PeerAuthentication applies.
    Plaintext,
    /// Mutual TLS (HBONE), or a same-node mesh pod known by its listener.
    Mesh,
}

/// The caller and the call, as known when the connection arrives.
#[derive(Clone, Debug)]
pub struct InboundCall {
    pub transport: Transport,
    pub attributes: Attributes,
}

impl InboundCall {
    pub fn new(
        transport: Transport,
        peer: Option<&SpiffeId>,
        source_ip: Option<IpAddr>,
        destination: SocketAddr,
    ) -> Self {
        let mut attributes = Attributes {
            source_ip,
            remote_ip: source_ip,
            destination_ip: Some(destination.ip()),
            destination_port: Some(destination.port()),
            ..Default::default()
        };
        if let Some(id) = peer {
            attributes = attributes.with_peer(id);
        }
        Self {
            transport,
            attributes,
        }
    }
}

/// The connection-time outcome.
#[derive(Clone, Debug)]
pub enum Admission {
    Allowed(Decision),
    /// PeerAuthentication refuses plaintext here (STRICT).
    MtlsRequired(Decision),
    /// An AuthorizationPolicy denies it.
    Denied(Decision),
    /// Allowed so far; each HTTP request is decided on its own.
    PerRequest,
    /// A CUSTOM policy applies: its provider decides (then DENY and ALLOW, if it allows).
    Custom(CustomCheck),
}

/// A request a CUSTOM provider must be asked about.
#[derive(Clone, Debug)]
pub struct CustomCheck {
    pub policy: String,
    pub rule: usize,
    pub provider: String,
    /// The decision if the provider denies or cannot be asked.
    pub denied: Decision,
}

/// Decides `call` to `pod`. `unknowns` says how to treat rules that need HTTP attributes the
/// call does not carry: defer (the connection is then decided per request) or settle them as
/// for traffic that is not HTTP.
pub fn admit(
    policies: &(impl Policies + ?Sized),
    pod: &Pod,
    call: &InboundCall,
    unknowns: Unknowns,
) -> Admission {
    if call.transport == Transport::Plaintext {
        let port = call.attributes.destination_port.unwrap_or_default();
        let mtls = policies.mtls_mode(pod, port);
        if !mtls.mode.accepts_plaintext() {
            return Admission::MtlsRequired(Decision {
                allowed: false,
                policy: mtls.policy.clone(),
                rule: None,
                action: None,
                reason: format!("plaintext refused: mTLS mode {mtls}"),
                audit: None,
            });
        }
    }
    let authorization = policies.authorization_for(pod);
    // Tokens are checked on every HTTP request of a workload with RequestAuthentication (a bad
    // one is a 401 even where no AuthorizationPolicy applies).
    let authenticates = call.attributes.http.is_none()
        && unknowns == Unknowns::Defer
        && policies.authenticates(pod);
    match evaluate(&authorization, &call.attributes, unknowns) {
        Verdict::Decided(d) if d.allowed && authenticates => Admission::PerRequest,
        Verdict::Decided(d) if d.allowed => Admission::Allowed(d),
        Verdict::Decided(d) => Admission::Denied(d),
        Verdict::NeedsHttp => Admission::PerRequest,
        Verdict::Custom {
            policy,
            rule,
            provider,
        } => Admission::Custom(CustomCheck {
            denied: Decision {
                allowed: false,
                policy: Some(policy.clone()),
                rule: Some(rule),
                action: Some(super::Action::Custom),
                reason: format!("denied by CUSTOM policy {policy} (provider {provider})"),
                audit: None,
            },
            policy,
            rule,
            provider,
        }),
    }
}
