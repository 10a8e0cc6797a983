//! Traffic capture for enrolled pods, without iptables (docs/capture.md).
//!
//! * `zt_connect4/6` (cgroup, attached once per node): a TCP connect from an enrolled pod netns is
//!   sent to the proxy's outbound listener in that same netns; the original destination is
//!   remembered under the socket cookie.
//! * `zt_sockops` (cgroup): once the redirected connection is established, the record is re-keyed
//!   by (netns, local port) — the peer the proxy sees when it accepts.
//! * `zt_getpeername4/6` (cgroup): the application sees its original destination as its peer.
//! * `zt_getsockname4/6` (cgroup): and its pod address as its local address (the port is the
//!   socket's own), not the loopback address the redirected connection really has.
//! * `zt_sk_lookup` (one link per pod netns): TCP arriving from outside the pod is handed to the
//!   proxy's inbound listeners for the destination pod address; with no listener it is dropped.
//! * `zt_node_sockops` (cgroup, where the node's own processes live): records the TCP
//!   connections that sockets of the node's network namespace (the kubelet's probes) open to
//!   enrolled pods, by 4-tuple, from SYN to close; the proxy admits exactly those in plaintext.
//! * `zt_fast_path_sockops` (cgroup, with `--fast-path on`) and `zt_fast_path_msg` (on the
//!   `fast_path_sockets` SOCKHASH): both ends of each app↔proxy connection inside an enrolled
//!   pod netns join the sockhash when established; a message one end sends goes straight into
//!   the other end's receive queue, without the loopback TCP stack (docs/capture.md, "Fast
//!   path"). The proxy still reads and writes every byte.
//!
//! The proxy's own sockets carry `PROXY_MARK` (or `DELIVERY_MARK`, those that deliver to an
//! application from the caller's address) and are never redirected.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod capture {
    use aya_ebpf::{
        bindings::{sk_action, BPF_F_INGRESS, BPF_SK_LOOKUP_F_REPLACE, BPF_SOCK_OPS_STATE_CB_FLAG},
        helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
        macros::{cgroup_sock_addr, map, sk_lookup, sk_msg, sock_ops},
        maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
        programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext},
        EbpfContext,
    };
    use ztunnel_common::{
        fast_path_stats, DeliveryKey, EnrolledNetns, FastPathActive, ListenerKey, NodeConn,
        NodeConnKey, OrigDst, OrigDstKey, PodAddr, PodLocalAddrs, SocketKey, AF_INET, AF_INET6,
        DELIVERY_MARK, FAST_PATH_PENDING, FAST_PATH_TCP, HBONE_PORT, INBOUND_PLAINTEXT_PORT,
        LISTENER_HBONE, LISTENER_INBOUND_PLAINTEXT, LOOPBACK_IFINDEX, NODE_CONN_CONNECTING,
        NODE_CONN_ESTABLISHED, OUTBOUND_PORT, PROXY_MARK,
    };

    const SOCK_STREAM: u32 = 1;
    const IPPROTO_TCP: u32 = 6;
    const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
    const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
    const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
    const BPF_SOCK_OPS_STATE_CB: u32 = 10;
    const TCP_CLOSE: u32 = 7;
    /// cgroup/sock_addr verdicts.
    const ALLOW: i32 = 1;
    const REJECT: i32 = 0;

    #[map(name = "enrolled_netns")]
    static ENROLLED_NETNS: HashMap<u64, EnrolledNetns> = HashMap::pinned(16_384, 0);

    #[map(name = "orig_dst_by_socket")]
    static ORIG_DST_BY_SOCKET: LruHashMap<u64, OrigDst> = LruHashMap::pinned(262_144, 0);

    #[map(name = "orig_dst_by_peer")]
    static ORIG_DST_BY_PEER: LruHashMap<OrigDstKey, OrigDst> = LruHashMap::pinned(262_144, 0);

    #[map(name = "pod_listeners")]
    static POD_LISTENERS: SockHash<ListenerKey> = SockHash::pinned(65_536, 0);

    #[map(name = "pod_addresses")]
    static POD_ADDRESSES: HashMap<PodAddr, u8> = HashMap::pinned(65_536, 0);

    #[map(name = "node_connections")]
    static NODE_CONNECTIONS: LruHashMap<NodeConnKey, NodeConn> = LruHashMap::pinned(65_536, 0);

    #[map(name = "pod_local_addrs")]
    static POD_LOCAL_ADDRS: HashMap<u64, PodLocalAddrs> = HashMap::pinned(16_384, 0);

    /// Written by the proxy only, for as long as each delivery connects. Not an LRU: an entry
    /// evicted while its SYN is in flight would send the proxy's own connection back to it.
    /// Allocated on demand (it holds only the handshakes in progress).
    #[map(name = "inbound_deliveries")]
    static INBOUND_DELIVERIES: HashMap<DeliveryKey, u8> =
        HashMap::pinned(65_536, BPF_F_NO_PREALLOC);
    const BPF_F_NO_PREALLOC: u32 = 1;

    /// Both ends of the app↔proxy connections on the fast path.
    #[map(name = "fast_path_sockets")]
    static FAST_PATH_SOCKETS: SockHash<SocketKey> = SockHash::pinned(131_072, 0);

    /// The passive ends the active ones announced. An LRU: an entry whose handshake never
    /// completes ages out, and one evicted early only keeps that connection off the fast path.
    #[map(name = "fast_path_peers")]
    static FAST_PATH_PEERS: LruHashMap<SocketKey, u8> = LruHashMap::pinned(65_536, 0);

    /// Active ends that have not decided yet, or went through TCP. Not an LRU: a `TCP` entry
    /// evicted would let that socket redirect behind its own queued TCP bytes.
    #[map(name = "fast_path_active")]
    static FAST_PATH_ACTIVE: HashMap<SocketKey, FastPathActive> =
        HashMap::pinned(65_536, BPF_F_NO_PREALLOC);

    #[map(name = "fast_path_stats")]
    static FAST_PATH_STATS: PerCpuArray<u64> = PerCpuArray::pinned(fast_path_stats::COUNT, 0);

    /// The netns cookie of the node's own network namespace, set by the proxy at load time
    /// (`NODE_NETNS_COOKIE_GLOBAL`). Zero: not set, nothing is recorded.
    #[unsafe(no_mangle)]
    static NODE_NETNS_COOKIE: u64 = 0;

    /// The network-order word of `::ffff:0:0/96` prefix's third word.
    const V4_MAPPED_WORD: u32 = 0x0000_ffffu32.to_be();
    const IPV4_LOOPBACK: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
    const IPV6_LOOPBACK_LAST: u32 = 1u32.to_be();

    fn is_v4_local(addr_be: u32) -> bool {
        // 127.0.0.0/8 and 0.0.0.0 (which connect() treats as "this host").
        let host = u32::from_be(addr_be);
        host >> 24 == 127 || host == 0
    }

    /// Decides whether this connect() must be captured; returns the netns cookie if so.
    fn capture_netns(ctx: &SockAddrContext) -> Option<u64> {
        // SAFETY: the verifier guarantees `sock_addr` and its `sk` are valid for this program.
        let (sock_type, mark) = unsafe {
            let sa = &*ctx.sock_addr;
            (sa.type_, (*sa.__bindgen_anon_1.sk).mark)
        };
        if sock_type != SOCK_STREAM || mark == PROXY_MARK || mark == DELIVERY_MARK {
            return None;
        }
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        // SAFETY: read-only lookup of a plain value.
        unsafe { ENROLLED_NETNS.get(&netns) }?;
        Some(netns)
    }

    fn remember(ctx: &SockAddrContext, dst: OrigDst) -> i32 {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // Without a record the proxy could not route the connection: refuse it (fail closed).
        match ORIG_DST_BY_SOCKET.insert(&cookie, &dst, 0) {
            Ok(()) => ALLOW,
            Err(_) => REJECT,
        }
    }

    #[cgroup_sock_addr(connect4)]
    pub fn zt_connect4(ctx: SockAddrContext) -> i32 {
        let Some(netns) = capture_netns(&ctx) else {
            return ALLOW;
        };
        let sa = ctx.sock_addr;
        // SAFETY: `user_ip4`/`user_port` are readable and writable in connect4.
        let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
        if is_v4_local(ip) {
            return ALLOW;
        }
        let dst = OrigDst {
            addr: [ip, 0, 0, 0],
            port: u16::from_be(port as u16),
            family: AF_INET,
            listener_family: AF_INET,
            _pad: 0,
            netns_cookie: netns,
        };
        let verdict = remember(&ctx, dst);
        if verdict == ALLOW {
            unsafe {
                (*sa).user_ip4 = IPV4_LOOPBACK;
                (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
            }
        }
        verdict
    }

    #[cgroup_sock_addr(connect6)]
    pub fn zt_connect6(ctx: SockAddrContext) -> i32 {
        let Some(netns) = capture_netns(&ctx) else {
            return ALLOW;
        };
        let sa = ctx.sock_addr;
        let (ip, port) = unsafe { ((*sa).user_ip6, (*sa).user_port) };
        let v4_mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD;
        let local = if v4_mapped {
            is_v4_local(ip[3])
        } else {
            ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == 0 || ip[3] == IPV6_LOOPBACK_LAST)
        };
        if local {
            return ALLOW;
        }
        let (addr, family) = if v4_mapped {
            ([ip[3], 0, 0, 0], AF_INET)
        } else {
            (ip, AF_INET6)
        };
        // A v4-mapped connect travels as IPv4 and reaches the proxy's IPv4 listener.
        let dst = OrigDst {
            addr,
            port: u16::from_be(port as u16),
            family,
            listener_family: family,
            _pad: 0,
            netns_cookie: netns,
        };
        let verdict = remember(&ctx, dst);
        if verdict == ALLOW {
            let target = if v4_mapped {
                [0, 0, V4_MAPPED_WORD, IPV4_LOOPBACK]
            } else {
                [0, 0, 0, IPV6_LOOPBACK_LAST]
            };
            // SAFETY: `user_ip6` and `user_port` are writable in connect6.
            unsafe {
                set_user_ip6(&ctx, target);
                (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
            }
        }
        verdict
    }

    #[sock_ops]
    pub fn zt_sockops(ctx: SockOpsContext) -> u32 {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        match ctx.op() {
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
                // SAFETY: read-only lookup of a plain value.
                let Some(dst) = (unsafe { ORIG_DST_BY_SOCKET.get(&cookie) }) else {
                    return 0;
                };
                let key = OrigDstKey {
                    netns_cookie: dst.netns_cookie,
                    port: ctx.local_port() as u16,
                    family: dst.listener_family,
                    _pad: 0,
                };
                let _ = ORIG_DST_BY_PEER.insert(&key, dst, 0);
                // Ask for state changes so the records go away with the socket.
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
            BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
                if let Some(dst) = unsafe { ORIG_DST_BY_SOCKET.get(&cookie) } {
                    let key = OrigDstKey {
                        netns_cookie: dst.netns_cookie,
                        port: ctx.local_port() as u16,
                        family: dst.listener_family,
                        _pad: 0,
                    };
                    let _ = ORIG_DST_BY_PEER.remove(&key);
                    let _ = ORIG_DST_BY_SOCKET.remove(&cookie);
                }
            }
            _ => {}
        }
        0
    }

    /// Reads a `bpf_sock_ops` field with one load at its fixed offset (see `ctx_field!`).
    macro_rules! ops_field {
        ($ops:expr, $field:ident) => {
            // SAFETY: the verifier allows 4-byte reads of these sock_ops context fields.
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ops).$field)) }
        };
        ($ops:expr, $field:ident[$i:literal]) => {
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ops).$field[$i])) }
        };
    }

    /// The connection as (node address and port, pod address and port), if this socket lives
    /// in the node's own network namespace.
    fn node_connection(ctx: &SockOpsContext) -> Option<NodeConnKey> {
        // SAFETY: reading a global the loader has set (it lives in .rodata).
        let node = unsafe { core::ptr::read_volatile(&NODE_NETNS_COOKIE) };
        if node == 0 || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != node {
            return None;
        }
        let ops = ctx.ops;
        let (node_addr, pod_addr, family) = if ops_field!(ops, family) == u32::from(AF_INET) {
            (
                [ops_field!(ops, local_ip4), 0, 0, 0],
                [ops_field!(ops, remote_ip4), 0, 0, 0],
                AF_INET,
            )
        } else if ops_field!(ops, family) == u32::from(AF_INET6) {
            let local = [
                ops_field!(ops, local_ip6[0]),
                ops_field!(ops, local_ip6[1]),
                ops_field!(ops, local_ip6[2]),
                ops_field!(ops, local_ip6[3]),
            ];
            let remote = [
                ops_field!(ops, remote_ip6[0]),
                ops_field!(ops, remote_ip6[1]),
                ops_field!(ops, remote_ip6[2]),
                ops_field!(ops, remote_ip6[3]),
            ];
            // A v4-mapped connection of a dual-stack socket travels as IPv4: the pod's
            // listener sees IPv4 addresses.
            if remote[0] == 0 && remote[1] == 0 && remote[2] == V4_MAPPED_WORD {
                ([local[3], 0, 0, 0], [remote[3], 0, 0, 0], AF_INET)
            } else {
                (local, remote, AF_INET6)
            }
        } else {
            return None;
        };
        // `local_port` is in host byte order; `remote_port` holds the network-order port in
        // its upper 16 bits on little-endian machines.
        let node_port = ops_field!(ops, local_port) as u16;
        let pod_port = u16::from_be((ops_field!(ops, remote_port) >> 16) as u16);
        Some(NodeConnKey {
            node_addr,
            pod_addr,
            node_port,
            pod_port,
            family,
            _pad: 0,
        })
    }

    /// Records the node's connections to enrolled pods from SYN to close, so the proxy can tell
    /// a connection the node itself made (a kubelet probe) from one that only carries the
    /// node's address (a pod behind NAT, a forged packet): only the first has a socket here.
    #[sock_ops]
    pub fn zt_node_sockops(ctx: SockOpsContext) -> u32 {
        let op = ctx.op();
        if op != BPF_SOCK_OPS_TCP_CONNECT_CB
            && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
            && !(op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == TCP_CLOSE)
        {
            return 0;
        }
        let Some(key) = node_connection(&ctx) else {
            return 0;
        };
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
            let pod = PodAddr {
                addr: key.pod_addr,
                family: key.family,
                _pad: 0,
            };
            // SAFETY: read-only lookup of a plain value.
            if unsafe { POD_ADDRESSES.get(&pod) }.is_none() {
                return 0;
            }
            let conn = NodeConn {
                socket_cookie: cookie,
                state: NODE_CONN_CONNECTING,
                _pad: 0,
            };
            if NODE_CONNECTIONS.insert(&key, &conn, 0).is_ok() {
                // Established and close callbacks, so the record follows the socket.
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
            return 0;
        }
        // SAFETY: read-only lookup of a plain value.
        let Some(conn) = (unsafe { NODE_CONNECTIONS.get(&key) }).copied() else {
            return 0;
        };
        if conn.socket_cookie != cookie {
            return 0;
        }
        if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
            // Runs before this socket sends the handshake's final ACK, hence before the pod
            // side can accept the connection.
            let conn = NodeConn {
                state: NODE_CONN_ESTABLISHED,
                ..conn
            };
            let _ = NODE_CONNECTIONS.insert(&key, &conn, 0);
        } else {
            let _ = NODE_CONNECTIONS.remove(&key);
        }
        0
    }

    fn count(index: u32, n: u64) {
        if let Some(c) = FAST_PATH_STATS.get_ptr_mut(index) {
            // SAFETY: a per-CPU slot: nothing else writes it while this program runs here.
            unsafe { *c += n };
        }
    }

    /// The 16-bit network-order port of a context's `remote_port`, which some program types
    /// give in the upper half of the word (little-endian) and others in the lower half: the
    /// other half is zero either way.
    fn remote_port_of(word: u32) -> u16 {
        u16::from_be(((word >> 16) | (word & 0xffff)) as u16)
    }

    /// A socket key from a context's address fields; a v4-mapped connection of an IPv6 socket
    /// becomes the IPv4 key its peer (an IPv4 socket) builds.
    fn socket_key(
        netns_cookie: u64,
        family: u32,
        v4: (u32, u32),
        v6: ([u32; 4], [u32; 4]),
        local_port: u32,
        remote_port: u32,
    ) -> Option<SocketKey> {
        let (local_addr, remote_addr, family) = if family == u32::from(AF_INET) {
            ([v4.0, 0, 0, 0], [v4.1, 0, 0, 0], AF_INET)
        } else if family == u32::from(AF_INET6) {
            let (l, r) = v6;
            if r[0] == 0 && r[1] == 0 && r[2] == V4_MAPPED_WORD {
                ([l[3], 0, 0, 0], [r[3], 0, 0, 0], AF_INET)
            } else {
                (l, r, AF_INET6)
            }
        } else {
            return None;
        };
        Some(SocketKey {
            netns_cookie,
            local_addr,
            remote_addr,
            local_port: local_port as u16,
            remote_port: remote_port_of(remote_port),
            family,
            _pad: 0,
        })
    }

    fn ops_socket_key(ctx: &SockOpsContext, netns_cookie: u64) -> Option<SocketKey> {
        let ops = ctx.ops;
        socket_key(
            netns_cookie,
            ops_field!(ops, family),
            (ops_field!(ops, local_ip4), ops_field!(ops, remote_ip4)),
            (
                [
                    ops_field!(ops, local_ip6[0]),
                    ops_field!(ops, local_ip6[1]),
                    ops_field!(ops, local_ip6[2]),
                    ops_field!(ops, local_ip6[3]),
                ],
                [
                    ops_field!(ops, remote_ip6[0]),
                    ops_field!(ops, remote_ip6[1]),
                    ops_field!(ops, remote_ip6[2]),
                    ops_field!(ops, remote_ip6[3]),
                ],
            ),
            ops_field!(ops, local_port),
            ops_field!(ops, remote_port),
        )
    }

    fn is_proxy_port(port: u16) -> bool {
        port == OUTBOUND_PORT || port == INBOUND_PLAINTEXT_PORT || port == HBONE_PORT
    }

    /// Whether this just-established active socket is one end of an app↔proxy pair: an
    /// application's connection that `zt_connect4/6` sent to the proxy's outbound listener, or
    /// the proxy's delivery to the application of its own pod (to the pod's own address, not a
    /// proxy port). Never a socket of an unenrolled netns, never the proxy's HBONE or upstream
    /// connections (they go to other addresses).
    fn active_qualifies(ctx: &SockOpsContext, netns: u64, key: &SocketKey) -> bool {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: read-only lookups of plain values.
        if let Some(dst) = unsafe { ORIG_DST_BY_SOCKET.get(&cookie) } {
            return dst.netns_cookie == netns && key.remote_port == OUTBOUND_PORT;
        }
        if is_proxy_port(key.remote_port) {
            return false;
        }
        // SAFETY: the verifier checks the context's `sk` (a full socket here, or null).
        let sk = unsafe {
            core::ptr::read_volatile(core::ptr::addr_of!((*ctx.ops).__bindgen_anon_2.sk))
        };
        if sk.is_null() {
            return false;
        }
        let mark = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*sk).mark)) };
        if mark != PROXY_MARK && mark != DELIVERY_MARK {
            return false;
        }
        let Some(local) = (unsafe { POD_LOCAL_ADDRS.get(&netns) }) else {
            return false;
        };
        if key.family == AF_INET {
            local.v4 != 0 && key.remote_addr[0] == local.v4
        } else {
            local.v6 != [0; 4] && key.remote_addr == local.v6
        }
    }

    /// Puts a qualifying active end into the fast path: its pending state first, then the
    /// announcement of its peer, then the socket (undone in reverse if a step fails).
    fn join_active(ctx: &SockOpsContext) {
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        // SAFETY: read-only lookup of a plain value.
        if unsafe { ENROLLED_NETNS.get(&netns) }.is_none() {
            return;
        }
        let Some(mut key) = ops_socket_key(ctx, netns) else {
            return;
        };
        // Bytes sent with the SYN (TCP Fast Open) travel through TCP: stay off.
        if !active_qualifies(ctx, netns, &key) || ops_field!(ctx.ops, data_segs_out) != 0 {
            return;
        }
        if FAST_PATH_ACTIVE
            .insert(&key, &FAST_PATH_PENDING, 0)
            .is_err()
        {
            return count(fast_path_stats::JOIN_FAILED, 1);
        }
        if FAST_PATH_PEERS.insert(&key.peer(), &1, 0).is_err() {
            let _ = FAST_PATH_ACTIVE.remove(&key);
            return count(fast_path_stats::JOIN_FAILED, 1);
        }
        // SAFETY: the verified context of this sock_ops program.
        if FAST_PATH_SOCKETS
            .update(&mut key, unsafe { &mut *ctx.ops }, 0)
            .is_err()
        {
            let _ = FAST_PATH_PEERS.remove(&key.peer());
            let _ = FAST_PATH_ACTIVE.remove(&key);
            return count(fast_path_stats::JOIN_FAILED, 1);
        }
        // The close callback removes the state entry.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        count(fast_path_stats::SOCKETS, 1);
    }

    /// Puts a passive end into the fast path if its active end announced it. It is added before
    /// `accept()` can return it, so every message it sends finds its peer.
    fn join_passive(ctx: &SockOpsContext) {
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        let Some(mut key) = ops_socket_key(ctx, netns) else {
            return;
        };
        // SAFETY: read-only lookup of a plain value.
        if unsafe { FAST_PATH_PEERS.get(&key) }.is_none() {
            return;
        }
        let _ = FAST_PATH_PEERS.remove(&key);
        // Bytes already received through TCP (with the SYN) would be read after redirected ones.
        if ops_field!(ctx.ops, bytes_received) != 0 {
            return;
        }
        // SAFETY: the verified context of this sock_ops program.
        match FAST_PATH_SOCKETS.update(&mut key, unsafe { &mut *ctx.ops }, 0) {
            Ok(()) => count(fast_path_stats::SOCKETS, 1),
            Err(_) => count(fast_path_stats::JOIN_FAILED, 1),
        }
    }

    /// Adds both ends of app↔proxy connections to `fast_path_sockets` when they are
    /// established (a socket leaves the sockhash by itself when it closes).
    #[sock_ops]
    pub fn zt_fast_path_sockops(ctx: SockOpsContext) -> u32 {
        match ctx.op() {
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => join_active(&ctx),
            BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => join_passive(&ctx),
            BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
                let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
                if let Some(key) = ops_socket_key(&ctx, netns) {
                    let _ = FAST_PATH_ACTIVE.remove(&key);
                }
            }
            _ => {}
        }
        0
    }

    /// Reads an `sk_msg_md` field with one load at its fixed offset (see `ctx_field!`).
    macro_rules! msg_field {
        ($msg:expr, $field:ident) => {
            // SAFETY: the verifier allows 4-byte reads of these sk_msg context fields.
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$msg).$field)) }
        };
        ($msg:expr, $field:ident[$i:literal]) => {
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$msg).$field[$i])) }
        };
    }

    /// Runs on every `sendmsg` of a fast-path socket: the message goes into the peer socket's
    /// receive queue (`BPF_F_INGRESS`), or through TCP when the peer is not (or no longer) in
    /// the sockhash. Never drops: a verdict of `SK_DROP` would fail the application's write.
    #[sk_msg]
    pub fn zt_fast_path_msg(ctx: SkMsgContext) -> u32 {
        let msg = ctx.msg;
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        let Some(key) = socket_key(
            netns,
            msg_field!(msg, family),
            (msg_field!(msg, local_ip4), msg_field!(msg, remote_ip4)),
            (
                [
                    msg_field!(msg, local_ip6[0]),
                    msg_field!(msg, local_ip6[1]),
                    msg_field!(msg, local_ip6[2]),
                    msg_field!(msg, local_ip6[3]),
                ],
                [
                    msg_field!(msg, remote_ip6[0]),
                    msg_field!(msg, remote_ip6[1]),
                    msg_field!(msg, remote_ip6[2]),
                    msg_field!(msg, remote_ip6[3]),
                ],
            ),
            msg_field!(msg, local_port),
            msg_field!(msg, remote_port),
        ) else {
            return sk_action::SK_PASS;
        };
        let size = u64::from(msg_field!(msg, size));
        let state = FAST_PATH_ACTIVE.get_ptr_mut(&key);
        // SAFETY: the entry belongs to this socket, whose lock the sender holds.
        if state.is_some_and(|s| unsafe { *s } == FAST_PATH_TCP) {
            count(fast_path_stats::TCP_MSGS, 1);
            return sk_action::SK_PASS;
        }
        let mut peer = key.peer();
        if FAST_PATH_SOCKETS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS))
            == i64::from(sk_action::SK_PASS)
        {
            if state.is_some() {
                // Decided: redirected from the first byte on. A socket without an entry
                // redirects whenever its peer is there.
                let _ = FAST_PATH_ACTIVE.remove(&key);
            }
            count(fast_path_stats::REDIRECTED_MSGS, 1);
            count(fast_path_stats::REDIRECTED_BYTES, size);
        } else {
            if let Some(s) = state {
                // SAFETY: as above.
                unsafe { *s = FAST_PATH_TCP };
                count(fast_path_stats::ACTIVE_TCP, 1);
            }
            // Falling back after redirecting keeps the order: the peer reads its redirect
            // queue before its TCP queue.
            count(fast_path_stats::TCP_MSGS, 1);
        }
        sk_action::SK_PASS
    }

    /// Writes the IPv6 address of a sock_addr context, one 4-byte store per word (the verifier
    /// accepts no wider store to `user_ip6`).
    ///
    /// # Safety
    /// Only in a program whose attach type lets it write `user_ip6`.
    unsafe fn set_user_ip6(ctx: &SockAddrContext, ip: [u32; 4]) {
        let sa = ctx.sock_addr;
        // SAFETY: the caller's attach type allows the stores; `sa` is the verified context.
        unsafe {
            (*sa).user_ip6[0] = ip[0];
            (*sa).user_ip6[1] = ip[1];
            (*sa).user_ip6[2] = ip[2];
            (*sa).user_ip6[3] = ip[3];
        }
    }

    fn restore_peer(ctx: &SockAddrContext) -> Option<OrigDst> {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        unsafe { ORIG_DST_BY_SOCKET.get(&cookie) }.copied()
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn zt_getpeername4(ctx: SockAddrContext) -> i32 {
        if let Some(dst) = restore_peer(&ctx) {
            if dst.family == AF_INET {
                unsafe {
                    (*ctx.sock_addr).user_ip4 = dst.addr[0];
                    (*ctx.sock_addr).user_port = u32::from(dst.port.to_be());
                }
            }
        }
        ALLOW
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn zt_getpeername6(ctx: SockAddrContext) -> i32 {
        if let Some(dst) = restore_peer(&ctx) {
            let ip = if dst.family == AF_INET {
                [0, 0, V4_MAPPED_WORD, dst.addr[0]]
            } else {
                dst.addr
            };
            // SAFETY: `user_ip6` and `user_port` are writable in getpeername6.
            unsafe {
                set_user_ip6(&ctx, ip);
                (*ctx.sock_addr).user_port = u32::from(dst.port.to_be());
            }
        }
        ALLOW
    }

    /// The pod address a captured socket would have had without the redirect: the pod's
    /// address of the original destination's family. `None` for a socket that was not
    /// redirected, or a pod without an address of that family.
    fn restore_local(ctx: &SockAddrContext) -> Option<(OrigDst, [u32; 4])> {
        let dst = restore_peer(ctx)?;
        // SAFETY: read-only lookup of a plain value.
        let local = unsafe { POD_LOCAL_ADDRS.get(&dst.netns_cookie) }?;
        let addr = if dst.family == AF_INET {
            [local.v4, 0, 0, 0]
        } else {
            local.v6
        };
        (addr != [0; 4]).then_some((dst, addr))
    }

    #[cgroup_sock_addr(getsockname4)]
    pub fn zt_getsockname4(ctx: SockAddrContext) -> i32 {
        if let Some((dst, addr)) = restore_local(&ctx) {
            if dst.family == AF_INET {
                // SAFETY: `user_ip4` is writable in getsockname4; the port is left as is.
                unsafe { (*ctx.sock_addr).user_ip4 = addr[0] };
            }
        }
        ALLOW
    }

    #[cgroup_sock_addr(getsockname6)]
    pub fn zt_getsockname6(ctx: SockAddrContext) -> i32 {
        if let Some((dst, addr)) = restore_local(&ctx) {
            // A v4-mapped connection of an IPv6 socket has a v4-mapped local address.
            let ip = if dst.family == AF_INET {
                [0, 0, V4_MAPPED_WORD, addr[0]]
            } else {
                addr
            };
            // SAFETY: `user_ip6` is writable in getsockname6; the port is left as is.
            unsafe { set_user_ip6(&ctx, ip) };
        }
        ALLOW
    }

    /// Reads a context field with a load at its fixed offset. The verifier rejects loads through
    /// a context pointer the compiler has offset and shared between branches, so every read is
    /// volatile and stands alone.
    macro_rules! ctx_field {
        ($ctx:expr, $field:ident) => {
            // SAFETY: the verifier allows reads of these sk_lookup context fields.
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ctx).$field)) }
        };
        ($ctx:expr, $field:ident[$i:literal]) => {
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ctx).$field[$i])) }
        };
    }

    #[sk_lookup]
    pub fn zt_sk_lookup(ctx: SkLookupContext) -> u32 {
        let l = ctx.lookup;
        if ctx_field!(l, protocol) != IPPROTO_TCP
            || ctx_field!(l, ingress_ifindex) == LOOPBACK_IFINDEX
        {
            return sk_action::SK_PASS;
        }
        let (addr, remote_addr, family) = if ctx_field!(l, family) == u32::from(AF_INET) {
            (
                [ctx_field!(l, local_ip4), 0, 0, 0],
                [ctx_field!(l, remote_ip4), 0, 0, 0],
                AF_INET,
            )
        } else {
            let local = [
                ctx_field!(l, local_ip6[0]),
                ctx_field!(l, local_ip6[1]),
                ctx_field!(l, local_ip6[2]),
                ctx_field!(l, local_ip6[3]),
            ];
            let remote = [
                ctx_field!(l, remote_ip6[0]),
                ctx_field!(l, remote_ip6[1]),
                ctx_field!(l, remote_ip6[2]),
                ctx_field!(l, remote_ip6[3]),
            ];
            (local, remote, AF_INET6)
        };
        let from_self = remote_addr == addr;
        // The pod talking to itself and the proxy delivering to the app from the pod's own
        // address (where it cannot use the caller's) stay untouched. Such connections do not report the
        // loopback ifindex here (the route's input interface is the pod's own device), so
        // the addresses tell. A peer outside the pod forging the pod's address cannot use this:
        // the SYN-ACK goes to the pod itself, so the handshake never completes (and IPv4
        // drops such packets as martians anyway).
        if from_self {
            return sk_action::SK_PASS;
        }
        let local_port = ctx_field!(l, local_port);
        // The proxy delivering to the app from the caller's address: it wrote this exact
        // 4-tuple (its socket's bound address and port) before connecting. A packet from
        // elsewhere that forges the same 4-tuple gains nothing: its handshake completes with
        // the proxy's socket or not at all.
        let delivery = DeliveryKey {
            caller_addr: remote_addr,
            pod_addr: addr,
            caller_port: u16::from_be(ctx_field!(l, remote_port)),
            pod_port: local_port as u16,
            family,
            _pad: 0,
        };
        // SAFETY: read-only lookup of a plain value.
        if unsafe { INBOUND_DELIVERIES.get(&delivery) }.is_some() {
            return sk_action::SK_PASS;
        }
        let kind = if local_port == u32::from(HBONE_PORT) {
            LISTENER_HBONE
        } else {
            LISTENER_INBOUND_PLAINTEXT
        };
        let key = ListenerKey {
            addr,
            family,
            _pad: 0,
            kind,
        };
        // REPLACE: another program (an older copy of ours during a restart, or a CNI's) may have
        // picked a socket already; for an enrolled pod only the proxy may take the connection.
        match POD_LISTENERS.redirect_sk_lookup(&ctx, key, u64::from(BPF_SK_LOOKUP_F_REPLACE)) {
            Ok(()) => sk_action::SK_PASS,
            // This program only runs in enrolled pods: without a proxy listener, nothing may
            // reach the app directly (fail closed).
            Err(_) => sk_action::SK_DROP,
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Host builds (clippy, `cargo test --workspace`) compile this crate as an empty binary.
}
