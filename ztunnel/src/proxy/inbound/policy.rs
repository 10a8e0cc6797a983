//! The inbound policy decision shared by every path into an enrolled pod (plaintext, HBONE,
//! same node): PeerAuthentication for plaintext callers, then the pod's AuthorizationPolicies.
//! Decisions are logged (every denial, every AUDIT match), counted, and re-made whenever the
//! configuration changes for as long as the connection lives.
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

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
}

/// Resolves, with the reason, once a configuration change no longer admits `call`. For a
/// connection decided per request (`per_request`), only a change that denies the whole
/// connection counts; requests are checked against the latest configuration anyway.
///
/// Every admitted connection holds one for its whole life, so it keeps only its inputs and one
/// small boxed wait for the next change (an `async fn` kept its arguments twice).
pub(super) struct Revocation {
    inbound: Arc<Inbound>,
    pod: Arc<PodContext>,
    call: InboundCall,
    per_request: bool,
    /// The wait for the next change; it owns the receiver and gives it back (`None` once the
    /// configuration source is gone: nothing revokes any more).
    next: Option<NextChange>,
}

type NextChange = Pin<Box<dyn Future<Output = Option<Changes>> + Send>>;
type Changes = watch::Receiver<Arc<Snapshot>>;

fn next_change(mut config: Changes) -> NextChange {
    Box::pin(async move { config.changed().await.ok().map(|()| config) })
}

impl Revocation {
    pub(super) fn new(
        inbound: Arc<Inbound>,
        config: Changes,
        pod: Arc<PodContext>,
        call: InboundCall,
        per_request: bool,
    ) -> Self {
        Self {
            inbound,
            pod,
            call,
            per_request,
            next: Some(next_change(config)),
        }
    }

    /// Why `snapshot` no longer admits the call, if it does not.
    fn revoked_by(&self, snapshot: &Snapshot) -> Option<String> {
        // A pod leaving the configuration is un-enrolled; like every proxied connection, its
        // connections go on until they end.
        self.pod.in_snapshot(snapshot)?;
        let unknowns = match self.per_request {
            true => Unknowns::Defer,
            false => Unknowns::Conservative,
        };
        match self
            .inbound
            .admit(snapshot, &self.pod, &self.call, unknowns)
        {
            Admission::Denied(d)
            | Admission::MtlsRequired(d)
            | Admission::Custom(CustomCheck { denied: d, .. }) => {
                self.inbound.record_decision(&self.pod, &self.call, &d);
                self.inbound.shared.metrics.connections_revoked.inc();
                Some(format!("no longer allowed: {}", d.reason))
            }
            _ => None,
        }
    }
}

impl Future for Revocation {
    type Output = String;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<String> {
        let this = self.get_mut();
        loop {
            let Some(next) = this.next.as_mut() else {
                return Poll::Pending;
            };
            let Some(mut config) = ready!(next.as_mut().poll(cx)) else {
                this.next = None;
                return Poll::Pending;
            };
            let snapshot = config.borrow_and_update().clone();
            this.next = Some(next_change(config));
            if let Some(reason) = this.revoked_by(&snapshot) {
                this.next = None;
                return Poll::Ready(reason);
            }
        }
    }
}
