//! Per-request authorization (L7). A connection to a workload whose policies need HTTP
//! attributes (methods, paths, hosts, headers) is parsed as HTTP/1.1 or HTTP/2 with hyper, and
//! each request is decided on its own with the very same evaluator as connections: allowed
//! requests are forwarded to the application over one upstream connection of the same HTTP
//! version, denied ones are answered `403 RBAC: access denied` without reaching it.
//!
//! What is not HTTP is decided once, as Istio settles HTTP rules for opaque traffic (a DENY
//! rule matches, an ALLOW rule does not). A client that sends nothing within
//! [`SNIFF_TIMEOUT`] (a server-speaks-first protocol) is treated as opaque too.
use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
};
use tracing::{info, warn};

use super::Inbound;
use crate::{
    authz::{Admission, CustomCheck, HttpRequest, InboundCall, Unknowns},
    proxy::PodContext,
    relay::{relay_until, Duplex, Relayed},
};

/// How long to wait for a client's first bytes before treating the connection as opaque.
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(1);
/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    Opaque,
}

/// What the first bytes say, or `None` if more bytes are needed to tell.
fn classify(b: &[u8]) -> Option<Protocol> {
    let preface = &H2_PREFACE[..b.len().min(H2_PREFACE.len())];
    if b.len() >= H2_PREFACE.len() && b.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if b.len() < H2_PREFACE.len() && b == preface {
        return None;
    }
    // HTTP/1: a method token (upper-case letters, at most 7: OPTIONS, CONNECT) and a space.
    let token = b.iter().take_while(|c| c.is_ascii_uppercase()).count();
    match b.get(token) {
        Some(b' ') if (3..=7).contains(&token) => Some(Protocol::Http1),
        None if token == b.len() && token < 8 => None,
        _ => Some(Protocol::Opaque),
    }
}

/// Reads the client's first bytes to tell HTTP from anything else; they are replayed.
async fn sniff<D: AsyncRead + Unpin>(io: &mut D) -> io::Result<(Protocol, Vec<u8>)> {
    let mut buf = Vec::with_capacity(64);
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    loop {
        let mut chunk = [0u8; 64];
        let n = match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Ok(r) => r?,
            Err(_) => return Ok((Protocol::Opaque, buf)),
        };
        if n == 0 {
            return Ok((Protocol::Opaque, buf));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = classify(&buf) {
            return Ok((p, buf));
        }
    }
}

/// `inner` with `prefix` read first, counting the bytes each way.
struct Replay<D> {
    prefix: Bytes,
    inner: D,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<D: AsyncRead + Unpin> AsyncRead for Replay<D> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            self.read.fetch_add(n as u64, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<D: AsyncWrite + Unpin> AsyncWrite for Replay<D> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

/// The upstream connection to the application, in the client's HTTP version.
enum Upstream {
    /// HTTP/1.1 carries one request at a time; the server side is sequential too.
    H1(tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Incoming>>),
    H2(hyper::client::conn::http2::SendRequest<Incoming>),
}

impl Upstream {
    async fn send(&self, req: Request<Incoming>) -> hyper::Result<Response<Incoming>> {
        match self {
            Upstream::H1(s) => {
                let mut s = s.lock().await;
                s.ready().await?;
                s.send_request(req).await
            }
            Upstream::H2(s) => s.clone().send_request(req).await,
        }
    }
}

fn text_response(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// The request's host: HTTP/2's `:authority`, or HTTP/1.1's `Host`.
fn request_host(req: &Request<Incoming>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// The HTTP attributes policies see.
fn http_attributes(req: &Request<Incoming>) -> HttpRequest {
    let mut headers: Vec<(String, String)> = Vec::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes());
        match headers.iter_mut().find(|(n, _)| n == name.as_str()) {
            Some((_, v)) => {
                v.push(',');
                v.push_str(&value);
            }
            None => headers.push((name.as_str().to_owned(), value.into_owned())),
        }
    }
    let host = request_host(req);
    HttpRequest {
        method: req.method().as_str().to_owned(),
        path: req.uri().path().to_owned(),
        host,
        headers,
        auth: None,
    }
}

/// A short label for the failure counter.
fn jwt_failure_kind(reason: &str) -> &'static str {
    if reason.contains("expired") || reason.contains("ExpiredSignature") {
        "expired"
    } else if reason.contains("ImmatureSignature") {
        "not_yet_valid"
    } else if reason.contains("InvalidAudience") {
        "audience"
    } else if reason.contains("not configured") {
        "unknown_issuer"
    } else if reason.contains("not available") {
        "jwks_unavailable"
    } else if reason.contains("InvalidSignature") {
        "signature"
    } else {
        "invalid"
    }
}

type Headers = Vec<(header::HeaderName, header::HeaderValue)>;

/// Sets (replacing) each header.
fn set_headers(h: &mut http::HeaderMap, headers: Headers) {
    for (name, value) in headers {
        h.insert(name, value);
    }
}

/// Copies the headers named in `names` from `from`.
fn pick(from: &http::HeaderMap, names: &[String]) -> Headers {
    from.iter()
        .filter(|(n, _)| names.iter().any(|x| x == n.as_str()))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

/// What a CUSTOM provider said.
enum ProviderAnswer {
    /// Go on, adding these headers to the request and to its response.
    Allow { to_app: Headers, to_client: Headers },
    /// Answer the client with `response` instead.
    Deny {
        response: Response<Body>,
        reason: String,
    },
}

/// The largest body taken from an ext-authz denial.
const MAX_PROVIDER_BODY: usize = 64 * 1024;

impl Inbound {
    /// Asks the CUSTOM policy's provider about `req` (Envoy's HTTP ext_authz). `Ok` carries the
    /// headers to add to the request and to the response when it allows; `Err` the response to
    /// send instead, and why.
    async fn ask_provider(
        &self,
        snapshot: &crate::state::Snapshot,
        check: &CustomCheck,
        req: &Request<Incoming>,
    ) -> ProviderAnswer {
        use crate::authz::ext_authz::{provider_host, ProviderHost};
        let Some(p) = snapshot.mesh_config.http_providers.get(&check.provider) else {
            self.shared.metrics.ext_authz_checks.add("unknown_provider");
            let reason = format!(
                "extension provider {:?} is not an envoyExtAuthzHttp provider of the mesh configuration",
                check.provider
            );
            let response = text_response(StatusCode::FORBIDDEN, "RBAC: access denied");
            return ProviderAnswer::Deny { response, reason };
        };
        let on_error = |reason: String| {
            if p.fail_open {
                self.shared.metrics.ext_authz_checks.add("error_fail_open");
                info!(provider = %p.name, reason = %reason, "ext_authz check failed; failOpen allows");
                ProviderAnswer::Allow {
                    to_app: Vec::new(),
                    to_client: Vec::new(),
                }
            } else {
                self.shared.metrics.ext_authz_checks.add("error");
                let status =
                    StatusCode::from_u16(p.status_on_error).unwrap_or(StatusCode::FORBIDDEN);
                let response = text_response(status, "ext_authz check failed");
                ProviderAnswer::Deny { response, reason }
            }
        };
        let addr = match provider_host(&p.service) {
            Ok(ProviderHost::Ip(ip)) => std::net::SocketAddr::new(ip, p.port),
            Ok(ProviderHost::Service { namespace, name }) => {
                let endpoint = snapshot
                    .services
                    .get(&(namespace.clone(), name.clone()))
                    .and_then(|svc| {
                        let mut eps = snapshot.endpoints(svc, p.port);
                        (!eps.is_empty()).then(|| eps.swap_remove(0))
                    });
                match endpoint {
                    Some(e) => e.addr,
                    None => {
                        return on_error(format!(
                            "provider service {namespace}/{name} has no endpoint for port {}",
                            p.port
                        ))
                    }
                }
            }
            Err(e) => return on_error(e),
        };
        let path = req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        let mut check_req = Request::builder()
            .method(req.method().clone())
            .uri(format!("{}{path}", p.path_prefix));
        check_req = check_req.header(header::HOST, request_host(req));
        for (n, v) in pick(req.headers(), &p.include_request_headers) {
            if n != header::HOST {
                check_req = check_req.header(n, v);
            }
        }
        for (n, v) in &p.additional_headers {
            check_req = check_req.header(n.as_str(), v.as_str());
        }
        let check_req = match check_req.body(http_body_util::Empty::<Bytes>::new()) {
            Ok(r) => r,
            Err(e) => return on_error(format!("building the check request: {e}")),
        };
        let exchange = async {
            let socket = crate::socket::marked(addr)?;
            let tcp = tokio::net::TcpSocket::from_std_stream(socket.into())
                .connect(addr)
                .await?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(io::Error::other)?;
            tokio::spawn(conn);
            let resp = sender
                .send_request(check_req)
                .await
                .map_err(io::Error::other)?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, MAX_PROVIDER_BODY)
                .collect()
                .await
                .map_err(io::Error::other)?
                .to_bytes();
            Ok::<_, io::Error>((parts, body))
        };
        let (parts, body) = match tokio::time::timeout(p.timeout, exchange).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return on_error(format!("provider {addr}: {e}")),
            Err(_) => {
                return on_error(format!("provider {addr} did not answer in {:?}", p.timeout))
            }
        };
        if parts.status.is_success() {
            self.shared.metrics.ext_authz_checks.add("allowed");
            return ProviderAnswer::Allow {
                to_app: pick(&parts.headers, &p.headers_to_upstream_on_allow),
                to_client: pick(&parts.headers, &p.headers_to_downstream_on_allow),
            };
        }
        self.shared.metrics.ext_authz_checks.add("denied");
        let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
        *response.status_mut() = parts.status;
        set_headers(
            response.headers_mut(),
            pick(&parts.headers, &p.headers_to_downstream_on_deny),
        );
        ProviderAnswer::Deny {
            response,
            reason: format!("provider answered {}", parts.status),
        }
    }

    /// Checks the request's JWT against the RequestAuthentications of `pod`: `Ok(None)` without
    /// a token (or without any RequestAuthentication), `Ok(Some)` for a valid one (the request's
    /// headers edited as the rule says), `Err` for a token that must be refused with 401.
    async fn authenticate(
        &self,
        snapshot: &crate::state::Snapshot,
        pod: &PodContext,
        req: &mut Request<Incoming>,
    ) -> Result<Option<crate::authz::RequestAuth>, String> {
        use crate::authz::request_authentication::{authenticate, JwtOutcome, Keys, TokenSource};
        let Some(p) = pod.in_snapshot(snapshot) else {
            return Ok(None);
        };
        let rules: Vec<_> = snapshot
            .request_authentications_for(p)
            .into_iter()
            .flat_map(|ra| &ra.rules)
            .collect();
        if rules.is_empty() {
            return Ok(None);
        }
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let source = TokenSource {
            headers: &headers,
            query: req.uri().query(),
        };
        let mut outcome = JwtOutcome::NoToken;
        // A second round refetches key sets, for a token signed with a key that rotated in.
        for refresh in [false, true] {
            let mut fetched = std::collections::HashMap::new();
            for rule in &rules {
                if let Keys::Uri(uri) = &rule.keys {
                    if !fetched.contains_key(uri) {
                        fetched.insert(uri.clone(), self.jwks.get(uri, refresh).await);
                    }
                }
            }
            outcome = authenticate(&rules, &source, |rule| match &rule.keys {
                Keys::Inline(set) => Some(set.clone()),
                Keys::Uri(uri) => fetched.get(uri).cloned().flatten(),
            });
            let retry = matches!(&outcome, JwtOutcome::Invalid(r) if r.contains("no key for kid"))
                && rules.iter().any(|r| matches!(r.keys, Keys::Uri(_)));
            if !retry {
                break;
            }
        }
        match outcome {
            JwtOutcome::NoToken => Ok(None),
            JwtOutcome::Invalid(reason) => Err(reason),
            JwtOutcome::Valid(auth, edits) => {
                let h = req.headers_mut();
                for name in &edits.remove {
                    h.remove(name.as_str());
                }
                for (name, value) in &edits.set {
                    if let (Ok(n), Ok(v)) = (
                        header::HeaderName::from_bytes(name.as_bytes()),
                        header::HeaderValue::from_str(value),
                    ) {
                        h.insert(n, v);
                    }
                }
                Ok(Some(auth))
            }
        }
    }

    /// Carries a connection whose requests must be decided one by one, until it ends or
    /// `revoke` yields. `upstream` is the application's socket.
    pub(super) async fn serve_per_request<D>(
        self: &Arc<Self>,
        pod: Arc<PodContext>,
        call: InboundCall,
        mut downstream: D,
        upstream: TcpStream,
        revoke: impl Future<Output = String>,
    ) -> Relayed
    where
        D: Duplex + AsyncRead + AsyncWrite + Unpin,
    {
        let (read, written) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let done = |error: Option<io::Error>, revoked: Option<String>| Relayed {
            sent: read.load(Ordering::Relaxed),
            received: written.load(Ordering::Relaxed),
            error,
            revoked,
        };
        let (protocol, prefix) = match sniff(&mut downstream).await {
            Ok(x) => x,
            Err(e) => return done(Some(e), None),
        };
        if protocol == Protocol::Opaque {
            let snapshot = self.shared.snapshot();
            let mut upstream = upstream;
            return match self.admit(&snapshot, &pod, &call, Unknowns::Conservative) {
                Admission::Allowed(d) => {
                    self.record_decision(&pod, &call, &d);
                    // What was read to sniff goes first, then the engine carries the rest.
                    if let Err(e) = upstream.write_all(&prefix).await {
                        return done(Some(e), None);
                    }
                    let mut r = relay_until(downstream, upstream, revoke).await;
                    r.sent += prefix.len() as u64;
                    r
                }
                Admission::Denied(d)
                | Admission::MtlsRequired(d)
                | Admission::Custom(CustomCheck { denied: d, .. }) => {
                    self.record_decision(&pod, &call, &d);
                    let reason = format!("traffic is not HTTP: {}", d.reason);
                    done(
                        Some(io::Error::new(io::ErrorKind::PermissionDenied, reason)),
                        None,
                    )
                }
                Admission::PerRequest => unreachable!("conservative decisions are final"),
            };
        }
        let downstream = Replay {
            prefix: Bytes::from(prefix),
            inner: downstream,
            read: read.clone(),
            written: written.clone(),
        };

        let io = TokioIo::new(upstream);
        let sender = if protocol == Protocol::Http2 {
            match hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await {
                Ok((sender, conn)) => {
                    tokio::spawn(conn);
                    Upstream::H2(sender)
                }
                Err(e) => return done(Some(io::Error::other(e)), None),
            }
        } else {
            match hyper::client::conn::http1::handshake(io).await {
                Ok((sender, conn)) => {
                    tokio::spawn(conn);
                    Upstream::H1(tokio::sync::Mutex::new(sender))
                }
                Err(e) => return done(Some(io::Error::other(e)), None),
            }
        };
        let sender = Arc::new(sender);
        let proxy = self.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (proxy, pod, sender) = (proxy.clone(), pod.clone(), sender.clone());
            let mut call = call.clone();
            async move {
                let start = Instant::now();
                let snapshot = proxy.shared.snapshot();
                let mut req = req;
                let auth = match proxy.authenticate(&snapshot, &pod, &mut req).await {
                    Ok(auth) => auth,
                    Err(reason) => {
                        proxy
                            .shared
                            .metrics
                            .jwt_failures
                            .add(jwt_failure_kind(&reason));
                        warn!(dst_workload = %pod.workload,
                            src_principal = call.attributes.source_principal.as_deref(),
                            src_ip = call.attributes.source_ip.map(|ip| ip.to_string()).as_deref(),
                            method = %req.method(), path = req.uri().path(), reason = %reason,
                            "authentication failed");
                        info!(direction = "inbound", dst_workload = %pod.workload,
                            src_principal = call.attributes.source_principal.as_deref(),
                            method = %req.method(), path = req.uri().path(), status = 401,
                            error = %reason, duration_ms = start.elapsed().as_millis() as u64,
                            "http request");
                        let mut r =
                            text_response(StatusCode::UNAUTHORIZED, "Jwt verification fails");
                        r.headers_mut().insert(
                            header::WWW_AUTHENTICATE,
                            header::HeaderValue::from_static(
                                "Bearer realm=\"ztunnel\", error=\"invalid_token\"",
                            ),
                        );
                        return Ok(r);
                    }
                };
                let mut custom_response = None;
                let mut attributes = http_attributes(&req);
                attributes.auth = auth;
                call.attributes.http = Some(attributes);
                let mut admission = proxy.admit(&snapshot, &pod, &call, Unknowns::Conservative);
                let mut to_client = Vec::new();
                if let Admission::Custom(check) = &admission {
                    match proxy.ask_provider(&snapshot, check, &req).await {
                        ProviderAnswer::Allow {
                            to_app,
                            to_client: headers_to_client,
                        } => {
                            set_headers(req.headers_mut(), to_app);
                            to_client = headers_to_client;
                            // The provider allowed: DENY and ALLOW policies decide now.
                            call.attributes.custom_allowed = true;
                            admission = proxy.admit(&snapshot, &pod, &call, Unknowns::Conservative);
                        }
                        ProviderAnswer::Deny { response, reason } => {
                            let mut d = check.denied.clone();
                            d.reason = format!("{}: {reason}", d.reason);
                            proxy.record_decision(&pod, &call, &d);
                            admission = Admission::Denied(d);
                            custom_response = Some(response);
                        }
                    }
                }
                let (response, decision) = match admission {
                    Admission::Allowed(d) => {
                        proxy.record_decision(&pod, &call, &d);
                        let response = match sender.send(req).await {
                            Ok(r) => {
                                let mut r = r.map(BodyExt::boxed);
                                set_headers(r.headers_mut(), to_client);
                                r
                            }
                            Err(e) => {
                                info!(dst_workload = %pod.workload, error = %e,
                                        "forwarding a request to the application failed");
                                text_response(StatusCode::BAD_GATEWAY, "upstream failed\n")
                            }
                        };
                        (response, d)
                    }
                    Admission::Denied(d)
                    | Admission::MtlsRequired(d)
                    | Admission::Custom(CustomCheck { denied: d, .. }) => {
                        let response = match custom_response.take() {
                            // Recorded above, with the provider's reason.
                            Some(r) => r,
                            None => {
                                proxy.record_decision(&pod, &call, &d);
                                text_response(StatusCode::FORBIDDEN, "RBAC: access denied")
                            }
                        };
                        (response, d)
                    }
                    Admission::PerRequest => unreachable!("conservative decisions are final"),
                };
                let http = call.attributes.http.as_ref();
                info!(direction = "inbound", dst_workload = %pod.workload,
                    src_principal = call.attributes.source_principal.as_deref(),
                    src_ip = call.attributes.source_ip.map(|ip| ip.to_string()).as_deref(),
                    src_request_principal = http.and_then(|h| h.auth.as_ref()).map(|a| a.principal.as_str()),
                    method = http.map(|h| h.method.as_str()), path = http.map(|h| h.path.as_str()),
                    host = http.map(|h| h.host.as_str()), status = response.status().as_u16(),
                    authz_policy = decision.policy.as_deref(), authz_rule = decision.rule,
                    audit = decision.audit.is_some(),
                    duration_ms = start.elapsed().as_millis() as u64, "http request");
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        // The tunnel or socket below already has its own windows; defaults suffice here.
        builder.http1().keep_alive(true);
        let serve = builder.serve_connection(TokioIo::new(downstream), service);
        tokio::select! {
            r = serve => done(r.err().map(io::Error::other), None),
            reason = revoke => done(None, Some(reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_http_versions_from_anything_else() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"OPTIONS *"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Protocol::Http2)
        );
        assert_eq!(classify(b"PRI * HTTP/2"), None, "a prefix of the preface");
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Protocol::Opaque), "TLS");
        assert_eq!(classify(b"hello"), Some(Protocol::Opaque));
        assert_eq!(
            classify(b"ABCDEFGHI"),
            Some(Protocol::Opaque),
            "too long a method"
        );
        assert_eq!(classify(b"GET/"), Some(Protocol::Opaque));
    }
}
