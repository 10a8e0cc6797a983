//! Project tasks: `cargo xtask setup | build | build-ebpf | demo | test | bench`.
//!
//! `demo` and `test` are the README's two commands: each runs `setup` first, so a fresh
//! Debian 12 machine needs nothing else.
mod checks;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "ztunnel project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing tools (apt packages, nightly rust-src, bpf-linker) and mount bpffs.
    Setup,
    /// Build every binary (ztunnel with its embedded eBPF object, vc-probe, demo) in release.
    Build,
    /// Build only the eBPF object (for iterating on the kernel side).
    BuildEbpf,
    /// Start a virtual two-node cluster and show traffic being captured and delivered.
    Demo,
    /// Set up, check formatting and lints, build, run every test, check nothing is left over.
    Test {
        /// Passed to `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks (arrive with HBONE).
    Bench,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Runs a command, echoing it, and fails unless it succeeds.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    println!("+ {}", shown.join(" "));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", shown[0]))?;
    if !status.success() {
        bail!("`{}` failed ({status})", shown.join(" "));
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

fn build() -> Result<()> {
    run(cargo().args(["build", "--release", "--workspace", "--bins"]))
}

/// Environment telling the tests and the demo which binaries to run.
fn with_binaries(cmd: &mut Command) -> &mut Command {
    let release = root().join("target/release");
    cmd.env("ZTUNNEL_BIN", release.join("ztunnel"))
        .env("ZTUNNEL_PROBE_BIN", release.join("vc-probe"))
}

fn test(args: &[String]) -> Result<()> {
    setup::setup()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    build()?;
    let stale = checks::leftovers();
    if !stale.is_empty() {
        println!("note: leftovers of an earlier run (the harness sweeps them): {stale:?}");
    }
    let firewall_before = checks::firewall_state();
    let tests = run(with_binaries(
        cargo()
            .args(["test", "--workspace", "--release"])
            .arg("--")
            .args(args),
    ));
    let firewall = checks::compare_firewall(&firewall_before, &checks::firewall_state());
    let leftovers = checks::leftovers();
    tests?;
    firewall?;
    if !leftovers.is_empty() {
        bail!("the tests left these behind:\n  {}", leftovers.join("\n  "));
    }
    println!("all tests passed; the firewall is unchanged and nothing was left behind");
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Build => {
            setup::setup()?;
            build()
        }
        Task::BuildEbpf => {
            setup::setup()?;
            // The rustup proxy, not $CARGO: only the proxy understands `+nightly`.
            run(Command::new("cargo")
                .current_dir(root().join("ebpf"))
                .args([
                    "+nightly",
                    "build",
                    "--release",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                ]))
        }
        Task::Demo => {
            setup::setup()?;
            build()?;
            run(with_binaries(&mut Command::new(
                root().join("target/release/demo"),
            )))
        }
        Task::Test { args } => test(&args),
        Task::Bench => bail!("bench: not implemented yet; it lands with HBONE (issue 3)"),
    }
}
