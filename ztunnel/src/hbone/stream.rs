//! One HTTP/2 CONNECT stream as a byte stream: what the relay engine ([`crate::relay`]) and
//! the per-request parser read and write, whichever side opened the tunnel.
use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf as _, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

use crate::relay::{Duplex, Sink, Source};

/// A CONNECT stream, both directions. END_STREAM reads as EOF and a shutdown sends it
/// (half-close); a reset sends RST_STREAM CANCEL.
pub struct StreamIo {
    read: StreamReader,
    write: StreamWriter,
}

impl StreamIo {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            read: StreamReader {
                recv,
                pending: Bytes::new(),
                done: false,
            },
            write: StreamWriter { send },
        }
    }
}

/// The receiving half. Flow-control capacity is released as the bytes are consumed, so the
/// peer may send more only once the application took what it sent.
pub struct StreamReader {
    recv: RecvStream,
    /// Received but not yet consumed.
    pending: Bytes,
    done: bool,
}

/// The sending half: writes as much as the peer's window allows.
pub struct StreamWriter {
    send: SendStream<Bytes>,
}

impl Duplex for StreamIo {
    type Read = StreamReader;
    type Write = StreamWriter;

    fn split(self) -> (StreamReader, StreamWriter) {
        (self.read, self.write)
    }

    fn reset(_read: StreamReader, mut write: StreamWriter) {
        write.send.send_reset(Reason::CANCEL);
    }
}

impl AsyncBufRead for StreamReader {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        while this.pending.is_empty() && !this.done {
            match this.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_io(e))),
                Poll::Ready(Some(Ok(chunk))) => this.pending = chunk,
            }
        }
        Poll::Ready(Ok(&this.pending))
    }

    fn consume(self: Pin<&mut Self>, n: usize) {
        let this = self.get_mut();
        this.pending.advance(n);
        let _ = this.recv.flow_control().release_capacity(n);
    }
}

impl Source for StreamReader {
    fn take(&mut self, n: usize) -> Bytes {
        let chunk = self.pending.split_to(n.min(self.pending.len()));
        let _ = self.recv.flow_control().release_capacity(chunk.len());
        chunk
    }
}

impl AsyncRead for StreamReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let available = match self.as_mut().poll_fill_buf(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(available)) => available,
        };
        let n = available.len().min(buf.remaining());
        buf.put_slice(&available[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

impl StreamWriter {
    /// Waits until the peer's window lets `want` (> 0) bytes or fewer go; how many may.
    fn poll_granted(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        self.send.reserve_capacity(want);
        loop {
            match self.send.poll_capacity(cx) {
                // Registered for a wake-up when capacity arrives.
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "stream closed",
                    )))
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_io(e))),
                // Capacity was taken back before we got it: ask again.
                Poll::Ready(Some(Ok(0))) => continue,
                Poll::Ready(Some(Ok(granted))) => return Poll::Ready(Ok(granted.min(want))),
            }
        }
    }
}

/// The relay's way in: the bytes read from the socket become the DATA frame, uncopied.
impl Sink for StreamWriter {
    fn poll_write_from(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut impl Source,
    ) -> Poll<io::Result<usize>> {
        let want = ready!(Pin::new(&mut *from).poll_fill_buf(cx))?.len();
        if want == 0 {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_granted(cx, want))?;
        self.send.send_data(from.take(n), false).map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for StreamWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(this.poll_granted(cx, data.len()))?;
        this.send
            .send_data(Bytes::copy_from_slice(&data[..n]), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        Poll::Ready(this.send.send_data(Bytes::new(), true).map_err(h2_io))
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().read).poll_read(cx, buf)
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_shutdown(cx)
    }
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
