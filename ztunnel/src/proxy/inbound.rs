//! Inbound plaintext: TCP from outside an enrolled pod, steered by `zt_sk_lookup` to the pod's
//! 15006 listener. The accepted socket's local address is the original destination.
//!
//! Plaintext callers are not in the mesh (mesh pods on other nodes come through HBONE, and
//! same-node mesh traffic never gets here), so the pod's PeerAuthentication decides: STRICT
//! refuses them, PERMISSIVE and DISABLE let them in, with no principal and no namespace. The
//! decision is re-made on every configuration change for as long as the connection lives.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use super::{
    inbound_policy::{Admission, CustomCheck, InboundCall, Transport},
    is_proxy_port,
    relay::{relay_until, reset},
    PodContext, Proxy,
};
use crate::{
    admin::metrics::{ConnectionLabels, MtlsModeLabels},
    authz::{Decision, Unknowns},
};

impl Proxy {
    /// Accepts steered connections of `pod` until the task is aborted (un-enrolment).
    pub async fn serve_inbound_plaintext(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        listener: TcpListener,
    ) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    // Small writes (TLS records, HTTP/2 frames, request/response exchanges)
                    // must not wait for Nagle: latency is the product.
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(self.clone().inbound_plaintext(pod.clone(), stream, peer));
                }
                Err(e) => {
                    warn!(pod = %pod.workload, error = %e, "inbound accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn inbound_plaintext(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        stream: TcpStream,
        peer: SocketAddr,
    ) {
        let start = Instant::now();
        let Ok(dst) = stream.local_addr() else {
            return;
        };
        // The kubelet's probes: exempt from the pod's policies (see `from_node`).
        if self.made_by_node(peer, dst) {
            return self.inbound_from_node(pod, stream, peer, dst).await;
        }
        // This connection's own view of the configuration: the decision below and every later
        // re-check read it, so none of them is skipped.
        let config = self.config.clone();
        let snapshot = config.borrow().clone();
        let src_workload = snapshot.pod_by_ip(peer.ip()).map(|p| p.workload());
        let mtls = self.mtls_mode(&snapshot, &pod, dst.port());
        let refuse = |stream: TcpStream, outcome: &str, d: Option<&Decision>, reason: &str| {
            info!(direction = "inbound", src_workload = src_workload.as_deref(), src_addr = %peer,
                dst_addr = %dst, dst_workload = %pod.workload,
                mtls_mode = mtls.as_ref().map(|d| d.mode.as_str()),
                mtls_policy = mtls.as_ref().and_then(|d| d.policy.as_deref()),
                authz_policy = d.and_then(|d| d.policy.as_deref()), authz_rule = d.and_then(|d| d.rule),
                duration_ms = start.elapsed().as_millis() as u64, outcome,
                error = reason, "connection closed");
            reset(stream);
        };
        // Only sk_lookup puts connections here, and it never steers loopback traffic; the
        // proxy's own ports are not services (forwarding to them would loop back here).
        if peer.ip().is_loopback() {
            let reason = "connection did not arrive from outside the pod";
            return refuse(stream, "refused", None, reason);
        }
        if is_proxy_port(dst.port()) {
            let reason = "destination port is reserved for the proxy";
            return refuse(stream, "refused", None, reason);
        }
        let Some(mtls_decision) = &mtls else {
            let reason = "the pod is no longer in the configuration";
            return refuse(stream, "refused", None, reason);
        };
        let call = InboundCall::new(Transport::Plaintext, None, Some(peer.ip()), dst);
        let by_mode = |outcome| {
            self.metrics
                .plaintext_connections
                .get_or_create(&MtlsModeLabels {
                    mode: mtls_decision.mode.to_string(),
                    outcome,
                })
                .inc()
        };
        let decision = match self.admit(&snapshot, &pod, &call, Unknowns::Defer) {
            Admission::MtlsRequired(d) => {
                by_mode("refused");
                return refuse(stream, "refused", None, &d.reason);
            }
            Admission::Denied(d) | Admission::Custom(CustomCheck { denied: d, .. }) => {
                by_mode("allowed");
                self.record(&pod, &call, &d);
                return refuse(stream, "denied", Some(&d), &d.reason);
            }
            Admission::Allowed(d) => {
                self.record(&pod, &call, &d);
                Some(d)
            }
            // Decided request by request, once the bytes are read.
            Admission::PerRequest => None,
        };
        by_mode("allowed");
        let upstream = match self.connect_from(&pod, dst).await {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("delivery to the application failed: {e}");
                return refuse(stream, "connect_failed", decision.as_ref(), &reason);
            }
        };
        // A change that no longer admits the connection (a port made STRICT, a new DENY)
        // resets it; other changes leave it alone.
        let per_request = decision.is_none();
        let mut counted = self.metrics.open(ConnectionLabels::new(
            "destination",
            "plaintext",
            (src_workload.as_deref(), None),
            (Some(&pod.workload), Some(pod.identity.to_string())),
            false,
        ));
        let revoke = self
            .clone()
            .revoked(config, pod.clone(), call.clone(), per_request);
        let r = if per_request {
            self.serve_per_request(pod.clone(), call, stream, upstream, revoke)
                .await
        } else {
            relay_until(stream, upstream, revoke).await
        };
        counted.bytes(r.sent, r.received);
        let decision = decision.as_ref();
        info!(direction = "inbound", src_workload = src_workload.as_deref(), src_addr = %peer,
            dst_addr = %dst, dst_workload = %pod.workload, dst_identity = %pod.identity,
            upstream = %dst,
            mtls_mode = mtls_decision.mode.as_str(), mtls_policy = mtls_decision.policy.as_deref(),
            authz_policy = decision.and_then(|d| d.policy.as_deref()),
            authz_rule = decision.and_then(|d| d.rule), per_request,
            bytes_sent = r.sent, bytes_received = r.received,
            duration_ms = start.elapsed().as_millis() as u64, outcome = r.outcome(),
            error = r.error_text().as_deref(),
            "connection closed");
    }
}
