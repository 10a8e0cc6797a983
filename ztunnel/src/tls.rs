//! rustls configurations for HBONE: TLS 1.3 only, ALPN `h2`, the ring provider, and mesh
//! verifiers that trust only chains to the mesh roots and identify peers by their SPIFFE URI SAN.
//!
//! DNS names and SNI play no part in identity: the client checks the server's SPIFFE id against
//! the identities expected for the destination (secure naming), the server checks the client's
//! trust domain and hands its SPIFFE id to policy ([`peer_identity`]).
//!
//! Chains and SPIFFE ids are checked with the mesh's trust ([`crate::identity::trust`]); its
//! refusals carry a [`TlsError`] inside the rustls error, so [`classify`] can turn any
//! handshake failure into a short reason for logs and metric labels.
use std::{net::IpAddr, sync::Arc};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    sign::SingleCertAndKey,
    CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, OtherError,
    PeerIncompatible, SignatureScheme,
};
use webpki::KeyUsage;

use crate::identity::{
    trust::{algorithms, leaf_identity, provider, MeshTrust, TlsError},
    SpiffeId, WorkloadCertificate,
};

/// The only application protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// A metrics label for any rustls error, ours or the library's.
pub fn classify(err: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    match err {
        E::InvalidCertificate(ce) => match ce {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_issuer",
            CertificateError::Other(OtherError(inner)) => {
                let inner: &(dyn std::error::Error + 'static) = inner.as_ref();
                inner
                    .downcast_ref::<TlsError>()
                    .map(TlsError::reason)
                    .unwrap_or("bad_certificate")
            }
            _ => "bad_certificate",
        },
        E::NoCertificatesPresented => "no_certificate",
        E::PeerIncompatible(p) => match p {
            PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig
            | PeerIncompatible::ServerDoesNotSupportTls12Or13 => "protocol_version",
            _ => "incompatible",
        },
        E::NoApplicationProtocol => "no_alpn",
        E::AlertReceived(_) => "peer_refused",
        E::InvalidMessage(_) | E::PeerMisbehaved(_) | E::InappropriateHandshakeMessage { .. } => {
            "protocol_error"
        }
        _ => "handshake_failed",
    }
}

/// [`classify`] for the I/O error a failed handshake returns.
pub fn classify_io(e: &std::io::Error) -> &'static str {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(classify)
        .unwrap_or("handshake_failed")
}

/// The SPIFFE id of the verified peer of an established connection (server side: the client's
/// workload identity, for policy and logs).
pub fn peer_identity(conn: &CommonState) -> Result<SpiffeId, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    leaf_identity(leaf)
}

/// Client side: verifies the server's chain, trust domain, and that it runs as one of the
/// identities expected for the destination.
#[derive(Debug)]
struct ServerVerifier {
    trust: MeshTrust,
    expected: Vec<SpiffeId>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self
            .trust
            .verify(end_entity, intermediates, now, KeyUsage::server_auth())?;
        if !self.expected.contains(&id) {
            return Err(TlsError::UnexpectedIdentity {
                id,
                expected: self.expected.clone(),
            }
            .into());
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
        Err(PeerIncompatible::Tls12NotOffered.into())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Server side: requires a client certificate chaining to the mesh roots with a SPIFFE id in
/// the trust domain. Which identities may connect is policy's business, after the handshake.
#[derive(Debug)]
struct ClientVerifier {
    trust: MeshTrust,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.trust
            .verify(end_entity, intermediates, now, KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(PeerIncompatible::Tls12NotOffered.into())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// The HBONE server config of a destination workload: presents `cert`, requires and verifies
/// a client certificate from the same trust domain.
pub fn server_config(
    cert: &WorkloadCertificate,
    roots: &[CertificateDer<'static>],
) -> Arc<rustls::ServerConfig> {
    let verifier = Arc::new(ClientVerifier {
        trust: MeshTrust::new(roots, cert.id.trust_domain()),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(cert.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every connection presents and verifies a current certificate.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// The HBONE client config of a source workload: presents `cert` and accepts only a server in
/// the same trust domain running as one of `expected` (empty: every server is refused).
pub fn client_config(
    cert: &WorkloadCertificate,
    roots: &[CertificateDer<'static>],
    expected: Vec<SpiffeId>,
) -> Arc<rustls::ClientConfig> {
    let trust = MeshTrust::new(roots, cert.id.trust_domain());
    client_config_with(cert, trust, expected)
}

fn client_config_with(
    cert: &WorkloadCertificate,
    trust: MeshTrust,
    expected: Vec<SpiffeId>,
) -> Arc<rustls::ClientConfig> {
    let verifier = Arc::new(ServerVerifier { trust, expected });
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(cert.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    // Identity comes from the certificate, never from the name; send no SNI.
    config.enable_sni = false;
    Arc::new(config)
}

/// The name to pass to the TLS connector: the destination's IP. It is not verified (the
/// verifier checks SPIFFE ids) and, being an IP, is never sent as SNI.
pub fn server_name(addr: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.into())
}

#[cfg(test)]
mod tests {
    use std::{
        net::Ipv4Addr,
        time::{Duration, SystemTime},
    };

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;
    use crate::identity::{
        ca::test_support::{ca, id, issue, issue_unchecked, params, self_signed},
        EmbeddedCa,
    };

    const HOUR: Duration = Duration::from_secs(3600);

    fn client_id() -> SpiffeId {
        id("spiffe://cluster.local/ns/shop/sa/web")
    }

    fn server_id() -> SpiffeId {
        id("spiffe://cluster.local/ns/shop/sa/api")
    }

    struct Outcome {
        /// The server's view: the client's identity, or the handshake error.
        server: Result<SpiffeId, rustls::Error>,
        /// The client's view, including a refusal the server reports after the handshake.
        client: Result<(), rustls::Error>,
    }

    fn rustls_error(e: &std::io::Error) -> rustls::Error {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .cloned()
            .unwrap_or_else(|| rustls::Error::General(e.to_string()))
    }

    /// One mutual TLS handshake and ping/pong over real sockets.
    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> Outcome {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = tokio_rustls::TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .map_err(|e| rustls_error(&e))?;
            let (_, conn) = tls.get_ref();
            assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
            let peer = peer_identity(conn).expect("a verified client has an identity");
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
            tls.write_all(b"pong").await.unwrap();
            tls.shutdown().await.unwrap();
            Ok(peer)
        });
        let client = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(server_name(addr.ip()), tcp)
                .await
                .map_err(|e| rustls_error(&e))?;
            // In TLS 1.3 the server judges the client's certificate after the client's side of
            // the handshake is done: a refusal shows up on the first read.
            tls.write_all(b"ping").await.map_err(|e| rustls_error(&e))?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf)
                .await
                .map_err(|e| rustls_error(&e))?;
            assert_eq!(&buf, b"pong");
            Ok(())
        };
        let client = tokio::time::timeout(Duration::from_secs(5), client)
            .await
            .expect("client handshake hung");
        let server = tokio::time::timeout(Duration::from_secs(5), server_task)
            .await
            .expect("server handshake hung")
            .unwrap();
        Outcome { server, client }
    }

    fn reason<T>(r: &Result<T, rustls::Error>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(e) => classify(e),
        }
    }

    struct Mesh {
        ca: EmbeddedCa,
        roots: Vec<CertificateDer<'static>>,
        server: WorkloadCertificate,
    }

    fn mesh() -> Mesh {
        let ca = ca("cluster.local");
        let roots = ca.roots();
        let server = issue(&ca, &server_id());
        Mesh { ca, roots, server }
    }

    impl Mesh {
        fn server_config(&self) -> Arc<rustls::ServerConfig> {
            server_config(&self.server, &self.roots)
        }

        /// A client presenting `cert`, expecting the server's identity.
        fn client_config(&self, cert: &WorkloadCertificate) -> Arc<rustls::ClientConfig> {
            client_config(cert, &self.roots, vec![server_id()])
        }
    }

    /// The server refuses `client_cert` with `want`, and the client hears of it.
    async fn client_refused(mesh: &Mesh, client_cert: &WorkloadCertificate, want: &str) {
        let out = handshake(mesh.server_config(), mesh.client_config(client_cert)).await;
        assert_eq!(reason(&out.server), want, "{:?}", out.server.err());
        assert!(out.server.unwrap_err().to_string().len() > 10);
        assert_eq!(reason(&out.client), "peer_refused", "{:?}", out.client);
    }

    #[tokio::test]
    async fn mutual_tls_succeeds_and_the_server_learns_the_client_identity() {
        let mesh = mesh();
        let client = issue(&mesh.ca, &client_id());
        let out = handshake(mesh.server_config(), mesh.client_config(&client)).await;
        assert_eq!(out.server.unwrap(), client_id());
        out.client.unwrap();

        // Any of several expected identities will do.
        let expected = vec![id("spiffe://cluster.local/ns/x/sa/y"), server_id()];
        let config = client_config(&client, &mesh.roots, expected);
        let out = handshake(mesh.server_config(), config).await;
        assert_eq!(out.server.unwrap(), client_id());
    }

    #[tokio::test]
    async fn expired_and_not_yet_valid_client_certificates_are_refused() {
        let mesh = mesh();
        let now = SystemTime::now();
        let expired = params(&client_id(), now - 2 * HOUR, now - HOUR);
        client_refused(
            &mesh,
            &issue_unchecked(&mesh.ca, &client_id(), expired),
            "expired",
        )
        .await;
        let future = params(&client_id(), now + HOUR, now + 2 * HOUR);
        let future = issue_unchecked(&mesh.ca, &client_id(), future);
        client_refused(&mesh, &future, "not_yet_valid").await;
    }

    #[tokio::test]
    async fn self_signed_and_other_ca_certificates_are_refused() {
        let mesh = mesh();
        let now = SystemTime::now();
        let own = self_signed(&client_id(), params(&client_id(), now, now + HOUR));
        client_refused(&mesh, &own, "unknown_issuer").await;

        // Another CA for the same trust domain: same root name, different key.
        let other = ca("cluster.local");
        client_refused(&mesh, &issue(&other, &client_id()), "unknown_issuer").await;

        // And one with a different name altogether.
        let stranger = ca("stranger.example");
        let cert = issue_unchecked(
            &stranger,
            &client_id(),
            params(&client_id(), now, now + HOUR),
        );
        client_refused(&mesh, &cert, "unknown_issuer").await;
    }

    #[tokio::test]
    async fn foreign_trust_domains_are_refused_even_from_trusted_roots() {
        // Both roots are trusted (a multi-domain bundle), so only the domain check refuses.
        let mesh = mesh();
        let foreign_ca = ca("other.example");
        let mut roots = mesh.roots.clone();
        roots.extend(foreign_ca.roots());
        let foreign_id = id("spiffe://other.example/ns/shop/sa/web");
        let foreign = issue(&foreign_ca, &foreign_id);

        let server = server_config(&mesh.server, &roots);
        // The foreign client would refuse our server first; make it trust our domain.
        let trust = MeshTrust::new(&roots, "cluster.local");
        let client = client_config_with(&foreign, trust, vec![server_id()]);
        let out = handshake(server, client).await;
        assert_eq!(reason(&out.server), "foreign_trust_domain");
        let msg = out.server.unwrap_err().to_string();
        assert!(
            msg.contains("spiffe://other.example/ns/shop/sa/web"),
            "{msg}"
        );

        // The client side too, even when the foreign id is "expected".
        let client = issue(&mesh.ca, &client_id());
        let out = handshake(
            server_config(&foreign, &roots),
            client_config(&client, &roots, vec![foreign_id]),
        )
        .await;
        assert_eq!(reason(&out.client), "foreign_trust_domain");
    }

    #[tokio::test]
    async fn the_client_refuses_a_server_with_an_unexpected_identity() {
        let mesh = mesh();
        let client = issue(&mesh.ca, &client_id());
        let wrong = vec![id("spiffe://cluster.local/ns/shop/sa/db")];
        let out = handshake(
            mesh.server_config(),
            client_config(&client, &mesh.roots, wrong),
        )
        .await;
        assert_eq!(reason(&out.client), "unexpected_identity");
        let msg = out.client.unwrap_err().to_string();
        assert!(msg.contains("sa/api") && msg.contains("sa/db"), "{msg}");
        assert_eq!(reason(&out.server), "peer_refused");

        // Nothing expected: nothing accepted.
        let out = handshake(
            mesh.server_config(),
            client_config(&client, &mesh.roots, vec![]),
        )
        .await;
        assert_eq!(reason(&out.client), "unexpected_identity");
    }

    #[tokio::test]
    async fn the_client_refuses_an_expired_server_certificate() {
        let mesh = mesh();
        let now = SystemTime::now();
        let expired = issue_unchecked(
            &mesh.ca,
            &server_id(),
            params(&server_id(), now - 2 * HOUR, now - HOUR),
        );
        let client = issue(&mesh.ca, &client_id());
        let out = handshake(
            server_config(&expired, &mesh.roots),
            mesh.client_config(&client),
        )
        .await;
        assert_eq!(reason(&out.client), "expired");
        assert_eq!(reason(&out.server), "peer_refused");
    }

    #[tokio::test]
    async fn certificates_without_one_spiffe_uri_san_are_refused() {
        let mesh = mesh();
        let now = SystemTime::now();
        let mut dns_only = params(&client_id(), now, now + HOUR);
        dns_only.subject_alt_names = vec![rcgen::SanType::DnsName(
            rcgen::Ia5String::try_from("web.shop.svc").unwrap(),
        )];
        let cert = issue_unchecked(&mesh.ca, &client_id(), dns_only);
        client_refused(&mesh, &cert, "bad_san").await;

        let mut two = params(&client_id(), now, now + HOUR);
        two.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::Ia5String::try_from("spiffe://cluster.local/ns/shop/sa/db").unwrap(),
        ));
        client_refused(
            &mesh,
            &issue_unchecked(&mesh.ca, &client_id(), two),
            "bad_san",
        )
        .await;

        let mut not_workload = params(&client_id(), now, now + HOUR);
        not_workload.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::Ia5String::try_from("spiffe://cluster.local/admin").unwrap(),
        )];
        let cert = issue_unchecked(&mesh.ca, &client_id(), not_workload);
        client_refused(&mesh, &cert, "bad_san").await;
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let mesh = mesh();
        let client = issue(&mesh.ca, &client_id());
        // The mesh client config, minus its certificate.
        let verifier = Arc::new(ServerVerifier {
            trust: MeshTrust::new(&mesh.roots, "cluster.local"),
            expected: vec![server_id()],
        });
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        drop(client);
        let out = handshake(mesh.server_config(), Arc::new(config)).await;
        assert_eq!(reason(&out.server), "no_certificate");
    }

    /// A hand-built TLS 1.2 ClientHello (no supported_versions extension): the crate has no
    /// TLS 1.2 client to make one with, by design.
    fn tls12_client_hello() -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([7u8; 32]); // random
        body.push(0); // no session id
        body.extend([0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]); // ECDHE-ECDSA/RSA-AES128-GCM-SHA256
        body.extend([0x01, 0x00]); // null compression
        let extensions: &[u8] = &[
            0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04,
            0x03, // signature_algorithms: ecdsa_p256
            0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x17, // supported_groups: secp256r1
            0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // ec_point_formats: uncompressed
            0x00, 0x10, 0x00, 0x05, 0x00, 0x03, 0x02, b'h', b'2', // ALPN h2
        ];
        body.extend((extensions.len() as u16).to_be_bytes());
        body.extend(extensions);
        let mut handshake = vec![0x01, 0x00];
        handshake.extend((body.len() as u16).to_be_bytes());
        handshake.extend(body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend((handshake.len() as u16).to_be_bytes());
        record.extend(handshake);
        record
    }

    #[tokio::test]
    async fn a_tls12_only_client_is_refused() {
        let mesh = mesh();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = mesh.server_config();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio_rustls::TlsAcceptor::from(config)
                .accept(tcp)
                .await
                .map(|_| ())
                .map_err(|e| rustls_error(&e))
        });
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&tls12_client_hello()).await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut reply))
            .await
            .unwrap()
            .unwrap();
        let result = server.await.unwrap();
        assert_eq!(reason(&result), "protocol_version", "{result:?}");
        // A fatal alert record, protocol_version (70), and no ServerHello.
        assert_eq!(reply.first(), Some(&0x15), "{reply:x?}");
        assert_eq!(&reply[5..7], &[2, 70], "{reply:x?}");
    }

    #[test]
    fn classify_covers_rustls_and_mesh_errors() {
        let other = |e: TlsError| rustls::Error::from(e);
        let id = client_id();
        let now = UnixTime::now();
        let cases = [
            (
                other(TlsError::Expired {
                    now,
                    not_after: now,
                }),
                "expired",
            ),
            (
                other(TlsError::NotYetValid {
                    now,
                    not_before: now,
                }),
                "not_yet_valid",
            ),
            (other(TlsError::UnknownIssuer("x".into())), "unknown_issuer"),
            (
                other(TlsError::ForeignTrustDomain {
                    id: id.clone(),
                    expected: "cluster.local".into(),
                }),
                "foreign_trust_domain",
            ),
            (other(TlsError::BadSan("x".into())), "bad_san"),
            (
                other(TlsError::UnexpectedIdentity {
                    id,
                    expected: vec![],
                }),
                "unexpected_identity",
            ),
            (
                other(TlsError::BadCertificate("x".into())),
                "bad_certificate",
            ),
            (other(TlsError::NoPeerCertificate), "no_certificate"),
            (rustls::Error::NoApplicationProtocol, "no_alpn"),
            (rustls::Error::General("x".into()), "handshake_failed"),
        ];
        for (err, want) in cases {
            assert_eq!(classify(&err), want, "{err}");
        }
    }
}
