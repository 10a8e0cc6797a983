//! The contract between the eBPF programs (`ebpf/`) and the node proxy (`ztunnel/`).
//!
//! Everything both sides must agree on lives here and only here: ports, the socket mark, map
//! names, and the `#[repr(C)]` layout of map keys and values. Addresses are kept exactly as the
//! kernel hands them to BPF programs (network byte order, IPv4 in the first word); ports are kept
//! in host byte order.
#![no_std]

/// Outbound capture listener, bound to 127.0.0.1 and ::1 inside each enrolled pod's netns.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext listener inside each enrolled pod's netns (target of `sk_lookup`).
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// HBONE (HTTP/2 CONNECT over mTLS) listener inside each enrolled pod's netns.
pub const HBONE_PORT: u16 = 15008;
/// Prometheus metrics, on the node.
pub const METRICS_PORT: u16 = 15020;
/// Readiness probe, on the node.
pub const READINESS_PORT: u16 = 15021;
/// Admin API, on the node's loopback only.
pub const ADMIN_PORT: u16 = 15000;

/// `SO_MARK` carried by every socket the proxy opens; the capture programs never touch them.
/// Same value Istio uses for its own proxy traffic.
pub const PROXY_MARK: u32 = 0x539;

/// ifindex of `lo` in every network namespace (the kernel registers it first).
pub const LOOPBACK_IFINDEX: u32 = 1;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Map names, which are also their file names under the pin directory.
pub mod maps {
    /// netns cookie → [`super::EnrolledNetns`]: which pod network namespaces are captured.
    pub const ENROLLED_NETNS: &str = "enrolled_netns";
    /// socket cookie → [`super::OrigDst`]: written at connect, read by sock_ops and getpeername.
    pub const ORIG_DST_BY_SOCKET: &str = "orig_dst_by_socket";
    /// [`super::OrigDstKey`] → [`super::OrigDst`]: what the proxy reads for an accepted socket.
    pub const ORIG_DST_BY_PEER: &str = "orig_dst_by_peer";
    /// [`super::ListenerKey`] → the proxy's listening socket for a pod address (a SOCKHASH).
    pub const POD_LISTENERS: &str = "pod_listeners";
    /// [`super::PodAddr`] → 1: the addresses of enrolled pods, for `zt_node_sockops`.
    pub const POD_ADDRESSES: &str = "pod_addresses";
    /// [`super::NodeConnKey`] → [`super::NodeConn`]: TCP connections that sockets of the node's
    /// own network namespace opened to enrolled pods (kubelet probes).
    pub const NODE_CONNECTIONS: &str = "node_connections";
}

/// Program function names as they appear in the object file (and `bpftool prog show`).
pub mod programs {
    pub const CONNECT4: &str = "zt_connect4";
    pub const CONNECT6: &str = "zt_connect6";
    pub const SOCK_OPS: &str = "zt_sockops";
    pub const GETPEERNAME4: &str = "zt_getpeername4";
    pub const GETPEERNAME6: &str = "zt_getpeername6";
    pub const SK_LOOKUP: &str = "zt_sk_lookup";
    pub const NODE_SOCK_OPS: &str = "zt_node_sockops";
}

/// Global of the eBPF object the proxy sets at load time: the netns cookie of the node's own
/// network namespace (the one the proxy runs in), whose sockets `zt_node_sockops` records.
pub const NODE_NETNS_COOKIE_GLOBAL: &str = "NODE_NETNS_COOKIE";

/// Value of the enrolled-netns map. Present = captured.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledNetns {
    /// Reserved for per-pod switches; zero today.
    pub flags: u32,
}

/// Original destination of a captured outbound connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Destination address, network byte order; IPv4 uses word 0 only.
    pub addr: [u32; 4],
    /// Destination port, host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6` of `addr`.
    pub family: u16,
    /// Family of the proxy listener the connection was sent to (a v4-mapped connect from an
    /// IPv6 socket travels as IPv4); part of [`OrigDstKey`].
    pub listener_family: u16,
    pub _pad: u16,
    /// Network namespace the connection was made in.
    pub netns_cookie: u64,
}

/// How the proxy finds the original destination of a connection it accepted on the outbound
/// listener: the app socket's netns and local (ephemeral) port, which is the accepted peer port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigDstKey {
    pub netns_cookie: u64,
    /// Local port of the application's socket, host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6` of the application's socket.
    pub family: u16,
    pub _pad: u32,
}

/// Which kind of listener a [`ListenerKey`] selects.
pub const LISTENER_INBOUND_PLAINTEXT: u32 = 0;
pub const LISTENER_HBONE: u32 = 1;

/// Key of the pod-listener SOCKHASH: the pod address a connection arrived for, and which
/// listener (plaintext or HBONE) should take it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// Pod address, network byte order; IPv4 uses word 0 only, the rest is zero.
    pub addr: [u32; 4],
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub _pad: u16,
    /// `LISTENER_INBOUND_PLAINTEXT` or `LISTENER_HBONE`.
    pub kind: u32,
}

/// Key of the pod-address set: an enrolled pod's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodAddr {
    /// Network byte order; IPv4 uses word 0 only, the rest is zero.
    pub addr: [u32; 4],
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub _pad: u16,
}

/// A TCP connection from the node to a pod, as both ends see it (there is no NAT between a
/// node and its own pods): the node's address and port, the pod's address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConnKey {
    /// Network byte order; IPv4 uses word 0 only. A v4-mapped IPv6 connection is keyed as IPv4.
    pub node_addr: [u32; 4],
    pub pod_addr: [u32; 4],
    /// Host byte order.
    pub node_port: u16,
    pub pod_port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub _pad: u16,
}

/// `NodeConn::state`: the node's socket has sent its SYN.
pub const NODE_CONN_CONNECTING: u32 = 0;
/// `NodeConn::state`: the node's socket completed the handshake (it received the pod's SYN-ACK
/// and is about to send the final ACK), so the connection the pod accepts is this one.
pub const NODE_CONN_ESTABLISHED: u32 = 1;

/// Value of the node-connection map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConn {
    /// Cookie of the node's socket.
    pub socket_cookie: u64,
    /// `NODE_CONN_CONNECTING` or `NODE_CONN_ESTABLISHED`.
    pub state: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid, padding is explicit.
    unsafe impl aya::Pod for super::EnrolledNetns {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::OrigDstKey {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::PodAddr {}
    unsafe impl aya::Pod for super::NodeConnKey {}
    unsafe impl aya::Pod for super::NodeConn {}
}
