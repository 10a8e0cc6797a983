//! The one byte-copy engine, below both directions: it carries every proxied connection
//! between its two ends, whatever they are (a TCP socket, one HTTP/2 CONNECT stream), with
//! half-close, counters and revocation.
use std::{future::Future, io, time::Duration};

use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};

/// How much one read of a socket takes.
pub const BUF_SIZE: usize = 64 * 1024;

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

/// One end of a relayed connection, read and written as two halves that the engine drives
/// independently. Reads are buffered by the end itself (a socket through a [`BufReader`], a
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
    type Read = BufReader<OwnedReadHalf>;
    type Write = OwnedWriteHalf;

    fn split(self) -> (Self::Read, Self::Write) {
        let (read, write) = self.into_split();
        (BufReader::with_capacity(BUF_SIZE, read), write)
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
    relay_until(downstream, upstream, std::future::pending()).await
}

/// [`relay`], cut short with a reset of both ends when `revoke` yields a reason (a
/// configuration change that no longer allows the connection).
pub async fn relay_until<D: Duplex, U: Duplex>(
    downstream: D,
    upstream: U,
    revoke: impl Future<Output = String>,
) -> Relayed {
    let (mut sent, mut received) = (0u64, 0u64);
    let (mut dr, mut dw) = downstream.split();
    let (mut ur, mut uw) = upstream.split();
    let (result, revoked) = {
        let copy = async {
            tokio::try_join!(
                copy_half(&mut dr, &mut uw, &mut sent),
                copy_half(&mut ur, &mut dw, &mut received)
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
    }
}
