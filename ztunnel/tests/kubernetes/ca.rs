//! `ztunnel ca serve --kubernetes`: node proxies are authenticated by TokenReview and get
//! certificates only for identities of pods on their own node. Real CA service (gRPC on TLS on
//! loopback), real client, TokenReview and pods served by the test's API server.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde_json::json;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use ztunnel::{
    identity::{
        istio_ca::{
            ca_service_identity, run_ca_service_until, token_review::ISTIO_CA_AUDIENCE,
            CaServiceOptions, CallerAuth, IstioCaClient, ServingNames,
        },
        CaFiles, CertificateProvider, ProviderError,
    },
    kubernetes::ApiAccess,
};

use crate::{
    apiserver::{ApiServer, TokenIdentity},
    support::{namespace, pod, TempDir},
};

const TD: &str = "cluster.local";
const NODE_PROXY: &str = "system:serviceaccount:istio-system:ztunnel";
const ZTUNNEL_POD_UID: &str = "99999999-0000-4000-8000-000000000001";

struct Ca {
    addr: std::net::SocketAddr,
    root_pem: String,
    dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        self.task.abort();
    }
}

/// The API server's state: namespace shop with web on n1 and api on n2, the node proxy's pod
/// on n1, and tokens.
async fn cluster() -> ApiServer {
    let server = ApiServer::start().await;
    server.register_defaults();
    server.apply(namespace("shop", json!({})));
    let uid = |n: u32| format!("0a1b2c3d-0000-4000-8000-{n:012}");
    server.apply(pod(
        "shop",
        "web",
        &uid(1),
        "n1",
        "10.1.0.2",
        "web",
        json!({}),
    ));
    server.apply(pod(
        "shop",
        "api",
        &uid(2),
        "n2",
        "10.2.0.2",
        "api",
        json!({}),
    ));
    let mut done = pod("shop", "job", &uid(3), "n1", "10.1.0.3", "batch", json!({}));
    done["status"]["phase"] = json!("Succeeded");
    server.apply(done);
    server.apply(pod(
        "istio-system",
        "ztunnel-x1",
        ZTUNNEL_POD_UID,
        "n1",
        "192.168.0.1",
        "ztunnel",
        json!({}),
    ));
    let token = |username: &str, audiences: &[&str], extra: &[(&str, &str)]| TokenIdentity {
        username: username.into(),
        audiences: audiences.iter().map(|a| a.to_string()).collect(),
        extra: extra
            .iter()
            .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
            .collect::<BTreeMap<_, _>>(),
    };
    let node = "authentication.kubernetes.io/node-name";
    let pod_name = "authentication.kubernetes.io/pod-name";
    let pod_uid = "authentication.kubernetes.io/pod-uid";
    server.add_token(
        "zt-n1",
        token(
            NODE_PROXY,
            &[ISTIO_CA_AUDIENCE],
            &[(node, "n1"), (pod_name, "ztunnel-x1")],
        ),
    );
    server.add_token(
        "zt-pod-bound",
        token(
            NODE_PROXY,
            &[ISTIO_CA_AUDIENCE],
            &[(pod_name, "ztunnel-x1"), (pod_uid, ZTUNNEL_POD_UID)],
        ),
    );
    server.add_token(
        "zt-stale-pod",
        token(
            NODE_PROXY,
            &[ISTIO_CA_AUDIENCE],
            &[
                (pod_name, "ztunnel-x1"),
                (pod_uid, "00000000-0000-4000-8000-000000000000"),
            ],
        ),
    );
    server.add_token("zt-unbound", token(NODE_PROXY, &[ISTIO_CA_AUDIENCE], &[]));
    server.add_token(
        "zt-other-audience",
        token(NODE_PROXY, &["api"], &[(node, "n1")]),
    );
    server.add_token(
        "web-sa",
        token(
            "system:serviceaccount:shop:web",
            &[ISTIO_CA_AUDIENCE],
            &[(node, "n1")],
        ),
    );
    server
}

async fn start_ca(server: &ApiServer) -> Ca {
    let dir = TempDir::new("ca");
    let ca = CaFiles::init(
        &dir.path().join("ca"),
        TD,
        Duration::from_secs(86_400),
        false,
    )
    .unwrap();
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let opts = CaServiceOptions {
        ca_dir: dir.path().join("ca"),
        listen: addr,
        callers: CallerAuth::Kubernetes {
            access: ApiAccess::Kubeconfig(server.kubeconfig(dir.path())),
            node_proxy: "istio-system/ztunnel".parse().unwrap(),
            audience: ISTIO_CA_AUDIENCE.into(),
        },
        names: ServingNames::defaults(addr),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run_ca_service_until(opts, async {
        let _ = stopped.await;
    }));
    Ca {
        addr,
        root_pem: ca.root_pem().to_owned(),
        dir,
        stop: Some(stop),
        task,
    }
}

impl Ca {
    /// Asks for `identity` with bearer token `token` (none if `None`).
    async fn ask(&self, token: Option<&str>, identity: &str) -> Result<Vec<String>, ProviderError> {
        let token_file = token.map(|t| {
            let path: PathBuf = self.dir.path().join(format!("token-{t}"));
            std::fs::write(&path, t).unwrap();
            path
        });
        let client = IstioCaClient::new(
            &self.addr.to_string(),
            &self.root_pem,
            token_file,
            Duration::from_secs(5),
        )
        .unwrap()
        .with_server_identity(ca_service_identity(TD).unwrap());
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(identity.try_into().unwrap()));
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        // The service listens once it has its own certificate: retry connection failures.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match client
                .create_certificate(csr.clone(), Duration::from_secs(3600))
                .await
            {
                Err(ProviderError::Unavailable(e))
                    if e.contains("connect") && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                result => return result,
            }
        }
    }
}

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn refused(result: Result<Vec<String>, ProviderError>, expect: &str) {
    match result {
        Err(ProviderError::Refused(reason)) => {
            assert!(reason.contains(expect), "{reason:?} should say {expect:?}")
        }
        other => panic!("expected a refusal saying {expect:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn node_proxies_get_certificates_only_for_pods_on_their_node() {
    let server = cluster().await;
    let ca = start_ca(&server).await;

    let chain = ca.ask(Some("zt-n1"), WEB).await.expect("web runs on n1");
    assert_eq!(chain.len(), 2, "leaf and root");
    let reviews = server.token_reviews();
    assert_eq!(reviews[0]["audiences"], json!([ISTIO_CA_AUDIENCE]));

    refused(
        ca.ask(Some("zt-n1"), API).await,
        "no running pod on node n1 runs as spiffe://cluster.local/ns/shop/sa/api",
    );
    refused(
        ca.ask(Some("zt-n1"), "spiffe://cluster.local/ns/shop/sa/batch")
            .await,
        "no running pod on node n1",
    );
    // The node is also found through the pod the token is bound to.
    ca.ask(Some("zt-pod-bound"), WEB)
        .await
        .expect("bound pod on n1");
    refused(ca.ask(Some("zt-pod-bound"), API).await, "node n1");
    refused(ca.ask(Some("zt-stale-pod"), WEB).await, "was replaced");
    refused(ca.ask(Some("zt-unbound"), WEB).await, "not bound to a pod");
}

#[tokio::test]
async fn other_callers_and_unverifiable_tokens_are_refused() {
    let server = cluster().await;
    let ca = start_ca(&server).await;
    refused(
        ca.ask(Some("web-sa"), WEB).await,
        "not the node proxy's service account istio-system/ztunnel",
    );
    refused(
        ca.ask(Some("forged"), WEB).await,
        "not accepted by the API server: invalid bearer token",
    );
    refused(
        ca.ask(Some("zt-other-audience"), WEB).await,
        "not accepted by the API server",
    );
    refused(ca.ask(None, WEB).await, "no bearer token");

    // The API server failing the review refuses the request: fail closed, retryable.
    server.fail_next(&[500]);
    match ca.ask(Some("zt-n1"), WEB).await {
        Err(ProviderError::Unavailable(reason)) => {
            assert!(reason.contains("TokenReview failed"), "{reason}")
        }
        other => panic!("expected the CA to be unavailable, got {other:?}"),
    }
    // Listing the node's pods failing refuses too.
    server.fail_path("/api/v1/namespaces/shop/pods", 500);
    match ca.ask(Some("zt-n1"), WEB).await {
        Err(ProviderError::Unavailable(reason)) => {
            assert!(
                reason.contains("listing the node's pods failed"),
                "{reason}"
            )
        }
        other => panic!("expected the CA to be unavailable, got {other:?}"),
    }
    ca.ask(Some("zt-n1"), WEB)
        .await
        .expect("the API server is back");
}
