//! The HBONE server side: the mTLS handshake as the destination workload ([`accept`]), then
//! HTTP/2 over it, one CONNECT stream per tunnelled TCP connection ([`serve`]). What to do with
//! a tunnel is the caller's decision (a handler).
//!
//! A connection's state is bounded from the TCP accept on ([`ServerLimits`]): how many may be
//! waiting for their first request ([`Pending`]), by when that request must have come (TLS,
//! ALPN `h2`, preface, SETTINGS and the request head), how long it may stay without streams,
//! and that its peer answers PINGs.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use http::{Method, Request, Response, StatusCode};
use rustls::pki_types::CertificateDer;
use tokio::time::Instant;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::server::TlsStream;
use tracing::debug;

use super::{
    keepalive,
    limits::{ServerLimits, CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW},
    stream::{h2_io, StreamIo},
    Authenticated,
};
use crate::{
    identity::{trust::TlsError, BoxFuture, CertError, CertificateCache, SpiffeId},
    metrics::HboneClosing,
    relay::reset,
    tls,
};

/// Connections accepted that have not made their first CONNECT yet, per source address and in
/// all: each costs a TLS session (about 35 KiB) before it has proven it wants a tunnel.
#[derive(Debug, Default)]
pub struct Pending {
    state: Mutex<PendingCounts>,
}

#[derive(Debug, Default)]
struct PendingCounts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// One pending connection's place; given back when dropped (its first CONNECT came, or it
/// ended).
#[derive(Debug)]
pub struct PendingGuard {
    pending: Arc<Pending>,
    source: IpAddr,
}

/// Why a connection was not let in at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingFull {
    /// Its source address has `max_pending_per_source` pending already.
    Source(usize),
    /// The proxy has `max_pending` pending already.
    Total(usize),
}

impl std::fmt::Display for PendingFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PendingFull::Source(n) => write!(
                f,
                "{n} connections from this address are already waiting for their first request"
            ),
            PendingFull::Total(n) => write!(
                f,
                "{n} connections are already waiting for their first request"
            ),
        }
    }
}

impl Pending {
    /// A place for a new connection from `source`, if both bounds allow it.
    pub fn admit(
        self: &Arc<Self>,
        source: IpAddr,
        limits: &ServerLimits,
    ) -> Result<PendingGuard, PendingFull> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.total >= limits.max_pending {
            return Err(PendingFull::Total(s.total));
        }
        let from = s.by_source.entry(source).or_default();
        if *from >= limits.max_pending_per_source {
            return Err(PendingFull::Source(*from));
        }
        *from += 1;
        s.total += 1;
        Ok(PendingGuard {
            pending: self.clone(),
            source,
        })
    }

    /// Connections pending now.
    pub fn count(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut s = self.pending.state.lock().unwrap_or_else(|p| p.into_inner());
        s.total -= 1;
        if let Some(n) = s.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                s.by_source.remove(&self.source);
            }
        }
    }
}

/// Why an HBONE connection was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("{0}")]
    NoCertificate(CertError),
    /// `reason` is the metric label ([`tls::classify`]).
    #[error("{source}")]
    Handshake {
        reason: &'static str,
        source: std::io::Error,
    },
    #[error("the TLS handshake did not finish by the first-request deadline")]
    Timeout,
    #[error("{0}")]
    Identity(TlsError),
    /// The client negotiated no ALPN protocol (rustls refuses one that offers only others).
    #[error("the client offered no ALPN protocol; HBONE requires h2")]
    NoAlpn,
}

impl AcceptError {
    /// A short, stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            AcceptError::NoCertificate(_) => "no_certificate",
            AcceptError::Handshake { reason, .. } => reason,
            AcceptError::Timeout => "handshake_timeout",
            AcceptError::Identity(_) => "bad_san",
            AcceptError::NoAlpn => "no_alpn",
        }
    }
}

/// The mTLS handshake of a connection to a pod running as `identity`, finished by `deadline`:
/// presents its certificate, requires one from the client and ALPN `h2`, and returns the
/// client's verified SPIFFE id.
pub async fn accept(
    tcp: TcpStream,
    certs: &CertificateCache,
    identity: &SpiffeId,
    roots: &[CertificateDer<'static>],
    deadline: Instant,
) -> Result<Authenticated<TlsStream<TcpStream>>, AcceptError> {
    let cert = match certs.get(identity).await {
        Ok(c) => c,
        Err(e) => {
            reset(tcp);
            return Err(AcceptError::NoCertificate(e));
        }
    };
    let config = tls::server_config(&cert, roots);
    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    let stream = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => {
            return Err(AcceptError::Handshake {
                reason: tls::classify_io(&source),
                source,
            })
        }
        Err(_) => return Err(AcceptError::Timeout),
    };
    if stream.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
        return Err(AcceptError::NoAlpn);
    }
    let peer = tls::peer_identity(stream.get_ref().1).map_err(AcceptError::Identity)?;
    Ok(Authenticated { peer, stream })
}

/// A CONNECT request, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The `ip:port` the tunnel is for (the request's authority).
    pub target: SocketAddr,
    /// The original client's address, from `Forwarded: for=…`, when present and well formed.
    pub forwarded_for: Option<IpAddr>,
    pub baggage: Option<String>,
}

/// A tunnel the handler accepts or refuses; dropping it without answering resets the stream.
pub struct Tunnel {
    respond: SendResponse<Bytes>,
    recv: RecvStream,
}

impl Tunnel {
    /// Answers 200 and returns the stream.
    pub fn accept(mut self) -> std::io::Result<StreamIo> {
        let send = self
            .respond
            .send_response(Response::new(()), false)
            .map_err(h2_io)?;
        Ok(StreamIo::new(send, self.recv))
    }

    /// Answers `status` and ends the stream.
    pub fn refuse(mut self, status: StatusCode) {
        let mut response = Response::new(());
        *response.status_mut() = status;
        let _ = self.respond.send_response(response, true);
    }
}

pub type Handler = Arc<dyn Fn(ConnectRequest, Tunnel) -> BoxFuture<'static, ()> + Send + Sync>;

/// Why a request is not a tunnel we can serve.
fn parse(req: &Request<RecvStream>) -> Result<ConnectRequest, (StatusCode, String)> {
    if req.method() != Method::CONNECT {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {} is not CONNECT", req.method()),
        ));
    }
    let authority = req.uri().authority().map(|a| a.as_str()).ok_or((
        StatusCode::BAD_REQUEST,
        "CONNECT without an authority".to_owned(),
    ))?;
    let target: SocketAddr = authority.parse().map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            format!("authority {authority:?} is not an ip:port"),
        )
    })?;
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let forwarded_for = header("forwarded").and_then(|f| forwarded_for(&f));
    Ok(ConnectRequest {
        target,
        forwarded_for,
        baggage: header("baggage"),
    })
}

/// The address in a `Forwarded: for=…` header. RFC 7239 allows a port after the address
/// (IPv6 then bracketed, and quoted either way): Istio's ztunnel sends `for="10.1.0.2:40512"`.
fn forwarded_for(value: &str) -> Option<IpAddr> {
    let node = value
        .split([';', ','])
        .find_map(|kv| kv.trim().strip_prefix("for="))?
        .trim_matches('"');
    node.parse::<IpAddr>()
        .ok()
        .or_else(|| node.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            node.strip_prefix('[')
                .and_then(|n| n.strip_suffix(']'))
                .and_then(|n| n.parse().ok())
        })
}

/// How a served connection ended.
#[derive(Debug)]
pub struct Ended {
    pub reason: HboneClosing,
    pub error: Option<h2::Error>,
}

impl Ended {
    fn because(reason: HboneClosing) -> Self {
        Self {
            reason,
            error: None,
        }
    }

    /// An h2 error: the peer's going away or I/O, else a protocol error (too many early resets
    /// among them: h2 answers those with GOAWAY ENHANCE_YOUR_CALM).
    fn failed(e: h2::Error) -> Self {
        let reason = match (e.is_io(), e.is_go_away() && e.is_remote()) {
            (true, _) | (_, true) => HboneClosing::PeerClosed,
            _ => HboneClosing::ProtocolError,
        };
        Self {
            reason,
            error: Some(e),
        }
    }
}

/// Serves HTTP/2 on `io` until the peer goes away or a limit closes it, handing each valid
/// CONNECT to `handler`. `refused` is called (with the status and reason) for requests that
/// are not valid tunnels. The first request must arrive by `first_request_by`; `pending` (the
/// connection's place among those waiting for one) is given back when it does.
pub async fn serve<S>(
    io: S,
    handler: Handler,
    refused: impl Fn(StatusCode, &str) + Send + Sync + 'static,
    limits: ServerLimits,
    first_request_by: Instant,
    pending: Option<PendingGuard>,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size)
        .max_pending_accept_reset_streams(limits.max_pending_accept_reset_streams)
        .handshake::<_, Bytes>(io);
    let first = async {
        let mut conn = handshake.await?;
        let next = conn.accept().await;
        Ok::<_, h2::Error>((conn, next))
    };
    let (mut conn, mut next) = match tokio::time::timeout_at(first_request_by, first).await {
        Err(_) => return Ended::because(HboneClosing::NoRequest),
        Ok(Err(e)) => return Ended::failed(e),
        Ok(Ok(first)) => first,
    };
    drop(pending);
    let keepalive = keepalive::unanswered(
        conn.ping_pong().expect("taken once, here"),
        limits.keepalive,
    );
    tokio::pin!(keepalive);
    let mut idle_check = tokio::time::interval(idle_check_period(limits.idle_timeout));
    let mut busy_at = Instant::now();
    loop {
        match next {
            None => return Ended::because(HboneClosing::PeerClosed),
            Some(Err(e)) => return Ended::failed(e),
            Some(Ok((req, mut respond))) => match parse(&req) {
                Ok(connect) => {
                    let tunnel = Tunnel {
                        respond,
                        recv: req.into_body(),
                    };
                    tokio::spawn(handler(connect, tunnel));
                }
                Err((status, reason)) => {
                    debug!(%status, reason, "HBONE request refused");
                    refused(status, &reason);
                    let mut response = Response::new(());
                    *response.status_mut() = status;
                    let _ = respond.send_response(response, true);
                }
            },
        }
        next = loop {
            tokio::select! {
                n = conn.accept() => break n,
                // Dropping the connection fails its streams: their relays reset both ends.
                () = &mut keepalive => return Ended::because(HboneClosing::KeepaliveTimeout),
                _ = idle_check.tick() => {
                    if conn.has_streams() {
                        busy_at = Instant::now();
                    } else if busy_at.elapsed() >= limits.idle_timeout {
                        // GOAWAY, then let h2 finish the exchange (bounded: a peer that does
                        // not answer its PING is dead anyway).
                        conn.graceful_shutdown();
                        let drain = async { while conn.accept().await.is_some() {} };
                        let _ = tokio::time::timeout(limits.keepalive.timeout, drain).await;
                        return Ended::because(HboneClosing::Idle);
                    }
                }
            }
        };
    }
}

/// How often a connection checks whether it has been idle too long: the timeout's resolution.
fn idle_check_period(idle_timeout: Duration) -> Duration {
    (idle_timeout / 8).clamp(Duration::from_millis(50), Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// Sends one request head over a real HTTP/2 connection and returns the status.
    async fn status_of(request: Request<()>) -> (StatusCode, Vec<(StatusCode, String)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let seen = refusals.clone();
        tokio::spawn(async move {
            let (io, _) = listener.accept().await.unwrap();
            let handler: Handler = Arc::new(|_, tunnel| {
                Box::pin(async move {
                    let _ = tunnel.accept();
                })
            });
            let limits = ServerLimits::default();
            let deadline = Instant::now() + limits.first_request_timeout;
            let refused = move |status: StatusCode, reason: &str| {
                seen.lock().unwrap().push((status, reason.to_owned()))
            };
            serve(io, handler, refused, limits, deadline, None).await;
        });
        let io = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let mut send = send.ready().await.unwrap();
        let (response, _stream) = send.send_request(request, false).unwrap();
        let status = response.await.unwrap().status();
        let refusals = refusals.lock().unwrap().clone();
        (status, refusals)
    }

    #[tokio::test]
    async fn only_connect_to_an_ip_and_port_opens_a_tunnel() {
        let connect = |authority: &str| {
            Request::builder()
                .method(Method::CONNECT)
                .uri(authority)
                .body(())
                .unwrap()
        };
        let (ok, none) = status_of(connect("10.1.0.2:8080")).await;
        assert_eq!((ok, none.len()), (StatusCode::OK, 0));

        let get = Request::builder()
            .method(Method::GET)
            .uri("https://10.1.0.2:8080/")
            .body(())
            .unwrap();
        let (status, refusals) = status_of(get).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(refusals[0].1.contains("not CONNECT"), "{refusals:?}");

        let (status, refusals) = status_of(connect("web.shop.svc:8080")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(refusals[0].1.contains("not an ip:port"), "{refusals:?}");
    }

    #[test]
    fn forwarded_for_accepts_quoted_and_bracketed_addresses() {
        for (value, want) in [
            ("for=10.1.0.2", Some("10.1.0.2")),
            ("for=\"[fd00::2]\"", Some("fd00::2")),
            // With a port, as Istio's ztunnel sends it.
            ("for=\"10.2.0.2:40512\"", Some("10.2.0.2")),
            ("for=\"[fd00::2]:40512\";host=web.shop.svc", Some("fd00::2")),
            ("proto=https; for=10.1.0.2", Some("10.1.0.2")),
            ("for=unknown", None),
            ("by=10.0.0.1", None),
        ] {
            assert_eq!(
                forwarded_for(value),
                want.map(|w| w.parse().unwrap()),
                "{value}"
            );
        }
    }
}
