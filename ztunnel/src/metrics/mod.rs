//! The proxy's counters, on a floor of their own: the configuration sources, the proxy paths
//! and HBONE bump them, and the admin endpoint serves them on 15020 (`/metrics`, OpenMetrics
//! text) with what it samples at scrape time ([`crate::admin`]).
//!
//! Connection metrics use Istio's names and labels (`istio_tcp_*`, `reporter`,
//! `source_workload`, `destination_principal`...) so existing dashboards work; everything
//! specific to this proxy is `ztunnel_*`.
use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Label values this proxy decides: each has a fixed set of values, never text built at run
/// time (an error message as a label value would make a new series per message).
macro_rules! label_values {
    ($($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $value:literal,)* })*) => {$(
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $value,)*
                }
            }
        }

        impl prometheus_client::encoding::EncodeLabelValue for $name {
            fn encode(
                &self,
                e: &mut prometheus_client::encoding::LabelValueEncoder,
            ) -> std::fmt::Result {
                std::fmt::Write::write_str(e, self.as_str())
            }
        }
    )*};
}

pub mod requests;

label_values! {
    /// Which proxy counted a connection.
    Reporter {
        /// The caller's proxy.
        Source => "source",
        Destination => "destination",
    }
    /// How a connection was carried.
    Carrier {
        Hbone => "hbone",
        /// Inbound from outside the mesh.
        Plaintext => "plaintext",
        SameNode => "same_node",
        /// Outbound to something that is not a mesh workload.
        Passthrough => "passthrough",
        /// From the node itself (kubelet probes; `source_workload` is `node`).
        Node => "node",
    }
    /// Whether a connection was mutual TLS.
    SecurityPolicy {
        MutualTls => "mutual_tls",
        None => "none",
    }
    /// Which side of a TLS handshake this proxy was.
    Side {
        /// The server (a peer connected to us).
        Inbound => "inbound",
        Outbound => "outbound",
    }
    /// What became of a call or request.
    Outcome {
        Allowed => "allowed",
        Denied => "denied",
        Refused => "refused",
    }
    /// What became of a connection from the node itself (a kubelet probe).
    NodeOutcome {
        Admitted => "admitted",
        /// The application did not accept it.
        ConnectFailed => "connect_failed",
        Refused => "refused",
    }
    /// Why the HBONE pool gave up on a CONNECT.
    PoolRefusal {
        /// Its key (source pod, destination pod) was at its stream cap for the whole wait.
        Exhausted => "exhausted",
        /// The peer did not answer the CONNECT in time.
        ResponseTimeout => "response_timeout",
    }
    /// Why an HBONE connection was closed (or refused before its first request).
    HboneClosing {
        /// No stream for the idle timeout.
        Idle => "idle",
        /// A PING went unanswered: the peer is dead, its streams were reset.
        KeepaliveTimeout => "keepalive_timeout",
        /// The server's deadline from accept to the first CONNECT passed.
        NoRequest => "no_request",
        /// Too many connections without a first CONNECT (from the source, or in all).
        PendingLimit => "pending_limit",
        /// Not HTTP/2 after TLS (no preface), or an HTTP/2 protocol error (e.g. too many
        /// streams reset before they were accepted: GOAWAY ENHANCE_YOUR_CALM).
        ProtocolError => "protocol_error",
        /// The peer closed it (GOAWAY, or the TCP connection ended).
        PeerClosed => "peer_closed",
    }
    /// At which layer an authorization decision was made.
    Layer {
        /// When the connection arrived (L4).
        Connection => "connection",
        /// An HTTP request.
        Request => "request",
    }
}

/// Who a connection was between, as Istio labels it. Unknown values are `unknown`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    pub transport: Carrier,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub connection_security_policy: SecurityPolicy,
}

impl ConnectionLabels {
    /// `src` and `dst` are `(namespace/name, principal)`, each part unknown if `None`.
    pub fn new(
        reporter: Reporter,
        transport: Carrier,
        src: (Option<&str>, Option<String>),
        dst: (Option<&str>, Option<String>),
        mutual_tls: bool,
    ) -> Self {
        let split = |w: Option<&str>| match w.and_then(|w| w.split_once('/')) {
            Some((ns, name)) => (name.to_owned(), ns.to_owned()),
            None => ("unknown".to_owned(), "unknown".to_owned()),
        };
        let ((sw, sns), (dw, dns)) = (split(src.0), split(dst.0));
        let unknown = || "unknown".to_owned();
        Self {
            reporter,
            transport,
            source_workload: sw,
            source_workload_namespace: sns,
            source_principal: src.1.unwrap_or_else(unknown),
            destination_workload: dw,
            destination_workload_namespace: dns,
            destination_principal: dst.1.unwrap_or_else(unknown),
            connection_security_policy: if mutual_tls {
                SecurityPolicy::MutualTls
            } else {
                SecurityPolicy::None
            },
        }
    }
}

/// One established connection: counted opened when made, closed (with its bytes) when
/// dropped, however the connection ends.
pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
    labels: ConnectionLabels,
    from_caller: u64,
    to_caller: u64,
}

impl ConnectionGuard {
    /// Bytes the caller sent and received.
    pub fn bytes(&mut self, from_caller: u64, to_caller: u64) {
        self.from_caller = from_caller;
        self.to_caller = to_caller;
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let m = &self.metrics;
        m.active_connections.dec();
        m.connections_closed.get_or_create(&self.labels).inc();
        m.received_bytes
            .get_or_create(&self.labels)
            .inc_by(self.from_caller);
        m.sent_bytes
            .get_or_create(&self.labels)
            .inc_by(self.to_caller);
    }
}

/// A reason: one of a fixed set, named by the type that decides it (`HboneRefusal`,
/// `JwtFailure`, ...), as its `as_str`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: Side,
    /// `ok`, or why it failed (`tls::classify`).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolRefusalLabels {
    pub reason: PoolRefusal,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HboneClosingLabels {
    pub direction: Side,
    pub reason: HboneClosing,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MtlsModeLabels {
    /// The PeerAuthentication mode (`STRICT`, `PERMISSIVE`, `DISABLE`).
    pub mode: &'static str,
    /// `allowed` or `refused`.
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeConnectionLabels {
    pub outcome: NodeOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `namespace/name` of the deciding policy, or `none`.
    pub policy: String,
    /// `ALLOW`, `DENY`, `CUSTOM`, or `none` when no policy applied.
    pub action: &'static str,
    /// `allowed` or `denied`.
    pub decision: Outcome,
    pub layer: Layer,
}

/// A counter by reason.
#[derive(Clone, Debug, Default)]
pub struct ByReason(Family<ReasonLabels, Counter>);

impl ByReason {
    pub fn add(&self, reason: &'static str) {
        self.0.get_or_create(&ReasonLabels { reason }).inc();
    }
}

/// The proxy's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_opened: Family<ConnectionLabels, Counter>,
    pub connections_closed: Family<ConnectionLabels, Counter>,
    pub sent_bytes: Family<ConnectionLabels, Counter>,
    pub received_bytes: Family<ConnectionLabels, Counter>,
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    /// CONNECT requests refused, by reason.
    pub hbone_refused: ByReason,
    /// CONNECTs the client pool gave up on, by reason.
    pub hbone_pool_refused: Family<PoolRefusalLabels, Counter>,
    /// HBONE connections closed by this proxy's limits or by the peer, by side and reason.
    pub hbone_closed: Family<HboneClosingLabels, Counter>,
    /// Inbound plaintext connections by the mTLS mode that decided them.
    pub plaintext_connections: Family<MtlsModeLabels, Counter>,
    /// Plaintext connections from the node itself (kubelet probes), exempt from policy.
    pub node_connections: Family<NodeConnectionLabels, Counter>,
    pub authz_decisions: Family<DecisionLabels, Counter>,
    /// Open connections cut because a configuration change no longer admits them.
    pub connections_revoked: Counter,
    /// Inbound deliveries by the source address the application saw: `caller`, or why the
    /// pod's own (`looped`: the proxy's own delivery steered back to it, reset).
    pub delivery_source: ByReason,
    /// Requests refused for a bad JWT (401), by reason.
    pub jwt_failures: ByReason,
    /// CUSTOM checks by outcome (`allowed`, `denied`, `error`, `error_fail_open`,
    /// `unknown_provider`).
    pub ext_authz_checks: ByReason,
    /// Connections open now (both reporters of a same-node connection count).
    pub active_connections: Gauge,
    /// Istio's request metrics ([`requests`]): every request the proxy parses.
    pub requests: Family<requests::RequestLabels, Counter>,
    pub request_duration: requests::RequestHistogram,
    pub request_bytes: requests::RequestHistogram,
    pub response_bytes: requests::RequestHistogram,
    /// Configuration versions (a directory source) or objects (the Kubernetes source)
    /// rejected; the last good one stayed in force. Applied ones show as the generation.
    pub config_rejected: Counter,
    /// What source-side routing did besides passing requests on: `retry`, `overflow`,
    /// `outlier_ejection`, `mirror`, `fault_delay`, `fault_abort`, `no_route`, `timeout`.
    pub traffic_events: ByReason,
}

impl Metrics {
    /// Registers every metric in `registry`; the families are shared, so the proxy's updates
    /// show in the registry's output.
    pub fn register(&self, registry: &mut Registry) {
        let m = self;
        // (name, help, metric): the metric types differ, so a macro rather than a loop.
        macro_rules! register {
            ($(($name:expr, $help:expr, $metric:expr),)*) => {
                $(registry.register($name, $help, $metric);)*
            };
        }
        register!(
            (
                "istio_tcp_connections_opened",
                "TCP connections opened",
                m.connections_opened.clone()
            ),
            (
                "istio_tcp_connections_closed",
                "TCP connections closed",
                m.connections_closed.clone()
            ),
            (
                "istio_tcp_sent_bytes",
                "Bytes sent to the source (the caller) of a connection",
                m.sent_bytes.clone()
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes received from the source (the caller) of a connection",
                m.received_bytes.clone()
            ),
            (
                "istio_requests",
                "HTTP requests the proxy parsed, by the peers, the outcome and the reporter",
                m.requests.clone()
            ),
            (
                "istio_request_duration_milliseconds",
                "Duration of HTTP requests, from the request's head to the response's end",
                m.request_duration.0.clone()
            ),
            (
                "istio_request_bytes",
                "Body bytes of HTTP requests",
                m.request_bytes.0.clone()
            ),
            (
                "istio_response_bytes",
                "Body bytes of HTTP responses",
                m.response_bytes.0.clone()
            ),
            (
                "ztunnel_tls_handshakes",
                "Mutual-TLS handshakes of HBONE connections by direction and outcome",
                m.tls_handshakes.clone()
            ),
            (
                "ztunnel_hbone_requests_refused",
                "HBONE CONNECT requests refused, by reason",
                m.hbone_refused.0.clone()
            ),
            (
                "ztunnel_hbone_pool_refused",
                "CONNECTs the HBONE client pool gave up on, by reason",
                m.hbone_pool_refused.clone()
            ),
            (
                "ztunnel_hbone_connections_closed",
                "HBONE connections closed, by side (inbound: this proxy served it) and reason",
                m.hbone_closed.clone()
            ),
            (
                "ztunnel_plaintext_connections",
                "Inbound plaintext connections by the PeerAuthentication mode that decided them",
                m.plaintext_connections.clone()
            ),
            (
                "ztunnel_node_connections",
                "Plaintext connections the node itself (the kubelet's probes) made to enrolled pods, exempt from PeerAuthentication and AuthorizationPolicy, by outcome",
                m.node_connections.clone()
            ),
            (
                "ztunnel_authorization_decisions",
                "Authorization decisions by deciding policy, action and outcome",
                m.authz_decisions.clone()
            ),
            (
                "ztunnel_connections_revoked",
                "Open connections reset because a configuration change no longer admits them",
                m.connections_revoked.clone()
            ),
            (
                "ztunnel_inbound_delivery_source",
                "Inbound connections delivered to the application, by the source address it saw: reason=caller (the caller's, as without the mesh) or why the pod's own",
                m.delivery_source.0.clone()
            ),
            (
                "ztunnel_jwt_failures",
                "HTTP requests refused with 401 for a bad JWT, by reason",
                m.jwt_failures.0.clone()
            ),
            (
                "ztunnel_active_connections",
                "Proxied connections open now (a same-node one counts once per side)",
                m.active_connections.clone()
            ),
            (
                "ztunnel_ext_authz_checks",
                "CUSTOM (ext-authz) checks by outcome",
                m.ext_authz_checks.0.clone()
            ),
            (
                "ztunnel_config_rejected",
                "Configuration versions rejected (the last good one stayed in force)",
                m.config_rejected.clone()
            ),
            (
                "ztunnel_traffic_events",
                "What routing (VirtualService, DestinationRule) did to requests besides passing them on, by event",
                m.traffic_events.0.clone()
            ),
        );
    }

    /// Counts a connection opened; the guard counts it closed.
    pub fn open(self: &Arc<Self>, labels: ConnectionLabels) -> ConnectionGuard {
        self.connections_opened.get_or_create(&labels).inc();
        self.active_connections.inc();
        ConnectionGuard {
            metrics: self.clone(),
            labels,
            from_caller: 0,
            to_caller: 0,
        }
    }

    pub fn pool_refused(&self, reason: PoolRefusal) {
        self.hbone_pool_refused
            .get_or_create(&PoolRefusalLabels { reason })
            .inc();
    }

    pub fn hbone_closed(&self, direction: Side, reason: HboneClosing) {
        self.hbone_closed
            .get_or_create(&HboneClosingLabels { direction, reason })
            .inc();
    }

    pub fn handshake(&self, direction: Side, outcome: &'static str) {
        self.tls_handshakes
            .get_or_create(&HandshakeLabels { direction, outcome })
            .inc();
    }
}
