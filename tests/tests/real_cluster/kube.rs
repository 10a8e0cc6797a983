//! What the real-cluster suite drives: the local cluster (`cargo xtask cluster up`, torn down
//! when dropped, also on failure), kubectl, helm, tcpdump on the underlay, the proxies' logs.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

/// The cluster's run directory (xtask/src/cluster/layout.rs) and what lives in it.
pub const RUN_DIR: &str = "/tmp/ztk";
pub const NODES: [&str; 2] = ["ztk-node1", "ztk-node2"];
/// The underlay port of node 2 (the web pod's node): a bridge's own interface shows only the
/// host's traffic, its ports show what crosses between nodes.
pub const NODE2_PORT: &str = "ztk-n2";

/// The xtask binary: `$ZT_XTASK_BIN` (set by `cargo xtask test`), else the one `cargo xtask`
/// builds.
fn xtask() -> PathBuf {
    std::env::var_os("ZT_XTASK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| ztunnel_tests::workspace_root().join("target/debug/xtask"))
}

/// A running local cluster; dropping it runs `cargo xtask cluster down`.
pub struct LocalCluster {
    pub bring_up: Duration,
}

impl LocalCluster {
    /// `cargo xtask cluster up` with the binaries already built (by `cargo xtask test`, or by
    /// hand: `cargo xtask build`). Its failure is the suite's failure (never a skip).
    pub fn up() -> Result<LocalCluster> {
        let started = Instant::now();
        let status = Command::new(xtask())
            .args(["cluster", "up", "--no-build"])
            .current_dir(ztunnel_tests::workspace_root())
            .status()
            .with_context(|| format!("running {} cluster up", xtask().display()))?;
        if !status.success() {
            bail!("`cargo xtask cluster up` failed ({status}): the cluster did not start");
        }
        Ok(LocalCluster {
            bring_up: started.elapsed(),
        })
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // For investigating a failure: the cluster stays up (`cargo xtask cluster down` later).
        if std::env::var_os("ZT_KEEP_CLUSTER").is_some() {
            eprintln!("ZT_KEEP_CLUSTER is set: the cluster stays up");
            return;
        }
        let started = Instant::now();
        match Command::new(xtask()).args(["cluster", "down"]).status() {
            Ok(s) if s.success() => {
                eprintln!(
                    "cluster torn down in {:.1} s",
                    started.elapsed().as_secs_f64()
                )
            }
            other => eprintln!("cargo xtask cluster down failed: {other:?}"),
        }
    }
}

pub fn kubeconfig() -> PathBuf {
    Path::new(RUN_DIR).join("kubeconfig")
}

fn bin_dir() -> Result<PathBuf> {
    let dir = std::fs::read_to_string(Path::new(RUN_DIR).join("state/k8s-bin-dir"))
        .context("reading the cluster's state (is it up?)")?;
    Ok(PathBuf::from(dir))
}

pub fn kubectl_cmd() -> Result<Command> {
    let mut c = Command::new(bin_dir()?.join("kubectl"));
    c.arg("--kubeconfig")
        .arg(kubeconfig())
        .arg("--cache-dir")
        .arg(Path::new(RUN_DIR).join("kubectl-cache"));
    Ok(c)
}

fn checked(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kubectl ARGS`, failing with its output.
pub fn kubectl(args: &[&str]) -> Result<String> {
    let mut c = kubectl_cmd()?;
    c.args(args);
    checked(c, &format!("kubectl {}", args.join(" ")))
}

pub fn kubectl_json(args: &[&str]) -> Result<Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    Ok(serde_json::from_str(&kubectl(&all)?)?)
}

/// `kubectl apply -f -` with `yaml` on stdin.
pub fn apply(yaml: &str) -> Result<()> {
    let mut child = kubectl_cmd()?
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(yaml.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The helm `cargo xtask check-deploy` installs (xtask/src/deploy_tools.rs).
pub fn helm(args: &[&str]) -> Result<String> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    let mut c = Command::new(cache.join("ztunnel-xtask/helm-v4.1.4/helm"));
    let own = Path::new(RUN_DIR).join("helm");
    c.env("KUBECONFIG", kubeconfig())
        .env("HELM_CACHE_HOME", own.join("cache"))
        .env("HELM_CONFIG_HOME", own.join("config"))
        .env("HELM_DATA_HOME", own.join("data"))
        .env("KUBECACHEDIR", Path::new(RUN_DIR).join("kubectl-cache"))
        .args(args);
    checked(c, &format!("helm {}", args.join(" ")))
}

/// `kubectl exec` in a pod's first container: (exit code, stdout, stderr).
pub fn exec(ns: &str, pod: &str, cmd: &[&str]) -> Result<Output> {
    let mut c = kubectl_cmd()?;
    c.args(["-n", ns, "exec", pod, "--"]).args(cmd);
    c.output().context("running kubectl exec")
}

/// An HTTP exchange from a pod (busybox wget): the status code (0 when none came back) and
/// the body.
pub fn http(ns: &str, pod: &str, url: &str, extra: &[&str]) -> Result<(u16, String)> {
    let mut cmd = vec!["timeout", "5", "wget", "-S", "-q", "-O", "-"];
    cmd.extend(extra);
    cmd.push(url);
    let out = exec(ns, pod, &cmd)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("HTTP/1.1 "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .next_back()
        .unwrap_or(0);
    Ok((code, String::from_utf8_lossy(&out.stdout).into_owned()))
}

pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            let why = last_err
                .map(|e| format!(" (last error: {e:#})"))
                .unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}{why}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// `kubectl wait` for pods of a namespace to be Ready.
pub fn wait_ready(ns: &str, pods: &[&str]) -> Result<()> {
    let mut args = vec!["wait", "--for=condition=Ready", "--timeout=60s", "-n", ns];
    let names: Vec<String> = pods.iter().map(|p| format!("pod/{p}")).collect();
    args.extend(names.iter().map(String::as_str));
    kubectl(&args).map(drop)
}

/// The node proxies' pods (those on `node` only, if given), as kubectl's JSON list.
pub fn proxy_pods(node: Option<&str>) -> Result<Value> {
    let mut args = vec![
        "-n".to_owned(),
        "istio-system".into(),
        "get".into(),
        "pods".into(),
        "-l".into(),
        "app.kubernetes.io/component=node-proxy".into(),
    ];
    if let Some(node) = node {
        args.extend(["--field-selector".into(), format!("spec.nodeName={node}")]);
    }
    kubectl_json(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The node proxy pod on `node`.
pub fn proxy_pod(node: &str) -> Result<String> {
    let pods = proxy_pods(Some(node))?;
    pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["metadata"]["deletionTimestamp"].is_null())
        .and_then(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .ok_or_else(|| anyhow!("no node proxy pod on {node}"))
}

/// The JSON log lines of the node proxy on `node`.
pub fn proxy_log(node: &str) -> Result<Vec<Value>> {
    let pod = proxy_pod(node)?;
    let text = kubectl(&["-n", "istio-system", "logs", &pod])?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

pub fn pod_ip(ns: &str, pod: &str) -> Result<Ipv4Addr> {
    let p = kubectl_json(&["-n", ns, "get", "pod", pod])?;
    p["status"]["podIP"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("{ns}/{pod} has no IP"))
}

/// A packet capture on node 2's underlay port (root netns), as pcap, read back by
/// [`Capture::stop`].
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    pub fn start(name: &str, filter: &str) -> Result<Capture> {
        let dir = Path::new(RUN_DIR).join("suite");
        std::fs::create_dir_all(&dir)?;
        let file = dir.join(format!("{name}.pcap"));
        let child = Command::new("tcpdump")
            .args([
                "-i",
                NODE2_PORT,
                "-nn",
                "-U",
                "--immediate-mode",
                "-s",
                "0",
                "-w",
            ])
            .arg(&file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump")?;
        let mut c = Capture { child, file };
        // tcpdump says "listening on" once the capture runs.
        let stderr = c.child.stderr.take().expect("piped");
        let mut lines = BufReader::new(stderr).lines();
        match lines.next() {
            Some(Ok(l)) if l.contains("listening on") => {}
            other => bail!("tcpdump did not start: {other:?}"),
        }
        thread::spawn(move || for _ in lines {});
        Ok(c)
    }

    pub fn stop(mut self) -> Result<Vec<Packet>> {
        // SAFETY: our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait()?;
        parse_pcap(&std::fs::read(&self.file)?)
    }
}

/// One IPv4 TCP packet of a capture.
#[derive(Debug, Clone)]
pub struct Packet {
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub payload: Vec<u8>,
}

impl Packet {
    pub fn has_port(&self, port: u16) -> bool {
        self.src.1 == port || self.dst.1 == port
    }
}

/// The TCP/IPv4 packets of a pcap file with Ethernet frames (what tcpdump -w writes for a
/// bridge).
pub fn parse_pcap(data: &[u8]) -> Result<Vec<Packet>> {
    if data.len() < 24 || data[..4] != [0xd4, 0xc3, 0xb2, 0xa1] {
        bail!("not a little-endian pcap file");
    }
    let u32le = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let mut pos = 24;
    let mut packets = Vec::new();
    while pos + 16 <= data.len() {
        let caplen = u32le(&data[pos + 8..]);
        let frame = data
            .get(pos + 16..pos + 16 + caplen)
            .ok_or_else(|| anyhow!("truncated pcap record"))?;
        pos += 16 + caplen;
        if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        if ip[9] != 6 || ip.len() < ihl + 20 {
            continue;
        }
        let tcp = &ip[ihl..total.min(ip.len())];
        let doff = ((tcp[12] >> 4) as usize) * 4;
        let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
        packets.push(Packet {
            src: (addr(&ip[12..16]), u16::from_be_bytes([tcp[0], tcp[1]])),
            dst: (addr(&ip[16..20]), u16::from_be_bytes([tcp[2], tcp[3]])),
            payload: tcp.get(doff..).unwrap_or_default().to_vec(),
        });
    }
    Ok(packets)
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A long-running `kubectl exec` whose stdout lines are timestamped as they arrive.
pub struct Streamed {
    child: Child,
    lines: Arc<Mutex<Vec<(SystemTime, String)>>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Streamed {
    pub fn exec(ns: &str, pod: &str, script: &str) -> Result<Streamed> {
        let mut child = kubectl_cmd()?
            .args(["-n", ns, "exec", pod, "--", "sh", "-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = child.stdout.take().expect("piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        let reader = thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push((SystemTime::now(), line));
            }
        });
        Ok(Streamed {
            child,
            lines,
            reader: Some(reader),
        })
    }

    /// Waits for the command to end (at most `timeout`) and returns its timestamped lines.
    pub fn finish(mut self, timeout: Duration) -> Result<Vec<(SystemTime, String)>> {
        let deadline = Instant::now() + timeout;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("the streamed command did not end within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(100));
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok(std::mem::take(&mut *self.lines.lock().unwrap()))
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An RFC 3339 time as the API server writes it (`2026-12-01T12:31:11Z`), as a SystemTime.
pub fn parse_k8s_time(s: &str) -> Result<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 20 || b[19] != b'Z' {
        bail!("unexpected time {s:?}");
    }
    let n = |r: std::ops::Range<usize>| -> Result<i64> { Ok(s[r].parse()?) };
    let (y, mo, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (h, mi, se) = (n(11..13)?, n(14..16)?, n(17..19)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64))
}
