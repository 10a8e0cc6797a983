//! The virtual-cluster harness for ztunnel's end-to-end tests (README.md, "Architecture" and
//! `cargo xtask test`).
//!
//! A [`Cluster`] is a set of network namespaces on this machine wired like a small routed CNI
//! (an underlay bridge, N nodes, pods behind veths), each pod process in its own cgroup v2
//! directory, one real `ztunnel` per node and real clients and servers (`vc-probe`) in the pods.
//! Everything a cluster creates is named with a unique prefix `ztt-<pid>-<n>` and removed when
//! it is dropped, even on panic; leftovers of crashed runs are swept when the first cluster of a
//! test process starts. Needs root, a cgroup v2 mount and bpffs at `/sys/fs/bpf`.
//!
//! A node can run Istio's own ztunnel instead of ours ([`ClusterBuilder::peer_node`], see
//! [`peer`] and [`zds`]), for the interoperability tests and `cargo xtask bench --peer`.
//!
//! ```no_run
//! use ztunnel_tests::{pod, service, Cluster};
//! let c = Cluster::builder()
//!     .nodes(2)
//!     .namespace("shop", &[("istio.io/dataplane-mode", "ambient")])
//!     .pod(pod("shop", "client").node(1))
//!     .pod(pod("shop", "web").node(2).labels(&[("app", "web")]))
//!     .service(service("shop", "web").selector(&[("app", "web")]).port(80, 8080))
//!     .start()?;
//! let _server = c.pod("shop", "web").http_server(8080, "web")?;
//! let out = c.pod("shop", "client").get(&format!("{}:80", c.service_vip("shop", "web")))?;
//! assert_eq!(out.code, Some(0));
//! # anyhow::Ok(())
//! ```
pub mod api_server;
pub mod benchmark;
pub mod cleanup;
pub mod cluster;
pub mod cni;
pub mod config;
pub mod dashboards;
pub mod hbone_client;
pub mod jwt;
pub mod metrics;
pub mod peer;
pub mod process;
pub mod profile;
pub mod scale;
pub mod zds;

use std::path::{Path, PathBuf};

pub use cluster::{
    addresses::{socket_addr, Family},
    pod, service, underlay_not_only_mtls, Cluster, ClusterBuilder, NodeProxy, NodeRef, PodRef,
    PodSpec, ProbeOutput, ServiceSpec,
};
pub use process::{wait_until, Proc};

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_owned()
}

/// `$ZTUNNEL_BIN`, or `<workspace>/target/release/ztunnel`.
pub fn ztunnel_bin() -> PathBuf {
    std::env::var_os("ZTUNNEL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/ztunnel"))
}

/// `$ZTUNNEL_CNI_BIN`, or `ztunnel-cni` next to [`ztunnel_bin`].
pub fn cni_bin() -> PathBuf {
    std::env::var_os("ZTUNNEL_CNI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| ztunnel_bin().with_file_name("ztunnel-cni"))
}

/// [`cni_bin`], failing with a hint if it has not been built.
pub fn cni_bin_checked() -> anyhow::Result<PathBuf> {
    let bin = cni_bin();
    if !bin.exists() {
        anyhow::bail!(
            "{} does not exist: build it with `cargo build --release -p ztunnel` (or set ZTUNNEL_CNI_BIN)",
            bin.display()
        );
    }
    Ok(bin)
}

/// `$ZTUNNEL_PROBE_BIN`, or `<workspace>/target/release/vc-probe`.
pub fn probe_bin() -> PathBuf {
    std::env::var_os("ZTUNNEL_PROBE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/vc-probe"))
}

/// [`probe_bin`], failing with a hint if it has not been built.
pub fn probe_bin_checked() -> anyhow::Result<PathBuf> {
    let bin = probe_bin();
    if !bin.exists() {
        anyhow::bail!(
            "{} does not exist: build it with `cargo build --release -p ztunnel-tests` \
             (or set ZTUNNEL_PROBE_BIN)",
            bin.display()
        );
    }
    Ok(bin)
}
