//! Relaying bytes between a TCP connection and one HTTP/2 CONNECT stream.
use std::{io, time::Duration};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::proxy::Relayed;

const READ_BUF: usize = 64 * 1024;

/// Copies both ways until both directions have ended. A TCP FIN becomes END_STREAM and
/// END_STREAM becomes a FIN (half-close both ways); an error on either side resets the other
/// (RST_STREAM CANCEL toward the tunnel, a TCP RST toward the socket), so a failure is never
/// mistaken for a clean end.
pub async fn relay(tcp: TcpStream, send: SendStream<Bytes>, recv: RecvStream) -> Relayed {
    relay_until(tcp, send, recv, std::future::pending()).await
}

/// [`relay`], cut short with a reset both ways when `revoke` yields a reason (a configuration
/// change that no longer allows the connection).
pub async fn relay_until(
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    revoke: impl std::future::Future<Output = String>,
) -> Relayed {
    let (mut sent, mut received) = (0u64, 0u64);
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let copy = async {
        tokio::try_join!(
            async {
                let mut buf = vec![0u8; READ_BUF];
                loop {
                    let n = tcp_read.read(&mut buf).await?;
                    if n == 0 {
                        send.send_data(Bytes::new(), true).map_err(h2_io)?;
                        return Ok::<_, io::Error>(());
                    }
                    send_all(&mut send, Bytes::copy_from_slice(&buf[..n])).await?;
                    sent += n as u64;
                }
            },
            async {
                while let Some(chunk) = recv.data().await {
                    let chunk = chunk.map_err(h2_io)?;
                    let n = chunk.len();
                    tcp_write.write_all(&chunk).await?;
                    // Only now may the peer send more: flow control follows what the app consumed.
                    let _ = recv.flow_control().release_capacity(n);
                    received += n as u64;
                }
                tcp_write.shutdown().await
            }
        )
    };
    let (result, revoked) = tokio::select! {
        r = copy => (r.map(|_| ()), None),
        reason = revoke => (Ok(()), Some(reason)),
    };
    let error = result.err();
    if error.is_some() || revoked.is_some() {
        send.send_reset(Reason::CANCEL);
        if let Ok(tcp) = tcp_read.reunite(tcp_write) {
            crate::proxy::reset(tcp);
        }
    }
    Relayed {
        sent,
        received,
        error,
        revoked,
    }
}

/// Sends `data` as the peer's flow-control window allows.
pub async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> io::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(h2_io(e)),
            None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")),
        };
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        send.send_data(chunk, false).map_err(h2_io)?;
    }
    Ok(())
}

pub fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = match e.reason() {
        Some(Reason::CANCEL) | Some(Reason::NO_ERROR) => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

/// HTTP/2 settings for tunnels: windows large enough that one stream can fill a fast link
/// (the default 64 KiB would cap a stream at ~64 KiB per round trip).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// How long the TLS + HTTP/2 handshake of a new tunnel connection may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One CONNECT stream as a byte stream (`AsyncRead + AsyncWrite`), for code that parses what a
/// tunnel carries (per-request authorization). Reads release flow-control capacity as the
/// bytes are consumed; a shutdown sends END_STREAM.
pub struct StreamIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read.
    pending: Bytes,
    recv_done: bool,
}

impl StreamIo {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            recv_done: false,
        }
    }
}

impl tokio::io::AsyncRead for StreamIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        while this.pending.is_empty() && !this.recv_done {
            match this.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.recv_done = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_io(e))),
                Poll::Ready(Some(Ok(chunk))) => {
                    let _ = this.recv.flow_control().release_capacity(chunk.len());
                    this.pending = chunk;
                }
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for StreamIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::task::Poll;
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(data.len());
        match this.send.poll_capacity(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stream closed",
            ))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(h2_io(e))),
            Poll::Ready(Some(Ok(granted))) => {
                let n = granted.min(data.len());
                if n == 0 {
                    // No capacity yet: poll_capacity registered the waker.
                    return Poll::Pending;
                }
                this.send
                    .send_data(Bytes::copy_from_slice(&data[..n]), false)
                    .map_err(h2_io)?;
                Poll::Ready(Ok(n))
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::Poll::Ready(this.send.send_data(Bytes::new(), true).map_err(h2_io))
    }
}
