//! The proxy paths for captured connections (DESIGN §3, §4).
//!
//! * [`outbound`]: a pod's connect, redirected to its 127.0.0.1:15001 listener; the original
//!   destination comes from the BPF `orig_dst_by_peer` map.
//! * [`inbound`]: TCP arriving at a pod from outside, steered by `sk_lookup` to the pod's 15006
//!   listener; the accepted socket's local address is the original destination.
//!
//! Every upstream socket is created inside the network namespace of the pod it serves and
//! carries [`PROXY_MARK`], so it leaves with the pod's own address and is never captured again.
mod from_node;
pub mod inbound;
mod inbound_hbone;
mod inbound_http;
mod inbound_policy;
pub mod outbound;
mod relay;

pub use from_node::NODE_SOURCE;
pub use relay::{reset, Relayed};

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::{net::TcpStream, sync::watch};
use ztunnel_common::PROXY_MARK;

use crate::{
    admin::metrics::Metrics,
    authz::MtlsDecision,
    capture::{NodeConnections, OrigDstTable},
    hbone::{Connector, Io, Pool, PoolKey},
    identity::{CertificateCache, SpiffeId},
    netns::Netns,
    state::{EnrolmentPolicy, Snapshot},
    tls,
};

/// How long an upstream connect may take before the client connection is closed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An enrolled pod as the proxy paths see it: who it is and where its sockets live.
#[derive(Debug)]
pub struct PodContext {
    pub namespace: String,
    pub name: String,
    /// `namespace/name`.
    pub workload: String,
    pub identity: SpiffeId,
    pub ips: Vec<IpAddr>,
    /// Shared with the HBONE pool keys of the tunnels dialled from this pod.
    pub netns: Arc<Netns>,
    pub netns_cookie: u64,
}

impl PodContext {
    /// This pod in `snapshot`, or `None` once it has left the configuration.
    pub fn in_snapshot<'a>(&self, snapshot: &'a Snapshot) -> Option<&'a Arc<crate::state::Pod>> {
        snapshot
            .pods
            .get(&(self.namespace.clone(), self.name.clone()))
    }
}

/// Everything mutual TLS between nodes needs: certificates per identity, the mesh roots, and
/// the pool of HBONE connections.
pub struct Mesh {
    pub trust_domain: String,
    pub certs: Arc<CertificateCache>,
    pub roots: Vec<CertificateDer<'static>>,
    pub pool: Arc<Pool>,
}

/// How long an unused HBONE connection stays open.
const HBONE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Mesh {
    /// Must be called inside the runtime (the pool runs an expiry task). Tunnel connections are
    /// dialled from inside the source pod's network namespace, from the pod's own address (as
    /// Istio's ztunnel does, so the destination sees the pod), and marked so they are never
    /// captured; `home` is the node's netns the dialling thread returns to.
    pub fn new(
        trust_domain: String,
        certs: Arc<CertificateCache>,
        metrics: Arc<Metrics>,
        home: Arc<Netns>,
    ) -> Self {
        let roots = certs.roots().to_vec();
        let (c, r) = (certs.clone(), roots.clone());
        let connector: Connector = Arc::new(move |key: PoolKey| {
            let (certs, roots, metrics, home) =
                (c.clone(), r.clone(), metrics.clone(), home.clone());
            Box::pin(async move {
                let cert = certs.get(&key.src).await.map_err(|e| {
                    io::Error::other(format!("no certificate for {}: {e}", key.src))
                })?;
                let config = tls::client_config(&cert, &roots, vec![key.dst.clone()]);
                let socket = key
                    .origin
                    .netns
                    .run(&home, || new_marked_socket(key.addr))??;
                if let Some(ip) = key.origin.ip {
                    bind_address_only(&socket, ip)?;
                }
                let tcp = tokio::net::TcpSocket::from_std_stream(socket.into())
                    .connect(key.addr)
                    .await?;
                // Identity is checked on the SPIFFE URI, not on a server name.
                let name = ServerName::IpAddress(key.addr.ip().into());
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .inspect_err(|e| {
                        let reason = e
                            .get_ref()
                            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                            .map(tls::classify)
                            .unwrap_or("handshake_failed");
                        metrics.handshake("outbound", reason);
                    })?;
                metrics.handshake("outbound", "ok");
                Ok(Box::new(tls) as Box<dyn Io>)
            })
        });
        Self {
            trust_domain,
            certs,
            roots,
            pool: Pool::new(connector, HBONE_IDLE_TIMEOUT),
        }
    }
}

/// Binds `socket` to `ip` without reserving a port yet (`IP_BIND_ADDRESS_NO_PORT`): the port
/// is picked at connect time, per destination, so a busy pod does not run out of ports.
fn bind_address_only(socket: &socket2::Socket, ip: IpAddr) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int option value on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.bind(&SocketAddr::new(ip, 0).into())
}

/// What the proxy needs to know about its node and mesh.
pub struct ProxyOptions {
    pub home: Arc<Netns>,
    pub orig_dst: Arc<OrigDstTable>,
    /// The node's own connections to enrolled pods (kubelet probes), recorded by the kernel.
    pub node_connections: Arc<NodeConnections>,
    pub config: watch::Receiver<Arc<Snapshot>>,
    pub node: String,
    pub policy: EnrolmentPolicy,
    pub mesh: Mesh,
    pub metrics: Arc<Metrics>,
}

/// State shared by all proxy paths of this node.
pub struct Proxy {
    home: Arc<Netns>,
    orig_dst: Arc<OrigDstTable>,
    node_connections: Arc<NodeConnections>,
    config: watch::Receiver<Arc<Snapshot>>,
    node: String,
    policy: EnrolmentPolicy,
    pub mesh: Mesh,
    pub metrics: Arc<Metrics>,
    /// Round-robin position per (service namespace, name, port).
    round_robin: Mutex<HashMap<(String, String, u16), usize>>,
    /// Pods enrolled on this node, by address: same-node traffic is delivered to them without
    /// leaving the proxy.
    local_pods: RwLock<HashMap<IpAddr, Arc<PodContext>>>,
    /// Key sets of RequestAuthentication `jwksUri`s.
    pub jwks: crate::authz::jwks::JwksCache,
}

impl Proxy {
    pub fn new(o: ProxyOptions) -> Arc<Self> {
        Arc::new(Self {
            home: o.home,
            orig_dst: o.orig_dst,
            node_connections: o.node_connections,
            config: o.config,
            node: o.node,
            policy: o.policy,
            mesh: o.mesh,
            metrics: o.metrics,
            round_robin: Mutex::default(),
            local_pods: RwLock::default(),
            jwks: Default::default(),
        })
    }

    /// Registers a pod enrolled on this node (called by enrolment).
    pub fn add_local_pod(&self, pod: Arc<PodContext>) {
        let mut pods = self.local_pods.write().unwrap_or_else(|p| p.into_inner());
        for ip in &pod.ips {
            pods.insert(*ip, pod.clone());
        }
    }

    /// Forgets a pod at un-enrolment; only its own entries (a new enrolment of the same
    /// addresses may already have replaced them).
    pub fn remove_local_pod(&self, pod: &Arc<PodContext>) {
        let mut pods = self.local_pods.write().unwrap_or_else(|p| p.into_inner());
        pods.retain(|_, p| !Arc::ptr_eq(p, pod));
    }

    /// `namespace/name` of the pods enrolled here, sorted.
    pub fn local_workloads(&self) -> Vec<String> {
        let pods = self.local_pods.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> = pods.values().map(|p| p.workload.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    fn local_pod(&self, ip: IpAddr) -> Option<Arc<PodContext>> {
        let pods = self.local_pods.read().unwrap_or_else(|p| p.into_inner());
        pods.get(&ip).cloned()
    }

    /// The mTLS mode that decides plaintext to `pod`'s `port`, or `None` if the pod has left
    /// the configuration (it is being un-enrolled).
    fn mtls_mode(&self, snapshot: &Snapshot, pod: &PodContext, port: u16) -> Option<MtlsDecision> {
        Some(snapshot.mtls_mode(pod.in_snapshot(snapshot)?, port))
    }

    pub fn trust_domain(&self) -> &str {
        &self.mesh.trust_domain
    }

    /// The node this proxy serves.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The configuration in force right now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.config.borrow().clone()
    }

    /// Next index (modulo `n`) for a service port's round-robin.
    fn next_endpoint(&self, key: (String, String, u16), n: usize) -> usize {
        let mut rr = self.round_robin.lock().unwrap_or_else(|p| p.into_inner());
        let slot = rr.entry(key).or_default();
        let i = *slot % n;
        *slot = slot.wrapping_add(1);
        i
    }

    /// Connects to `dst` from inside `pod`'s network namespace with the proxy mark.
    async fn connect_from(&self, pod: &PodContext, dst: SocketAddr) -> io::Result<TcpStream> {
        let socket = pod.netns.run(&self.home, || new_marked_socket(dst))??;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        }
    }
}

pub(crate) fn new_marked_socket(dst: SocketAddr) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(dst),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    Ok(socket)
}

/// Ports of the proxy itself; traffic addressed to them is never forwarded (it would loop).
pub fn is_proxy_port(port: u16) -> bool {
    use ztunnel_common::*;
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

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};

    use super::*;

    /// The tunnel's socket leaves from the address it was bound to, on either family, with the
    /// port chosen at connect time.
    #[tokio::test]
    async fn tunnel_sockets_leave_from_the_bound_address() {
        for (bind, listen) in [
            (
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
                IpAddr::V4(Ipv4Addr::LOCALHOST),
            ),
            (
                IpAddr::V6(Ipv6Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ),
        ] {
            let Ok(listener) = TcpListener::bind((listen, 0)) else {
                continue; // no IPv6 on this host
            };
            let dst = listener.local_addr().unwrap();
            let socket = new_marked_socket(dst).unwrap();
            bind_address_only(&socket, bind).unwrap();
            let tcp = tokio::net::TcpSocket::from_std_stream(socket.into())
                .connect(dst)
                .await
                .unwrap();
            let local = tcp.local_addr().unwrap();
            assert_eq!(local.ip(), bind);
            assert_ne!(local.port(), 0);
            let (_, peer) = listener.accept().unwrap();
            assert_eq!(peer, local);
        }
    }
}
