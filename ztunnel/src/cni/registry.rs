//! Pods as the CNI plugin reported them. For such a pod the plugin's network namespace and
//! addresses are the truth (the runtime just created them); the configuration's (the
//! `status.podIPs` that arrive later, the netns found through cgroups, an annotation) are not
//! used, so a later watch update neither re-enrols nor drops the pod. After a DEL the sandbox
//! is gone: the pod is not enrolled through the configuration either, until an ADD for a new
//! sandbox comes.
//!
//! With a store directory (next to the CNI socket: `cni-pods/`), every registration is also
//! a file, so a restarted proxy adopts the sandboxes it was told about at once, by their
//! `CNI_NETNS` path, before the configuration knows their addresses; otherwise its first
//! reconcile would sweep their capture away (they would bypass the mesh until the API
//! reports them). A path that no longer leads to the recorded namespace is dropped.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{config::pod_netns::NsId, model::Pod, netns::Netns};

/// The store directory that belongs to a CNI socket path.
pub fn store_for_socket(socket: &Path) -> PathBuf {
    socket.with_file_name("cni-pods")
}

/// A registration as stored.
#[derive(Serialize, Deserialize)]
struct Record {
    namespace: String,
    name: String,
    uid: String,
    container_id: String,
    netns: PathBuf,
    netns_dev: u64,
    netns_ino: u64,
    ips: Vec<IpAddr>,
}

/// A sandbox the plugin handed over with ADD.
#[derive(Debug)]
pub struct CniPod {
    /// `K8S_POD_UID` (empty if the runtime gave none: then the name alone matches).
    pub uid: String,
    pub container_id: String,
    pub netns: Netns,
    pub netns_id: NsId,
    pub ips: Vec<IpAddr>,
    /// Matched a pod of the configuration at least once (so its absence later means it was
    /// deleted).
    pub seen: bool,
}

/// What the CNI said about a pod of the configuration.
pub enum CniView<'a> {
    /// Its sandbox was handed over: enrol it with this netns and these addresses.
    Added(&'a CniPod),
    /// Its sandbox was torn down: do not enrol it.
    Deleted,
    /// Nothing (a pod started before the plugin was installed, or before this proxy
    /// started): the configuration decides.
    Unknown,
}

type Key = (String, String);

#[derive(Debug, Default)]
pub struct CniPods {
    added: HashMap<Key, CniPod>,
    /// UIDs of pods whose sandbox the plugin deleted, by name.
    deleted: HashMap<Key, String>,
    /// Where registrations are kept across restarts.
    store: Option<PathBuf>,
}

fn uid_matches(reported: &str, pod: &Pod) -> bool {
    reported.is_empty() || pod.uid.is_empty() || reported == pod.uid
}

impl CniPods {
    /// Registrations kept in `dir`; those a previous proxy stored are adopted if their
    /// network namespace is still the one recorded.
    pub fn persistent(dir: PathBuf) -> Self {
        let mut pods = Self {
            store: Some(dir.clone()),
            ..Self::default()
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return pods;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match adopt(&path) {
                Ok((key, pod)) => {
                    info!(pod = %format!("{}/{}", key.0, key.1), netns = %pod.netns.path().display(),
                        "adopted a sandbox the CNI plugin reported to the previous proxy");
                    pods.added.insert(key, pod);
                }
                Err(why) => {
                    info!(record = %path.display(), reason = %why, "forgetting a stored CNI sandbox");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        pods
    }

    fn record_path(&self, key: &Key) -> Option<PathBuf> {
        // Kubernetes names cannot contain '_': the file name is one-to-one.
        self.store
            .as_ref()
            .map(|d| d.join(format!("{}_{}.json", key.0, key.1)))
    }

    fn save(&self, key: &Key, pod: &CniPod) {
        let Some(path) = self.record_path(key) else {
            return;
        };
        let record = Record {
            namespace: key.0.clone(),
            name: key.1.clone(),
            uid: pod.uid.clone(),
            container_id: pod.container_id.clone(),
            netns: pod.netns.path().to_owned(),
            netns_dev: pod.netns_id.dev,
            netns_ino: pod.netns_id.ino,
            ips: pod.ips.clone(),
        };
        let write = || -> std::io::Result<()> {
            let dir = path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!(".{}.tmp", key.1));
            std::fs::write(&tmp, serde_json::to_vec(&record)?)?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            warn!(record = %path.display(), error = %e,
                "cannot store a CNI sandbox: a restarted proxy will learn it from the configuration only");
        }
    }

    fn unsave(&self, key: &Key) {
        if let Some(path) = self.record_path(key) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Records a new sandbox of `namespace/name`, replacing an earlier one of the same name.
    pub fn add(&mut self, namespace: &str, name: &str, pod: CniPod) {
        let key = (namespace.to_owned(), name.to_owned());
        self.deleted.remove(&key);
        self.save(&key, &pod);
        self.added.insert(key, pod);
    }

    /// Forgets the sandbox `container_id` of `namespace/name` (a DEL). Returns whether one
    /// was registered. A DEL for another sandbox than the registered one (a late DEL of a
    /// previous sandbox) leaves the registration alone.
    pub fn delete(&mut self, namespace: &str, name: &str, uid: &str, container_id: &str) -> bool {
        let key = (namespace.to_owned(), name.to_owned());
        match self.added.get(&key) {
            Some(p) if p.container_id != container_id => false,
            _ => {
                let had = self.added.remove(&key).is_some();
                self.unsave(&key);
                self.deleted.insert(key, uid.to_owned());
                had
            }
        }
    }

    /// Drops what the plugin said about a failed ADD (the runtime tears that sandbox down).
    pub fn discard(&mut self, namespace: &str, name: &str, container_id: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        if self
            .added
            .get(&key)
            .is_some_and(|p| p.container_id == container_id)
        {
            self.added.remove(&key);
        }
    }

    pub fn view(&self, pod: &Pod) -> CniView<'_> {
        let key = (pod.namespace.clone(), pod.name.clone());
        if let Some(p) = self.added.get(&key).filter(|p| uid_matches(&p.uid, pod)) {
            return CniView::Added(p);
        }
        if self
            .deleted
            .get(&key)
            .is_some_and(|uid| uid_matches(uid, pod))
        {
            return CniView::Deleted;
        }
        CniView::Unknown
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&CniPod> {
        self.added.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Keeps the records in line with the configuration: pods that were in it and are gone
    /// (deleted) are forgotten, and so are the tombstones of pods no longer in it.
    pub fn retain_present(&mut self, present: impl Fn(&str, &str, &str) -> bool) {
        self.added
            .retain(|(ns, name), p| !p.seen || present(ns, name, &p.uid));
        self.deleted
            .retain(|(ns, name), uid| present(ns, name, uid));
    }

    pub fn mark_seen(&mut self, namespace: &str, name: &str) {
        if let Some(p) = self.added.get_mut(&(namespace.to_owned(), name.to_owned())) {
            p.seen = true;
        }
    }

    /// The pods the plugin reported (added or deleted), names by namespace.
    pub fn names(&self) -> HashMap<String, HashSet<String>> {
        let mut out: HashMap<String, HashSet<String>> = HashMap::new();
        for (ns, name) in self.added.keys().chain(self.deleted.keys()) {
            out.entry(ns.clone()).or_default().insert(name.clone());
        }
        out
    }

    /// Every registered pod's addresses, by address, for telling conflicts.
    pub fn addresses(&self) -> HashMap<IpAddr, Key> {
        let mut out = HashMap::new();
        for (key, p) in &self.added {
            for ip in &p.ips {
                out.insert(*ip, key.clone());
            }
        }
        out
    }
}

/// Re-opens a stored sandbox; fails if its netns is gone or is another namespace now.
fn adopt(path: &Path) -> Result<(Key, CniPod), String> {
    let text = std::fs::read(path).map_err(|e| e.to_string())?;
    let r: Record = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    let netns = Netns::open(&r.netns).map_err(|e| format!("{}: {e}", r.netns.display()))?;
    let id = netns.id().map_err(|e| e.to_string())?;
    if (id.dev, id.ino) != (r.netns_dev, r.netns_ino) {
        return Err(format!(
            "{} is another network namespace now (the sandbox is gone)",
            r.netns.display()
        ));
    }
    Ok((
        (r.namespace, r.name),
        CniPod {
            uid: r.uid,
            container_id: r.container_id,
            netns,
            netns_id: id,
            ips: r.ips,
            // It was in the configuration before the restart: if the first snapshot lacks it,
            // it was deleted meanwhile.
            seen: true,
        },
    ))
}
