//! Where the Kubernetes binaries of the local cluster come from, in this order:
//!
//! 1. `$ZT_K8S_BIN_DIR` (plain or `.xz`-compressed binaries);
//! 2. `../shared/k8s` next to the checkout (this environment's builds of the pinned version,
//!    `.xz`-compressed);
//! 3. the official release binaries of [`K8S_VERSION`] from dl.k8s.io, each checked before it is
//!    used against the SHA-256 pinned in [`RELEASE_SHA256`], or, where none is pinned, against
//!    the SHA-256 the release publishes next to the binary (`<name>.sha256`, fetched over HTTPS
//!    from the same host, as the Kubernetes install docs verify it).
//!
//! Compressed binaries are unpacked once into the xtask cache (`~/.cache/ztunnel-xtask`), keyed
//! by the compressed file's size and modification time, so a second `cluster up` starts at once.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{deploy_tools, output};

pub const K8S_VERSION: &str = "v1.32.13";

/// The binaries the cluster runs.
pub const NAMES: [&str; 5] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kubectl",
];

/// SHA-256 of the linux/amd64 release binaries of [`K8S_VERSION`], as dl.k8s.io publishes them
/// next to each binary (`<name>.sha256`). `None`: not pinned yet (this environment cannot reach
/// dl.k8s.io to read it); such a binary is checked against the published `.sha256` instead.
const RELEASE_SHA256: [(&str, Option<&str>); 5] = [
    ("kube-apiserver", None),
    ("kube-controller-manager", None),
    ("kube-scheduler", None),
    ("kubelet", None),
    (
        "kubectl",
        Some("db2ae479a63f3665d7f704ab18c0d4d4050144237980763221835b7305703c4c"),
    ),
];

pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The binaries a running cluster was started with (`status` uses its kubectl).
    pub fn at(dir: PathBuf) -> Binaries {
        Binaries { dir }
    }
}

/// `../shared/k8s` relative to the checkout.
fn shared_dir() -> PathBuf {
    crate::root().join("../shared/k8s")
}

fn cache_dir() -> PathBuf {
    deploy_tools::cache_dir().join(format!("k8s-{K8S_VERSION}"))
}

/// Finds (and if needed unpacks or downloads) every binary; one error names all three places.
pub fn locate() -> Result<Binaries> {
    let mut tried = Vec::new();
    if let Some(dir) = std::env::var_os("ZT_K8S_BIN_DIR") {
        let dir = PathBuf::from(dir);
        match from_dir(&dir) {
            Ok(b) => return Ok(b),
            Err(e) => tried.push(format!("ZT_K8S_BIN_DIR={}: {e:#}", dir.display())),
        }
    } else {
        tried.push("ZT_K8S_BIN_DIR: not set".to_owned());
    }
    let shared = shared_dir();
    match from_dir(&shared) {
        Ok(b) => return Ok(b),
        Err(e) => tried.push(format!("{}: {e:#}", shared.display())),
    }
    match download() {
        Ok(b) => return Ok(b),
        Err(e) => tried.push(format!("download from dl.k8s.io: {e:#}")),
    }
    bail!(
        "the Kubernetes {K8S_VERSION} binaries ({}) were found in none of the three places:\n  {}",
        NAMES.join(", "),
        tried.join("\n  ")
    )
}

/// A directory holding each binary as `NAME` or `NAME.xz`.
fn from_dir(dir: &Path) -> Result<Binaries> {
    if !dir.is_dir() {
        bail!("no such directory");
    }
    let cache = cache_dir();
    let mut missing = Vec::new();
    for name in NAMES {
        let plain = dir.join(name);
        let xz = dir.join(format!("{name}.xz"));
        let dest = cache.join(name);
        if plain.is_file() {
            link_or_copy(&plain, &dest)?;
        } else if xz.is_file() {
            unpack(&xz, &dest)?;
        } else {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        bail!("missing {}", missing.join(", "));
    }
    Ok(Binaries { dir: cache })
}

fn stamp_of(src: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(src).with_context(|| format!("reading {}", src.display()))?;
    Ok(format!("{} {} {}", src.display(), m.len(), m.mtime()))
}

/// Unpacks `src` (xz) to `dest` unless the stamp beside `dest` says it already came from it.
fn unpack(src: &Path, dest: &Path) -> Result<()> {
    let stamp = dest.with_extension("source");
    let want = stamp_of(src)?;
    if dest.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&want) {
        return Ok(());
    }
    std::fs::create_dir_all(dest.parent().expect("cache dir"))?;
    println!("cluster: unpacking {}", src.display());
    let tmp = dest.with_extension("partial");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let status = Command::new("xz")
        .arg("-dc")
        .arg(src)
        .stdout(file)
        .status()
        .context("running xz")?;
    if !status.success() {
        bail!("xz -dc {} failed ({status})", src.display());
    }
    make_executable(&tmp)?;
    std::fs::rename(&tmp, dest)?;
    std::fs::write(&stamp, want)?;
    Ok(())
}

fn link_or_copy(src: &Path, dest: &Path) -> Result<()> {
    let stamp = dest.with_extension("source");
    let want = stamp_of(src)?;
    if dest.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&want) {
        return Ok(());
    }
    std::fs::create_dir_all(dest.parent().expect("cache dir"))?;
    std::fs::copy(src, dest).with_context(|| format!("copying {}", src.display()))?;
    make_executable(dest)?;
    std::fs::write(&stamp, want)?;
    Ok(())
}

fn make_executable(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", p.display()))
}

/// The release binaries from dl.k8s.io, each verified against its pinned SHA-256, or the one the
/// release publishes beside it where none is pinned.
fn download() -> Result<Binaries> {
    let dir = cache_dir().join("release");
    std::fs::create_dir_all(&dir)?;
    for (name, pinned) in RELEASE_SHA256 {
        let dest = dir.join(name);
        let url = format!("https://dl.k8s.io/release/{K8S_VERSION}/bin/linux/amd64/{name}");
        let (want, source) = match pinned {
            Some(sum) => (sum.to_owned(), "pinned"),
            None => (published_sha256(&url)?, "published"),
        };
        if dest.is_file() && sha256_of(&dest)? == want {
            continue;
        }
        let tmp = dest.with_extension("partial");
        println!("cluster: downloading {url}");
        output(
            Command::new("curl")
                .args(["-fsSL", "--max-time", "300", "-o"])
                .arg(&tmp)
                .arg(&url),
        )?;
        let sum = sha256_of(&tmp)?;
        if sum != want {
            let _ = std::fs::remove_file(&tmp);
            bail!("{url} has SHA-256 {sum}, not the {source} {want}: refusing it");
        }
        println!("cluster: {name} matches the {source} SHA-256");
        make_executable(&tmp)?;
        std::fs::rename(&tmp, &dest)?;
    }
    Ok(Binaries { dir })
}

/// The SHA-256 the release publishes at `<url>.sha256` (64 hex digits, nothing else).
fn published_sha256(url: &str) -> Result<String> {
    let text = output(
        Command::new("curl")
            .args(["-fsSL", "--max-time", "60"])
            .arg(format!("{url}.sha256")),
    )
    .with_context(|| format!("reading the published SHA-256 of {url}"))?;
    parse_sha256(&text).with_context(|| format!("{url}.sha256 does not hold a SHA-256: {text:?}"))
}

fn parse_sha256(text: &str) -> Option<String> {
    let sum = text.split_whitespace().next()?;
    (sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| sum.to_ascii_lowercase())
}

fn sha256_of(p: &Path) -> Result<String> {
    let out = output(Command::new("sha256sum").arg(p))?;
    Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
}

#[cfg(test)]
mod tests {
    use super::parse_sha256;

    #[test]
    fn a_published_sha256_is_64_hex_digits() {
        let sum = "db2ae479a63f3665d7f704ab18c0d4d4050144237980763221835b7305703c4c";
        assert_eq!(parse_sha256(&format!("{sum}\n")).as_deref(), Some(sum));
        assert_eq!(
            parse_sha256(&format!("{sum}  kubectl\n")).as_deref(),
            Some(sum)
        );
        assert_eq!(
            parse_sha256(&sum.to_ascii_uppercase()).as_deref(),
            Some(sum)
        );
        assert_eq!(parse_sha256(""), None);
        assert_eq!(parse_sha256("<html>Not Found</html>"), None);
        assert_eq!(parse_sha256(&sum[..63]), None);
    }
}
