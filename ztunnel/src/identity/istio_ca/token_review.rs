//! Authenticating node proxies in a cluster, as istiod does for Istio's ztunnel: the caller's
//! bearer token is checked by the API server (TokenReview, for the CA's audience), must belong
//! to the node proxy's service account, and must be bound to a pod, whose node is the caller's
//! node. A node proxy then gets certificates only for identities that a pod on its own node runs
//! as, so a compromised node cannot mint identities of workloads elsewhere.
//!
//! The caller's node is read from the token itself when the API server puts it there
//! (`authentication.kubernetes.io/node-name` in the reviewed user's extra fields, Kubernetes
//! 1.32+), else from the pod it is bound to (`…/pod-name`, `…/pod-uid`), looked up in the
//! service account's namespace. Every failure refuses the request (fail closed); an API server
//! that cannot be asked is reported as unavailable, so callers retry.
use std::{collections::BTreeMap, fmt, time::Duration};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::api::{Api, ListParams, PostParams};

use super::auth::{AuthError, Authenticator};
use crate::identity::{BoxFuture, SpiffeId};

/// The audience Istio's CA clients request for their tokens.
pub const ISTIO_CA_AUDIENCE: &str = "istio-ca";

const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Bounds each API request, whatever the caller's own deadline.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// A service account, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for ServiceAccount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ServiceAccount {
                    namespace: ns.into(),
                    name: name.into(),
                })
            }
            _ => Err(format!(
                "expected a service account as namespace/name, got {s:?}"
            )),
        }
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl ServiceAccount {
    /// The user name Kubernetes authenticates this account's tokens as.
    fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

/// [`Authenticator`] for `ztunnel ca serve --kubernetes`.
#[derive(Clone)]
pub struct TokenReviewAuthenticator {
    client: kube::Client,
    audience: String,
    node_proxy: ServiceAccount,
}

impl fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("audience", &self.audience)
            .field("node_proxy", &self.node_proxy)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuthenticator {
    /// Accepts tokens of `node_proxy` for `audience` (normally [`ISTIO_CA_AUDIENCE`]).
    pub fn new(client: kube::Client, audience: String, node_proxy: ServiceAccount) -> Self {
        Self {
            client,
            audience,
            node_proxy,
        }
    }

    /// The node the caller runs on, once its token is reviewed and its account checked.
    async fn caller_node(&self, token: &str) -> Result<String, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api_call(
            "TokenReview",
            reviews.create(&PostParams::default(), &review),
        )
        .await?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "no reason given".into());
            return Err(AuthError::Unauthenticated(format!(
                "the token was not accepted by the API server: {why}"
            )));
        }
        // With audiences in the request, an authenticated review lists those the token is
        // valid for; none of ours means the token was meant for someone else.
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.contains(&self.audience))
        {
            return Err(AuthError::Unauthenticated(format!(
                "the token is not for audience {:?}",
                self.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.node_proxy.username() {
            return Err(AuthError::PermissionDenied(format!(
                "the caller is {username:?}, not the node proxy's service account {}",
                self.node_proxy
            )));
        }
        let extra = user.extra.unwrap_or_default();
        if let Some(node) = first(&extra, NODE_NAME) {
            return Ok(node.to_owned());
        }
        let Some(pod_name) = first(&extra, POD_NAME) else {
            return Err(AuthError::PermissionDenied(
                "the token is not bound to a pod (use a projected service account token), so the caller's node is unknown".into(),
            ));
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.node_proxy.namespace);
        let pod = api_call("reading the caller's pod", pods.get_opt(pod_name))
            .await?
            .ok_or_else(|| {
                AuthError::PermissionDenied(format!(
                    "the caller's pod {}/{pod_name} does not exist",
                    self.node_proxy.namespace
                ))
            })?;
        if let Some(uid) = first(&extra, POD_UID) {
            if pod.metadata.uid.as_deref() != Some(uid) {
                return Err(AuthError::PermissionDenied(format!(
                    "the caller's pod {}/{pod_name} was replaced since its token was issued",
                    self.node_proxy.namespace
                )));
            }
        }
        pod.spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                AuthError::PermissionDenied(format!(
                    "the caller's pod {}/{pod_name} is not on a node",
                    self.node_proxy.namespace
                ))
            })
    }

    /// Whether a pod on `node` runs as `identity`.
    async fn runs_on(&self, node: &str, identity: &SpiffeId) -> Result<(), AuthError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), identity.namespace());
        let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let list = api_call("listing the node's pods", pods.list(&on_node)).await?;
        let runs_as = |p: &Pod| {
            let spec = p.spec.as_ref();
            let account = spec
                .and_then(|s| s.service_account_name.as_deref())
                .or_else(|| spec.and_then(|s| s.service_account.as_deref()))
                .unwrap_or("default");
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            // The field selector is the server's; checking again costs nothing.
            spec.and_then(|s| s.node_name.as_deref()) == Some(node)
                && account == identity.service_account()
                && !matches!(phase, Some("Succeeded" | "Failed"))
        };
        if list.items.iter().any(runs_as) {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied(format!(
                "no running pod on node {node} runs as {identity}"
            )))
        }
    }
}

fn first<'a>(extra: &'a BTreeMap<String, Vec<String>>, key: &str) -> Option<&'a str> {
    extra
        .get(key)
        .and_then(|v| v.first())
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// Runs one API request with a deadline; failures mean the caller cannot be checked now.
async fn api_call<T>(
    what: &str,
    call: impl std::future::Future<Output = kube::Result<T>>,
) -> Result<T, AuthError> {
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(AuthError::Unavailable(format!(
            "cannot check the caller: {what} failed: {e}"
        ))),
        Err(_) => Err(AuthError::Unavailable(format!(
            "cannot check the caller: {what} timed out"
        ))),
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn authorize<'a>(
        &'a self,
        token: Option<&'a str>,
        requested: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<(), AuthError>> {
        Box::pin(async move {
            let token =
                token.ok_or_else(|| AuthError::Unauthenticated("no bearer token".into()))?;
            let node = self.caller_node(token).await?;
            self.runs_on(&node, requested).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_accounts_parse_as_namespace_slash_name() {
        let sa: ServiceAccount = "istio-system/ztunnel".parse().unwrap();
        assert_eq!(sa.username(), "system:serviceaccount:istio-system:ztunnel");
        assert_eq!(sa.to_string(), "istio-system/ztunnel");
        for bad in ["", "ztunnel", "/x", "x/", "a/b/c"] {
            assert!(bad.parse::<ServiceAccount>().is_err(), "{bad:?}");
        }
    }
}
