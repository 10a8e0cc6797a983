//! The node proxy's ports (docs/operations.md). The kernel steers captured traffic to the three capture
//! ports, so those are part of its contract ([`ztunnel_common`]); the operator's ports are the
//! proxy's own.
pub use ztunnel_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

/// Prometheus metrics, on the node.
pub const METRICS_PORT: u16 = 15020;
/// Readiness probe, on the node.
pub const READINESS_PORT: u16 = 15021;
/// Admin API, on the node's loopback only.
pub const ADMIN_PORT: u16 = 15000;

/// Ports of the proxy itself; traffic addressed to them is never forwarded (it would loop).
pub fn is_proxy_port(port: u16) -> bool {
    [
        OUTBOUND_PORT,
        INBOUND_PLAINTEXT_PORT,
        HBONE_PORT,
        METRICS_PORT,
        READINESS_PORT,
        ADMIN_PORT,
    ]
    .contains(&port)
}
