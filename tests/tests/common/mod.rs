//! The cluster the policy tests share: Istio in Action's `istioinaction` namespace in the mesh,
//! a second mesh namespace, and a legacy `sleep` pod outside the mesh.
#![allow(dead_code)] // each test file uses its own part

use std::time::Duration;

use anyhow::Result;
use ztunnel_tests::{pod, Cluster, PodSpec};

pub const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
pub const WAIT: Duration = Duration::from_secs(15);

/// istioinaction (ambient): webapp and catalog on node 2, client on node 1, neighbour on node 2;
/// other (ambient): outsider on node 1; default (not enrolled): sleep on node 1. Mesh pods run
/// as a service account named like them and carry `app: <name>`. Returns once both proxies
/// have enrolled the mesh pods.
pub fn start() -> Result<Cluster> {
    let c = Cluster::builder()
        .nodes(2)
        .namespace("istioinaction", &[AMBIENT])
        .namespace("other", &[AMBIENT])
        .namespace("default", &[])
        .pod(mesh_pod("istioinaction", "webapp", 2))
        .pod(mesh_pod("istioinaction", "catalog", 2))
        .pod(mesh_pod("istioinaction", "client", 1))
        .pod(mesh_pod("istioinaction", "neighbour", 2))
        .pod(mesh_pod("other", "outsider", 1))
        .pod(pod("default", "sleep").node(1))
        .start()?;
    for (node, p) in [
        (2, "istioinaction/webapp"),
        (2, "istioinaction/catalog"),
        (2, "istioinaction/neighbour"),
        (1, "istioinaction/client"),
        (1, "other/outsider"),
    ] {
        c.wait_enrolled(node, 0, p, WAIT)?;
    }
    Ok(c)
}

/// A mesh pod `ns/name` on `node`, running as a service account named like it, labelled
/// `app: <name>`.
pub fn mesh_pod(ns: &str, name: &str, node: usize) -> PodSpec {
    pod(ns, name)
        .node(node)
        .service_account(name)
        .labels(&[("app", name)])
}

/// `ip:port` of a pod.
pub fn addr(c: &Cluster, ns: &str, name: &str, port: u16) -> String {
    format!("{}:{port}", c.pod(ns, name).ip())
}

/// An Istio security resource of `kind` with `body` (indented spec lines).
pub fn istio(kind: &str, ns: &str, name: &str, body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{body}"
    )
}
