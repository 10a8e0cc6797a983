//! Removing everything a virtual cluster created, and sweeping what crashed runs left behind.
//!
//! Every object a cluster creates carries its prefix `ztt-<pid>-<n>`: network namespaces
//! (`/run/netns/<prefix>-*`), pin directories (`/sys/fs/bpf/<prefix>-*`), the cgroup
//! `<cgroup2 root>/<prefix>` (all its processes live below it) and `/tmp/<prefix>`. So removal
//! works from the prefix alone, whether or not the cluster finished building.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::Once,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};

use crate::process::output_with_timeout;

pub const NETNS_DIR: &str = "/run/netns";
pub const BPFFS: &str = "/sys/fs/bpf";
pub const TMP: &str = "/tmp";

/// The cgroup v2 mount point (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts),
/// found the way the proxy finds it.
pub use ztunnel::capture::cgroup2_root;

/// True if some process (or a descendant cgroup's) lives in cgroup `dir`.
pub fn cgroup_populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

/// Kills every process in cgroup `dir` and below (`cgroup.kill`), waiting until it is empty.
pub fn kill_cgroup(dir: &Path, timeout: Duration) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    while cgroup_populated(dir) {
        fs::write(dir.join("cgroup.kill"), "1")
            .with_context(|| format!("writing {}/cgroup.kill", dir.display()))?;
        if Instant::now() >= deadline {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            return Err(anyhow!(
                "cgroup {} still populated after {timeout:?} (procs here: {procs:?})",
                dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Removes a cgroup directory tree depth-first (cgroup dirs are removed with rmdir only).
pub fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    // Just-killed processes may take a moment to leave.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", dir.display())),
        }
    }
}

fn names_with_prefix(dir: &str, prefix: &str) -> Vec<String> {
    let want = format!("{prefix}-");
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&want))
                .collect()
        })
        .unwrap_or_default()
}

/// Network namespaces of a prefix.
pub fn netns_of(prefix: &str) -> Vec<String> {
    names_with_prefix(NETNS_DIR, prefix)
}

/// Pin directories of a prefix.
pub fn bpf_dirs_of(prefix: &str) -> Vec<PathBuf> {
    names_with_prefix(BPFFS, prefix)
        .into_iter()
        .map(|n| Path::new(BPFFS).join(n))
        .collect()
}

/// Removes everything of `prefix`, in dependency order: processes, pins, netns, cgroups,
/// temporary files. Returns the errors met (never panics); carries on past each.
pub fn cleanup_prefix(prefix: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let mut note = |r: Result<()>| {
        if let Err(e) = r {
            errors.push(format!("{e:#}"));
        }
    };
    let cg = cgroup2_root().map(|r| r.join(prefix));
    if let Ok(cg) = &cg {
        note(kill_cgroup(cg, Duration::from_secs(10)));
    }
    for dir in bpf_dirs_of(prefix) {
        // The product's own uninstall first (it is what operators use), then whatever is left.
        let bin = crate::ztunnel_bin();
        if bin.exists() {
            let r = output_with_timeout(
                Command::new(&bin)
                    .args(["bpf", "uninstall", "--bpf-dir"])
                    .arg(&dir),
                Duration::from_secs(10),
            );
            if let Ok(out) = &r {
                if !out.status.success() && dir.exists() {
                    eprintln!(
                        "ztunnel-tests: `ztunnel bpf uninstall --bpf-dir {}` failed: {}",
                        dir.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
        }
        if dir.exists() {
            note(fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display())));
        }
    }
    for ns in netns_of(prefix) {
        let r = output_with_timeout(
            Command::new("ip").args(["netns", "del", &ns]),
            Duration::from_secs(10),
        );
        match r {
            Ok(out) if out.status.success() => {}
            Ok(out) => note(Err(anyhow!(
                "ip netns del {ns}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
            Err(e) => note(Err(e)),
        }
    }
    match cg {
        Ok(cg) => note(remove_cgroup_tree(&cg)),
        Err(e) => note(Err(e)),
    }
    let tmp = Path::new(TMP).join(prefix);
    // Tests may mount things (e.g. a tmpfs) below the cluster's temporary directory.
    for m in mounts_below(&tmp) {
        let r = output_with_timeout(
            Command::new("umount").arg("-l").arg(&m),
            Duration::from_secs(10),
        );
        if !matches!(&r, Ok(o) if o.status.success()) {
            note(Err(anyhow!("umount {}: {r:?}", m.display())));
        }
    }
    if tmp.exists() {
        note(fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display())));
    }
    errors
}

/// Mount points at or below `dir`, deepest first.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    v
}

/// `ztt-<pid>-<n>` of a name that starts with such a prefix, and the pid.
pub fn parse_prefix(name: &str) -> Option<(String, u32)> {
    let rest = name.strip_prefix("ztt-")?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?;
    let n = parts.next()?;
    if pid.is_empty() || n.is_empty() {
        return None;
    }
    let pid: u32 = pid.parse().ok()?;
    let n: String = n.chars().take_while(|c| c.is_ascii_digit()).collect();
    if n.is_empty() {
        return None;
    }
    Some((format!("ztt-{pid}-{n}"), pid))
}

/// True if process `pid` exists and is not a zombie. `/proc/<n>` also answers for thread ids
/// of other processes, so the thread group id must be `pid` itself.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let state = field("State:");
    field("Tgid:") == pid.to_string() && !state.starts_with('Z') && !state.starts_with('X')
}

/// Prefixes of objects on this machine whose owning process is gone.
pub fn stale_prefixes() -> Vec<String> {
    let mut dirs = vec![NETNS_DIR.to_owned(), BPFFS.to_owned(), TMP.to_owned()];
    if let Ok(cg) = cgroup2_root() {
        dirs.push(cg.to_string_lossy().into_owned());
    }
    let mut out: Vec<String> = Vec::new();
    for dir in dirs {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((prefix, pid)) = parse_prefix(&name) {
                if !pid_alive(pid) && !out.contains(&prefix) {
                    out.push(prefix);
                }
            }
        }
    }
    out.sort();
    out
}

/// Removes leftovers of crashed runs now; returns the prefixes swept.
pub fn sweep_stale_now() -> Vec<String> {
    let stale = stale_prefixes();
    for prefix in &stale {
        let errors = cleanup_prefix(prefix);
        if errors.is_empty() {
            eprintln!("ztunnel-tests: swept leftovers of a crashed run: {prefix}");
        } else {
            eprintln!("ztunnel-tests: sweeping {prefix} left errors: {errors:?}");
        }
    }
    stale
}

/// [`sweep_stale_now`], once per test process.
pub fn sweep_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        sweep_stale_now();
        crate::cluster::addresses::sweep_stale_guards();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_from_object_names() {
        assert_eq!(
            parse_prefix("ztt-12-3-n1-p0"),
            Some(("ztt-12-3".into(), 12))
        );
        assert_eq!(parse_prefix("ztt-12-3"), Some(("ztt-12-3".into(), 12)));
        assert_eq!(
            parse_prefix("ztt-12-30-node1"),
            Some(("ztt-12-30".into(), 12))
        );
        assert_eq!(parse_prefix("ztt-x-3"), None);
        assert_eq!(parse_prefix("ztt-12"), None);
        assert_eq!(parse_prefix("ztunnel"), None);
        assert_eq!(parse_prefix("other-12-3"), None);
    }

    #[test]
    fn liveness_ignores_zombies_and_threads() {
        assert!(pid_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie, whose owner is gone as far as the sweep is concerned.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pid_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!pid_alive(pid));
        child.wait().unwrap();
        // A live thread of this process: /proc/<tid> exists, but it is not a process.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        assert!(Path::new(&format!("/proc/{tid}")).exists());
        assert!(!pid_alive(tid));
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }
}
