//! Byte relay between a downstream and an upstream connection, with half-close and counters.
use std::{future::Future, io, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

const BUF_SIZE: usize = 64 * 1024;

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

impl Relayed {
    /// `ok`, `error` or `revoked`, for the connection log.
    pub fn outcome(&self) -> &'static str {
        if self.revoked.is_some() {
            "revoked"
        } else if self.error.is_some() {
            "error"
        } else {
            "ok"
        }
    }

    /// Why it ended other than cleanly (revocation first), for the connection log.
    pub fn error_text(&self) -> Option<String> {
        self.revoked
            .clone()
            .or_else(|| self.error.as_ref().map(|e| e.to_string()))
    }
}

/// Copies both ways until both sides have finished. EOF on one side is forwarded as a
/// half-close (FIN) to the other; an error on either side resets both connections, so neither
/// peer mistakes a failure for a clean end of stream.
pub async fn relay(downstream: TcpStream, upstream: TcpStream) -> Relayed {
    relay_until(downstream, upstream, std::future::pending()).await
}

/// [`relay`], cut short with a reset of both connections when `revoke` yields a reason (a
/// configuration change that no longer allows the connection).
pub async fn relay_until(
    mut downstream: TcpStream,
    mut upstream: TcpStream,
    revoke: impl Future<Output = String>,
) -> Relayed {
    let (mut sent, mut received) = (0u64, 0u64);
    let (result, revoked) = {
        let (mut dr, mut dw) = downstream.split();
        let (mut ur, mut uw) = upstream.split();
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
        reset(downstream);
        reset(upstream);
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
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    total: &mut u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Half-close: the other direction may still be sending.
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        *total += n as u64;
    }
}
