//! HBONE: TCP connections tunnelled as HTTP/2 CONNECT streams over mutual TLS between node
//! proxies (docs/hbone.md), wire-compatible with Istio's ztunnel: the request authority is the
//! destination `ip:port`, 200 opens the tunnel, any other status refuses it.
//!
//! HBONE owns its transport: [`client`] dials and [`server`] accepts the mTLS connections, each
//! returning the peer's verified SPIFFE id with the stream; [`pool`] shares client connections;
//! [`stream`] makes one CONNECT stream a byte stream for the relay engine. Every bound both
//! sides keep (streams, connections, deadlines, keepalive) is in [`limits`].
pub mod client;
mod keepalive;
pub mod limits;
pub mod pool;
pub mod server;
pub mod stream;

pub use limits::{Keepalive, PoolLimits, ServerLimits};
pub use pool::{Connector, HboneError, Io, Origin, Pool, PoolKey, PoolStats, Stream};
pub use server::{ConnectRequest, Handler, Pending, Tunnel};
pub use stream::StreamIo;

use crate::identity::SpiffeId;

/// A connection whose peer proved `peer` with its certificate.
#[derive(Debug)]
pub struct Authenticated<S> {
    pub peer: SpiffeId,
    pub stream: S,
}
