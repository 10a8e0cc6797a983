//! The container runtime's side of `ztunnel-cni`, for the virtual cluster: each node gets a
//! CNI bin and conf directory with a conflist, `ztunnel cni install` chains the plugin into
//! it, and [`PodRef::cni`] runs the chain's `ztunnel-cni` entry for a pod exactly as
//! containerd does after its primary plugin: the environment (`CNI_COMMAND`, `CNI_NETNS`,
//! `CNI_ARGS` with the pod's namespace, name and UID…), the conflist entry on stdin with the
//! primary plugin's result as `prevResult`, in the node's network namespace.
use std::{
    fs,
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};

use crate::{
    cleanup::NETNS_DIR,
    cluster::{addresses::Family, Cluster, PodRef},
    process::{confine, output_with_input, output_with_timeout},
};

/// How long a plugin run may take (the proxy waits `--cni-pod-wait` at most for a pod).
pub const CNI_TIMEOUT: Duration = Duration::from_secs(40);

/// A node's CNI directories and the proxy's socket.
#[derive(Clone, Debug)]
pub struct NodeCni {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub socket: PathBuf,
}

impl NodeCni {
    /// The node's network, as the runtime reads it.
    pub fn conflist(&self) -> PathBuf {
        self.conf_dir.join("10-ztt.conflist")
    }
}

/// What a plugin run printed, and how it exited.
#[derive(Debug)]
pub struct CniOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
    /// stdout as JSON (Null if it is not).
    pub json: Value,
}

impl CniOutput {
    fn of(out: Output) -> Self {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        Self {
            success: out.status.success(),
            json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The CNI error code, if it failed with one.
    pub fn code(&self) -> Option<u64> {
        self.json["code"].as_u64()
    }

    /// `msg` and `details` of a CNI error.
    pub fn error_text(&self) -> String {
        format!("{} {}", self.json["msg"], self.json["details"])
    }
}

impl Cluster {
    /// Node `i`'s CNI directories (below the cluster's temporary directory).
    pub fn node_cni(&self, i: usize) -> NodeCni {
        let dir = self.tmp_dir().join(format!("node{i}-cni"));
        NodeCni {
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("net.d"),
            socket: dir.join("cni.sock"),
        }
    }

    /// Gives node `i` a network (a bridge conflist, unless it has one; the harness plays the
    /// bridge plugin itself) and runs `ztunnel cni install` on it. Returns the install's
    /// output.
    pub fn install_cni(&self, i: usize) -> Result<Output> {
        let cni = self.node_cni(i);
        fs::create_dir_all(&cni.bin_dir)?;
        fs::create_dir_all(&cni.conf_dir)?;
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": format!("{}-n{i}", self.prefix()),
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": false,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("10.{i}.0.0/24")}]]}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        });
        if !cni.conflist().exists() {
            fs::write(cni.conflist(), serde_json::to_string_pretty(&conflist)?)?;
        }
        let out = self.ztunnel_cni_command(&[
            "install",
            "--bin-dir",
            &cni.bin_dir.display().to_string(),
            "--conf-dir",
            &cni.conf_dir.display().to_string(),
            "--socket",
            &cni.socket.display().to_string(),
        ])?;
        if !out.status.success() {
            bail!(
                "ztunnel cni install failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// Runs `ztunnel cni <args>` on the host.
    pub fn ztunnel_cni_command(&self, args: &[&str]) -> Result<Output> {
        let mut all = vec!["cni"];
        all.extend_from_slice(args);
        let mut cmd = Command::new(crate::ztunnel_bin());
        cmd.args(&all);
        if !args.contains(&"--plugin") && args.first() == Some(&"install") {
            cmd.args(["--plugin", &crate::cni_bin_checked()?.display().to_string()]);
        }
        output_with_timeout(&mut cmd, Duration::from_secs(20))
    }

    /// The extra arguments of a proxy that serves node `i`'s plugin.
    pub fn cni_proxy_args(&self, i: usize) -> Vec<String> {
        vec![
            "--cni-socket".into(),
            self.node_cni(i).socket.display().to_string(),
        ]
    }
}

/// How a plugin run differs from what containerd would do (for the bad-input tests).
#[derive(Clone, Debug, Default)]
pub struct CniRun {
    /// The sandbox id (`CNI_CONTAINERID`); default `sandbox-1`.
    pub container_id: Option<String>,
    /// Environment variables replaced (`Some`) or removed (`None`).
    pub env: Vec<(String, Option<String>)>,
    /// Replaces the whole stdin.
    pub stdin: Option<Vec<u8>>,
    /// Replaces `prevResult`.
    pub prev_result: Option<Value>,
}

impl PodRef<'_> {
    /// The primary plugin's result for this pod: its address on `eth0` in its sandbox.
    pub fn cni_prev_result(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "veth-host", "mac": "ee:ee:ee:ee:ee:ee"},
                {"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": self.netns_path().display().to_string()}
            ],
            "ips": self.ips().iter().map(|ip| json!({
                "address": format!("{ip}/{}", Family::of(*ip).host_prefix_len()),
                "interface": 1,
            })).collect::<Vec<_>>(),
            "routes": self.ips().iter().map(|ip| match Family::of(*ip) {
                Family::V4 => json!({"dst": "0.0.0.0/0", "gw": Family::V4.gateway()}),
                Family::V6 => json!({"dst": "::/0", "gw": Family::V6.gateway()}),
            }).collect::<Vec<_>>(),
            "dns": {}
        })
    }

    /// Runs `CNI_COMMAND=command` (ADD, DEL, CHECK) of the node's `ztunnel-cni` for this pod.
    pub fn cni(&self, command: &str) -> Result<CniOutput> {
        self.cni_run(command, &CniRun::default())
    }

    /// [`PodRef::cni`], with `run`'s changes.
    pub fn cni_run(&self, command: &str, run: &CniRun) -> Result<CniOutput> {
        let c = self.cluster();
        let node = c.node_cni(self.node());
        let list: Value =
            serde_json::from_str(&fs::read_to_string(node.conflist()).with_context(|| {
                format!("reading {} (install_cni first)", node.conflist().display())
            })?)?;
        let entry = list["plugins"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["type"] == "ztunnel-cni"))
            .ok_or_else(|| anyhow!("{} does not chain ztunnel-cni", node.conflist().display()))?;
        // The runtime's network configuration for one plugin: its entry, with the list's
        // cniVersion and name, and the previous plugin's result.
        let mut conf = entry.clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        if command != "DEL" || run.prev_result.is_some() {
            conf["prevResult"] = run
                .prev_result
                .clone()
                .unwrap_or_else(|| self.cni_prev_result());
        }
        let stdin = run
            .stdin
            .clone()
            .unwrap_or_else(|| serde_json::to_vec(&conf).expect("JSON"));
        let container_id = run
            .container_id
            .clone()
            .unwrap_or_else(|| "sandbox-1".into());
        let mut cmd = Command::new(node.bin_dir.join("ztunnel-cni"));
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &container_id)
            .env("CNI_NETNS", self.netns_path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &node.bin_dir)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={}",
                    self.namespace(),
                    self.name(),
                    self.uid()
                ),
            );
        for (k, v) in &run.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        // Like containerd: in the node's network namespace, outside the pods' cgroups.
        let _conf = confine(
            &mut cmd,
            Some(&std::path::Path::new(NETNS_DIR).join(c.node_netns(self.node()))),
            Some(&c.cgroup_dir().join("tools")),
        )?;
        Ok(CniOutput::of(output_with_input(
            &mut cmd,
            Some(&stdin),
            CNI_TIMEOUT,
        )?))
    }
}
