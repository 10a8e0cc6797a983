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

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::{
    io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf},
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

/// A read into `buf`'s spare capacity that waits for the socket to be readable. Through
/// tokio's `poll_read`, not `try_read`: a read shorter than the buffer tells tokio the socket
/// is drained, so the next read waits for epoll instead of costing a `recvfrom` that can only
/// say EAGAIN (one syscall in three on a request/response connection).
fn read_into(
    socket: &mut OwnedReadHalf,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    let mut spare = ReadBuf::uninit(buf.spare_capacity_mut());
    ready!(Pin::new(socket).poll_read(cx, &mut spare))?;
    let n = spare.filled().len();
    // SAFETY: the read initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

fn buffer_for(carried: u64) -> usize {
    BUFFER_STEPS
        .iter()
        .find(|(after, _)| carried >= *after)
        .map_or(BUFFER_STEPS[BUFFER_STEPS.len() - 1].1, |(_, size)| *size)
}

/// A socket's read half, buffered: no buffer while the socket has nothing to read (an idle
/// connection costs no buffer, even after it carried a few bytes), then one that grows with
/// the bytes carried ([`buffer_for`]). The first, small buffer is given back each time the
/// socket runs dry; the larger ones of bulk transfers are kept.
///
/// What it read can be handed over without a copy ([`Source::take`]): an HTTP/2 stream sends
/// the very bytes the socket read, and the buffer is reused once h2 has written them.
pub struct SocketReader {
    read: OwnedReadHalf,
    /// Read and not consumed yet; the spare capacity is where the next read lands.
    buf: BytesMut,
    /// The size of the buffer the reads use now (0 while none is held).
    size: usize,
    carried: u64,
}

impl SocketReader {
    pub fn new(read: OwnedReadHalf) -> Self {
        Self {
            read,
            buf: BytesMut::new(),
            size: 0,
            carried: 0,
        }
    }

    pub fn into_inner(self) -> OwnedReadHalf {
        self.read
    }

    /// The buffer's size now (0 until the first data).
    pub fn capacity(&self) -> usize {
        self.size
    }
}

impl AsyncBufRead for SocketReader {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            let size = buffer_for(this.carried);
            if size == FIRST_BUFFER {
                // Small reads land on the stack first: a connection that waits (idle, or
                // between the requests of a chatty one) holds no buffer while it waits.
                let mut first = [0u8; FIRST_BUFFER];
                let mut read = ReadBuf::new(&mut first);
                match Pin::new(&mut this.read).poll_read(cx, &mut read) {
                    Poll::Pending => {
                        (this.buf, this.size) = (BytesMut::new(), 0);
                        return Poll::Pending;
                    }
                    Poll::Ready(r) => r?,
                }
                let n = read.filled().len();
                if n > 0 {
                    if this.buf.capacity() < n {
                        (this.buf, this.size) = (BytesMut::with_capacity(size), size);
                    }
                    this.buf.extend_from_slice(read.filled());
                }
                this.carried += n as u64;
                return Poll::Ready(Ok(&this.buf));
            }
            // Half the buffer left is enough for the next read; otherwise a fresh one (or the
            // same allocation back, if h2 has written and dropped what was taken from it).
            if this.buf.capacity() < size / 2 {
                this.buf.reserve(size);
                this.size = size;
            }
            let n = ready!(read_into(&mut this.read, cx, &mut this.buf))?;
            this.carried += n as u64;
        }
        Poll::Ready(Ok(&this.buf))
    }

    fn consume(self: Pin<&mut Self>, n: usize) {
        let this = self.get_mut();
        this.buf.advance(n.min(this.buf.len()));
    }
}

impl Source for SocketReader {
    fn take(&mut self, n: usize) -> Bytes {
        self.buf.split_to(n.min(self.buf.len())).freeze()
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
pub trait Tally: Send + Sync {
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

impl<T: Tally> Tally for std::sync::Arc<T> {
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
    type Read: Source;
    type Write: Sink;

    fn split(self) -> (Self::Read, Self::Write);

    /// Ends both directions so the peer sees a failure rather than a clean end of stream (a
    /// TCP RST, an HTTP/2 RST_STREAM).
    fn reset(read: Self::Read, write: Self::Write);
}

/// A buffered read half whose bytes can also be handed over as owned [`Bytes`], for a
/// [`Sink`] that keeps what it is given (an HTTP/2 stream queues its DATA frames).
pub trait Source: AsyncBufRead + Unpin + Send {
    /// Takes the first `n` bytes of what `poll_fill_buf` returned, consuming them.
    fn take(&mut self, n: usize) -> Bytes;
}

/// A write half the engine writes into from a [`Source`].
pub trait Sink: AsyncWrite + Unpin + Send {
    /// Writes some of what `from` holds (its `poll_fill_buf` returned bytes) and consumes
    /// what was written. By default through `poll_write`, which copies out of `from`'s buffer
    /// (a socket's `write` copies into the kernel anyway); a sink that keeps the bytes takes
    /// them instead ([`Source::take`]).
    fn poll_write_from(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut impl Source,
    ) -> Poll<io::Result<usize>> {
        let buf = ready!(Pin::new(&mut *from).poll_fill_buf(cx))?;
        let n = ready!(Pin::new(&mut *self).poll_write(cx, buf))?;
        Pin::new(from).consume(n);
        Poll::Ready(Ok(n))
    }
}

impl Sink for OwnedWriteHalf {}

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
pub fn relay<D: Duplex, U: Duplex>(downstream: D, upstream: U) -> Relay<D, U, Never, ()> {
    relay_until(downstream, upstream, std::future::pending(), ())
}

/// A revocation that never comes.
pub type Never = std::future::Pending<String>;

/// [`relay`], cut short with a reset of both ends when `revoke` yields a reason (a
/// configuration change that no longer allows the connection), adding what it carries to
/// `tally` as it goes.
pub fn relay_until<D: Duplex, U: Duplex, R, T>(
    downstream: D,
    upstream: U,
    revoke: R,
    tally: T,
) -> Relay<D, U, R, T>
where
    R: Future<Output = String> + Unpin,
    T: Tally + Unpin,
{
    let (dr, dw) = downstream.split();
    let (ur, uw) = upstream.split();
    Relay {
        ends: Some(Ends { dr, dw, ur, uw }),
        sent: Half::default(),
        received: Half::default(),
        revoke,
        tally,
    }
}

/// A relay in progress: what every idle proxied connection holds for its whole life, so it is
/// a plain struct polled by hand (both ends' halves, two states, two counters) rather than an
/// `async fn`, whose state machine keeps its arguments beside the futures they were moved
/// into (2.3 KiB with a revocation, against a few hundred bytes here).
pub struct Relay<D: Duplex, U: Duplex, R, T> {
    /// `None` once finished.
    ends: Option<Ends<D, U>>,
    /// Downstream to upstream.
    sent: Half,
    /// Upstream to downstream.
    received: Half,
    revoke: R,
    tally: T,
}

struct Ends<D: Duplex, U: Duplex> {
    dr: D::Read,
    dw: D::Write,
    ur: U::Read,
    uw: U::Write,
}

/// One direction of a relay.
#[derive(Default)]
struct Half {
    state: HalfState,
    total: u64,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum HalfState {
    #[default]
    Copying,
    /// The source ended: sending the half-close.
    Closing,
    Done,
}

impl Half {
    /// Copies from `from` to `to` until `from` ends (then half-closes `to`) or fails.
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut impl Source,
        to: &mut impl Sink,
        tally: impl Fn(u64),
    ) -> Poll<io::Result<()>> {
        loop {
            match self.state {
                HalfState::Copying => {
                    let buf = ready!(Pin::new(&mut *from).poll_fill_buf(cx))?;
                    if buf.is_empty() {
                        // Half-close: the other direction may still be sending.
                        self.state = HalfState::Closing;
                        continue;
                    }
                    let n = ready!(to.poll_write_from(cx, from))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.total += n as u64;
                    tally(n as u64);
                }
                HalfState::Closing => {
                    ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                    self.state = HalfState::Done;
                }
                HalfState::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl<D, U, R, T> Future for Relay<D, U, R, T>
where
    D: Duplex,
    U: Duplex,
    R: Future<Output = String> + Unpin,
    T: Tally + Unpin,
{
    type Output = Relayed;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Relayed> {
        // Every field is Unpin: the halves are (Duplex), the revocation must be.
        let this = self.get_mut();
        let ends = this
            .ends
            .as_mut()
            .expect("a relay polled after it finished");
        let (result, revoked) = match Pin::new(&mut this.revoke).poll(cx) {
            Poll::Ready(reason) => (Ok(()), Some(reason)),
            Poll::Pending => {
                let tally = &this.tally;
                let sent = this
                    .sent
                    .poll_copy(cx, &mut ends.dr, &mut ends.uw, |n| tally.sent(n));
                let received = this
                    .received
                    .poll_copy(cx, &mut ends.ur, &mut ends.dw, |n| tally.received(n));
                match (sent, received) {
                    (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => (Err(e), None),
                    (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => (Ok(()), None),
                    _ => return Poll::Pending,
                }
            }
        };
        let Ends { dr, dw, ur, uw } = this.ends.take().expect("taken once, here");
        let error = result.err();
        if error.is_some() || revoked.is_some() {
            D::reset(dr, dw);
            U::reset(ur, uw);
        }
        Poll::Ready(Relayed {
            sent: this.sent.total,
            received: this.received.total,
            error,
            revoked,
        })
    }
}

/// Closes a connection the proxy will not carry with a reset, so the client sees a failure
/// (ECONNRESET) rather than an empty but clean end of stream.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    #[tokio::test]
    async fn a_socket_reader_holds_no_buffer_while_idle_and_grows_with_traffic() {
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

        // A few bytes (a held connection's one round trip) need the small buffer only until
        // they are taken and the socket is dry again.
        client.write_all(b"ping").await.unwrap();
        let mut ping = [0u8; 4];
        reader.read_exact(&mut ping).await.unwrap();
        assert_eq!(&ping, b"ping");
        assert_eq!(reader.capacity(), 1024);
        let waiting = tokio::time::timeout(Duration::from_millis(50), reader.fill_buf()).await;
        assert!(waiting.is_err());
        assert_eq!(reader.capacity(), 0, "given back once the socket ran dry");

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
