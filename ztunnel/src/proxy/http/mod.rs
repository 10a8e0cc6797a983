//! What both directions need to carry HTTP request by request: telling HTTP from anything else
//! ([`sniff`]), serving the caller's connection with hyper, the upstream connection a request
//! is sent on ([`Upstream`]), and the proxy's own answers. The inbound side decides each
//! request (L7 authorization); the outbound side routes it (VirtualService, DestinationRule).
pub mod sniff;

use std::future::Future;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body as HttpBody, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use super::request::RecordedBody;

/// A response body as the proxy hands it back: the application's, or one of its own.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// An upstream HTTP connection, in the version the caller spoke.
pub enum Upstream<B> {
    /// HTTP/1.1 carries one request at a time: requests wait their turn.
    H1(tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<B>>),
    H2(hyper::client::conn::http2::SendRequest<B>),
}

impl<B> Upstream<B>
where
    B: HttpBody + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Handshakes on `io` in the caller's version; the connection runs on its own task until
    /// the sender and every response are gone.
    pub async fn handshake<I>(io: I, http2: bool) -> hyper::Result<Self>
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let io = TokioIo::new(io);
        Ok(if http2 {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Upstream::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Upstream::H1(tokio::sync::Mutex::new(sender))
        })
    }

    pub async fn send(&self, req: Request<B>) -> hyper::Result<Response<Incoming>> {
        match self {
            Upstream::H1(s) => {
                let mut s = s.lock().await;
                s.ready().await?;
                s.send_request(req).await
            }
            Upstream::H2(s) => s.clone().send_request(req).await,
        }
    }

    /// Whether the connection can still carry requests.
    pub fn is_closed(&self) -> bool {
        match self {
            Upstream::H1(s) => s.try_lock().is_ok_and(|s| s.is_closed()),
            Upstream::H2(s) => s.is_closed(),
        }
    }
}

/// Serves the caller's connection `io` (HTTP/1.1 with keep-alive, or HTTP/2, as it speaks)
/// with `answer` for each request, until the connection ends.
pub async fn serve<I, F, R>(
    io: I,
    answer: F,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    F: Fn(Request<Incoming>) -> R + Send + 'static,
    R: Future<Output = Response<RecordedBody<Body>>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let response = answer(req);
        async move { Ok::<_, std::convert::Infallible>(response.await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // The tunnel or socket below already has its own windows; defaults suffice here.
    builder.http1().keep_alive(true);
    builder.serve_connection(TokioIo::new(io), service).await
}

/// An answer of the proxy's own, in plain text.
pub fn text_response(status: StatusCode, body: &'static str) -> Response<Body> {
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
pub fn request_host<B>(req: &Request<B>) -> String {
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

pub type Headers = Vec<(header::HeaderName, header::HeaderValue)>;

/// Sets (replacing) each header.
pub fn set_headers(h: &mut http::HeaderMap, headers: Headers) {
    for (name, value) in headers {
        h.insert(name, value);
    }
}
