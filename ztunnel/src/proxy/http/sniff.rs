//! Telling HTTP from anything else by a connection's first bytes, which are then replayed to
//! the parser that takes the connection. A port declared HTTP ([`crate::model::AppProtocol`])
//! is read without a deadline (an HTTP client always speaks first); only an undeclared port
//! waits at most [`SNIFF_TIMEOUT`] for the client before it is treated as opaque.
use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

use crate::{model::AppProtocol, proxy::OpenConnection, relay::Tally as _};

/// How long to wait for a client's first bytes on an undeclared port before treating the
/// connection as opaque (a server-first protocol).
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(1);
/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
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

/// How long to wait for the client's first bytes on a port that declares `declared`: a
/// declared HTTP port has no deadline (an HTTP client speaks first, however slowly, and a
/// slow one must still have its requests decided); an undeclared one waits [`SNIFF_TIMEOUT`].
/// A port declared opaque never gets here: it is decided when the connection arrives.
pub fn sniff_deadline(declared: Option<AppProtocol>) -> Option<Duration> {
    match declared {
        Some(p) if p.is_http() => None,
        _ => Some(SNIFF_TIMEOUT),
    }
}

/// Reads the client's first bytes to tell HTTP from anything else; they are returned, for
/// replay. Opaque if the client says nothing for `deadline`.
pub async fn sniff<D: AsyncRead + Unpin>(
    io: &mut D,
    deadline: Option<Duration>,
) -> io::Result<(Protocol, Vec<u8>)> {
    let deadline = deadline.map(|d| tokio::time::Instant::now() + d);
    let mut buf = Vec::with_capacity(64);
    loop {
        let mut chunk = [0u8; 64];
        let read = io.read(&mut chunk);
        let n = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, read).await {
                Ok(r) => r?,
                Err(_) => return Ok((Protocol::Opaque, buf)),
            },
            None => read.await?,
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

/// `inner` with `prefix` read first, counting the bytes each way (read: sent by the caller).
pub struct Replay<D> {
    pub prefix: Bytes,
    pub inner: D,
    pub tally: Arc<OpenConnection>,
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
            self.tally.sent(n as u64);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.tally.sent(n as u64);
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
            self.tally.received(n as u64);
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

    #[test]
    fn only_undeclared_ports_wait_for_the_client() {
        use AppProtocol::*;
        for http in [Http, Http2, Grpc, GrpcWeb] {
            assert_eq!(sniff_deadline(Some(http)), None, "{http:?}");
        }
        assert_eq!(sniff_deadline(None), Some(SNIFF_TIMEOUT));
    }

    /// A client that says nothing is opaque after the deadline.
    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_opaque_after_the_deadline() {
        let (mut silent, _peer) = tokio::io::duplex(64);
        let start = tokio::time::Instant::now();
        let (p, read) = sniff(&mut silent, sniff_deadline(None)).await.unwrap();
        assert_eq!((p, read.len()), (Protocol::Opaque, 0));
        assert_eq!(start.elapsed(), SNIFF_TIMEOUT);
    }

    /// On a declared HTTP port a client that takes longer than [`SNIFF_TIMEOUT`] to send its
    /// request is still read as HTTP (on an undeclared port it would be opaque by then).
    #[tokio::test(start_paused = true)]
    async fn a_declared_http_port_is_read_without_a_deadline() {
        use tokio::io::AsyncWriteExt as _;
        let (mut client, mut peer) = tokio::io::duplex(64);
        let slow = async {
            tokio::time::sleep(SNIFF_TIMEOUT * 3).await;
            peer.write_all(H2_PREFACE).await.unwrap();
        };
        let declared = sniff_deadline(Some(AppProtocol::Http));
        let ((p, read), ()) =
            tokio::join!(async { sniff(&mut client, declared).await.unwrap() }, slow);
        assert_eq!(p, Protocol::Http2);
        assert_eq!(read, H2_PREFACE, "replayed to the parser");
    }
}
