//! Handles on a node and a pod of a running cluster, to run commands and probes inside them.
use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;

use super::{
    addresses::{socket_addr, Family},
    command,
    topology::{PodInfo, NODE_PROCESSES_CGROUP},
    Cluster, CMD_TIMEOUT,
};
use crate::{
    cleanup::NETNS_DIR,
    process::{confine, output_with_timeout, Proc},
};

/// A node of the cluster.
pub struct NodeRef<'a> {
    pub(super) cluster: &'a Cluster,
    pub(super) i: usize,
}

impl NodeRef<'_> {
    pub fn index(&self) -> usize {
        self.i
    }
    /// `node<i>`, the proxy's `--node-name`.
    pub fn name(&self) -> String {
        format!("node{}", self.i)
    }
    pub fn netns(&self) -> String {
        self.cluster.node_netns(self.i)
    }
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(self.netns())
    }
    /// The node's IPv4 underlay address (whether or not the underlay carries IPv4).
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 255, 0, self.i as u8)
    }
    /// The node's underlay address of `family`.
    pub fn ip_of(&self, family: Family) -> IpAddr {
        family.node_ip(self.i)
    }
    pub fn bpf_dir(&self) -> PathBuf {
        self.cluster.bpf_dir(self.i)
    }
    /// The cgroup the node's proxy attaches its programs to (pods live below it).
    pub fn cgroup(&self) -> PathBuf {
        self.cluster.node_cgroup(self.i)
    }
    pub fn logs(&self) -> Vec<Value> {
        self.cluster.logs(self.i)
    }

    /// The cgroup of the node's own processes (below [`NodeRef::cgroup`], as the kubelet is
    /// below the cgroup root on a real node).
    pub fn processes_cgroup(&self) -> PathBuf {
        self.cluster.node_cgroup(self.i).join(NODE_PROCESSES_CGROUP)
    }

    /// `args` as a command in the node's netns and `cgroup`; the confinement must outlive the
    /// process's start.
    fn confined(
        &self,
        args: &[&str],
        cgroup: &Path,
    ) -> Result<(Command, crate::process::Confinement)> {
        let mut cmd = command(args)?;
        let conf = confine(&mut cmd, Some(&self.netns_path()), Some(cgroup))?;
        Ok((cmd, conf))
    }

    /// Runs a command as one of the node's own processes (a kubelet probe): in the node's
    /// netns and in [`NodeRef::processes_cgroup`].
    pub fn exec_as_node(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let (mut cmd, _conf) = self.confined(args, &self.processes_cgroup())?;
        output_with_timeout(&mut cmd, timeout)
    }

    /// Runs a command in the node's netns (tools cgroup, outside the node's pod cgroups).
    pub fn exec(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let (mut cmd, _conf) = self.confined(args, &self.cluster.cgroup.join("tools"))?;
        output_with_timeout(&mut cmd, timeout)
    }

    /// An HTTP request from inside the node's netns (to the proxy's metrics, readiness and
    /// admin ports): the status and the body.
    pub fn http(&self, method: &str, url: &str) -> Result<(u16, String)> {
        let out = self.exec(
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-X",
                method,
                "-w",
                "\n%{http_code}",
                url,
            ],
            Duration::from_secs(10),
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code = code.trim().parse().with_context(|| {
            format!(
                "curl {url}: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok((code, body.to_owned()))
    }

    /// The node proxy's metrics (port 15020).
    pub fn scrape(&self) -> Result<crate::metrics::Scrape> {
        let (code, body) = self.http("GET", "http://127.0.0.1:15020/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}: {body}");
        }
        crate::metrics::Scrape::parse(&body)
    }

    /// Spawns a long-running command in the node netns (e.g. `ztunnel ca serve`).
    pub fn spawn(&self, args: &[&str]) -> Result<Proc> {
        let (mut cmd, _conf) = self.confined(args, &self.cluster.cgroup.join("tools"))?;
        Proc::spawn(
            &mut cmd,
            &format!("node {}: {}", self.index(), args.join(" ")),
        )
    }
}

/// What a `vc-probe get`/`connect` printed, and how it exited.
#[derive(Debug)]
pub struct ProbeOutput {
    pub code: Option<i32>,
    /// The JSON line it printed (Null if none).
    pub json: Value,
    pub stdout: String,
    pub stderr: String,
}

impl ProbeOutput {
    /// The response body parsed as JSON (Null if it is not).
    pub fn body(&self) -> Value {
        self.json["body"]
            .as_str()
            .and_then(|b| serde_json::from_str(b).ok())
            .unwrap_or(Value::Null)
    }

    /// Itself if the probe exited 0, else an error with what it printed.
    pub fn succeeded(self) -> Result<Self> {
        ensure!(
            self.code == Some(0),
            "request failed: {} {}",
            self.stdout,
            self.stderr
        );
        Ok(self)
    }
}

/// A pod of the cluster.
pub struct PodRef<'a> {
    pub(super) cluster: &'a Cluster,
    pub(super) info: &'a PodInfo,
}

impl<'a> PodRef<'a> {
    pub fn cluster(&self) -> &'a Cluster {
        self.cluster
    }
    pub fn namespace(&self) -> &str {
        &self.info.namespace
    }
    pub fn name(&self) -> &str {
        &self.info.name
    }
    /// `namespace/name`, as the proxy logs it.
    pub fn workload(&self) -> String {
        format!("{}/{}", self.info.namespace, self.info.name)
    }
    pub fn node(&self) -> usize {
        self.info.node
    }
    /// The pod's IPv4 address; panics if the pod has none (use [`PodRef::ip_of`]).
    pub fn ip(&self) -> Ipv4Addr {
        match self.ip_of(Family::V4) {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => unreachable!("ip_of(V4) is IPv4"),
        }
    }
    /// The pod's address of `family`; panics if the cluster has no such family.
    pub fn ip_of(&self, family: Family) -> IpAddr {
        self.info
            .ips
            .iter()
            .copied()
            .find(|ip| Family::of(*ip) == family)
            .unwrap_or_else(|| panic!("pod {} has no {family} address", self.workload()))
    }
    /// Every address of the pod, the primary first.
    pub fn ips(&self) -> &[IpAddr] {
        &self.info.ips
    }
    /// `ip:port` (`[ip]:port` for IPv6) of the pod's address of `family`.
    pub fn addr(&self, family: Family, port: u16) -> String {
        socket_addr(self.ip_of(family), port)
    }
    pub fn netns(&self) -> &str {
        &self.info.netns
    }
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.info.netns)
    }
    pub fn cgroup(&self) -> &Path {
        &self.info.cgroup
    }
    /// The pod's `metadata.uid` in the configuration.
    pub fn uid(&self) -> String {
        format!(
            "{}-{}-{}",
            self.cluster.prefix, self.info.namespace, self.info.name
        )
    }

    fn confined(&self, args: &[&str]) -> Result<(Command, crate::process::Confinement)> {
        let mut cmd = command(args)?;
        let conf = confine(&mut cmd, Some(&self.netns_path()), Some(&self.info.cgroup))?;
        Ok((cmd, conf))
    }

    /// Starts a process in the pod (its netns and cgroup); killed when the guard drops.
    pub fn spawn(&self, args: &[&str]) -> Result<Proc> {
        let (mut cmd, _conf) = self.confined(args)?;
        Proc::spawn(
            &mut cmd,
            &format!("{}: {}", self.workload(), args.join(" ")),
        )
    }

    /// Runs a command in the pod to completion (killed after `timeout`).
    pub fn run(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let (mut cmd, _conf) = self.confined(args)?;
        output_with_timeout(&mut cmd, timeout)
    }

    /// Starts `vc-probe <args>` in the pod.
    pub fn spawn_probe(&self, args: &[&str]) -> Result<Proc> {
        let bin = crate::probe_bin_checked()?;
        let bin = bin.to_string_lossy();
        let mut all = vec![bin.as_ref()];
        all.extend_from_slice(args);
        self.spawn(&all)
    }

    /// `vc-probe http-server` on `port`, once it is listening.
    pub fn http_server(&self, port: u16, name: &str) -> Result<Proc> {
        let port = port.to_string();
        let mut p = self.spawn_probe(&["http-server", "--port", &port, "--name", name])?;
        p.wait_for_json(0, Duration::from_secs(10), |v| v["event"] == "listening")?;
        Ok(p)
    }

    /// `vc-probe tcp-echo` on `port`, once it is listening.
    pub fn tcp_echo(&self, port: u16) -> Result<Proc> {
        let port = port.to_string();
        let mut p = self.spawn_probe(&["tcp-echo", "--port", &port])?;
        p.wait_for_json(0, Duration::from_secs(10), |v| v["event"] == "listening")?;
        Ok(p)
    }

    /// A long-lived `vc-probe repl` client: `proc.request("get 10.2.0.2:8080", timeout)`.
    pub fn repl(&self) -> Result<Proc> {
        let mut p = self.spawn_probe(&["repl", "--timeout-ms", "5000"])?;
        p.wait_for_json(0, Duration::from_secs(10), |v| v["event"] == "ready")?;
        Ok(p)
    }

    /// Runs `vc-probe <args>` to completion.
    pub fn probe(&self, args: &[&str]) -> Result<ProbeOutput> {
        let bin = crate::probe_bin_checked()?;
        let bin = bin.to_string_lossy();
        let mut all = vec![bin.as_ref()];
        all.extend_from_slice(args);
        let out = self.run(&all, CMD_TIMEOUT)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null);
        Ok(ProbeOutput {
            code: out.status.code(),
            json,
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// curl from this pod, one `-o /dev/null` transfer per URL (reusing connections where it
    /// can), each with `options`: the status of each transfer (0 where none came), and all
    /// curl printed (`<status> <connections opened>` per transfer, then its errors).
    pub fn curl(&self, options: &[&str], urls: &[&str]) -> Result<(Vec<u16>, String)> {
        let mut all = vec!["curl", "-sS", "--max-time", "5"];
        all.extend_from_slice(&["-w", "%{http_code} %{num_connects}\\n"]);
        all.extend_from_slice(options);
        for url in urls {
            all.extend_from_slice(&["-o", "/dev/null", url]);
        }
        let out = self.run(&all, CMD_TIMEOUT)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let codes = text
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        Ok((codes, text))
    }

    /// `vc-probe get --addr <addr>` from this pod (5 s connect/read timeout).
    pub fn get(&self, addr: &str) -> Result<ProbeOutput> {
        self.probe(&["get", "--addr", addr, "--timeout-ms", "5000"])
    }
}
