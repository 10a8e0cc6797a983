//! What the plugin knows when the proxy cannot be reached: the namespaces this node captures.
//!
//! The proxy writes `captured-namespaces.json` next to its CNI socket whenever the set changes
//! (and before it listens). A plugin that cannot reach the proxy reads it and decides without
//! the API server:
//!
//! * the pod's namespace is captured → the ADD fails: the pod must not run uncaptured;
//! * the namespace is known and not captured → the pod starts (kube-system keeps working
//!   while the proxy is down);
//! * the namespace is not in the file, or there is no readable file → the ADD fails (fail
//!   closed: a namespace created while the proxy was down may be captured).
//!
//! The file can be stale only in one way that matters: a namespace labelled for capture while
//! the proxy is down is still listed as not captured, so its new pods start uncaptured until
//! the proxy is back (it then enrols them). The pod opt-out label is not known without the
//! API: while the proxy is down, opted-out pods of a captured namespace fail too.
use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::state::{EnrolmentPolicy, Snapshot};

/// The file's name, in the directory of the CNI socket.
pub const FILE_NAME: &str = "captured-namespaces.json";
const VERSION: u32 = 1;

/// The state file that belongs to a CNI socket path.
pub fn path_for_socket(socket: &Path) -> PathBuf {
    socket.with_file_name(FILE_NAME)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub version: u32,
    /// The node proxy's `--node-name`.
    pub node: String,
    /// The namespace label that enrols, `key=value`.
    pub namespace_label: String,
    /// Namespaces whose pods are captured.
    pub captured: BTreeSet<String>,
    /// Every other namespace the proxy knew.
    pub not_captured: BTreeSet<String>,
}

/// The plugin's decision without the proxy.
#[derive(Debug, PartialEq, Eq)]
pub enum Offline {
    /// The pod may start uncaptured: its namespace is known not to be captured.
    Start,
    /// The pod must not start; why.
    Refuse(String),
}

impl NodeState {
    pub fn of(snapshot: &Snapshot, node: &str, policy: &EnrolmentPolicy) -> Self {
        let (key, value) = &policy.namespace_label;
        let (mut captured, mut not_captured) = (BTreeSet::new(), BTreeSet::new());
        for ns in snapshot.namespaces.values() {
            if ns.labels.get(key) == Some(value) {
                captured.insert(ns.name.clone());
            } else {
                not_captured.insert(ns.name.clone());
            }
        }
        Self {
            version: VERSION,
            node: node.to_owned(),
            namespace_label: format!("{key}={value}"),
            captured,
            not_captured,
        }
    }

    /// Writes the file atomically (a temporary file in the same directory, then `rename`).
    pub fn write(&self, path: &Path) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
        let text = serde_json::to_vec_pretty(self)?;
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&text)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let state: Self = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a node state file", path.display()))?;
        if state.version != VERSION {
            anyhow::bail!(
                "{} has version {}, this plugin reads version {VERSION}",
                path.display(),
                state.version
            );
        }
        Ok(state)
    }

    /// What a pod of `namespace` may do while the proxy is unreachable.
    pub fn offline(&self, namespace: &str) -> Offline {
        if self.captured.contains(namespace) {
            Offline::Refuse(format!(
                "namespace {namespace} is captured on node {} ({}): its pods cannot start until the node proxy runs",
                self.node, self.namespace_label
            ))
        } else if self.not_captured.contains(namespace) {
            Offline::Start
        } else {
            Offline::Refuse(format!(
                "namespace {namespace} is unknown to the node proxy of node {} (created while it was down?): refusing until it runs",
                self.node
            ))
        }
    }
}

/// The offline decision from the file at `path`, refusing when it cannot be read.
pub fn offline_decision(path: &Path, namespace: &str) -> Offline {
    match NodeState::read(path) {
        Ok(state) => state.offline(namespace),
        Err(e) => Offline::Refuse(format!(
            "{e:#}: without the node proxy's state the plugin cannot tell whether namespace {namespace} is captured"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_decisions_fail_closed() {
        let state = NodeState {
            version: VERSION,
            node: "n1".into(),
            namespace_label: "istio.io/dataplane-mode=ambient".into(),
            captured: ["shop".to_owned()].into(),
            not_captured: ["kube-system".to_owned()].into(),
        };
        assert!(matches!(state.offline("shop"), Offline::Refuse(r) if r.contains("captured")));
        assert_eq!(state.offline("kube-system"), Offline::Start);
        assert!(matches!(state.offline("new"), Offline::Refuse(r) if r.contains("unknown")));

        let dir = std::env::temp_dir().join(format!("ztunnel-node-state-{}", std::process::id()));
        let path = dir.join(FILE_NAME);
        assert!(matches!(
            offline_decision(&path, "kube-system"),
            Offline::Refuse(_)
        ));
        state.write(&path).unwrap();
        assert_eq!(NodeState::read(&path).unwrap(), state);
        assert_eq!(offline_decision(&path, "kube-system"), Offline::Start);
        std::fs::write(&path, "{").unwrap();
        assert!(
            matches!(offline_decision(&path, "kube-system"), Offline::Refuse(r) if r.contains("not a node state file"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
