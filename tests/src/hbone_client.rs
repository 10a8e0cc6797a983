//! A raw HBONE client for refusal tests: mutual TLS from a node's netns with a certificate
//! from the cluster's CA (made the way the proxy makes its own), then one CONNECT per
//! authority, to see exactly what a node proxy answers on the wire.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Result;
use ztunnel::{
    identity::{CaFiles, CacheOptions, CertificateCache, SpiffeId},
    netns::Netns,
    tls,
};

use crate::Cluster;

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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let ca = CaFiles::load(&c.ca_dir())?;
        let roots = ca.roots();
        let certs = CertificateCache::new(Arc::new(ca), roots.clone(), CacheOptions::default());
        let client_id = SpiffeId::new("cluster.local", client.0, client.1)?;
        let cert = certs.get(&client_id).await?;
        let server_id = SpiffeId::new("cluster.local", server.0, server.1)?;
        let config = tls::client_config(&cert, &roots, vec![server_id]);
        // The socket is made inside the node's netns and keeps it.
        let home = Netns::current()?;
        let addr: SocketAddr = hbone.parse()?;
        let tcp = Netns::open(&c.node(from_node).netns_path())?.run(&home, || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(15))
        })??;
        tcp.set_nonblocking(true)?;
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(tls::server_name(addr.ip()), tcp)
            .await?;
        let (send, conn) = h2::client::handshake(tls).await?;
        tokio::spawn(conn);
        let mut statuses = Vec::new();
        for authority in authorities {
            let request = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(authority.as_str())
                .body(())?;
            let mut ready = send.clone().ready().await?;
            let (response, _stream) = ready.send_request(request, false)?;
            statuses.push(response.await?.status().as_u16());
        }
        anyhow::Ok(statuses)
    })
}
