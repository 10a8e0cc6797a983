//! Every limit and timeout of HBONE, with its default, in one place (docs/hbone.md lists them
//! with the `ztunnel run` flags that change them). Istio's ztunnel's values are noted where
//! ours follow them.
use std::time::Duration;

/// HTTP/2 keepalive: a PING every `interval`; no answer within `timeout` and the connection is
/// dropped, resetting its streams (a peer that hung, or a path that silently lost the peer).
/// Istio's ztunnel: every 10 s, 20 s timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
        }
    }
}

/// The client pool's bounds ([`super::Pool`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    /// Streams opened on one connection before another connection is opened for the same key
    /// (fewer if the peer allows fewer). Istio's ztunnel: 100.
    pub streams_per_connection: usize,
    /// Connections per key (source pod and identity, destination identity and address): with
    /// `streams_per_connection` it caps the tunnels one pod has open to one destination pod.
    pub connections_per_key: usize,
    /// How long a CONNECT waits for a free stream when its key is at that cap, before it
    /// fails.
    pub wait: Duration,
    /// A connection that carried no stream for this long is closed (the key's others sooner:
    /// `pool::SURPLUS_IDLE`). Istio's ztunnel: 5 min.
    pub idle_timeout: Duration,
    pub keepalive: Keepalive,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            streams_per_connection: 100,
            connections_per_key: 128,
            wait: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            keepalive: Keepalive::default(),
        }
    }
}

impl PoolLimits {
    /// The most tunnels one key may have open at once.
    pub fn streams_per_key(&self) -> usize {
        self.streams_per_connection * self.connections_per_key
    }
}

/// The server's bounds ([`super::server`]), per accepted connection unless said otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// From TCP accept to the first CONNECT request (TLS handshake, HTTP/2 preface, SETTINGS
    /// and the request head): a peer that does not get there in time is cut off.
    pub first_request_timeout: Duration,
    /// A connection with no open stream for this long is closed (GOAWAY). Longer than the
    /// clients' pool idle timeouts (ours 60 s, Istio's 5 min), so clients normally close first.
    pub idle_timeout: Duration,
    pub keepalive: Keepalive,
    /// SETTINGS_MAX_CONCURRENT_STREAMS. Istio's ztunnel: 200.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE: a CONNECT's headers are a few hundred bytes.
    pub max_header_list_size: u32,
    /// Streams a client may open and reset before the server accepted them; beyond it the
    /// connection is closed with GOAWAY ENHANCE_YOUR_CALM (HTTP/2 rapid reset, CVE-2023-44487).
    pub max_pending_accept_reset_streams: usize,
    /// Connections accepted but without a first CONNECT yet (in the TLS handshake or before
    /// their request), per source address and for the whole proxy: beyond either, a new
    /// connection is reset at accept.
    pub max_pending_per_source: usize,
    pub max_pending: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            keepalive: Keepalive::default(),
            max_concurrent_streams: 200,
            max_header_list_size: 16 * 1024,
            max_pending_accept_reset_streams: 20,
            max_pending_per_source: 256,
            max_pending: 2048,
        }
    }
}

/// How long the TLS + HTTP/2 handshake of a new pooled connection may take (the TCP connect
/// included).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a CONNECT may wait for its answer: the server connects to the application first
/// (10 s at most, ours), so a little longer.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);

/// HTTP/2 flow control for tunnels: windows large enough that one stream can fill a fast link
/// (the default 64 KiB would cap a stream at ~64 KiB per round trip). Istio's ztunnel: the
/// same windows, 1 MiB frames.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;
