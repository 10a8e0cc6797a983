//! The proxy paths for captured connections (docs/architecture.md), one pipeline per direction:
//!
//! * [`outbound`]: a pod's connect, redirected to its 127.0.0.1:15001 listener. The original
//!   destination comes from the BPF `orig_dst_by_peer` map, and one [`outbound::Plan`] made
//!   from one snapshot says where it goes: directly, through an HBONE tunnel, to a pod of this
//!   node, or nowhere.
//! * [`inbound`]: everything that arrives for an enrolled pod (plaintext steered by
//!   `sk_lookup` to its 15006 listener, HBONE streams on its 15008 listener, same-node mesh
//!   traffic, and the node's own probes) goes through one pipeline, `deliver`: admit, record,
//!   connect to the application, then relay or decide each HTTP request.
//!
//! Every connection has one [`record::ConnectionRecord`], which owns its access-log line and
//! its metrics. Every upstream socket is created inside the network namespace of the pod it
//! serves and carries the proxy mark ([`crate::socket`]), so it leaves with the pod's own
//! address and is never captured again.
mod carry;
mod http;
pub mod inbound;
pub mod outbound;
mod record;

pub use record::{Direction, OpenConnection};
pub mod request;

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock, Weak},
    time::Duration,
};

use rustls::pki_types::CertificateDer;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::warn;

use crate::{
    capture::{return_path::ReturnPath, InboundDeliveries, NodeConnections, OrigDstTable},
    hbone::{self, Pending, Pool, PoolLimits, ServerLimits},
    identity::{CertificateCache, SpiffeId},
    metrics::Metrics,
    model::Pod,
    netns::Netns,
    socket,
    state::{EnrolmentPolicy, Snapshot},
};
use carry::set_up_then_carry;
use inbound::Inbound;
use outbound::Outbound;

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
    /// The routing that brings the application's replies back to a delivery that keeps the
    /// caller's address. The enrolment holds it, and so does each connection delivered
    /// through it; gone (or never set up) means deliveries come from the pod's own address.
    pub return_path: Weak<ReturnPath>,
}

impl PodContext {
    /// This pod in `snapshot`, or `None` once it has left the configuration.
    pub fn in_snapshot<'a>(&self, snapshot: &'a Snapshot) -> Option<&'a Arc<Pod>> {
        snapshot
            .pods
            .get(&(self.namespace.clone(), self.name.clone()))
    }
}

/// Everything mutual TLS between nodes needs: certificates per identity, the mesh roots, the
/// pool of HBONE connections, and the server's bounds.
pub struct Mesh {
    pub trust_domain: String,
    pub certs: Arc<CertificateCache>,
    pub roots: Vec<CertificateDer<'static>>,
    pub pool: Arc<Pool>,
    pub server: ServerLimits,
    /// HBONE connections accepted and still before their first CONNECT.
    pub pending: Arc<Pending>,
}

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
        (pool, server): (PoolLimits, ServerLimits),
    ) -> Self {
        let roots = certs.roots().to_vec();
        let connector =
            hbone::client::connector(certs.clone(), roots.clone(), metrics.clone(), home);
        Self {
            trust_domain,
            certs,
            roots,
            pool: Pool::new(connector, pool, metrics),
            server,
            pending: Arc::default(),
        }
    }
}

/// What the proxy needs to know about its node and mesh.
pub struct ProxyOptions {
    pub home: Arc<Netns>,
    pub orig_dst: Arc<OrigDstTable>,
    /// The node's own connections to enrolled pods (kubelet probes), recorded by the kernel.
    pub node_connections: Arc<NodeConnections>,
    /// The proxy's deliveries in progress, which `zt_sk_lookup` lets through.
    pub deliveries: Arc<InboundDeliveries>,
    pub config: watch::Receiver<Arc<Snapshot>>,
    pub node: String,
    pub policy: EnrolmentPolicy,
    pub mesh: Mesh,
    pub metrics: Arc<Metrics>,
    pub requests: request::RequestSettings,
}

/// The inputs both directions share: the node, its configuration, the mesh, the metrics, and
/// the pods enrolled here.
pub struct Shared {
    home: Arc<Netns>,
    config: watch::Receiver<Arc<Snapshot>>,
    node: String,
    policy: EnrolmentPolicy,
    pub mesh: Mesh,
    pub metrics: Arc<Metrics>,
    /// Request metrics and the access log, for the paths that parse HTTP.
    pub requests: Arc<request::RequestTelemetry>,
    /// Pods enrolled on this node, by address: same-node traffic is delivered to them without
    /// leaving the proxy.
    local_pods: RwLock<HashMap<IpAddr, Arc<PodContext>>>,
    /// The connections open now, as their records list them.
    open: Arc<record::OpenConnections>,
    deliveries: Arc<InboundDeliveries>,
    /// Plaintext connections the pods' 15006 listeners accepted and the proxy holds: (netns
    /// cookie, local, peer). A delivery from the caller's address must not take one of their
    /// 4-tuples, reversed, in the same netns.
    plaintext_accepted: Mutex<HashSet<(u64, SocketAddr, SocketAddr)>>,
}

impl Shared {
    /// The configuration in force right now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.config.borrow().clone()
    }

    fn local_pod(&self, ip: IpAddr) -> Option<Arc<PodContext>> {
        let pods = self.local_pods.read().unwrap_or_else(|p| p.into_inner());
        pods.get(&ip).cloned()
    }

    /// Connects to `dst` from inside `pod`'s network namespace with the proxy mark.
    async fn connect_from(&self, pod: &PodContext, dst: SocketAddr) -> io::Result<TcpStream> {
        let socket = pod.netns.run(&self.home, || socket::marked(dst))??;
        socket::connect(socket, dst, CONNECT_TIMEOUT).await
    }

    /// Connects to the application at `dst` inside `pod`'s network namespace from `caller`,
    /// the address the connection came from, when it can; from the pod's own address (as
    /// [`Shared::connect_from`]) when it cannot, saying why.
    async fn deliver_to(
        &self,
        pod: &PodContext,
        caller: Option<IpAddr>,
        dst: SocketAddr,
    ) -> io::Result<Delivered> {
        let from_pod = |source| async move {
            Ok(Delivered {
                stream: self.connect_from(pod, dst).await?,
                source,
                return_path: None,
            })
        };
        let (caller, return_path) = match self.usable_caller(pod, caller, dst) {
            Ok(Some(usable)) => usable,
            // The pod's own address is the caller's.
            Ok(None) => return from_pod(DeliverySource::Caller).await,
            Err(why) => return from_pod(DeliverySource::Pod(why)).await,
        };
        let (socket, _delivery) = match self.transparent_socket(pod, caller, dst) {
            Ok(s) => s,
            Err(why) => return from_pod(DeliverySource::Pod(why)).await,
        };
        // The entry goes when this returns: the handshake is over, and the established
        // socket takes every later packet before any listener lookup.
        Ok(Delivered {
            stream: socket::connect(socket, dst, CONNECT_TIMEOUT).await?,
            source: DeliverySource::Caller,
            return_path: Some(return_path),
        })
    }

    /// The caller's address if a delivery can use it (`Ok(None)`: it is the pod's own).
    fn usable_caller(
        &self,
        pod: &PodContext,
        caller: Option<IpAddr>,
        dst: SocketAddr,
    ) -> Result<Option<(IpAddr, Arc<ReturnPath>)>, Fallback> {
        let caller = caller.ok_or(Fallback::NoCallerAddress)?.to_canonical();
        if pod.ips.contains(&caller) {
            return Ok(None);
        }
        if caller.is_ipv4() != dst.is_ipv4() {
            return Err(Fallback::OtherFamily);
        }
        let unroutable = match caller {
            IpAddr::V4(v4) => v4.is_broadcast() || v4.is_multicast(),
            IpAddr::V6(v6) => v6.is_multicast(),
        };
        if caller.is_loopback() || caller.is_unspecified() || unroutable {
            return Err(Fallback::NotAPeerAddress);
        }
        match pod.return_path.upgrade() {
            Some(r) if r.covers(caller) => Ok(Some((caller, r))),
            _ => Err(Fallback::NoReturnPath),
        }
    }

    /// A transparent socket in `pod`'s netns bound to `caller`, on a port no plaintext
    /// connection of the pod holds from that caller, registered for `zt_sk_lookup`.
    fn transparent_socket(
        &self,
        pod: &PodContext,
        caller: IpAddr,
        dst: SocketAddr,
    ) -> Result<(socket2::Socket, crate::capture::Delivery), Fallback> {
        // A port the kernel picks is free for the caller's address in this netns, but the
        // pod's plaintext listener may hold a connection from that very caller port: the
        // application's side of the delivery would have its 4-tuple. Such a port is kept
        // bound (so the next bind picks another) until one is free.
        let mut taken = Vec::new();
        for _ in 0..8 {
            let socket = pod
                .netns
                .run(&self.home, || socket::transparent(caller, dst))
                .map_err(|_| Fallback::BindFailed)?
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::EADDRINUSE) | Some(libc::EADDRNOTAVAIL) => Fallback::NoFreePort,
                    _ => Fallback::BindFailed,
                })?;
            let local = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or(Fallback::BindFailed)?;
            let accepted = self
                .plaintext_accepted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&(pod.netns_cookie, dst, local));
            if accepted {
                taken.push(socket);
                continue;
            }
            let key = ztunnel_common::DeliveryKey::new(local, dst).ok_or(Fallback::OtherFamily)?;
            let delivery = self
                .deliveries
                .register(key)
                .map_err(|_| Fallback::TableFull)?;
            return Ok((socket, delivery));
        }
        Err(Fallback::NoFreePort)
    }

    /// Remembers a plaintext connection `pod`'s 15006 listener accepted, until the returned
    /// guard drops.
    fn accepted_plaintext(
        self: &Arc<Self>,
        pod: &PodContext,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> AcceptedPlaintext {
        let key = (pod.netns_cookie, local, peer);
        self.plaintext_accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key);
        AcceptedPlaintext {
            shared: self.clone(),
            key,
        }
    }
}

/// A connection to the application, and the address it sees it come from.
pub(crate) struct Delivered {
    pub stream: TcpStream,
    pub source: DeliverySource,
    /// What routes the application's replies back while the connection lives, if it keeps
    /// the caller's address.
    return_path: Option<Arc<ReturnPath>>,
}

impl Delivered {
    /// The stream, and what must live as long as it does.
    pub fn split(self) -> (TcpStream, Option<Arc<ReturnPath>>) {
        (self.stream, self.return_path)
    }
}

/// A plaintext connection of a pod's 15006 listener, registered while it lives.
struct AcceptedPlaintext {
    shared: Arc<Shared>,
    key: (u64, SocketAddr, SocketAddr),
}

impl Drop for AcceptedPlaintext {
    fn drop(&mut self) {
        self.shared
            .plaintext_accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// The address the application sees a delivered connection come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliverySource {
    /// The caller's, as without the mesh.
    Caller,
    /// The pod's own, for this reason.
    Pod(Fallback),
}

/// Why a delivery comes from the pod's own address instead of the caller's
/// (`src_preserved=false`, `ztunnel_inbound_delivery_source_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// The caller's address is not known.
    NoCallerAddress,
    /// The caller's address is of the other family than the application's.
    OtherFamily,
    /// Loopback, unspecified, broadcast or multicast: no peer has it.
    NotAPeerAddress,
    /// The pod's return path is not set up (for that family).
    NoReturnPath,
    /// No port of the caller's address is free in the pod's netns.
    NoFreePort,
    /// The transparent socket could not be made or bound.
    BindFailed,
    /// `inbound_deliveries` is full.
    TableFull,
}

impl Fallback {
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::NoCallerAddress => "no_caller_address",
            Fallback::OtherFamily => "other_family",
            Fallback::NotAPeerAddress => "not_a_peer_address",
            Fallback::NoReturnPath => "no_return_path",
            Fallback::NoFreePort => "no_free_port",
            Fallback::BindFailed => "bind_failed",
            Fallback::TableFull => "table_full",
        }
    }
}

impl DeliverySource {
    /// The label of `ztunnel_inbound_delivery_source_total`: `caller` or the fallback.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliverySource::Caller => "caller",
            DeliverySource::Pod(why) => why.as_str(),
        }
    }
}

/// Which of a pod's listeners a connection arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// 127.0.0.1:15001 / [::1]:15001: the pod's own connects, captured.
    Outbound,
    /// 15006: plaintext from outside the pod, steered by `sk_lookup`.
    InboundPlaintext,
    /// 15008: HBONE, steered by `sk_lookup`.
    Hbone,
}

/// The node proxy: both directions over their shared inputs.
pub struct Proxy {
    pub shared: Arc<Shared>,
    inbound: Arc<Inbound>,
    outbound: Arc<Outbound>,
}

impl Proxy {
    pub fn new(o: ProxyOptions) -> Arc<Self> {
        let shared = Arc::new(Shared {
            home: o.home,
            config: o.config,
            node: o.node,
            policy: o.policy,
            mesh: o.mesh,
            requests: Arc::new(request::RequestTelemetry::new(
                o.metrics.clone(),
                o.requests,
            )),
            metrics: o.metrics,
            local_pods: RwLock::default(),
            open: Arc::default(),
            deliveries: o.deliveries,
            plaintext_accepted: Mutex::default(),
        });
        let inbound = Arc::new(Inbound::new(shared.clone(), o.node_connections));
        let outbound = Arc::new(Outbound::new(shared.clone(), o.orig_dst, inbound.clone()));
        Arc::new(Self {
            shared,
            inbound,
            outbound,
        })
    }

    /// Accepts connections on one of `pod`'s listeners until the task is aborted
    /// (un-enrolment): the one accept loop of every path.
    pub async fn serve(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        kind: Listener,
        listener: TcpListener,
    ) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let pod = pod.clone();
                    // A connection's task is its set-up (boxed, gone once done), then what
                    // carries it (carry.rs).
                    match kind {
                        Listener::Outbound => tokio::spawn(set_up_then_carry(
                            self.outbound.clone().handle(pod, stream, peer),
                        )),
                        Listener::InboundPlaintext => tokio::spawn(set_up_then_carry(
                            self.inbound.clone().plaintext(pod, stream, peer),
                        )),
                        Listener::Hbone => {
                            tokio::spawn(self.inbound.clone().hbone(pod, stream, peer))
                        }
                    };
                }
                Err(e) => {
                    warn!(pod = %pod.workload, listener = ?kind, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Registers a pod enrolled on this node (called by enrolment).
    pub fn add_local_pod(&self, pod: Arc<PodContext>) {
        let mut pods = self
            .shared
            .local_pods
            .write()
            .unwrap_or_else(|p| p.into_inner());
        for ip in &pod.ips {
            pods.insert(*ip, pod.clone());
        }
    }

    /// Forgets a pod at un-enrolment; only its own entries (a new enrolment of the same
    /// addresses may already have replaced them).
    pub fn remove_local_pod(&self, pod: &Arc<PodContext>) {
        let mut pods = self
            .shared
            .local_pods
            .write()
            .unwrap_or_else(|p| p.into_inner());
        pods.retain(|_, p| !Arc::ptr_eq(p, pod));
    }

    /// The connections open now (both sides of a same-node one), oldest first.
    pub fn open_connections(&self) -> Vec<Arc<OpenConnection>> {
        self.shared.open.list()
    }

    /// `namespace/name` of the pods enrolled here, sorted.
    pub fn local_workloads(&self) -> Vec<String> {
        let pods = self
            .shared
            .local_pods
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> = pods.values().map(|p| p.workload.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    pub fn mesh(&self) -> &Mesh {
        &self.shared.mesh
    }

    pub fn trust_domain(&self) -> &str {
        &self.shared.mesh.trust_domain
    }

    /// The node this proxy serves.
    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// The configuration in force right now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot()
    }
}
