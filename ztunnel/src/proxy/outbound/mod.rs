//! The outbound side: connections an enrolled pod makes, captured by `zt_connect4/6`. Each is
//! routed by one [`Plan`], made once from one snapshot, and carried by it: directly from the
//! pod's netns, through an HBONE tunnel to the destination pod's node proxy, or to this node's
//! inbound side for a pod that runs here. A connection to a Service port that speaks HTTP and
//! has traffic rules is instead served request by request ([`http`]): each request is routed
//! and carried on its own.
mod http;
mod upstreams;

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use ::http::{HeaderMap, HeaderValue};
use tokio::net::TcpStream;
use tracing::warn;
use ztunnel_common::{OrigDstKey, HBONE_PORT};

use super::{
    carry::{Carry, Holding},
    inbound::{Arrival, Inbound},
    record::{ConnectionRecord, Direction, Ending},
    PodContext, Shared,
};
use crate::{
    capture::OrigDstTable,
    hbone::{Origin, PoolKey},
    identity::SpiffeId,
    metrics::{Carrier, ConnectionLabels, Reporter},
    model::{AppProtocol, Service},
    relay::{relay_until, reset},
    state::Snapshot,
    traffic::{SourceWorkload, TcpDecision},
};

/// Where an outbound connection goes, and what it was addressed to.
#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    pub upstream: SocketAddr,
    /// `namespace/name` of the Service whose VIP was dialled.
    pub service: Option<String>,
    /// `namespace/name` of the destination pod, if it is a known workload.
    pub workload: Option<String>,
}

/// Why an original destination has nowhere to go.
#[derive(Debug, PartialEq, Eq)]
pub enum NoRoute {
    /// A Service VIP dialled on a port the Service does not have.
    NoServicePort { service: String, port: u16 },
    /// A Service port without endpoints (of the address family dialled).
    NoEndpoints { service: String, port: u16 },
    /// A VirtualService's `tcp` routes match nothing for this connection.
    NoTcpRoute { virtual_service: String },
    /// The `tcp` route's destination resolves to no Service port or subset.
    Unroutable(String),
}

impl fmt::Display for NoRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoRoute::NoServicePort { service, port } => {
                write!(f, "service {service} has no port {port}")
            }
            NoRoute::NoEndpoints { service, port } => {
                write!(f, "service {service} has no endpoints for port {port}")
            }
            NoRoute::NoTcpRoute { virtual_service } => {
                write!(
                    f,
                    "no tcp route of VirtualService {virtual_service} matches"
                )
            }
            NoRoute::Unroutable(why) => write!(f, "tcp route: {why}"),
        }
    }
}

/// How a captured connection is carried, decided once.
#[derive(Debug)]
pub enum Plan {
    /// Outside the mesh (or a mesh pod of unknown identity): connected directly from the pod.
    Direct(Route),
    /// An enrolled workload on another node: HBONE to its pod's port 15008, over the pooled
    /// connection of this key (boxed: it is most of the plan's size).
    Tunnel(Route, Box<PoolKey>),
    /// A pod enrolled on this node: handed to this proxy's inbound side, no TLS.
    SameNode(Route, Arc<PodContext>),
    Refuse(NoRoute),
}

/// The outbound side of this node's proxy.
pub struct Outbound {
    shared: Arc<Shared>,
    orig_dst: Arc<OrigDstTable>,
    /// Round-robin position per (service namespace, name, port).
    round_robin: Mutex<HashMap<(String, String, u16), usize>>,
    /// Where same-node connections are delivered.
    inbound: Arc<Inbound>,
    /// What routed requests remember across connections: splits, load balancing, ejections.
    upstreams: upstreams::Upstreams,
}

impl Outbound {
    pub(super) fn new(
        shared: Arc<Shared>,
        orig_dst: Arc<OrigDstTable>,
        inbound: Arc<Inbound>,
    ) -> Self {
        Self {
            shared,
            orig_dst,
            round_robin: Mutex::default(),
            inbound,
            upstreams: upstreams::Upstreams::default(),
        }
    }

    /// A connection accepted on `pod`'s outbound listener: its set-up, which returns the
    /// connection to carry.
    pub(super) async fn handle(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<Carry> {
        let key = OrigDstKey::of_peer(pod.netns_cookie, peer);
        let Some(orig) = self.orig_dst.take(&key).and_then(|d| d.destination()) else {
            // Something connected to the listener without going through capture (e.g. the app
            // dialled 127.0.0.1:15001 itself): there is nowhere legitimate to send it.
            warn!(src_workload = %pod.workload, src_addr = %peer,
                "outbound connection without a recorded original destination; closing it");
            reset(stream);
            return None;
        };
        let mut record = ConnectionRecord::new(Direction::Outbound, self.shared.metrics.clone());
        record.line_mut().src_workload = Some(pod.workload.clone());
        record.line_mut().dst_addr = Some(orig);
        let snapshot = self.shared.snapshot();
        if let Some((svc, declared)) = self.routed_service(&pod, &snapshot, orig) {
            return self
                .routed(pod, stream, (svc, orig), declared, snapshot, record)
                .await;
        }
        let plan = self.plan(&pod, &snapshot, orig);
        if let Plan::Direct(route) | Plan::Tunnel(route, _) | Plan::SameNode(route, _) = &plan {
            record.line_mut().dst_service = route.service.clone();
            record.line_mut().dst_workload = route.workload.clone();
            record.line_mut().upstream = Some(route.upstream);
        }
        match plan {
            Plan::Refuse(why) => {
                reset(stream);
                record.refuse(Ending::Refused, why.to_string());
                None
            }
            Plan::Direct(route) => self.direct(pod, stream, route, record).await,
            Plan::Tunnel(route, key) => self.tunnel(pod, stream, route, *key, record).await,
            Plan::SameNode(route, dst) => {
                record.line_mut().same_node = true;
                record.line_mut().src_identity = Some(pod.identity.to_string());
                record.line_mut().dst_workload = Some(dst.workload.clone());
                record.line_mut().dst_identity = Some(dst.identity.to_string());
                let arrival = Arrival::SameNode { src: pod };
                let inbound = self.inbound.clone();
                // Boxed: the inbound pipeline's state would otherwise size the task of every
                // outbound connection, tunnelled or direct.
                Box::pin(inbound.deliver(
                    dst,
                    arrival,
                    route.upstream,
                    stream,
                    snapshot,
                    Some(record),
                ))
                .await
            }
        }
    }

    /// The Service `orig` addresses, if its requests are routed one by one: a port that
    /// speaks HTTP (declared so), with traffic rules for the caller.
    fn routed_service(
        &self,
        pod: &PodContext,
        snapshot: &Snapshot,
        orig: SocketAddr,
    ) -> Option<(Arc<Service>, AppProtocol)> {
        let svc = snapshot.service_by_vip(orig.ip())?;
        let declared = snapshot
            .service_port(svc, orig.port())?
            .protocol()
            .filter(|p| p.is_http())?;
        self.routes_requests(snapshot, pod, svc, orig.port())
            .then(|| (svc.clone(), declared))
    }

    /// Serves a connection request by request ([`http::RoutedConnection`]).
    async fn routed(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        stream: TcpStream,
        (svc, orig): (Arc<Service>, SocketAddr),
        declared: AppProtocol,
        snapshot: Arc<Snapshot>,
        mut record: ConnectionRecord,
    ) -> Option<Carry> {
        let line = record.line_mut();
        line.dst_service = Some(format!("{}/{}", svc.namespace, svc.name));
        line.per_request = Some(true);
        line.app_protocol = Some(declared);
        line.src_identity = Some(pod.identity.to_string());
        record.count(
            ConnectionLabels::new(
                Reporter::Source,
                Carrier::Hbone,
                (Some(&pod.workload), Some(pod.identity.to_string())),
                (None, None),
                true,
            ),
            &self.shared.open,
        );
        let requests = http::RoutedConnection::request_context(&self, &pod, &snapshot, &svc, orig);
        let conn = http::RoutedConnection::new(self.clone(), pod, (svc, orig), requests);
        let serve = conn.serve(stream, Some(declared), record.tally().clone());
        Some(Carry::new(record, None, serve))
    }

    /// Where a connection of `pod` to `orig` goes, from `snapshot` alone.
    pub fn plan(&self, pod: &PodContext, snapshot: &Snapshot, orig: SocketAddr) -> Plan {
        let route = match self
            .tcp_route(pod, snapshot, orig)
            .unwrap_or_else(|| self.route(snapshot, orig))
        {
            Ok(route) => route,
            Err(why) => return Plan::Refuse(why),
        };
        if let Some(key) = self.tunnel_for(pod, snapshot, &route) {
            return Plan::Tunnel(route, Box::new(key));
        }
        match self.shared.local_pod(route.upstream.ip()) {
            Some(dst) => Plan::SameNode(route, dst),
            None => Plan::Direct(route),
        }
    }

    /// Resolves an original destination: a Service VIP goes to one of its endpoints
    /// (round-robin), anything else goes where it was addressed.
    pub fn route(&self, snapshot: &Snapshot, orig: SocketAddr) -> Result<Route, NoRoute> {
        if let Some(svc) = snapshot.service_by_vip(orig.ip()) {
            let service = format!("{}/{}", svc.namespace, svc.name);
            let port = orig.port();
            if snapshot.service_port(svc, port).is_none() {
                return Err(NoRoute::NoServicePort { service, port });
            }
            let endpoints: Vec<_> = snapshot
                .endpoints(svc, port)
                .into_iter()
                .filter(|e| e.addr.is_ipv4() == orig.is_ipv4())
                .collect();
            if endpoints.is_empty() {
                return Err(NoRoute::NoEndpoints { service, port });
            }
            let i = self.next_endpoint(
                (svc.namespace.clone(), svc.name.clone(), port),
                endpoints.len(),
            );
            let ep = &endpoints[i];
            return Ok(Route {
                upstream: ep.addr,
                service: Some(service),
                workload: Some(ep.pod.workload()),
            });
        }
        let workload = snapshot.pod_by_ip(orig.ip()).map(|p| p.workload());
        Ok(Route {
            upstream: orig,
            service: None,
            workload,
        })
    }

    /// Where a VirtualService's `tcp` routes send a connection to a Service: a destination by
    /// weight, then one of its cluster's endpoints round-robin. `None` when no VirtualService
    /// with `tcp` routes applies.
    fn tcp_route(
        &self,
        pod: &PodContext,
        snapshot: &Snapshot,
        orig: SocketAddr,
    ) -> Option<Result<Route, NoRoute>> {
        let svc = snapshot.service_by_vip(orig.ip())?;
        let labels = pod
            .in_snapshot(snapshot)
            .map(|p| p.labels.clone())
            .unwrap_or_default();
        let source = SourceWorkload {
            namespace: &pod.namespace,
            labels: &labels,
        };
        let (virtual_service, route, destinations) = match snapshot.tcp_route(source, svc, orig) {
            TcpDecision::NoVirtualService => return None,
            TcpDecision::NoRoute { virtual_service } => {
                let virtual_service = virtual_service.to_string();
                return Some(Err(NoRoute::NoTcpRoute { virtual_service }));
            }
            TcpDecision::Routed {
                virtual_service,
                route,
                destinations,
            } => (virtual_service, route, destinations),
        };
        let key = format!("{}|{virtual_service}|tcp {route}", pod.workload);
        let weights: Vec<u32> = destinations.iter().map(|d| d.weight).collect();
        let chosen = &destinations[self.upstreams.split(&key, &weights)];
        let cluster = match &chosen.target {
            Ok(c) => c,
            Err(why) => return Some(Err(NoRoute::Unroutable(why.to_string()))),
        };
        let service = format!("{}/{}", cluster.service.namespace, cluster.service.name);
        let mut endpoints = snapshot.cluster_endpoints(cluster);
        endpoints.retain(|e| e.addr.is_ipv4() == orig.is_ipv4());
        if endpoints.is_empty() {
            let port = cluster.port;
            return Some(Err(NoRoute::NoEndpoints { service, port }));
        }
        let rr = (
            cluster.service.namespace.clone(),
            cluster.name(),
            cluster.port,
        );
        let ep = &endpoints[self.next_endpoint(rr, endpoints.len())];
        Some(Ok(Route {
            upstream: ep.addr,
            service: Some(service),
            workload: Some(ep.pod.workload()),
        }))
    }

    /// Next index (modulo `n`) for a service port's round-robin.
    fn next_endpoint(&self, key: (String, String, u16), n: usize) -> usize {
        let mut rr = self.round_robin.lock().unwrap_or_else(|p| p.into_inner());
        let slot = rr.entry(key).or_default();
        let i = *slot % n;
        *slot = slot.wrapping_add(1);
        i
    }

    /// The tunnel to use for `route`, if any: destinations that are enrolled workloads on
    /// another node are reached through HBONE to their pod's port 15008. Same-node pods and
    /// destinations outside the mesh are connected directly.
    fn tunnel_for(&self, pod: &PodContext, snapshot: &Snapshot, route: &Route) -> Option<PoolKey> {
        let dst = snapshot.pod_by_ip(route.upstream.ip())?;
        // A mesh pod whose node is unknown is still tunnelled: only a pod known to run here
        // may be reached without TLS.
        if dst.node_name.as_deref() == Some(self.shared.node.as_str())
            || !snapshot.in_mesh(dst, &self.shared.policy)
        {
            return None;
        }
        Some(PoolKey {
            src: pod.identity.clone(),
            // A service account that is not a valid SPIFFE segment cannot have been enrolled.
            dst: SpiffeId::new(
                &self.shared.mesh.trust_domain,
                &dst.namespace,
                &dst.service_account,
            )
            .ok()?,
            addr: SocketAddr::new(route.upstream.ip(), HBONE_PORT),
            origin: Origin {
                netns: pod.netns.clone(),
                netns_cookie: pod.netns_cookie,
                ip: pod
                    .ips
                    .iter()
                    .copied()
                    .find(|ip| ip.is_ipv4() == route.upstream.is_ipv4()),
            },
        })
    }

    /// Connects directly from inside the pod's netns: the destination is not in the mesh.
    async fn direct(
        &self,
        pod: Arc<PodContext>,
        stream: TcpStream,
        route: Route,
        mut record: ConnectionRecord,
    ) -> Option<Carry> {
        let upstream = match self.shared.connect_from(&pod, route.upstream).await {
            Ok(s) => s,
            Err(e) => {
                reset(stream);
                record.refuse(Ending::ConnectFailed, e.to_string());
                return None;
            }
        };
        record.line_mut().src_addr = upstream.local_addr().ok().map(|a| a.to_string());
        record.count(
            ConnectionLabels::new(
                Reporter::Source,
                Carrier::Passthrough,
                (Some(&pod.workload), Some(pod.identity.to_string())),
                (route.workload.as_deref(), None),
                false,
            ),
            &self.shared.open,
        );
        let tally = record.tally().clone();
        let relay = relay_until(stream, upstream, std::future::pending(), tally);
        Some(Carry::new(record, None, relay))
    }

    /// Carries a captured connection through an HBONE tunnel (mTLS to the destination pod's
    /// node proxy, which delivers it inside the destination pod).
    async fn tunnel(
        &self,
        pod: Arc<PodContext>,
        stream: TcpStream,
        route: Route,
        key: PoolKey,
        mut record: ConnectionRecord,
    ) -> Option<Carry> {
        record.line_mut().hbone = true;
        record.line_mut().src_identity = Some(key.src.to_string());
        record.line_mut().dst_identity = Some(key.dst.to_string());
        // Boxed: dialling and the handshakes are large futures, needed only until the stream
        // is open; inline, they would size the task for the connection's whole life.
        let connect = self.shared.mesh.pool.connect(
            &key,
            route.upstream,
            connect_headers(&pod, key.origin.ip),
        );
        let tunnel = match Box::pin(connect).await {
            Ok(t) => t,
            Err(e) => {
                reset(stream);
                record.refuse(Ending::ConnectFailed, e.to_string());
                return None;
            }
        };
        record.line_mut().hbone_connection = Some(tunnel.connection_id);
        record.count(
            ConnectionLabels::new(
                Reporter::Source,
                Carrier::Hbone,
                (Some(&pod.workload), Some(key.src.to_string())),
                (route.workload.as_deref(), Some(key.dst.to_string())),
                true,
            ),
            &self.shared.open,
        );
        // The stream's connection counts as busy until its place drops, after the relay.
        let (io, place) = tunnel.into_parts();
        let tally = record.tally().clone();
        let relay = relay_until(stream, io, std::future::pending(), tally);
        let relay = Holding::new(relay, place);
        Some(Carry::new(record, None, relay))
    }
}

impl Outbound {
    /// Whether `pod`'s requests to `svc` are routed one by one: a VirtualService or a
    /// DestinationRule applies to them.
    fn routes_requests(
        &self,
        snapshot: &Snapshot,
        pod: &PodContext,
        svc: &Service,
        _: u16,
    ) -> bool {
        let labels = pod
            .in_snapshot(snapshot)
            .map(|p| p.labels.clone())
            .unwrap_or_default();
        let source = crate::traffic::virtual_service::Source {
            namespace: &pod.namespace,
            labels: &labels,
        };
        snapshot.routes_by_rules(&source, svc)
    }

    fn cluster_domain(&self) -> &str {
        self.shared.requests.cluster_domain()
    }
}

/// The CONNECT request's headers, as Istio's ztunnel sends them: `Forwarded: for=` the source
/// pod's address `src` (of the tunnel's family: a dual-stack pod dialling over IPv6 is its
/// IPv6 address to the destination's `source.ip` rules), and its workload metadata as
/// `baggage`.
fn connect_headers(pod: &PodContext, src: Option<IpAddr>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(ip) = src {
        let forwarded = match ip {
            IpAddr::V4(v4) => format!("for={v4}"),
            IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
        };
        if let Ok(v) = HeaderValue::from_str(&forwarded) {
            headers.insert("forwarded", v);
        }
    }
    let (ns, name) = pod.workload.split_once('/').unwrap_or(("", &pod.workload));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "k8s.namespace.name={ns},k8s.pod.name={name},k8s.serviceaccount.name={}",
        pod.identity.service_account()
    )) {
        headers.insert("baggage", v);
    }
    headers
}
