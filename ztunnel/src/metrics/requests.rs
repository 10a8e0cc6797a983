//! Istio's standard HTTP metrics, for every request the proxy parses: `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes` and `istio_response_bytes`,
//! with Istio's label set (docs/operations.md lists it, and where each value comes from).
//!
//! Cardinality is bounded by the configuration, never by traffic: the labels name workloads,
//! identities and Services the snapshot knows (or `unknown`), and the outcome of a request
//! (status, gRPC status, response flags), never a path, a host, a header or a connection.
//!
//! A connection's requests share their peers, so [`ConnectionRequests`] builds those labels
//! once per connection and keeps the handles of the series its requests have used: a request
//! costs a few atomic additions and a short lock per histogram, not a hash of 23 labels.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        histogram::Histogram,
    },
};

use super::{Metrics, Reporter, SecurityPolicy};
use crate::model::Pod;

/// Envoy's default histogram buckets, which Istio uses for all three of its request
/// histograms unless a pod's `sidecar.istio.io/statsHistogramBuckets` says otherwise:
/// milliseconds for durations, bytes for sizes.
pub const ISTIO_BUCKETS: [f64; 19] = [
    0.5,
    1.0,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1_000.0,
    2_500.0,
    5_000.0,
    10_000.0,
    30_000.0,
    60_000.0,
    300_000.0,
    600_000.0,
    1_800_000.0,
    3_600_000.0,
];

/// Makes the request histograms with [`ISTIO_BUCKETS`].
#[derive(Clone, Copy, Debug, Default)]
pub struct IstioBuckets;

impl MetricConstructor<Histogram> for IstioBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(ISTIO_BUCKETS)
    }
}

/// A request histogram family, with Istio's buckets.
#[derive(Clone, Debug)]
pub struct RequestHistogram(pub Family<RequestLabels, Histogram, IstioBuckets>);

impl Default for RequestHistogram {
    fn default() -> Self {
        Self(Family::new_with_constructor(IstioBuckets))
    }
}

label_values! {
    /// `request_protocol`.
    RequestProtocol {
        Http => "http",
        /// `content-type: application/grpc…`.
        Grpc => "grpc",
    }
    /// `response_flags`, Envoy's codes for what the proxy (not the application) did.
    ResponseFlags {
        /// Nothing: the application answered, or a policy did.
        None => "-",
        /// The connection to the application failed or was reset before its response.
        UpstreamConnectionTermination => "UC",
        /// The caller went away before the response was complete.
        DownstreamConnectionTermination => "DC",
        /// A CUSTOM (ext-authz) provider denied the request or could not be asked.
        UnauthorizedExternalService => "UAEX",
        /// No endpoint could be connected to (on the source side: every attempt failed so).
        UpstreamConnectionFailure => "UF",
        /// A VirtualService fault delayed the request (it was then sent on).
        DelayInjected => "DI",
        /// A VirtualService fault answered the request instead of the destination.
        FaultInjected => "FI",
        /// A DestinationRule connection pool was full: answered 503 `x-envoy-overloaded`.
        UpstreamOverflow => "UO",
        /// The route's retries were used up and the last answer was still a failure.
        UpstreamRetryLimitExceeded => "URX",
        /// A VirtualService applies to the destination, and none of its routes matched.
        NoRouteFound => "NR",
        /// The route's timeout fired before the destination answered (504).
        UpstreamRequestTimeout => "UT",
        /// Every endpoint of the destination is ejected by outlier detection (503).
        NoHealthyUpstream => "UH",
        /// The route's destination resolves to no Service port or subset (503).
        NoClusterFound => "NC",
    }
}

const UNKNOWN: &str = "unknown";

/// One end of a request as Istio labels it.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Peer {
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
    /// `spiffe://…`, or `unknown` (a plaintext caller).
    pub principal: Arc<str>,
    pub app: Arc<str>,
    pub version: Arc<str>,
    pub canonical_service: Arc<str>,
    pub canonical_revision: Arc<str>,
}

impl Peer {
    /// A pod, by Istio's rules: `app` and `version` from the labels of those names (or
    /// `app.kubernetes.io/name` / `version`); the canonical service from
    /// `service.istio.io/canonical-name`, else `app.kubernetes.io/name`, else `app`, else the
    /// workload; the canonical revision from `service.istio.io/canonical-revision`, else
    /// `app.kubernetes.io/version`, else `version`, else `latest`.
    pub fn of_pod(pod: &Pod, principal: Option<&str>) -> Self {
        let label = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| pod.labels.get(*k).map(String::as_str))
        };
        let s = |v: &str| Arc::<str>::from(v);
        Self {
            workload: s(&pod.name),
            namespace: s(&pod.namespace),
            principal: s(principal.unwrap_or(UNKNOWN)),
            app: s(label(&["app", "app.kubernetes.io/name"]).unwrap_or(UNKNOWN)),
            version: s(label(&["version", "app.kubernetes.io/version"]).unwrap_or(UNKNOWN)),
            canonical_service: s(label(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .unwrap_or(&pod.name)),
            canonical_revision: s(label(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or("latest")),
        }
    }

    /// A workload known by name only (its pod has just left the configuration).
    pub fn of_workload(namespace: &str, name: &str, principal: Option<&str>) -> Self {
        Self {
            workload: name.into(),
            namespace: namespace.into(),
            canonical_service: name.into(),
            canonical_revision: "latest".into(),
            ..Self::unknown(principal)
        }
    }

    /// A caller the configuration does not know: everything `unknown` but what was proven.
    pub fn unknown(principal: Option<&str>) -> Self {
        let u = Arc::<str>::from(UNKNOWN);
        Self {
            workload: u.clone(),
            namespace: u.clone(),
            principal: principal.map_or_else(|| u.clone(), Arc::from),
            app: u.clone(),
            version: u.clone(),
            canonical_service: u.clone(),
            canonical_revision: u,
        }
    }

    /// The node itself (kubelet probes), as the connection metrics name it: workload and
    /// namespace `node`.
    pub fn node() -> Self {
        let node = Arc::<str>::from("node");
        Self {
            workload: node.clone(),
            namespace: node,
            ..Self::unknown(None)
        }
    }
}

/// `destination_service` (the Service's host name), `_name` and `_namespace`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct DestinationService {
    pub host: Arc<str>,
    pub name: Arc<str>,
    pub namespace: Arc<str>,
}

impl DestinationService {
    /// `name.namespace.svc.<cluster domain>`, as Istio names a Service.
    pub fn new(name: &str, namespace: &str, cluster_domain: &str) -> Self {
        Self {
            host: format!("{name}.{namespace}.svc.{cluster_domain}").into(),
            name: name.into(),
            namespace: namespace.into(),
        }
    }

    pub fn unknown() -> Self {
        let u = Arc::<str>::from(UNKNOWN);
        Self {
            host: u.clone(),
            name: u.clone(),
            namespace: u,
        }
    }
}

/// Istio's label set of the request metrics, in Istio's order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: Reporter,
    pub source_workload: Arc<str>,
    pub source_workload_namespace: Arc<str>,
    pub source_principal: Arc<str>,
    pub source_app: Arc<str>,
    pub source_version: Arc<str>,
    pub source_canonical_service: Arc<str>,
    pub source_canonical_revision: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_workload_namespace: Arc<str>,
    pub destination_principal: Arc<str>,
    pub destination_app: Arc<str>,
    pub destination_version: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_service_name: Arc<str>,
    pub destination_service_namespace: Arc<str>,
    pub destination_canonical_service: Arc<str>,
    pub destination_canonical_revision: Arc<str>,
    pub request_protocol: RequestProtocol,
    /// The status the caller got; 0 when it got none (it went away first).
    pub response_code: u16,
    /// gRPC's status (the `grpc-status` trailer or header); empty for other requests.
    pub grpc_response_status: Option<u8>,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

/// How one request ended: the labels that vary from request to request.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct RequestOutcome {
    pub protocol: RequestProtocol,
    pub response_code: u16,
    pub grpc_status: Option<u8>,
    pub flags: ResponseFlags,
}

/// What a request measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestSizes {
    /// Body bytes from the caller.
    pub request: u64,
    /// Body bytes to the caller.
    pub response: u64,
}

/// The four series of one label set.
#[derive(Clone)]
struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// What picks a connection's series: the Service's host and the outcome.
/// The Service's host, the destination workload when a request chose its own (routed on the
/// source side), and the outcome.
type SeriesKey = (Arc<str>, Option<Arc<str>>, RequestOutcome);

/// A connection's series are cached up to this many label sets (status × flags × service);
/// more are still counted, only looked up each time.
const CACHED_SERIES: usize = 16;

/// The request metrics of one connection: its peers, fixed for its life, and the series its
/// requests have used. The one place a proxy path records a request's metrics, as the
/// destination's proxy (the inbound request loop) or, routing requests, the source's.
pub struct ConnectionRequests {
    metrics: Arc<Metrics>,
    reporter: Reporter,
    source: Peer,
    destination: Peer,
    security: SecurityPolicy,
    cache: Mutex<Vec<(SeriesKey, Series)>>,
}

impl ConnectionRequests {
    pub fn new(
        metrics: Arc<Metrics>,
        reporter: Reporter,
        source: Peer,
        destination: Peer,
        security: SecurityPolicy,
    ) -> Self {
        Self {
            metrics,
            reporter,
            source,
            destination,
            security,
            cache: Mutex::new(Vec::new()),
        }
    }

    /// Counts one finished request to `service`; `destination` is the endpoint a routed
    /// request went to (the connection's destination otherwise).
    pub fn record(
        &self,
        service: &DestinationService,
        destination: Option<&Peer>,
        outcome: RequestOutcome,
        duration: Duration,
        sizes: RequestSizes,
    ) {
        let series = self.series(service, destination, outcome);
        series.requests.inc();
        series.duration.observe(duration.as_secs_f64() * 1_000.0);
        series.request_bytes.observe(sizes.request as f64);
        series.response_bytes.observe(sizes.response as f64);
    }

    fn series(
        &self,
        service: &DestinationService,
        destination: Option<&Peer>,
        outcome: RequestOutcome,
    ) -> Series {
        let workload = destination.map(|d| d.workload.clone());
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, s)) = cache
            .iter()
            .find(|((host, w, o), _)| *o == outcome && **host == *service.host && *w == workload)
        {
            return s.clone();
        }
        let labels = self.labels(service, destination, outcome);
        let m = &self.metrics;
        let series = Series {
            requests: m.requests.get_or_create_owned(&labels),
            duration: m.request_duration.0.get_or_create_owned(&labels),
            request_bytes: m.request_bytes.0.get_or_create_owned(&labels),
            response_bytes: m.response_bytes.0.get_or_create_owned(&labels),
        };
        if cache.len() < CACHED_SERIES {
            cache.push(((service.host.clone(), workload, outcome), series.clone()));
        }
        series
    }

    fn labels(
        &self,
        service: &DestinationService,
        destination: Option<&Peer>,
        o: RequestOutcome,
    ) -> RequestLabels {
        let (s, d) = (&self.source, destination.unwrap_or(&self.destination));
        RequestLabels {
            reporter: self.reporter,
            source_workload: s.workload.clone(),
            source_workload_namespace: s.namespace.clone(),
            source_principal: s.principal.clone(),
            source_app: s.app.clone(),
            source_version: s.version.clone(),
            source_canonical_service: s.canonical_service.clone(),
            source_canonical_revision: s.canonical_revision.clone(),
            destination_workload: d.workload.clone(),
            destination_workload_namespace: d.namespace.clone(),
            destination_principal: d.principal.clone(),
            destination_app: d.app.clone(),
            destination_version: d.version.clone(),
            destination_service: service.host.clone(),
            destination_service_name: service.name.clone(),
            destination_service_namespace: service.namespace.clone(),
            destination_canonical_service: d.canonical_service.clone(),
            destination_canonical_revision: d.canonical_revision.clone(),
            request_protocol: o.protocol,
            response_code: o.response_code,
            grpc_response_status: o.grpc_status,
            response_flags: o.flags,
            connection_security_policy: self.security,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Labels;

    fn pod(labels: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: "shop".into(),
            name: "web-1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Labels>(),
            ..Pod::default()
        }
    }

    #[test]
    fn peers_follow_istios_label_rules() {
        let p = Peer::of_pod(
            &pod(&[("app", "web"), ("version", "v2")]),
            Some("spiffe://x"),
        );
        assert_eq!(
            (
                &*p.app,
                &*p.version,
                &*p.canonical_service,
                &*p.canonical_revision
            ),
            ("web", "v2", "web", "v2")
        );
        assert_eq!(
            (&*p.workload, &*p.namespace, &*p.principal),
            ("web-1", "shop", "spiffe://x")
        );
        let p = Peer::of_pod(
            &pod(&[
                ("app", "web"),
                ("app.kubernetes.io/name", "storefront"),
                ("service.istio.io/canonical-revision", "r7"),
            ]),
            None,
        );
        assert_eq!(&*p.canonical_service, "storefront");
        assert_eq!(&*p.canonical_revision, "r7");
        assert_eq!(&*p.principal, "unknown");
        let p = Peer::of_pod(&pod(&[]), None);
        assert_eq!(
            (
                &*p.app,
                &*p.version,
                &*p.canonical_service,
                &*p.canonical_revision
            ),
            ("unknown", "unknown", "web-1", "latest")
        );
        assert_eq!(&*Peer::node().workload, "node");
    }

    #[test]
    fn a_connection_records_into_one_series_per_outcome() {
        let metrics = Arc::new(Metrics::default());
        let conn = ConnectionRequests::new(
            metrics.clone(),
            Reporter::Destination,
            Peer::unknown(None),
            Peer::of_pod(&pod(&[("app", "web")]), Some("spiffe://web")),
            SecurityPolicy::MutualTls,
        );
        let svc = DestinationService::new("web", "shop", "cluster.local");
        let ok = RequestOutcome {
            protocol: RequestProtocol::Http,
            response_code: 200,
            grpc_status: None,
            flags: ResponseFlags::None,
        };
        let sizes = RequestSizes {
            request: 0,
            response: 42,
        };
        for _ in 0..3 {
            conn.record(&svc, None, ok, Duration::from_millis(3), sizes);
        }
        let denied = RequestOutcome {
            response_code: 403,
            ..ok
        };
        conn.record(&svc, None, denied, Duration::from_millis(1), sizes);
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let line = |prefix: &str| {
            text.lines()
                .filter(|l| l.starts_with(prefix))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let requests = line("istio_requests_total{");
        assert_eq!(requests.len(), 2, "{text}");
        assert!(requests[0].contains("destination_service=\"web.shop.svc.cluster.local\""));
        assert!(requests
            .iter()
            .any(|l| l.contains("response_code=\"200\"") && l.ends_with(" 3")));
        assert!(requests[0].contains("grpc_response_status=\"\""));
        assert!(requests[0].contains("response_flags=\"-\""));
        // 3 ms falls in Istio's (1, 5] bucket; the sizes are observed as bytes.
        assert!(line("istio_request_duration_milliseconds_bucket{")
            .iter()
            .any(|l| l.contains("response_code=\"200\"")
                && l.contains("le=\"5.0\"")
                && l.ends_with(" 3")));
        assert!(line("istio_response_bytes_sum{")
            .iter()
            .any(|l| l.contains("response_code=\"200\"") && l.ends_with(" 126.0")));
    }
}
