//! Istio's `DestinationRule`, parsed and validated: subsets by pod labels, and the traffic
//! policy (load balancing, connection pool limits, outlier detection) at rule, subset and port
//! level, merged per cluster (host, subset, port) exactly as istiod merges them.
use std::time::Duration;

use http::HeaderName;
use serde::Deserialize;
use time::OffsetDateTime;

use super::{
    values::{ExportTo, HostPattern, IstioDuration},
    virtual_service::{port_number, PortSelectorDoc},
};
use crate::model::{Labels, Origin};

#[derive(Clone, Debug, PartialEq)]
pub struct DestinationRule {
    pub namespace: String,
    pub name: String,
    pub created: Option<OffsetDateTime>,
    pub origin: Origin,
    pub host: HostPattern,
    pub export_to: ExportTo,
    /// Applies only to these clients (of its own namespace).
    pub workload_selector: Option<Labels>,
    pub policy: Option<RulePolicy>,
    pub subsets: Vec<Subset>,
    pub unsupported: Vec<String>,
    /// The rules of one namespace and host merged into this one (itself first), as istiod
    /// merges them: subsets added in order, the first traffic policy kept.
    pub merged_from: Vec<String>,
}

impl DestinationRule {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn precedence_key(&self) -> (Option<OffsetDateTime>, &str) {
        (self.created, &self.name)
    }

    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }

    /// The policy of the cluster (`subset`, `port`), as istiod merges it: the rule's policy,
    /// overlaid field by field by the subset's; then the port-level settings for `port` (the
    /// subset's list if it has one, else the rule's) overlay that, each field they set
    /// replacing the inherited one whole (a port's `connectionPool` is not merged with the
    /// rule's). Unset fields are Istio's defaults.
    pub fn policy_for(&self, subset: Option<&Subset>, port: u16) -> TrafficPolicy {
        let mut merged = PolicyFields::default();
        let rule = self.policy.as_ref();
        let sub = subset.and_then(|s| s.policy.as_ref());
        for p in [rule, sub].into_iter().flatten() {
            merged.overlay(&p.fields);
        }
        let port_level = match sub {
            Some(p) if !p.port_level.is_empty() => Some(p),
            _ => rule,
        };
        if let Some(pl) = port_level.and_then(|p| p.port(port)) {
            merged.overlay(pl);
        }
        TrafficPolicy {
            load_balancer: merged.load_balancer.unwrap_or(LoadBalancer::LeastRequest),
            connection_pool: merged.connection_pool.unwrap_or_default(),
            outlier_detection: merged.outlier_detection,
        }
    }

    /// Merges `other` (a later rule of the same namespace and host) into this one.
    pub fn merge(&mut self, other: &DestinationRule) {
        for s in &other.subsets {
            if self.subset(&s.name).is_none() {
                self.subsets.push(s.clone());
            }
        }
        if self.policy.is_none() {
            self.policy = other.policy.clone();
        }
        self.merged_from.push(other.id());
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Subset {
    pub name: String,
    pub labels: Labels,
    pub policy: Option<RulePolicy>,
}

impl Subset {
    pub fn selects(&self, labels: &Labels) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// The fields a traffic policy (or a port's settings) sets; `None` is not set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyFields {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
}

impl PolicyFields {
    fn overlay(&mut self, p: &PolicyFields) {
        if let Some(lb) = &p.load_balancer {
            self.load_balancer = Some(lb.clone());
        }
        if let Some(cp) = &p.connection_pool {
            self.connection_pool = Some(cp.clone());
        }
        if let Some(od) = &p.outlier_detection {
            self.outlier_detection = Some(od.clone());
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RulePolicy {
    pub fields: PolicyFields,
    pub port_level: Vec<(u16, PolicyFields)>,
}

impl RulePolicy {
    fn port(&self, port: u16) -> Option<&PolicyFields> {
        self.port_level
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, f)| f)
    }
}

/// What applies to one cluster (service, subset, port), merged and with Istio's defaults
/// filled in: how the data path balances, limits and ejects.
#[derive(Clone, Debug, PartialEq)]
pub struct TrafficPolicy {
    pub load_balancer: LoadBalancer,
    pub connection_pool: ConnectionPool,
    /// `None`: no endpoint is ever ejected.
    pub outlier_detection: Option<OutlierDetection>,
}

impl Default for TrafficPolicy {
    fn default() -> Self {
        Self {
            load_balancer: LoadBalancer::LeastRequest,
            connection_pool: ConnectionPool::default(),
            outlier_detection: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadBalancer {
    RoundRobin,
    /// Istio's default: the endpoint with the fewest requests in flight.
    LeastRequest,
    Random,
    ConsistentHash(HashKey),
}

impl LoadBalancer {
    pub fn describe(&self) -> String {
        match self {
            LoadBalancer::RoundRobin => "ROUND_ROBIN".into(),
            LoadBalancer::LeastRequest => "LEAST_REQUEST".into(),
            LoadBalancer::Random => "RANDOM".into(),
            LoadBalancer::ConsistentHash(k) => format!("consistentHash on {}", k.describe()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    Header(HeaderName),
    SourceIp,
    QueryParameter(String),
    /// The cookie's value when the request has it (it is never set by the proxy).
    Cookie(String),
}

impl HashKey {
    pub fn describe(&self) -> String {
        match self {
            HashKey::Header(h) => format!("header {h}"),
            HashKey::SourceIp => "source IP".into(),
            HashKey::QueryParameter(q) => format!("query parameter {q}"),
            HashKey::Cookie(c) => format!("cookie {c}"),
        }
    }
}

/// Circuit breakers and connection settings of a cluster. Limits are Envoy's, per client
/// (here: per source pod, as each sidecar has its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionPool {
    /// Upstream connections, idle ones included (`tcp.maxConnections`).
    pub max_connections: u32,
    pub connect_timeout: Duration,
    /// Requests waiting for a connection (`http.http1MaxPendingRequests`).
    pub max_pending_requests: u32,
    /// Requests in flight (`http.http2MaxRequests`).
    pub max_requests: u32,
    /// 0: unlimited; 1: no keep-alive.
    pub max_requests_per_connection: u32,
    /// Retries in flight.
    pub max_retries: u32,
    pub idle_timeout: Duration,
}

/// Istio's defaults: limits as good as none, a 10 s connect timeout, 1 h idle timeout.
impl Default for ConnectionPool {
    fn default() -> Self {
        Self {
            max_connections: u32::MAX,
            connect_timeout: Duration::from_secs(10),
            max_pending_requests: u32::MAX,
            max_requests: u32::MAX,
            max_requests_per_connection: 0,
            max_retries: u32::MAX,
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

impl ConnectionPool {
    pub fn describe(&self) -> Vec<String> {
        let d = ConnectionPool::default();
        let mut out = Vec::new();
        let mut limit = |name: &str, v: u32, dv: u32| {
            if v != dv {
                out.push(format!("{name} {v}"));
            }
        };
        limit("maxConnections", self.max_connections, d.max_connections);
        limit(
            "http1MaxPendingRequests",
            self.max_pending_requests,
            d.max_pending_requests,
        );
        limit("http2MaxRequests", self.max_requests, d.max_requests);
        limit(
            "maxRequestsPerConnection",
            self.max_requests_per_connection,
            0,
        );
        limit("maxRetries", self.max_retries, d.max_retries);
        if self.connect_timeout != d.connect_timeout {
            out.push(format!(
                "connectTimeout {} ms",
                self.connect_timeout.as_millis()
            ));
        }
        if self.idle_timeout != d.idle_timeout {
            out.push(format!("idleTimeout {} ms", self.idle_timeout.as_millis()));
        }
        out
    }
}

/// Envoy's outlier detection as Istio configures it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    /// 0: off. Local-origin failures (connect failures, resets, timeouts) count as 5xx unless
    /// `split_local_origin`.
    pub consecutive_5xx: u32,
    /// 502, 503, 504 (and local-origin failures unless split); 0: off.
    pub consecutive_gateway: u32,
    pub split_local_origin: bool,
    pub consecutive_local_origin: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    /// Below this share of healthy endpoints, ejections are ignored (panic); 0: never.
    pub min_health_percent: u32,
}

impl OutlierDetection {
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.consecutive_5xx > 0 {
            parts.push(format!("consecutive5xxErrors {}", self.consecutive_5xx));
        }
        if self.consecutive_gateway > 0 {
            parts.push(format!(
                "consecutiveGatewayErrors {}",
                self.consecutive_gateway
            ));
        }
        parts.push(format!(
            "interval {} ms, baseEjectionTime {} ms, maxEjectionPercent {}",
            self.interval.as_millis(),
            self.base_ejection_time.as_millis(),
            self.max_ejection_percent
        ));
        parts.join(", ")
    }
}

// ---- the resource as written -----------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpecDoc {
    #[serde(default)]
    host: String,
    traffic_policy: Option<TrafficPolicyDoc>,
    #[serde(default)]
    subsets: Vec<SubsetDoc>,
    export_to: Option<Vec<String>>,
    workload_selector: Option<SelectorDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SelectorDoc {
    match_labels: Option<Labels>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubsetDoc {
    name: String,
    labels: Option<Labels>,
    #[serde(rename = "trafficPolicy")]
    traffic_policy: Option<TrafficPolicyDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TrafficPolicyDoc {
    load_balancer: Option<LoadBalancerDoc>,
    connection_pool: Option<ConnectionPoolDoc>,
    outlier_detection: Option<OutlierDetectionDoc>,
    tls: Option<TlsDoc>,
    #[serde(default)]
    port_level_settings: Vec<PortTrafficPolicyDoc>,
    tunnel: Option<serde_yaml::Value>,
    proxy_protocol: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PortTrafficPolicyDoc {
    port: Option<PortSelectorDoc>,
    load_balancer: Option<LoadBalancerDoc>,
    connection_pool: Option<ConnectionPoolDoc>,
    outlier_detection: Option<OutlierDetectionDoc>,
    tls: Option<TlsDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TlsDoc {
    mode: Option<String>,
    client_certificate: Option<String>,
    private_key: Option<String>,
    ca_certificates: Option<String>,
    credential_name: Option<String>,
    subject_alt_names: Option<Vec<String>>,
    sni: Option<String>,
    insecure_skip_verify: Option<bool>,
    ca_crl: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LoadBalancerDoc {
    simple: Option<String>,
    consistent_hash: Option<ConsistentHashDoc>,
    locality_lb_setting: Option<serde_yaml::Value>,
    warmup_duration_secs: Option<serde_yaml::Value>,
    warmup: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConsistentHashDoc {
    http_header_name: Option<String>,
    http_cookie: Option<CookieDoc>,
    use_source_ip: Option<bool>,
    http_query_parameter_name: Option<String>,
    ring_hash: Option<serde_yaml::Value>,
    maglev: Option<serde_yaml::Value>,
    minimum_ring_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CookieDoc {
    name: String,
    path: Option<String>,
    ttl: Option<IstioDuration>,
    attributes: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionPoolDoc {
    tcp: Option<TcpSettingsDoc>,
    http: Option<HttpSettingsDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TcpSettingsDoc {
    max_connections: Option<i64>,
    connect_timeout: Option<IstioDuration>,
    tcp_keepalive: Option<serde_yaml::Value>,
    max_connection_duration: Option<IstioDuration>,
    idle_timeout: Option<IstioDuration>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpSettingsDoc {
    #[serde(rename = "http1MaxPendingRequests")]
    http1_max_pending_requests: Option<i64>,
    #[serde(rename = "http2MaxRequests")]
    http2_max_requests: Option<i64>,
    max_requests_per_connection: Option<i64>,
    max_retries: Option<i64>,
    idle_timeout: Option<IstioDuration>,
    h2_upgrade_policy: Option<String>,
    use_client_protocol: Option<bool>,
    max_concurrent_streams: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OutlierDetectionDoc {
    split_external_local_origin_errors: Option<bool>,
    consecutive_local_origin_failures: Option<u32>,
    consecutive_gateway_errors: Option<u32>,
    #[serde(rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<u32>,
    /// Deprecated: Istio reads it as `consecutive5xxErrors`.
    consecutive_errors: Option<i32>,
    interval: Option<IstioDuration>,
    base_ejection_time: Option<IstioDuration>,
    max_ejection_percent: Option<i32>,
    min_health_percent: Option<i32>,
}

impl SpecDoc {
    /// Validates the spec as Istio's admission does, into a DestinationRule of `namespace`.
    pub fn into_destination_rule(
        self,
        namespace: String,
        name: String,
        created: Option<OffsetDateTime>,
        origin: Origin,
    ) -> Result<DestinationRule, String> {
        let host = match HostPattern::resolve(&self.host, &namespace) {
            Ok(HostPattern::Ip(_)) => {
                return Err(format!(
                    "spec.host {:?} must be a host name, not an address",
                    self.host
                ))
            }
            Ok(h) => h,
            Err(e) => return Err(format!("spec.host: {e}")),
        };
        let mut unsupported = Vec::new();
        let policy = self
            .traffic_policy
            .map(|p| p.compile("trafficPolicy", &mut unsupported))
            .transpose()?;
        let mut subsets: Vec<Subset> = Vec::new();
        for (i, s) in self.subsets.into_iter().enumerate() {
            let what = format!("subsets[{i}]");
            if s.name.is_empty() {
                return Err(format!("{what}: a subset needs a name"));
            }
            if subsets.iter().any(|o| o.name == s.name) {
                return Err(format!("{what}: subset {:?} is defined twice", s.name));
            }
            subsets.push(Subset {
                policy: s
                    .traffic_policy
                    .map(|p| p.compile(&format!("{what}.trafficPolicy"), &mut unsupported))
                    .transpose()?,
                name: s.name,
                labels: s.labels.unwrap_or_default(),
            });
        }
        let id = format!("{namespace}/{name}");
        Ok(DestinationRule {
            export_to: ExportTo::parse(self.export_to, &namespace)?,
            workload_selector: self.workload_selector.and_then(|s| s.match_labels),
            namespace,
            name,
            created,
            origin,
            host,
            policy,
            subsets,
            unsupported,
            merged_from: vec![id],
        })
    }
}

impl TrafficPolicyDoc {
    fn compile(self, what: &str, unsupported: &mut Vec<String>) -> Result<RulePolicy, String> {
        if self.tunnel.is_some() {
            unsupported.push(format!("{what}.tunnel is not applied"));
        }
        if self.proxy_protocol.is_some() {
            unsupported.push(format!("{what}.proxyProtocol is not applied"));
        }
        tls_note(self.tls, what, unsupported);
        let top = policy_fields(
            (
                self.load_balancer,
                self.connection_pool,
                self.outlier_detection,
            ),
            what,
            unsupported,
        )?;
        let mut port_level = Vec::new();
        for (i, p) in self.port_level_settings.into_iter().enumerate() {
            let w = format!("{what}.portLevelSettings[{i}]");
            let port = p
                .port
                .ok_or_else(|| format!("{w}: port is required"))
                .and_then(|p| port_number(p.number, &w))?;
            if port_level.iter().any(|(q, _)| *q == port) {
                return Err(format!("{w}: port {port} has settings twice"));
            }
            tls_note(p.tls, &w, unsupported);
            let f = policy_fields(
                (p.load_balancer, p.connection_pool, p.outlier_detection),
                &w,
                unsupported,
            )?;
            port_level.push((port, f));
        }
        Ok(RulePolicy {
            fields: top,
            port_level,
        })
    }
}

/// Mesh traffic is always HBONE (mutual TLS with the workload's identity): `ISTIO_MUTUAL` is
/// what happens anyway; any other mode is not applied, and said so.
fn tls_note(tls: Option<TlsDoc>, what: &str, unsupported: &mut Vec<String>) {
    let Some(tls) = tls else { return };
    let _ = (
        &tls.client_certificate,
        &tls.private_key,
        &tls.ca_certificates,
        &tls.credential_name,
        &tls.subject_alt_names,
        &tls.sni,
        &tls.insecure_skip_verify,
        &tls.ca_crl,
    );
    match tls.mode.as_deref() {
        None | Some("ISTIO_MUTUAL") => {}
        Some(mode) => unsupported.push(format!(
            "{what}.tls mode {mode} is not applied: mesh traffic is always HBONE with the workloads' identities, and TLS origination to other destinations is not done"
        )),
    }
}

fn policy_fields(
    (lb, pool, outlier): (
        Option<LoadBalancerDoc>,
        Option<ConnectionPoolDoc>,
        Option<OutlierDetectionDoc>,
    ),
    what: &str,
    unsupported: &mut Vec<String>,
) -> Result<PolicyFields, String> {
    Ok(PolicyFields {
        load_balancer: lb
            .map(|l| l.compile(&format!("{what}.loadBalancer"), unsupported))
            .transpose()?
            .flatten(),
        connection_pool: pool
            .map(|p| p.compile(&format!("{what}.connectionPool"), unsupported))
            .transpose()?,
        outlier_detection: outlier
            .map(|o| o.compile(&format!("{what}.outlierDetection")))
            .transpose()?,
    })
}

impl LoadBalancerDoc {
    /// `None`: the field says nothing applicable (UNSPECIFIED, PASSTHROUGH): the default.
    fn compile(
        self,
        what: &str,
        unsupported: &mut Vec<String>,
    ) -> Result<Option<LoadBalancer>, String> {
        for (set, field) in [
            (self.locality_lb_setting.is_some(), "localityLbSetting"),
            (
                self.warmup_duration_secs.is_some() || self.warmup.is_some(),
                "warmup",
            ),
        ] {
            if set {
                unsupported.push(format!(
                    "{what}.{field} is not applied (no localities, no slow start)"
                ));
            }
        }
        match (self.simple, self.consistent_hash) {
            (Some(_), Some(_)) => Err(format!("{what}: simple and consistentHash exclude each other")),
            (Some(s), None) => match s.as_str() {
                "ROUND_ROBIN" => Ok(Some(LoadBalancer::RoundRobin)),
                "LEAST_REQUEST" | "LEAST_CONN" => Ok(Some(LoadBalancer::LeastRequest)),
                "RANDOM" => Ok(Some(LoadBalancer::Random)),
                "UNSPECIFIED" => Ok(None),
                "PASSTHROUGH" => {
                    unsupported.push(format!(
                        "{what}: PASSTHROUGH is not applied (a Service's endpoints are balanced as LEAST_REQUEST)"
                    ));
                    Ok(None)
                }
                other => Err(format!(
                    "{what}.simple {other:?} is not ROUND_ROBIN, LEAST_REQUEST, RANDOM, PASSTHROUGH or UNSPECIFIED"
                )),
            },
            (None, Some(h)) => h.compile(what, unsupported).map(Some),
            (None, None) => Ok(None),
        }
    }
}

impl ConsistentHashDoc {
    fn compile(self, what: &str, unsupported: &mut Vec<String>) -> Result<LoadBalancer, String> {
        let _ = (self.ring_hash, self.maglev, self.minimum_ring_size);
        let keys = [
            self.http_header_name.is_some(),
            self.http_cookie.is_some(),
            self.use_source_ip == Some(true),
            self.http_query_parameter_name.is_some(),
        ];
        if keys.iter().filter(|k| **k).count() != 1 {
            return Err(format!(
                "{what}.consistentHash takes exactly one of httpHeaderName, httpCookie, useSourceIp and httpQueryParameterName"
            ));
        }
        let key = if let Some(h) = self.http_header_name {
            HashKey::Header(HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                format!("{what}.consistentHash.httpHeaderName {h:?} is not a header name")
            })?)
        } else if let Some(c) = self.http_cookie {
            let _ = (c.path, c.attributes);
            if c.ttl.is_some() {
                unsupported.push(format!(
                    "{what}.consistentHash.httpCookie: the cookie is read when the request has it, never set"
                ));
            }
            HashKey::Cookie(c.name)
        } else if let Some(q) = self.http_query_parameter_name {
            HashKey::QueryParameter(q)
        } else {
            HashKey::SourceIp
        };
        Ok(LoadBalancer::ConsistentHash(key))
    }
}

/// Istio's limits: 0 or unset is the default (no limit); negative is refused.
fn limit(v: Option<i64>, what: &str) -> Result<Option<u32>, String> {
    match v {
        None | Some(0) => Ok(None),
        Some(n) if n < 0 => Err(format!("{what} must not be negative")),
        Some(n) => Ok(Some(u32::try_from(n).unwrap_or(u32::MAX))),
    }
}

impl ConnectionPoolDoc {
    fn compile(self, what: &str, unsupported: &mut Vec<String>) -> Result<ConnectionPool, String> {
        let mut p = ConnectionPool::default();
        if let Some(t) = self.tcp {
            if let Some(n) = limit(t.max_connections, &format!("{what}.tcp.maxConnections"))? {
                p.max_connections = n;
            }
            if let Some(c) = t.connect_timeout {
                p.connect_timeout = c.positive(&format!("{what}.tcp.connectTimeout"))?;
            }
            if let Some(i) = t.idle_timeout {
                p.idle_timeout = i.positive(&format!("{what}.tcp.idleTimeout"))?;
            }
            if t.tcp_keepalive.is_some() || t.max_connection_duration.is_some() {
                unsupported.push(format!(
                    "{what}.tcp: tcpKeepalive and maxConnectionDuration are not applied"
                ));
            }
        }
        if let Some(h) = self.http {
            let w = |f: &str| format!("{what}.http.{f}");
            if let Some(n) = limit(h.http1_max_pending_requests, &w("http1MaxPendingRequests"))? {
                p.max_pending_requests = n;
            }
            if let Some(n) = limit(h.http2_max_requests, &w("http2MaxRequests"))? {
                p.max_requests = n;
            }
            if let Some(n) = limit(
                h.max_requests_per_connection,
                &w("maxRequestsPerConnection"),
            )? {
                p.max_requests_per_connection = n;
            }
            if let Some(n) = limit(h.max_retries, &w("maxRetries"))? {
                p.max_retries = n;
            }
            if let Some(i) = h.idle_timeout {
                p.idle_timeout = i.positive(&w("idleTimeout"))?;
            }
            match h.h2_upgrade_policy.as_deref() {
                None | Some("DEFAULT") | Some("DO_NOT_UPGRADE") => {}
                Some("UPGRADE") => unsupported.push(format!(
                    "{what}.http.h2UpgradePolicy UPGRADE is not applied (the upstream speaks the client's HTTP version)"
                )),
                Some(other) => {
                    return Err(format!(
                        "{what}.http.h2UpgradePolicy {other:?} is not DEFAULT, DO_NOT_UPGRADE or UPGRADE"
                    ))
                }
            }
            let _ = (h.use_client_protocol, h.max_concurrent_streams);
        }
        Ok(p)
    }
}

fn percent(v: Option<i32>, default: u32, what: &str) -> Result<u32, String> {
    match v {
        None => Ok(default),
        Some(n) if (0..=100).contains(&n) => Ok(n as u32),
        Some(n) => Err(format!("{what} {n} is not between 0 and 100")),
    }
}

impl OutlierDetectionDoc {
    fn compile(self, what: &str) -> Result<OutlierDetection, String> {
        let consecutive_5xx = match (self.consecutive_5xx_errors, self.consecutive_errors) {
            (Some(n), _) => n,
            (None, Some(n)) if n > 0 => n as u32,
            (None, Some(n)) if n < 0 => {
                return Err(format!("{what}.consecutiveErrors must not be negative"))
            }
            _ => 5,
        };
        let interval = match self.interval {
            Some(i) => i.positive(&format!("{what}.interval"))?,
            None => Duration::from_secs(10),
        };
        let base = match self.base_ejection_time {
            Some(b) => b.positive(&format!("{what}.baseEjectionTime"))?,
            None => Duration::from_secs(30),
        };
        Ok(OutlierDetection {
            consecutive_5xx,
            consecutive_gateway: self.consecutive_gateway_errors.unwrap_or(0),
            split_local_origin: self.split_external_local_origin_errors.unwrap_or(false),
            consecutive_local_origin: self.consecutive_local_origin_failures.unwrap_or(5),
            interval,
            base_ejection_time: base,
            max_ejection_percent: percent(
                self.max_ejection_percent,
                10,
                &format!("{what}.maxEjectionPercent"),
            )?,
            min_health_percent: percent(
                self.min_health_percent,
                0,
                &format!("{what}.minHealthPercent"),
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn dr(spec: &str) -> Result<DestinationRule, String> {
        let doc: SpecDoc = serde_yaml::from_str(spec).map_err(|e| e.to_string())?;
        doc.into_destination_rule("bookinfo".into(), "dr".into(), None, Origin::default())
    }

    #[test]
    fn subsets_and_policies_merge_as_istiod_merges_them() {
        let d = dr(r#"
host: reviews
trafficPolicy:
  loadBalancer: {simple: ROUND_ROBIN}
  connectionPool: {tcp: {maxConnections: 10}}
  portLevelSettings:
  - port: {number: 9090}
    loadBalancer: {simple: RANDOM}
subsets:
- name: v1
  labels: {version: v1}
- name: v2
  labels: {version: v2}
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 2s}
    portLevelSettings:
    - port: {number: 9091}
      connectionPool: {http: {http1MaxPendingRequests: 1}}
"#)
        .unwrap();
        assert_eq!(
            d.host,
            HostPattern::Exact("reviews.bookinfo.svc.cluster.local".into())
        );
        let v1 = d.policy_for(d.subset("v1"), 9080);
        assert_eq!(v1.load_balancer, LoadBalancer::RoundRobin);
        assert_eq!(v1.connection_pool.max_connections, 10);
        assert!(v1.outlier_detection.is_none());
        let port = d.policy_for(d.subset("v1"), 9090);
        assert_eq!(port.load_balancer, LoadBalancer::Random);
        assert_eq!(
            port.connection_pool.max_connections, 10,
            "what the port does not set is inherited"
        );
        let v2 = d.policy_for(d.subset("v2"), 9080);
        assert_eq!(
            (v2.load_balancer.clone(), v2.connection_pool.max_connections),
            (LoadBalancer::RoundRobin, 10)
        );
        let od = v2.outlier_detection.unwrap();
        assert_eq!(
            (od.consecutive_5xx, od.interval, od.max_ejection_percent),
            (2, Duration::from_secs(1), 10)
        );
        let v2p = d.policy_for(d.subset("v2"), 9091);
        assert_eq!(v2p.connection_pool.max_pending_requests, 1);
        assert_eq!(
            v2p.connection_pool.max_connections,
            u32::MAX,
            "a port's connectionPool replaces the inherited one whole"
        );
        assert!(v2p.outlier_detection.is_some());
        assert_eq!(
            d.policy_for(d.subset("v2"), 9090).load_balancer,
            LoadBalancer::RoundRobin,
            "a subset with port-level settings replaces the rule's list"
        );
        assert!(d
            .subset("v1")
            .unwrap()
            .selects(&[("version".to_owned(), "v1".to_owned())].into()));
    }

    #[test]
    fn defaults_and_hash_keys() {
        let d = dr("host: r\ntrafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}, outlierDetection: {}}").unwrap();
        let p = d.policy_for(None, 80);
        assert_eq!(
            p.load_balancer,
            LoadBalancer::ConsistentHash(HashKey::Header(HeaderName::from_static("x-user")))
        );
        let od = p.outlier_detection.unwrap();
        assert_eq!((od.consecutive_5xx, od.consecutive_gateway), (5, 0));
        assert_eq!(
            (od.interval, od.base_ejection_time),
            (Duration::from_secs(10), Duration::from_secs(30))
        );
        assert_eq!(
            dr("host: r").unwrap().policy_for(None, 80),
            TrafficPolicy::default()
        );
    }

    #[test]
    fn bad_rules_are_refused_and_unsupported_parts_listed() {
        for (spec, expect) in [
            ("host: ''", "empty host"),
            ("host: 10.0.0.1", "not an address"),
            ("host: r\nsubsets: [{name: a}, {name: a}]", "defined twice"),
            (
                "host: r\ntrafficPolicy: {loadBalancer: {simple: FASTEST}}",
                "FASTEST",
            ),
            (
                "host: r\ntrafficPolicy: {connectionPool: {tcp: {maxConnections: -1}}}",
                "negative",
            ),
            (
                "host: r\ntrafficPolicy: {outlierDetection: {maxEjectionPercent: 101}}",
                "between 0 and 100",
            ),
            (
                "host: r\ntrafficPolicy: {outlierDetection: {interval: 0s}}",
                "at least 1ms",
            ),
            (
                "host: r\ntrafficPolicy: {conectionPool: {}}",
                "unknown field `conectionPool`",
            ),
            (
                "host: r\ntrafficPolicy: {loadBalancer: {consistentHash: {}}}",
                "exactly one",
            ),
        ] {
            let e = dr(spec).unwrap_err();
            assert!(e.contains(expect), "{spec}: {e}");
        }
        let d = dr(
            "host: r\ntrafficPolicy: {tls: {mode: DISABLE}, loadBalancer: {simple: PASSTHROUGH}}",
        )
        .unwrap();
        assert_eq!(d.unsupported.len(), 2, "{:?}", d.unsupported);
        assert!(dr("host: r\ntrafficPolicy: {tls: {mode: ISTIO_MUTUAL}}")
            .unwrap()
            .unsupported
            .is_empty());
    }
}
