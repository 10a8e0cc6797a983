//! The HBONE client: a pool of HTTP/2 connections per (source pod, source identity,
//! destination identity, destination address), many CONNECT streams over each. A connection
//! full (its stream cap, or the peer's limit), draining (GOAWAY) or dead (closed, or a PING
//! unanswered) makes the pool open another for the same key, up to a bound per key; a CONNECT
//! that finds its key at that bound waits a bounded time for a stream to end, then fails.
//! Connections that carried nothing for the idle timeout are closed; of a key's idle
//! connections only one waits that long, the others (a burst opened them) go sooner.
use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderMap, Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use super::{
    keepalive,
    limits::{
        PoolLimits, CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, MAX_FRAME_SIZE, RESPONSE_TIMEOUT,
        STREAM_WINDOW,
    },
    stream::StreamIo,
};
use crate::{
    identity::{BoxFuture, SpiffeId},
    memory::Live,
    metrics::{HboneClosing, Metrics, PoolRefusal, Side},
    netns::Netns,
};

/// A key's idle connections beyond its first go after the idle timeout divided by this (10 s
/// of the default 60 s), at the next sweep (every half timeout).
const SURPLUS_IDLE: u32 = 6;

/// Who talks to whom, where, and from which pod: connections are shared only within one key,
/// so a TLS session never carries another identity's or another pod's traffic.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: SpiffeId,
    pub dst: SpiffeId,
    pub addr: SocketAddr,
    pub origin: Origin,
}

/// Where a tunnel is dialled from: the source pod's network namespace and its address there,
/// as Istio's ztunnel dials it, so the destination (a peer proxy, its policies, Kubernetes
/// NetworkPolicies) sees the pod and not the node. Keys compare by netns cookie and address.
#[derive(Clone, Debug)]
pub struct Origin {
    pub netns: Arc<Netns>,
    pub netns_cookie: u64,
    /// The pod's address of the destination's family (none: the kernel picks).
    pub ip: Option<IpAddr>,
}

impl PartialEq for Origin {
    fn eq(&self, other: &Self) -> bool {
        (self.netns_cookie, self.ip) == (other.netns_cookie, other.ip)
    }
}

impl Eq for Origin {}

impl Hash for Origin {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self.netns_cookie, self.ip).hash(state);
    }
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Opens the transport (TCP + mTLS) for a key.
pub type Connector =
    Arc<dyn Fn(PoolKey) -> BoxFuture<'static, io::Result<Box<dyn Io>>> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("the tunnel was refused with status {0}")]
    Refused(StatusCode),
    #[error("HTTP/2 error: {0}")]
    Protocol(#[from] h2::Error),
    /// The key had `streams` tunnels open, its cap, for the whole wait.
    #[error(
        "no free HBONE stream to {addr}: this pod has {streams} tunnels open to it (the cap) \
         and none ended within {waited:?}"
    )]
    Exhausted {
        addr: SocketAddr,
        streams: usize,
        waited: Duration,
    },
    #[error("{addr} did not answer the CONNECT within {RESPONSE_TIMEOUT:?}")]
    ResponseTimeout { addr: SocketAddr },
}

/// One pooled HTTP/2 connection.
struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    /// Its task ended: closed, failed, or the peer stopped answering PINGs.
    closed: Arc<AtomicBool>,
    /// The peer sent GOAWAY: the streams it has go on, no new ones.
    draining: AtomicBool,
    /// Streams open or about to be opened on it.
    active: AtomicUsize,
    /// When its last stream ended (or it opened).
    idle_since: Mutex<Instant>,
}

impl Conn {
    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed)
    }

    /// Takes a stream slot if it has one: fewer than our cap and than the peer's
    /// MAX_CONCURRENT_STREAMS are open.
    fn try_reserve(&self, cap: usize) -> bool {
        let cap = cap.min(self.send.current_max_send_streams());
        self.usable()
            && self
                .active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < cap).then_some(n + 1)
                })
                .is_ok()
    }

    fn idle_for(&self) -> Duration {
        self.idle_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }
}

/// The connections of one key, and who waits for a stream on them.
#[derive(Default)]
struct Entry {
    state: Mutex<KeyState>,
    /// Signalled when a stream ends, a connection is added or a dial fails.
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct KeyState {
    conns: Vec<Arc<Conn>>,
    /// A connection is being opened (one at a time per key: a burst of CONNECTs shares it).
    dialing: bool,
    /// Dials finished so far, and the last one's failure: callers that waited for that dial
    /// fail with its error instead of each dialling again.
    dials: u64,
    failure: Option<(u64, io::ErrorKind, String)>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Open pooled connections.
    pub connections: usize,
    /// CONNECT streams open on them.
    pub active_streams: usize,
    pub connections_opened: u64,
    pub streams_opened: u64,
}

pub struct Pool {
    keys: Mutex<HashMap<PoolKey, Arc<Entry>>>,
    connector: Connector,
    limits: PoolLimits,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    /// Connections ever opened, for tests and metrics.
    pub connections_opened: AtomicU64,
    pub streams_opened: AtomicU64,
}

/// A CONNECT stream; keeps its connection's slot taken until dropped (a relay that takes
/// `io` leaves the rest to drop when it ends).
pub struct Stream {
    /// Which pooled connection carries it (for logs: streams with one id share a TLS session).
    pub connection_id: u64,
    pub io: StreamIo,
    _slot: Slot,
}

/// A stream's place on its connection, apart from the stream ([`Stream::into_parts`]):
/// the connection counts it as busy until this drops.
pub struct StreamPlace(#[allow(dead_code)] Slot);

impl Stream {
    /// The byte stream, and the place to keep for as long as it is used.
    pub fn into_parts(self) -> (StreamIo, StreamPlace) {
        (self.io, StreamPlace(self._slot))
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("connection_id", &self.connection_id)
            .finish_non_exhaustive()
    }
}

/// A stream slot on a connection; given back (and a waiter woken) on drop.
struct Slot {
    conn: Arc<Conn>,
    entry: Arc<Entry>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self
                .conn
                .idle_since
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
        self.entry.changed.notify_one();
    }
}

/// Gives the dial up if the dialling caller goes away before it finished (its task aborted),
/// so the key's other callers do not wait for a dial nobody makes.
struct DialGuard<'a>(Option<&'a Entry>);

impl Drop for DialGuard<'_> {
    fn drop(&mut self) {
        if let Some(entry) = self.0 {
            entry
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .dialing = false;
            entry.changed.notify_waiters();
        }
    }
}

/// What a caller does next for a key, decided under its lock.
enum Next {
    Use(Slot),
    Dial,
    /// Wait for a change; `dials` is the dial count seen, `full` says the cap was reached.
    Wait {
        dials: u64,
        full: Option<usize>,
    },
}

impl Pool {
    /// Must be called inside the runtime (it runs an expiry task).
    pub fn new(connector: Connector, limits: PoolLimits, metrics: Arc<Metrics>) -> Arc<Self> {
        let pool = Arc::new(Self {
            keys: Mutex::default(),
            connector,
            limits,
            metrics,
            next_id: AtomicU64::new(1),
            connections_opened: AtomicU64::new(0),
            streams_opened: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&pool);
        let period = (limits.idle_timeout / 2).max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.expire_idle();
            }
        });
        pool
    }

    pub fn limits(&self) -> &PoolLimits {
        &self.limits
    }

    /// Drops connections that are closed or carried no stream for the idle timeout: dropping
    /// the last `SendRequest` makes h2 close the connection gracefully (GOAWAY). A key keeps
    /// one idle connection that long; its other idle ones, which only a burst needed (one per
    /// `streams_per_connection` tunnels), go once idle for [`SURPLUS_IDLE`] of the timeout:
    /// after 10 000 tunnels to one pod, the 99 extra connections held ~22 MiB over both
    /// proxies for the whole minute (docs/benchmarks.md).
    fn expire_idle(&self) {
        let surplus_idle = self.limits.idle_timeout / SURPLUS_IDLE;
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.retain(|key, entry| {
            let mut state = entry.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut spare_kept = false;
            state.conns.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0;
                let idle_for = c.idle_for();
                let expired = idle
                    && (!c.usable()
                        || idle_for >= self.limits.idle_timeout
                        || (spare_kept && idle_for >= surplus_idle));
                spare_kept |= idle && !expired;
                if expired && c.usable() {
                    self.metrics
                        .hbone_closed(Side::Outbound, HboneClosing::Idle);
                    debug!(connection = c.id, src = %key.src, dst = %key.dst, addr = %key.addr,
                        "closing idle HBONE connection");
                }
                !expired
            });
            // Keep a key someone is dialling or waiting on.
            !state.conns.is_empty() || state.dialing || Arc::strong_count(entry) > 1
        });
    }

    /// Connections currently pooled.
    pub fn size(&self) -> usize {
        self.stats().connections
    }

    /// Connection and stream counts, for metrics.
    pub fn stats(&self) -> PoolStats {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let mut stats = PoolStats {
            connections_opened: self.connections_opened.load(Ordering::Relaxed),
            streams_opened: self.streams_opened.load(Ordering::Relaxed),
            ..Default::default()
        };
        for entry in keys.values() {
            let state = entry.state.lock().unwrap_or_else(|p| p.into_inner());
            for c in state
                .conns
                .iter()
                .filter(|c| !c.closed.load(Ordering::Relaxed))
            {
                stats.connections += 1;
                stats.active_streams += c.active.load(Ordering::Relaxed);
            }
        }
        stats
    }

    fn entry(&self, key: &PoolKey) -> Arc<Entry> {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// A stream slot for `key`: on a connection with room, else on a new connection (up to
    /// the key's bound), else the first slot freed before `deadline`.
    async fn reserve(
        &self,
        key: &PoolKey,
        deadline: tokio::time::Instant,
    ) -> Result<Slot, HboneError> {
        let entry = self.entry(key);
        let mut waited_for: Option<u64> = None;
        loop {
            // Registered before looking, so a change between the look and the wait is seen.
            let changed = entry.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let next = {
                let mut state = entry.state.lock().unwrap_or_else(|p| p.into_inner());
                if let (Some(seen), Some((dial, kind, message))) = (waited_for, &state.failure) {
                    if *dial > seen {
                        return Err(HboneError::Connect {
                            addr: key.addr,
                            source: io::Error::new(*kind, message.clone()),
                        });
                    }
                }
                state.conns.retain(|c| !c.closed.load(Ordering::Relaxed));
                let cap = self.limits.streams_per_connection;
                match state.conns.iter().find(|c| c.try_reserve(cap)) {
                    Some(conn) => Next::Use(Slot {
                        conn: conn.clone(),
                        entry: entry.clone(),
                    }),
                    None if !state.dialing
                        && state.conns.len() < self.limits.connections_per_key =>
                    {
                        state.dialing = true;
                        Next::Dial
                    }
                    None => Next::Wait {
                        dials: state.dials,
                        full: (!state.dialing).then(|| {
                            state
                                .conns
                                .iter()
                                .map(|c| c.active.load(Ordering::Relaxed))
                                .sum()
                        }),
                    },
                }
            };
            match next {
                Next::Use(slot) => return Ok(slot),
                Next::Dial => {
                    let mut dialing = DialGuard(Some(&entry));
                    let opened = self.open(key).await;
                    dialing.0 = None;
                    let mut state = entry.state.lock().unwrap_or_else(|p| p.into_inner());
                    state.dialing = false;
                    state.dials += 1;
                    let result = match opened {
                        Ok(conn) => {
                            let conn = Arc::new(conn);
                            conn.active.store(1, Ordering::Release);
                            state.conns.push(conn.clone());
                            Ok(Slot {
                                conn,
                                entry: entry.clone(),
                            })
                        }
                        Err(e) => {
                            let (kind, message) = match &e {
                                HboneError::Connect { source, .. } => {
                                    (source.kind(), source.to_string())
                                }
                                other => (io::ErrorKind::Other, other.to_string()),
                            };
                            state.failure = Some((state.dials, kind, message));
                            Err(e)
                        }
                    };
                    drop(state);
                    // Whoever waited for this dial: take a slot on it, or learn its error.
                    entry.changed.notify_waiters();
                    return result;
                }
                Next::Wait { dials, full } => {
                    waited_for = Some(dials);
                    if tokio::time::timeout_at(deadline, changed).await.is_err() {
                        let streams = full.unwrap_or(self.limits.streams_per_key());
                        self.metrics.pool_refused(PoolRefusal::Exhausted);
                        warn!(src = %key.src, src_ip = key.origin.ip.map(|ip| ip.to_string()).as_deref(),
                            dst = %key.dst, addr = %key.addr, streams,
                            connections = self.limits.connections_per_key,
                            "HBONE pool exhausted: the pod's tunnels to this destination are at their cap");
                        return Err(HboneError::Exhausted {
                            addr: key.addr,
                            streams,
                            waited: self.limits.wait,
                        });
                    }
                }
            }
        }
    }

    async fn open(&self, key: &PoolKey) -> Result<Conn, HboneError> {
        let connect_error = |source| HboneError::Connect {
            addr: key.addr,
            source,
        };
        let handshake = async {
            let io = (self.connector)(key.clone()).await.map_err(connect_error)?;
            h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME_SIZE)
                .enable_push(false)
                .handshake::<_, Bytes>(io)
                .await
                .map_err(HboneError::from)
        };
        let (send, mut connection) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| {
                connect_error(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake timed out",
                ))
            })??;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let closed = Arc::new(AtomicBool::new(false));
        let done = closed.clone();
        let (src, dst, addr) = (key.src.clone(), key.dst.clone(), key.addr);
        let pings = connection.ping_pong().expect("taken once, here");
        let (keepalive, metrics) = (self.limits.keepalive, self.metrics.clone());
        tokio::spawn(async move {
            let _live = Live::new();
            tokio::select! {
                result = &mut connection => {
                    if let Err(e) = &result {
                        if e.is_go_away() || e.is_io() {
                            metrics.hbone_closed(Side::Outbound, HboneClosing::PeerClosed);
                        } else {
                            metrics.hbone_closed(Side::Outbound, HboneClosing::ProtocolError);
                        }
                    }
                    debug!(connection = id, %src, %dst, %addr, error = ?result.err(), "HBONE connection ended");
                }
                () = keepalive::unanswered(pings, keepalive) => {
                    metrics.hbone_closed(Side::Outbound, HboneClosing::KeepaliveTimeout);
                    warn!(connection = id, %src, %dst, %addr, timeout = ?keepalive.timeout,
                        "HBONE peer stopped answering PINGs; closing the connection and resetting its streams");
                }
            }
            // Dropping the connection fails its streams, so their relays reset both ends.
            done.store(true, Ordering::Relaxed);
        });
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        info!(connection = id, src = %key.src,
            src_ip = key.origin.ip.map(|ip| ip.to_string()).as_deref(), dst = %key.dst,
            addr = %key.addr, "HBONE connection opened");
        Ok(Conn {
            id,
            send,
            closed,
            draining: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        })
    }

    /// Opens a tunnel to `target` over a pooled connection for `key`.
    pub async fn connect(
        &self,
        key: &PoolKey,
        target: SocketAddr,
        headers: HeaderMap,
    ) -> Result<Stream, HboneError> {
        let deadline = tokio::time::Instant::now() + self.limits.wait;
        // A connection found dead or draining between our check and its use is replaced once.
        let mut retried = false;
        loop {
            let slot = self.reserve(key, deadline).await?;
            let conn = slot.conn.clone();
            match self.open_stream(slot, key, target, headers.clone()).await {
                Err(HboneError::Protocol(e)) if !retried && (e.is_io() || e.is_go_away()) => {
                    match e.is_go_away() {
                        true => conn.draining.store(true, Ordering::Relaxed),
                        false => conn.closed.store(true, Ordering::Relaxed),
                    }
                    retried = true;
                }
                other => return other,
            }
        }
    }

    async fn open_stream(
        &self,
        slot: Slot,
        key: &PoolKey,
        target: SocketAddr,
        headers: HeaderMap,
    ) -> Result<Stream, HboneError> {
        let conn = slot.conn.clone();
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(())
            .expect("a socket address is a valid authority");
        *request.headers_mut() = headers;
        let exchange = async {
            // `ready` waits only if the peer lowered its concurrent-stream limit below what
            // we counted.
            let mut send = conn.send.clone().ready().await?;
            let (response, stream) = send.send_request(request, false)?;
            Ok::<_, HboneError>((response.await?, stream))
        };
        let (response, stream) = match tokio::time::timeout(RESPONSE_TIMEOUT, exchange).await {
            Ok(r) => r?,
            Err(_) => {
                self.metrics.pool_refused(PoolRefusal::ResponseTimeout);
                warn!(connection = conn.id, src = %key.src, dst = %key.dst, addr = %key.addr,
                    "HBONE CONNECT not answered in time");
                return Err(HboneError::ResponseTimeout { addr: key.addr });
            }
        };
        if response.status() != StatusCode::OK {
            return Err(HboneError::Refused(response.status()));
        }
        self.streams_opened.fetch_add(1, Ordering::Relaxed);
        Ok(Stream {
            connection_id: conn.id,
            io: StreamIo::new(stream, response.into_body()),
            _slot: slot,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use http::StatusCode;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::*;
    use crate::{
        hbone::{
            server::{self, Handler},
            ServerLimits,
        },
        relay,
    };

    fn pool(limits: PoolLimits) -> Arc<Pool> {
        Pool::new(plain_connector(), limits, Arc::default())
    }

    /// An h2c (no TLS) tunnel server on loopback whose handler connects to the CONNECT target,
    /// except port 1 which it refuses.
    async fn tunnel_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler: Handler = Arc::new(|req, tunnel| {
            Box::pin(async move {
                if req.target.port() == 1 {
                    return tunnel.refuse(StatusCode::FORBIDDEN);
                }
                let tcp = TcpStream::connect(req.target).await.unwrap();
                relay::relay(tunnel.accept().unwrap(), tcp).await;
            })
        });
        tokio::spawn(async move {
            loop {
                let (io, _) = listener.accept().await.unwrap();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                tokio::spawn(server::serve(
                    io,
                    handler.clone(),
                    |_, _| {},
                    ServerLimits::default(),
                    deadline,
                    None,
                ));
            }
        });
        addr
    }

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    fn plain_connector() -> Connector {
        Arc::new(|key: PoolKey| {
            Box::pin(async move {
                let s = TcpStream::connect(key.addr).await?;
                Ok(Box::new(s) as Box<dyn Io>)
            })
        })
    }

    fn key(sa: &str, addr: SocketAddr) -> PoolKey {
        key_from(sa, addr, Ipv4Addr::LOCALHOST)
    }

    /// A key for a source pod known by its address (the plain connector does not dial from it).
    fn key_from(sa: &str, addr: SocketAddr, pod: Ipv4Addr) -> PoolKey {
        PoolKey {
            src: SpiffeId::new("td", "ns", sa).unwrap(),
            dst: SpiffeId::new("td", "ns", "server").unwrap(),
            addr,
            origin: Origin {
                netns: Arc::new(Netns::current().unwrap()),
                netns_cookie: u64::from(pod.to_bits()),
                ip: Some(pod.into()),
            },
        }
    }

    /// Sends `data` through a tunnel to the echo server, half-closes, and reads it all back.
    async fn echo_through(
        pool: &Pool,
        key: &PoolKey,
        echo: SocketAddr,
        data: &[u8],
    ) -> (u64, Vec<u8>) {
        let (client, proxied) = {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            (c, l.accept().await.unwrap().0)
        };
        let tunnel = pool.connect(key, echo, HeaderMap::new()).await.unwrap();
        let id = tunnel.connection_id;
        let relay = tokio::spawn(relay::relay(proxied, tunnel.io));
        let (mut r, mut w) = client.into_split();
        let data = data.to_vec();
        let writer = tokio::spawn(async move {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        let relayed = relay.await.unwrap();
        assert!(relayed.error.is_none(), "{:?}", relayed.error);
        (id, back)
    }

    #[tokio::test]
    async fn streams_share_one_connection_per_key_and_carry_bytes_both_ways() {
        let (server, echo) = (tunnel_server().await, echo_server().await);
        let pool = pool(PoolLimits::default());
        let a = key("client", server);
        // 3 MiB: more than the default 64 KiB windows, so flow control is exercised.
        let payload: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let (id1, back) = echo_through(&pool, &a, echo, &payload).await;
        assert_eq!(back, payload);
        let (id2, _) = echo_through(&pool, &a, echo, b"second").await;
        assert_eq!(id1, id2, "the same key reuses its connection");
        let (id3, _) = echo_through(&pool, &key("other-sa", server), echo, b"x").await;
        assert_ne!(id1, id3, "another source identity gets its own connection");
        let other_pod = key_from("client", server, Ipv4Addr::new(10, 1, 0, 9));
        let (id4, _) = echo_through(&pool, &other_pod, echo, b"y").await;
        assert_ne!(
            id1, id4,
            "another pod of the same identity gets its own connection"
        );
        assert_eq!(pool.connections_opened.load(Ordering::Relaxed), 3);
        assert_eq!(pool.streams_opened.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn refusals_and_unreachable_servers_are_errors() {
        let server = tunnel_server().await;
        let pool = pool(PoolLimits::default());
        let refused = pool
            .connect(
                &key("c", server),
                "127.0.0.1:1".parse().unwrap(),
                HeaderMap::new(),
            )
            .await;
        assert!(matches!(
            refused,
            Err(HboneError::Refused(StatusCode::FORBIDDEN))
        ));
        let closed = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let dead = closed.local_addr().unwrap();
        drop(closed);
        let err = pool.connect(&key("c", dead), dead, HeaderMap::new()).await;
        assert!(matches!(err, Err(HboneError::Connect { .. })), "{err:?}");
    }

    #[tokio::test]
    async fn idle_connections_are_closed_and_replaced() {
        let (server, echo) = (tunnel_server().await, echo_server().await);
        let pool = pool(PoolLimits {
            idle_timeout: Duration::from_millis(200),
            ..PoolLimits::default()
        });
        let k = key("c", server);
        let (id1, _) = echo_through(&pool, &k, echo, b"a").await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(pool.size(), 0, "the idle connection was expired");
        let (id2, _) = echo_through(&pool, &k, echo, b"b").await;
        assert_ne!(id1, id2);
    }

    #[tokio::test]
    async fn a_burst_s_extra_connections_go_before_the_idle_timeout_and_one_stays() {
        let (server, echo) = (tunnel_server().await, echo_server().await);
        let idle_timeout = Duration::from_secs(3);
        let pool = pool(PoolLimits {
            streams_per_connection: 1,
            idle_timeout,
            ..PoolLimits::default()
        });
        let k = key("c", server);
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(hold(&pool, &k, echo).await.unwrap());
        }
        assert_eq!(pool.size(), 3, "one stream per connection");
        drop(held);
        let ended = Instant::now();
        while pool.size() > 1 && ended.elapsed() < idle_timeout {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            pool.size(),
            1,
            "the two extra connections closed before the idle timeout, one kept"
        );
        while pool.size() > 0 && ended.elapsed() < idle_timeout * 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(pool.size(), 0, "the last one went at the idle timeout");
        assert!(
            ended.elapsed() >= idle_timeout,
            "the last connection stayed for the idle timeout ({:?})",
            ended.elapsed()
        );
    }

    /// Exploratory (run alone: the census counts the whole process): what one pooled
    /// connection keeps, both ends, fresh and after a burst of 100 concurrent streams.
    #[cfg(feature = "alloc-census")]
    #[tokio::test(flavor = "current_thread")]
    async fn census_of_an_idle_pooled_connection() {
        use crate::memory::census;
        let settle = || tokio::time::sleep(Duration::from_millis(300));
        let (server, echo) = (tunnel_server().await, echo_server().await);
        let pool = pool(PoolLimits::default());
        let k = key("c", server);
        settle().await;
        let before = census::live_bytes();
        echo_through(&pool, &k, echo, b"hello").await;
        settle().await;
        let fresh = census::live_bytes();
        eprintln!(
            "fresh idle connection: {} bytes\n{}",
            fresh - before,
            census::report(25)
        );
        let bytes: usize =
            std::env::var("CENSUS_STREAM_BYTES").map_or(100_000, |v| v.parse().unwrap());
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let pool = pool.clone();
            let k = k.clone();
            tasks.push(tokio::spawn(async move {
                echo_through(&pool, &k, echo, &vec![7u8; bytes]).await
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(pool.size(), 1);
        settle().await;
        let after = census::live_bytes();
        eprintln!(
            "after 100 streams: {} bytes more\n{}",
            after - fresh,
            census::report(25)
        );
    }

    /// Holds a tunnel open (the echo server answers nothing until data comes).
    async fn hold(pool: &Pool, key: &PoolKey, echo: SocketAddr) -> Result<Stream, HboneError> {
        pool.connect(key, echo, HeaderMap::new()).await
    }

    #[tokio::test]
    async fn a_full_connection_gets_a_sibling_and_a_full_key_fails_after_a_bounded_wait() {
        let (server, echo) = (tunnel_server().await, echo_server().await);
        let wait = Duration::from_millis(300);
        let pool = pool(PoolLimits {
            streams_per_connection: 2,
            connections_per_key: 2,
            wait,
            ..PoolLimits::default()
        });
        let k = key("c", server);
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(hold(&pool, &k, echo).await.unwrap());
        }
        let mut ids: Vec<u64> = held.iter().map(|s| s.connection_id).collect();
        ids.dedup();
        assert_eq!(
            ids.len(),
            2,
            "two streams per connection, then another: {ids:?}"
        );
        assert_eq!(pool.stats().active_streams, 4);

        let started = Instant::now();
        let err = hold(&pool, &k, echo).await.unwrap_err();
        assert!(
            matches!(err, HboneError::Exhausted { streams: 4, .. }),
            "{err}"
        );
        assert!(
            started.elapsed() >= wait,
            "it waited {:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() < wait * 3,
            "and no longer: {:?}",
            started.elapsed()
        );
        let exhausted = pool
            .metrics
            .hbone_pool_refused
            .get_or_create(&crate::metrics::PoolRefusalLabels {
                reason: PoolRefusal::Exhausted,
            })
            .get();
        assert_eq!(exhausted, 1);

        // A stream that ends within the wait makes room for a waiting CONNECT.
        let waiting = {
            let (pool, k) = (pool.clone(), k.clone());
            tokio::spawn(async move { hold(&pool, &k, echo).await.map(|s| s.connection_id) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let freed = held.remove(0).connection_id;
        drop(held);
        assert_eq!(waiting.await.unwrap().unwrap(), freed);
        // Another pod of the same service account is a key of its own: never blocked by it.
        let other_pod = key_from("c", server, Ipv4Addr::new(10, 1, 0, 9));
        hold(&pool, &other_pod, echo).await.unwrap();
    }

    #[tokio::test]
    async fn a_burst_of_connects_shares_dials_and_a_failed_dial_fails_its_waiters() {
        let (server, echo) = (tunnel_server().await, echo_server().await);
        let pool = pool(PoolLimits {
            streams_per_connection: 10,
            ..PoolLimits::default()
        });
        let k = key("c", server);
        let burst: Vec<_> = (0..35)
            .map(|_| {
                let (pool, k) = (pool.clone(), k.clone());
                tokio::spawn(async move { hold(&pool, &k, echo).await.unwrap() })
            })
            .collect();
        let mut held = Vec::new();
        for t in burst {
            held.push(t.await.unwrap());
        }
        assert_eq!(
            pool.connections_opened.load(Ordering::Relaxed),
            4,
            "35 streams, 10 each"
        );

        let closed = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let dead = closed.local_addr().unwrap();
        drop(closed);
        let dk = key("c", dead);
        let failing: Vec<_> = (0..20)
            .map(|_| {
                let (pool, dk) = (pool.clone(), dk.clone());
                tokio::spawn(async move { hold(&pool, &dk, dead).await })
            })
            .collect();
        for t in failing {
            let err = t.await.unwrap().unwrap_err();
            assert!(matches!(err, HboneError::Connect { .. }), "{err}");
        }
    }
}
