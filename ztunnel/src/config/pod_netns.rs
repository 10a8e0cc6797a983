//! Finding a pod's network namespace on this node from its UID, for the Kubernetes source
//! (the local source names it in an annotation instead; in a cluster the annotation is not
//! trusted, since a pod's author could point it at another pod's netns).
//!
//! The kubelet names each pod's cgroup after the pod UID: with the cgroupfs driver
//! `kubepods[/<qos>]/pod<uid>/<container>`, with the systemd driver
//! `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _ for ->.slice/<scope>`
//! (either possibly under a `--cgroup-root` prefix). One walk of the cgroup v2 tree indexes every
//! pod directory; the processes listed in the `cgroup.procs` files below a pod's directory are
//! the pod's processes (in our PID namespace: the proxy runs with `hostPID`), and
//! `/proc/<pid>/ns/net` of any of them is the pod's netns. The sandbox ("pause") process is
//! preferred: it lives as long as the pod, while a container's process changes on restart.
//!
//! Limits: the kubelet's cgroups must be in the cgroup v2 hierarchy searched (on a hybrid host
//! with the cgroupfs driver they are only in the v1 hierarchies); a pod with no running process
//! yet (its sandbox starting) is found on a later try; a process in the proxy's own netns is
//! never taken (host-network pods have no netns of their own). A path through `/proc/<pid>` is
//! only good while that process lives, so found paths are checked again before every use.
use std::{
    collections::HashMap,
    fmt, fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// How deep below the root the kubelet's pod cgroups may be (systemd driver with a
/// `--cgroup-root` prefix: `prefix.slice/kubepods.slice/kubepods-burstable.slice/…-pod….slice`).
const MAX_POD_DEPTH: usize = 6;
/// How deep below a pod's cgroup its processes may be (containers, and their sub-cgroups).
const MAX_CONTAINER_DEPTH: usize = 3;

/// A namespace's identity: the nsfs device and inode behind `/proc/<pid>/ns/net`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

impl NsId {
    /// The namespace `path` (a `/proc/<pid>/ns/*` link or a bind mount of one) refers to.
    pub fn of(path: &Path) -> io::Result<Self> {
        let m = fs::metadata(path)?;
        Ok(NsId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// A pod's network namespace, as found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetns {
    /// `/proc/<pid>/ns/net`.
    pub path: PathBuf,
    pub pid: u32,
    pub id: NsId,
}

impl PodNetns {
    /// Whether the path still leads to the same namespace (the process may have exited, and
    /// its PID even been reused).
    pub fn still_valid(&self) -> bool {
        NsId::of(&self.path).is_ok_and(|id| id == self.id)
    }
}

/// Why a pod's netns was not found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotFound {
    /// No cgroup named after the pod UID under the root searched.
    NoCgroup,
    /// The pod's cgroups hold no live process (yet).
    NoProcess,
    /// Every process of the pod is in the proxy's own netns (a host-network pod).
    HostNetwork,
}

impl fmt::Display for NotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotFound::NoCgroup => "no cgroup is named after the pod UID",
            NotFound::NoProcess => "the pod's cgroups hold no running process yet",
            NotFound::HostNetwork => "the pod's processes are in the node's network namespace",
        })
    }
}

/// Finds pods' netns below one cgroup v2 directory.
#[derive(Clone, Debug)]
pub struct PodNetnsFinder {
    cgroup_root: PathBuf,
    proc_root: PathBuf,
    host: NsId,
}

impl PodNetnsFinder {
    /// Searches `cgroup_root` (the host's cgroup v2 root); `host` is the proxy's own netns,
    /// whose processes never count as a pod's.
    pub fn new(cgroup_root: PathBuf, host: NsId) -> Self {
        Self {
            cgroup_root,
            proc_root: PathBuf::from("/proc"),
            host,
        }
    }

    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Every pod cgroup directory below the root, by pod UID (lowercase, with dashes).
    pub fn pod_cgroups(&self) -> HashMap<String, PathBuf> {
        let mut found = HashMap::new();
        walk_pods(&self.cgroup_root, 0, &mut found);
        found
    }

    /// The netns of the pod `uid`, using an index from [`PodNetnsFinder::pod_cgroups`].
    pub fn find(&self, index: &HashMap<String, PathBuf>, uid: &str) -> Result<PodNetns, NotFound> {
        let dir = index
            .get(&uid.to_ascii_lowercase())
            .ok_or(NotFound::NoCgroup)?;
        let mut pids = Vec::new();
        collect_pids(dir, 0, &mut pids);
        pids.sort_unstable();
        pids.dedup();
        let mut saw_host = false;
        let mut best: Option<(bool, PodNetns)> = None;
        for pid in pids {
            let path = self.proc_root.join(pid.to_string()).join("ns/net");
            let Ok(id) = NsId::of(&path) else { continue }; // exited meanwhile
            if id == self.host {
                saw_host = true;
                continue;
            }
            let pause = fs::read_to_string(self.proc_root.join(pid.to_string()).join("comm"))
                .is_ok_and(|c| c.trim_end() == "pause");
            // The lowest PID is the oldest process, usually the sandbox; "pause" wins anyway.
            if best.as_ref().is_none_or(|(p, _)| pause && !p) {
                best = Some((pause, PodNetns { path, pid, id }));
            }
        }
        match best {
            Some((_, found)) => Ok(found),
            None if saw_host => Err(NotFound::HostNetwork),
            None => Err(NotFound::NoProcess),
        }
    }
}

/// The pod UID a kubelet cgroup directory name carries, if it is a pod's.
pub fn pod_uid_of_cgroup(name: &str) -> Option<String> {
    // cgroupfs driver: "pod<uid>".
    if let Some(uid) = name.strip_prefix("pod") {
        return is_uid(uid).then(|| uid.to_ascii_lowercase());
    }
    // systemd driver: "kubepods[-<qos>]-pod<uid with underscores>.slice".
    let stem = name.strip_suffix(".slice")?;
    let (_, uid) = stem.rsplit_once("-pod")?;
    let uid = uid.replace('_', "-");
    is_uid(&uid).then(|| uid.to_ascii_lowercase())
}

/// A Kubernetes UID: an RFC 4122 UUID in its 36-character text form.
fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn walk_pods(dir: &Path, depth: usize, found: &mut HashMap<String, PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return; // removed meanwhile, or unreadable: nothing of ours below
    };
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        match entry.file_name().to_str().and_then(pod_uid_of_cgroup) {
            Some(uid) => {
                found.insert(uid, path);
            }
            None if depth < MAX_POD_DEPTH => walk_pods(&path, depth + 1, found),
            None => {}
        }
    }
}

fn collect_pids(dir: &Path, depth: usize, pids: &mut Vec<u32>) {
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if depth >= MAX_CONTAINER_DEPTH {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_pids(&entry.path(), depth + 1, pids);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_cgroup_names_give_the_pod_uid() {
        let uid = "0f1e2d3c-4b5a-6978-8a9b-acbdcedfe0f1";
        assert_eq!(
            pod_uid_of_cgroup(&format!("pod{uid}")).as_deref(),
            Some(uid)
        );
        let systemd = format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"));
        assert_eq!(pod_uid_of_cgroup(&systemd).as_deref(), Some(uid));
        let guaranteed = format!("kubepods-pod{}.slice", uid.replace('-', "_"));
        assert_eq!(pod_uid_of_cgroup(&guaranteed).as_deref(), Some(uid));
        assert_eq!(
            pod_uid_of_cgroup(&format!("pod{}", uid.to_uppercase())).as_deref(),
            Some(uid)
        );
        for other in [
            "kubepods",
            "kubepods.slice",
            "kubepods-besteffort.slice",
            "besteffort",
            "pod",
            "podcast",
            "cri-containerd-0123.scope",
            "pod0f1e2d3c-4b5a-6978-8a9b-acbdcedfe0f",
            "kubepods-pod0f1e2d3c_4b5a_6978_8a9b_acbdcedfe0fz.slice",
        ] {
            assert_eq!(pod_uid_of_cgroup(other), None, "{other}");
        }
    }
}
