//! The inbound side: everything that arrives for an enrolled pod, by one pipeline
//! ([`Inbound::deliver`]): admit, record, connect to the application inside the pod, then relay
//! the bytes or decide each HTTP request. Three arrivals feed it:
//!
//! * **plaintext** steered by `zt_sk_lookup` to the pod's 15006 listener (the accepted socket's
//!   local address is the original destination). Plaintext callers are not in the mesh (mesh
//!   pods on other nodes come through HBONE, same-node mesh traffic never gets here), so the
//!   pod's PeerAuthentication decides: STRICT refuses them, PERMISSIVE and DISABLE let them in,
//!   with no principal and no namespace;
//! * **HBONE**: mTLS + HTTP/2 CONNECT on the pod's 15008 listener. Each tunnel is delivered to
//!   the application inside the pod, and only to this pod: the listener belongs to one pod, so
//!   a CONNECT for any other address is refused (the proxy is never an open relay);
//! * **same node**: a mesh pod of this node calling another, handed over by the outbound side.
//!   No TLS (the bytes never leave the host), but the source is known by the listener that
//!   accepted it, not by an address, so PeerAuthentication treats it as mutual TLS;
//! * **from the node**: plaintext that a socket of the node's own network namespace opened (the
//!   kubelet's health probes), told apart by the kernel, not by an address. The kubelet has no
//!   mesh identity, so under STRICT its probes would be refused and the pods would never become
//!   Ready; Istio exempts them (it source-NATs them to 169.254.7.127, a socket of the node
//!   being what `-m owner --socket-exists` matches), and so does this: PeerAuthentication and
//!   AuthorizationPolicy do not apply to them. `zt_node_sockops` records, by 4-tuple, every TCP
//!   connection a socket of the node opens to an enrolled pod's address and marks it once the
//!   handshake completed; a connection that merely carries the node's address (a pod behind
//!   hairpin NAT, a forged packet) has no such record.
//!
//! The decision is re-made on every configuration change for as long as the connection lives.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ::http::StatusCode;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::{debug, info, warn};

mod http;
mod policy;

use policy::Revocation;

use super::{
    carry::{set_up_then_carry, Carry},
    record::{ConnectionRecord, Direction, Ending},
    PodContext, Shared,
};
use crate::{
    authz::{jwks::JwksCache, Admission, CustomCheck, Decision, InboundCall, Transport, Unknowns},
    capture::NodeConnections,
    hbone::{self, Handler, StreamIo, Tunnel},
    identity::SpiffeId,
    memory::Live,
    metrics::{
        Carrier, ConnectionLabels, HboneClosing, MtlsModeLabels, NodeConnectionLabels, NodeOutcome,
        Outcome, Reporter, Side,
    },
    model::Pod,
    ports::is_proxy_port,
    relay::{relay_until, reset, Duplex},
    state::Snapshot,
};

/// How a connection reached the pod.
pub(super) enum Arrival {
    /// Plaintext from `peer`, outside the mesh.
    Plaintext { peer: SocketAddr },
    /// A CONNECT stream of an mTLS connection from `peer`, whose certificate proved `identity`.
    Hbone {
        peer: SocketAddr,
        identity: SpiffeId,
        /// The address the caller says it comes from (`Forwarded: for=`).
        forwarded_for: Option<IpAddr>,
    },
    /// A mesh pod of this node, known by the outbound listener that accepted it.
    SameNode { src: Arc<PodContext> },
    /// Plaintext from `peer`, a socket of the node itself (a kubelet probe): past the pod's
    /// policies.
    FromNode { peer: SocketAddr },
}

/// What the node appears as in metrics and logs (`source_workload`, `src_workload`).
pub const NODE_SOURCE: &str = "node";

/// Why the node's own connections are not decided by policy, in their log lines.
const NODE_EXEMPTION: &str = "connection from the node itself (kubelet probe): PeerAuthentication and AuthorizationPolicy do not apply";

/// Why a delivery is refused, which an HBONE caller learns as a status.
#[derive(Clone, Copy, Debug)]
pub(super) enum Refusal {
    Forbidden,
    Unavailable,
}

/// Why a CONNECT request was refused, as `ztunnel_hbone_requests_refused_total` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HboneRefusal {
    /// The target is not an address of the pod whose listener received it.
    NotThisPod,
    /// The target port is one of the proxy's own.
    ReservedPort,
    /// The application did not accept the connection.
    ConnectFailed,
    /// Not a CONNECT to an `ip:port`.
    BadRequest,
}

impl HboneRefusal {
    fn as_str(self) -> &'static str {
        match self {
            HboneRefusal::NotThisPod => "not_this_pod",
            HboneRefusal::ReservedPort => "reserved_port",
            HboneRefusal::ConnectFailed => "connect_failed",
            HboneRefusal::BadRequest => "bad_request",
        }
    }
}

/// The caller's end of a delivery: a socket, or a CONNECT stream not answered yet.
pub(super) trait Downstream: Send + 'static {
    type Io: Duplex + AsyncRead + AsyncWrite + Unpin;

    /// Refuses it: a reset for a socket, a status for a CONNECT (which it returns).
    fn refuse(self, why: Refusal) -> Option<StatusCode>;

    /// Opens it for the application's bytes (a CONNECT is answered 200).
    fn open(self) -> io::Result<Self::Io>;
}

impl Downstream for TcpStream {
    type Io = TcpStream;

    fn refuse(self, _: Refusal) -> Option<StatusCode> {
        reset(self);
        None
    }

    fn open(self) -> io::Result<TcpStream> {
        Ok(self)
    }
}

impl Downstream for Tunnel {
    type Io = StreamIo;

    fn refuse(self, why: Refusal) -> Option<StatusCode> {
        let status = match why {
            Refusal::Forbidden => StatusCode::FORBIDDEN,
            Refusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        Tunnel::refuse(self, status);
        Some(status)
    }

    fn open(self) -> io::Result<StreamIo> {
        self.accept()
    }
}

/// The inbound side of this node's proxy.
pub struct Inbound {
    pub(super) shared: Arc<Shared>,
    /// Key sets of RequestAuthentication `jwksUri`s.
    pub(super) jwks: JwksCache,
    /// The node's own connections to enrolled pods, recorded by the kernel.
    node_connections: Arc<NodeConnections>,
}

impl Inbound {
    pub(super) fn new(shared: Arc<Shared>, node_connections: Arc<NodeConnections>) -> Self {
        Self {
            shared,
            jwks: JwksCache::default(),
            node_connections,
        }
    }

    /// A plaintext connection accepted on `pod`'s 15006 listener: its set-up.
    pub(super) async fn plaintext(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<Carry> {
        let Ok(dst) = stream.local_addr() else {
            return None;
        };
        // The proxy's own delivery to this pod carries its mark into the accepted socket
        // (`tcp_fwmark_accept`). It only gets here if `zt_sk_lookup` did not let it through;
        // taking it would deliver it again, in a loop, as a caller outside the mesh.
        if socket2::SockRef::from(&stream).mark().ok() == Some(ztunnel_common::DELIVERY_MARK) {
            warn!(direction = "inbound", dst_workload = %pod.workload, src_addr = %peer,
                "the proxy's own delivery reached the pod's plaintext listener; reset");
            self.shared.metrics.delivery_source.add("looped");
            reset(stream);
            return None;
        }
        let _accepted = self.shared.accepted_plaintext(&pod, dst, peer);
        let snapshot = self.shared.snapshot();
        let arrival = if self.node_connections.take_established(peer, dst) {
            Arrival::FromNode { peer }
        } else {
            Arrival::Plaintext { peer }
        };
        self.deliver(pod, arrival, dst, stream, snapshot, None)
            .await
    }

    /// A connection accepted on `pod`'s HBONE listener: the mTLS handshake as the pod, then
    /// each CONNECT stream delivered on its own.
    pub(super) async fn hbone(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        tcp: TcpStream,
        peer: SocketAddr,
    ) {
        let accepted = tokio::time::Instant::now();
        let _live = Live::new();
        let (mesh, metrics) = (&self.shared.mesh, self.shared.metrics.clone());
        let limits = &mesh.server;
        let refused_at_accept = |reason: &str, error: &dyn std::fmt::Display| {
            warn!(direction = "inbound", dst_workload = %pod.workload, src_addr = %peer,
                reason, error = %error, "HBONE connection refused");
        };
        let pending = match mesh.pending.admit(peer.ip(), limits) {
            Ok(place) => place,
            Err(full) => {
                metrics.hbone_closed(Side::Inbound, HboneClosing::PendingLimit);
                refused_at_accept(HboneClosing::PendingLimit.as_str(), &full);
                return reset(tcp);
            }
        };
        let first_request_by = accepted + limits.first_request_timeout;
        let tls = match hbone::server::accept(
            tcp,
            &mesh.certs,
            &pod.identity,
            &mesh.roots,
            first_request_by,
        )
        .await
        {
            Ok(tls) => tls,
            Err(e) => {
                metrics.handshake(Side::Inbound, e.reason());
                return refused_at_accept(e.reason(), &e);
            }
        };
        metrics.handshake(Side::Inbound, "ok");
        let (inbound, tunnel_pod, identity) = (self.clone(), pod.clone(), tls.peer);
        let handler: Handler = Arc::new(move |req, tunnel| {
            let (inbound, pod) = (inbound.clone(), tunnel_pod.clone());
            let arrival = Arrival::Hbone {
                peer,
                identity: identity.clone(),
                forwarded_for: req.forwarded_for,
            };
            Box::pin(set_up_then_carry(async move {
                let snapshot = inbound.shared.snapshot();
                inbound
                    .deliver(pod, arrival, req.target, tunnel, snapshot, None)
                    .await
            }))
        });
        let dst_workload = pod.workload.clone();
        let refused_metrics = metrics.clone();
        let refused = move |status: StatusCode, reason: &str| {
            refused_metrics
                .hbone_refused
                .add(HboneRefusal::BadRequest.as_str());
            let mut record = ConnectionRecord::new(Direction::Inbound, refused_metrics.clone());
            record.line_mut().hbone = true;
            record.line_mut().src_addr = Some(peer.to_string());
            record.line_mut().dst_workload = Some(dst_workload.clone());
            record.line_mut().status = Some(status.as_u16());
            record.refuse(Ending::Refused, reason);
        };
        let ended = hbone::server::serve(
            tls.stream,
            handler,
            refused,
            *limits,
            first_request_by,
            Some(pending),
        )
        .await;
        metrics.hbone_closed(Side::Inbound, ended.reason);
        let (reason, error) = (ended.reason.as_str(), ended.error.map(|e| e.to_string()));
        match ended.reason {
            HboneClosing::NoRequest => refused_at_accept(
                reason,
                &format_args!(
                    "no CONNECT request within {:?} of the TCP accept",
                    limits.first_request_timeout
                ),
            ),
            HboneClosing::ProtocolError | HboneClosing::KeepaliveTimeout => {
                warn!(direction = "inbound", dst_workload = %pod.workload, src_addr = %peer,
                    reason, error, "HBONE connection closed")
            }
            HboneClosing::Idle => {
                info!(direction = "inbound", dst_workload = %pod.workload, src_addr = %peer,
                    reason, idle_timeout = ?limits.idle_timeout, "HBONE connection closed")
            }
            HboneClosing::PeerClosed | HboneClosing::PendingLimit => {
                debug!(direction = "inbound", dst_workload = %pod.workload, src_addr = %peer,
                    reason, error, "HBONE connection closed")
            }
        }
    }

    /// The inbound pipeline: delivers a connection for `dst`, an address of `pod`, that
    /// arrived as `arrival`, deciding it against `snapshot` (the one the caller's side routed
    /// on, for same-node traffic). `caller` is the caller side's record when this proxy serves
    /// both ends (same node): it learns the outcome, and is counted as the source reporter.
    /// This is the set-up: an admitted and connected connection is returned, to be carried
    /// ([`Carry`]) once this future's state is gone.
    pub(super) async fn deliver<D: Downstream>(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        arrival: Arrival,
        dst: SocketAddr,
        downstream: D,
        snapshot: Arc<Snapshot>,
        mut caller: Option<ConnectionRecord>,
    ) -> Option<Carry> {
        let metrics = &self.shared.metrics;
        let mut record = ConnectionRecord::new(Direction::Inbound, metrics.clone());
        let (call, src_pod) = arrival.call(&snapshot, dst);
        let src_workload = match &arrival {
            Arrival::FromNode { .. } => Some(NODE_SOURCE.to_owned()),
            Arrival::SameNode { src } => Some(src.workload.clone()),
            _ => src_pod.as_ref().map(|p| p.workload()),
        };
        record.line_mut().src_workload = src_workload.clone();
        record.line_mut().dst_addr = Some(dst);
        record.line_mut().dst_workload = Some(pod.workload.clone());
        let (carrier, src_principal, mutual_tls) = match &arrival {
            Arrival::Plaintext { peer } => {
                record.line_mut().src_addr = Some(peer.to_string());
                (Carrier::Plaintext, None, false)
            }
            Arrival::Hbone {
                peer,
                identity,
                forwarded_for,
            } => {
                record.line_mut().hbone = true;
                record.line_mut().src_identity = Some(identity.to_string());
                record.line_mut().src_addr = Some(peer.to_string());
                record.line_mut().forwarded_for = forwarded_for.map(|a| a.to_string());
                (Carrier::Hbone, Some(identity.to_string()), true)
            }
            Arrival::SameNode { src } => {
                record.line_mut().same_node = true;
                record.line_mut().src_identity = Some(src.identity.to_string());
                record.line_mut().src_addr = src.ips.first().map(|ip| ip.to_string());
                // No TLS is involved (the bytes never leave the host): not `mutual_tls`.
                (Carrier::SameNode, Some(src.identity.to_string()), false)
            }
            Arrival::FromNode { peer } => {
                record.line_mut().src_addr = Some(peer.to_string());
                record.line_mut().exempt = Some(NODE_EXEMPTION);
                (Carrier::Node, None, false)
            }
        };
        record.line_mut().transport = Some(carrier);
        let from_node = matches!(arrival, Arrival::FromNode { .. });
        let count_node = |outcome| {
            if from_node {
                metrics
                    .node_connections
                    .get_or_create(&NodeConnectionLabels { outcome })
                    .inc();
            }
        };
        let refuse = |record: &mut ConnectionRecord,
                      caller: &mut Option<ConnectionRecord>,
                      downstream: D,
                      why: Refusal,
                      ending: Ending,
                      reason: &str| {
            record.line_mut().status = downstream.refuse(why).map(|s| s.as_u16());
            record.refuse(ending, reason);
            if let Some(c) = caller {
                c.refuse(ending, reason);
            }
        };

        // Plaintext is decided by the pod's PeerAuthentication first.
        let plaintext = matches!(arrival, Arrival::Plaintext { .. });
        if plaintext {
            record.line_mut().mtls = pod
                .in_snapshot(&snapshot)
                .map(|p| snapshot.mtls_mode(p, dst.port()));
        }
        // Only sk_lookup puts connections on the pod's listeners, and it never steers loopback
        // traffic; the proxy's own ports are not services (forwarding to them would loop back
        // here), and a pod's listener serves that pod only.
        let misdirected = match &arrival {
            Arrival::Plaintext { peer } if peer.ip().is_loopback() => {
                Some(("connection did not arrive from outside the pod", None))
            }
            Arrival::Plaintext { .. } if is_proxy_port(dst.port()) => {
                Some(("destination port is reserved for the proxy", None))
            }
            Arrival::Plaintext { .. } if record.line().mtls.is_none() => {
                Some(("the pod is no longer in the configuration", None))
            }
            Arrival::Hbone { .. } if !pod.ips.contains(&dst.ip()) => {
                Some(("target is not this pod", Some(HboneRefusal::NotThisPod)))
            }
            Arrival::Hbone { .. } if is_proxy_port(dst.port()) => Some((
                "target port is reserved for the proxy",
                Some(HboneRefusal::ReservedPort),
            )),
            Arrival::FromNode { .. } if is_proxy_port(dst.port()) => {
                Some(("destination port is reserved for the proxy", None))
            }
            _ => None,
        };
        if let Some((reason, counted)) = misdirected {
            if let Some(r) = counted {
                metrics.hbone_refused.add(r.as_str());
            }
            count_node(NodeOutcome::Refused);
            let (why, ending) = (Refusal::Forbidden, Ending::Refused);
            refuse(&mut record, &mut caller, downstream, why, ending, reason);
            return None;
        }

        // What the Services targeting this port declare it speaks (the node's own connections
        // are opaque bytes whatever it is).
        let declared = match from_node {
            true => None,
            false => pod
                .in_snapshot(&snapshot)
                .and_then(|p| snapshot.declared_protocol(p, dst.port())),
        };
        record.line_mut().app_protocol = declared;
        // The node's own connections are exempt from the pod's policies: allowed as opaque
        // bytes, never re-checked.
        let admission = if from_node {
            Admission::Allowed(Decision {
                allowed: true,
                policy: None,
                rule: None,
                action: None,
                reason: NODE_EXEMPTION.into(),
                audit: None,
            })
        } else {
            // A port declared opaque is never read as HTTP: its HTTP rules are settled now, as
            // for any opaque traffic, and nothing waits for the client's first bytes (a
            // server-first protocol would wait in vain).
            let unknowns = match declared {
                Some(p) if !p.is_http() => Unknowns::Conservative,
                _ => Unknowns::Defer,
            };
            self.admit(&snapshot, &pod, &call, unknowns)
        };
        if let Some(mtls) = &record.line().mtls {
            let outcome = match admission {
                Admission::MtlsRequired(_) => Outcome::Refused,
                _ => Outcome::Allowed,
            };
            metrics
                .plaintext_connections
                .get_or_create(&MtlsModeLabels {
                    mode: mtls.mode.as_str(),
                    outcome,
                })
                .inc();
        }
        let decision = match admission {
            Admission::MtlsRequired(d) => {
                let (why, ending) = (Refusal::Forbidden, Ending::Refused);
                refuse(&mut record, &mut caller, downstream, why, ending, &d.reason);
                return None;
            }
            Admission::Denied(d) | Admission::Custom(CustomCheck { denied: d, .. }) => {
                self.record_decision(&pod, &call, &d);
                record.decided(&d);
                if let Some(c) = caller.as_mut() {
                    c.decided(&d);
                }
                let (why, ending) = (Refusal::Forbidden, Ending::Denied);
                refuse(&mut record, &mut caller, downstream, why, ending, &d.reason);
                return None;
            }
            Admission::Allowed(d) if from_node => Some(d),
            Admission::Allowed(d) => {
                self.record_decision(&pod, &call, &d);
                record.decided(&d);
                Some(d)
            }
            // Decided request by request, once the bytes are read.
            Admission::PerRequest => None,
        };

        let caller_ip = call.attributes.source_ip;
        let (upstream, return_path) = match self.shared.deliver_to(&pod, caller_ip, dst).await {
            Ok(d) => {
                record.line_mut().src_preserved = Some(d.source);
                metrics.delivery_source.add(d.source.as_str());
                d.split()
            }
            Err(e) => {
                count_node(NodeOutcome::ConnectFailed);
                if matches!(arrival, Arrival::Hbone { .. }) {
                    metrics
                        .hbone_refused
                        .add(HboneRefusal::ConnectFailed.as_str());
                }
                let reason = format!("delivery to the application failed: {e}");
                let (why, ending) = (Refusal::Unavailable, Ending::ConnectFailed);
                refuse(&mut record, &mut caller, downstream, why, ending, &reason);
                return None;
            }
        };
        let downstream = match downstream.open() {
            Ok(io) => io,
            Err(e) => {
                reset(upstream);
                record.refuse(Ending::Error, format!("answering the CONNECT failed: {e}"));
                return None;
            }
        };
        count_node(NodeOutcome::Admitted);
        let per_request = decision.is_none();
        if !from_node {
            record.line_mut().upstream = Some(dst);
            record.line_mut().dst_identity = Some(pod.identity.to_string());
            record.line_mut().per_request = Some(per_request);
        }
        // The node is labelled as a workload `node` of a namespace `node`.
        let node_workload = format!("{NODE_SOURCE}/{NODE_SOURCE}");
        let src_labelled = match from_node {
            true => Some(node_workload.as_str()),
            false => src_workload.as_deref(),
        };
        let labels = |reporter| {
            ConnectionLabels::new(
                reporter,
                carrier,
                (src_labelled, src_principal.clone()),
                (Some(&pod.workload), Some(pod.identity.to_string())),
                mutual_tls,
            )
        };
        let open = &self.shared.open;
        record.count(labels(Reporter::Destination), open);
        if let Some(c) = caller.as_mut() {
            // Both sides are this proxy's: counted once as each reporter, listed as two
            // connections that carry the same bytes.
            c.carried_by(&record);
            c.count(labels(Reporter::Source), open);
        }

        // Counted from the client's view (sent = client to application). The node's own
        // connections were admitted by no policy, so no change revokes them.
        let tally = record.tally().clone();
        if from_node {
            let relay = relay_until(downstream, upstream, std::future::pending(), tally);
            return Some(Carry::new(record, caller, relay).holding(return_path));
        }
        // A change that no longer admits the connection (a port made STRICT, a new DENY)
        // resets it; other changes leave it alone.
        let config = self.shared.config.clone();
        let revoke = Revocation::new(self.clone(), config, pod.clone(), call.clone(), per_request);
        if !per_request {
            let relay = relay_until(downstream, upstream, revoke, tally);
            return Some(Carry::new(record, caller, relay).holding(return_path));
        }
        let requests = self.request_context(
            &snapshot,
            &pod,
            dst,
            src_pod.as_deref(),
            (src_principal.as_deref(), mutual_tls),
            &record,
        );
        let serve = self.serve_per_request(
            pod, call, declared, downstream, upstream, requests, revoke, tally,
        );
        Some(Carry::new(record, caller, serve).holding(return_path))
    }
}

impl Arrival {
    /// The call as admission sees it ([`crate::authz::admit`]), and the caller's pod if the
    /// configuration knows it.
    fn call(&self, snapshot: &Snapshot, dst: SocketAddr) -> (InboundCall, Option<Arc<Pod>>) {
        match self {
            Arrival::Plaintext { peer } => (
                InboundCall::new(Transport::Plaintext, None, Some(peer.ip()), dst),
                snapshot.pod_by_ip(peer.ip()).cloned(),
            ),
            Arrival::Hbone {
                peer,
                identity,
                forwarded_for,
            } => {
                // The peer's workload and address: the address it says it comes from, but
                // only if a pod with that address runs as the identity the certificate proved.
                let src_pod = forwarded_for
                    .and_then(|ip| snapshot.pod_by_ip(ip))
                    .filter(|p| {
                        p.service_account == identity.service_account()
                            && p.namespace == identity.namespace()
                    });
                let source_ip = match src_pod {
                    Some(_) => *forwarded_for,
                    None => Some(peer.ip()),
                };
                let call = InboundCall::new(Transport::Mesh, Some(identity), source_ip, dst);
                (call, src_pod.cloned())
            }
            Arrival::SameNode { src } => {
                let source_ip = src
                    .ips
                    .iter()
                    .copied()
                    .find(|ip| ip.is_ipv4() == dst.is_ipv4());
                let call = InboundCall::new(Transport::Mesh, Some(&src.identity), source_ip, dst);
                (call, src.in_snapshot(snapshot).cloned())
            }
            // Never admitted by policy; the call says who it was, for nothing else.
            Arrival::FromNode { peer } => (
                InboundCall::new(Transport::Plaintext, None, Some(peer.ip()), dst),
                None,
            ),
        }
    }
}
