//! Reaching the Kubernetes API: in the cluster with the pod's service account, or from a
//! kubeconfig file (outside a cluster, and in tests). Used by the Kubernetes configuration
//! source (`config::kubernetes`) and by the CA service's TokenReview authentication.
use std::path::PathBuf;

use anyhow::Context as _;

/// How to reach the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiAccess {
    /// `KUBERNETES_SERVICE_HOST` / `KUBERNETES_SERVICE_PORT`, with the token and CA of
    /// `/var/run/secrets/kubernetes.io/serviceaccount/` (the token file is re-read, so bound
    /// tokens keep working as the kubelet rotates them).
    InCluster,
    /// The current context of a kubeconfig file.
    Kubeconfig(PathBuf),
}

impl ApiAccess {
    /// `--kubeconfig FILE` if given, else the in-cluster configuration.
    pub fn new(kubeconfig: Option<PathBuf>) -> Self {
        kubeconfig.map_or(ApiAccess::InCluster, ApiAccess::Kubeconfig)
    }

    /// Checks, without a runtime and without contacting the server, that the configuration
    /// is there and readable: for failing before anything else is set up.
    pub fn check(&self) -> anyhow::Result<()> {
        match self {
            ApiAccess::InCluster => in_cluster().map(drop),
            ApiAccess::Kubeconfig(path) => read_kubeconfig(path).map(drop),
        }
    }

    /// A client for the API server. Nothing is sent until it is used.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let config = match self {
            ApiAccess::InCluster => in_cluster()?,
            ApiAccess::Kubeconfig(path) => {
                kube::Config::from_custom_kubeconfig(read_kubeconfig(path)?, &Default::default())
                    .await
                    .with_context(|| format!("kubeconfig {}", path.display()))?
            }
        };
        kube::Client::try_from(config).context("building the Kubernetes client")
    }
}

fn in_cluster() -> anyhow::Result<kube::Config> {
    kube::Config::incluster().context(
        "no in-cluster Kubernetes configuration (KUBERNETES_SERVICE_HOST/PORT and the service account files); use --kubeconfig outside a cluster",
    )
}

fn read_kubeconfig(path: &std::path::Path) -> anyhow::Result<kube::config::Kubeconfig> {
    kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))
}
