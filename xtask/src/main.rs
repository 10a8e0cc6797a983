//! Project tasks: `cargo xtask setup | build | build-ebpf | demo | test | bench | fuzz |
//! check-deploy | image | cluster up|down|status`.
//!
//! `demo` and `test` are the README's two commands: each runs `setup` first, so a fresh
//! Debian 12 machine needs nothing else.
mod checks;
mod cluster;
mod deploy_check;
mod deploy_tools;
mod fuzz;
mod image;
#[cfg(test)]
mod layers;
mod setup;

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "ztunnel project tasks (run as root)")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (apt packages, nightly rust-src, bpf-linker, cargo-fuzz), mount
    /// bpffs.
    Setup,
    /// Build every binary in release: ztunnel (with its eBPF object), vc-probe, demo.
    Build,
    /// Build only the eBPF object, with nightly (for iterating on the kernel side).
    BuildEbpf,
    /// Set up, build, and run the demo on a virtual two-node cluster.
    Demo,
    /// Set up, check formatting and lints, build, run every test, check nothing was left over.
    Test {
        /// Passed on to `cargo test` (e.g. a test name filter): `cargo xtask test -- capture`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Lint and render the Helm chart, check deploy/*.yaml is its render, validate every
    /// manifest against the Kubernetes schemas and the Istio CRDs (part of `test`).
    CheckDeploy {
        /// Rewrite deploy/ztunnel.yaml and deploy/crds.yaml from the chart.
        #[arg(long)]
        update: bool,
    },
    /// Set up, build, and measure direct pod-to-pod against the mesh (docs/benchmarks.md).
    Bench {
        /// Also measure Istio's ztunnel as both node proxies, round by round with ours; its
        /// binary: PATH, else $ZTUNNEL_PEER_BIN, else ../shared/peers/istio-ztunnel.xz.
        #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "")]
        peer: Option<String>,
        /// Rounds of every measurement (default 1; 5 with --peer).
        #[arg(long)]
        rounds: Option<u64>,
        /// Instead of the traffic bench: a generated cluster of 100 000 remote pods, 20 000
        /// Services and 10 000 policies in one proxy's configuration (`-- --help` lists the
        /// sizes): memory per remote pod, one-object change and relist times.
        #[arg(long, conflicts_with_all = ["peer", "rounds"])]
        scale: bool,
        /// Passed on to the bench: `cargo xtask bench -- --hold 500` (`-- --help` lists them).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// A real two-node Kubernetes on this machine, with the chart installed (docs/kubernetes.md,
    /// "The local cluster").
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Build the OCI images (node proxy, the local cluster's pause and test images) into
    /// target/images, without Docker.
    Image,
    /// Set up, and run each fuzz target of fuzz/ (cargo-fuzz) for a while (docs/fuzzing.md).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = fuzz::TEST_SECONDS)]
        seconds: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Set up, build, and start the cluster; ends with `export KUBECONFIG=...`.
    Up {
        /// Use the release binaries as they are (the real-cluster suite, run after the build).
        #[arg(long)]
        no_build: bool,
        /// Only etcd and kube-apiserver, no node (`scale-bench --source kubernetes`): the
        /// ServiceAccount admission plugin off, Services allocated from this range.
        #[arg(long, value_name = "SERVICE_CIDR")]
        api_only: Option<String>,
        /// With --api-only: more ranges that get an `unreachable` route (repeatable).
        #[arg(long, value_name = "CIDR", requires = "api_only")]
        guard: Vec<String>,
    },
    /// Remove every process, mount, netns, cgroup, link, route, file and sysctl change of it.
    Down,
    /// The cluster's daemons and each node's readiness.
    Status,
    /// The cluster's Service plumbing (cluster DNS, ClusterIP relays); run by `up`.
    #[command(hide = true)]
    Services {
        #[arg(long)]
        kubectl: PathBuf,
    },
}

/// The workspace root (xtask/ is one of its members).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn release_dir() -> PathBuf {
    root().join("target/release")
}

/// A command as a shell would show it (`cargo` for the full path of the running cargo).
fn shown(cmd: &Command) -> String {
    let cargo = std::env::var_os("CARGO");
    let program = match cmd.get_program() {
        p if Some(p) == cargo.as_deref() => "cargo".as_ref(),
        p => p,
    };
    std::iter::once(program)
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command with inherited output, echoing it first; fails unless it succeeds.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = shown(cmd);
    println!("+ {line}");
    let status = cmd.status().with_context(|| format!("starting `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs a command quietly for its stdout; fails (with its stderr) unless it succeeds.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = shown(cmd);
    let out = cmd.output().with_context(|| format!("running `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cargo that runs xtask (same toolchain), in the workspace root.
fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

fn build() -> Result<()> {
    run(cargo().args(["build", "--release", "--workspace", "--bins"]))
}

fn build_ebpf() -> Result<()> {
    // The rustup proxy `cargo`, not $CARGO: only the proxy understands `+nightly`.
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

/// Tells the tests and the demo which binaries to run.
fn with_binaries(cmd: &mut Command) -> &mut Command {
    cmd.env("ZTUNNEL_BIN", release_dir().join("ztunnel"))
        .env("ZTUNNEL_CNI_BIN", release_dir().join("ztunnel-cni"))
        .env("ZTUNNEL_PROBE_BIN", release_dir().join("vc-probe"))
}

/// Replaces xtask with the demo, so its output, signals and exit status are the demo's own.
fn demo() -> Result<()> {
    let mut cmd = Command::new(release_dir().join("demo"));
    with_binaries(&mut cmd).current_dir(root());
    println!("+ {}", shown(&cmd));
    let err = cmd.exec();
    Err(err).with_context(|| format!("running {}", release_dir().join("demo").display()))
}

/// Runs the authorization-decision benchmark (no cluster), then replaces xtask with the traffic
/// benchmark (like `demo`), passing `args` on.
fn bench(args: &[String]) -> Result<()> {
    run(Command::new(release_dir().join("policy-bench")).current_dir(root()))?;
    exec_bench("bench", args)
}

/// Replaces xtask with the benchmark binary `name`, passing `args` on.
fn exec_bench(name: &str, args: &[String]) -> Result<()> {
    let bin = release_dir().join(name);
    let mut cmd = Command::new(&bin);
    with_binaries(&mut cmd).current_dir(root()).args(args);
    println!("+ {}", shown(&cmd));
    let err = cmd.exec();
    Err(err).with_context(|| format!("running {}", bin.display()))
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
    deploy_check::check_deploy(false)?;
    build()?;
    // Fuzzing is part of the full run only; a filtered run is for iterating on some tests.
    if args.is_empty() {
        fuzz::fuzz(fuzz::TEST_SECONDS, &[])?;
    }
    let stale = checks::leftovers();
    if !stale.is_empty() {
        println!(
            "note: an earlier run left these (the harness sweeps them when their process is \
             gone):\n  {}",
            stale.join("\n  ")
        );
    }
    let firewall_before = checks::firewall_snapshot().context("snapshotting the firewall")?;
    // The real-cluster suite brings its cluster up and down with this very xtask.
    let xtask = std::env::current_exe().context("locating the xtask binary")?;
    let tests = run(with_binaries(
        cargo()
            .args(["test", "--workspace", "--release"])
            .args(args)
            .env("ZT_XTASK_BIN", xtask),
    ));
    let firewall_after = checks::firewall_snapshot().context("snapshotting the firewall")?;
    let firewall_diff = checks::firewall_diff(&firewall_before, &firewall_after);
    let leftovers = final_leftovers();
    summarise(&tests, firewall_diff.as_deref(), &leftovers)
}

/// Leftovers after the run. A process the harness has just killed can take a moment to go,
/// so a non-empty answer is checked once more before it counts.
fn final_leftovers() -> Vec<String> {
    let found = checks::leftovers();
    if found.is_empty() {
        return found;
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    checks::leftovers()
}

/// Prints the outcome of the three checks of a test run; fails if any failed.
fn summarise(tests: &Result<()>, firewall_diff: Option<&str>, leftovers: &[String]) -> Result<()> {
    if let Some(diff) = firewall_diff {
        println!("\nthe test run changed the host firewall:\n{diff}");
    }
    if !leftovers.is_empty() {
        println!(
            "\nthe test run left these behind:\n  {}",
            leftovers.join("\n  ")
        );
    }
    println!("\nsummary:");
    match tests {
        Ok(()) => println!("  tests      passed"),
        Err(e) => println!("  tests      FAILED: {e:#}"),
    }
    match firewall_diff {
        None => println!("  firewall   unchanged (iptables, ip6tables, nftables)"),
        Some(_) => println!("  firewall   CHANGED (diff above)"),
    }
    match leftovers.len() {
        0 => println!(
            "  leftovers  none (netns, bpffs, cgroups, /tmp, processes, the local cluster)"
        ),
        n => println!("  leftovers  {n} FOUND (listed above)"),
    }
    if tests.is_err() || firewall_diff.is_some() || !leftovers.is_empty() {
        bail!("cargo xtask test failed (see the summary)");
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Build => setup::setup().and_then(|()| build()),
        Task::BuildEbpf => setup::setup().and_then(|()| build_ebpf()),
        Task::Demo => setup::setup().and_then(|()| build()).and_then(|()| demo()),
        Task::Test { args } => test(&args),
        Task::CheckDeploy { update } => {
            setup::setup().and_then(|()| deploy_check::check_deploy(update))
        }
        Task::Fuzz { seconds, targets } => {
            setup::setup().and_then(|()| fuzz::fuzz(seconds, &targets))
        }
        Task::Cluster { action } => match action {
            ClusterAction::Up {
                no_build,
                api_only,
                guard,
            } => {
                let scope = match api_only {
                    Some(service_cidr) => cluster::Scope::ApiOnly {
                        service_cidr,
                        guards: guard,
                    },
                    None => cluster::Scope::Full,
                };
                let built = if no_build {
                    Ok(())
                } else {
                    setup::setup().and_then(|()| build())
                };
                built.and_then(|()| cluster::up(&scope))
            }
            ClusterAction::Down => cluster::down(),
            ClusterAction::Status => cluster::status(),
            ClusterAction::Services { kubectl } => cluster::run_services(&kubectl),
        },
        Task::Image => setup::setup()
            .and_then(|()| build())
            .and_then(|()| image::image()),
        Task::Bench {
            scale: true, args, ..
        } => setup::setup()
            .and_then(|()| build())
            .and_then(|()| exec_bench("scale-bench", &args)),
        Task::Bench {
            peer,
            rounds,
            mut args,
            ..
        } => {
            if let Some(rounds) = rounds {
                args.splice(0..0, ["--rounds".to_owned(), rounds.to_string()]);
            }
            if let Some(path) = peer {
                let given = (!path.is_empty()).then_some(path);
                args.splice(0..0, std::iter::once("--peer".to_owned()).chain(given));
            }
            setup::setup()
                .and_then(|()| build())
                .and_then(|()| bench(&args))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
