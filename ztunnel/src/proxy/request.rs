//! One record per HTTP request the proxy parses, as [`super::record::ConnectionRecord`] is one
//! per connection: it owns the request's access-log line (`http request`) and Istio's request
//! metrics, and writes both when the response has ended, or when the request is abandoned (the
//! caller went away: `response_flags` `DC`, `response_code` 0 if no status was sent).
//!
//! The one place a proxy path records a request: the inbound request loop does today, as the
//! destination's proxy (`reporter="destination"`); a path that routes requests on the source
//! side makes its [`RequestContext`] with [`Reporter::Source`] and calls the same methods.
//!
//! * [`RequestTelemetry`]: the node's settings (request metrics on or off, the access log's
//!   switch and sampling, the cluster domain for Service names);
//! * [`RequestContext`]: a connection's side of its requests (peers, Services, upstream);
//! * [`RequestRecord`]: one request; [`RecordedBody`] carries it with the response body, which
//!   it counts, and [`CountedBody`] counts the request body on its way to the application.
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Buf as _;
use http::{header, HeaderMap, Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tracing::info;

use super::record::Direction;
use crate::{
    authz::Decision,
    metrics::{
        requests::{
            ConnectionRequests, DestinationService, Peer, RequestOutcome, RequestProtocol,
            RequestSizes, ResponseFlags,
        },
        Metrics, Reporter, SecurityPolicy,
    },
    model::Service,
};

/// Whether and how often requests are written to the access log.
#[derive(Debug)]
pub struct AccessLog {
    enabled: bool,
    /// The share of requests answered below 400 (with no response flag) that are logged;
    /// refusals, errors and abandoned requests always are.
    sample: f64,
    successes: AtomicU64,
}

impl AccessLog {
    pub fn new(enabled: bool, sample: f64) -> Self {
        Self {
            enabled,
            sample: sample.clamp(0.0, 1.0),
            successes: AtomicU64::new(0),
        }
    }

    /// Whether a request that ended so is logged. Successes are sampled evenly (the n-th is
    /// logged when ⌊n·rate⌋ grows), so a rate of 0.25 logs exactly every fourth.
    fn keeps(&self, code: u16, flags: ResponseFlags) -> bool {
        if !self.enabled {
            return false;
        }
        if code == 0 || code >= 400 || flags != ResponseFlags::None || self.sample >= 1.0 {
            return true;
        }
        let n = self.successes.fetch_add(1, Ordering::Relaxed) as f64;
        ((n + 1.0) * self.sample).floor() > (n * self.sample).floor()
    }
}

/// What `ztunnel run` says about request telemetry (`--request-metrics`, `--access-log`,
/// `--access-log-sample`, `--cluster-domain`).
#[derive(Clone, Debug)]
pub struct RequestSettings {
    /// Istio's request metrics; off, requests are still decided and logged.
    pub request_metrics: bool,
    pub access_log: bool,
    /// The share of successful requests logged (refusals and errors always are).
    pub access_log_sample: f64,
    /// The cluster's DNS domain: a Service is `name.namespace.svc.<domain>`.
    pub cluster_domain: String,
}

impl Default for RequestSettings {
    fn default() -> Self {
        Self {
            request_metrics: true,
            access_log: true,
            access_log_sample: 1.0,
            cluster_domain: "cluster.local".into(),
        }
    }
}

/// The node's request telemetry: the metrics and the settings, shared by every connection.
#[derive(Debug)]
pub struct RequestTelemetry {
    metrics: Arc<Metrics>,
    request_metrics: bool,
    access_log: AccessLog,
    cluster_domain: String,
}

impl RequestTelemetry {
    /// The cluster's DNS domain.
    pub fn cluster_domain(&self) -> &str {
        &self.cluster_domain
    }

    pub fn new(metrics: Arc<Metrics>, s: RequestSettings) -> Self {
        Self {
            metrics,
            request_metrics: s.request_metrics,
            access_log: AccessLog::new(s.access_log, s.access_log_sample),
            cluster_domain: s.cluster_domain,
        }
    }
}

/// What the access log says about the two ends, fixed for the connection.
#[derive(Clone, Debug, Default)]
pub struct LinePeers {
    pub src_workload: Option<String>,
    pub src_identity: Option<String>,
    pub src_addr: Option<String>,
    pub dst_workload: Option<String>,
    pub dst_identity: Option<String>,
}

/// A Service a request may have been addressed to, with the names that say so in a `Host`.
#[derive(Debug)]
struct Candidate {
    labels: DestinationService,
    /// `name`, `name.ns`, `name.ns.svc`, `name.ns.svc.<domain>` and the cluster IPs.
    names: Vec<String>,
}

/// A connection's side of its requests.
pub struct RequestContext {
    telemetry: Arc<RequestTelemetry>,
    direction: Direction,
    reporter: Reporter,
    metrics: Option<ConnectionRequests>,
    services: Vec<Candidate>,
    peers: LinePeers,
    /// Where allowed requests go.
    upstream: SocketAddr,
}

impl RequestContext {
    /// `services` are the Services that could have carried requests to this destination
    /// (those selecting its pod at this port), best first.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        telemetry: Arc<RequestTelemetry>,
        direction: Direction,
        reporter: Reporter,
        (source, destination): (Peer, Peer),
        security: SecurityPolicy,
        services: &[Arc<Service>],
        peers: LinePeers,
        upstream: SocketAddr,
    ) -> Self {
        let metrics = telemetry.request_metrics.then(|| {
            ConnectionRequests::new(
                telemetry.metrics.clone(),
                reporter,
                source,
                destination,
                security,
            )
        });
        let domain = &telemetry.cluster_domain;
        let services = services
            .iter()
            .map(|s| {
                let (n, ns) = (&s.name, &s.namespace);
                let mut names = vec![
                    n.clone(),
                    format!("{n}.{ns}"),
                    format!("{n}.{ns}.svc"),
                    format!("{n}.{ns}.svc.{domain}"),
                ];
                names.extend(s.vips.iter().map(|ip| ip.to_string()));
                Candidate {
                    labels: DestinationService::new(n, ns, domain),
                    names,
                }
            })
            .collect();
        Self {
            telemetry,
            direction,
            reporter,
            metrics,
            services,
            peers,
            upstream,
        }
    }

    /// The record of a request whose head has just been read.
    pub fn start<B>(self: &Arc<Self>, req: &Request<B>) -> RequestRecord {
        let headers = req.headers();
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| text(headers, header::HOST))
            .unwrap_or_default();
        let grpc = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let service = self.service_for(&authority);
        RequestRecord {
            context: self.clone(),
            start: Instant::now(),
            method: req.method().clone(),
            path: bounded(req.uri().path(), MAX_PATH),
            authority: bounded(&authority, MAX_FIELD),
            version: req.version(),
            protocol: if grpc {
                RequestProtocol::Grpc
            } else {
                RequestProtocol::Http
            },
            user_agent: text(headers, header::USER_AGENT).map(|v| bounded(&v, MAX_FIELD)),
            request_id: text(headers, "x-request-id").map(|v| bounded(&v, MAX_FIELD)),
            service,
            request_principal: None,
            decision: None,
            routed: None,
            forwarded: false,
            status: None,
            grpc_status: None,
            flags: ResponseFlags::None,
            error: None,
            request_bytes: Arc::new(AtomicU64::new(0)),
            response_bytes: 0,
        }
    }

    /// The Service named by the request's host, else the best candidate, else none.
    fn service_for(&self, authority: &str) -> Option<usize> {
        let host = strip_port(authority);
        self.services
            .iter()
            .position(|c| c.names.iter().any(|n| n.eq_ignore_ascii_case(host)))
            .or((!self.services.is_empty()).then_some(0))
    }
}

/// Log fields taken from the caller are cut to these many bytes (the log is not the place for
/// a megabyte of path).
const MAX_PATH: usize = 1024;
const MAX_FIELD: usize = 256;

fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn text(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `host` of `host:port` (and of `[v6]:port`).
fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// What the proxy decided about a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthzOutcome {
    Allowed,
    Denied,
    /// Refused (401) before authorization: a bad end-user token.
    Unauthenticated,
}

impl AuthzOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthzOutcome::Allowed => "allowed",
            AuthzOutcome::Denied => "denied",
            AuthzOutcome::Unauthenticated => "unauthenticated",
        }
    }
}

/// What the source side's routing chose for a request (VirtualService, DestinationRule).
#[derive(Debug, Default)]
pub struct Routed {
    /// `namespace/name` of the VirtualService, and the route's name (or index).
    pub virtual_service: Option<String>,
    pub route: Option<String>,
    /// The Service the chosen destination is, when it is not the one addressed.
    pub service: Option<DestinationService>,
    pub subset: Option<String>,
    /// The endpoint of the last attempt, and the pod behind it.
    pub endpoint: Option<SocketAddr>,
    pub destination: Option<Peer>,
    /// Attempts past the first.
    pub retries: u32,
}

#[derive(Debug)]
struct Decided {
    outcome: AuthzOutcome,
    policy: Option<String>,
    rule: Option<usize>,
    audit: bool,
}

/// One request, recorded when dropped.
pub struct RequestRecord {
    context: Arc<RequestContext>,
    start: Instant,
    method: Method,
    /// Without the query string: it may carry a token (`fromParams`), and it is the caller's.
    path: String,
    authority: String,
    version: Version,
    protocol: RequestProtocol,
    user_agent: Option<String>,
    request_id: Option<String>,
    /// Index of the Service in the context's candidates.
    service: Option<usize>,
    request_principal: Option<String>,
    decision: Option<Decided>,
    /// Where a route sent it, when the source side routed it.
    routed: Option<Routed>,
    forwarded: bool,
    status: Option<StatusCode>,
    grpc_status: Option<u8>,
    flags: ResponseFlags,
    error: Option<String>,
    request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
}

impl RequestRecord {
    /// The request carried a valid end-user token for `principal` (`iss/sub`).
    pub fn authenticated(&mut self, principal: Option<&str>) {
        self.request_principal = principal.map(str::to_owned);
    }

    /// Refused for a bad end-user token (answered 401).
    pub fn unauthenticated(&mut self, why: &str) {
        self.decision = Some(Decided {
            outcome: AuthzOutcome::Unauthenticated,
            policy: None,
            rule: None,
            audit: false,
        });
        self.error = Some(why.to_owned());
    }

    /// The authorization decision.
    pub fn decided(&mut self, d: &Decision) {
        self.decision = Some(Decided {
            outcome: if d.allowed {
                AuthzOutcome::Allowed
            } else {
                AuthzOutcome::Denied
            },
            policy: d.policy.clone(),
            rule: d.rule,
            audit: d.audit.is_some(),
        });
    }

    /// What routing chose (the source side), filled in as the request goes.
    pub fn routed(&mut self) -> &mut Routed {
        self.routed.get_or_insert_with(Routed::default)
    }

    /// What the proxy did instead of (or on top of) passing the request on: Envoy's flag.
    pub fn flag(&mut self, flags: ResponseFlags) {
        self.flags = flags;
    }

    pub fn flags(&self) -> ResponseFlags {
        self.flags
    }

    /// Why the proxy answered itself (a routing failure), for the log line.
    pub fn error(&mut self, why: impl Into<String>) {
        self.error = Some(why.into());
    }

    /// A CUSTOM provider denied it, or could not be asked (`UAEX`).
    pub fn denied_by_provider(&mut self) {
        self.flags = ResponseFlags::UnauthorizedExternalService;
    }

    /// The request goes to the application; its body is counted as it is read.
    pub fn forward<B>(&mut self, req: Request<B>) -> Request<CountedBody<B>> {
        self.forwarded = true;
        let counted = self.request_bytes.clone();
        req.map(|inner| CountedBody { inner, counted })
    }

    /// The application could not be reached, or reset before its response (`UC`).
    pub fn upstream_failed(&mut self, error: &dyn std::fmt::Display) {
        self.flags = ResponseFlags::UpstreamConnectionTermination;
        self.error = Some(error.to_string());
    }

    /// The response is going to the caller: the record travels with its body and is written
    /// when the body ends (or is dropped before it does).
    pub fn respond<B: Body>(mut self, response: Response<B>) -> Response<RecordedBody<B>> {
        self.status = Some(response.status());
        // A trailers-only gRPC answer carries its status in the headers.
        self.grpc_status = grpc_status(response.headers());
        let bodiless = self.method == Method::HEAD
            || response.status().is_informational()
            || response.status() == StatusCode::NO_CONTENT
            || response.status() == StatusCode::NOT_MODIFIED;
        response.map(|inner| RecordedBody {
            inner,
            record: Some(self),
            bodiless,
        })
    }

    fn write(&mut self) {
        let ctx = &self.context;
        let code = self.status.map_or(0, |s| s.as_u16());
        let duration = self.start.elapsed();
        let sizes = RequestSizes {
            request: self.request_bytes.load(Ordering::Relaxed),
            response: self.response_bytes,
        };
        let routed = self.routed.as_ref();
        let service = self.service.map(|i| &ctx.services[i]);
        let unknown = DestinationService::unknown();
        let labels = match (routed.and_then(|r| r.service.as_ref()), service) {
            (Some(s), _) => s,
            (None, Some(c)) => &c.labels,
            (None, None) => &unknown,
        };
        if let Some(m) = &ctx.metrics {
            let outcome = RequestOutcome {
                protocol: self.protocol,
                response_code: code,
                grpc_status: self.grpc_status,
                flags: self.flags,
            };
            let destination = routed.and_then(|r| r.destination.as_ref());
            m.record(labels, destination, outcome, duration, sizes);
        }
        if !ctx.telemetry.access_log.keeps(code, self.flags) {
            return;
        }
        let (p, d) = (&ctx.peers, self.decision.as_ref());
        let upstream_workload = routed
            .and_then(|r| r.destination.as_ref())
            .map(|d| format!("{}/{}", d.namespace, d.workload));
        let upstream = match routed.and_then(|r| r.endpoint) {
            Some(endpoint) => Some(endpoint.to_string()),
            None => self.forwarded.then(|| ctx.upstream.to_string()),
        };
        info!(
            direction = match ctx.direction {
                Direction::Inbound => "inbound",
                Direction::Outbound => "outbound",
            },
            reporter = ctx.reporter.as_str(),
            method = self.method.as_str(),
            authority = self.authority.as_str(),
            path = self.path.as_str(),
            protocol = version(self.version),
            response_code = code,
            grpc_status = self.grpc_status,
            response_flags = self.flags.as_str(),
            duration_ms = duration.as_millis() as u64,
            request_bytes = sizes.request,
            response_bytes = sizes.response,
            upstream = upstream.as_deref(),
            src_workload = p.src_workload.as_deref(),
            src_identity = p.src_identity.as_deref(),
            src_addr = p.src_addr.as_deref(),
            dst_workload = p.dst_workload.as_deref(),
            dst_identity = p.dst_identity.as_deref(),
            dst_service = (service.is_some() || routed.is_some()).then_some(&*labels.host),
            virtual_service = routed.and_then(|r| r.virtual_service.as_deref()),
            route = routed.and_then(|r| r.route.as_deref()),
            upstream_subset = routed.and_then(|r| r.subset.as_deref()),
            upstream_workload = upstream_workload.as_deref(),
            retries = routed.map(|r| r.retries).filter(|n| *n > 0),
            request_principal = self.request_principal.as_deref(),
            authz_decision = d.map(|d| d.outcome.as_str()),
            authz_policy = d.and_then(|d| d.policy.as_deref()),
            authz_rule = d.and_then(|d| d.rule),
            audit = d.is_some_and(|d| d.audit).then_some(true),
            user_agent = self.user_agent.as_deref(),
            request_id = self.request_id.as_deref(),
            error = self.error.as_deref(),
            "http request"
        );
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        // No response at all: the caller went away while the request was decided or sent.
        if self.status.is_none() && self.flags == ResponseFlags::None {
            self.flags = ResponseFlags::DownstreamConnectionTermination;
        }
        self.write();
    }
}

fn version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP",
    }
}

fn grpc_status(h: &HeaderMap) -> Option<u8> {
    h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

/// A request body on its way to the application, counted as it is read.
pub struct CountedBody<B> {
    inner: B,
    counted: Arc<AtomicU64>,
}

impl<B> CountedBody<B> {
    /// A body sent by the proxy on its own (a mirrored copy): counted nowhere.
    pub fn uncounted(inner: B) -> Self {
        Self {
            inner,
            counted: Arc::default(),
        }
    }
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &r {
            if let Some(data) = frame.data_ref() {
                this.counted
                    .fetch_add(data.remaining() as u64, Ordering::Relaxed);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body on its way to the caller, with the request's record: counts the body,
/// reads gRPC's status from the trailers, and writes the record when the body ends.
pub struct RecordedBody<B: Body> {
    inner: B,
    record: Option<RequestRecord>,
    /// A response that has no body by definition (to HEAD, 1xx, 204, 304).
    bodiless: bool,
}

impl<B: Body> Drop for RecordedBody<B> {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            // Dropped before its end: the caller went away (unless there was nothing left to
            // send).
            let complete = self.bodiless || self.inner.is_end_stream();
            if !complete && record.flags == ResponseFlags::None {
                record.flags = ResponseFlags::DownstreamConnectionTermination;
            }
        }
    }
}

impl<B> Body for RecordedBody<B>
where
    B: Body + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        let Some(record) = this.record.as_mut() else {
            return r;
        };
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    record.response_bytes += data.remaining() as u64;
                }
                if let Some(trailers) = frame.trailers_ref() {
                    record.grpc_status = grpc_status(trailers).or(record.grpc_status);
                }
                if this.inner.is_end_stream() {
                    // The last frame: complete, written now.
                    drop(this.record.take());
                }
            }
            Poll::Ready(None) => drop(this.record.take()),
            Poll::Ready(Some(Err(e))) => {
                record.upstream_failed(e);
                drop(this.record.take());
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successes_are_sampled_evenly_and_refusals_always_logged() {
        let log = AccessLog::new(true, 0.25);
        let kept = (0..8)
            .filter(|_| log.keeps(200, ResponseFlags::None))
            .count();
        assert_eq!(kept, 2);
        assert!(log.keeps(403, ResponseFlags::None));
        assert!(log.keeps(0, ResponseFlags::DownstreamConnectionTermination));
        assert!(log.keeps(200, ResponseFlags::UnauthorizedExternalService));
        let none = AccessLog::new(true, 0.0);
        assert!(!(0..100).any(|_| none.keeps(204, ResponseFlags::None)));
        assert!(none.keeps(503, ResponseFlags::None));
        let off = AccessLog::new(false, 1.0);
        assert!(!off.keeps(500, ResponseFlags::None));
    }

    #[test]
    fn hosts_lose_their_port_and_fields_are_bounded() {
        assert_eq!(strip_port("web.shop:80"), "web.shop");
        assert_eq!(strip_port("10.96.0.10"), "10.96.0.10");
        assert_eq!(strip_port("[fd00::1]:8080"), "fd00::1");
        assert_eq!(strip_port("weird:name"), "weird:name");
        assert_eq!(bounded("abc", 5), "abc");
        assert_eq!(bounded("ééé", 3), "é…");
    }
}
