//! Configuration sources: each turns the cluster into one immutable
//! [`Snapshot`](crate::state::Snapshot) and publishes
//! a new one on every change (a watch channel); the proxy reads whichever is in force.
//!
//! * [`dir`]: the local source, a directory of Kubernetes-shaped YAML, watched;
//! * [`kubernetes`]: watches of the API server;
//! * [`parse`]: the one parser both feed, so the output of `kubectl get -o yaml` runs locally
//!   unchanged;
//! * [`pod_netns`]: finding a pod's network namespace on this node from its UID.
pub mod dir;
pub mod kubernetes;
pub mod parse;
pub mod pod_netns;

pub use dir::{load_dir, watch};
pub use parse::{parse_file, parse_value, LoadError, LoadErrors};

/// Stops watching when dropped.
pub struct WatchHandle {
    task: tokio::task::JoinHandle<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}
