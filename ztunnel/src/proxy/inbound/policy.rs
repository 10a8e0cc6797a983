//! The inbound policy decision shared by every path into an enrolled pod (plaintext, HBONE,
//! same node): PeerAuthentication for plaintext callers, then the pod's AuthorizationPolicies.
//! Decisions are logged (every denial, every AUDIT match), counted, and re-made whenever the
//! configuration changes for as long as the connection lives.
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};

use super::Inbound;
use crate::proxy::PodContext;
use crate::{
    authz::{self, Admission, CustomCheck, Decision, InboundCall, Unknowns},
    metrics::{DecisionLabels, Layer, Outcome},
    state::Snapshot,
};

impl Inbound {
    /// Decides `call` to `pod` against `snapshot` ([`authz::admit`], which `ztunnel policy
    /// check` runs too).
    pub(super) fn admit(
        &self,
        snapshot: &Snapshot,
        pod: &PodContext,
        call: &InboundCall,
        unknowns: Unknowns,
    ) -> Admission {
        match pod.in_snapshot(snapshot) {
            Some(p) => authz::admit(snapshot, p, call, unknowns),
            None => Admission::Denied(Decision {
                allowed: false,
                policy: None,
                rule: None,
                action: None,
                reason: "the pod is no longer in the configuration".into(),
                audit: None,
            }),
        }
    }

    /// Counts and logs a decision: every denial and every AUDIT match.
    pub(super) fn record_decision(
        &self,
        pod: &PodContext,
        call: &InboundCall,
        decision: &Decision,
    ) {
        let action = decision.action.map(|a| a.as_str()).unwrap_or("none");
        let outcome = if decision.allowed {
            Outcome::Allowed
        } else {
            Outcome::Denied
        };
        let a = &call.attributes;
        self.shared
            .metrics
            .authz_decisions
            .get_or_create(&DecisionLabels {
                policy: decision.policy.clone().unwrap_or_else(|| "none".into()),
                action,
                decision: outcome,
                layer: if a.http.is_some() {
                    Layer::Request
                } else {
                    Layer::Connection
                },
            })
            .inc();
        let request_principal = a
            .http
            .as_ref()
            .and_then(|h| h.auth.as_ref())
            .map(|auth| auth.principal.as_str());
        let (method, path) = a
            .http
            .as_ref()
            .map(|h| (Some(h.method.as_str()), Some(h.path.as_str())))
            .unwrap_or_default();
        if !decision.allowed {
            warn!(dst_workload = %pod.workload, src_principal = a.source_principal.as_deref(),
                src_request_principal = request_principal,
                src_ip = a.source_ip.map(|ip| ip.to_string()).as_deref(),
                dst_ip = a.destination_ip.map(|ip| ip.to_string()).as_deref(),
                dst_port = a.destination_port, method, path,
                policy = decision.policy.as_deref(), rule = decision.rule,
                action = decision.action.map(|a| a.as_str()), reason = %decision.reason,
                "authorization denied");
        }
        if let Some((policy, rule)) = &decision.audit {
            info!(dst_workload = %pod.workload, src_principal = a.source_principal.as_deref(),
                src_request_principal = request_principal,
                src_ip = a.source_ip.map(|ip| ip.to_string()).as_deref(),
                dst_port = a.destination_port, method, path, audit_policy = %policy,
                audit_rule = rule, allowed = decision.allowed, reason = %decision.reason,
                "authorization audit");
        }
    }

    /// Resolves, with the reason, once a configuration change no longer admits `call`. For a
    /// connection decided per request (`per_request`), only a change that denies the whole
    /// connection counts; requests are checked against the latest configuration anyway.
    pub(super) async fn revoked(
        self: Arc<Self>,
        mut config: watch::Receiver<Arc<Snapshot>>,
        pod: Arc<PodContext>,
        call: InboundCall,
        per_request: bool,
    ) -> String {
        loop {
            if config.changed().await.is_err() {
                return std::future::pending().await;
            }
            let snapshot = config.borrow_and_update().clone();
            // A pod leaving the configuration is un-enrolled; like every proxied connection,
            // its connections go on until they end.
            if pod.in_snapshot(&snapshot).is_none() {
                continue;
            }
            let unknowns = if per_request {
                Unknowns::Defer
            } else {
                Unknowns::Conservative
            };
            if let Admission::Denied(d)
            | Admission::MtlsRequired(d)
            | Admission::Custom(CustomCheck { denied: d, .. }) =
                self.admit(&snapshot, &pod, &call, unknowns)
            {
                self.record_decision(&pod, &call, &d);
                self.shared.metrics.connections_revoked.inc();
                return format!("no longer allowed: {}", d.reason);
            }
        }
    }
}
