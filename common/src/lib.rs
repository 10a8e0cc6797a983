//! The contract between the eBPF programs (`ebpf/`) and the node proxy (`ztunnel/`).
//!
//! Everything both sides must agree on lives here and only here: the ports the programs steer
//! to, the socket mark, map and program names, the pin layout, the `#[repr(C)]` layout of map
//! keys and values (with their sizes asserted), and the user side's codecs for them, so no
//! other place builds or decodes a key. Addresses are kept exactly as the kernel hands them to
//! BPF programs (network byte order, IPv4 in the first word); ports are kept in host byte order.
#![cfg_attr(not(test), no_std)]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Outbound capture listener, bound to 127.0.0.1 and ::1 inside each enrolled pod's netns.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext listener inside each enrolled pod's netns (target of `sk_lookup`).
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// HBONE (HTTP/2 CONNECT over mTLS) listener inside each enrolled pod's netns.
pub const HBONE_PORT: u16 = 15008;

/// `SO_MARK` carried by every socket the proxy opens; the capture programs never touch them.
/// Same value Istio uses for its own proxy traffic.
pub const PROXY_MARK: u32 = 0x539;

/// `SO_MARK` of the proxy's sockets that deliver inbound connections to the application from
/// the caller's address (docs/capture.md, "Inbound delivery"). The capture programs skip them
/// like [`PROXY_MARK`]; inside an enrolled pod's netns the policy rule
/// `fwmark DELIVERY_MARK lookup DELIVERY_ROUTE_TABLE` routes the application's replies, which
/// inherit the mark (`net.ipv4.tcp_fwmark_accept`), back to the proxy over `lo`.
pub const DELIVERY_MARK: u32 = 0x53a;
/// The routing table of an enrolled pod's netns that holds `local default dev lo`.
pub const DELIVERY_ROUTE_TABLE: u32 = 15006;
/// Priority of the pod netns's rule for [`DELIVERY_MARK`]: before `main` (32766).
pub const DELIVERY_RULE_PRIORITY: u32 = 32700;

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
    /// netns cookie → [`super::PodLocalAddrs`]: the pod's own addresses, which
    /// `zt_getsockname4/6` give a captured socket as its local address.
    pub const POD_LOCAL_ADDRS: &str = "pod_local_addrs";
    /// [`super::DeliveryKey`] → 1: the proxy's own connections to an application that carry
    /// the caller's address, from bind to handshake; `zt_sk_lookup` lets them through.
    pub const INBOUND_DELIVERIES: &str = "inbound_deliveries";
    /// [`super::SocketKey`] → socket (a SOCKHASH): both ends of every app↔proxy connection
    /// on the fast path; `zt_fast_path_msg` runs on their sends (docs/capture.md, "Fast path").
    pub const FAST_PATH_SOCKETS: &str = "fast_path_sockets";
    /// [`super::SocketKey`] → 1 (an LRU): the passive end an active fast-path socket expects
    /// (its mirror key), from the active end's handshake to the passive end's.
    pub const FAST_PATH_PEERS: &str = "fast_path_peers";
    /// [`super::SocketKey`] → [`super::FastPathActive`]: active ends that have not redirected
    /// yet, or never may (their first bytes went through TCP); removed at close.
    pub const FAST_PATH_ACTIVE: &str = "fast_path_active";
    /// Per-CPU counters of the fast path, indexed by [`super::fast_path_stats`].
    pub const FAST_PATH_STATS: &str = "fast_path_stats";
    /// Every map the object must define.
    pub const ALL: [&str; 12] = [
        ENROLLED_NETNS,
        ORIG_DST_BY_SOCKET,
        ORIG_DST_BY_PEER,
        POD_LISTENERS,
        POD_ADDRESSES,
        NODE_CONNECTIONS,
        POD_LOCAL_ADDRS,
        INBOUND_DELIVERIES,
        FAST_PATH_SOCKETS,
        FAST_PATH_PEERS,
        FAST_PATH_ACTIVE,
        FAST_PATH_STATS,
    ];
}

/// Program function names as they appear in the object file (and `bpftool prog show`).
pub mod programs {
    pub const CONNECT4: &str = "zt_connect4";
    pub const CONNECT6: &str = "zt_connect6";
    pub const SOCK_OPS: &str = "zt_sockops";
    pub const GETPEERNAME4: &str = "zt_getpeername4";
    pub const GETPEERNAME6: &str = "zt_getpeername6";
    pub const GETSOCKNAME4: &str = "zt_getsockname4";
    pub const GETSOCKNAME6: &str = "zt_getsockname6";
    pub const SK_LOOKUP: &str = "zt_sk_lookup";
    pub const NODE_SOCK_OPS: &str = "zt_node_sockops";
    pub const FAST_PATH_SOCK_OPS: &str = "zt_fast_path_sockops";
    pub const FAST_PATH_MSG: &str = "zt_fast_path_msg";
    /// Every program the object must define.
    pub const ALL: [&str; 11] = [
        CONNECT4,
        CONNECT6,
        SOCK_OPS,
        GETPEERNAME4,
        GETPEERNAME6,
        GETSOCKNAME4,
        GETSOCKNAME6,
        SK_LOOKUP,
        NODE_SOCK_OPS,
        FAST_PATH_SOCK_OPS,
        FAST_PATH_MSG,
    ];
}

/// Global of the eBPF object the proxy sets at load time: the netns cookie of the node's own
/// network namespace (the one the proxy runs in), whose sockets `zt_node_sockops` records.
pub const NODE_NETNS_COOKIE_GLOBAL: &str = "NODE_NETNS_COOKIE";

/// The layout of a node proxy's pin directory on bpffs (default `/sys/fs/bpf/ztunnel`), which
/// `bpftool … pinned` and `ztunnel bpf status` read:
/// ```text
/// prog_connect4  prog_connect6  prog_sockops  prog_getpeername4  prog_getpeername6  prog_sk_lookup
/// prog_getsockname4  prog_getsockname6  prog_node_sockops
/// link_cgroup_connect4 ... link_cgroup_sockops      cgroup attachments (survive a proxy restart)
/// link_cgroup_node_sockops                          the node's connections to pods (probes)
/// enrolled_netns  orig_dst_by_socket  orig_dst_by_peer  pod_listeners    maps, by their names
/// pod_addresses  node_connections  pod_local_addrs  inbound_deliveries
/// pods/<namespace>_<pod>                            that pod's sk_lookup link
/// prog_fast_path_sockops  prog_fast_path_msg        the same-netns fast path (when on)
/// link_cgroup_fast_path_sockops                     its sock_ops on the pods' cgroup
/// link_proxy_cgroup_fast_path_sockops               and on the proxy's own, if outside it
/// fast_path_sockets  fast_path_peers  fast_path_active  fast_path_stats    its maps
/// ```
pub mod pins {
    use super::programs;

    /// Programs are pinned as `prog_<name>`.
    pub const PROGRAM_PREFIX: &str = "prog_";
    /// Links (attachments) are pinned as `link_…`; the cgroup ones as `link_cgroup_<name>`.
    pub const LINK_PREFIX: &str = "link_";
    /// The directory of the pods' `sk_lookup` links, one per enrolled pod.
    pub const PODS_DIR: &str = "pods";

    /// A program and where it is pinned.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Program {
        /// Its function name in the object ([`programs`]).
        pub name: &'static str,
        /// Its pin, relative to the pin directory.
        pub pin: &'static str,
    }

    /// A program attached to the cgroup, and where that attachment (link) is pinned.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct CgroupProgram {
        pub program: Program,
        pub link: &'static str,
    }

    const fn cgroup(name: &'static str, pin: &'static str, link: &'static str) -> CgroupProgram {
        CgroupProgram {
            program: Program { name, pin },
            link,
        }
    }

    pub const CONNECT4: CgroupProgram =
        cgroup(programs::CONNECT4, "prog_connect4", "link_cgroup_connect4");
    pub const CONNECT6: CgroupProgram =
        cgroup(programs::CONNECT6, "prog_connect6", "link_cgroup_connect6");
    pub const GETPEERNAME4: CgroupProgram = cgroup(
        programs::GETPEERNAME4,
        "prog_getpeername4",
        "link_cgroup_getpeername4",
    );
    pub const GETPEERNAME6: CgroupProgram = cgroup(
        programs::GETPEERNAME6,
        "prog_getpeername6",
        "link_cgroup_getpeername6",
    );
    pub const GETSOCKNAME4: CgroupProgram = cgroup(
        programs::GETSOCKNAME4,
        "prog_getsockname4",
        "link_cgroup_getsockname4",
    );
    pub const GETSOCKNAME6: CgroupProgram = cgroup(
        programs::GETSOCKNAME6,
        "prog_getsockname6",
        "link_cgroup_getsockname6",
    );
    pub const SOCK_OPS: CgroupProgram =
        cgroup(programs::SOCK_OPS, "prog_sockops", "link_cgroup_sockops");
    /// Attached per pod netns; each link is pinned as `pods/<namespace>_<pod>`.
    pub const SK_LOOKUP: Program = Program {
        name: programs::SK_LOOKUP,
        pin: "prog_sk_lookup",
    };

    /// Attached to the node's cgroup (`--node-cgroup`): it records the node's own connections
    /// to enrolled pods (kubelet probes).
    pub const NODE_SOCK_OPS: CgroupProgram = cgroup(
        programs::NODE_SOCK_OPS,
        "prog_node_sockops",
        "link_cgroup_node_sockops",
    );

    /// The fast path's sock_ops, on the pods' cgroup (`--cgroup`).
    pub const FAST_PATH_SOCK_OPS: CgroupProgram = cgroup(
        programs::FAST_PATH_SOCK_OPS,
        "prog_fast_path_sockops",
        "link_cgroup_fast_path_sockops",
    );
    /// The same program's link on the proxy's own cgroup, when that is not below `--cgroup`
    /// (the proxy's accepted and delivering sockets belong to the proxy's cgroup).
    pub const FAST_PATH_PROXY_LINK: &str = "link_proxy_cgroup_fast_path_sockops";
    /// Attached to the `fast_path_sockets` map (not a link: the map holds the attachment).
    pub const FAST_PATH_MSG: Program = Program {
        name: programs::FAST_PATH_MSG,
        pin: "prog_fast_path_msg",
    };

    /// The programs attached to the pods' cgroup, in the order they are attached.
    pub const CGROUP_PROGRAMS: [CgroupProgram; 7] = [
        CONNECT4,
        CONNECT6,
        GETPEERNAME4,
        GETPEERNAME6,
        GETSOCKNAME4,
        GETSOCKNAME6,
        SOCK_OPS,
    ];
}

/// Value of the enrolled-netns map. Present = captured.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledNetns {
    /// Reserved for per-pod switches; zero today.
    pub flags: u32,
}

/// Value of the pod-local-address map: the addresses a pod's own sockets have (its first of
/// each family), network byte order; all zero: none of that family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodLocalAddrs {
    pub v4: u32,
    pub v6: [u32; 4],
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

/// A connection the proxy opens inside a pod's netns to deliver an inbound connection, as the
/// application's side sees it: from the caller's address and the port the proxy's socket is
/// bound to, to the pod's address and the application's port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    /// Network byte order; IPv4 uses word 0 only.
    pub caller_addr: [u32; 4],
    pub pod_addr: [u32; 4],
    /// Host byte order.
    pub caller_port: u16,
    pub pod_port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub _pad: u16,
}

/// One end of a TCP connection, as the socket itself sees it: the key of the fast path's maps.
/// IPv4 (and a v4-mapped IPv6 socket's connection, which travels as IPv4) uses word 0 of the
/// addresses and `AF_INET`, so both ends of one connection build mirror-image keys.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketKey {
    /// The socket's network namespace: the loopback 4-tuples of different pods are equal.
    pub netns_cookie: u64,
    /// Network byte order.
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
    /// Host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub _pad: u16,
}

impl SocketKey {
    /// The key of the other end of the same connection.
    pub const fn peer(&self) -> Self {
        Self {
            netns_cookie: self.netns_cookie,
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
            family: self.family,
            _pad: 0,
        }
    }
}

/// Value of the `fast_path_active` map.
pub type FastPathActive = u32;
/// The active end joined the fast path and has sent nothing yet: its first message decides.
pub const FAST_PATH_PENDING: FastPathActive = 0;
/// Its first message found no peer and went through TCP: every later one must too, or the
/// peer would read redirected bytes before the TCP ones still queued (tcp_bpf reads its
/// redirect queue first).
pub const FAST_PATH_TCP: FastPathActive = 1;

/// Indices of the `fast_path_stats` per-CPU array (each counter is the sum over CPUs).
pub mod fast_path_stats {
    /// Sockets added to `fast_path_sockets` (both ends of each connection that qualified).
    pub const SOCKETS: u32 = 0;
    /// Messages (`sendmsg` calls) moved straight to the peer socket's receive queue.
    pub const REDIRECTED_MSGS: u32 = 1;
    /// Their bytes.
    pub const REDIRECTED_BYTES: u32 = 2;
    /// Messages of fast-path sockets that went through TCP (no peer yet, or never may).
    pub const TCP_MSGS: u32 = 3;
    /// Sockets that qualified but could not join (a map full).
    pub const JOIN_FAILED: u32 = 4;
    /// Active ends whose first message found no peer yet (the passive end's handshake was
    /// still in flight): that direction of the connection stays on TCP.
    pub const ACTIVE_TCP: u32 = 5;
    pub const COUNT: u32 = 6;
    /// Counter names, by index (metrics, `ztunnel bpf status`).
    pub const NAMES: [&str; COUNT as usize] = [
        "sockets",
        "redirected_msgs",
        "redirected_bytes",
        "tcp_msgs",
        "join_failed",
        "active_tcp",
    ];
}

// The layouts both sides compile: a field added, reordered or resized changes these, and the
// kernel and the proxy must then be rebuilt together.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<EnrolledNetns>() == 4);
    assert!(size_of::<OrigDst>() == 32);
    assert!(size_of::<OrigDstKey>() == 16);
    assert!(size_of::<ListenerKey>() == 24);
    assert!(size_of::<PodAddr>() == 20);
    assert!(size_of::<NodeConnKey>() == 40);
    assert!(size_of::<NodeConn>() == 16);
    assert!(size_of::<PodLocalAddrs>() == 20);
    assert!(size_of::<DeliveryKey>() == 40);
    assert!(size_of::<SocketKey>() == 48);
};

/// `ip` as the kernel hands it to BPF programs: its family and its address in network byte
/// order, IPv4 in word 0 and the rest zero.
pub fn addr_words(ip: IpAddr) -> (u16, [u32; 4]) {
    match ip {
        IpAddr::V4(v4) => (AF_INET, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (AF_INET6, [w(0), w(4), w(8), w(12)])
        }
    }
}

/// The address of kernel words (the reverse of [`addr_words`]); `None` for an unknown family.
pub fn addr_from_words(family: u16, words: &[u32; 4]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))),
        AF_INET6 => {
            let mut b = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

impl OrigDst {
    /// Where the application dialled.
    pub fn destination(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(
            addr_from_words(self.family, &self.addr)?,
            self.port,
        ))
    }
}

impl OrigDstKey {
    /// The key of a connection the outbound listener of netns `netns_cookie` accepted from
    /// `peer` (the application socket's own address).
    pub fn of_peer(netns_cookie: u64, peer: SocketAddr) -> Self {
        Self {
            netns_cookie,
            port: peer.port(),
            family: if peer.is_ipv4() { AF_INET } else { AF_INET6 },
            _pad: 0,
        }
    }
}

impl ListenerKey {
    /// The key selecting the `kind` listener (`LISTENER_*`) for pod address `ip`.
    pub fn new(ip: IpAddr, kind: u32) -> Self {
        let (family, addr) = addr_words(ip);
        Self {
            addr,
            family,
            _pad: 0,
            kind,
        }
    }
}

impl PodAddr {
    /// The entry for pod address `ip`.
    pub fn new(ip: IpAddr) -> Self {
        let (family, addr) = addr_words(ip);
        Self {
            addr,
            family,
            _pad: 0,
        }
    }
}

impl PodLocalAddrs {
    /// The entry for a pod with addresses `ips`: the first of each family.
    pub fn of(ips: impl IntoIterator<Item = IpAddr>) -> Self {
        let mut out = Self::default();
        for ip in ips {
            match addr_words(ip) {
                (AF_INET, w) if out.v4 == 0 => out.v4 = w[0],
                (AF_INET6, w) if out.v6 == [0; 4] => out.v6 = w,
                _ => {}
            }
        }
        out
    }
}

impl From<&ListenerKey> for PodAddr {
    /// The pod address a listener entry is for.
    fn from(key: &ListenerKey) -> Self {
        Self {
            addr: key.addr,
            family: key.family,
            _pad: 0,
        }
    }
}

impl NodeConnKey {
    /// The key `zt_node_sockops` writes for a connection from `node` to `pod`; `None` when
    /// the two are of different families. A v4-mapped IPv6 address is keyed as IPv4.
    pub fn new(node: SocketAddr, pod: SocketAddr) -> Option<Self> {
        let canonical = |ip: IpAddr| match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        let (family, node_addr) = addr_words(canonical(node.ip()));
        let (pod_family, pod_addr) = addr_words(canonical(pod.ip()));
        (family == pod_family).then_some(Self {
            node_addr,
            pod_addr,
            node_port: node.port(),
            pod_port: pod.port(),
            family,
            _pad: 0,
        })
    }
}

impl DeliveryKey {
    /// The key of a delivery from `caller` (the proxy socket's bound address) to `pod`;
    /// `None` when the two are of different families.
    pub fn new(caller: SocketAddr, pod: SocketAddr) -> Option<Self> {
        let (family, caller_addr) = addr_words(caller.ip());
        let (pod_family, pod_addr) = addr_words(pod.ip());
        (family == pod_family).then_some(Self {
            caller_addr,
            pod_addr,
            caller_port: caller.port(),
            pod_port: pod.port(),
            family,
            _pad: 0,
        })
    }
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
    unsafe impl aya::Pod for super::PodLocalAddrs {}
    unsafe impl aya::Pod for super::DeliveryKey {}
    unsafe impl aya::Pod for super::SocketKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_destinations_decode_from_kernel_byte_order() {
        let v4 = OrigDst {
            addr: [u32::from_ne_bytes([10, 2, 0, 3]), 0, 0, 0],
            port: 8080,
            family: AF_INET,
            ..Default::default()
        };
        assert_eq!(v4.destination(), Some("10.2.0.3:8080".parse().unwrap()));
        let ip: Ipv6Addr = "fd00::1:2".parse().unwrap();
        let o = ip.octets();
        let words =
            [0, 1, 2, 3].map(|i| u32::from_ne_bytes(o[i * 4..i * 4 + 4].try_into().unwrap()));
        let v6 = OrigDst {
            addr: words,
            port: 443,
            family: AF_INET6,
            ..Default::default()
        };
        assert_eq!(v6.destination(), Some("[fd00::1:2]:443".parse().unwrap()));
        let bad = OrigDst {
            family: 99,
            ..Default::default()
        };
        assert_eq!(bad.destination(), None);
    }

    #[test]
    fn keys_encode_as_the_kernel_reads_them() {
        for ip in ["10.1.0.2", "fd00::1:2"] {
            let ip: IpAddr = ip.parse().unwrap();
            let (family, words) = addr_words(ip);
            assert_eq!(addr_from_words(family, &words), Some(ip));
            let key = ListenerKey::new(ip, LISTENER_HBONE);
            assert_eq!(
                (key.family, key.addr, key.kind),
                (family, words, LISTENER_HBONE)
            );
        }
        let (_, v4) = addr_words("10.1.0.2".parse().unwrap());
        assert_eq!(v4, [u32::from_ne_bytes([10, 1, 0, 2]), 0, 0, 0]);
        let key = OrigDstKey::of_peer(7, "[::1]:40000".parse().unwrap());
        assert_eq!(
            (key.netns_cookie, key.port, key.family),
            (7, 40000, AF_INET6)
        );
    }

    #[test]
    fn delivery_keys_are_the_applications_view_of_the_connection() {
        let caller: SocketAddr = "10.1.0.2:40000".parse().unwrap();
        let pod: SocketAddr = "10.2.0.2:8080".parse().unwrap();
        let key = DeliveryKey::new(caller, pod).unwrap();
        assert_eq!(key.caller_addr, addr_words(caller.ip()).1);
        assert_eq!(key.pod_addr, addr_words(pod.ip()).1);
        assert_eq!(
            (key.caller_port, key.pod_port, key.family),
            (40000, 8080, AF_INET)
        );
        let v6: SocketAddr = "[fd00::2]:8080".parse().unwrap();
        assert_eq!(DeliveryKey::new(caller, v6), None, "families differ");
    }

    #[test]
    fn pod_local_addresses_keep_the_first_of_each_family() {
        let ips = ["10.1.0.2", "fd00::2", "10.1.0.3", "fd00::3"].map(|ip| ip.parse().unwrap());
        let a = PodLocalAddrs::of(ips);
        assert_eq!(a.v4, addr_words(ips[0]).1[0]);
        assert_eq!(a.v6, addr_words(ips[1]).1);
        assert_eq!(PodLocalAddrs::of([ips[0]]).v6, [0; 4], "no IPv6: zero");
    }

    #[test]
    fn every_program_has_its_pins() {
        let cgroup: [pins::CgroupProgram; 9] = [
            pins::CONNECT4,
            pins::CONNECT6,
            pins::GETPEERNAME4,
            pins::GETPEERNAME6,
            pins::GETSOCKNAME4,
            pins::GETSOCKNAME6,
            pins::SOCK_OPS,
            pins::NODE_SOCK_OPS,
            pins::FAST_PATH_SOCK_OPS,
        ];
        for c in cgroup {
            assert!(c.link.starts_with(pins::LINK_PREFIX));
        }
        assert!(pins::FAST_PATH_PROXY_LINK.starts_with(pins::LINK_PREFIX));
        let cgroup = cgroup.map(|c| c.program);
        // Not on a cgroup: sk_lookup on each pod's netns, sk_msg on the fast path's sockhash.
        let others = [&pins::SK_LOOKUP, &pins::FAST_PATH_MSG];
        for p in cgroup.iter().chain(others) {
            assert!(programs::ALL.contains(&p.name));
            assert!(p.pin.starts_with(pins::PROGRAM_PREFIX));
        }
        assert_eq!(cgroup.len() + others.len(), programs::ALL.len());
    }
}
