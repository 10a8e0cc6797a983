//! A raw HBONE client for refusal and abuse tests: mutual TLS from a node's netns with a
//! certificate from the cluster's CA (made the way the proxy makes its own), then whatever the
//! test wants on the wire: well-formed CONNECTs, no ALPN, silence, streams reset at once, or a
//! peer that stops answering (a [`Freezable`] transport).
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Result;
use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;
use ztunnel::{
    identity::{CaFiles, CacheOptions, CertificateCache, SpiffeId},
    netns::Netns,
    tls,
};

use crate::Cluster;

/// A current-thread runtime for a test's raw client.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Dials HBONE listeners from one node's netns as `spiffe://cluster.local/ns/<ns>/sa/<sa>`,
/// accepting only a server that proves the expected identity.
pub struct RawClient {
    config: Arc<tokio_rustls::rustls::ClientConfig>,
    node: Netns,
    home: Netns,
}

impl RawClient {
    /// Must run inside a runtime (the certificate is issued asynchronously).
    pub async fn new(
        c: &Cluster,
        from_node: usize,
        client: (&str, &str),
        server: (&str, &str),
    ) -> Result<Self> {
        let ca = CaFiles::load(&c.ca_dir())?;
        let roots = ca.roots();
        let certs = CertificateCache::new(Arc::new(ca), roots.clone(), CacheOptions::default());
        let client_id = SpiffeId::new("cluster.local", client.0, client.1)?;
        let cert = certs.get(&client_id).await?;
        let server_id = SpiffeId::new("cluster.local", server.0, server.1)?;
        Ok(Self {
            config: tls::client_config(&cert, &roots, vec![server_id]),
            node: Netns::open(&c.node(from_node).netns_path())?,
            home: Netns::current()?,
        })
    }

    /// A TCP connection to `addr` made inside the node's netns (the socket keeps it).
    pub async fn tcp(&self, addr: SocketAddr) -> Result<TcpStream> {
        let tcp = self.node.run(&self.home, || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(15))
        })??;
        tcp.set_nonblocking(true)?;
        Ok(TcpStream::from_std(tcp)?)
    }

    /// Mutual TLS to `addr`, offering `alpn` (HBONE's is `[b"h2"]`).
    pub async fn tls_with_alpn(
        &self,
        addr: SocketAddr,
        alpn: &[&[u8]],
    ) -> Result<TlsStream<TcpStream>> {
        let mut config = (*self.config).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = self.tcp(addr).await?;
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(tls::server_name(addr.ip()), tcp)
            .await?)
    }

    /// Mutual TLS with ALPN `h2`, then HTTP/2 (its connection driven by a spawned task, which
    /// ends with the connection's error, if any).
    pub async fn h2<S>(&self, io: S) -> Result<(h2::client::SendRequest<Bytes>, H2Task)>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = h2::client::handshake(io).await?;
        Ok((send, tokio::spawn(async move { conn.await.err() })))
    }

    pub async fn tls(&self, addr: SocketAddr) -> Result<TlsStream<TcpStream>> {
        self.tls_with_alpn(addr, &[tls::ALPN_H2]).await
    }
}

/// The task driving a raw client's HTTP/2 connection: its error when it ended.
pub type H2Task = tokio::task::JoinHandle<Option<h2::Error>>;

/// Sends a CONNECT for `authority` and waits for the status; the stream stays open.
pub async fn connect(
    send: &h2::client::SendRequest<Bytes>,
    authority: &str,
) -> Result<(u16, h2::SendStream<Bytes>, h2::RecvStream)> {
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .body(())?;
    let mut ready = send.clone().ready().await?;
    let (response, stream) = ready.send_request(request, false)?;
    let response = response.await?;
    Ok((response.status().as_u16(), stream, response.into_body()))
}

/// A transport that can be frozen: from then on it neither reads nor writes, yet stays open,
/// as a peer that hung (its kernel still acknowledges, nothing answers).
pub struct Freezable<S> {
    inner: S,
    frozen: Arc<AtomicBool>,
}

impl<S> Freezable<S> {
    /// The transport and its switch.
    pub fn new(inner: S) -> (Self, Arc<AtomicBool>) {
        let frozen = Arc::new(AtomicBool::new(false));
        (
            Self {
                inner,
                frozen: frozen.clone(),
            },
            frozen,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Freezable<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.frozen.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Freezable<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.frozen.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.frozen.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Connects from `from_node`'s netns to `hbone` as `spiffe://cluster.local/ns/<ns>/sa/<sa>` of
/// `client`, accepting only a server proving `server`, and sends one CONNECT per authority;
/// returns the response statuses in order.
pub fn connect_statuses(
    c: &Cluster,
    from_node: usize,
    hbone: &str,
    client: (&str, &str),
    server: (&str, &str),
    authorities: &[String],
) -> Result<Vec<u16>> {
    runtime()?.block_on(async {
        let raw = RawClient::new(c, from_node, client, server).await?;
        let tls = raw.tls(hbone.parse()?).await?;
        let (send, _conn) = raw.h2(tls).await?;
        let mut statuses = Vec::new();
        for authority in authorities {
            statuses.push(connect(&send, authority).await?.0);
        }
        anyhow::Ok(statuses)
    })
}
