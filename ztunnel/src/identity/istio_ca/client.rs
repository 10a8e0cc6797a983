//! The CSR client: a [`CertificateProvider`] backed by an Istio-compatible CA.
use std::{
    error::Error as _,
    fmt,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::{anyhow, bail, Context};
use http::{uri::PathAndQuery, Uri};
use hyper_util::rt::TokioIo;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::net::TcpStream;
use tonic::{metadata::MetadataValue, transport::Channel, Code, Status};
use tracing::debug;

use super::{
    certificate_spiffe_id, csr_spiffe_id, impersonation_metadata, IstioCertificateRequest,
    IstioCertificateResponse, CREATE_CERTIFICATE_PATH, DEFAULT_CA_PORT,
};
use crate::identity::{BoxFuture, CertificateProvider, ProviderError, SpiffeId};

/// Responses are a few certificates; anything much larger is not a CA talking.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// How the CA's serving certificate is verified, beyond chaining to the configured root.
#[derive(Debug, Clone)]
enum ServerCheck {
    /// Carries this DNS name or IP (istiod: `istiod.istio-system.svc`).
    Name(ServerName<'static>),
    /// Carries this SPIFFE id as its one URI SAN (our CA service, whose certificate comes from
    /// the embedded CA and so carries nothing else).
    Spiffe(SpiffeId),
}

/// A client of `IstioCertificateService/CreateCertificate`.
///
/// The CA's certificate must chain to the configured root and, by default, carry the DNS name
/// or IP of the address dialled, as Istio's ztunnel verifies istiod (whose serving certificate
/// has DNS SANs and no SPIFFE id); [`with_server_name`](Self::with_server_name) checks another
/// name. Our own CA service instead presents an SVID, verified with
/// [`with_server_identity`](Self::with_server_identity) and
/// [`ca_service_identity`](super::ca_service_identity).
///
/// One HTTP/2 connection is opened on first use and re-opened after it breaks (CA restarts,
/// outages), so one client lives as long as the proxy. It must be used from one Tokio runtime.
pub struct IstioCaClient {
    /// What the operator gave us, for error messages.
    address: String,
    uri: Uri,
    host: String,
    /// `host` as a TLS name, validated once.
    host_name: ServerName<'static>,
    port: u16,
    roots: Arc<RootCertStore>,
    check: ServerCheck,
    token_file: Option<PathBuf>,
    timeout: Duration,
    /// Made on first use, because tonic's channel spawns a task and so needs a runtime.
    channel: OnceLock<Channel>,
}

impl fmt::Debug for IstioCaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IstioCaClient")
            .field("address", &self.address)
            .field("check", &self.check)
            .field("token_file", &self.token_file)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl IstioCaClient {
    /// A client of the CA at `address` (`host:port`, `host` for port 15012, or
    /// `https://host[:port]`), trusting only the PEM certificates in `root_pem` for its server
    /// certificate. With `token_file`, each request carries `authorization: Bearer <contents>`,
    /// read afresh every time (Kubernetes rotates projected tokens). Each request, connecting
    /// included, gives up after `timeout`.
    pub fn new(
        address: &str,
        root_pem: &str,
        token_file: Option<PathBuf>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let (uri, host, port) = parse_address(address)?;
        let host_name = server_name(&host)?;
        Ok(Self {
            address: address.to_owned(),
            uri,
            host,
            check: ServerCheck::Name(host_name.clone()),
            host_name,
            port,
            roots: Arc::new(root_store(root_pem)?),
            token_file,
            timeout,
            channel: OnceLock::new(),
        })
    }

    /// Verify the CA's certificate against `name` (a DNS name or IP) instead of the host dialled:
    /// for a CA reached by IP whose certificate only carries a DNS name.
    pub fn with_server_name(mut self, name: &str) -> anyhow::Result<Self> {
        self.check = ServerCheck::Name(server_name(name)?);
        Ok(self)
    }

    /// Accept only a CA whose certificate carries `identity` as its SPIFFE id (and chains to the
    /// root); names are not checked.
    pub fn with_server_identity(mut self, identity: SpiffeId) -> Self {
        self.check = ServerCheck::Spiffe(identity);
        self
    }

    /// The address this client was made with.
    pub fn address(&self) -> &str {
        &self.address
    }

    fn channel(&self) -> Channel {
        self.channel
            .get_or_init(|| {
                let tls = tokio_rustls::TlsConnector::from(client_tls(&self.roots, &self.check));
                // With a SPIFFE check the name only goes out as SNI; it is not verified.
                let name = match &self.check {
                    ServerCheck::Name(name) => name.clone(),
                    ServerCheck::Spiffe(_) => self.host_name.clone(),
                };
                let (host, port) = (self.host.clone(), self.port);
                let connector = tower::service_fn(move |_: Uri| {
                    let (tls, host, name) = (tls.clone(), host.clone(), name.clone());
                    async move {
                        let tcp = TcpStream::connect((host.as_str(), port)).await?;
                        tcp.set_nodelay(true)?;
                        let stream = tls.connect(name, tcp).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                });
                // The `https` scheme goes out as `:scheme`; tonic has no TLS feature enabled, so
                // it hands the connection to our connector instead of wanting its own TLS.
                Channel::builder(self.uri.clone())
                    .connect_timeout(self.timeout)
                    .connect_with_connector_lazy(connector)
            })
            .clone()
    }

    async fn bearer_token(&self) -> Result<Option<MetadataValue<tonic::metadata::Ascii>>, String> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let raw = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
        let token = raw.trim();
        if token.is_empty() {
            return Err(format!("token file {} is empty", path.display()));
        }
        let mut value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            format!(
                "token file {} holds characters not allowed in a header",
                path.display()
            )
        })?;
        // Keeps HPACK from indexing it and debug output from showing it.
        value.set_sensitive(true);
        Ok(Some(value))
    }

    /// Sends one request as it is and returns the raw gRPC outcome (no error mapping).
    pub(super) async fn send(
        &self,
        message: IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, Status> {
        let mut request = tonic::Request::new(message);
        // Tells the CA our deadline (grpc-timeout), so it stops working on abandoned requests.
        request.set_timeout(self.timeout);
        if let Some(token) = self.bearer_token().await.map_err(Status::unavailable)? {
            request.metadata_mut().insert("authorization", token);
        }
        let mut grpc =
            tonic::client::Grpc::new(self.channel()).max_decoding_message_size(MAX_RESPONSE_BYTES);
        let call = async {
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(format!("connection failed: {}", chain(&e))))?;
            grpc.unary(
                request,
                PathAndQuery::from_static(CREATE_CERTIFICATE_PATH),
                tonic_prost::ProstCodec::default(),
            )
            .await
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    async fn request(
        &self,
        csr_pem: String,
        validity: Duration,
    ) -> Result<Vec<String>, ProviderError> {
        // A node proxy asks on behalf of the workload the CSR names; a CSR we cannot read goes
        // out as it is, and the CA says what is wrong with it.
        let metadata = csr_spiffe_id(&csr_pem)
            .ok()
            .map(|id| impersonation_metadata(&id.to_string()));
        let message = IstioCertificateRequest {
            csr: csr_pem,
            validity_duration: i64::try_from(validity.as_secs()).unwrap_or(i64::MAX),
            metadata,
        };
        let response = self.send(message).await.map_err(|status| {
            let error = map_status(&self.address, &status);
            debug!(ca = %self.address, %error, "certificate request failed");
            error
        })?;
        if response.cert_chain.is_empty() {
            return Err(ProviderError::Unavailable(format!(
                "CA {}: answered with an empty certificate chain",
                self.address
            )));
        }
        Ok(response.cert_chain)
    }
}

impl CertificateProvider for IstioCaClient {
    fn create_certificate(
        &self,
        csr_pem: String,
        validity: Duration,
    ) -> BoxFuture<'_, Result<Vec<String>, ProviderError>> {
        Box::pin(self.request(csr_pem, validity))
    }
}

/// Refusals are the CA's verdict on this request; anything else (transport, TLS, deadline,
/// internal errors) may pass.
fn map_status(address: &str, status: &Status) -> ProviderError {
    let mut text = format!("CA {address}: {:?}: {}", status.code(), status.message());
    // Transport failures (refused connection, TLS errors) hide the cause in the source chain.
    append_causes(&mut text, status.source());
    match status.code() {
        Code::InvalidArgument | Code::PermissionDenied | Code::Unauthenticated => {
            ProviderError::Refused(text)
        }
        _ => ProviderError::Unavailable(text),
    }
}

/// An error and its root cause on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    append_causes(&mut text, error.source());
    text
}

/// Appends the innermost cause (the refused connection, the TLS alert), which the wrappers of
/// tonic and hyper ("transport error") often leave out of their own message.
fn append_causes(text: &mut String, mut source: Option<&(dyn std::error::Error + 'static)>) {
    let mut root = None;
    while let Some(cause) = source {
        root = Some(cause);
        source = cause.source();
    }
    if let Some(root) = root.map(|e| e.to_string()) {
        if !text.contains(&root) {
            text.push_str(": ");
            text.push_str(&root);
        }
    }
}

/// `host:port`, `host`, `https://host[:port]` → the channel's URI, host and port.
fn parse_address(address: &str) -> anyhow::Result<(Uri, String, u16)> {
    let with_scheme = if address.contains("://") {
        address.to_owned()
    } else {
        format!("https://{address}")
    };
    let uri: Uri = with_scheme
        .parse()
        .with_context(|| format!("CA address {address:?} is not host:port or https://host:port"))?;
    if uri.scheme_str() != Some("https") {
        bail!("CA address {address:?}: only https is supported (the CA API is never plaintext)");
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        bail!("CA address {address:?} must not have a path or query");
    }
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow!("CA address {address:?} has no host"))?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        bail!("CA address {address:?} has no host");
    }
    // `Authority::port` is None for an unparsable port too, so look at what follows the host.
    let port = match authority.as_str().strip_prefix(authority.host()) {
        Some("") => DEFAULT_CA_PORT,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("CA address {address:?} has an invalid port"))?,
        None => bail!("CA address {address:?} must be host[:port], without user info"),
    };
    let uri = Uri::builder()
        .scheme("https")
        .authority(authority.as_str())
        .path_and_query("/")
        .build()
        .with_context(|| format!("CA address {address:?}"))?;
    Ok((uri, host, port))
}

fn server_name(host: &str) -> anyhow::Result<ServerName<'static>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_owned())
        .map_err(|_| anyhow!("{host:?} is neither a DNS name nor an IP address"))
}

fn root_store(root_pem: &str) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut root_pem.as_bytes()) {
        let cert = cert.context("the CA root PEM is malformed")?;
        roots
            .add(cert)
            .context("the CA root PEM holds a certificate that is not a usable trust anchor")?;
    }
    if roots.is_empty() {
        bail!("the CA root PEM holds no certificate");
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_tls(roots: &Arc<RootCertStore>, check: &ServerCheck) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3");
    let mut config = match check {
        ServerCheck::Name(_) => builder
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        ServerCheck::Spiffe(expected) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: roots.clone(),
                expected: expected.clone(),
                algorithms: provider().signature_verification_algorithms,
            }))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Accepts a server certificate that chains to the roots (webpki, server-auth usage) and whose
/// one URI SAN is the expected SPIFFE id.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

fn bad_certificate(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(std::io::Error::other(reason)),
    )))
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The chain first, so an untrusted certificate is reported as such whatever it claims.
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let id = certificate_spiffe_id(end_entity)
            .map_err(|e| bad_certificate(format!("the CA's certificate: {e}")))?;
        if id != self.expected {
            return Err(bad_certificate(format!(
                "the CA runs as {id}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable with a TLS 1.3-only config; refuse rather than trust.
        Err(rustls::PeerIncompatible::Tls12NotOffered.into())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn addresses() {
        let (uri, host, port) = parse_address("istiod.istio-system.svc:15012").unwrap();
        assert_eq!(uri.to_string(), "https://istiod.istio-system.svc:15012/");
        assert_eq!((host.as_str(), port), ("istiod.istio-system.svc", 15012));
        let (_, host, port) = parse_address("https://ca.example").unwrap();
        assert_eq!((host.as_str(), port), ("ca.example", DEFAULT_CA_PORT));
        let (_, host, port) = parse_address("[::1]:9443").unwrap();
        assert_eq!((host.as_str(), port), ("::1", 9443));
        assert!(matches!(
            server_name(&host).unwrap(),
            ServerName::IpAddress(_)
        ));
        for bad in [
            "http://ca:15012",
            "https://ca:15012/x",
            "",
            "ca:notaport",
            "ca:99999",
            "user@ca:1",
        ] {
            assert!(parse_address(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn roots_must_hold_a_certificate() {
        let err = root_store("not pem").unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err:#}");
    }
}
