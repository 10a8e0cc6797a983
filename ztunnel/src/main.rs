//! `ztunnel`: the node proxy daemon and its operator commands. The commands are defined in
//! [`ztunnel::cli`]; the daemon is [`ztunnel::app`].
use std::process::ExitCode;

use clap::Parser;
use tracing::error;
use ztunnel::{
    app, capture,
    cli::{self, BpfCommand, Cli, Command, PolicyCommand, RouteCommand},
    logging,
};

#[cfg(not(feature = "alloc-census"))]
#[global_allocator]
static ALLOCATOR: ztunnel::memory::allocator::Backing = ztunnel::memory::allocator::BACKING;

/// jemalloc's start-up options (read before the first allocation; `_RJEM_MALLOC_CONF` in the
/// environment overrides them), measured in docs/benchmarks.md: one background thread returns
/// freed pages after a second rather than on some later allocation's slow path, and they go
/// straight back to the system (no "muzzy" stage that keeps them mapped for another decay
/// period); two arenas (a node proxy has a few runtime threads, each with its own cache in
/// front of the arenas) keep the idle footprint small.
#[cfg(feature = "jemalloc")]
#[export_name = "_rjem_malloc_conf"]
pub static JEMALLOC_CONF: &[u8; 95] =
    b"background_thread:true,max_background_threads:1,narenas:2,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Policy {
            command: PolicyCommand::Check(args),
        } => return cli::policy_check(*args),
        Command::Route {
            command: RouteCommand::Check(args),
        } => return cli::route_check(*args),
        Command::Config {
            section,
            output,
            admin,
        } => return cli::config::run(section, output, &admin),
        Command::Run(args) => {
            let logging = logging::init(args.log_format);
            app::run(*args, logging)
        }
        Command::Bpf {
            command: BpfCommand::Uninstall { bpf_dir },
        } => capture::uninstall(&bpf_dir),
        Command::Bpf {
            command: BpfCommand::Status { bpf_dir, output },
        } => cli::bpf_status(&bpf_dir, output),
        Command::Ca { command } => cli::ca(command),
        Command::Cni { command } => cli::cni_command(command),
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
