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
mod http;
pub mod inbound;
pub mod outbound;
mod record;

pub use record::{Direction, OpenConnection};
pub mod request;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::pki_types::CertificateDer;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::warn;

use crate::{
    capture::{NodeConnections, OrigDstTable},
    hbone::{self, Pending, Pool, PoolLimits, ServerLimits},
    identity::{CertificateCache, SpiffeId},
    metrics::Metrics,
    model::Pod,
    netns::Netns,
    socket,
    state::{EnrolmentPolicy, Snapshot},
};
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
                    match kind {
                        Listener::Outbound => {
                            tokio::spawn(self.outbound.clone().handle(pod, stream, peer))
                        }
                        Listener::InboundPlaintext => {
                            tokio::spawn(self.inbound.clone().plaintext(pod, stream, peer))
                        }
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
