//! The one byte-copy engine, below both directions: it carries every proxied connection
//! between its two ends, whatever they are (a TCP socket, one HTTP/2 CONNECT stream), with
//! half-close, counters and revocation.
use std::{
    future::Future,
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{ready, Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};

/// The read buffer of a socket by how much it has carried, as Istio's ztunnel sizes its own:
/// an idle connection holds none, a chatty one 1 KiB, bulk transfers grow it (fewer reads and
/// larger HTTP/2 frames, up to the frame size). `(carried at least, buffer)`, largest first.
const BUFFER_STEPS: [(u64, usize); 3] = [
    (10 * 1024 * 1024, 256 * 1024),
    (128 * 1024, 16 * 1024),
    (0, FIRST_BUFFER),
];
const FIRST_BUFFER: usize = 1024;

/// A read that waits for the socket to be readable.
fn try_read(socket: &TcpStream, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
    loop {
        match socket.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(socket.poll_read_ready(cx))?,
            result => return Poll::Ready(result),
        }
    }
}

fn buffer_for(carried: u64) -> usize {
    BUFFER_STEPS
        .iter()
        .find(|(after, _)| carried >= *after)
        .map_or(BUFFER_STEPS[BUFFER_STEPS.len() - 1].1, |(_, size)| *size)
}

/// A socket's read half, buffered: no buffer until the socket first has data (an idle
/// connection costs no buffer), then one that grows with the bytes carried ([`buffer_for`]).
pub struct SocketReader {
    read: OwnedReadHalf,
    buf: Box<[u8]>,
    /// `buf[start..end]` is read and not consumed yet.
    start: usize,
    end: usize,
    carried: u64,
}

impl SocketReader {
    pub fn new(read: OwnedReadHalf) -> Self {
        Self {
            read,
            buf: Box::default(),
            start: 0,
            end: 0,
            carried: 0,
        }
    }

    pub fn into_inner(self) -> OwnedReadHalf {
        self.read
    }

    /// The buffer's size now (0 until the first data).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }
}

impl AsyncBufRead for SocketReader {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.start == this.end {
            let socket: &TcpStream = this.read.as_ref();
            let size = buffer_for(this.carried);
            if this.buf.is_empty() {
                // The first data is read onto the stack: a connection that stays idle (or a
                // wake-up without data) allocates nothing.
                let mut first = [0u8; FIRST_BUFFER];
                let n = ready!(try_read(socket, cx, &mut first))?;
                if n > 0 {
                    let mut buf = vec![0; size].into_boxed_slice();
                    buf[..n].copy_from_slice(&first[..n]);
                    this.buf = buf;
                }
                (this.start, this.end) = (0, n);
                this.carried += n as u64;
                return Poll::Ready(Ok(&this.buf[..n]));
            }
            if this.buf.len() < size {
                this.buf = vec![0; size].into_boxed_slice();
            }
            let n = ready!(try_read(socket, cx, &mut this.buf))?;
            (this.start, this.end) = (0, n);
            this.carried += n as u64;
        }
        Poll::Ready(Ok(&this.buf[this.start..this.end]))
    }

    fn consume(self: Pin<&mut Self>, n: usize) {
        let this = self.get_mut();
        this.start = (this.start + n).min(this.end);
    }
}

impl AsyncRead for SocketReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let available = ready!(self.as_mut().poll_fill_buf(cx))?;
        let n = available.len().min(out.remaining());
        out.put_slice(&available[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

/// What a finished relay did.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes from downstream to upstream.
    pub sent: u64,
    /// Bytes from upstream to downstream.
    pub received: u64,
    pub error: Option<io::Error>,
    /// Why the proxy cut the connection because the configuration no longer allows it.
    pub revoked: Option<String>,
}

/// Where a relay adds the bytes it carries as it carries them, so they can be read while the
/// connection is open (the admin API's open connections).
pub trait Tally: Sync {
    /// Bytes from downstream (the caller) to upstream.
    fn sent(&self, n: u64);
    /// Bytes from upstream to downstream.
    fn received(&self, n: u64);
}

/// Nowhere: only the relay's result counts.
impl Tally for () {
    fn sent(&self, _: u64) {}
    fn received(&self, _: u64) {}
}

impl<T: Tally + Send> Tally for std::sync::Arc<T> {
    fn sent(&self, n: u64) {
        (**self).sent(n);
    }
    fn received(&self, n: u64) {
        (**self).received(n);
    }
}

/// Bytes carried so far, each way.
#[derive(Debug, Default)]
pub struct Progress {
    sent: AtomicU64,
    received: AtomicU64,
}

impl Progress {
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

impl Tally for Progress {
    fn sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }
    fn received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
    }
}

/// One end of a relayed connection, read and written as two halves that the engine drives
/// independently. Reads are buffered by the end itself (a socket through a [`SocketReader`], a
/// CONNECT stream by the frames it receives), so the engine writes straight from them. Writes
/// need no flush.
pub trait Duplex: Send + 'static {
    type Read: AsyncBufRead + Unpin + Send;
    type Write: AsyncWrite + Unpin + Send;

    fn split(self) -> (Self::Read, Self::Write);

    /// Ends both directions so the peer sees a failure rather than a clean end of stream (a
    /// TCP RST, an HTTP/2 RST_STREAM).
    fn reset(read: Self::Read, write: Self::Write);
}

impl Duplex for TcpStream {
    type Read = SocketReader;
    type Write = OwnedWriteHalf;

    fn split(self) -> (Self::Read, Self::Write) {
        let (read, write) = self.into_split();
        (SocketReader::new(read), write)
    }

    fn reset(read: Self::Read, write: Self::Write) {
        if let Ok(tcp) = read.into_inner().reunite(write) {
            reset(tcp);
        }
    }
}

/// Copies both ways until both sides have finished. EOF on one side is forwarded as a
/// half-close (FIN, END_STREAM) to the other; an error on either side resets both, so neither
/// peer mistakes a failure for a clean end of stream.
pub async fn relay(downstream: impl Duplex, upstream: impl Duplex) -> Relayed {
    relay_until(downstream, upstream, std::future::pending(), &()).await
}

/// [`relay`], cut short with a reset of both ends when `revoke` yields a reason (a
/// configuration change that no longer allows the connection), adding what it carries to
/// `tally` as it goes.
pub async fn relay_until<D: Duplex, U: Duplex>(
    downstream: D,
    upstream: U,
    revoke: impl Future<Output = String>,
    tally: &impl Tally,
) -> Relayed {
    let (mut sent, mut received) = (0u64, 0u64);
    let (mut dr, mut dw) = downstream.split();
    let (mut ur, mut uw) = upstream.split();
    let (result, revoked) = {
        let copy = async {
            tokio::try_join!(
                copy_half(&mut dr, &mut uw, &mut sent, |n| tally.sent(n)),
                copy_half(&mut ur, &mut dw, &mut received, |n| tally.received(n))
            )
        };
        tokio::select! {
            r = copy => (r.map(|_| ()), None),
            reason = revoke => (Ok(()), Some(reason)),
        }
    };
    let error = result.err();
    if error.is_some() || revoked.is_some() {
        D::reset(dr, dw);
        U::reset(ur, uw);
    }
    Relayed {
        sent,
        received,
        error,
        revoked,
    }
}

/// Closes a connection the proxy will not carry with a reset, so the client sees a failure
/// (ECONNRESET) rather than an empty but clean end of stream.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn copy_half(
    from: &mut (impl AsyncBufRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    total: &mut u64,
    tally: impl Fn(u64),
) -> io::Result<()> {
    loop {
        let buf = from.fill_buf().await?;
        if buf.is_empty() {
            // Half-close: the other direction may still be sending.
            return to.shutdown().await;
        }
        let n = to.write(buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        from.consume(n);
        *total += n as u64;
        tally(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    #[tokio::test]
    async fn a_socket_reader_has_no_buffer_until_data_then_grows_with_traffic() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let (read, _write) = accepted.into_split();
        let mut reader = SocketReader::new(read);
        // Idle: no buffer, even while a read waits.
        let waiting = tokio::time::timeout(Duration::from_millis(50), reader.fill_buf()).await;
        assert!(waiting.is_err());
        assert_eq!(reader.capacity(), 0);

        let sent: Vec<u8> = (0..400 * 1024u32).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn({
            let sent = sent.clone();
            async move {
                client.write_all(&sent).await.unwrap();
                client.shutdown().await.unwrap();
            }
        });
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        loop {
            let n = reader.fill_buf().await.unwrap().len();
            if n == 0 {
                break;
            }
            if sizes.last() != Some(&reader.capacity()) {
                sizes.push(reader.capacity());
            }
            let mut chunk = vec![0; n];
            reader.read_exact(&mut chunk).await.unwrap();
            got.extend_from_slice(&chunk);
        }
        writer.await.unwrap();
        assert!(got == sent, "every byte, in order");
        assert_eq!(sizes, [1024, 16 * 1024], "1 KiB, then 16 KiB past 128 KiB");
    }
}
