//! Pod netns discovery on real cgroup v2 directories named as the kubelet names them, holding
//! real processes in network namespaces of their own. Needs root (creating cgroups and moving
//! processes into them), as the rest of the workspace's tests.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use ztunnel::config::pod_netns::{NotFound, NsId, PodNetnsFinder};

use crate::support::TempDir;

/// A cgroup subtree under a unique `ztt-` prefix (the test harness's leak check knows the
/// prefix), with the processes the test started; all removed when dropped, even on failure.
struct CgroupTree {
    root: PathBuf,
    children: Vec<Child>,
}

impl CgroupTree {
    fn new() -> Self {
        let cg2 = ztunnel::capture::cgroup2_root().expect("a cgroup v2 hierarchy");
        let root = cg2.join(format!("ztt-podnetns-{}", std::process::id()));
        let tree = CgroupTree {
            root,
            children: Vec::new(),
        };
        tree.remove();
        std::fs::create_dir(&tree.root)
            .unwrap_or_else(|e| panic!("creating {} (needs root): {e}", tree.root.display()));
        tree
    }

    /// Starts `program args` and moves it into the cgroup `rel` (created as needed).
    fn spawn_in(&mut self, rel: &str, program: &Path, args: &[&str]) -> u32 {
        let dir = self.root.join(rel);
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        self.children.push(child);
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        pid
    }

    fn remove(&self) {
        fn rmdirs(dir: &Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        rmdirs(&e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        rmdirs(&self.root);
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.remove();
    }
}

fn host() -> NsId {
    NsId::of(Path::new("/proc/self/ns/net")).unwrap()
}

/// Waits until `pid` is in a netns other than ours (unshare has done its work).
fn own_netns(pid: u32) -> NsId {
    let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    for _ in 0..300 {
        if let Ok(id) = NsId::of(&path) {
            if id != host() {
                return id;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("process {pid} never left the host netns");
}

const UNSHARE: &str = "/usr/bin/unshare";
const NSENTER: &str = "/usr/bin/nsenter";
const SLEEP: &str = "/bin/sleep";

#[test]
fn pods_netns_are_found_through_kubelet_cgroups() {
    let mut tree = CgroupTree::new();
    let finder = PodNetnsFinder::new(tree.root.clone(), host());

    // cgroupfs driver: kubepods/<qos>/pod<uid>/<container>.
    let a_uid = "11111111-2222-4333-8444-555555555555";
    let a = tree.spawn_in(
        &format!("kubepods/besteffort/pod{a_uid}/c0ffee"),
        Path::new(UNSHARE),
        &["--net", SLEEP, "300"],
    );
    let a_ns = own_netns(a);

    // systemd driver, guaranteed-less QoS slice, an app container started before the sandbox
    // (a lower PID) and a "pause" process joining its netns: the sandbox is preferred.
    let b_uid = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee";
    let b_slice = format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
        b_uid.replace('-', "_")
    );
    let app = tree.spawn_in(
        &format!("{b_slice}/cri-containerd-app.scope"),
        Path::new(UNSHARE),
        &["--net", SLEEP, "300"],
    );
    let b_ns = own_netns(app);
    let bin = TempDir::new("pause-bin");
    let pause_bin = bin.path().join("pause");
    std::fs::copy(SLEEP, &pause_bin).unwrap();
    let app_netns = format!("--net=/proc/{app}/ns/net");
    let pause = tree.spawn_in(
        &format!("{b_slice}/cri-containerd-sandbox.scope"),
        Path::new(NSENTER),
        &[&app_netns, pause_bin.to_str().unwrap(), "300"],
    );
    assert_eq!(own_netns(pause), b_ns);

    // A host-network pod, and a pod whose processes are not there yet.
    let c_uid = "cccccccc-0000-4000-8000-000000000000";
    tree.spawn_in(
        &format!("kubepods/burstable/pod{c_uid}/host"),
        Path::new(SLEEP),
        &["300"],
    );
    let d_uid = "dddddddd-0000-4000-8000-000000000000";
    std::fs::create_dir_all(tree.root.join(format!("kubepods/pod{d_uid}/starting"))).unwrap();

    let index = finder.pod_cgroups();
    let found = finder.find(&index, a_uid).unwrap();
    assert_eq!(found.path, PathBuf::from(format!("/proc/{a}/ns/net")));
    assert_eq!(NsId::of(&found.path).unwrap(), a_ns);
    assert_ne!(found.id, host());

    let found = finder.find(&index, &b_uid.to_uppercase()).unwrap();
    assert_eq!(found.pid, pause, "the sandbox process is preferred");
    assert_eq!(NsId::of(&found.path).unwrap(), b_ns);
    assert!(found.still_valid());

    assert_eq!(finder.find(&index, c_uid), Err(NotFound::HostNetwork));
    assert_eq!(finder.find(&index, d_uid), Err(NotFound::NoProcess));
    assert_eq!(
        finder.find(&index, "eeeeeeee-0000-4000-8000-000000000000"),
        Err(NotFound::NoCgroup)
    );

    // The sandbox exits: the path found no longer holds, and the app's process is found.
    let sandbox = tree.children.iter_mut().find(|c| c.id() == pause).unwrap();
    sandbox.kill().unwrap();
    sandbox.wait().unwrap();
    assert!(!found.still_valid());
    let again = finder.find(&finder.pod_cgroups(), b_uid).unwrap();
    assert_eq!((again.pid, again.id), (app, b_ns));
}
