//! HBONE: TCP connections tunnelled as HTTP/2 CONNECT streams over mutual TLS between node
//! proxies (DESIGN §4), wire-compatible with Istio's ztunnel: the request authority is the
//! destination `ip:port`, 200 opens the tunnel, any other status refuses it.
pub mod pool;
pub mod server;
pub mod stream;

pub use pool::{Connector, HboneError, Io, Origin, Pool, PoolKey, PoolStats, Stream};
pub use server::{ConnectRequest, Handler, Tunnel};
