//! `cargo xtask fuzz`: runs the fuzz targets of `fuzz/` (cargo-fuzz, libFuzzer, nightly) for a
//! bounded time each, from the committed seeds, and fails on any crash, panic, timeout or
//! out-of-memory, naming the input that caused it and how to run it again.
//!
//! Everything the runs write stays under `target/fuzz/` (its own target dir, so the main
//! build is not invalidated): the grown corpus, crash artifacts and one log per target.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Instant, SystemTime},
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, root, run, shown};

/// The targets, each with `fuzz/seeds/<name>/` and `fuzz/dicts/<name>.dict`.
pub const TARGETS: &[&str] = &["policy_config", "jwt"];

/// Seconds per target in `cargo xtask test`.
pub const TEST_SECONDS: u64 = 25;

/// Options every cargo-fuzz command gets: the project in `fuzz/`, its own target dir, no
/// sanitizer (the code under test is safe Rust; panics and overflow checks are what count,
/// and a build without ASan is much quicker to make and to run), and 16 codegen units instead
/// of cargo-fuzz's 1 (a build from scratch in 4 minutes rather than 10, for 13% fewer
/// executions per second).
fn fuzz_cmd(subcommand: &str) -> Command {
    // The rustup proxy `cargo`, not $CARGO: only the proxy understands `+nightly`.
    let mut c = Command::new("cargo");
    c.current_dir(root())
        .args(["+nightly", "fuzz", subcommand, "--fuzz-dir", "fuzz"])
        .args(["--sanitizer", "none", "--codegen-units", "16"])
        .args(["--target-dir", "target/fuzz"])
        // The targets need no eBPF object, and nightly must not rebuild it with fuzzing flags.
        .env("AYA_BUILD_SKIP", "1");
    // What `cargo run` set for xtask itself: build scripts that watch these (ring's watches
    // CARGO_MANIFEST_DIR) would otherwise rebuild everything whenever the same build is
    // started from a shell, as the command printed for a failing input is.
    const SET_BY_CARGO_RUN: &[&str] = &[
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
    ];
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_") || SET_BY_CARGO_RUN.contains(&name.as_ref()) {
            c.env_remove(name.as_ref());
        }
    }
    c
}

/// What one run did, from libFuzzer's output.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub execs: Option<u64>,
    pub execs_per_sec: Option<u64>,
    pub cov: Option<u64>,
    pub ft: Option<u64>,
    pub corpus: Option<u64>,
}

/// Reads the last status line (`#N ... cov: C ft: F corp: K/...`) and the final
/// `stat::` lines of libFuzzer's output.
pub fn parse_stats(log: &str) -> Stats {
    let field = |line: &str, name: &str| -> Option<u64> {
        let mut words = line.split_whitespace();
        words.find(|w| *w == name)?;
        words.next()?.split('/').next()?.parse().ok()
    };
    let stat = |name: &str| -> Option<u64> {
        log.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.trim_start_matches(':').trim().parse().ok())
    };
    let status = log
        .lines()
        .rev()
        .find(|l| l.starts_with('#') && l.contains(" cov: "));
    Stats {
        execs: stat("stat::number_of_executed_units"),
        execs_per_sec: stat("stat::average_exec_per_sec"),
        cov: status.and_then(|l| field(l, "cov:")),
        ft: status.and_then(|l| field(l, "ft:")),
        corpus: status.and_then(|l| field(l, "corp:")),
    }
}

/// Files in `dir` written since `since` that libFuzzer writes for a failure (not slow units,
/// which are only reported).
fn new_artifacts(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            ["crash-", "leak-", "timeout-", "oom-"]
                .iter()
                .any(|p| name.starts_with(p))
                && e.metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t >= since)
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Builds every target, then runs each of `targets` (all when empty) for `seconds`.
pub fn fuzz(seconds: u64, targets: &[String]) -> Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("no fuzz target {t:?} (there are: {})", TARGETS.join(", "));
            }
        }
        targets.iter().map(String::as_str).collect()
    };
    let started = Instant::now();
    // The fuzz crate is outside the workspace, so `cargo fmt --all` does not see it.
    run(cargo().args(["fmt", "--check", "--manifest-path", "fuzz/Cargo.toml"]))?;
    run(&mut fuzz_cmd("build"))?;
    let mut failures = Vec::new();
    for target in targets {
        if let Err(e) = fuzz_target(target, seconds) {
            println!("{e:#}");
            failures.push(target);
        }
    }
    println!(
        "fuzzing took {:.0} s in all",
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        bail!("fuzz target(s) failed: {}", failures.join(", "));
    }
    Ok(())
}

fn fuzz_target(target: &str, seconds: u64) -> Result<()> {
    let root = root();
    let work = root.join("target/fuzz");
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    let logs = work.join("logs");
    let log_path = logs.join(format!("{target}.log"));
    for dir in [&corpus, &artifacts, &logs] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let seeds = root.join("fuzz/seeds").join(target);
    let dict = root.join("fuzz/dicts").join(format!("{target}.dict"));
    let mut cmd = fuzz_cmd("run");
    // The first corpus directory receives what the run finds; the seeds are only read.
    cmd.arg(target).arg(&corpus).arg(&seeds).arg("--").args([
        format!("-max_total_time={seconds}"),
        format!("-dict={}", dict.display()),
        format!("-artifact_prefix={}/", artifacts.display()),
        // A single input that takes this long is a hang (the proxy decides inline).
        "-timeout=10".into(),
        "-rss_limit_mb=2048".into(),
        "-print_final_stats=1".into(),
    ]);
    println!("+ {} (log: {})", shown(&cmd), log_path.display());
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let since = SystemTime::now();
    let status = cmd
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {}", shown(&cmd)))?;
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let stats = parse_stats(&text);
    let n = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
    println!(
        "fuzz {target}: {} executions ({}/s), cov {} ft {}, corpus {}",
        n(stats.execs),
        n(stats.execs_per_sec),
        n(stats.cov),
        n(stats.ft),
        n(stats.corpus)
    );
    if status.success() {
        return Ok(());
    }
    // The report: from the panic (or libFuzzer's own error) on, else the log's last lines.
    let lines: Vec<&str> = text.lines().collect();
    let from = lines
        .iter()
        .position(|l| l.contains(" panicked at ") || l.contains("ERROR: libFuzzer"))
        .unwrap_or(lines.len().saturating_sub(60));
    println!("--- {} from line {} ---", log_path.display(), from + 1);
    for line in lines.iter().skip(from).take(120) {
        println!("{line}");
    }
    println!("---");
    let found = new_artifacts(&artifacts, since);
    if found.is_empty() {
        bail!("fuzz target {target} failed ({status}) without writing an input; see the log above");
    }
    // The same build as the run's, so the input runs again without a rebuild.
    let again = format!("AYA_BUILD_SKIP=1 {}", shown(&fuzz_cmd("run")));
    for input in &found {
        let rel = input.strip_prefix(&root).unwrap_or(input);
        println!(
            "fuzz target {target} failed on {}\n  run it again: {again} {target} {}",
            rel.display(),
            rel.display()
        );
    }
    bail!("fuzz target {target} failed ({status})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_read_from_libfuzzer_output() {
        let log = "INFO: Seed: 1\n\
                   #2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #4096\tpulse  cov: 1234 ft: 5678 corp: 321/40Kb lim: 4096 exec/s: 2048 rss: 60Mb\n\
                   #5000\tNEW    cov: 1240 ft: 5700 corp: 322/41Kb lim: 4096 exec/s: 2000 rss: 61Mb L: 5/9 MS: 1 ChangeBit-\n\
                   Done 5300 runs in 3 second(s)\n\
                   stat::number_of_executed_units: 5300\n\
                   stat::average_exec_per_sec:     1766\n\
                   stat::new_units_added:          20\n";
        assert_eq!(
            parse_stats(log),
            Stats {
                execs: Some(5300),
                execs_per_sec: Some(1766),
                cov: Some(1240),
                ft: Some(5700),
                corpus: Some(322),
            }
        );
        assert_eq!(parse_stats("cargo: error\n"), Stats::default());
    }

    #[test]
    fn only_failure_artifacts_count() {
        let dir = std::env::temp_dir().join(format!("xtask-fuzz-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let since = SystemTime::now() - std::time::Duration::from_secs(5);
        for name in ["crash-1", "slow-unit-2", "timeout-3", "notes"] {
            fs::write(dir.join(name), b"x").unwrap();
        }
        let names: Vec<String> = new_artifacts(&dir, since)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["crash-1", "timeout-3"]);
        let later = SystemTime::now() + std::time::Duration::from_secs(60);
        assert!(new_artifacts(&dir, later).is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
