//! Plaintext from the node itself: the kubelet's health probes of enrolled pods.
//!
//! The kubelet has no mesh identity, so under STRICT its HTTP and TCP probes would be refused
//! and the pods would never become Ready. Istio exempts them by source-NATing connections that
//! a socket of the node made (iptables `-m owner --socket-exists`) to 169.254.7.127 and letting
//! that address through. Here the kernel tells the same thing without a rule: `zt_node_sockops`
//! records, by 4-tuple, every TCP connection a socket of the node's own network namespace opens
//! to an enrolled pod's address, from its SYN until it closes, and marks it once that socket
//! has completed the handshake. A connection the pod's plaintext listener accepts whose 4-tuple
//! is such a record was made by the node; one that merely carries the node's address (a pod
//! behind hairpin NAT or portmap, a forged packet) has no socket on the node and no record.
//!
//! Exempted, as in Istio: PeerAuthentication (STRICT) and AuthorizationPolicy, for plaintext
//! arriving at the pod from a socket of the node's network namespace (the kubelet, and any
//! host-network process or pod of the node). Nothing else changes: mesh traffic, HBONE and
//! plaintext from anywhere else are decided as before.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;
use tracing::info;

use super::{is_proxy_port, relay::relay, PodContext, Proxy};
use crate::admin::metrics::{ConnectionLabels, NodeConnectionLabels};

/// What the node appears as in metrics and logs (`source_workload`, `src_workload`).
pub const NODE_SOURCE: &str = "node";

impl Proxy {
    /// Whether the connection `peer` → `dst` accepted for a pod was made by the node itself.
    pub(super) fn made_by_node(&self, peer: SocketAddr, dst: SocketAddr) -> bool {
        self.node_connections.take_established(peer, dst)
    }

    /// Delivers a connection from the node to the application, past the pod's policies.
    pub(super) async fn inbound_from_node(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        stream: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
    ) {
        let start = Instant::now();
        let count = |outcome: &'static str| {
            self.metrics
                .node_connections
                .get_or_create(&NodeConnectionLabels { outcome })
                .inc()
        };
        let log = |outcome: &str, error: Option<&str>, bytes: (u64, u64)| {
            info!(direction = "inbound", transport = "node", src_workload = NODE_SOURCE,
                src_addr = %peer, dst_addr = %dst, dst_workload = %pod.workload,
                exempt = "connection from the node itself (kubelet probe): PeerAuthentication and AuthorizationPolicy do not apply",
                bytes_sent = bytes.0, bytes_received = bytes.1,
                duration_ms = start.elapsed().as_millis() as u64, outcome, error,
                "connection closed");
        };
        if is_proxy_port(dst.port()) {
            count("refused");
            log(
                "refused",
                Some("destination port is reserved for the proxy"),
                (0, 0),
            );
            return super::reset(stream);
        }
        let upstream = match self.connect_from(&pod, dst).await {
            Ok(s) => s,
            Err(e) => {
                count("connect_failed");
                let reason = format!("delivery to the application failed: {e}");
                log("connect_failed", Some(&reason), (0, 0));
                return super::reset(stream);
            }
        };
        count("admitted");
        let mut counted = self.metrics.open(ConnectionLabels::new(
            "destination",
            "node",
            (Some(&format!("{NODE_SOURCE}/{NODE_SOURCE}")), None),
            (Some(&pod.workload), Some(pod.identity.to_string())),
            false,
        ));
        let r = relay(stream, upstream).await;
        counted.bytes(r.sent, r.received);
        log(r.outcome(), r.error_text().as_deref(), (r.sent, r.received));
    }
}
