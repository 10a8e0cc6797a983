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
