//! The proxy paths for captured connections (DESIGN §3, §4).
//!
//! * [`outbound`]: a pod's connect, redirected to its 127.0.0.1:15001 listener; the original
//!   destination comes from the BPF `orig_dst_by_peer` map.
//! * [`inbound`]: TCP arriving at a pod from outside, steered by `sk_lookup` to the pod's 15006
//!   listener; the accepted socket's local address is the original destination.
//!
//! Every upstream socket is created inside the network namespace of the pod it serves and
//! carries [`PROXY_MARK`], so it leaves with the pod's own address and is never captured again.
pub mod inbound;
pub mod outbound;
mod relay;

pub use relay::{reset, Relayed};

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{net::TcpStream, sync::watch};
use ztunnel_common::PROXY_MARK;

use crate::{capture::OrigDstTable, netns::Netns, state::Snapshot};

/// How long an upstream connect may take before the client connection is closed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An enrolled pod as the proxy paths see it: who it is and where its sockets live.
#[derive(Debug)]
pub struct PodContext {
    /// `namespace/name`.
    pub workload: String,
    pub netns: Netns,
    pub netns_cookie: u64,
}

/// State shared by all proxy paths of this node.
pub struct Proxy {
    home: Arc<Netns>,
    orig_dst: Arc<OrigDstTable>,
    config: watch::Receiver<Arc<Snapshot>>,
    /// Round-robin position per (service namespace, name, port).
    round_robin: Mutex<HashMap<(String, String, u16), usize>>,
}

impl Proxy {
    pub fn new(
        home: Arc<Netns>,
        orig_dst: Arc<OrigDstTable>,
        config: watch::Receiver<Arc<Snapshot>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            home,
            orig_dst,
            config,
            round_robin: Mutex::default(),
        })
    }

    /// The configuration in force right now.
    fn snapshot(&self) -> Arc<Snapshot> {
        self.config.borrow().clone()
    }

    /// Next index (modulo `n`) for a service port's round-robin.
    fn next_endpoint(&self, key: (String, String, u16), n: usize) -> usize {
        let mut rr = self.round_robin.lock().unwrap_or_else(|p| p.into_inner());
        let slot = rr.entry(key).or_default();
        let i = *slot % n;
        *slot = slot.wrapping_add(1);
        i
    }

    /// Connects to `dst` from inside `pod`'s network namespace with the proxy mark.
    async fn connect_from(&self, pod: &PodContext, dst: SocketAddr) -> io::Result<TcpStream> {
        let socket = pod.netns.run(&self.home, || new_marked_socket(dst))??;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        }
    }
}

fn new_marked_socket(dst: SocketAddr) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(dst),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    Ok(socket)
}

/// Ports of the proxy itself; traffic addressed to them is never forwarded (it would loop).
pub fn is_proxy_port(port: u16) -> bool {
    use ztunnel_common::*;
    [
        OUTBOUND_PORT,
        INBOUND_PLAINTEXT_PORT,
        HBONE_PORT,
        METRICS_PORT,
        READINESS_PORT,
        ADMIN_PORT,
    ]
    .contains(&port)
}
