//! Inbound plaintext: TCP from outside an enrolled pod, steered by `zt_sk_lookup` to the pod's
//! 15006 listener. The accepted socket's local address is the original destination.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use super::{
    is_proxy_port,
    relay::{relay, reset},
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
        let snapshot = self.snapshot();
        let src_workload = snapshot.pod_by_ip(peer.ip()).map(|p| p.workload());
        let refuse = |stream: TcpStream, outcome: &str, reason: &str| {
            info!(direction = "inbound", src_workload = src_workload.as_deref(), src_addr = %peer,
                dst_addr = %dst, dst_workload = %pod.workload,
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
        let upstream = match self.connect_from(&pod, dst).await {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("delivery to the application failed: {e}");
                return refuse(stream, "connect_failed", &reason);
            }
        };
        let r = relay(stream, upstream).await;
        info!(direction = "inbound", src_workload = src_workload.as_deref(), src_addr = %peer,
            dst_addr = %dst, dst_workload = %pod.workload, upstream = %dst,
            bytes_sent = r.sent, bytes_received = r.received,
            duration_ms = start.elapsed().as_millis() as u64,
            outcome = if r.error.is_some() { "error" } else { "ok" },
            error = r.error.as_ref().map(|e| e.to_string()).as_deref(), "connection closed");
    }
}
