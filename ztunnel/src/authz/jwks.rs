//! JSON Web Key Sets named by `jwksUri`: fetched on first use over HTTP or HTTPS (system
//! roots), cached, refreshed every [`REFRESH`], fetched again early when a token names a key id
//! the set does not have (key rotation), and kept in use when a refresh fails.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

/// How long a fetched set is used before it is fetched again.
pub const REFRESH: Duration = Duration::from_secs(20 * 60);
/// The shortest time between two fetches of one URI (failed fetches and key-id misses).
pub const RETRY: Duration = Duration::from_secs(10);
/// How long one fetch may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest key set accepted.
const MAX_BYTES: usize = 1024 * 1024;
/// Roots for `https` URIs (Debian's bundle; `SSL_CERT_FILE` overrides it).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Default)]
struct Entry {
    set: Option<Arc<JwkSet>>,
    fetched: Option<Instant>,
    attempted: Option<Instant>,
}

/// Key sets by URI.
pub struct JwksCache {
    entries: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Entry>>>>,
    retry: Duration,
}

impl Default for JwksCache {
    fn default() -> Self {
        Self::with_retry(RETRY)
    }
}

impl JwksCache {
    /// A cache that fetches a URI at most once per `retry` beyond its regular refresh.
    pub fn with_retry(retry: Duration) -> Self {
        Self {
            entries: Mutex::default(),
            retry,
        }
    }

    /// The set of `uri`, fetching it if it is missing or old, or (with `refresh`) to look for
    /// a rotated key. `None` if it was never fetched successfully.
    pub async fn get(&self, uri: &str, refresh: bool) -> Option<Arc<JwkSet>> {
        let entry = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(uri.to_owned())
            .or_default()
            .clone();
        // One fetch per URI at a time; other requests for it wait for its result.
        let mut e = entry.lock().await;
        let now = Instant::now();
        let fresh = e.fetched.is_some_and(|t| now - t < REFRESH);
        let recently_tried = e.attempted.is_some_and(|t| now - t < self.retry);
        if (fresh && !refresh) || recently_tried {
            return e.set.clone();
        }
        e.attempted = Some(now);
        match tokio::time::timeout(TIMEOUT, fetch(uri)).await {
            Ok(Ok(set)) => {
                info!(
                    jwks_uri = uri,
                    keys = set.keys.len(),
                    "fetched JSON Web Key Set"
                );
                e.set = Some(Arc::new(set));
                e.fetched = Some(now);
            }
            Ok(Err(error)) => {
                warn!(jwks_uri = uri, error = %error, kept = e.set.is_some(), "JSON Web Key Set fetch failed")
            }
            Err(_) => {
                warn!(
                    jwks_uri = uri,
                    kept = e.set.is_some(),
                    "JSON Web Key Set fetch timed out"
                )
            }
        }
        e.set.clone()
    }
}

/// Fetches and parses the key set at `uri`.
pub async fn fetch(uri: &str) -> Result<JwkSet, String> {
    let url: Uri = uri.parse().map_err(|e| format!("bad URI: {e}"))?;
    let https = match url.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("only http and https are supported".into()),
    };
    let host = url.host().ok_or("the URI has no host")?.to_owned();
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let body = if https {
        let config = client_config()?;
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
            .map_err(|e| format!("bad server name: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        get(tls, &url).await?
    } else {
        get(tcp, &url).await?
    };
    serde_json::from_slice(&body).map_err(|e| format!("not a JSON Web Key Set: {e}"))
}

fn client_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let path = std::env::var("SSL_CERT_FILE").unwrap_or_else(|_| SYSTEM_ROOTS.into());
    let pem = std::fs::read(&path).map_err(|e| format!("reading roots {path}: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

async fn get<IO>(io: IO, url: &Uri) -> Result<Bytes, String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let authority = url.authority().map(|a| a.as_str()).unwrap_or_default();
    let path = url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = Request::get(path)
        .header(header::HOST, authority)
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    Limited::new(resp.into_body(), MAX_BYTES)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| format!("reading the body: {e}"))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// An HTTP server on loopback answering every request with `body()` (or 500 when `None`),
    /// counting requests.
    async fn serve(body: Arc<Mutex<Option<String>>>, hits: Arc<AtomicUsize>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                hits.fetch_add(1, Ordering::SeqCst);
                let resp = match body.lock().unwrap().clone() {
                    Some(b) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
                        b.len()
                    ),
                    None => "HTTP/1.1 500 Oops\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into(),
                };
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        format!("http://{addr}/.well-known/jwks.json")
    }

    fn kid(set: &JwkSet) -> Option<String> {
        set.keys[0].common.key_id.clone()
    }

    #[tokio::test]
    async fn fetched_cached_rotated_and_kept_through_an_outage() {
        let key = |kid: &str| {
            format!(r#"{{"keys":[{{"kty":"oct","kid":"{kid}","k":"c2VjcmV0","alg":"HS256"}}]}}"#)
        };
        let body = Arc::new(Mutex::new(Some(key("a"))));
        let hits = Arc::new(AtomicUsize::new(0));
        let uri = serve(body.clone(), hits.clone()).await;
        let cache = JwksCache::with_retry(Duration::ZERO);

        let set = cache.get(&uri, false).await.expect("fetched");
        assert_eq!(kid(&set).as_deref(), Some("a"));
        cache.get(&uri, false).await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 1, "cached until the refresh");

        *body.lock().unwrap() = Some(key("b"));
        let set = cache.get(&uri, true).await.unwrap();
        assert_eq!(
            kid(&set).as_deref(),
            Some("b"),
            "a rotated key is picked up"
        );

        *body.lock().unwrap() = None;
        let set = cache.get(&uri, true).await.unwrap();
        assert_eq!(
            kid(&set).as_deref(),
            Some("b"),
            "kept while the provider fails"
        );
        assert_eq!(hits.load(Ordering::SeqCst), 3);

        // Never fetched: nothing to use, which fails tokens that need it.
        assert!(cache.get("http://127.0.0.1:1/jwks", false).await.is_none());
        // Retries are rate-limited.
        let slow = JwksCache::with_retry(Duration::from_secs(3600));
        *body.lock().unwrap() = None;
        assert!(slow.get(&uri, false).await.is_none());
        *body.lock().unwrap() = Some(key("c"));
        assert!(
            slow.get(&uri, true).await.is_none(),
            "not again within the retry interval"
        );
    }
}
