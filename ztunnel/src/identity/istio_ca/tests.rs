//! Client and server over real gRPC on real TLS sockets (loopback), signing with the embedded CA.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::Code;

use super::*;
use crate::identity::{
    ca::{CaFiles, EmbeddedCa},
    BoxFuture, CertificateProvider, ProviderError, SpiffeId,
};

const TIMEOUT: Duration = Duration::from_secs(3);
const TOKEN: &str = "s3cret-token";
const TD: &str = "cluster.local";
const ALICE: &str = "spiffe://cluster.local/ns/default/sa/alice";
const ONE_HOUR: Duration = Duration::from_secs(3600);

fn embedded_ca() -> Arc<EmbeddedCa> {
    Arc::new(EmbeddedCa::generate(TD, Duration::from_secs(30 * 24 * 3600)).unwrap())
}

fn ca_id() -> SpiffeId {
    ca_service_identity(TD).unwrap()
}

/// A signer that is down: the CA service must report it as retryable.
struct DownSigner;

impl CertificateProvider for DownSigner {
    fn create_certificate(
        &self,
        _csr_pem: String,
        _validity: Duration,
    ) -> BoxFuture<'_, Result<Vec<String>, ProviderError>> {
        Box::pin(async { Err(ProviderError::Unavailable("HSM offline".to_owned())) })
    }
}

/// Allows only namespace `default`: stands for a real policy that says no.
struct DefaultNamespaceOnly;

impl Authenticator for DefaultNamespaceOnly {
    fn authorize<'a>(
        &'a self,
        _token: Option<&'a str>,
        requested: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<(), AuthError>> {
        let result = if requested.namespace() == "default" {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied(format!(
                "{requested} is outside namespace default"
            )))
        };
        Box::pin(async move { result })
    }
}

struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

/// The service's SVID without DNS or IP names.
async fn svid_tls(ca: &EmbeddedCa) -> ServerTls {
    let (tls, left) = issue_server_tls(ca, &ca_id(), &ServingNames::default(), ONE_HOUR)
        .await
        .unwrap();
    assert!(
        left > ONE_HOUR - Duration::from_secs(60),
        "lifetime {left:?}"
    );
    tls
}

fn spawn_server(
    listener: TcpListener,
    tls: ServerTls,
    signer: Arc<dyn CertificateProvider>,
    auth: Arc<dyn Authenticator>,
) -> Running {
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(serve(listener, signer, tls, auth, async {
        let _ = stopped.await;
    }));
    Running { addr, stop, task }
}

/// The CA service as `ztunnel ca serve` runs it: its SVID and signer from one embedded CA.
async fn start_on(
    listener: TcpListener,
    ca: &Arc<EmbeddedCa>,
    auth: Arc<dyn Authenticator>,
) -> Running {
    spawn_server(listener, svid_tls(ca).await, ca.clone(), auth)
}

async fn start(ca: &Arc<EmbeddedCa>, auth: Arc<dyn Authenticator>) -> Running {
    start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), ca, auth).await
}

fn unique_temp_path(kind: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "ztunnel-istio-ca-test-{}-{}.{kind}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A token file, removed when dropped.
struct TokenFile(PathBuf);

impl TokenFile {
    fn new(content: &str) -> Self {
        let path = unique_temp_path("token");
        std::fs::write(&path, content).unwrap();
        Self(path)
    }

    fn path(&self) -> PathBuf {
        self.0.clone()
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A client of our CA service, verifying its SVID.
fn client(addr: SocketAddr, root_pem: &str, token: Option<&TokenFile>) -> IstioCaClient {
    IstioCaClient::new(
        &addr.to_string(),
        root_pem,
        token.map(TokenFile::path),
        TIMEOUT,
    )
    .unwrap()
    .with_server_identity(ca_id())
}

/// A fresh key's CSR with these URI SANs.
fn csr(uris: &[&str]) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    for uri in uris {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI((*uri).try_into().unwrap()));
    }
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn parse_pem(pem: &str) -> x509_parser::pem::Pem {
    x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1
}

fn leaf_id(pem: &str) -> String {
    certificate_spiffe_id(&parse_pem(pem).contents.into())
        .unwrap()
        .to_string()
}

/// Seconds from now until the certificate expires.
fn seconds_left(pem: &str) -> i64 {
    let der = parse_pem(pem);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    der.parse_x509().unwrap().validity().not_after.timestamp() - now.as_secs() as i64
}

fn refused(result: Result<Vec<String>, ProviderError>) -> String {
    match result {
        Err(ProviderError::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn unavailable(result: Result<Vec<String>, ProviderError>) -> String {
    match result {
        Err(ProviderError::Unavailable(reason)) => reason,
        other => panic!("expected unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn round_trip_issues_the_requested_identity() {
    let ca = embedded_ca();
    let server = start(&ca, Arc::new(StaticToken::new(TOKEN).unwrap())).await;
    let token = TokenFile::new(TOKEN);
    let client = client(server.addr, ca.root_pem(), Some(&token));

    let chain = client
        .create_certificate(csr(&[ALICE]), ONE_HOUR)
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(leaf_id(&chain[0]), ALICE);
    assert_eq!(chain[1], ca.root_pem());
    // validity_duration reached the signer: an hour, not its 24 h default.
    let left = seconds_left(&chain[0]);
    assert!((3500..=3600).contains(&left), "{left}");

    // The token file is read for each request (Kubernetes rotates projected tokens).
    std::fs::write(token.path(), "rotated-elsewhere").unwrap();
    let reason = refused(client.create_certificate(csr(&[ALICE]), ONE_HOUR).await);
    assert!(reason.contains("Unauthenticated"), "{reason}");
    std::fs::write(token.path(), format!("{TOKEN}\n")).unwrap();
    let bob = "spiffe://cluster.local/ns/default/sa/bob";
    let chain = client
        .create_certificate(csr(&[bob]), ONE_HOUR)
        .await
        .unwrap();
    assert_eq!(leaf_id(&chain[0]), bob);

    std::fs::remove_file(token.path()).unwrap();
    let reason = unavailable(client.create_certificate(csr(&[bob]), ONE_HOUR).await);
    assert!(reason.contains("cannot read token file"), "{reason}");
    server.stop().await;
}

#[tokio::test]
async fn refusals_carry_the_reason() {
    let ca = embedded_ca();
    let server = start(&ca, Arc::new(StaticToken::new(TOKEN).unwrap())).await;
    let (token, wrong_token) = (TokenFile::new(TOKEN), TokenFile::new("not-the-token"));
    let good = client(server.addr, ca.root_pem(), Some(&token));

    let reason = refused(good.create_certificate("garbage".into(), ONE_HOUR).await);
    assert!(
        reason.contains("InvalidArgument") && reason.contains("CSR"),
        "{reason}"
    );
    let reason = refused(good.create_certificate(csr(&[]), ONE_HOUR).await);
    assert!(reason.contains("no SPIFFE id"), "{reason}");
    let two = csr(&[ALICE, "spiffe://cluster.local/ns/default/sa/bob"]);
    let reason = refused(good.create_certificate(two, ONE_HOUR).await);
    assert!(reason.contains("exactly one"), "{reason}");
    // The signer's own refusal travels back with its reason.
    let foreign = csr(&["spiffe://other.domain/ns/default/sa/alice"]);
    let reason = refused(good.create_certificate(foreign, ONE_HOUR).await);
    assert!(reason.contains("trust domain"), "{reason}");

    let wrong = client(server.addr, ca.root_pem(), Some(&wrong_token));
    let reason = refused(wrong.create_certificate(csr(&[ALICE]), ONE_HOUR).await);
    assert!(reason.contains("Unauthenticated"), "{reason}");
    assert!(!reason.contains("not-the-token") && !reason.contains(TOKEN));
    let none = client(server.addr, ca.root_pem(), None);
    let reason = refused(none.create_certificate(csr(&[ALICE]), ONE_HOUR).await);
    assert!(reason.contains("no bearer token"), "{reason}");

    // A node proxy naming one workload while the CSR asks for another.
    let mismatch = IstioCertificateRequest {
        csr: csr(&[ALICE]),
        validity_duration: 3600,
        metadata: Some(impersonation_metadata(
            "spiffe://cluster.local/ns/default/sa/mallory",
        )),
    };
    let status = good.send(mismatch).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("ImpersonatedIdentity"),
        "{status:?}"
    );
    let negative = IstioCertificateRequest {
        csr: csr(&[ALICE]),
        validity_duration: -5,
        metadata: None,
    };
    let status = good.send(negative).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn authenticator_and_signer_verdicts_map_to_provider_errors() {
    let ca = embedded_ca();
    let server = start(&ca, Arc::new(DefaultNamespaceOnly)).await;
    let client = client(server.addr, ca.root_pem(), None);
    let other = csr(&["spiffe://cluster.local/ns/kube-system/sa/x"]);
    let reason = refused(client.create_certificate(other, ONE_HOUR).await);
    assert!(
        reason.contains("PermissionDenied") && reason.contains("outside namespace default"),
        "{reason}"
    );
    server.stop().await;

    // Serving with a real SVID, signing with a signer that is down: retryable.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls = svid_tls(&ca).await;
    let server = spawn_server(listener, tls, Arc::new(DownSigner), Arc::new(AllowAll));
    let client = self::client(server.addr, ca.root_pem(), None);
    let reason = unavailable(client.create_certificate(csr(&[ALICE]), ONE_HOUR).await);
    assert!(reason.contains("HSM offline"), "{reason}");
    server.stop().await;
}

#[tokio::test]
async fn ca_down_then_up_same_client_recovers() {
    let ca = embedded_ca();
    // Reserve a port, then leave it closed: the CA is down.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let client = client(port, ca.root_pem(), None);
    let started = Instant::now();
    let reason = unavailable(client.create_certificate(csr(&[ALICE]), ONE_HOUR).await);
    assert!(started.elapsed() < TIMEOUT, "took {:?}", started.elapsed());
    assert!(
        reason.contains(&port.to_string()) && reason.contains("refused"),
        "{reason}"
    );

    // The CA comes up on that port: the same client works.
    let listener = TcpListener::bind(port).await.unwrap();
    let server = start_on(listener, &ca, Arc::new(AllowAll)).await;
    let chain = client
        .create_certificate(csr(&[ALICE]), ONE_HOUR)
        .await
        .unwrap();
    assert_eq!(leaf_id(&chain[0]), ALICE);

    // It restarts (new serving certificate and key): still the same client.
    server.stop().await;
    unavailable(client.create_certificate(csr(&[ALICE]), ONE_HOUR).await);
    let listener = TcpListener::bind(port).await.unwrap();
    let server = start_on(listener, &ca, Arc::new(AllowAll)).await;
    let chain = client
        .create_certificate(csr(&[ALICE]), ONE_HOUR)
        .await
        .unwrap();
    assert_eq!(leaf_id(&chain[0]), ALICE);
    server.stop().await;
}

#[tokio::test]
async fn server_not_from_the_configured_root_is_rejected() {
    let ca = embedded_ca();
    let server = start(&ca, Arc::new(AllowAll)).await;

    let stranger = embedded_ca();
    let client = client(server.addr, stranger.root_pem(), None);
    let reason = unavailable(client.create_certificate(csr(&[ALICE]), ONE_HOUR).await);
    // Same root name, different key: the signature check is what fails.
    assert!(reason.contains("invalid peer certificate"), "{reason}");

    // Right root, but not the CA's identity.
    let istiod = SpiffeId::new(TD, "istio-system", "istiod").unwrap();
    let client = IstioCaClient::new(&server.addr.to_string(), ca.root_pem(), None, TIMEOUT)
        .unwrap()
        .with_server_identity(istiod);
    let reason = unavailable(client.create_certificate(csr(&[ALICE]), ONE_HOUR).await);
    assert!(
        reason.contains("the CA runs as spiffe://cluster.local/ns/istio-system/sa/ztunnel-ca"),
        "{reason}"
    );

    // Checking by name: an SVID carries no DNS name or IP.
    let client =
        IstioCaClient::new(&server.addr.to_string(), ca.root_pem(), None, TIMEOUT).unwrap();
    let reason = unavailable(client.create_certificate(csr(&[ALICE]), ONE_HOUR).await);
    assert!(reason.contains("not valid for name"), "{reason}");
    server.stop().await;
}

#[tokio::test]
async fn the_service_certificate_carries_its_names_for_clients_that_check_them() {
    let ca = embedded_ca();
    let names = ServingNames {
        dns: vec!["ztunnel-ca.istio-system.svc".to_owned()],
        ips: vec!["127.0.0.1".parse().unwrap()],
    };
    let (tls, _) = issue_server_tls(&ca, &ca_id(), &names, ONE_HOUR)
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = spawn_server(listener, tls, ca.clone(), Arc::new(AllowAll));
    let by_name = |name: Option<&str>| {
        let client =
            IstioCaClient::new(&server.addr.to_string(), ca.root_pem(), None, TIMEOUT).unwrap();
        match name {
            Some(n) => client.with_server_name(n).unwrap(),
            None => client,
        }
    };
    // As Istio's ztunnel checks it: the IP dialled, or ALT_CA_HOSTNAME's DNS name.
    for client in [by_name(None), by_name(Some("ztunnel-ca.istio-system.svc"))] {
        let chain = client
            .create_certificate(csr(&[ALICE]), ONE_HOUR)
            .await
            .unwrap();
        assert_eq!(leaf_id(&chain[0]), ALICE);
    }
    let reason = unavailable(
        by_name(Some("istiod.istio-system.svc"))
            .create_certificate(csr(&[ALICE]), ONE_HOUR)
            .await,
    );
    assert!(reason.contains("not valid for name"), "{reason}");
    // Our own clients still verify the SPIFFE id, which the names do not replace.
    let chain = client(server.addr, ca.root_pem(), None)
        .create_certificate(csr(&[ALICE]), ONE_HOUR)
        .await
        .unwrap();
    assert_eq!(leaf_id(&chain[0]), ALICE);
    server.stop().await;
}

#[test]
fn default_names_are_the_service_names_and_a_specific_listen_ip() {
    let specific = ServingNames::defaults("10.0.0.7:15012".parse().unwrap());
    assert_eq!(specific.dns, DEFAULT_SERVICE_NAMES.map(str::to_owned));
    assert_eq!(
        specific.ips,
        ["10.0.0.7".parse::<std::net::IpAddr>().unwrap()]
    );
    assert!(ServingNames::defaults("0.0.0.0:15012".parse().unwrap())
        .ips
        .is_empty());
    assert!(ServingNames::defaults("[::]:15012".parse().unwrap())
        .ips
        .is_empty());
}

/// A serving certificate like istiod's: DNS and IP SANs, from its own root.
fn istiod_like_tls() -> (ServerTls, String) {
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root = rcgen::CertificateParams::default();
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root.distinguished_name
        .push(rcgen::DnType::OrganizationName, TD);
    root.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let root = root.self_signed(&root_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec![
        "istiod.istio-system.svc".to_owned(),
        "127.0.0.1".to_owned(),
    ])
    .unwrap();
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf.signed_by(&key, &root, &root_key).unwrap();
    let chain = format!("{}{}", leaf.pem(), root.pem());
    (
        ServerTls::from_pem(&chain, &key.serialize_pem()).unwrap(),
        root.pem(),
    )
}

#[tokio::test]
async fn name_verification_like_istiod() {
    let ca = embedded_ca();
    let (tls, tls_root) = istiod_like_tls();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = spawn_server(listener, tls, ca.clone(), Arc::new(AllowAll));
    let addr = server.addr.to_string();

    // Dialled by IP, verified by that IP.
    let by_ip = IstioCaClient::new(&addr, &tls_root, None, TIMEOUT).unwrap();
    let chain = by_ip
        .create_certificate(csr(&[ALICE]), ONE_HOUR)
        .await
        .unwrap();
    assert_eq!(leaf_id(&chain[0]), ALICE);
    // Dialled by IP, verified by DNS name.
    let by_name = IstioCaClient::new(&format!("https://{addr}"), &tls_root, None, TIMEOUT)
        .unwrap()
        .with_server_name("istiod.istio-system.svc")
        .unwrap();
    by_name
        .create_certificate(csr(&[ALICE]), ONE_HOUR)
        .await
        .unwrap();
    let wrong_name = IstioCaClient::new(&addr, &tls_root, None, TIMEOUT)
        .unwrap()
        .with_server_name("other.istio-system.svc")
        .unwrap();
    let reason = unavailable(wrong_name.create_certificate(csr(&[ALICE]), ONE_HOUR).await);
    assert!(reason.contains("not valid for name"), "{reason}");
    server.stop().await;
}

#[tokio::test]
async fn stalled_handshake_does_not_block_others() {
    let ca = embedded_ca();
    let server = start(&ca, Arc::new(AllowAll)).await;
    // Connects and says nothing.
    let _staller = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let client = client(server.addr, ca.root_pem(), None);
    client
        .create_certificate(csr(&[ALICE]), ONE_HOUR)
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn silent_ca_times_out_as_unavailable() {
    // Accepts TCP and never speaks TLS, like a hung CA.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let ca = embedded_ca();
    let timeout = Duration::from_millis(500);
    let client = IstioCaClient::new(&addr.to_string(), ca.root_pem(), None, timeout).unwrap();
    let started = Instant::now();
    let reason = unavailable(client.create_certificate(csr(&[ALICE]), ONE_HOUR).await);
    let took = started.elapsed();
    assert!(
        took >= timeout && took < timeout * 3,
        "took {took:?}: {reason}"
    );
    hold.abort();
}

/// A directory removed (with its contents) when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn ca_service_from_a_ca_directory() {
    let dir = TempDir(unique_temp_path("ca"));
    let ca = CaFiles::init(&dir.0, TD, Duration::from_secs(24 * 3600), false).unwrap();
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (server_token, client_token) =
        (TokenFile::new(&format!("{TOKEN}\n")), TokenFile::new(TOKEN));
    let opts = CaServiceOptions {
        ca_dir: dir.0.clone(),
        listen: addr,
        callers: CallerAuth::TokenFile(server_token.path()),
        names: ServingNames::defaults(addr),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run_ca_service_until(opts, async {
        let _ = stopped.await;
    }));
    let client = client(addr, ca.root_pem(), Some(&client_token));
    // The service listens once it has its own certificate: retry briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    let chain = loop {
        match client.create_certificate(csr(&[ALICE]), ONE_HOUR).await {
            Ok(chain) => break chain,
            Err(ProviderError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(leaf_id(&chain[0]), ALICE);
    assert_eq!(chain[1], ca.root_pem());
    let _ = stop.send(());
    task.await.unwrap().unwrap();

    let err = run_ca_service_until(
        CaServiceOptions {
            ca_dir: dir.0.join("missing"),
            listen: addr,
            callers: CallerAuth::Anyone,
            names: ServingNames::defaults(addr),
        },
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("loading the CA in"), "{err:#}");
}

#[test]
fn static_token_compares_exactly() {
    let auth = StaticToken::new(" abc\n").unwrap();
    let id: SpiffeId = ALICE.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let check = |t: Option<&str>| runtime.block_on(auth.authorize(t, &id));
    assert!(check(Some("abc")).is_ok());
    assert!(check(Some("abcd")).is_err());
    assert!(check(Some("ab")).is_err());
    assert!(check(None).is_err());
    assert!(StaticToken::new("  \n").is_err());
    assert_eq!(format!("{auth:?}"), "StaticToken(..)");
}

/// The hand-written messages encode with istioca.proto's field numbers and types.
#[test]
fn wire_format_matches_istioca_proto() {
    use prost::Message;
    let request = IstioCertificateRequest {
        csr: "a".to_owned(),
        validity_duration: 5,
        metadata: Some(impersonation_metadata("x")),
    };
    let mut expected = vec![0x0a, 1, b'a', 0x18, 5, 0x22, 29, 0x0a, 27, 0x0a, 20];
    expected.extend_from_slice(b"ImpersonatedIdentity");
    expected.extend_from_slice(&[0x12, 3, 0x1a, 1, b'x']);
    assert_eq!(request.encode_to_vec(), expected);
    assert_eq!(
        IstioCertificateRequest::decode(expected.as_slice()).unwrap(),
        request
    );

    let response = IstioCertificateResponse {
        cert_chain: vec!["l".to_owned(), "r".to_owned()],
    };
    assert_eq!(response.encode_to_vec(), [0x0a, 1, b'l', 0x0a, 1, b'r']);
}
