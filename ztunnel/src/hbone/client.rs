//! The HBONE client's transport: TCP from the source pod (its netns and address) with the proxy
//! mark, then mutual TLS as the source workload, accepting only a server that proves the destination's identity (secure
//! naming). The pool ([`super::pool`]) calls it through its [`Connector`] for every new
//! connection.
use std::{io, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{Authenticated, Connector, Io, PoolKey};
use crate::{
    identity::{CertError, CertificateCache},
    metrics::{Metrics, Side},
    netns::Netns,
    socket, tls,
};

/// How long the TCP connect to a peer may take (the whole handshake is bounded by the pool).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why no mTLS connection to a peer was made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no certificate for {id}: {source}")]
    NoCertificate {
        id: crate::identity::SpiffeId,
        source: CertError,
    },
    #[error("{0}")]
    Connect(io::Error),
    /// The TLS handshake failed; `reason` is its metric label ([`tls::classify`]).
    #[error("{source}")]
    Handshake {
        reason: &'static str,
        source: io::Error,
    },
}

impl From<DialError> for io::Error {
    fn from(e: DialError) -> Self {
        match e {
            DialError::Connect(e) | DialError::Handshake { source: e, .. } => e,
            e @ DialError::NoCertificate { .. } => io::Error::other(e.to_string()),
        }
    }
}

/// Dials `key.addr` from inside the source pod's netns (`key.origin`, from the pod's own
/// address, so the destination sees the pod; the thread returns to `home`) and authenticates
/// both ends: ours as `key.src`, the peer as `key.dst` (the only identity accepted).
pub async fn dial(
    certs: &CertificateCache,
    roots: &[CertificateDer<'static>],
    home: &Netns,
    key: &PoolKey,
) -> Result<Authenticated<TlsStream<TcpStream>>, DialError> {
    let cert = certs
        .get(&key.src)
        .await
        .map_err(|source| DialError::NoCertificate {
            id: key.src.clone(),
            source,
        })?;
    let config = tls::client_config(&cert, roots, vec![key.dst.clone()]);
    let socket = key
        .origin
        .netns
        .run(home, || socket::marked(key.addr))
        .and_then(|s| s)
        .and_then(|s| {
            if let Some(ip) = key.origin.ip {
                socket::bind_address_only(&s, ip)?;
            }
            Ok(s)
        })
        .map_err(DialError::Connect)?;
    let tcp = socket::connect(socket, key.addr, CONNECT_TIMEOUT)
        .await
        .map_err(DialError::Connect)?;
    // Identity is checked on the SPIFFE URI, not on a server name.
    let name = ServerName::IpAddress(key.addr.ip().into());
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|source| DialError::Handshake {
            reason: tls::classify_io(&source),
            source,
        })?;
    // The verifier accepted only `key.dst`; read back what it verified.
    let peer = tls::peer_identity(stream.get_ref().1).map_err(|e| DialError::Handshake {
        reason: e.reason(),
        source: io::Error::other(e),
    })?;
    Ok(Authenticated { peer, stream })
}

/// The pool's connector: [`dial`], counting each handshake (`ok` or why not).
pub fn connector(
    certs: Arc<CertificateCache>,
    roots: Vec<CertificateDer<'static>>,
    metrics: Arc<Metrics>,
    home: Arc<Netns>,
) -> Connector {
    Arc::new(move |key: PoolKey| {
        let (certs, roots, metrics) = (certs.clone(), roots.clone(), metrics.clone());
        let home = home.clone();
        Box::pin(async move {
            match dial(&certs, &roots, &home, &key).await {
                Ok(tls) => {
                    metrics.handshake(Side::Outbound, "ok");
                    Ok(Box::new(tls.stream) as Box<dyn Io>)
                }
                Err(e) => {
                    if let DialError::Handshake { reason, .. } = &e {
                        metrics.handshake(Side::Outbound, reason);
                    }
                    Err(e.into())
                }
            }
        })
    })
}
