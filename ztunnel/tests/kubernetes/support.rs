//! Helpers shared by the Kubernetes tests: objects, temporary directories, processes in a
//! network namespace of their own, log capture.
use std::{
    io,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{json, Value};
use ztunnel::config::pod_netns::NsId;

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ztunnel-k8s-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `sleep` in a network namespace of its own (and a user namespace, so no root is needed);
/// killed when dropped.
pub struct NetnsProcess {
    child: Child,
}

impl NetnsProcess {
    pub fn start() -> Self {
        let child = Command::new("unshare")
            .args(["--user", "--map-root-user", "--net", "sleep", "300"])
            .stdin(Stdio::null())
            .spawn()
            .expect("running unshare (util-linux)");
        let p = NetnsProcess { child };
        // unshare execs sleep once the namespaces exist: wait until the netns differs.
        let host = NsId::of(Path::new("/proc/self/ns/net")).unwrap();
        for _ in 0..200 {
            if NsId::of(&p.netns_path()).is_ok_and(|id| id != host) {
                return p;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("unshare did not enter a new network namespace");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid()))
    }
}

impl Drop for NetnsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

pub fn pod(
    ns: &str,
    name: &str,
    uid: &str,
    node: &str,
    ip: &str,
    sa: &str,
    labels: Value,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": sa,
            "containers": [{"name": "app", "ports": [{"containerPort": 8080, "name": "http"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

/// A log sink for `tracing`, to check what the proxy reported.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Captures this thread's logs (tests on a current-thread runtime see all of theirs).
    pub fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let sink = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter("info")
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }
}

impl io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
