//! `cargo xtask setup`: installs what the build, the demo and the tests need, only where it is
//! missing. Idempotent and quiet: every step checks first, and the checks together take a fraction
//! of a second, so `build`, `demo` and `test` can run it every time.
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{output, run};

/// Debian packages the demo and the tests use (bpftool for inspection, the rest as traffic
/// generators, packet capture and for the firewall check; python3-venv for the manifest
/// validator's venv; xz-utils to unpack Istio's ztunnel for the interoperability tests, whose
/// in-pod redirection also uses iptables, and the local Kubernetes cluster's binaries;
/// etcd-server, containerd, runc, the CNI plugins and busybox-static for that cluster and its
/// test images, openssl for its certificates, gcc for its pause image; prometheus for the server
/// the telemetry tests scrape the node proxies with, and its promtool, which checks the
/// dashboards' PromQL; linux-perf for `bench --profile`'s recordings).
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
    "python3-venv",
    "etcd-server",
    "containerd",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
    "xz-utils",
    "openssl",
    "gcc",
    "libc6-dev",
    "prometheus",
    "linux-perf",
];

/// Where the capture programs expect bpffs.
const BPFFS: &str = "/sys/fs/bpf";

pub fn setup() -> Result<()> {
    require_root()?;
    apt_packages()?;
    nightly_toolchain()?;
    bpf_linker()?;
    cargo_fuzz()?;
    bpffs()?;
    cgroup2_mount()?;
    Ok(())
}

fn require_root() -> Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    match effective_uid(&status) {
        Some(0) => Ok(()),
        Some(uid) => bail!(
            "cargo xtask must run as root (effective uid is {uid}): it installs packages, mounts \
             bpffs, loads eBPF programs and creates network namespaces"
        ),
        None => bail!("cannot find the effective uid in /proc/self/status"),
    }
}

/// The effective uid from /proc/self/status ("Uid:\treal\teffective\tsaved\tfs").
pub fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|uid| uid.parse().ok())
}

fn apt_packages() -> Result<()> {
    // One dpkg-query for all packages: it prints the ones it knows and exits non-zero if some
    // were never installed, so only stdout counts.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(APT_PACKAGES)
        .output()
        .context("running dpkg-query (is this Debian?)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed = installed_packages(&stdout);
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

/// Installs Debian packages (after refreshing the package lists). Packages' services are kept
/// from starting (a `policy-rc.d` that refuses, for the duration only): etcd and containerd
/// run only as the local cluster's daemons, with their own configuration.
pub fn apt_install(missing: &[&str]) -> Result<()> {
    println!("setup: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let placed = !policy.exists();
    if placed {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(
            policy,
            "#!/bin/sh\n# cargo xtask setup: no service starts\nexit 101\n",
        )?;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let result = run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(missing));
    if placed {
        std::fs::remove_file(policy).context("removing /usr/sbin/policy-rc.d")?;
    }
    result
}

/// Names of the packages `dpkg-query -f='${Package} ${Status}\n'` reports fully installed.
/// (A removed package keeps a "deinstall ok config-files" status, which does not count.)
pub fn installed_packages(query: &str) -> HashSet<&str> {
    query
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, status)| status.trim() == "install ok installed")
        .map(|(name, _)| name)
        .collect()
}

fn nightly_toolchain() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: installing the nightly toolchain (the eBPF crate needs it)");
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
        println!("setup: adding rust-src to nightly (to build core for bpfel-unknown-none)");
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

/// `$CARGO_HOME/bin/<name>` (default `~/.cargo/bin`), where `cargo install` puts binaries;
/// checked as well as PATH because sudo and login shells often drop it from PATH.
fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        });
    home.join("bin").join(name)
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

/// bpf-linker links the eBPF object with LLVM, and its LLVM must read the bitcode rustc nightly
/// writes, so it is built against the nightly sysroot's own libLLVM rather than a distro LLVM
/// (Debian 12's is far older than nightly's).
fn bpf_linker() -> Result<()> {
    if succeeds(Command::new(cargo_bin("bpf-linker")).arg("--version"))
        || succeeds(Command::new("bpf-linker").arg("--version"))
    {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let sysroot = sysroot.trim();
    link_unversioned_libllvm(&Path::new(sysroot).join("lib"))?;
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = llvm_major(&version).context("cannot tell nightly rustc's LLVM version")?;
    println!("setup: building bpf-linker against nightly's LLVM {major} (about a minute)");
    // The rustup proxy `cargo`, not $CARGO: only the proxy understands `+nightly`.
    run(Command::new("cargo")
        .env("LLVM_PREFIX", sysroot)
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}")))
}

/// cargo-fuzz drives the fuzz targets in `fuzz/` (libFuzzer, with nightly). Pinned, and built
/// `--locked`, so a new release cannot break a fresh machine's setup.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn cargo_fuzz() -> Result<()> {
    let installed = |cmd: &mut Command| {
        cmd.arg("--version").output().is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)
        })
    };
    if installed(&mut Command::new(cargo_bin("cargo-fuzz"))) {
        return Ok(());
    }
    println!("setup: building cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute, once)");
    // The rustup proxy `cargo`, not $CARGO: only the proxy understands `+nightly`.
    run(Command::new("cargo").args([
        "+nightly",
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

/// The sysroot ships only a versioned libLLVM (`libLLVM.so.22.1-rust-…` or `libLLVM-22-….so`);
/// bpf-linker's build links `-lLLVM`, which needs the plain `libLLVM.so` name.
fn link_unversioned_libllvm(lib: &Path) -> Result<()> {
    let link = lib.join("libLLVM.so");
    // symlink_metadata, not exists(): a dangling link must be replaced, not tripped over.
    if link.symlink_metadata().is_ok() {
        if link.exists() {
            return Ok(());
        }
        std::fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
    }
    let names: Vec<String> = std::fs::read_dir(lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let target = versioned_libllvm(&names)
        .with_context(|| format!("no libLLVM shared library in {}", lib.display()))?;
    println!("setup: linking {} -> {target}", link.display());
    std::os::unix::fs::symlink(target, &link)
        .with_context(|| format!("creating the symlink {}", link.display()))
}

/// The versioned libLLVM among a directory's file names. `libLLVM.so.<version>` is preferred:
/// recent sysroots also carry a `libLLVM-<major>-….so` that is only a linker script naming it.
pub fn versioned_libllvm(names: &[String]) -> Option<&str> {
    let find = |matches: fn(&str) -> bool| names.iter().map(String::as_str).find(|n| matches(n));
    find(|n| n.starts_with("libLLVM.so."))
        .or_else(|| find(|n| n.starts_with("libLLVM-") && n.ends_with(".so")))
}

/// The LLVM major version from `rustc -vV` ("LLVM version: 22.1.4" → 22).
pub fn llvm_major(rustc_version: &str) -> Option<u32> {
    rustc_version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .and_then(|major| major.parse().ok())
}

/// Mount points of a filesystem type, from the text of /proc/self/mounts.
pub fn mounts_of_type<'a>(mounts: &'a str, fstype: &str) -> Vec<&'a str> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let (_source, point, ty) = (fields.next()?, fields.next()?, fields.next()?);
            (ty == fstype).then_some(point)
        })
        .collect()
}

fn read_mounts() -> Result<String> {
    std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")
}

fn bpffs() -> Result<()> {
    if mounts_of_type(&read_mounts()?, "bpf").contains(&BPFFS) {
        return Ok(());
    }
    println!("setup: mounting bpffs at {BPFFS}");
    std::fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

/// The capture programs attach to the cgroup v2 root; setup cannot sensibly change a host's
/// cgroup layout, so it only checks.
fn cgroup2_mount() -> Result<()> {
    if mounts_of_type(&read_mounts()?, "cgroup2").is_empty() {
        bail!(
            "no cgroup v2 hierarchy is mounted (no cgroup2 entry in /proc/self/mounts); the \
             capture programs attach to cgroup v2, so boot with the unified or hybrid hierarchy"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_is_read_from_rustc_version() {
        let v = "rustc 1.97.0-nightly (abcdef 2026-10-01)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(v), Some(22));
        assert_eq!(llvm_major("LLVM version: 9\n"), Some(9));
        assert_eq!(llvm_major("rustc 1.0\n"), None);
        assert_eq!(llvm_major("LLVM version: x.y\n"), None);
    }

    #[test]
    fn mounts_are_found_by_type() {
        let m = "sysfs /sys sysfs rw 0 0\n\
                 cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0\n\
                 bpf /sys/fs/bpf bpf rw,relatime,mode=700 0 0\n";
        assert_eq!(mounts_of_type(m, "cgroup2"), ["/sys/fs/cgroup/unified"]);
        assert_eq!(mounts_of_type(m, "bpf"), ["/sys/fs/bpf"]);
        assert!(mounts_of_type(m, "tmpfs").is_empty());
        assert!(mounts_of_type("garbage\n\n", "bpf").is_empty());
    }

    #[test]
    fn only_fully_installed_packages_count() {
        let q = "curl install ok installed\nwrk deinstall ok config-files\niperf3 install ok installed\n";
        let got = installed_packages(q);
        assert!(got.contains("curl") && got.contains("iperf3"));
        assert!(!got.contains("wrk"));
        assert!(installed_packages("").is_empty());
    }

    #[test]
    fn effective_uid_is_the_second_uid() {
        let status = "Name:\txtask\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Uid:\t0\t1000\t0\t0\n"), Some(1000));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn the_versioned_libllvm_is_chosen() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let sysroot = names(&[
            "libLLVM-22-rust-1.97.0-nightly.so",
            "librustc_driver-1234.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "rustlib",
        ]);
        assert_eq!(
            versioned_libllvm(&sysroot),
            Some("libLLVM.so.22.1-rust-1.97.0-nightly")
        );
        let older = names(&["libLLVM.so", "libLLVM-17-rust-1.75.0-stable.so"]);
        assert_eq!(
            versioned_libllvm(&older),
            Some("libLLVM-17-rust-1.75.0-stable.so")
        );
        assert_eq!(
            versioned_libllvm(&names(&["libLLVM.so", "libstd.so"])),
            None
        );
    }
}
