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
    is_proxy_port,
    relay::{relay_until, reset},
    PodContext, Proxy,
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
        // This connection's own view of the configuration: the decision below and every later
        // re-check read it, so none of them is skipped.
        let mut config = self.config.clone();
        let snapshot = config.borrow_and_update().clone();
        let src_workload = snapshot.pod_by_ip(peer.ip()).map(|p| p.workload());
        let mtls = self.mtls_mode(&snapshot, &pod, dst.port());
        let refuse = |stream: TcpStream, outcome: &str, reason: &str| {
            info!(direction = "inbound", src_workload = src_workload.as_deref(), src_addr = %peer,
                dst_addr = %dst, dst_workload = %pod.workload,
                mtls_mode = mtls.as_ref().map(|d| d.mode.as_str()),
                mtls_policy = mtls.as_ref().and_then(|d| d.policy.as_deref()),
                duration_ms = start.elapsed().as_millis() as u64, outcome,
                error = reason, "connection closed");
            reset(stream);
        };
        // Only sk_lookup puts connections here, and it never steers loopback traffic; the
        // proxy's own ports are not services (forwarding to them would loop back here).
        if peer.ip().is_loopback() {
            return refuse(
                stream,
                "refused",
                "connection did not arrive from outside the pod",
            );
        }
        if is_proxy_port(dst.port()) {
            return refuse(
                stream,
                "refused",
                "destination port is reserved for the proxy",
            );
        }
        let Some(decision) = &mtls else {
            return refuse(
                stream,
                "refused",
                "the pod is no longer in the configuration",
            );
        };
        let counter = &self.counters.plaintext_by_mtls_mode;
        if !decision.mode.accepts_plaintext() {
            counter.add(&format!("{}/refused", decision.mode));
            let reason = format!("plaintext refused: mTLS mode {decision}");
            return refuse(stream, "refused", &reason);
        }
        let upstream = match self.connect_from(&pod, dst).await {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("delivery to the application failed: {e}");
                return refuse(stream, "connect_failed", &reason);
            }
        };
        counter.add(&format!("{}/allowed", decision.mode));
        // A policy change that makes this port STRICT ends the connection; other changes
        // leave it alone.
        let revoke = async {
            loop {
                if config.changed().await.is_err() {
                    return std::future::pending().await;
                }
                let snapshot = config.borrow_and_update().clone();
                match self.mtls_mode(&snapshot, &pod, dst.port()) {
                    Some(d) if !d.mode.accepts_plaintext() => {
                        counter.add(&format!("{}/revoked", d.mode));
                        return format!("plaintext no longer accepted: mTLS mode {d}");
                    }
                    // A pod leaving the configuration is un-enrolled; like every proxied
                    // connection, this one goes on until it ends.
                    _ => {}
                }
            }
        };
        let r = relay_until(stream, upstream, revoke).await;
        info!(direction = "inbound", src_workload = src_workload.as_deref(), src_addr = %peer,
            dst_addr = %dst, dst_workload = %pod.workload, upstream = %dst,
            mtls_mode = decision.mode.as_str(), mtls_policy = decision.policy.as_deref(),
            bytes_sent = r.sent, bytes_received = r.received,
            duration_ms = start.elapsed().as_millis() as u64, outcome = r.outcome(),
            error = r.revoked.clone().or_else(|| r.error.as_ref().map(|e| e.to_string())).as_deref(),
            "connection closed");
    }
}
