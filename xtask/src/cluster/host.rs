//! The host side of the local cluster: daemons in their own cgroups and network namespaces,
//! cgroup trees, mounts, sysctls.
use std::{
    fs::{File, OpenOptions},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::layout::{self, DAEMONS_CGROUP};
use crate::{output, setup::mounts_of_type};

fn read_mounts() -> String {
    std::fs::read_to_string("/proc/self/mounts").unwrap_or_default()
}

/// The unified (cgroup v2) hierarchy: the shortest cgroup2 mount point.
pub fn cgroup2_root() -> Result<PathBuf> {
    mounts_of_type(&read_mounts(), "cgroup2")
        .into_iter()
        .min_by_key(|p| p.len())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("no cgroup v2 hierarchy is mounted"))
}

/// Every cgroup hierarchy: the v1 ones (hybrid hosts) and the unified one.
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    let mounts = read_mounts();
    let mut all: Vec<PathBuf> = mounts_of_type(&mounts, "cgroup")
        .into_iter()
        .chain(mounts_of_type(&mounts, "cgroup2"))
        .map(PathBuf::from)
        .collect();
    all.sort();
    all.dedup();
    all
}

/// Creates `/<name>` in every hierarchy (the kubelet's cgroupfs driver wants its cgroup root
/// in each), giving v1 cpuset its parent's cpus and mems (an empty cpuset admits no task).
pub fn create_cgroup_everywhere(name: &str) -> Result<()> {
    for h in cgroup_hierarchies() {
        let dir = h.join(name.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let parent = h.join(file);
            if h.join("cpuset.cpus").exists() && !h.join("cgroup.subtree_control").exists() {
                let v = std::fs::read_to_string(&parent).unwrap_or_default();
                std::fs::write(dir.join(file), v.trim())
                    .with_context(|| format!("writing {}/{file}", dir.display()))?;
            }
        }
    }
    Ok(())
}

/// A daemon's cgroup in the unified hierarchy: `<cgroup2>/ztk-daemons/<name>`.
pub fn daemon_cgroup(name: &str) -> Result<PathBuf> {
    let dir = cgroup2_root()?.join(DAEMONS_CGROUP).join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Starts a daemon detached from this process (own session, stdin closed, output to
/// `logs/<name>.log`), in its own cgroup and, for node daemons, the node's network namespace
/// (only the network: the host's mounts, bpffs and cgroup2 stay visible). Its PID goes to
/// `pids/<name>`.
pub fn spawn_daemon(
    name: &str,
    netns: Option<&Path>,
    program: &Path,
    args: &[String],
) -> Result<u32> {
    let cgroup = daemon_cgroup(name)?;
    let log_path = layout::log_dir().join(format!("{name}.log"));
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let procs = OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
    let ns = netns
        .map(|p| File::open(p).with_context(|| format!("opening {}", p.display())))
        .transpose()?;
    let (procs_fd, ns_fd) = (procs.as_raw_fd(), ns.as_ref().map(|f| f.as_raw_fd()));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: only setsid(2), write(2) and setns(2) on descriptors opened above.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = ns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} ({})", name, program.display()))?;
    let pid = child.id();
    std::fs::write(layout::pid_dir().join(name), pid.to_string())?;
    // Not waited for: the daemon outlives `cluster up`; `down` ends it by its cgroup.
    std::mem::forget(child);
    Ok(pid)
}

pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks the process exists. A zombie is not alive.
    let exists = unsafe { libc::kill(pid as i32, 0) == 0 };
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
}

/// The daemons `up` recorded whose process still runs.
pub fn running_daemons() -> Vec<(String, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(layout::pid_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = std::fs::read_to_string(entry.path())
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if let Some(pid) = pid.filter(|&p| alive(p)) {
            found.push((name, pid));
        }
    }
    found.sort();
    found
}

pub fn cgroup_populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

/// Kills every process of a unified-hierarchy cgroup tree and waits until it is empty.
pub fn kill_cgroup(dir: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while dir.exists() && cgroup_populated(dir) {
        std::fs::write(dir.join("cgroup.kill"), "1")
            .with_context(|| format!("writing {}/cgroup.kill", dir.display()))?;
        if Instant::now() > deadline {
            bail!("{} still has processes after {timeout:?}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Removes a cgroup tree, deepest first (its processes must be gone).
pub fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", dir.display())),
        }
    }
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = read_mounts()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        // /proc/self/mounts escapes spaces as \040; none of our paths has one.
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.dedup();
    found
}

/// Lazily unmounts everything below `dir` (repeatedly: stacked mounts show once per layer).
pub fn unmount_below(dir: &Path) -> Result<()> {
    for _ in 0..10 {
        let mounts = mounts_below(dir);
        if mounts.is_empty() {
            return Ok(());
        }
        for m in mounts {
            let c = std::ffi::CString::new(m.as_os_str().as_encoded_bytes())?;
            // SAFETY: a path string we own.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let left = mounts_below(dir);
    if left.is_empty() {
        Ok(())
    } else {
        bail!("still mounted: {left:?}")
    }
}

pub fn sysctl_path(name: &str) -> PathBuf {
    Path::new("/proc/sys").join(name.replace('.', "/"))
}

pub fn read_sysctl(name: &str) -> Result<String> {
    let p = sysctl_path(name);
    Ok(std::fs::read_to_string(&p)
        .with_context(|| format!("reading {}", p.display()))?
        .trim()
        .to_owned())
}

/// True if the mount at `point` propagates (`shared:N` in /proc/self/mountinfo).
pub fn mount_is_shared(point: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().nth(4) == Some(point))
        .any(|l| {
            l.split(" - ")
                .next()
                .unwrap_or("")
                .split_whitespace()
                .skip(6)
                .any(|f| f.starts_with("shared:"))
        })
}

/// `ip …`, failing with its error output.
pub fn ip(args: &[&str]) -> Result<()> {
    output(Command::new("ip").args(args)).map(drop)
}

/// `ip …` whose failure does not matter (removing what may not exist).
pub fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Runs a command inside a network namespace (only the network: `nsenter --net`).
pub fn in_netns(netns: &Path, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns.display())).arg(program);
    c
}

/// Every path below `dir` (relative, sorted), or `None` if `dir` does not exist.
fn tree(dir: &Path) -> Option<Vec<PathBuf>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap_or(&p).to_owned());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    std::fs::symlink_metadata(dir).ok()?;
    walk(dir, dir, &mut out);
    out.sort();
    Some(out)
}

fn record_file(state: &Path, dir: &str) -> PathBuf {
    state.join(format!("foreign{}", dir.replace('/', "_")))
}

/// Records what each of [`layout::FOREIGN_DIRS`] holds ("absent" if it does not exist).
pub fn record_foreign_dirs(state: &Path) -> Result<()> {
    for dir in layout::FOREIGN_DIRS {
        let text = match tree(Path::new(dir)) {
            None => "absent\n".to_owned(),
            Some(paths) => paths.iter().map(|p| format!("{}\n", p.display())).collect(),
        };
        std::fs::write(record_file(state, dir), format!("{dir}\n{text}"))?;
    }
    Ok(())
}

/// Removes what was added to each of [`layout::FOREIGN_DIRS`] since [`record_foreign_dirs`].
pub fn restore_foreign_dirs(state: &Path) -> Result<()> {
    for dir in layout::FOREIGN_DIRS {
        let Ok(text) = std::fs::read_to_string(record_file(state, dir)) else {
            continue;
        };
        let known: Vec<&str> = text.lines().skip(1).collect();
        let root = Path::new(dir);
        if known == ["absent"] {
            match std::fs::remove_dir_all(root) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {dir}"))
                }
                _ => continue,
            }
        }
        // Deepest first, so a directory is empty by the time it is looked at.
        let mut now = tree(root).unwrap_or_default();
        now.reverse();
        for rel in now {
            if known.contains(&rel.to_string_lossy().as_ref()) {
                continue;
            }
            let p = root.join(&rel);
            let meta = std::fs::symlink_metadata(&p)?;
            if meta.is_dir() {
                std::fs::remove_dir(&p)
            } else {
                std::fs::remove_file(&p)
            }
            .with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}
