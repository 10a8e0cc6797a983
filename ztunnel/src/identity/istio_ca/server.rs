//! The CSR server: any [`CertificateProvider`] behind Istio's CA API, on TLS.
use std::{
    convert::Infallible,
    fmt,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tonic::{
    body::Body,
    transport::server::{Connected, TcpConnectInfo},
    Status,
};
use tracing::{debug, info, warn};

use super::{
    auth::{AllowAll, AuthError, Authenticator, StaticToken},
    ca_service_identity, certificate_spiffe_id, csr_spiffe_id, IstioCertificateRequest,
    IstioCertificateResponse, CREATE_CERTIFICATE_PATH, IMPERSONATED_IDENTITY,
};
use crate::identity::{ca::EmbeddedCa, BoxFuture, CertificateProvider, ProviderError, SpiffeId};

/// What a request with `validity_duration: 0` gets (Istio's default workload certificate TTL).
const DEFAULT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// A CSR is well under a few KiB; this bounds what an unauthenticated caller makes us buffer.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// A peer that stalls the TLS handshake is dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on one request, whatever deadline the caller sent.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Validity asked for the CA service's own certificate; it is renewed at half its lifetime.
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// The CA service's own TLS certificate and key. Clones share one slot: [`ServerTls::update`]
/// makes new handshakes of every server using it present the new certificate.
#[derive(Clone)]
pub struct ServerTls {
    current: Arc<ArcSwap<CertifiedKey>>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("chain_len", &self.current.load().cert.len())
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ServerTls {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

impl ServerTls {
    /// A certificate chain (leaf first; the root may be included) and its private key.
    pub fn new(
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> anyhow::Result<Self> {
        if cert_chain.is_empty() {
            bail!("the server certificate chain is empty");
        }
        let key = CertifiedKey::from_der(cert_chain, key, &provider())
            .context("the server key is unusable or does not match the certificate")?;
        Ok(Self {
            current: Arc::new(ArcSwap::from_pointee(key)),
        })
    }

    /// From PEM text: the certificate chain, and a PKCS#8, PKCS#1 or SEC1 key.
    pub fn from_pem(cert_chain_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        let chain = rustls_pemfile::certs(&mut cert_chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("the server certificate PEM is malformed")?;
        // The key's own parse error could quote key bytes; say only where it went wrong.
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .map_err(|_| anyhow::anyhow!("the server key PEM is malformed"))?
            .context("the server key PEM holds no private key")?;
        Self::new(chain, key)
    }

    /// From PEM files.
    pub fn from_files(cert_chain: &Path, key: &Path) -> anyhow::Result<Self> {
        let chain = std::fs::read_to_string(cert_chain)
            .with_context(|| format!("cannot read {}", cert_chain.display()))?;
        let key_pem = std::fs::read_to_string(key)
            .with_context(|| format!("cannot read {}", key.display()))?;
        Self::from_pem(&chain, &key_pem)
            .with_context(|| format!("{} / {}", cert_chain.display(), key.display()))
    }

    /// Serve `other`'s certificate from now on (certificate rotation).
    pub fn update(&self, other: &ServerTls) {
        self.current.store(other.current.load_full());
    }

    fn rustls_config(&self) -> anyhow::Result<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 with the ring provider")?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(self.clone()));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// The names the CA service's certificate carries besides its SPIFFE id. Clients that verify
/// a CA by the host they dial (Istio's ztunnel with `CA_ADDRESS`, or `ALT_CA_HOSTNAME`) accept
/// it only if that name is among them; our own clients verify the SPIFFE id and ignore them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServingNames {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

/// The DNS names of the CA's Service (`ztunnel-ca` in `istio-system`, as the chart installs
/// it), short to fully qualified: what `ca serve` puts in its certificate by default.
pub const DEFAULT_SERVICE_NAMES: [&str; 4] = [
    "ztunnel-ca",
    "ztunnel-ca.istio-system",
    "ztunnel-ca.istio-system.svc",
    "ztunnel-ca.istio-system.svc.cluster.local",
];

impl ServingNames {
    /// The defaults for a service listening on `listen`: [`DEFAULT_SERVICE_NAMES`], and the
    /// listening IP unless it is the wildcard (then clients dial a name, or an IP that must be
    /// given).
    pub fn defaults(listen: SocketAddr) -> Self {
        Self {
            dns: DEFAULT_SERVICE_NAMES.map(str::to_owned).to_vec(),
            ips: (!listen.ip().is_unspecified())
                .then_some(listen.ip())
                .into_iter()
                .collect(),
        }
    }
}

/// Issues the CA service's own serving certificate from `signer`: a fresh key (kept in memory
/// only) and an SVID for `identity` that also carries `names`. Returns it with the time left
/// until it expires.
pub async fn issue_server_tls(
    signer: &EmbeddedCa,
    identity: &SpiffeId,
    names: &ServingNames,
    validity: Duration,
) -> anyhow::Result<(ServerTls, Duration)> {
    let key = rcgen::KeyPair::generate().context("generating the CA service's key")?;
    let chain_pem = signer
        .sign_serving_certificate(identity, &names.dns, &names.ips, &key, validity)
        .context("issuing the CA service's own certificate")?;
    let chain = chain_pem
        .iter()
        .map(|pem| {
            rustls_pemfile::certs(&mut pem.as_bytes())
                .next()
                .context("the signer returned a chain element that is not a PEM certificate")?
                .context("the signer returned malformed PEM")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let leaf = chain
        .first()
        .context("the signer returned an empty chain")?;
    let issued = certificate_spiffe_id(leaf)
        .map_err(|e| anyhow::anyhow!("the signer's certificate for the CA service: {e}"))?;
    if issued != *identity {
        bail!("the signer issued {issued} instead of {identity} for the CA service");
    }
    let remaining = time_left(leaf)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((ServerTls::new(chain, key)?, remaining))
}

fn time_left(leaf: &CertificateDer<'_>) -> anyhow::Result<Duration> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf)
        .context("the signer returned an unparsable leaf certificate")?;
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Ok(Duration::from_secs(not_after.saturating_sub(now)))
}

/// A server-side TLS connection that tells tonic the peer's address (for logs).
struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: TcpConnectInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and hands finished TLS handshakes to the gRPC server. Handshakes run
/// in their own tasks so that one stalled peer does not hold up the others.
async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    ready: mpsc::Sender<io::Result<TlsConn>>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically EMFILE: back off instead of spinning.
                warn!(%error, "CA service: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let info = TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: Some(peer),
        };
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = ready.send(Ok(TlsConn { stream, info })).await;
                }
                Ok(Err(error)) => debug!(%peer, %error, "CA service: TLS handshake failed"),
                Err(_) => debug!(%peer, "CA service: TLS handshake timed out"),
            }
        });
    }
}

struct State {
    signer: Arc<dyn CertificateProvider>,
    auth: Arc<dyn Authenticator>,
}

/// The bearer token of a request, if it has an `authorization` header.
fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Result<Option<&str>, Status> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let malformed = || Status::unauthenticated("the authorization header is not 'Bearer <token>'");
    let value = value.to_str().map_err(|_| malformed())?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err(malformed()),
    }
}

fn impersonated_identity(
    metadata: Option<&prost_types::Struct>,
) -> Result<Option<SpiffeId>, Status> {
    use prost_types::value::Kind;
    let Some(value) = metadata.and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)) else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(id)) if id.is_empty() => Ok(None),
        Some(Kind::StringValue(id)) => id.parse().map(Some).map_err(|e| {
            Status::invalid_argument(format!(
                "{IMPERSONATED_IDENTITY} {id:?} is not a workload SPIFFE id: {e}"
            ))
        }),
        _ => Err(Status::invalid_argument(format!(
            "{IMPERSONATED_IDENTITY} must be a string"
        ))),
    }
}

async fn create_certificate(
    state: &State,
    request: tonic::Request<IstioCertificateRequest>,
) -> Result<(SpiffeId, IstioCertificateResponse), (Option<SpiffeId>, Status)> {
    let token = bearer_token(request.metadata())
        .map_err(|s| (None, s))?
        .map(str::to_owned);
    let message = request.into_inner();
    let from_csr = csr_spiffe_id(&message.csr).map_err(|e| (None, Status::invalid_argument(e)))?;
    let requested = match impersonated_identity(message.metadata.as_ref()) {
        Err(status) => return Err((Some(from_csr), status)),
        Ok(Some(impersonated)) if impersonated != from_csr => {
            let status = Status::invalid_argument(format!(
                "the CSR asks for {from_csr} but {IMPERSONATED_IDENTITY} is {impersonated}"
            ));
            return Err((Some(impersonated), status));
        }
        Ok(_) => from_csr,
    };
    let fail = |status| Err((Some(requested.clone()), status));
    let validity = match message.validity_duration {
        0 => DEFAULT_VALIDITY,
        secs if secs < 0 => {
            return fail(Status::invalid_argument(format!(
                "validity_duration {secs} is negative"
            )))
        }
        secs => Duration::from_secs(secs.unsigned_abs()),
    };
    match state.auth.authorize(token.as_deref(), &requested).await {
        Ok(()) => {}
        Err(AuthError::Unauthenticated(reason)) => return fail(Status::unauthenticated(reason)),
        Err(AuthError::PermissionDenied(reason)) => return fail(Status::permission_denied(reason)),
        Err(AuthError::Unavailable(reason)) => return fail(Status::unavailable(reason)),
    }
    match state.signer.create_certificate(message.csr, validity).await {
        Ok(cert_chain) => Ok((requested, IstioCertificateResponse { cert_chain })),
        Err(ProviderError::Refused(reason)) => fail(Status::invalid_argument(reason)),
        Err(ProviderError::Unavailable(reason)) => fail(Status::unavailable(reason)),
    }
}

/// The gRPC service: `CreateCertificate`, and `UNIMPLEMENTED` for any other path.
#[derive(Clone)]
struct CaService {
    state: Arc<State>,
}

impl tower::Service<http::Request<Body>> for CaService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != CREATE_CERTIFICATE_PATH {
            let status = Status::unimplemented(format!("no method {}", request.uri().path()));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let state = self.state.clone();
        Box::pin(async move {
            let method =
                tower::service_fn(move |request: tonic::Request<IstioCertificateRequest>| {
                    let state = state.clone();
                    async move {
                        let peer = request.remote_addr();
                        let peer = peer.map_or_else(|| "?".to_owned(), |p| p.to_string());
                        match create_certificate(&state, request).await {
                            Ok((identity, response)) => {
                                info!(%peer, %identity, "CA service: issued certificate");
                                Ok(tonic::Response::new(response))
                            }
                            Err((identity, status)) => {
                                let identity = identity.map(|id| id.to_string());
                                warn!(
                                    %peer,
                                    identity = identity.as_deref().unwrap_or("?"),
                                    code = ?status.code(),
                                    reason = status.message(),
                                    "CA service: refused certificate request"
                                );
                                Err(status)
                            }
                        }
                    }
                });
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                .max_decoding_message_size(MAX_REQUEST_BYTES);
            Ok(grpc.unary(method, request).await)
        })
    }
}

/// Serves Istio's CA API on `listener` over TLS with `tls`, signing with `signer` for callers
/// `auth` lets through, until `shutdown` completes; then stops accepting and lets requests in
/// flight finish.
pub async fn serve(
    listener: TcpListener,
    signer: Arc<dyn CertificateProvider>,
    tls: ServerTls,
    auth: Arc<dyn Authenticator>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls.rustls_config()?));
    let (ready, incoming) = mpsc::channel(64);
    let accept = tokio::spawn(accept_loop(listener, acceptor, ready));
    let stop_accepting = accept.abort_handle();
    // Close the port as soon as shutdown starts, not after the connections drained.
    let shutdown = async move {
        shutdown.await;
        stop_accepting.abort();
    };
    let service = CaService {
        state: Arc::new(State { signer, auth }),
    };
    let result = tonic::transport::Server::builder()
        .timeout(REQUEST_TIMEOUT)
        .serve_with_incoming_shutdown(
            service,
            tokio_stream::wrappers::ReceiverStream::new(incoming),
            shutdown,
        )
        .await;
    accept.abort();
    result.context("CA service")
}

/// What `ztunnel ca serve` needs.
#[derive(Debug, Clone)]
pub struct CaServiceOptions {
    /// The embedded CA's directory (made by `ztunnel ca init`).
    pub ca_dir: PathBuf,
    /// Where to listen, e.g. `0.0.0.0:15012`.
    pub listen: SocketAddr,
    /// Who may have which certificate.
    pub callers: CallerAuth,
    /// The DNS names and IPs its serving certificate carries ([`ServingNames::defaults`]).
    pub names: ServingNames,
}

/// How `ztunnel ca serve` authenticates its callers.
#[derive(Debug, Clone)]
pub enum CallerAuth {
    /// Anyone who reaches the port gets any identity (local/dev only).
    Anyone,
    /// Callers present `authorization: Bearer <this file's content>` and get any identity.
    TokenFile(PathBuf),
    /// Node proxies present their service account token, checked by TokenReview, and get
    /// identities of pods on their own node only (see [`super::token_review`]).
    Kubernetes {
        access: crate::kubernetes::ApiAccess,
        node_proxy: super::token_review::ServiceAccount,
        audience: String,
    },
}

/// Keeps the CA service's own certificate fresh: renews at half its remaining lifetime, and
/// retries every 30 s while the signer fails.
async fn renew_server_tls(
    tls: ServerTls,
    signer: Arc<EmbeddedCa>,
    identity: SpiffeId,
    names: ServingNames,
    remaining: Duration,
) {
    // The floor keeps a signer that caps lifetimes to almost nothing from making this spin.
    let half = |left: Duration| (left / 2).max(Duration::from_secs(1));
    let mut wait = half(remaining);
    loop {
        tokio::time::sleep(wait).await;
        match issue_server_tls(&signer, &identity, &names, SERVER_CERT_VALIDITY).await {
            Ok((fresh, left)) => {
                tls.update(&fresh);
                info!(%identity, valid_for = ?left, "CA service: renewed its own certificate");
                wait = half(left);
            }
            Err(error) => {
                warn!(
                    %identity,
                    error = format!("{error:#}"),
                    "CA service: renewing its own certificate failed; retrying in 30s"
                );
                wait = Duration::from_secs(30);
            }
        }
    }
}

/// `ztunnel ca serve`: [`run_ca_service_until`] SIGINT or SIGTERM.
pub async fn run_ca_service(opts: CaServiceOptions) -> anyhow::Result<()> {
    run_ca_service_until(opts, shutdown_signal()).await
}

/// Serves the embedded CA in `opts.ca_dir` on `opts.listen` until `shutdown`. The service's own
/// certificate is an SVID for [`ca_service_identity`] of the CA's trust domain, issued by that
/// CA and renewed in the background; clients verify it with
/// [`IstioCaClient::with_server_identity`](super::IstioCaClient::with_server_identity).
pub async fn run_ca_service_until(
    opts: CaServiceOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let ca = crate::identity::ca::CaFiles::load(&opts.ca_dir)
        .with_context(|| format!("loading the CA in {}", opts.ca_dir.display()))?;
    let identity = ca_service_identity(ca.trust_domain()).context("the CA service's SPIFFE id")?;
    run_with_signer(opts, Arc::new(ca), identity, shutdown).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn run_with_signer(
    opts: CaServiceOptions,
    signer: Arc<EmbeddedCa>,
    identity: SpiffeId,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let auth: Arc<dyn Authenticator> = match &opts.callers {
        CallerAuth::TokenFile(path) => Arc::new(StaticToken::from_file(path)?),
        CallerAuth::Kubernetes {
            access,
            node_proxy,
            audience,
        } => {
            info!(%node_proxy, %audience,
                "CA service: callers are authenticated by TokenReview; each node proxy gets identities of its own node's pods");
            Arc::new(super::token_review::TokenReviewAuthenticator::new(
                access.client().await?,
                audience.clone(),
                node_proxy.clone(),
            ))
        }
        CallerAuth::Anyone => {
            warn!(
                listen = %opts.listen,
                "CA service: no --token-file and no --kubernetes; anyone who reaches this port gets any identity (local/dev only)"
            );
            Arc::new(AllowAll)
        }
    };
    let (tls, remaining) =
        issue_server_tls(&signer, &identity, &opts.names, SERVER_CERT_VALIDITY).await?;
    let listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    info!(
        listen = %listener.local_addr()?,
        %identity,
        dns_names = ?opts.names.dns,
        ips = ?opts.names.ips,
        "CA service: serving istio.v1.auth.IstioCertificateService"
    );
    let renew = tokio::spawn(renew_server_tls(
        tls.clone(),
        signer.clone(),
        identity,
        opts.names.clone(),
        remaining,
    ));
    let result = serve(listener, signer, tls, auth, shutdown).await;
    renew.abort();
    result
}
