//! The node proxies: how the harness runs them, starts, stops, hands over and kills them.
use std::{
    fs,
    path::Path,
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::{Cluster, NodeProxy, CMD_TIMEOUT, PROXY_START_TIMEOUT};
use crate::{
    cleanup::NETNS_DIR,
    process::{confine, output_with_timeout},
};

impl Cluster {
    // ---- proxies -----------------------------------------------------------------------------

    /// The arguments the harness runs node `i`'s proxy with (after the binary).
    pub fn proxy_args(&self, i: usize) -> Vec<String> {
        vec![
            "run".into(),
            "--config-dir".into(),
            self.config_dir.display().to_string(),
            "--node-name".into(),
            format!("node{i}"),
            "--bpf-dir".into(),
            self.bpf_dir(i).display().to_string(),
            "--cgroup".into(),
            self.node_cgroup(i).display().to_string(),
            "--log-format".into(),
            "json".into(),
            "--ca-dir".into(),
            self.ca_dir().display().to_string(),
        ]
    }

    fn ztunnel_command(
        &self,
        i: usize,
        args: &[String],
    ) -> Result<(Command, crate::process::Confinement)> {
        let bin = crate::ztunnel_bin();
        if !bin.exists() {
            bail!(
                "{} does not exist: build it with `cargo build --release -p ztunnel` (or set ZTUNNEL_BIN)",
                bin.display()
            );
        }
        let mut cmd = Command::new(bin);
        cmd.args(args).env("RUST_LOG", "info,ztunnel=debug");
        let conf = confine(
            &mut cmd,
            Some(&Path::new(NETNS_DIR).join(self.node_netns(i))),
            Some(&self.cgroup.join("proxies")),
        )?;
        Ok((cmd, conf))
    }

    /// Starts node `i`'s proxy and waits for "proxy ready".
    pub fn start_proxy(&self, i: usize) -> Result<()> {
        self.start_proxy_with(i, &[])
    }

    /// Starts node `i`'s proxy with extra arguments and waits for "proxy ready".
    pub fn start_proxy_with(&self, i: usize, extra: &[&str]) -> Result<()> {
        let mark = self.log_mark(i);
        self.spawn_proxy(i, extra)?;
        self.wait_ready(i, mark)
    }

    pub(super) fn start_proxies(&self, nodes: &[usize]) -> Result<()> {
        let marks: Vec<usize> = nodes.iter().map(|i| self.log_mark(*i)).collect();
        for i in nodes {
            self.spawn_proxy(*i, &[])?;
        }
        for (i, mark) in nodes.iter().zip(marks) {
            self.wait_ready(*i, mark)?;
        }
        Ok(())
    }

    /// Spawns node `i`'s proxy: ours with `extra` arguments, or the peer with `extra`
    /// environment assignments (`KEY=VALUE`).
    fn spawn_proxy(&self, i: usize, extra: &[&str]) -> Result<()> {
        if self.proxy_running(i) {
            bail!("the proxy of node {i} is already running");
        }
        if self.node_proxy(i) == NodeProxy::Peer {
            return self.spawn_peer(i, extra);
        }
        let mut args = self.proxy_args(i);
        if extra.contains(&"--ca-address") {
            // A remote CA replaces the embedded one (the two are exclusive).
            if let Some(at) = args.iter().position(|a| a == "--ca-dir") {
                args.drain(at..at + 2);
            }
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let (mut cmd, _conf) = self.ztunnel_command(i, &args)?;
        self.spawn_logged(i, &mut cmd, "ztunnel")
    }

    /// Spawns node `i`'s proxy with the Kubernetes source (`--kubernetes --kubeconfig FILE`)
    /// in place of the configuration directory, without waiting for "proxy ready": a
    /// cluster-sized first list takes longer than [`PROXY_START_TIMEOUT`].
    pub fn spawn_proxy_kubernetes(&self, i: usize, kubeconfig: &Path) -> Result<()> {
        if self.proxy_running(i) {
            bail!("the proxy of node {i} is already running");
        }
        let mut args = self.proxy_args(i);
        let at = args
            .iter()
            .position(|a| a == "--config-dir")
            .expect("the harness's proxies read a configuration directory");
        args.splice(
            at..at + 2,
            [
                "--kubernetes".into(),
                "--kubeconfig".into(),
                kubeconfig.display().to_string(),
            ],
        );
        let (mut cmd, _conf) = self.ztunnel_command(i, &args)?;
        self.spawn_logged(i, &mut cmd, "ztunnel")
    }

    /// Spawns `cmd` as node `i`'s proxy, its output appended to the node's log.
    pub(super) fn spawn_logged(&self, i: usize, cmd: &mut Command, what: &str) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .with_context(|| format!("opening {}", self.log_path(i).display()))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
        self.proxies()[i - 1] = Some(child);
        Ok(())
    }

    fn wait_ready(&self, i: usize, mark: usize) -> Result<()> {
        if self.node_proxy(i) == NodeProxy::Peer {
            return self.wait_peer_ready(i);
        }
        let node = format!("node{i}");
        let deadline = Instant::now() + PROXY_START_TIMEOUT;
        loop {
            if self
                .logs_since(i, mark)
                .iter()
                .any(|l| l["message"] == "proxy ready" && l["node"] == node.as_str())
            {
                return Ok(());
            }
            if let Some(status) = self.proxy_exit_status(i) {
                bail!(
                    "the proxy of node {i} exited ({status}) before it was ready; log:\n{}",
                    self.log_tail(i, 40)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the proxy of node {i} was not ready after {PROXY_START_TIMEOUT:?}; log:\n{}",
                    self.log_tail(i, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Exit status of node `i`'s proxy if it has exited (and was started by the harness).
    pub fn proxy_exit_status(&self, i: usize) -> Option<ExitStatus> {
        let mut p = self.proxies();
        match p[i - 1].as_mut() {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => {
                    p[i - 1] = None;
                    Some(status)
                }
                _ => None,
            },
            None => None,
        }
    }

    pub fn proxy_running(&self, i: usize) -> bool {
        let mut p = self.proxies();
        matches!(p[i - 1].as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn proxy_pid(&self, i: usize) -> Option<u32> {
        self.proxies()[i - 1].as_ref().map(Child::id)
    }

    /// SIGTERM, then waits (10 s) for the exit; SIGKILL if it does not come (and fails).
    pub fn stop_proxy(&self, i: usize) -> Result<ExitStatus> {
        let mut child = self.proxies()[i - 1]
            .take()
            .ok_or_else(|| anyhow!("the proxy of node {i} is not running"))?;
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the proxy of node {i} ignored SIGTERM for 10 s; killed it. log:\n{}",
                    self.log_tail(i, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A rolling restart of node `i`'s proxy, as a DaemonSet update does it: SIGTERM to the
    /// running one and, without waiting for it to exit, a new one (with `--takeover-wait` and
    /// `extra`) that must become ready; then the old one must exit within `drain` plus a
    /// margin. Returns the old proxy's exit status.
    pub fn hand_over_proxy(&self, i: usize, extra: &[&str], drain: Duration) -> Result<ExitStatus> {
        let mut old = self.proxies()[i - 1]
            .take()
            .ok_or_else(|| anyhow!("the proxy of node {i} is not running"))?;
        let mark = self.log_mark(i);
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(old.id() as i32, libc::SIGTERM) };
        let mut args = vec!["--takeover-wait", "10s"];
        args.extend_from_slice(extra);
        let started = self
            .spawn_proxy(i, &args)
            .and_then(|()| self.wait_ready(i, mark));
        let deadline = Instant::now() + drain + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = old.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = old.kill();
                let _ = old.wait();
                bail!("the old proxy of node {i} did not exit after its drain; killed it");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        started?;
        Ok(status)
    }

    /// SIGKILL (a crash): nothing of the proxy's own cleanup runs.
    pub fn kill_proxy(&self, i: usize) -> Result<()> {
        let mut child = self.proxies()[i - 1]
            .take()
            .ok_or_else(|| anyhow!("the proxy of node {i} is not running"))?;
        child.kill().context("killing the proxy")?;
        child.wait().context("reaping the proxy")?;
        Ok(())
    }

    /// Runs the ztunnel binary to completion in node `i`'s netns (e.g. to see it refuse to start).
    pub fn run_ztunnel(&self, i: usize, args: &[String], timeout: Duration) -> Result<Output> {
        let (mut cmd, _conf) = self.ztunnel_command(i, args)?;
        output_with_timeout(&mut cmd, timeout)
    }

    /// `ztunnel bpf uninstall --bpf-dir <node i's pin dir>` (run on the host).
    pub fn bpf_uninstall(&self, i: usize) -> Result<Output> {
        output_with_timeout(
            Command::new(crate::ztunnel_bin())
                .args(["bpf", "uninstall", "--bpf-dir"])
                .arg(self.bpf_dir(i)),
            CMD_TIMEOUT,
        )
    }
}
