//! `ztunnel policy check`: the proxy's own decision ([`crate::policy_check`]) on a call
//! described by flags, against a configuration directory.
use std::process::ExitCode;

use super::{CheckArgs, Output};
use crate::{
    policy_check::{check as decide, fetch_key_sets, Caller, CheckRequest, Verdict},
    state::EnrolmentPolicy,
};

/// `policy check`: prints the answer; the exit status says allowed (0), denied (1), or bad
/// input or configuration (2).
pub fn check(args: CheckArgs) -> ExitCode {
    let bad = |e: String| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    };
    let snapshot = match super::check_snapshot(&args.config_dir, &args.root_namespace) {
        Ok(s) => s,
        Err(e) => return bad(e),
    };
    let from = match (args.from, args.from_principal) {
        (Some(pod), _) => Caller::Pod(pod),
        (None, Some(p)) => Caller::Principal(p),
        (None, None) => Caller::Plaintext,
    };
    let req = CheckRequest {
        to: args.to,
        port: args.port,
        from,
        from_ip: args.from_ip,
        method: args.method,
        path: args.path,
        host: args.host,
        headers: args.headers,
        jwt: args.jwt,
        sni: args.sni,
        trust_domain: args.trust_domain,
        enrolment: EnrolmentPolicy {
            namespace_label: args.ambient_label,
            pod_opt_out_label: args.opt_out_label,
        },
    };
    // Key sets named by jwksUri are fetched once, up front, as the proxy would fetch them.
    let fetched = if req.jwt.is_some() {
        match fetch_key_sets(&snapshot) {
            Ok(f) => f,
            Err(e) => return bad(e),
        }
    } else {
        Default::default()
    };
    let answer = match decide(&snapshot, &req, &|uri| fetched.get(uri).cloned()) {
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
    if answer.decision == Verdict::Allow {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
