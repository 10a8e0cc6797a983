//! The HBONE client: a pool with one HTTP/2 connection per (source pod, source identity,
//! destination identity, destination address), many CONNECT streams over each, closed when idle.
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
use tracing::{debug, info};

use super::stream::{
    StreamIo, CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, MAX_FRAME_SIZE, STREAM_WINDOW,
};
use crate::{
    identity::{BoxFuture, SpiffeId},
    netns::Netns,
};

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
}

struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    last_used: Mutex<Instant>,
}

/// One slot per key; the async mutex makes concurrent first users share one handshake.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Conn>>>>;

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
    slots: Mutex<HashMap<PoolKey, Slot>>,
    connector: Connector,
    idle_timeout: Duration,
    next_id: AtomicU64,
    /// Connections ever opened, for tests and metrics.
    pub connections_opened: AtomicU64,
    pub streams_opened: AtomicU64,
}

/// A CONNECT stream; keeps its connection counted as busy until dropped (a relay that takes
/// `io` leaves the rest to drop when it ends).
pub struct Stream {
    /// Which pooled connection carries it (for logs: streams with one id share a TLS session).
    pub connection_id: u64,
    pub io: StreamIo,
    _active: ActiveGuard,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("connection_id", &self.connection_id)
            .finish_non_exhaustive()
    }
}

struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub fn new(connector: Connector, idle_timeout: Duration) -> Arc<Self> {
        let pool = Arc::new(Self {
            slots: Mutex::default(),
            connector,
            idle_timeout,
            next_id: AtomicU64::new(1),
            connections_opened: AtomicU64::new(0),
            streams_opened: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(idle_timeout / 2);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.expire_idle();
            }
        });
        pool
    }

    /// Drops connections that carried no stream for the idle timeout: dropping the last
    /// `SendRequest` makes h2 close the connection gracefully (GOAWAY).
    fn expire_idle(&self) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|key, slot| {
            let Ok(mut guard) = slot.try_lock() else {
                return true; // someone is connecting right now
            };
            let idle = guard.as_ref().is_some_and(|c| {
                c.closed.load(Ordering::Relaxed)
                    || (c.active.load(Ordering::Relaxed) == 0
                        && c.last_used
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .elapsed()
                            >= self.idle_timeout)
            });
            if idle || guard.is_none() {
                if let Some(c) = guard.take() {
                    debug!(connection = c.id, src = %key.src, dst = %key.dst, addr = %key.addr,
                        "closing idle HBONE connection");
                }
                return false;
            }
            true
        });
    }

    /// Connections currently pooled.
    pub fn size(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Connection and stream counts, for metrics.
    pub fn stats(&self) -> PoolStats {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut stats = PoolStats {
            connections_opened: self.connections_opened.load(Ordering::Relaxed),
            streams_opened: self.streams_opened.load(Ordering::Relaxed),
            ..Default::default()
        };
        for slot in slots.values() {
            // A slot being connected right now is not a connection yet.
            if let Ok(guard) = slot.try_lock() {
                if let Some(c) = guard.as_ref().filter(|c| !c.closed.load(Ordering::Relaxed)) {
                    stats.connections += 1;
                    stats.active_streams += c.active.load(Ordering::Relaxed);
                }
            }
        }
        stats
    }

    async fn connection(&self, key: &PoolKey) -> Result<Arc<Conn>, HboneError> {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(conn) = slot.as_ref() {
            if !conn.closed.load(Ordering::Relaxed) {
                return Ok(conn.clone());
            }
        }
        let conn = Arc::new(self.open(key).await?);
        *slot = Some(conn.clone());
        Ok(conn)
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
        let (send, connection) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
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
        tokio::spawn(async move {
            let result = connection.await;
            done.store(true, Ordering::Relaxed);
            debug!(connection = id, %src, %dst, %addr, error = ?result.err(), "HBONE connection ended");
        });
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        info!(connection = id, src = %key.src,
            src_ip = key.origin.ip.map(|ip| ip.to_string()).as_deref(), dst = %key.dst,
            addr = %key.addr, "HBONE connection opened");
        Ok(Conn {
            id,
            send,
            closed,
            active: Arc::default(),
            last_used: Mutex::new(Instant::now()),
        })
    }

    /// Opens a tunnel to `target` over the pooled connection for `key`.
    pub async fn connect(
        &self,
        key: &PoolKey,
        target: SocketAddr,
        headers: HeaderMap,
    ) -> Result<Stream, HboneError> {
        // A connection found dead between our check and its use is replaced once.
        let mut retried = false;
        loop {
            let conn = self.connection(key).await?;
            match self.open_stream(&conn, target, headers.clone()).await {
                Err(HboneError::Protocol(e)) if !retried && (e.is_io() || e.is_go_away()) => {
                    conn.closed.store(true, Ordering::Relaxed);
                    retried = true;
                }
                other => return other,
            }
        }
    }

    async fn open_stream(
        &self,
        conn: &Arc<Conn>,
        target: SocketAddr,
        headers: HeaderMap,
    ) -> Result<Stream, HboneError> {
        conn.active.fetch_add(1, Ordering::Relaxed);
        let guard = ActiveGuard(conn.active.clone());
        *conn.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(())
            .expect("a socket address is a valid authority");
        *request.headers_mut() = headers;
        // `ready` waits while the peer's concurrent-stream limit is reached.
        let mut send = conn.send.clone().ready().await?;
        let (response, stream) = send.send_request(request, false)?;
        let response = response.await?;
        if response.status() != StatusCode::OK {
            return Err(HboneError::Refused(response.status()));
        }
        self.streams_opened.fetch_add(1, Ordering::Relaxed);
        Ok(Stream {
            connection_id: conn.id,
            io: StreamIo::new(stream, response.into_body()),
            _active: guard,
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
        hbone::server::{self, Handler},
        relay,
    };

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
                tokio::spawn(server::serve(io, handler.clone(), |_, _| {}));
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
        let pool = Pool::new(plain_connector(), Duration::from_secs(30));
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
        let pool = Pool::new(plain_connector(), Duration::from_secs(30));
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
        let pool = Pool::new(plain_connector(), Duration::from_millis(200));
        let k = key("c", server);
        let (id1, _) = echo_through(&pool, &k, echo, b"a").await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(pool.size(), 0, "the idle connection was expired");
        let (id2, _) = echo_through(&pool, &k, echo, b"b").await;
        assert_ne!(id1, id2);
    }
}
