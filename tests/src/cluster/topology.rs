//! The network of a cluster: the underlay bridge, node and pod namespaces, veths, routes and
//! sysctls, created once when the cluster starts; and commands run in the underlay.
use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use super::{addresses::Family, command, Cluster, ClusterBuilder, CMD_TIMEOUT};
use crate::{
    cleanup::NETNS_DIR,
    config::{self, PodObject, ServiceObject},
    process::{confine, host, output_with_timeout, Proc},
};

/// MAC of every node-side pod veth (as Calico does); pods resolve their gateway (of each
/// family, [`Family::gateway`]) to it statically.
const GATEWAY_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// Below each node's cgroup: the node's own processes (as the kubelet lives below the cgroup
/// root the proxy attaches to), next to the pods' cgroups `<ns>_<pod>`.
pub(super) const NODE_PROCESSES_CGROUP: &str = "host";

/// One pod as created.
#[derive(Clone, Debug)]
pub(super) struct PodInfo {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) node: usize,
    pub(super) netns: String,
    /// One per family of the cluster, in the cluster's order (the primary first).
    pub(super) ips: Vec<IpAddr>,
    pub(super) cgroup: PathBuf,
}

fn ip(args: &[&str]) -> Result<()> {
    host("ip", args).map(drop)
}

/// A node routes IPv6 (between its pods and the underlay) and uses new addresses at once.
const V6_NODE_SYSCTLS: [&str; 3] = [
    "net.ipv6.conf.all.forwarding=1",
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.all.accept_dad=0",
];
/// A pod uses new addresses at once.
const V6_POD_SYSCTLS: [&str; 2] = [
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.all.accept_dad=0",
];

/// `sysctl -qw` in network namespace `ns` (sysctls under `net.` are per namespace).
fn netns_sysctl(ns: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec!["netns", "exec", ns, "sysctl", "-qw"];
    args.extend_from_slice(settings);
    ip(&args)
}

impl Cluster {
    pub(super) fn build(&mut self, b: ClusterBuilder) -> Result<()> {
        fs::create_dir_all(&self.config_dir)
            .with_context(|| format!("creating {}", self.config_dir.display()))?;
        // One mesh root for the whole cluster, as `ztunnel ca init` makes it for an operator.
        let ca = self.ca_dir();
        let out = output_with_timeout(
            Command::new(crate::ztunnel_bin())
                .args(["ca", "init", "--ca-dir"])
                .arg(&ca),
            Duration::from_secs(20),
        )?;
        if !out.status.success() {
            bail!(
                "ztunnel ca init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for dir in ["proxies", "tools"] {
            let d = self.cgroup.join(dir);
            fs::create_dir_all(&d).with_context(|| format!("creating cgroup {}", d.display()))?;
        }
        let families = self.families.clone();
        let v6 = families.contains(&Family::V6);
        let u = self.underlay_netns();
        ip(&["netns", "add", &u])?;
        ip(&["-n", &u, "link", "set", "lo", "up"])?;
        ip(&["-n", &u, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &u, "link", "set", "br0", "up"])?;
        for i in 1..=self.nodes {
            let ns = self.node_netns(i);
            let uplink = format!("n{i}");
            ip(&["netns", "add", &ns])?;
            if v6 {
                // Before any link exists here: addresses are usable at once (no duplicate
                // address detection) and the node routes IPv6 between its pods and the underlay.
                netns_sysctl(&ns, &V6_NODE_SYSCTLS)?;
            }
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &uplink, "netns",
                &u,
            ])?;
            ip(&["-n", &u, "link", "set", &uplink, "master", "br0", "up"])?;
            for f in &families {
                let addr = format!("{}/{}", f.node_ip(i), f.underlay_prefix_len());
                ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0", "nodad"])?;
            }
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            for k in (1..=self.nodes).filter(|k| *k != i) {
                for f in &families {
                    ip(&[
                        "-n",
                        &ns,
                        "route",
                        "add",
                        &f.node_pod_range(k),
                        "via",
                        &f.node_ip(k).to_string(),
                    ])?;
                }
            }
            fs::create_dir_all(self.node_cgroup(i).join(NODE_PROCESSES_CGROUP))?;
        }
        let mut per_node = vec![0usize; self.nodes + 1];
        let mut sysctls: Vec<Vec<String>> = vec![Vec::new(); self.nodes + 1];
        for spec in &b.pods {
            if spec.node == 0 || spec.node > self.nodes {
                bail!(
                    "pod {}/{} is on node {}, which does not exist",
                    spec.namespace,
                    spec.name,
                    spec.node
                );
            }
            if self
                .pods
                .iter()
                .any(|p| p.namespace == spec.namespace && p.name == spec.name)
            {
                bail!("pod {}/{} declared twice", spec.namespace, spec.name);
            }
            let i = spec.node;
            let j = per_node[i];
            per_node[i] += 1;
            if j > 250 {
                bail!("too many pods on node {i}");
            }
            let info = PodInfo {
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                node: i,
                netns: format!("{}-n{i}-p{j}", self.prefix),
                ips: families.iter().map(|f| f.pod_ip(i, j)).collect(),
                cgroup: self
                    .node_cgroup(i)
                    .join(format!("{}_{}", spec.namespace, spec.name)),
            };
            let (pns, nns, veth) = (&info.netns, self.node_netns(i), format!("p{j}"));
            ip(&["netns", "add", pns])?;
            if v6 {
                netns_sysctl(pns, &V6_POD_SYSCTLS)?;
            }
            ip(&["-n", pns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                pns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &veth,
                "address",
                GATEWAY_MAC,
                "netns",
                &nns,
            ])?;
            for addr in &info.ips {
                let f = Family::of(*addr);
                let cidr = format!("{addr}/{}", f.host_prefix_len());
                ip(&["-n", pns, "addr", "add", &cidr, "dev", "eth0", "nodad"])?;
            }
            ip(&["-n", pns, "link", "set", "eth0", "up"])?;
            for f in &families {
                let gw = f.gateway();
                ip(&[
                    "-n",
                    pns,
                    "neigh",
                    "replace",
                    gw,
                    "lladdr",
                    GATEWAY_MAC,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ])?;
                ip(&[
                    "-n", pns, "route", "add", "default", "via", gw, "dev", "eth0", "onlink",
                ])?;
            }
            ip(&["-n", &nns, "link", "set", &veth, "up"])?;
            for addr in &info.ips {
                let cidr = format!("{addr}/{}", Family::of(*addr).host_prefix_len());
                ip(&["-n", &nns, "route", "add", &cidr, "dev", &veth])?;
            }
            if families.contains(&Family::V4) {
                sysctls[i].push(format!("net.ipv4.conf.{veth}.proxy_arp=1"));
            }
            fs::create_dir_all(&info.cgroup)
                .with_context(|| format!("creating cgroup {}", info.cgroup.display()))?;
            let object = PodObject {
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                uid: format!("{}-{}-{}", self.prefix, spec.namespace, spec.name), // PodRef::uid
                node: format!("node{i}"),
                service_account: spec
                    .service_account
                    .clone()
                    .unwrap_or_else(|| spec.name.clone()),
                labels: spec.labels.clone(),
                netns_path: spec
                    .netns_annotation
                    .clone()
                    .unwrap_or_else(|| format!("{NETNS_DIR}/{}", info.netns)),
                ips: spec
                    .reported_ips
                    .clone()
                    .unwrap_or_else(|| info.ips.iter().map(IpAddr::to_string).collect()),
                container_ports: spec.container_ports.clone(),
                pending: spec.pending,
            };
            self.pods.push(info);
            let key = (spec.namespace.clone(), spec.name.clone());
            if spec.listed {
                config::write_atomic(
                    &self.config_dir,
                    &config::pod_file(&key.0, &key.1),
                    &config::pod_yaml(&object),
                )?;
            }
            self.model().pods.insert(key, object);
        }
        for (i, node_sysctls) in sysctls.iter().enumerate().skip(1) {
            let mut args = vec![
                "netns".to_owned(),
                "exec".to_owned(),
                self.node_netns(i),
                "sysctl".to_owned(),
                "-qw".to_owned(),
                "net.ipv4.ip_forward=1".to_owned(),
                "net.ipv4.conf.all.rp_filter=0".to_owned(),
                "net.ipv4.conf.default.rp_filter=0".to_owned(),
            ];
            args.extend(node_sysctls.iter().cloned());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ip(&args)?;
        }
        for (name, l) in &b.namespaces {
            self.set_namespace_labels_map(name, l.clone())?;
        }
        for (n, s) in b.services.iter().enumerate() {
            let object = ServiceObject {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                vips: s.vips.clone().unwrap_or_else(|| self.planned_vips(n)),
                selector: s.selector.clone(),
                ports: s.ports.clone(),
            };
            self.put_service(object)?;
        }
        Ok(())
    }

    /// The cluster IPs of the `n`-th Service: one per family of the cluster.
    pub(super) fn planned_vips(&self, n: usize) -> Vec<String> {
        self.families
            .iter()
            .map(|f| f.service_vip(n).to_string())
            .collect()
    }

    // ---- commands in the underlay ------------------------------------------------------------

    /// Runs a command in the underlay netns (e.g. tcpdump on br0), in the tools cgroup.
    pub fn underlay_exec(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut cmd = command(args)?;
        let _conf = confine(
            &mut cmd,
            Some(&Path::new(NETNS_DIR).join(self.underlay_netns())),
            Some(&self.cgroup.join("tools")),
        )?;
        output_with_timeout(&mut cmd, timeout)
    }

    /// Captures node `node`'s traffic on the underlay (its bridge port: the bridge device
    /// itself does not see frames forwarded between ports) while `during` runs. Returns what
    /// `during` returned, the raw pcap bytes and tcpdump's one-line-per-packet summary.
    pub fn capture_underlay<T>(
        &self,
        node: usize,
        during: impl FnOnce() -> Result<T>,
    ) -> Result<(T, Vec<u8>, String)> {
        let pcap = self.tmp.join(format!("underlay-n{node}.pcap"));
        let pcap_s = pcap.display().to_string();
        let port = format!("n{node}");
        let mut tcpdump = self.underlay_spawn(&[
            "tcpdump",
            "-i",
            &port,
            "-U",
            "--immediate-mode",
            "-n",
            "-w",
            &pcap_s,
            "tcp",
        ])?;
        crate::wait_until(Duration::from_secs(10), "tcpdump to start", || {
            tcpdump
                .stderr_lines()
                .iter()
                .any(|l| l.contains("listening on"))
                .then_some(())
        })?;
        let result = during()?;
        // Let the last packets reach the file before stopping tcpdump.
        std::thread::sleep(Duration::from_millis(1000));
        tcpdump.kill();
        let bytes = fs::read(&pcap).with_context(|| format!("reading {pcap_s}"))?;
        let text = self.underlay_exec(&["tcpdump", "-n", "-r", &pcap_s], CMD_TIMEOUT)?;
        let _ = fs::remove_file(&pcap);
        Ok((
            result,
            bytes,
            String::from_utf8_lossy(&text.stdout).into_owned(),
        ))
    }

    /// Spawns a long-running command in the underlay netns.
    pub fn underlay_spawn(&self, args: &[&str]) -> Result<Proc> {
        let mut cmd = command(args)?;
        let _conf = confine(
            &mut cmd,
            Some(&Path::new(NETNS_DIR).join(self.underlay_netns())),
            Some(&self.cgroup.join("tools")),
        )?;
        Proc::spawn(&mut cmd, &format!("underlay: {}", args.join(" ")))
    }
}

/// What is wrong with a capture of the underlay that should carry only mutual TLS on the HBONE
/// port: any of `secrets` (bytes the test sent) or HTTP/1.1 in clear, a packet on another port,
/// or no packet at all. `None` if nothing.
pub fn underlay_not_only_mtls(bytes: &[u8], text: &str, secrets: &[&[u8]]) -> Option<String> {
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    if let Some(s) = secrets.iter().find(|s| contains(s)) {
        return Some(format!(
            "{:?} crossed the underlay in plaintext",
            String::from_utf8_lossy(s)
        ));
    }
    if contains(b"HTTP/1.1") {
        return Some("HTTP crossed the underlay in plaintext".into());
    }
    if text.is_empty() || !text.lines().all(|l| l.contains(".15008")) {
        return Some(format!(
            "not only the tunnel port crosses the underlay:\n{text}"
        ));
    }
    None
}
