//! Requests routed on the source side. A connection to a Service port that speaks HTTP and
//! has traffic rules (a VirtualService or a DestinationRule) is served as HTTP here, and each
//! request goes on its own: the VirtualService's decision for it (route, fault, rewrite,
//! headers, timeout, retries, mirror), a destination chosen by the route's weights, an
//! endpoint of that destination chosen by the DestinationRule's load balancer among the ones
//! outlier detection has not ejected, and an upstream connection to that endpoint, kept for
//! the caller connection's next requests to it. Upstream connections are carried as any
//! other outbound connection to that pod is: HBONE with the pod's identity checked (secure
//! naming) to a mesh pod on another node, this node's inbound side for a pod here, a direct
//! connection outside the mesh. The destination's proxy still decides each request (L7
//! authorization): routing chooses where a request goes, never whether it is allowed.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU32, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{header, uri, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::{debug, warn};

use super::{
    connect_headers,
    upstreams::{self, Outcome, DEFAULT_CONNECT_TIMEOUT},
    Outbound, Route,
};
use crate::{
    hbone::Stream,
    metrics::{
        requests::{DestinationService, Peer, ResponseFlags},
        Reporter, SecurityPolicy,
    },
    model::Service,
    proxy::{
        http::{
            request_host,
            sniff::{sniff, sniff_deadline, Protocol, Replay},
            text_response, Body, Upstream,
        },
        inbound::Arrival,
        record::{Direction, OpenConnection},
        request::{CountedBody, LinePeers, RecordedBody, RequestContext, RequestRecord},
        PodContext,
    },
    relay::Relayed,
    socket,
    state::{Endpoint, Snapshot},
    traffic::{
        retry::Attempt, Abort, Cluster, ConnectionPool, HashKey, HttpDecision, HttpRouteRequest,
        LoadBalancer, RetryPolicy, RouteAction, SourceWorkload, WeightedCluster,
    },
};

/// What goes upstream: the caller's body (or a buffered copy of it, to retry or mirror).
type Sent = CountedBody<Body>;

/// Request bodies are buffered (to be sent again on a retry, or to a mirror) up to this size;
/// a larger one is answered 413.
const MAX_BUFFERED_BODY: usize = 1 << 20;

/// One caller connection served request by request.
pub(super) struct RoutedConnection {
    pub(super) outbound: Arc<Outbound>,
    pub(super) pod: Arc<PodContext>,
    /// The Service and port the caller dialled, and the address it dialled.
    pub(super) service: Arc<Service>,
    pub(super) port: u16,
    orig: SocketAddr,
    pub(super) requests: Arc<RequestContext>,
    http2: AtomicU32,
    /// Keep-alive upstream connections of this caller connection, one per endpoint.
    upstreams: Mutex<HashMap<SocketAddr, Arc<UpstreamConnection>>>,
}

/// An upstream connection and the requests it has carried (`maxRequestsPerConnection`).
struct UpstreamConnection {
    sender: Upstream<Sent>,
    sent: AtomicU32,
}

/// Why an attempt got no response.
enum Failure {
    /// No connection to the endpoint (refused, timed out, HBONE refused).
    Connect(String),
    /// The connection or stream broke before a response.
    Reset(String),
    /// HTTP/2 REFUSED_STREAM: the request was not processed.
    RefusedStream,
    /// The per-try timeout fired.
    Timeout,
    /// The connection pool is full.
    Overflow(&'static str),
    /// Every endpoint is ejected, or there is none.
    NoHealthy(String),
}

impl RoutedConnection {
    pub(super) fn new(
        outbound: Arc<Outbound>,
        pod: Arc<PodContext>,
        (service, orig): (Arc<Service>, SocketAddr),
        requests: Arc<RequestContext>,
    ) -> Arc<Self> {
        Arc::new(Self {
            outbound,
            pod,
            service,
            port: orig.port(),
            orig,
            requests,
            http2: AtomicU32::new(0),
            upstreams: Mutex::default(),
        })
    }

    /// Serves the caller's connection until it ends.
    pub(super) async fn serve(
        self: Arc<Self>,
        mut downstream: TcpStream,
        declared: Option<crate::model::AppProtocol>,
        tally: Arc<OpenConnection>,
    ) -> Relayed {
        let done = |error: Option<io::Error>| {
            let (sent, received) = tally.bytes();
            Relayed {
                sent,
                received,
                error,
                revoked: None,
            }
        };
        let (protocol, prefix) = match sniff(&mut downstream, sniff_deadline(declared)).await {
            Ok(x) => x,
            Err(e) => return done(Some(e)),
        };
        if protocol == Protocol::Opaque {
            // A declared HTTP port that does not carry HTTP: there is no request to route.
            return done(Some(io::Error::new(
                io::ErrorKind::InvalidData,
                "a port declared HTTP carries something else",
            )));
        }
        self.http2
            .store(u32::from(protocol == Protocol::Http2), Ordering::Relaxed);
        let downstream = Replay {
            prefix: Bytes::from(prefix),
            inner: downstream,
            tally: tally.clone(),
        };
        let this = self.clone();
        let r = crate::proxy::http::serve(downstream, move |req: Request<Incoming>| {
            let this = this.clone();
            async move { this.answer(req).await }
        })
        .await;
        done(r.err().map(io::Error::other))
    }

    /// One request, from the caller's head to the response it gets.
    async fn answer(self: Arc<Self>, req: Request<Incoming>) -> Response<RecordedBody<Body>> {
        let mut record = self.requests.start(&req);
        let snapshot = self.outbound.shared.snapshot();
        let labels = self.source_labels(&snapshot);
        let source = SourceWorkload {
            namespace: &self.pod.namespace,
            labels: &labels,
        };
        let authority = request_host(&req);
        let decision = snapshot.http_route(&HttpRouteRequest {
            source,
            service: &self.service,
            port: self.port,
            method: req.method(),
            path: req.uri().path_and_query().map_or("/", |p| p.as_str()),
            authority: &authority,
            headers: req.headers(),
        });
        if let Some(vs) = decision.virtual_service() {
            record.routed().virtual_service = Some(vs.to_string());
        }
        let response = match decision {
            HttpDecision::NoVirtualService => {
                let cluster = Cluster {
                    service: self.service.clone(),
                    fqdn: DestinationService::new(
                        &self.service.name,
                        &self.service.namespace,
                        self.outbound.cluster_domain(),
                    )
                    .host
                    .to_string(),
                    port: self.port,
                    protocol: None,
                    subset: None,
                    destination_rule: None,
                    policy: snapshot.destination_policy(source, &self.service, None, self.port),
                };
                let (parts, body) = req.into_parts();
                let retries = RetryPolicy::default();
                self.send(
                    &snapshot,
                    &cluster,
                    parts,
                    body,
                    &retries,
                    None,
                    &mut record,
                )
                .await
            }
            HttpDecision::Routed(action) => {
                record.routed().route = Some(action.route.to_string());
                self.route(&snapshot, &action, req, &mut record).await
            }
            HttpDecision::Redirect {
                route,
                status,
                location,
                ..
            } => {
                record.routed().route = Some(route.to_string());
                let mut resp = text_response(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::MOVED_PERMANENTLY),
                    "",
                );
                if let Ok(v) = HeaderValue::from_str(&location) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                resp
            }
            HttpDecision::DirectResponse {
                route,
                status,
                body,
                ..
            } => {
                record.routed().route = Some(route.to_string());
                let mut resp = Response::new(full(body));
                *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                resp
            }
            HttpDecision::NoRoute { .. } => {
                record.flag(ResponseFlags::NoRouteFound);
                self.outbound.shared.metrics.traffic_events.add("no_route");
                text_response(StatusCode::NOT_FOUND, "no route matched\n")
            }
        };
        record.respond(response)
    }

    /// The caller's pod labels (`sourceLabels`, DestinationRule `workloadSelector`).
    fn source_labels(&self, snapshot: &Snapshot) -> crate::model::Labels {
        self.pod
            .in_snapshot(snapshot)
            .map(|p| p.labels.clone())
            .unwrap_or_default()
    }

    /// A request through `action`, in the order crate::traffic documents: fault, destination,
    /// rewrite and headers, then the attempts within the route's timeout, and the mirrors.
    async fn route(
        &self,
        snapshot: &Snapshot,
        action: &RouteAction,
        req: Request<Incoming>,
        record: &mut RequestRecord,
    ) -> Response<Body> {
        let metrics = &self.outbound.shared.metrics;
        if let Some(delay) = &action.fault.delay {
            if delay.percentage.draw() {
                record.flag(ResponseFlags::DelayInjected);
                metrics.traffic_events.add("fault_delay");
                tokio::time::sleep(delay.duration).await;
            }
        }
        if let Some(abort) = &action.fault.abort {
            if abort.percentage.draw() {
                record.flag(ResponseFlags::FaultInjected);
                metrics.traffic_events.add("fault_abort");
                return abort_response(abort.status);
            }
        }
        let key = format!(
            "{}|{}|{}",
            self.pod.workload, action.virtual_service, action.route
        );
        let weights: Vec<u32> = action.destinations.iter().map(|d| d.weight).collect();
        let chosen: &WeightedCluster =
            &action.destinations[self.outbound.upstreams.split(&key, &weights)];
        let cluster = match &chosen.target {
            Ok(c) => c,
            Err(why) => {
                record.flag(ResponseFlags::NoClusterFound);
                record.error(why.to_string());
                return text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no cluster for the route\n",
                );
            }
        };
        let (mut parts, body) = req.into_parts();
        if let Some(rw) = &action.rewrite {
            rewrite(&mut parts, rw.path.as_deref(), rw.authority.as_deref());
        }
        action.headers.request.apply(&mut parts.headers);
        chosen.headers.request.apply(&mut parts.headers);
        for authority in [&action.headers.authority, &chosen.headers.authority]
            .into_iter()
            .flatten()
        {
            rewrite(&mut parts, None, Some(authority));
        }
        let mirrors: Vec<&Cluster> = action
            .mirrors
            .iter()
            .filter(|m| m.percentage.draw())
            .filter_map(|m| m.target.as_ref().ok())
            .collect();
        let sent = self.send(
            snapshot,
            cluster,
            parts,
            body,
            &action.retries,
            Some(&mirrors),
            record,
        );
        let mut response = match action.timeout {
            Some(t) => match tokio::time::timeout(t, sent).await {
                Ok(r) => r,
                Err(_) => {
                    record.flag(ResponseFlags::UpstreamRequestTimeout);
                    metrics.traffic_events.add("timeout");
                    return text_response(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
                }
            },
            None => sent.await,
        };
        action.headers.response.apply(response.headers_mut());
        chosen.headers.response.apply(response.headers_mut());
        response
    }

    /// Sends a request to `cluster`: the first attempt and the retries `retries` allows (the
    /// body is kept to be sent again when it is small enough), and a copy to each mirror.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        snapshot: &Snapshot,
        cluster: &Cluster,
        parts: http::request::Parts,
        body: Incoming,
        retries: &RetryPolicy,
        mirrors: Option<&[&Cluster]>,
        record: &mut RequestRecord,
    ) -> Response<Body> {
        let mirrors = mirrors.unwrap_or_default();
        let small = hyper::body::Body::size_hint(&body)
            .upper()
            .is_some_and(|n| n <= MAX_BUFFERED_BODY as u64);
        let keep = (retries.attempts > 0 || !mirrors.is_empty()) && small;
        let mut body = match keep {
            true => match Limited::new(body, MAX_BUFFERED_BODY).collect().await {
                Ok(b) => BodyToSend::Buffered(b.to_bytes()),
                Err(e) => {
                    record.error(format!("request body not read: {e}"));
                    return text_response(StatusCode::BAD_REQUEST, "request body not read\n");
                }
            },
            false => BodyToSend::Stream(Some(body.boxed())),
        };
        if let BodyToSend::Buffered(bytes) = &body {
            for m in mirrors {
                self.mirror(snapshot, m, &parts, bytes.clone());
            }
        }
        let mut attempt = 0;
        loop {
            let result = self
                .attempt(
                    snapshot,
                    cluster,
                    &parts,
                    &mut body,
                    retries.per_try_timeout,
                    record,
                )
                .await;
            let ended = match &result {
                Ok(r) => Attempt::Response {
                    status: r.status().as_u16(),
                    grpc_status: r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok()),
                    rate_limited: r.headers().contains_key("x-envoy-ratelimited"),
                },
                Err(f) => f.attempt(),
            };
            let retriable = !matches!(&result, Err(Failure::Overflow(_) | Failure::NoHealthy(_)))
                && retries.retries(ended);
            if retriable && attempt < retries.attempts && body.again() {
                attempt += 1;
                record.routed().retries = attempt;
                self.outbound.shared.metrics.traffic_events.add("retry");
                tokio::time::sleep(retries.backoff_before(attempt)).await;
                continue;
            }
            if retriable && retries.attempts > 0 {
                record.flag(ResponseFlags::UpstreamRetryLimitExceeded);
            }
            return match result {
                Ok(r) => r.map(BodyExt::boxed),
                Err(f) => self.failure_response(f, record),
            };
        }
    }

    fn failure_response(&self, f: Failure, record: &mut RequestRecord) -> Response<Body> {
        let keep = |record: &mut RequestRecord, flag| {
            if record.flags() == ResponseFlags::None {
                record.flag(flag);
            }
        };
        match f {
            Failure::Overflow(what) => {
                record.flag(ResponseFlags::UpstreamOverflow);
                record.error(what);
                self.outbound.shared.metrics.traffic_events.add("overflow");
                let mut r = text_response(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers. reset reason: overflow");
                r.headers_mut()
                    .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
                r
            }
            Failure::NoHealthy(why) => {
                keep(record, ResponseFlags::NoHealthyUpstream);
                record.error(why);
                text_response(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream")
            }
            Failure::Connect(why) => {
                keep(record, ResponseFlags::UpstreamConnectionFailure);
                record.error(why);
                text_response(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error")
            }
            Failure::Reset(why) => {
                keep(record, ResponseFlags::UpstreamConnectionTermination);
                record.error(why);
                text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream reset before headers",
                )
            }
            Failure::RefusedStream => {
                keep(record, ResponseFlags::UpstreamConnectionTermination);
                record.error("the upstream refused the stream");
                text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream refused the stream",
                )
            }
            Failure::Timeout => {
                keep(record, ResponseFlags::UpstreamRequestTimeout);
                text_response(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
            }
        }
    }

    /// One attempt: an endpoint, a connection to it, the request, its response head.
    async fn attempt(
        &self,
        snapshot: &Snapshot,
        cluster: &Cluster,
        parts: &http::request::Parts,
        body: &mut BodyToSend,
        per_try: Option<Duration>,
        record: &mut RequestRecord,
    ) -> Result<Response<Incoming>, Failure> {
        let mut endpoints = snapshot.cluster_endpoints(cluster);
        endpoints.retain(|e| e.addr.is_ipv4() == self.orig.is_ipv4());
        let name = cluster.name();
        if endpoints.is_empty() {
            return Err(Failure::NoHealthy(format!("{name} has no endpoints")));
        }
        let policy = &cluster.policy;
        // Limits and health are per client, as each sidecar has its own.
        let state = self
            .outbound
            .upstreams
            .destination(&format!("{}|{name}", self.pod.workload));
        let hash = match &policy.load_balancer {
            LoadBalancer::ConsistentHash(key) => self.hash_key(key, parts),
            _ => None,
        };
        let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
        let Some(addr) = state.pick(&addrs, &policy.load_balancer, hash) else {
            return Err(Failure::NoHealthy(format!(
                "every endpoint of {name} is ejected by outlier detection"
            )));
        };
        let endpoint = endpoints
            .iter()
            .find(|e| e.addr == addr)
            .expect("picked from them");
        {
            let r = record.routed();
            r.endpoint = Some(addr);
            r.subset = cluster.subset_name().map(str::to_owned);
            let mut peer = Peer::of_pod(&endpoint.pod, None);
            if let (Some(s), true) = (cluster.subset_name(), &*peer.version == "unknown") {
                peer.version = s.into();
            }
            r.destination = Some(peer);
            if !Arc::ptr_eq(&cluster.service, &self.service) {
                r.service = Some(DestinationService::new(
                    &cluster.service.name,
                    &cluster.service.namespace,
                    self.outbound.cluster_domain(),
                ));
            }
        }
        let outlier = policy.outlier_detection.as_ref();
        let pool = &policy.connection_pool;
        let finish = |outcome| {
            if state.finished(addr, outcome, outlier, addrs.len()) {
                self.outbound
                    .shared
                    .metrics
                    .traffic_events
                    .add("outlier_ejection");
                warn!(endpoint = %addr, cluster = %name, "outlier detection ejected an endpoint");
            }
        };
        let in_flight = InFlight::enter(&state.in_flight);
        if in_flight.count > pool.max_requests as usize {
            finish(Outcome::Ok);
            return Err(Failure::Overflow(
                "too many requests in flight to the destination",
            ));
        }
        let conn = match self.connection(snapshot, endpoint, &state, pool).await {
            Ok(c) => c,
            Err(f) => {
                finish(match f {
                    Failure::Overflow(_) => Outcome::Ok,
                    _ => Outcome::LocalFailure,
                });
                return Err(f);
            }
        };
        let Some(b) = body.take() else {
            finish(Outcome::Ok);
            return Err(Failure::Reset("request body already sent".into()));
        };
        let mut req = Request::from_parts(parts.clone(), b);
        *req.version_mut() = match self.is_http2() {
            true => http::Version::HTTP_2,
            false => http::Version::HTTP_11,
        };
        let req = record.forward(req);
        let sent = conn.sender.send(req);
        let result = match per_try {
            Some(t) => match tokio::time::timeout(t, sent).await {
                Ok(r) => r.map_err(Failure::of_hyper),
                Err(_) => Err(Failure::Timeout),
            },
            None => sent.await.map_err(Failure::of_hyper),
        };
        drop(in_flight);
        match &result {
            Ok(r) => finish(Outcome::of_status(r.status().as_u16())),
            Err(_) => {
                self.forget(addr, &conn);
                finish(Outcome::LocalFailure);
            }
        }
        result
    }

    /// The consistent-hash key's value in this request, hashed.
    fn hash_key(&self, key: &HashKey, parts: &http::request::Parts) -> Option<u64> {
        match key {
            HashKey::Header(h) => parts
                .headers
                .get(h)
                .map(|v| upstreams::hash_of(v.as_bytes())),
            HashKey::SourceIp => self.pod.ips.first().map(|ip| upstreams::hash_ip(*ip)),
            HashKey::QueryParameter(q) => parts.uri.query().and_then(|query| {
                query
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| k == q)
                    .map(|(_, v)| upstreams::hash_of(v.as_bytes()))
            }),
            HashKey::Cookie(c) => parts
                .headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| k == c)
                .map(|(_, v)| upstreams::hash_of(v.as_bytes())),
        }
    }

    fn is_http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed) == 1
    }

    /// The kept connection to `endpoint`, or a new one if there is none (or it is closed, or
    /// has carried its `maxRequestsPerConnection`), within the pool's `maxConnections`.
    async fn connection(
        &self,
        snapshot: &Snapshot,
        endpoint: &Endpoint,
        state: &upstreams::Destination,
        pool: &ConnectionPool,
    ) -> Result<Arc<UpstreamConnection>, Failure> {
        let addr = endpoint.addr;
        let kept = {
            let conns = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
            conns.get(&addr).cloned()
        };
        if let Some(c) = kept {
            let used = c.sent.fetch_add(1, Ordering::Relaxed) + 1;
            let m = pool.max_requests_per_connection;
            let spent = m > 0 && used > m;
            if !c.sender.is_closed() && !spent {
                return Ok(c);
            }
            self.forget(addr, &c);
        }
        let guard = self.connection_slot(state, pool).await?;
        let timeout = pool.connect_timeout;
        let io = match tokio::time::timeout(timeout, self.open(snapshot, endpoint)).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => return Err(Failure::Connect(e)),
            Err(_) => return Err(Failure::Connect(format!("connect to {addr} timed out"))),
        };
        let io = Counted { io, _slot: guard };
        let sender = Upstream::handshake(io, self.is_http2())
            .await
            .map_err(|e| Failure::Connect(e.to_string()))?;
        let c = Arc::new(UpstreamConnection {
            sender,
            sent: AtomicU32::new(1),
        });
        let mut conns = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        conns.insert(addr, c.clone());
        Ok(c)
    }

    fn forget(&self, addr: SocketAddr, c: &Arc<UpstreamConnection>) {
        let mut conns = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        if conns.get(&addr).is_some_and(|k| Arc::ptr_eq(k, c)) {
            conns.remove(&addr);
        }
    }

    /// A new connection to `endpoint`, carried as the outbound side carries any connection
    /// to that pod.
    async fn open(&self, snapshot: &Snapshot, endpoint: &Endpoint) -> Result<UpstreamIo, String> {
        let outbound = &self.outbound;
        let route = Route {
            upstream: endpoint.addr,
            service: None,
            workload: Some(endpoint.pod.workload()),
        };
        if let Some(key) = outbound.tunnel_for(&self.pod, snapshot, &route) {
            let connect = outbound.shared.mesh.pool.connect(
                &key,
                endpoint.addr,
                connect_headers(&self.pod, key.origin.ip),
            );
            let stream = Box::pin(connect).await.map_err(|e| e.to_string())?;
            debug!(endpoint = %endpoint.addr, dst_identity = %key.dst, "routed requests over HBONE");
            return Ok(UpstreamIo::Tunnel(Box::new(stream)));
        }
        if let Some(dst) = outbound.shared.local_pod(endpoint.addr.ip()) {
            // This node's inbound side takes the connection as it takes any same-node one
            // (its policies decide); a loopback socket pair carries it there.
            let (ours, theirs) = loopback_pair().await.map_err(|e| e.to_string())?;
            let inbound = outbound.inbound.clone();
            let arrival = Arrival::SameNode {
                src: self.pod.clone(),
            };
            let snapshot = outbound.shared.snapshot();
            let addr = endpoint.addr;
            tokio::spawn(crate::proxy::carry::set_up_then_carry(
                inbound.deliver(dst, arrival, addr, theirs, snapshot, None),
            ));
            return Ok(UpstreamIo::Socket(ours));
        }
        let s = outbound
            .shared
            .connect_from(&self.pod, endpoint.addr)
            .await
            .map_err(|e| e.to_string())?;
        Ok(UpstreamIo::Socket(s))
    }

    /// One of the destination's `maxConnections` for a new connection: at once if one is
    /// free, else after waiting (at most the connect timeout) if fewer than
    /// `http1MaxPendingRequests` wait already; else the pool overflows.
    async fn connection_slot(
        &self,
        state: &upstreams::Destination,
        pool: &ConnectionPool,
    ) -> Result<ConnectionSlot, Failure> {
        let open = &state.connections;
        if let Some(slot) = ConnectionSlot::take(open.clone(), pool.max_connections) {
            return Ok(slot);
        }
        let pending = InFlight::enter(&state.pending);
        if pending.count > pool.max_pending_requests as usize {
            return Err(Failure::Overflow(
                "the destination's maxConnections are open and http1MaxPendingRequests wait",
            ));
        }
        let deadline = tokio::time::Instant::now() + pool.connect_timeout;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if let Some(slot) = ConnectionSlot::take(open.clone(), pool.max_connections) {
                return Ok(slot);
            }
        }
        Err(Failure::Overflow(
            "no connection of the destination's maxConnections came free",
        ))
    }

    /// Sends a copy of the request to `cluster` and forgets it: the response is discarded, and
    /// nothing the mirror does reaches the caller.
    fn mirror(
        &self,
        snapshot: &Snapshot,
        cluster: &Cluster,
        parts: &http::request::Parts,
        body: Bytes,
    ) {
        let mut endpoints = snapshot.cluster_endpoints(cluster);
        endpoints.retain(|e| e.addr.is_ipv4() == self.orig.is_ipv4());
        let state = self.outbound.upstreams.destination(&format!(
            "{}|{}",
            self.pod.workload,
            cluster.name()
        ));
        let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
        let Some(addr) = state.pick(&addrs, &cluster.policy.load_balancer, None) else {
            return;
        };
        let Some(endpoint) = endpoints.into_iter().find(|e| e.addr == addr) else {
            return;
        };
        let mut parts = parts.clone();
        // Envoy marks a shadow's host with `-shadow`.
        if let Some(host) = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
        {
            if let Ok(v) = HeaderValue::from_str(&format!("{host}-shadow")) {
                parts.headers.insert(header::HOST, v);
            }
        }
        let this = RoutedConnection {
            outbound: self.outbound.clone(),
            pod: self.pod.clone(),
            service: cluster.service.clone(),
            port: cluster.port,
            orig: self.orig,
            requests: self.requests.clone(),
            http2: AtomicU32::new(self.http2.load(Ordering::Relaxed)),
            upstreams: Mutex::default(),
        };
        let snapshot = self.outbound.shared.snapshot();
        self.outbound.shared.metrics.traffic_events.add("mirror");
        tokio::spawn(async move {
            let sent = async {
                let io = this
                    .open(&snapshot, &endpoint)
                    .await
                    .map_err(io::Error::other)?;
                let sender = Upstream::<Sent>::handshake(io, this.is_http2())
                    .await
                    .map_err(io::Error::other)?;
                let req = Request::from_parts(parts, CountedBody::uncounted(full(body)));
                let r = sender.send(req).await.map_err(io::Error::other)?;
                r.into_body().collect().await.map_err(io::Error::other)?;
                Ok::<_, io::Error>(())
            };
            match tokio::time::timeout(Duration::from_secs(30), sent).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(endpoint = %addr, error = %e, "mirrored request failed"),
                Err(_) => debug!(endpoint = %addr, "mirrored request timed out"),
            }
            state.finished(addr, Outcome::Ok, None, 1);
        });
    }
}

impl Failure {
    /// A send that got no response: a refused stream, or a reset.
    fn of_hyper(e: hyper::Error) -> Self {
        use std::error::Error as _;
        let refused = e
            .source()
            .and_then(|s| s.downcast_ref::<h2::Error>())
            .is_some_and(|h| h.reason() == Some(h2::Reason::REFUSED_STREAM));
        match refused {
            true => Failure::RefusedStream,
            false => Failure::Reset(e.to_string()),
        }
    }

    /// How the attempt ended, as retry conditions read it.
    fn attempt(&self) -> Attempt {
        match self {
            Failure::Connect(_) => Attempt::ConnectFailed,
            Failure::RefusedStream => Attempt::RefusedStream,
            Failure::Reset(_) => Attempt::Reset,
            Failure::Timeout => Attempt::PerTryTimeout,
            // Not retried (the caller's filter); a reset as far as the conditions go.
            Failure::Overflow(_) | Failure::NoHealthy(_) => Attempt::Reset,
        }
    }
}

/// A fault's answer: an HTTP status, or a gRPC status as a trailers-only response.
fn abort_response(abort: Abort) -> Response<Body> {
    match abort {
        Abort::Http(code) => text_response(
            StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "fault filter abort",
        ),
        Abort::Grpc(code) => {
            let mut r = Response::new(full(Bytes::new()));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(code));
            h.insert(
                "grpc-message",
                HeaderValue::from_static("fault filter abort"),
            );
            r
        }
    }
}

/// The request body as the attempts see it.
enum BodyToSend {
    /// Read once, sent once: no retry after it has gone.
    Stream(Option<Body>),
    Buffered(Bytes),
}

impl BodyToSend {
    fn take(&mut self) -> Option<Body> {
        match self {
            BodyToSend::Stream(b) => b.take(),
            BodyToSend::Buffered(bytes) => Some(full(bytes.clone())),
        }
    }

    /// Whether it can be sent again.
    fn again(&self) -> bool {
        matches!(self, BodyToSend::Buffered(_))
    }
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A rewrite: the new path and query (computed by the decision), and the authority (`Host`
/// for HTTP/1.1, the URI's for HTTP/2).
fn rewrite(parts: &mut http::request::Parts, path: Option<&str>, authority: Option<&str>) {
    let mut u = uri::Parts::from(parts.uri.clone());
    if let Some(pq) = path.and_then(|p| p.parse().ok()) {
        u.path_and_query = Some(pq);
    }
    if let Some(authority) = authority {
        if let Ok(v) = HeaderValue::from_str(authority) {
            parts.headers.insert(header::HOST, v);
        }
        if u.authority.is_some() {
            if let Ok(a) = authority.parse() {
                u.authority = Some(a);
            }
        }
    }
    if let Ok(uri) = Uri::from_parts(u) {
        parts.uri = uri;
    }
}

/// A request counted in flight to a destination until dropped.
struct InFlight<'a> {
    counter: &'a AtomicUsize,
    /// The count with this one.
    count: usize,
}

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        let count = counter.fetch_add(1, Ordering::AcqRel) + 1;
        Self { counter, count }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One of a destination's `maxConnections`, held by the connection for its life.
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn take(open: Arc<AtomicUsize>, max: u32) -> Option<Self> {
        let max = max as usize;
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()?;
        Some(Self(open))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An upstream connection's bytes: an HBONE stream (kept whole: its slot on the pooled
/// connection is given back when it drops), or a socket.
enum UpstreamIo {
    Tunnel(Box<Stream>),
    Socket(TcpStream),
}

/// An upstream connection holding its pool slot until hyper drops it.
struct Counted {
    io: UpstreamIo,
    _slot: ConnectionSlot,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tunnel(s) => Pin::new(&mut s.io).poll_read(cx, buf),
            UpstreamIo::Socket(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tunnel(s) => Pin::new(&mut s.io).poll_write(cx, data),
            UpstreamIo::Socket(s) => Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tunnel(s) => Pin::new(&mut s.io).poll_flush(cx),
            UpstreamIo::Socket(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tunnel(s) => Pin::new(&mut s.io).poll_shutdown(cx),
            UpstreamIo::Socket(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Two connected loopback sockets of the node, marked so capture leaves them alone.
async fn loopback_pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let socket = socket::marked(addr)?;
    let (ours, theirs) = tokio::join!(
        socket::connect(socket, addr, DEFAULT_CONNECT_TIMEOUT),
        listener.accept()
    );
    Ok((ours?, theirs?.0))
}

impl RoutedConnection {
    /// The request context of a routed connection: the source is the pod, the destination
    /// each request's endpoint (filled per request), reported by the source.
    pub(super) fn request_context(
        outbound: &Outbound,
        pod: &PodContext,
        snapshot: &Snapshot,
        service: &Arc<Service>,
        orig: SocketAddr,
    ) -> Arc<RequestContext> {
        let identity = pod.identity.to_string();
        let source = match pod.in_snapshot(snapshot) {
            Some(p) => Peer::of_pod(p, Some(&identity)),
            None => Peer::of_workload(&pod.namespace, &pod.name, Some(&identity)),
        };
        let peers = LinePeers {
            src_workload: Some(pod.workload.clone()),
            src_identity: Some(identity),
            src_addr: None,
            dst_workload: None,
            dst_identity: None,
        };
        Arc::new(RequestContext::new(
            outbound.shared.requests.clone(),
            Direction::Outbound,
            Reporter::Source,
            (source, Peer::unknown(None)),
            SecurityPolicy::MutualTls,
            std::slice::from_ref(service),
            peers,
            orig,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str) -> http::request::Parts {
        let (mut p, ()) = Request::get(uri).body(()).unwrap().into_parts();
        p.headers
            .insert(header::HOST, HeaderValue::from_static("reviews:9080"));
        p
    }

    #[test]
    fn rewrites_replace_the_path_and_the_authority() {
        let mut p = parts("/api/v1/items?x=1");
        rewrite(&mut p, Some("/v2/items?x=1"), Some("ratings:9080"));
        assert_eq!(p.uri.path_and_query().unwrap().as_str(), "/v2/items?x=1");
        assert_eq!(p.headers[header::HOST], "ratings:9080");
        // HTTP/2: the URI carries the authority.
        let (mut p, ()) = Request::get("http://reviews:9080/x")
            .body(())
            .unwrap()
            .into_parts();
        rewrite(&mut p, None, Some("details:9080"));
        assert_eq!(p.uri.to_string(), "http://details:9080/x");
    }

    #[test]
    fn a_failure_is_the_attempt_retry_conditions_read() {
        let policy = RetryPolicy::default();
        assert!(policy.retries(Failure::Connect("refused".into()).attempt()));
        assert!(policy.retries(Failure::RefusedStream.attempt()));
        assert!(!policy.retries(Failure::Reset("reset".into()).attempt()));
    }

    #[test]
    fn a_grpc_abort_is_a_trailers_only_answer() {
        let r = abort_response(Abort::Grpc(14));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(abort_response(Abort::Http(500)).status(), 500);
    }
}
