//! What the benchmark binaries (`bench`, `scale-bench`) share: reading a process's memory,
//! recording the commit measured, writing the JSON results.
use std::{fs, path::Path, path::PathBuf, process::Command};

use anyhow::{anyhow, Context as _, Result};
use serde_json::{json, Value};

/// VmRSS of `pid` in KiB (/proc/<pid>/status).
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading the status of pid {pid}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// The commit measured and how many files of the work tree differ from it.
pub fn git_state() -> Value {
    let root = crate::workspace_root();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    json!({
        "head": git(&["log", "--oneline", "-1"]),
        "changed_files": git(&["status", "--porcelain"]).map(|s| s.lines().count()),
    })
}

/// Writes `v` as `dir/<kind>-<unix_time>.json` and the same content as `dir/<latest>`, where
/// `latest` is `latest.json` for the traffic bench and `<kind>-latest.json` for the others.
pub fn write_json(dir: &Path, kind: &str, unix_time: u64, v: &Value) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = serde_json::to_string_pretty(v)? + "\n";
    let file = dir.join(format!("{kind}-{unix_time}.json"));
    fs::write(&file, &text).with_context(|| format!("writing {}", file.display()))?;
    let latest = match kind {
        "bench" => dir.join("latest.json"),
        other => dir.join(format!("{other}-latest.json")),
    };
    fs::write(&latest, &text).with_context(|| format!("writing {}", latest.display()))?;
    Ok(file)
}
