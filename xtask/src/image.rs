//! `cargo xtask image`: OCI image layouts (as tar archives `ctr images import` and
//! `skopeo copy oci-archive:` read) without Docker, written with the `tar` crate:
//!
//! * the node proxy, `docker.io/library/ztunnel:<appVersion>` (the chart's default image):
//!   the release binaries `ztunnel` and `ztunnel-cni`, the shared libraries `ldd` lists (glibc, libm, libgcc_s, the
//!   loader), `/etc/passwd` and `/etc/group` with root and nonroot (65532), the CA bundle,
//!   `/tmp`; nothing else (no shell, no package manager: distroless-like);
//! * `ztk.local/pause:1`, the local cluster's sandbox image: a static C program that sleeps and
//!   reaps children;
//! * `ztk.local/busybox:1`, the test pods' image: Debian's busybox-static and a link in /bin
//!   for each of its applets.
//!
//! Reproducible: one uncompressed layer, entries sorted, every mtime [`MTIME`], owner 0:0,
//! modes normalised, JSON written in a fixed order; the same inputs give the same digests.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::{output, root};

/// Every file's modification time (2023-11-14): fixed, so the digest depends on content only.
pub const MTIME: u64 = 1_700_000_000;

pub const PAUSE_IMAGE: &str = "ztk.local/pause:1";
pub const BUSYBOX_IMAGE: &str = "ztk.local/busybox:1";

/// The chart's default image: `ztunnel:<appVersion>`, as containerd names it.
pub fn ztunnel_image() -> Result<String> {
    let chart = std::fs::read_to_string(root().join("deploy/helm/ztunnel/Chart.yaml"))?;
    let version = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .context("no appVersion in Chart.yaml")?;
    Ok(format!("docker.io/library/ztunnel:{version}"))
}

pub fn image_dir() -> PathBuf {
    root().join("target/images")
}

/// One entry of the image's file system.
#[derive(Clone, Debug)]
pub enum Entry {
    Dir { mode: u32 },
    File { data: Vec<u8>, mode: u32 },
    Symlink { target: String },
}

/// An image: its file system (absolute paths without the leading `/`) and its configuration.
pub struct Image {
    pub name: String,
    pub files: BTreeMap<String, Entry>,
    pub entrypoint: Vec<String>,
    pub env: Vec<String>,
}

impl Image {
    pub fn new(name: &str, entrypoint: &[&str]) -> Image {
        let mut img = Image {
            name: name.to_owned(),
            files: BTreeMap::new(),
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".to_owned()],
        };
        img.add("tmp", Entry::Dir { mode: 0o1777 });
        img.add(
            "etc/passwd",
            file(
                b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
                0o644,
            ),
        );
        img.add("etc/group", file(b"root:x:0:\nnonroot:x:65532:\n", 0o644));
        img
    }

    /// Adds an entry and every missing parent directory (0755).
    pub fn add(&mut self, path: &str, entry: Entry) {
        let path = path.trim_start_matches('/');
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            self.files
                .entry(p.to_string_lossy().into_owned())
                .or_insert(Entry::Dir { mode: 0o755 });
            parent = p.parent();
        }
        self.files.insert(path.to_owned(), entry);
    }

    /// Adds a host file at `path` (its content, not its metadata).
    pub fn add_host_file(&mut self, path: &str, host: &Path, mode: u32) -> Result<()> {
        let data = std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        self.add(path, Entry::File { data, mode });
        Ok(())
    }

    /// The single layer: a tar of every entry, sorted by path.
    pub fn layer(&self) -> Result<Vec<u8>> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, entry) in &self.files {
            let mut h = tar::Header::new_ustar();
            h.set_mtime(MTIME);
            h.set_uid(0);
            h.set_gid(0);
            match entry {
                Entry::Dir { mode } => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    tar.append_data(&mut h, format!("{path}/"), std::io::empty())?;
                }
                Entry::File { data, mode } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    tar.append_data(&mut h, path, data.as_slice())?;
                }
                Entry::Symlink { target } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    tar.append_link(&mut h, path, target)?;
                }
            }
        }
        Ok(tar.into_inner()?)
    }

    /// The OCI image layout as one tar archive, and the manifest's digest.
    pub fn layout_archive(&self) -> Result<(Vec<u8>, String)> {
        let layer = self.layer()?;
        let layer_digest = sha256(&layer);
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": self.entrypoint, "Env": self.env},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }))?;
        let config_digest = sha256(&config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        }))?;
        let manifest_digest = sha256(&manifest);
        let tag = self.name.rsplit_once(':').map_or("latest", |(_, t)| t);
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest.len(),
                "annotations": {
                    "io.containerd.image.name": self.name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        }))?;
        let mut blobs: Vec<(String, &[u8])> = vec![
            ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#),
            ("index.json".into(), &index),
        ];
        for (digest, data) in [
            (&config_digest, &config[..]),
            (&layer_digest, &layer[..]),
            (&manifest_digest, &manifest[..]),
        ] {
            blobs.push((format!("blobs/sha256/{}", &digest[7..]), data));
        }
        blobs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tar = tar::Builder::new(Vec::new());
        for dir in ["blobs/", "blobs/sha256/"] {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_mtime(MTIME);
            h.set_size(0);
            tar.append_data(&mut h, dir, std::io::empty())?;
        }
        for (path, data) in blobs {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_mtime(MTIME);
            h.set_size(data.len() as u64);
            tar.append_data(&mut h, path, data)?;
        }
        Ok((tar.into_inner()?, manifest_digest))
    }

    /// Writes `<dir>/<file>.tar`; returns its path and the manifest digest.
    pub fn write(&self, dir: &Path, file: &str) -> Result<(PathBuf, String)> {
        let (archive, digest) = self.layout_archive()?;
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{file}.tar"));
        std::fs::write(&path, archive).with_context(|| format!("writing {}", path.display()))?;
        Ok((path, digest))
    }
}

pub fn file(data: &[u8], mode: u32) -> Entry {
    Entry::File {
        data: data.to_vec(),
        mode,
    }
}

fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The shared libraries `ldd` reports for a binary (the loader included), by the path the
/// binary asks for.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = output(Command::new("ldd").arg(binary))?;
    Ok(parse_ldd(&out))
}

pub fn parse_ldd(out: &str) -> Vec<PathBuf> {
    out.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn ztunnel(binary: &Path) -> Result<Image> {
    let mut img = Image::new(&ztunnel_image()?, &["/usr/local/bin/ztunnel"]);
    img.add_host_file("usr/local/bin/ztunnel", binary, 0o755)?;
    // The CNI plugin `ztunnel cni install` copies from next to the binary onto the node.
    let plugin = binary.with_file_name("ztunnel-cni");
    img.add_host_file("usr/local/bin/ztunnel-cni", &plugin, 0o755)?;
    for lib in shared_libraries(binary)?
        .into_iter()
        .chain(shared_libraries(&plugin)?)
    {
        img.add_host_file(&lib.to_string_lossy(), &lib, 0o755)?;
    }
    // JWKS over https and any TLS to names outside the mesh.
    let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if bundle.exists() {
        img.add_host_file("etc/ssl/certs/ca-certificates.crt", bundle, 0o644)?;
    }
    Ok(img)
}

const PAUSE_C: &str = r#"/* The local cluster's sandbox process: sleeps, reaps children, exits on TERM/INT. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  signal(SIGTERM, quit);
  signal(SIGINT, quit);
  signal(SIGCHLD, reap);
  for (;;) pause();
}
"#;

fn pause(work: &Path) -> Result<Image> {
    std::fs::create_dir_all(work)?;
    let src = work.join("pause.c");
    let bin = work.join("pause");
    std::fs::write(&src, PAUSE_C)?;
    output(
        Command::new("gcc")
            .args(["-static", "-Os", "-s", "-o"])
            .arg(&bin)
            .arg(&src),
    )?;
    let mut img = Image::new(PAUSE_IMAGE, &["/pause"]);
    img.add_host_file("pause", &bin, 0o755)?;
    Ok(img)
}

fn busybox() -> Result<Image> {
    let host = Path::new("/bin/busybox");
    if !host.exists() {
        bail!("/bin/busybox is missing (cargo xtask setup installs busybox-static)");
    }
    let mut img = Image::new(BUSYBOX_IMAGE, &["/bin/sh"]);
    img.add_host_file("bin/busybox", host, 0o755)?;
    let applets = output(Command::new(host).arg("--list"))?;
    for applet in applets.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        img.add(
            &format!("bin/{applet}"),
            Entry::Symlink {
                target: "busybox".into(),
            },
        );
    }
    Ok(img)
}

/// Builds every image into target/images; returns (image name, archive, manifest digest).
pub fn build_all() -> Result<Vec<(String, PathBuf, String)>> {
    let binary = crate::release_dir().join("ztunnel");
    if !binary.exists() {
        bail!(
            "{} is missing: build it first (cargo xtask build)",
            binary.display()
        );
    }
    let dir = image_dir();
    let mut built = Vec::new();
    for (img, file) in [
        (ztunnel(&binary)?, "ztunnel"),
        (pause(&dir.join("pause-build"))?, "pause"),
        (busybox()?, "busybox"),
    ] {
        let (path, digest) = img.write(&dir, file)?;
        built.push((img.name.clone(), path, digest));
    }
    Ok(built)
}

pub fn image() -> Result<()> {
    for (name, path, digest) in build_all()? {
        println!("{name}  {digest}  {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(host_file: &Path) -> Image {
        let mut img = Image::new("docker.io/library/t:1", &["/bin/t"]);
        img.add_host_file("bin/t", host_file, 0o755).unwrap();
        img.add("lib/x", Entry::Symlink { target: "y".into() });
        img
    }

    #[test]
    fn the_same_content_gives_the_same_digest_whatever_the_file_times() {
        let dir = std::env::temp_dir().join(format!("xtask-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t");
        std::fs::write(&f, b"binary").unwrap();
        let (a, da) = sample(&f).layout_archive().unwrap();
        // Rewritten later (another mtime, same bytes): same archive, same digest.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::write(&f, b"binary").unwrap();
        let (b, db) = sample(&f).layout_archive().unwrap();
        assert_eq!(da, db);
        assert_eq!(a, b);
        // Different content: a different digest.
        std::fs::write(&f, b"binary2").unwrap();
        let (_, dc) = sample(&f).layout_archive().unwrap();
        assert_ne!(da, dc);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn layers_list_parents_first_with_fixed_metadata() {
        let mut img = Image::new("x:1", &["/a"]);
        img.add("usr/local/bin/a", file(b"a", 0o755));
        let layer = img.layer().unwrap();
        let mut ar = tar::Archive::new(layer.as_slice());
        let entries: Vec<(String, u64, u64)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mtime().unwrap(),
                    h.uid().unwrap(),
                )
            })
            .collect();
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc/",
                "etc/group",
                "etc/passwd",
                "tmp/",
                "usr/",
                "usr/local/",
                "usr/local/bin/",
                "usr/local/bin/a"
            ]
        );
        assert!(entries.iter().all(|e| e.1 == MTIME && e.2 == 0));
    }

    #[test]
    fn ldd_output_gives_the_library_paths() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x1)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x2)\n\t/lib64/ld-linux-x86-64.so.2 (0x3)\n";
        assert_eq!(
            parse_ldd(out),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }
}
