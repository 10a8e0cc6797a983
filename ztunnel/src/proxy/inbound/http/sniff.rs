//! Telling HTTP from anything else by a connection's first bytes, which are then replayed to
//! the parser that takes the connection.
use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

use crate::{proxy::OpenConnection, relay::Tally as _};

/// How long to wait for a client's first bytes before treating the connection as opaque.
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(1);
/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Protocol {
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
pub(super) async fn sniff<D: AsyncRead + Unpin>(io: &mut D) -> io::Result<(Protocol, Vec<u8>)> {
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

/// `inner` with `prefix` read first, counting the bytes each way (read: sent by the caller).
pub(super) struct Replay<D> {
    pub(super) prefix: Bytes,
    pub(super) inner: D,
    pub(super) tally: Arc<OpenConnection>,
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
}
