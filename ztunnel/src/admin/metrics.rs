//! Prometheus metrics, served on 15020 (`/metrics`, OpenMetrics text).
//!
//! Connection metrics use Istio's names and labels (`istio_tcp_*`, `reporter`,
//! `source_workload`, `destination_principal`...) so existing dashboards work; everything
//! specific to this proxy is `ztunnel_*`. Counters that the proxy paths bump live here;
//! values owned elsewhere (the HBONE pool, certificates, the configuration, the kernel's BPF
//! program statistics) are read when scraped.
use std::{
    sync::{atomic::AtomicU64, Arc},
    time::UNIX_EPOCH,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::Registry,
};

use super::ProxyView;

/// Who a connection was between, as Istio labels it. Unknown values are `unknown`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `source` (counted by the caller's proxy) or `destination`.
    pub reporter: &'static str,
    /// `hbone`, `plaintext` (inbound from outside the mesh), `same_node`, `passthrough`
    /// (outbound to something that is not a mesh workload), or `node` (from the node itself:
    /// kubelet probes; `source_workload` is `node`).
    pub transport: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
}

impl ConnectionLabels {
    /// `src` and `dst` are `(namespace/name, principal)`, each part unknown if `None`.
    pub fn new(
        reporter: &'static str,
        transport: &'static str,
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
            connection_security_policy: if mutual_tls { "mutual_tls" } else { "none" },
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `inbound` (we are the server) or `outbound`.
    pub direction: &'static str,
    /// `ok`, or why it failed.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MtlsModeLabels {
    pub mode: String,
    /// `allowed` or `refused`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeConnectionLabels {
    /// `admitted`, `connect_failed` (the application did not accept) or `refused`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `namespace/name` of the deciding policy, or `none`.
    pub policy: String,
    /// `ALLOW`, `DENY`, `CUSTOM`, or `none` when no policy applied.
    pub action: String,
    /// `allowed` or `denied`.
    pub decision: &'static str,
    /// `connection` (decided at L4) or `request` (an HTTP request).
    pub layer: &'static str,
}

/// A counter by reason.
#[derive(Clone, Debug, Default)]
pub struct ByReason(Family<ReasonLabels, Counter>);

impl ByReason {
    pub fn add(&self, reason: &str) {
        self.0
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
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
    /// Inbound plaintext connections by the mTLS mode that decided them.
    pub plaintext_connections: Family<MtlsModeLabels, Counter>,
    /// Plaintext connections from the node itself (kubelet probes), exempt from policy.
    pub node_connections: Family<NodeConnectionLabels, Counter>,
    pub authz_decisions: Family<DecisionLabels, Counter>,
    /// Open connections cut because a configuration change no longer admits them.
    pub connections_revoked: Counter,
    /// Requests refused for a bad JWT (401), by reason.
    pub jwt_failures: ByReason,
    /// CUSTOM checks by outcome (`allowed`, `denied`, `error`, `error_fail_open`,
    /// `unknown_provider`).
    pub ext_authz_checks: ByReason,
    /// Connections open now (both reporters of a same-node connection count).
    pub active_connections: Gauge,
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

    pub fn handshake(&self, direction: &'static str, outcome: &str) {
        self.tls_handshakes
            .get_or_create(&HandshakeLabels {
                direction,
                outcome: outcome.to_owned(),
            })
            .inc();
    }
}

/// Configuration versions rejected (a bad file or object); applied ones show as the
/// generation.
pub static CONFIG_REJECTED: AtomicU64 = AtomicU64::new(0);

/// Values owned by other parts (the pool, certificates, configuration, pins), read at scrape
/// time.
#[derive(Debug)]
pub struct Sampled(pub Arc<ProxyView>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Sampled {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let view = &self.0;
        let proxy = &view.proxy;
        let pool = proxy.mesh.pool.stats();
        gauge(
            &mut e,
            "ztunnel_hbone_pool_connections",
            "HBONE connections in the pool",
            pool.connections as i64,
        )?;
        gauge(
            &mut e,
            "ztunnel_hbone_active_streams",
            "CONNECT streams open on pooled HBONE connections",
            pool.active_streams as i64,
        )?;
        counter(
            &mut e,
            "ztunnel_hbone_connections_opened",
            "HBONE connections opened by the pool",
            pool.connections_opened,
        )?;
        counter(
            &mut e,
            "ztunnel_hbone_streams_opened",
            "CONNECT streams opened on pooled HBONE connections",
            pool.streams_opened,
        )?;

        let certs = proxy.mesh.certs.current();
        let expiry = ConstGauge::new(0i64);
        let mut m = e.encode_descriptor(
            "ztunnel_certificate_expiry_timestamp_seconds",
            "When each workload certificate expires (Unix time)",
            None,
            expiry.metric_type(),
        )?;
        for cert in &certs {
            let at = cert
                .not_after
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            ConstGauge::new(at).encode(m.encode_family(&IdentityLabels {
                identity: cert.id.to_string(),
            })?)?;
        }
        counter(
            &mut e,
            "ztunnel_certificates_issued",
            "Certificates obtained from the CA (first issues and rotations)",
            proxy.mesh.certs.issued(),
        )?;
        counter(
            &mut e,
            "ztunnel_certificate_rotation_failures",
            "Failed background certificate renewals",
            proxy.mesh.certs.rotation_failures(),
        )?;

        let snapshot = proxy.snapshot();
        gauge(
            &mut e,
            "ztunnel_config_generation",
            "Generation of the configuration in force (1 = the first load)",
            snapshot.generation as i64,
        )?;
        counter(
            &mut e,
            "ztunnel_config_reloads",
            "Configuration versions applied after the first load",
            snapshot.generation.saturating_sub(1),
        )?;
        counter(
            &mut e,
            "ztunnel_config_rejected",
            "Configuration versions rejected (the last good one stayed in force)",
            CONFIG_REJECTED.load(Relaxed),
        )?;
        gauge(
            &mut e,
            "ztunnel_config_problems",
            "Problems found in the configuration in force (see the logs)",
            snapshot.problems.len() as i64,
        )?;
        gauge(
            &mut e,
            "ztunnel_enrolled_pods",
            "Pods whose traffic this proxy captures",
            proxy.local_workloads().len() as i64,
        )?;

        // Per pinned program, as the kernel counts it (only while BPF statistics are on).
        let programs = crate::capture::inventory::programs(&view.bpf_dir);
        let runs = ConstCounter::new(0u64);
        let mut m = e.encode_descriptor(
            "ztunnel_bpf_program_runs",
            "Runs of each pinned eBPF program (needs kernel.bpf_stats_enabled=1)",
            None,
            runs.metric_type(),
        )?;
        for p in &programs {
            ConstCounter::new(p.run_count).encode(m.encode_family(&ProgramLabels {
                program: p.pin.clone(),
            })?)?;
        }
        let mut m = e.encode_descriptor(
            "ztunnel_bpf_program_run_time_seconds",
            "Time spent in each pinned eBPF program (needs kernel.bpf_stats_enabled=1)",
            None,
            runs.metric_type(),
        )?;
        for p in &programs {
            ConstCounter::new(p.run_time.as_secs_f64()).encode(m.encode_family(
                &ProgramLabels {
                    program: p.pin.clone(),
                },
            )?)?;
        }
        gauge(
            &mut e,
            "ztunnel_bpf_stats_enabled",
            "Whether the kernel collects eBPF run statistics (kernel.bpf_stats_enabled)",
            (view.bpf_stats_held || crate::capture::inventory::stats_enabled()) as i64,
        )
    }
}

/// The registry with every metric, ready to serve.
pub fn registry(metrics: &Metrics, sampled: Sampled) -> Registry {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    registry.register_collector(Box::new(sampled));
    registry
}
