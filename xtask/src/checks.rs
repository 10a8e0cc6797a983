//! Checks around the test run: the host firewall is unchanged (capture is eBPF only, so nothing
//! may add an iptables or nftables rule) and nothing the tests create outlives them (the
//! harness's `ztt-` objects and every object of the local Kubernetes cluster).
use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::setup::mounts_of_type;

/// The test harness names everything it creates `ztt-<pid>-<n>…`.
const TEST_PREFIX: &str = "ztt-";

/// The commands whose output together is "the host firewall".
const FIREWALL_DUMPS: &[&[&str]] = &[
    &["iptables-save"],
    &["ip6tables-save"],
    &["nft", "list", "ruleset"],
];

/// The host's firewall rules as comparable text: each dump under a `## <command>` header,
/// normalised by [`normalise_rules`].
pub fn firewall_snapshot() -> Result<String> {
    let mut snapshot = String::new();
    for argv in FIREWALL_DUMPS {
        let shown = argv.join(" ");
        println!("+ {shown}");
        let out = Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .with_context(|| format!("running `{shown}` (cargo xtask setup installs it)"))?;
        if !out.status.success() {
            bail!(
                "`{shown}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        snapshot.push_str(&format!("## {shown}\n"));
        snapshot.push_str(&normalise_rules(&String::from_utf8_lossy(&out.stdout)));
    }
    Ok(snapshot)
}

/// Removes what changes without anyone touching the rules: comment lines (iptables-save stamps
/// the time in them), chain packet counters (`:INPUT ACCEPT [12:3456]`) and nft `counter`
/// statement values.
pub fn normalise_rules(dump: &str) -> String {
    let mut text = String::new();
    for line in dump.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        let line = match (line.starts_with(':'), line.rfind(" [")) {
            (true, Some(i)) => &line[..i],
            _ => line,
        };
        text.push_str(&strip_nft_counters(line));
        text.push('\n');
    }
    text
}

/// `counter packets 12 bytes 3456` → `counter`.
fn strip_nft_counters(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    if !words.contains(&"counter") {
        return line.to_owned();
    }
    let indent = &line[..line.len() - line.trim_start().len()];
    let mut kept = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        kept.push(words[i]);
        let has_values = words[i] == "counter"
            && words.get(i + 1) == Some(&"packets")
            && words.get(i + 3) == Some(&"bytes");
        i += if has_values { 5 } else { 1 };
    }
    format!("{indent}{}", kept.join(" "))
}

/// A line diff of two snapshots (`- ` removed, `+ ` added), each change shown under the
/// `## <command>` header of its dump; `None` if they are equal.
pub fn firewall_diff(before: &str, after: &str) -> Option<String> {
    if before == after {
        return None;
    }
    let mut text = String::new();
    let mut header = "";
    let mut header_shown = false;
    for edit in diff_lines(before, after) {
        match edit {
            Edit::Same(line) if line.starts_with("## ") => (header, header_shown) = (line, false),
            Edit::Same(_) => {}
            Edit::Removed(line) | Edit::Added(line) => {
                if !header_shown {
                    text.push_str(&format!("  {header}\n"));
                    header_shown = true;
                }
                let sign = if matches!(edit, Edit::Removed(_)) {
                    '-'
                } else {
                    '+'
                };
                text.push_str(&format!("  {sign} {line}\n"));
            }
        }
    }
    Some(text)
}

#[derive(Debug, PartialEq)]
enum Edit<'a> {
    Same(&'a str),
    Removed(&'a str),
    Added(&'a str),
}

/// Larger middles than this (in LCS table cells) are shown as all-removed, all-added.
const MAX_DIFF_CELLS: usize = 4_000_000;

/// A line diff by longest common subsequence, after trimming the common start and end (so the
/// table covers only the part that changed; rule sets are at most a few thousand lines).
fn diff_lines<'a>(before: &'a str, after: &'a str) -> Vec<Edit<'a>> {
    let old: Vec<&str> = before.lines().collect();
    let new: Vec<&str> = after.lines().collect();
    let prefix = old.iter().zip(&new).take_while(|(a, b)| a == b).count();
    let suffix = old[prefix..]
        .iter()
        .rev()
        .zip(new[prefix..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let (o, n) = (
        &old[prefix..old.len() - suffix],
        &new[prefix..new.len() - suffix],
    );
    let mut edits: Vec<Edit> = old[..prefix].iter().map(|l| Edit::Same(l)).collect();
    if o.len() * n.len() > MAX_DIFF_CELLS {
        edits.extend(o.iter().map(|l| Edit::Removed(l)));
        edits.extend(n.iter().map(|l| Edit::Added(l)));
    } else {
        edits.extend(lcs_edits(o, n));
    }
    edits.extend(old[old.len() - suffix..].iter().map(|l| Edit::Same(l)));
    edits
}

fn lcs_edits<'a>(o: &[&'a str], n: &[&'a str]) -> Vec<Edit<'a>> {
    // lcs[i][j] = length of the longest common subsequence of o[i..] and n[j..].
    let width = n.len() + 1;
    let mut lcs = vec![0u32; (o.len() + 1) * width];
    for i in (0..o.len()).rev() {
        for j in (0..n.len()).rev() {
            lcs[i * width + j] = if o[i] == n[j] {
                lcs[(i + 1) * width + j + 1] + 1
            } else {
                lcs[(i + 1) * width + j].max(lcs[i * width + j + 1])
            };
        }
    }
    let (mut i, mut j, mut edits) = (0, 0, Vec::new());
    while i < o.len() || j < n.len() {
        if i < o.len() && j < n.len() && o[i] == n[j] {
            edits.push(Edit::Same(o[i]));
            (i, j) = (i + 1, j + 1);
        } else if j == n.len()
            || (i < o.len() && lcs[(i + 1) * width + j] >= lcs[i * width + j + 1])
        {
            edits.push(Edit::Removed(o[i]));
            i += 1;
        } else {
            edits.push(Edit::Added(n[j]));
            j += 1;
        }
    }
    edits
}

/// Everything carrying the test prefix that still exists, one description each.
pub fn leftovers() -> Vec<String> {
    let mut found = leftover_netns();
    let mut dirs = vec!["/sys/fs/bpf".to_owned(), "/tmp".to_owned()];
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
        dirs.extend(
            mounts_of_type(&mounts, "cgroup2")
                .into_iter()
                .map(str::to_owned),
        );
    }
    for dir in dirs {
        for name in entries(Path::new(&dir)) {
            if name.starts_with(TEST_PREFIX) {
                found.push(format!("{dir}/{name}"));
            }
        }
    }
    found.extend(leftover_processes());
    found.extend(leftover_guard_routes());
    // The local Kubernetes cluster (`cargo xtask cluster`, run by the real-cluster suite): its
    // daemons, mounts, netns, links, routes, cgroups, pins and run directory.
    found.extend(crate::cluster::leftovers());
    found
}

fn leftover_netns() -> Vec<String> {
    println!("+ ip netns list");
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return vec!["cannot run `ip netns list` to look for network namespaces".to_owned()];
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(TEST_PREFIX))
        .map(|l| format!("network namespace {l}"))
        .collect()
}

/// The IPv6 range of the virtual cluster (`tests/src/cluster/addresses.rs`): while a cluster
/// with IPv6 runs, its test process keeps an `unreachable` route for it in the host netns.
const VIRTUAL_CLUSTER_V6_RANGE: &str = "fd10::/16";

fn leftover_guard_routes() -> Vec<String> {
    let Ok(out) = Command::new("ip")
        .args([
            "-6",
            "route",
            "show",
            "type",
            "unreachable",
            VIRTUAL_CLUSTER_V6_RANGE,
        ])
        .output()
    else {
        return vec!["cannot run `ip -6 route show` to look for guard routes".to_owned()];
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| format!("host route {}", l.trim()))
        .collect()
}

fn leftover_processes() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for pid in entries(Path::new("/proc")) {
        if pid == me || pid.parse::<u32>().is_err() {
            continue;
        }
        // Kernel threads and zombies have an empty cmdline; processes may vanish meanwhile.
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let argv: Vec<String> = raw
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if is_test_process(&argv) {
            found.push(format!("process {pid}: {}", argv.join(" ")));
        }
    }
    found
}

/// A process of the test harness: it mentions a test directory under /tmp, or it is a
/// `ztunnel` whose pin directory is a test one.
pub fn is_test_process(argv: &[String]) -> bool {
    let test_bpf_dir = format!("/sys/fs/bpf/{TEST_PREFIX}");
    if argv
        .iter()
        .any(|a| a.contains(&format!("/tmp/{TEST_PREFIX}")))
    {
        return true;
    }
    let is_ztunnel = argv
        .first()
        .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == "ztunnel"));
    let bpf_dir = argv.iter().enumerate().find_map(|(i, a)| match a.as_str() {
        "--bpf-dir" => argv.get(i + 1).map(String::as_str),
        _ => a.strip_prefix("--bpf-dir="),
    });
    is_ztunnel && bpf_dir.is_some_and(|d| d.starts_with(&test_bpf_dir))
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn dumps_compare_without_timestamps_and_counters() {
        let a = "# Generated by iptables-save v1.8.9 on Sun Nov 22 20:00:00 2026\n*filter\n:INPUT ACCEPT [10:200]\nCOMMIT\n# Completed on Sun Nov 22 20:00:00 2026\n";
        let b = "# Generated by iptables-save v1.8.9 on Sun Nov 22 21:00:00 2026\n*filter\n:INPUT ACCEPT [99:9999]\nCOMMIT\n# Completed on Sun Nov 22 21:00:00 2026\n";
        assert_eq!(normalise_rules(a), normalise_rules(b));
        assert_eq!(normalise_rules(a), "*filter\n:INPUT ACCEPT\nCOMMIT\n");
    }

    #[test]
    fn nft_counter_values_are_dropped() {
        let dump = "table inet t {\n\tchain c {\n\t\tip saddr 10.0.0.1 counter packets 5 bytes 300 drop\n\t\tcounter\n\t}\n}\n";
        assert_eq!(
            normalise_rules(dump),
            "table inet t {\n\tchain c {\n\t\tip saddr 10.0.0.1 counter drop\n\t\tcounter\n\t}\n}\n"
        );
    }

    #[test]
    fn an_added_rule_is_reported_under_its_dump() {
        let before = "## iptables-save\n*filter\n:INPUT ACCEPT\nCOMMIT\n## nft list ruleset\n";
        let after = "## iptables-save\n*filter\n:INPUT ACCEPT\n-A INPUT -j DROP\nCOMMIT\n## nft list ruleset\n";
        assert_eq!(firewall_diff(before, before), None);
        assert_eq!(
            firewall_diff(before, after).unwrap(),
            "  ## iptables-save\n  + -A INPUT -j DROP\n"
        );
    }

    #[test]
    fn a_table_added_after_another_shows_all_its_lines() {
        // A set-based comparison would miss the repeated `COMMIT`.
        let before = "## iptables-save\n*filter\nCOMMIT\n";
        let after = "## iptables-save\n*filter\nCOMMIT\n*nat\nCOMMIT\n";
        assert_eq!(
            firewall_diff(before, after).unwrap(),
            "  ## iptables-save\n  + *nat\n  + COMMIT\n"
        );
        let removed = firewall_diff(after, before).unwrap();
        assert_eq!(removed, "  ## iptables-save\n  - *nat\n  - COMMIT\n");
    }

    #[test]
    fn changed_lines_show_as_removed_then_added() {
        assert_eq!(
            diff_lines("a\nb\nc", "a\nx\nc"),
            [
                Edit::Same("a"),
                Edit::Removed("b"),
                Edit::Added("x"),
                Edit::Same("c")
            ]
        );
    }

    #[test]
    fn test_processes_are_recognised() {
        assert!(is_test_process(&args(
            "/work/main/target/release/ztunnel run --config-dir /tmp/ztt-1-2/n1 --node-name n1"
        )));
        assert!(is_test_process(&args(
            "ztunnel run --bpf-dir /sys/fs/bpf/ztt-1-2-n1"
        )));
        assert!(is_test_process(&args(
            "/usr/bin/ztunnel run --bpf-dir=/sys/fs/bpf/ztt-1-2-n1"
        )));
        assert!(is_test_process(&args(
            "vc-probe serve --log /tmp/ztt-9-1/p.log"
        )));
        // The real node proxy and other tools that merely mention the prefix are not.
        assert!(!is_test_process(&args(
            "ztunnel run --bpf-dir /sys/fs/bpf/ztunnel"
        )));
        assert!(!is_test_process(&args(
            "bpftool prog show pinned /sys/fs/bpf/ztt-1-2-n1/prog_connect4"
        )));
        assert!(!is_test_process(&[]));
    }
}
