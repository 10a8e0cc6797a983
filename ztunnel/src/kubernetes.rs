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

    /// A client for the API server. Nothing is sent until it is used.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let config = match self {
            ApiAccess::InCluster => kube::Config::incluster()
                .context("no in-cluster Kubernetes configuration (KUBERNETES_SERVICE_HOST/PORT and the service account files); use --kubeconfig outside a cluster")?,
            ApiAccess::Kubeconfig(path) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(file, &Default::default())
                    .await
                    .with_context(|| format!("kubeconfig {}", path.display()))?
            }
        };
        kube::Client::try_from(config).context("building the Kubernetes client")
    }
}
