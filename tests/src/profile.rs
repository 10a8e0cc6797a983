//! `bench --profile`: where the node proxies spend their CPU while a step runs.
//!
//! `perf record` samples both proxies of a path (stacks unwound from DWARF: neither our
//! release build nor Istio's keeps frame pointers, both keep `.eh_frame` and their symbols)
//! for exactly the time one measurement runs. Afterwards each recording is folded
//! (`<name>.folded`, one line per distinct stack, Brendan Gregg's format), drawn as a flame
//! graph (`<name>.svg`) and summarised: the share of samples per leaf function and per layer
//! (kernel, TLS, HTTP/2, runtime, ...), which is what docs/benchmarks.md quotes.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{bail, ensure, Context as _, Result};
use inferno::collapse::Collapse as _;
use serde_json::{json, Value};

/// Samples per second and thread: enough for a few thousand stacks per step, little enough
/// that perf's own cost stays out of the figures (it runs outside the proxies' CPU time, but on
/// the same two cores).
const FREQUENCY: &str = "499";
/// Stack bytes copied per sample for the DWARF unwinder: deep enough for a tokio task's
/// poll chain down to the syscall.
const STACK_BYTES: &str = "dwarf,16384";

/// Where the recordings of one run go, and which ones were taken.
pub struct Profiler {
    dir: PathBuf,
    taken: Vec<String>,
}

/// One recording in progress; stopped (SIGINT, so perf writes its file) by [`Recording::stop`]
/// or when dropped.
pub struct Recording {
    child: Option<Child>,
    name: String,
}

impl Profiler {
    /// Checks that `perf` runs (`cargo xtask setup` installs linux-perf) and creates `dir`.
    pub fn new(dir: &Path) -> Result<Self> {
        let version = Command::new("perf").arg("--version").output();
        ensure!(
            version.is_ok_and(|o| o.status.success()),
            "perf is not installed (`cargo xtask setup` installs linux-perf)"
        );
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
            taken: Vec::new(),
        })
    }

    /// Starts sampling `pids` as recording `name` (e.g. `latency-mesh`); a name already taken
    /// in this run is not recorded again (the first round is the one profiled).
    pub fn start(&mut self, name: &str, pids: &[u32]) -> Result<Option<Recording>> {
        if self.taken.iter().any(|n| n == name) {
            return Ok(None);
        }
        let pids = pids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let data = self.dir.join(format!("{name}.perf.data"));
        let child = Command::new("perf")
            .args(["record", "-q", "-F", FREQUENCY, "--call-graph", STACK_BYTES])
            .args(["-p", &pids, "-o"])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting perf record")?;
        // perf attaches before it starts counting; a measurement that began earlier would lose
        // its first samples, so give it the moment it needs.
        std::thread::sleep(std::time::Duration::from_millis(300));
        self.taken.push(name.to_owned());
        Ok(Some(Recording {
            child: Some(child),
            name: name.to_owned(),
        }))
    }

    /// Folds, draws and summarises every recording; the summary per recording goes to the
    /// bench's JSON (`profile`).
    pub fn render(&self) -> Value {
        let mut all = serde_json::Map::new();
        for name in &self.taken {
            let summary = match self.render_one(name) {
                Ok(s) => s,
                Err(e) => json!({ "error": format!("{e:#}") }),
            };
            all.insert(name.clone(), summary);
        }
        json!({ "dir": self.dir.display().to_string(), "recordings": all })
    }

    fn render_one(&self, name: &str) -> Result<Value> {
        let data = self.dir.join(format!("{name}.perf.data"));
        let script = Command::new("perf")
            .args(["script", "--no-inline", "-i"])
            .arg(&data)
            .stderr(Stdio::null())
            .output()
            .context("running perf script")?;
        ensure!(
            script.status.success(),
            "perf script failed on {}",
            data.display()
        );
        let mut folded = Vec::new();
        let mut fold = inferno::collapse::perf::Options::default();
        fold.annotate_kernel = true; // kernel frames end in `_[k]`: what `Layer` reads
        inferno::collapse::perf::Folder::from(fold)
            .collapse(&script.stdout[..], &mut folded)
            .context("folding the stacks")?;
        let folded = String::from_utf8(folded).context("folded stacks are not UTF-8")?;
        std::fs::write(self.dir.join(format!("{name}.folded")), &folded)?;
        // Each stack's count is the CPU time of its samples (cpu-clock's period, nanoseconds).
        let stacks = parse_folded(&folded)?;
        let samples: u64 = stacks.iter().map(|(_, n)| n).sum();
        if samples == 0 {
            bail!("no samples (the proxies were idle, or perf could not attach)");
        }

        let mut options = inferno::flamegraph::Options::default();
        options.title = format!("{name}: both node proxies of the path");
        options.subtitle = Some(format!(
            "{:.2} CPU-s sampled at {FREQUENCY} Hz per thread, stacks unwound from DWARF",
            samples as f64 / 1e9
        ));
        options.count_name = "ns".to_owned();
        // Frames narrower than this are left out: the files stay small enough to commit.
        options.min_width = 0.5;
        options.colors = inferno::flamegraph::color::Palette::Multi(
            inferno::flamegraph::color::MultiPalette::Rust,
        );
        let svg = std::fs::File::create(self.dir.join(format!("{name}.svg")))?;
        inferno::flamegraph::from_lines(&mut options, folded.lines(), svg)
            .context("drawing the flame graph")?;

        let share = |n: u64| (n as f64 / samples as f64 * 1000.0).round() / 10.0;
        let mut leaves: BTreeMap<&str, u64> = BTreeMap::new();
        let mut layers: BTreeMap<Layer, u64> = BTreeMap::new();
        for (frames, n) in &stacks {
            *leaves
                .entry(frames.last().copied().unwrap_or("?"))
                .or_default() += n;
            *layers.entry(Layer::of(frames)).or_default() += n;
        }
        let mut top: Vec<_> = leaves.into_iter().collect();
        top.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        Ok(json!({
            "sampled_cpu_s": samples as f64 / 1e9,
            "svg": format!("{name}.svg"),
            "layers_percent": layers.iter().map(|(l, n)| (l.name(), share(*n))).collect::<BTreeMap<_, _>>(),
            "top_leaves_percent": top.iter().take(15).map(|(f, n)| json!([f, share(*n)])).collect::<Vec<_>>(),
        }))
    }
}

impl Recording {
    /// Stops perf and waits for it to write its file.
    pub fn stop(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let status = child.wait().context("waiting for perf record")?;
        // perf writes its file on SIGINT and then ends by it.
        use std::os::unix::process::ExitStatusExt as _;
        if !status.success() && status.signal() != Some(libc::SIGINT) {
            let mut why = String::new();
            if let Some(err) = child.stderr.take() {
                for line in BufReader::new(err).lines().map_while(Result::ok).take(5) {
                    why.push_str(&line);
                    why.push(' ');
                }
            }
            bail!("perf record of {} ended with {status}: {why}", self.name);
        }
        Ok(())
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// `frame;frame;... count` lines into their frames (root first) and counts.
fn parse_folded(folded: &str) -> Result<Vec<(Vec<&str>, u64)>> {
    folded
        .lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let (stack, count) = line
                .rsplit_once(' ')
                .with_context(|| format!("a folded line without a count: {line:?}"))?;
            let count = count
                .parse()
                .with_context(|| format!("a folded line with a bad count: {line:?}"))?;
            Ok((stack.split(';').collect(), count))
        })
        .collect()
}

/// What a sample was doing, by the innermost frame of ours or a library's that explains it:
/// the coarse split the findings are written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Layer {
    /// TLS records: rustls and the ring/aws-lc crypto under it.
    Tls,
    /// HTTP/2 framing and flow control (h2), and HTTP/1 (hyper) where requests are parsed.
    Http,
    /// The kernel under a socket call or the scheduler (network stack, wake-ups, epoll).
    Kernel,
    /// The async runtime itself: scheduling, the I/O driver, timers.
    Runtime,
    /// The allocator.
    Allocator,
    /// Everything else in the proxy (relay loops, policy, metrics, logs).
    Proxy,
}

impl Layer {
    fn of(frames: &[&str]) -> Layer {
        let leaf = frames.last().copied().unwrap_or("");
        if leaf.ends_with("_[k]") {
            return Layer::Kernel;
        }
        let allocator_entry = ["malloc", "free", "realloc", "_int_", "cfree", "mi_", "je_"];
        if leaf.contains("alloc::alloc") || allocator_entry.iter().any(|m| leaf.starts_with(m)) {
            return Layer::Allocator;
        }
        // The innermost frame of a known library decides.
        for frame in frames.iter().rev() {
            if frame.contains("rustls") || frame.contains("ring::") || frame.contains("aws_lc") {
                return Layer::Tls;
            }
            if frame.starts_with("h2::") || frame.contains("<h2::") || frame.contains("hyper") {
                return Layer::Http;
            }
            if frame.contains("tokio::runtime") || frame.contains("mio::") {
                return Layer::Runtime;
            }
            if frame.contains("ztunnel") {
                return Layer::Proxy;
            }
        }
        Layer::Proxy
    }

    fn name(self) -> &'static str {
        match self {
            Layer::Tls => "tls",
            Layer::Http => "http",
            Layer::Kernel => "kernel",
            Layer::Runtime => "runtime",
            Layer::Allocator => "allocator",
            Layer::Proxy => "proxy",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_lines_are_split_into_frames_and_counts() {
        let s = parse_folded("a;b;c 3\nx 1\n").unwrap();
        assert_eq!(s, vec![(vec!["a", "b", "c"], 3), (vec!["x"], 1)]);
        assert!(parse_folded("no count\n").is_err());
    }

    #[test]
    fn a_sample_is_charged_to_its_innermost_library() {
        let kernel = ["tokio::runtime::x", "tcp_sendmsg_[k]"];
        assert_eq!(Layer::of(&kernel), Layer::Kernel);
        let tls = ["tokio::runtime::x", "rustls::conn::f", "ring::aead::seal"];
        assert_eq!(Layer::of(&tls), Layer::Tls);
        let h2 = ["tokio::runtime::x", "h2::proto::streams::f"];
        assert_eq!(Layer::of(&h2), Layer::Http);
        let ours = ["tokio::runtime::x", "ztunnel::relay::f", "memcpy"];
        assert_eq!(Layer::of(&ours), Layer::Proxy);
        assert_eq!(Layer::of(&["tokio::runtime::park"]), Layer::Runtime);
        assert_eq!(Layer::of(&["ztunnel::a", "malloc"]), Layer::Allocator);
    }
}
