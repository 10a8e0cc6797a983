//! HTTP/2 keepalive, the same on both sides: a PING at every interval, and a peer that does
//! not answer one in time is dead.
use h2::{Ping, PingPong};

use super::limits::Keepalive;

/// Resolves when a PING went unanswered for `k.timeout`. Runs beside the connection (which
/// must be polled for the PONG to arrive); if the connection ends first this never resolves,
/// and the caller drops it with the connection.
pub async fn unanswered(mut pings: PingPong, k: Keepalive) {
    loop {
        tokio::time::sleep(k.interval).await;
        match tokio::time::timeout(k.timeout, pings.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            // The connection failed or closed: its own future reports that.
            Ok(Err(_)) => std::future::pending::<()>().await,
            Err(_elapsed) => return,
        }
    }
}
