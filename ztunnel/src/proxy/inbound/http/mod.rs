//! Per-request authorization (L7). A connection to a workload whose policies need HTTP
//! attributes (methods, paths, hosts, headers) is parsed as HTTP/1.1 or HTTP/2 with hyper, and
//! each request is decided on its own with the very same evaluator as connections: allowed
//! requests are forwarded to the application over one upstream connection of the same HTTP
//! version, denied ones are answered `403 RBAC: access denied` without reaching it.
//!
//! What is not HTTP is decided once, as Istio settles HTTP rules for opaque traffic (a DENY
//! rule matches, an ALLOW rule does not). A port declared opaque (`tcp-`, `mysql-`, …; see
//! `Snapshot::declared_protocol`) never comes here: it is decided so when the connection
//! arrives. A port declared HTTP is read as HTTP however long the client takes; only on an
//! undeclared port a client that sends nothing within [`sniff::SNIFF_TIMEOUT`] (a
//! server-speaks-first protocol) is treated as opaque after that wait.
//!
//! * [`sniff`]: HTTP/1.1, HTTP/2 or opaque, from the declaration or the first bytes;
//! * [`jwt`]: RequestAuthentication of each request;
//! * [`ext_authz`]: the CUSTOM provider's answer;
//! * here: the request loop, which decides each request and forwards the allowed ones.
mod ext_authz;
mod jwt;

use std::{future::Future, io, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};
use tracing::warn;

use self::ext_authz::ProviderAnswer;
use super::Inbound;
use crate::{
    authz::{Admission, CustomCheck, HttpRequest, InboundCall, Unknowns},
    metrics::{requests::Peer, Reporter, SecurityPolicy},
    model::{AppProtocol, Pod},
    proxy::{
        http::{
            request_host, set_headers,
            sniff::{sniff, sniff_deadline, Protocol, Replay},
            text_response, Body, Upstream,
        },
        record::{ConnectionRecord, Direction, OpenConnection},
        request::{CountedBody, LinePeers, RecordedBody, RequestContext, RequestRecord},
        PodContext,
    },
    relay::{relay_until, Duplex, Relayed, Tally as _},
    state::Snapshot,
};

/// What goes to the application: the caller's request body, counted.
type Forwarded = CountedBody<Incoming>;

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

impl Inbound {
    /// The request side of a connection to `pod`'s `dst`: Istio's labels of both ends, the
    /// Services that lead there, and the names the access log gives them (`record`'s).
    pub(super) fn request_context(
        &self,
        snapshot: &Snapshot,
        pod: &PodContext,
        dst: SocketAddr,
        src_pod: Option<&Pod>,
        (src_principal, mutual_tls): (Option<&str>, bool),
        record: &ConnectionRecord,
    ) -> Arc<RequestContext> {
        let source = match src_pod {
            Some(p) => Peer::of_pod(p, src_principal),
            None => Peer::unknown(src_principal),
        };
        let identity = pod.identity.to_string();
        let (destination, services) = match pod.in_snapshot(snapshot) {
            Some(p) => (
                Peer::of_pod(p, Some(&identity)),
                snapshot.services_of(p, dst.port()),
            ),
            None => (
                Peer::of_workload(&pod.namespace, &pod.name, Some(&identity)),
                Vec::new(),
            ),
        };
        let security = match mutual_tls {
            true => SecurityPolicy::MutualTls,
            false => SecurityPolicy::None,
        };
        let line = record.line();
        let peers = LinePeers {
            src_workload: line.src_workload.clone(),
            src_identity: line.src_identity.clone(),
            src_addr: line.src_addr.clone(),
            dst_workload: Some(pod.workload.clone()),
            dst_identity: Some(identity),
        };
        Arc::new(RequestContext::new(
            self.shared.requests.clone(),
            Direction::Inbound,
            Reporter::Destination,
            (source, destination),
            security,
            &services,
            peers,
            dst,
        ))
    }

    /// Carries a connection whose requests must be decided one by one, until it ends or
    /// `revoke` yields; each request is recorded by `requests`, the bytes by `tally`.
    /// `declared` is the protocol the destination port is declared to speak (HTTP or nothing).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn serve_per_request<D>(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        call: InboundCall,
        declared: Option<AppProtocol>,
        mut downstream: D,
        upstream: TcpStream,
        requests: Arc<RequestContext>,
        revoke: impl Future<Output = String> + Unpin,
        tally: Arc<OpenConnection>,
    ) -> Relayed
    where
        D: Duplex + AsyncRead + AsyncWrite + Unpin,
    {
        let done = |error: Option<io::Error>, revoked: Option<String>| {
            let (sent, received) = tally.bytes();
            Relayed {
                sent,
                received,
                error,
                revoked,
            }
        };
        let (protocol, prefix) = match sniff(&mut downstream, sniff_deadline(declared)).await {
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
                    tally.sent(prefix.len() as u64);
                    let mut r = relay_until(downstream, upstream, revoke, tally.clone()).await;
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
            tally: tally.clone(),
        };

        let sender = match Upstream::handshake(upstream, protocol == Protocol::Http2).await {
            Ok(sender) => Arc::new(sender),
            Err(e) => return done(Some(io::Error::other(e)), None),
        };
        let proxy = self.clone();
        let serve = crate::proxy::http::serve(downstream, move |req: Request<Incoming>| {
            let (proxy, pod, sender) = (proxy.clone(), pod.clone(), sender.clone());
            let record = requests.start(&req);
            let call = call.clone();
            async move { proxy.decide_request(&pod, call, req, &sender, record).await }
        });
        tokio::select! {
            r = serve => done(r.err().map(io::Error::other), None),
            reason = revoke => done(None, Some(reason)),
        }
    }

    /// One request: authenticated (RequestAuthentication), decided (CUSTOM, DENY, ALLOW),
    /// then forwarded to the application or answered by the proxy; `record` follows it to the
    /// end of its response.
    async fn decide_request(
        &self,
        pod: &PodContext,
        mut call: InboundCall,
        mut req: Request<Incoming>,
        sender: &Upstream<Forwarded>,
        mut record: RequestRecord,
    ) -> Response<RecordedBody<Body>> {
        let snapshot = self.shared.snapshot();
        let auth = match self.authenticate(&snapshot, pod, &mut req).await {
            Ok(auth) => auth,
            Err(reason) => {
                self.shared.metrics.jwt_failures.add(reason.kind.as_str());
                warn!(dst_workload = %pod.workload,
                    src_principal = call.attributes.source_principal.as_deref(),
                    src_ip = call.attributes.source_ip.map(|ip| ip.to_string()).as_deref(),
                    method = %req.method(), path = req.uri().path(), reason = %reason,
                    "authentication failed");
                record.unauthenticated(&reason.to_string());
                let mut r = text_response(StatusCode::UNAUTHORIZED, "Jwt verification fails");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static(
                        "Bearer realm=\"ztunnel\", error=\"invalid_token\"",
                    ),
                );
                return record.respond(r);
            }
        };
        record.authenticated(auth.as_ref().map(|a| a.principal.as_str()));
        let mut custom_response = None;
        let mut attributes = http_attributes(&req);
        attributes.auth = auth;
        call.attributes.http = Some(attributes);
        let mut admission = self.admit(&snapshot, pod, &call, Unknowns::Conservative);
        let mut to_client = Vec::new();
        if let Admission::Custom(check) = &admission {
            match self.ask_provider(&snapshot, check, &req).await {
                ProviderAnswer::Allow {
                    to_app,
                    to_client: headers_to_client,
                } => {
                    set_headers(req.headers_mut(), to_app);
                    to_client = headers_to_client;
                    // The provider allowed: DENY and ALLOW policies decide now.
                    call.attributes.custom_allowed = true;
                    admission = self.admit(&snapshot, pod, &call, Unknowns::Conservative);
                }
                ProviderAnswer::Deny { response, reason } => {
                    let mut d = check.denied.clone();
                    d.reason = format!("{}: {reason}", d.reason);
                    self.record_decision(pod, &call, &d);
                    record.denied_by_provider();
                    admission = Admission::Denied(d);
                    custom_response = Some(response);
                }
            }
        }
        let response = match admission {
            Admission::Allowed(d) => {
                self.record_decision(pod, &call, &d);
                record.decided(&d);
                match sender.send(record.forward(req)).await {
                    Ok(r) => {
                        let mut r = r.map(BodyExt::boxed);
                        set_headers(r.headers_mut(), to_client);
                        r
                    }
                    Err(e) => {
                        record.upstream_failed(&e);
                        text_response(StatusCode::BAD_GATEWAY, "upstream failed\n")
                    }
                }
            }
            Admission::Denied(d)
            | Admission::MtlsRequired(d)
            | Admission::Custom(CustomCheck { denied: d, .. }) => {
                record.decided(&d);
                match custom_response.take() {
                    // Recorded above, with the provider's reason.
                    Some(r) => r,
                    None => {
                        self.record_decision(pod, &call, &d);
                        text_response(StatusCode::FORBIDDEN, "RBAC: access denied")
                    }
                }
            }
            Admission::PerRequest => unreachable!("conservative decisions are final"),
        };
        record.respond(response)
    }
}
