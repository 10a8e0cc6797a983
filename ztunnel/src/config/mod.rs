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

/// Publishes `snapshot` to the proxy; false if nobody listens any more. The snapshot it
/// replaces is freed off the proxy's workers and, if that was its last reference, the memory
/// is returned to the system: a cluster-sized snapshot leaves hundreds of MiB in the
/// allocator's heaps, which a steady connection count would never trim.
pub(crate) fn publish(
    tx: &tokio::sync::watch::Sender<std::sync::Arc<crate::state::Snapshot>>,
    snapshot: crate::state::Snapshot,
) -> bool {
    if tx.is_closed() {
        return false;
    }
    let previous = tx.send_replace(std::sync::Arc::new(snapshot));
    tokio::task::spawn_blocking(move || {
        if let Some(last) = std::sync::Arc::into_inner(previous) {
            drop(last);
            crate::memory::trim();
        }
    });
    true
}

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
