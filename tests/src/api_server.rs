//! A real kube-apiserver (with its etcd) and nothing else, for `scale-bench --source
//! kubernetes`: brought up by the local cluster's own code (`xtask cluster up --api-only`,
//! xtask/src/cluster) and torn down by it (`xtask cluster down`: kill by PID, SIGKILL after a
//! grace, routes and files removed) when the [`ApiServer`] is dropped, also on failure.
//! [`NetnsRelay`] reaches it from a node's network namespace; [`write_all`] loads objects into it
//! with bounded concurrency.
use std::{
    io::{self, ErrorKind},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;
use ztunnel::netns::Netns;

/// The local cluster's run directory and API port (xtask/src/cluster/layout.rs).
const RUN_DIR: &str = "/tmp/ztk";
pub const API_ADDR: &str = "127.0.0.1:16443";

/// The xtask binary: `$ZT_XTASK_BIN`, else `target/release/xtask`.
fn xtask() -> PathBuf {
    std::env::var_os("ZT_XTASK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target/release/xtask"))
}

/// etcd + kube-apiserver alone; `xtask cluster down` when dropped.
pub struct ApiServer {
    kubectl: PathBuf,
}

impl ApiServer {
    /// Starts them with Services allocated from `service_cidr` and `unreachable` routes for
    /// it and for `guards`, added before the API server starts.
    pub fn up(service_cidr: &str, guards: &[&str]) -> Result<Self> {
        let mut cmd = Command::new(xtask());
        cmd.args(["cluster", "up", "--no-build", "--api-only", service_cidr]);
        for g in guards {
            cmd.args(["--guard", g]);
        }
        let status = cmd
            .current_dir(crate::workspace_root())
            .status()
            .with_context(|| format!("running {} cluster up", xtask().display()))?;
        // From here on the guard tears down whatever part of it came up.
        let mut server = ApiServer {
            kubectl: PathBuf::new(),
        };
        if !status.success() {
            bail!("`xtask cluster up --api-only` failed ({status})");
        }
        let bin_dir = std::fs::read_to_string(Path::new(RUN_DIR).join("state/k8s-bin-dir"))
            .context("reading the cluster's state")?;
        server.kubectl = PathBuf::from(bin_dir).join("kubectl");
        Ok(server)
    }

    /// The administrator's kubeconfig (client certificate of `system:masters`).
    pub fn kubeconfig(&self) -> PathBuf {
        Path::new(RUN_DIR).join("kubeconfig")
    }

    /// The same credentials, for a server reached at `server` (`https://127.0.0.1:PORT`:
    /// the serving certificate has that address).
    pub fn kubeconfig_for(&self, server: &str, file: &Path) -> Result<()> {
        let text = std::fs::read_to_string(self.kubeconfig())?;
        let text = text.replace(&format!("https://{API_ADDR}"), server);
        std::fs::write(file, text).with_context(|| format!("writing {}", file.display()))
    }

    /// `kubectl ARGS` against it, failing with its output.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--cache-dir")
            .arg(Path::new(RUN_DIR).join("kubectl-cache"))
            .args(args)
            .output()
            .context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A client for it (from the administrator's kubeconfig).
    pub async fn client(&self) -> Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(self.kubeconfig())?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let started = Instant::now();
        match Command::new(xtask()).args(["cluster", "down"]).status() {
            Ok(s) if s.success() => eprintln!(
                "API server torn down in {:.1} s",
                started.elapsed().as_secs_f64()
            ),
            other => eprintln!("xtask cluster down failed: {other:?}: run it by hand"),
        }
    }
}

/// One write to the API: `method path` with a JSON body (a merge patch for PATCH).
#[derive(Clone, Debug)]
pub struct Write {
    pub method: http::Method,
    pub path: String,
    pub body: Value,
}

impl Write {
    pub fn post(path: String, body: Value) -> Self {
        Self {
            method: http::Method::POST,
            path,
            body,
        }
    }
    pub fn merge_patch(path: String, body: Value) -> Self {
        Self {
            method: http::Method::PATCH,
            path,
            body,
        }
    }

    fn request(&self) -> Result<http::Request<Vec<u8>>> {
        let content_type = if self.method == http::Method::PATCH {
            "application/merge-patch+json"
        } else {
            "application/json"
        };
        Ok(http::Request::builder()
            .method(self.method.clone())
            .uri(&self.path)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(serde_json::to_vec(&self.body)?)?)
    }

    /// Sends it, retrying a few times on 429 and 5xx (the API server sheds load that way).
    pub async fn send(&self, client: &kube::Client) -> Result<()> {
        let mut delay = Duration::from_millis(50);
        for attempt in 0.. {
            match client.request_text(self.request()?).await {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if (s.code == 429 || s.code >= 500) && attempt < 8 => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => return Err(anyhow!(e).context(format!("{} {}", self.method, self.path))),
            }
        }
        unreachable!()
    }
}

/// Runs every chain of writes (each chain in order, e.g. a pod's create then its status),
/// at most `concurrency` chains at a time; stops at the first error.
pub async fn write_all(
    client: &kube::Client,
    chains: Vec<Vec<Write>>,
    concurrency: usize,
) -> Result<()> {
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for chain in chains {
        let permit = permits.clone().acquire_owned().await?;
        let client = client.clone();
        tasks.spawn(async move {
            let _permit = permit;
            for w in &chain {
                w.send(&client).await?;
            }
            anyhow::Ok(())
        });
        // Collect what has finished, so an error stops the load early.
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// A TCP relay listening on 127.0.0.1 inside another network namespace and connecting to
/// `target` from this one (the root netns, where the API server listens on loopback): how a
/// proxy in a virtual node reaches the API. Stops accepting when dropped; open connections
/// end with their peers.
pub struct NetnsRelay {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl NetnsRelay {
    pub fn start(netns: &Path, target: SocketAddr) -> Result<Self> {
        let netns = Netns::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        thread::spawn(move || {
            // Bound in the node's netns; the thread itself stays in this one.
            let listener = Netns::current().and_then(|home| {
                let listener = netns.run(&home, || TcpListener::bind("127.0.0.1:0"))??;
                listener.set_nonblocking(true)?;
                Ok(listener)
            });
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(l.local_addr().map(|a| a.port()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        thread::spawn(move || {
                            let _ = relay(conn, target);
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        let port = rx.recv()?.context("binding the relay in the node netns")?;
        Ok(Self { port, stop })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for NetnsRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn relay(conn: TcpStream, target: SocketAddr) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    let upstream = TcpStream::connect(target)?;
    let _ = conn.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut a, mut b) = (conn.try_clone()?, upstream.try_clone()?);
    let back = thread::spawn(move || {
        let _ = io::copy(&mut b, &mut a);
        let _ = a.shutdown(Shutdown::Write);
    });
    let (mut conn, mut upstream) = (conn, upstream);
    let _ = io::copy(&mut conn, &mut upstream);
    let _ = upstream.shutdown(Shutdown::Write);
    let _ = back.join();
    Ok(())
}
