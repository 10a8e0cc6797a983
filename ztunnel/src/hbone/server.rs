//! The HBONE server side: the mTLS handshake as the destination workload ([`accept`]), then
//! HTTP/2 over it, one CONNECT stream per tunnelled TCP connection ([`serve`]). What to do with
//! a tunnel is the caller's decision (a handler).
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use http::{Method, Request, Response, StatusCode};
use rustls::pki_types::CertificateDer;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::server::TlsStream;
use tracing::debug;

use super::{
    stream::{
        h2_io, StreamIo, CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, MAX_FRAME_SIZE, STREAM_WINDOW,
    },
    Authenticated,
};
use crate::{
    identity::{trust::TlsError, BoxFuture, CertError, CertificateCache, SpiffeId},
    relay::reset,
    tls,
};

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
    #[error("the TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
    #[error("{0}")]
    Identity(TlsError),
}

impl AcceptError {
    /// A short, stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            AcceptError::NoCertificate(_) => "no_certificate",
            AcceptError::Handshake { reason, .. } => reason,
            AcceptError::Timeout => "handshake_timeout",
            AcceptError::Identity(_) => "bad_san",
        }
    }
}

/// The mTLS handshake of a connection to a pod running as `identity`: presents its
/// certificate, requires one from the client and returns the client's verified SPIFFE id.
pub async fn accept(
    tcp: TcpStream,
    certs: &CertificateCache,
    identity: &SpiffeId,
    roots: &[CertificateDer<'static>],
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
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => {
            return Err(AcceptError::Handshake {
                reason: tls::classify_io(&source),
                source,
            })
        }
        Err(_) => return Err(AcceptError::Timeout),
    };
    let peer = tls::peer_identity(stream.get_ref().1).map_err(AcceptError::Identity)?;
    Ok(Authenticated { peer, stream })
}

/// Streams one peer may have open at once on one connection.
const MAX_CONCURRENT_STREAMS: u32 = 1_000;

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

/// Serves HTTP/2 on `io` until the peer goes away, handing each valid CONNECT to `handler`.
/// `refused` is called (with the status and reason) for requests that are not valid tunnels.
pub async fn serve<S>(
    io: S,
    handler: Handler,
    refused: impl Fn(StatusCode, &str) + Send + Sync + 'static,
) -> Result<(), h2::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .handshake::<_, Bytes>(io)
        .await?;
    while let Some(next) = conn.accept().await {
        let (req, mut respond) = next?;
        match parse(&req) {
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
        }
    }
    Ok(())
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
            let _ = serve(io, handler, move |status, reason| {
                seen.lock().unwrap().push((status, reason.to_owned()))
            })
            .await;
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
