//! The proxy's own sockets. Every socket the proxy dials carries [`PROXY_MARK`], so the capture
//! programs never take it (it leaves with its netns's own address and is not captured again),
//! or, delivering to an application from the caller's address, [`DELIVERY_MARK`];
//! every socket is non-blocking, and small writes (TLS records, HTTP/2 frames, request/response
//! exchanges) never wait for Nagle: latency is the product.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::net::TcpStream;
use ztunnel_common::{DELIVERY_MARK, PROXY_MARK};

/// Listen backlog of the per-pod listeners.
const BACKLOG: i32 = 1024;

/// Non-blocking from `socket(2)` on (`SOCK_NONBLOCK`): no `fcntl` pair per connection.
fn tcp(addr: SocketAddr) -> io::Result<socket2::Socket> {
    socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )
}

/// A socket to dial `dst` with, in the netns of the calling thread.
pub fn marked(dst: SocketAddr) -> io::Result<socket2::Socket> {
    let socket = tcp(dst)?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_nodelay(true)?;
    Ok(socket)
}

/// A socket to deliver a connection to an application from `caller`, an address that is not
/// this netns's own: transparent (`IP_TRANSPARENT`, which needs `CAP_NET_ADMIN`), marked
/// [`DELIVERY_MARK`], and bound now, port included, so its 4-tuple is known before it
/// connects (docs/capture.md, "Inbound delivery").
pub fn transparent(caller: IpAddr, dst: SocketAddr) -> io::Result<socket2::Socket> {
    let socket = tcp(dst)?;
    socket.set_mark(DELIVERY_MARK)?;
    match dst {
        SocketAddr::V4(_) => socket.set_ip_transparent(true)?,
        SocketAddr::V6(_) => set_int_option(&socket, libc::SOL_IPV6, libc::IPV6_TRANSPARENT)?,
    }
    socket.set_nodelay(true)?;
    socket.bind(&SocketAddr::new(caller, 0).into())?;
    Ok(socket)
}

/// Sets an integer socket option to 1.
fn set_int_option(
    socket: &socket2::Socket,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int option value on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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

/// Binds `socket` to `ip` without reserving a port yet (`IP_BIND_ADDRESS_NO_PORT`): the port
/// is picked at connect time, per destination, so a busy pod does not run out of ports.
pub fn bind_address_only(socket: &socket2::Socket, ip: IpAddr) -> io::Result<()> {
    set_int_option(socket, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT)?;
    socket.bind(&SocketAddr::new(ip, 0).into())
}

/// A listener on `addr`, in the netns of the calling thread (IPv6 ones take IPv6 only).
pub fn listen(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let s = tcp(addr)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};

    use super::*;

    /// Every socket the proxy makes is non-blocking from its creation (tokio needs it so; no
    /// `fcntl` after `socket(2)`).
    #[test]
    fn sockets_are_created_non_blocking() {
        let dst = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
        assert!(marked(dst).unwrap().nonblocking().unwrap());
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        assert!(listen(any).unwrap().nonblocking().unwrap());
    }

    /// The tunnel's socket leaves from the address it was bound to, on either family, with the
    /// port chosen at connect time.
    #[tokio::test]
    async fn tunnel_sockets_leave_from_the_bound_address() {
        for (bind, listen) in [
            (
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
                IpAddr::V4(Ipv4Addr::LOCALHOST),
            ),
            (
                IpAddr::V6(Ipv6Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ),
        ] {
            let Ok(listener) = TcpListener::bind((listen, 0)) else {
                continue; // no IPv6 on this host
            };
            let dst = listener.local_addr().unwrap();
            let socket = marked(dst).unwrap();
            bind_address_only(&socket, bind).unwrap();
            let tcp = tokio::net::TcpSocket::from_std_stream(socket.into())
                .connect(dst)
                .await
                .unwrap();
            let local = tcp.local_addr().unwrap();
            assert_eq!(local.ip(), bind);
            assert_ne!(local.port(), 0);
            let (_, peer) = listener.accept().unwrap();
            assert_eq!(peer, local);
        }
    }
}
