//! Istio's ztunnel as a node's proxy: its process, its configuration file, the ZDS server that
//! hands it the node's mesh pods, the in-pod redirection of those pods, and the CA service it
//! gets its certificates from (`ztunnel ca serve`, directly: no relay).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::{Cluster, NodeProxy, CMD_TIMEOUT, PROXY_START_TIMEOUT};
use crate::{
    cleanup::NETNS_DIR,
    config::write_atomic,
    peer::{self, INPOD_ROUTES, INPOD_RULES},
    process::{confine, host, output_with_timeout, Proc},
    zds::{ZdsPod, ZdsServer},
};

/// The CA service's port (istiod's).
const CA_PORT: u16 = 15012;
/// The bearer token the peers present to the CA service.
const CA_TOKEN: &str = "ztt-peer-ca-token";

/// What the peer nodes of a cluster share and keep between restarts of their proxies.
pub(crate) struct Peers {
    bin: Option<PathBuf>,
    /// One ZDS server per peer node, made when its proxy first starts.
    zds: Mutex<BTreeMap<usize, ZdsServer>>,
    /// `ztunnel ca serve`, started with the first peer.
    ca: Mutex<Option<Proc>>,
    /// Authorization policies in the peer's local format, read by each peer when it starts.
    policies: Mutex<Vec<serde_yaml::Value>>,
    /// Pod netns names that carry Istio's in-pod redirection.
    redirected: Mutex<BTreeSet<String>>,
    /// Service accounts the peers' configuration gives pods instead of their own (tests of
    /// secure naming: the peer then expects another identity than the pod proves).
    service_accounts: Mutex<BTreeMap<(String, String), String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Peers {
    pub(crate) fn new(bin: Option<PathBuf>) -> Self {
        Self {
            bin,
            zds: Mutex::default(),
            ca: Mutex::default(),
            policies: Mutex::default(),
            redirected: Mutex::default(),
            service_accounts: Mutex::default(),
        }
    }

    /// Stops the ZDS servers and the CA service (before the cluster's cleanup).
    pub(crate) fn shutdown(&self) {
        lock(&self.zds).clear();
        if let Some(mut ca) = lock(&self.ca).take() {
            ca.kill();
        }
    }
}

impl Cluster {
    /// Where the CA service the peers use listens: node 1's address, port 15012.
    pub fn ca_service_addr(&self) -> SocketAddr {
        SocketAddr::new(self.node(1).ip().into(), CA_PORT)
    }

    /// The bearer token file the CA service requires (written when it starts).
    pub fn ca_token_file(&self) -> PathBuf {
        self.tmp.join("ca-token")
    }

    /// Arguments that make our proxy take its certificates from the CA service the peers use,
    /// verifying it by its SPIFFE id (as `run --ca-address ... --ca-identity` does in a cluster).
    pub fn ca_service_args(&self) -> Vec<String> {
        vec![
            "--ca-address".into(),
            self.ca_service_addr().to_string(),
            "--ca-root".into(),
            self.ca_dir().join("root-cert.pem").display().to_string(),
            "--ca-identity".into(),
            "spiffe://cluster.local/ns/istio-system/sa/ztunnel-ca".into(),
            "--ca-token-file".into(),
            self.ca_token_file().display().to_string(),
        ]
    }

    /// Authorization policies for the peers, one YAML mapping each in their local format (see
    /// [`peer::local_config`]); a peer reads them when it (re)starts.
    pub fn set_peer_policies(&self, policies: &[&str]) -> Result<()> {
        let parsed = policies
            .iter()
            .map(|p| serde_yaml::from_str(p).with_context(|| format!("peer policy {p:?}")))
            .collect::<Result<Vec<serde_yaml::Value>>>()?;
        *lock(&self.peers.policies) = parsed;
        Ok(())
    }

    /// Makes the peers' configuration say pod `namespace/name` runs as `sa` (read when a peer
    /// starts), whatever the pod's own identity is.
    pub fn set_peer_service_account(&self, namespace: &str, name: &str, sa: &str) {
        lock(&self.peers.service_accounts)
            .insert((namespace.to_owned(), name.to_owned()), sa.to_owned());
    }

    /// What the ZDS server of peer node `i` did so far (`hello`, `add acked <uid>`, ...).
    pub fn zds_events(&self, i: usize) -> Vec<String> {
        lock(&self.peers.zds)
            .get(&i)
            .map(ZdsServer::events)
            .unwrap_or_default()
    }

    /// What `ztunnel ca serve` logged so far (empty if it was never started).
    pub fn ca_service_log(&self) -> Vec<String> {
        lock(&self.peers.ca)
            .as_ref()
            .map(Proc::stderr_lines)
            .unwrap_or_default()
    }

    fn peer_dir(&self, i: usize) -> PathBuf {
        self.tmp.join(format!("peer-node{i}"))
    }

    /// Starts `ztunnel ca serve` on the cluster's CA in node 1's netns unless it runs.
    fn ensure_ca_service(&self) -> Result<()> {
        let running = lock(&self.peers.ca).as_mut().is_some_and(Proc::is_running);
        if running {
            return Ok(());
        }
        self.start_ca_service(self.ca_service_addr(), &[])
    }

    /// (Re)starts `ztunnel ca serve` on the cluster's CA in node 1's netns, listening on
    /// `listen` (the peers dial [`Cluster::ca_service_addr`]), with `extra` arguments.
    pub fn start_ca_service(&self, listen: SocketAddr, extra: &[&str]) -> Result<()> {
        let mut ca = lock(&self.peers.ca);
        if let Some(mut old) = ca.take() {
            old.kill();
        }
        let token = self.ca_token_file();
        fs::write(&token, CA_TOKEN).context("writing the CA token")?;
        let (bin, dir, listen) = (
            crate::ztunnel_bin().display().to_string(),
            self.ca_dir().display().to_string(),
            listen.to_string(),
        );
        let token = token.display().to_string();
        let mut args = vec![
            bin.as_str(),
            "ca",
            "serve",
            "--ca-dir",
            &dir,
            "--listen",
            &listen,
            "--token-file",
            &token,
        ];
        args.extend_from_slice(extra);
        let mut p = self.node(1).spawn(&args)?;
        crate::wait_until(Duration::from_secs(10), "the CA service to listen", || {
            p.stderr_lines()
                .iter()
                .any(|l| l.contains("CA service: serving"))
                .then_some(())
                .or_else(|| (!p.is_running()).then_some(()))
        })?;
        if !p.is_running() {
            bail!("ztunnel ca serve exited: {:?}", p.stderr_lines());
        }
        *ca = Some(p);
        Ok(())
    }

    /// The mesh pods of node `i`, as ZDS announces them.
    fn peer_pods(&self, i: usize) -> Vec<ZdsPod> {
        let node = format!("node{i}");
        let m = self.model();
        self.pods
            .iter()
            .filter(|info| info.node == i)
            .filter_map(|info| {
                let p = m.pods.get(&(info.namespace.clone(), info.name.clone()))?;
                // istio-cni hands a pod over once its sandbox runs.
                (p.node == node
                    && !p.pending
                    && peer::in_mesh(m.namespaces.get(&p.namespace), &p.labels))
                .then(|| ZdsPod {
                    uid: peer::workload_uid(p),
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    service_account: p.service_account.clone(),
                    netns: Path::new(NETNS_DIR).join(&info.netns),
                })
            })
            .collect()
    }

    /// The peer's configuration file, from the cluster's configuration as it is now.
    fn write_peer_config(&self, i: usize) -> Result<PathBuf> {
        let text = {
            let m = self.model();
            let accounts = lock(&self.peers.service_accounts);
            let pods: Vec<_> = m
                .pods
                .iter()
                .map(|(key, p)| {
                    let mesh = peer::in_mesh(m.namespaces.get(&p.namespace), &p.labels);
                    let mut p = p.clone();
                    if let Some(sa) = accounts.get(key) {
                        p.service_account = sa.clone();
                    }
                    (p, mesh)
                })
                .collect();
            let services: Vec<_> = m.services.values().cloned().collect();
            peer::local_config(&pods, &services, &lock(&self.peers.policies))
        };
        write_atomic(&self.peer_dir(i), "local-config.yaml", &text)
    }

    /// Spawns Istio's ztunnel as node `i`'s proxy; `env` are `KEY=VALUE` overrides.
    pub(super) fn spawn_peer(&self, i: usize, env: &[&str]) -> Result<()> {
        let bin = self
            .peers
            .bin
            .clone()
            .ok_or_else(|| anyhow!("node {i} was not declared a peer node"))?;
        self.ensure_ca_service()?;
        let dir = self.peer_dir(i);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let socket = dir.join("zds.sock");
        {
            let mut zds = lock(&self.peers.zds);
            let server = match zds.entry(i) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(ZdsServer::bind(&socket)?)
                }
            };
            server.set_pods(self.peer_pods(i));
        }
        let config = self.write_peer_config(i)?;
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .current_dir(&dir)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("RUST_LOG", "info")
            .env("LOG_FORMAT", "json")
            .env("XDS_ADDRESS", "")
            .env("LOCAL_XDS_PATH", &config)
            .env("CLUSTER_ID", peer::CLUSTER_ID)
            .env("NODE_NAME", format!("node{i}"))
            .env("PROXY_MODE", "shared")
            .env("INPOD_UDS", &socket)
            .env("CA_ADDRESS", format!("https://{}", self.ca_service_addr()))
            .env("CA_ROOT_CA", self.ca_dir().join("root-cert.pem"))
            .env("AUTH_TOKEN", self.ca_token_file());
        for kv in env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow!("peer environment {kv:?} is not KEY=VALUE"))?;
            cmd.env(k, v);
        }
        let _conf = confine(
            &mut cmd,
            Some(&Path::new(NETNS_DIR).join(self.node_netns(i))),
            Some(&self.cgroup.join("proxies")),
        )?;
        self.spawn_logged(i, &mut cmd, "Istio's ztunnel")
    }

    /// Waits until peer node `i` answers ready on 15021 (their readiness includes the ZDS
    /// snapshot), checks that it took every pod, then redirects those pods to it.
    pub(super) fn wait_peer_ready(&self, i: usize) -> Result<()> {
        let deadline = Instant::now() + PROXY_START_TIMEOUT;
        loop {
            if let Some(status) = self.proxy_exit_status(i) {
                bail!(
                    "Istio's ztunnel on node {i} exited ({status}) before it was ready; log:\n{}",
                    self.log_tail(i, 40)
                );
            }
            if let Ok((200, _)) = self
                .node(i)
                .http("GET", "http://127.0.0.1:15021/healthz/ready")
            {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "Istio's ztunnel on node {i} was not ready after {PROXY_START_TIMEOUT:?}; \
                     ZDS: {:?}; log:\n{}",
                    self.zds_events(i),
                    self.log_tail(i, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let events = self.zds_events(i);
        if let Some(refused) = events.iter().find(|e| e.starts_with("add refused")) {
            bail!("Istio's ztunnel on node {i} refused a pod: {refused}");
        }
        for pod in self.peer_pods(i) {
            if !events.contains(&format!("add acked {}", pod.uid)) {
                bail!(
                    "Istio's ztunnel on node {i} is ready but never acknowledged {}: {events:?}",
                    pod.uid
                );
            }
            self.redirect_inpod(&pod)?;
        }
        Ok(())
    }

    /// Istio's in-pod redirection in `pod`'s netns (once per pod), as istio-cni applies it
    /// after ztunnel acknowledged the pod.
    fn redirect_inpod(&self, pod: &ZdsPod) -> Result<()> {
        let netns = pod
            .netns
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut done = lock(&self.peers.redirected);
        if done.contains(&netns) {
            return Ok(());
        }
        let rules = write_atomic(&self.tmp, "inpod-rules", INPOD_RULES)?;
        let mut cmd = Command::new("iptables-restore");
        cmd.args(["--wait", "10", "--noflush"]).arg(&rules);
        let _conf = confine(&mut cmd, Some(&pod.netns), Some(&self.cgroup.join("tools")))?;
        let out = output_with_timeout(&mut cmd, CMD_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "iptables-restore in {netns} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for args in INPOD_ROUTES {
            let mut all = vec!["-n", netns.as_str()];
            all.extend_from_slice(args);
            host("ip", &all)?;
        }
        done.insert(netns);
        Ok(())
    }

    /// True if node `i` runs Istio's ztunnel.
    pub fn is_peer(&self, i: usize) -> bool {
        self.node_proxy(i) == NodeProxy::Peer
    }
}
