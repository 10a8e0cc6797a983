//! `ztunnel`: the node proxy daemon and its operator commands.
use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info};
use ztunnel::{
    capture::{self, enrolment::Enroller, Capture, CaptureOptions},
    config,
    netns::Netns,
    proxy::Proxy,
    state::EnrolmentPolicy,
};

#[derive(Parser)]
#[command(
    name = "ztunnel",
    version,
    about = "eBPF-accelerated node proxy for ambient meshes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node proxy.
    Run(RunArgs),
    /// Inspect or remove the pinned BPF state.
    Bpf {
        #[command(subcommand)]
        command: BpfCommand,
    },
}

#[derive(Subcommand)]
enum BpfCommand {
    /// Remove every pinned program, link and map of a node proxy (detaches capture).
    Uninstall {
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
}

const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/ztunnel";

#[derive(Parser)]
struct RunArgs {
    /// Directory of Kubernetes-shaped YAML (Namespaces, Pods, Services, Istio policies).
    #[arg(long)]
    config_dir: PathBuf,
    /// This node's name: only pods with this `spec.nodeName` are captured here.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Pin directory on bpffs (one per node proxy).
    #[arg(long, default_value = DEFAULT_BPF_DIR)]
    bpf_dir: PathBuf,
    /// cgroup v2 directory to attach the connect programs to [default: the cgroup2 root].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Namespace label that enrols a namespace's pods, as key=value.
    #[arg(long, default_value = "istio.io/dataplane-mode=ambient", value_parser = EnrolmentPolicy::parse_label)]
    ambient_label: (String, String),
    /// Pod label that opts a pod out of capture, as key=value.
    #[arg(long, default_value = "istio.io/dataplane-mode=none", value_parser = EnrolmentPolicy::parse_label)]
    opt_out_label: (String, String),
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            init_logging(args.log_format);
            run(args)
        }
        Command::Bpf {
            command: BpfCommand::Uninstall { bpf_dir },
        } => capture::uninstall(&bpf_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %format!("{e:#}"), "ztunnel failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Every proxied connection costs the proxy two descriptors (more with HBONE); the usual soft
/// limit of 1024 would cap a node at a few hundred connections, so take the hard limit.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let soft = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                tracing::debug!(
                    from = soft,
                    to = lim.rlim_max,
                    "raised the open-files limit"
                );
            }
        }
    }
}

fn run(args: RunArgs) -> Result<()> {
    // Taken before any other thread exists: every thread starts in this (the node's) netns.
    let home = Arc::new(Netns::current().context("opening the node network namespace")?);
    raise_fd_limit();
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => capture::cgroup2_root()?,
    };
    let capture = Capture::install(&CaptureOptions {
        bpf_dir: args.bpf_dir,
        cgroup,
    })?;
    let policy = EnrolmentPolicy {
        namespace_label: args.ambient_label,
        pod_opt_out_label: args.opt_out_label,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(async move {
            let (mut config, _watch) = config::watch(args.config_dir.clone())
                .with_context(|| format!("loading {}", args.config_dir.display()))?;
            let proxy = Proxy::new(home.clone(), capture.orig_dst_table(), config.clone());
            let mut enroller = Enroller::new(capture, proxy, home, args.node_name.clone(), policy);
            let snapshot = config.borrow_and_update().clone();
            enroller.reconcile(&snapshot);
            info!(node = %args.node_name, generation = snapshot.generation, "proxy ready");

            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let mut retry = tokio::time::interval(std::time::Duration::from_secs(2));
            loop {
                tokio::select! {
                    changed = config.changed() => {
                        if changed.is_err() {
                            anyhow::bail!("configuration watcher stopped");
                        }
                        let snapshot = config.borrow_and_update().clone();
                        enroller.reconcile(&snapshot);
                        info!(generation = snapshot.generation, "configuration applied");
                    }
                    _ = retry.tick(), if enroller.has_failures() => {
                        let snapshot = config.borrow().clone();
                        enroller.reconcile(&snapshot);
                    }
                    _ = terminate.recv() => break,
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
            // Pins stay: enrolled pods keep failing closed until a proxy runs again.
            info!("shutting down; capture stays in force until a proxy takes over");
            Ok(())
        })
}
