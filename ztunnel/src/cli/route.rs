//! `ztunnel route check`: the proxy's own routing decision ([`crate::route_check`]) on a
//! request described by flags, against a configuration directory.
use std::process::ExitCode;

use super::{Output, RouteCheckArgs};
use crate::{
    config,
    route_check::{check as decide, RouteRequest},
    state::{MeshSettings, Snapshot},
};

/// `route check`: prints the answer; the exit status says routed (0), no route (1), or bad
/// input or configuration (2).
pub fn check(args: RouteCheckArgs) -> ExitCode {
    let bad = |e: String| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    };
    let objects = match config::load_dir(&args.config_dir) {
        Ok(o) => o,
        Err(e) => {
            return bad(format!(
                "{} is not a valid configuration: {e}",
                args.config_dir.display()
            ))
        }
    };
    let settings = MeshSettings {
        root_namespace: args.root_namespace.clone(),
    };
    let snapshot = Snapshot::build(1, objects, &settings);
    for problem in &snapshot.problems {
        eprintln!("warning: {problem}");
    }
    let req = RouteRequest {
        from: args.from,
        to: args.to,
        method: args.method,
        path: args.path,
        headers: args.headers,
    };
    let answer = match decide(&snapshot, &req) {
        Ok(a) => a,
        Err(e) => return bad(e),
    };
    match args.output {
        Output::Text => print!("{}", answer.text()),
        Output::Json => match serde_json::to_string_pretty(&answer) {
            Ok(j) => println!("{j}"),
            Err(e) => return bad(e.to_string()),
        },
    }
    if answer.delivered() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
