//! The proxy's own sockets. Every socket the proxy dials carries [`PROXY_MARK`], so the capture
//! programs never take it (it leaves with its netns's own address and is not captured again);
//! every socket is non-blocking, and small writes (TLS records, HTTP/2 frames, request/response
//! exchanges) never wait for Nagle: latency is the product.
use std::{io, net::SocketAddr, time::Duration};

use tokio::net::TcpStream;
use ztunnel_common::PROXY_MARK;

/// Listen backlog of the per-pod listeners.
const BACKLOG: i32 = 1024;

fn tcp(addr: SocketAddr) -> io::Result<socket2::Socket> {
    socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
}

/// A socket to dial `dst` with, in the netns of the calling thread.
pub fn marked(dst: SocketAddr) -> io::Result<socket2::Socket> {
    let socket = tcp(dst)?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    Ok(socket)
}

/// Connects a socket made by [`marked`], giving up after `timeout`.
pub async fn connect(
    socket: socket2::Socket,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// A listener on `addr`, in the netns of the calling thread (IPv6 ones take IPv6 only).
pub fn listen(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let s = tcp(addr)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s)
}
