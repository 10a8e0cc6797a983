//! `cargo xtask setup`: installs what the build and the tests need, only where it is missing.
//! Idempotent, and quick when nothing is missing (every step checks before it acts).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::run;

/// Debian packages the demo and the tests use.
const APT_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "iperf3",
    "tcpdump",
    "nghttp2-client",
    "wrk",
    "iptables",
    "nftables",
    "curl",
    "procps",
];

pub fn setup() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cargo xtask needs root: it loads eBPF programs and creates network namespaces");
    }
    apt_packages()?;
    nightly_toolchain()?;
    bpf_linker()?;
    bpffs()?;
    cgroup2_mount()?;
    Ok(())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !deb_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing))
}

fn deb_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_toolchain() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: installing the nightly toolchain (for the eBPF crate)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: adding rust-src to nightly (build-std for bpfel-unknown-none)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        });
    home.join("bin").join(name)
}

/// The LLVM major version from `rustc -vV` ("LLVM version: 22.1.4" → 22).
pub fn llvm_major(rustc_version: &str) -> Option<u32> {
    rustc_version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
}

/// bpf-linker links the eBPF object with rustc's own LLVM, so it is built against the nightly
/// sysroot's libLLVM (which ships without the unversioned `libLLVM.so` name the build wants).
fn bpf_linker() -> Result<()> {
    let works = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
    if works(Command::new(cargo_bin("bpf-linker")).arg("--version"))
        || works(Command::new("bpf-linker").arg("--version"))
    {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let link = lib.join("libLLVM.so");
    if !link.exists() {
        let versioned = std::fs::read_dir(&lib)
            .with_context(|| format!("listing {}", lib.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("libLLVM") && n.contains(".so"))
            .with_context(|| format!("no libLLVM in {}", lib.display()))?;
        std::os::unix::fs::symlink(&versioned, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = llvm_major(&version).context("cannot tell nightly rustc's LLVM version")?;
    println!("setup: building bpf-linker against nightly's LLVM {major} (about a minute)");
    run(Command::new("cargo")
        .env("LLVM_PREFIX", sysroot.trim())
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}")))
}

/// Mount points by filesystem type, from /proc/self/mounts.
pub fn mounts_of_type<'a>(mounts: &'a str, fstype: &str) -> Vec<&'a str> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, point, ty) = (f.next()?, f.next()?, f.next()?);
            (ty == fstype).then_some(point)
        })
        .collect()
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts_of_type(&mounts, "bpf").contains(&"/sys/fs/bpf") {
        return Ok(());
    }
    println!("setup: mounting bpffs at /sys/fs/bpf");
    std::fs::create_dir_all("/sys/fs/bpf").ok();
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn cgroup2_mount() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts_of_type(&mounts, "cgroup2").is_empty() {
        bail!("no cgroup v2 hierarchy is mounted; the capture programs attach to cgroup v2");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_is_read_from_rustc_version() {
        let v = "rustc 1.97.0-nightly (abc 2026-10-01)\nbinary: rustc\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(v), Some(22));
        assert_eq!(llvm_major("rustc 1.0\n"), None);
    }

    #[test]
    fn mounts_are_found_by_type() {
        let m = "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n";
        assert_eq!(mounts_of_type(m, "cgroup2"), ["/sys/fs/cgroup/unified"]);
        assert_eq!(mounts_of_type(m, "bpf"), ["/sys/fs/bpf"]);
        assert!(mounts_of_type(m, "tmpfs").is_empty());
    }
}
