//! What the benchmark binaries (`bench`, `scale-bench`) share: reading a process's memory,
//! recording the commit measured, writing the JSON results.
use std::{fs, path::Path, path::PathBuf, process::Command};

use anyhow::{anyhow, Context as _, Result};
use serde_json::{json, Value};

/// VmRSS of `pid` in KiB (/proc/<pid>/status).
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading the status of pid {pid}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// Where a process's resident memory is, in KiB, by kind of mapping (/proc/<pid>/smaps): the
/// executable's code (`text`), its read-only data (`rodata`: .rodata, .eh_frame,
/// .gcc_except_table and, after start-up, RELRO), its writable data (`data`), `heap` (brk),
/// other anonymous memory (`anon`: an allocator's mmapped arenas, thread stacks, .bss),
/// the main thread's `stack`, shared libraries (`libs`), BPF maps mmapped into the process
/// (`bpf_maps`), and the rest (`other`: vdso, vvar). `rss` is their sum.
pub fn rss_by_mapping(pid: u32) -> Result<Value> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .with_context(|| format!("reading /proc/{pid}/exe"))?;
    let exe = exe.to_string_lossy();
    Ok(classify_smaps(&smaps, exe.trim_end_matches(" (deleted)")))
}

fn classify_smaps(smaps: &str, exe: &str) -> Value {
    const KINDS: [&str; 9] = [
        "text", "rodata", "data", "heap", "anon", "stack", "libs", "bpf_maps", "other",
    ];
    let mut kib = [0u64; KINDS.len()];
    let mut kind = None;
    for line in smaps.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            if let (Some(k), Ok(v)) = (
                kind,
                rss.trim().trim_end_matches("kB").trim().parse::<u64>(),
            ) {
                kib[k] += v;
            }
            continue;
        }
        // A mapping's header is `start-end perms offset dev inode [path]`; its fields are
        // `Name: value` lines.
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 5 || fields[0].ends_with(':') || !fields[0].contains('-') {
            continue;
        }
        let perms = fields[1];
        let path = fields[5..].join(" ");
        let path = path.trim_end_matches(" (deleted)");
        let name = if path == exe {
            if perms.contains('x') {
                "text"
            } else if perms.starts_with("rw") {
                "data"
            } else {
                "rodata"
            }
        } else {
            match path {
                "" => "anon",
                "[heap]" => "heap",
                "[stack]" => "stack",
                p if p.contains("bpf-map") => "bpf_maps",
                p if p.starts_with('/') => "libs",
                _ => "other",
            }
        };
        kind = KINDS.iter().position(|k| *k == name);
    }
    let mut out: serde_json::Map<String, Value> = KINDS
        .iter()
        .zip(kib)
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    out.insert("rss".to_owned(), json!(kib.iter().sum::<u64>()));
    Value::Object(out)
}

/// The commit measured and how many files of the work tree differ from it.
pub fn git_state() -> Value {
    let root = crate::workspace_root();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    json!({
        "head": git(&["log", "--oneline", "-1"]),
        "changed_files": git(&["status", "--porcelain"]).map(|s| s.lines().count()),
    })
}

/// Writes `v` as `dir/<kind>-<unix_time>.json` and the same content as `dir/<latest>`, where
/// `latest` is `latest.json` for the traffic bench and `<kind>-latest.json` for the others.
pub fn write_json(dir: &Path, kind: &str, unix_time: u64, v: &Value) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = serde_json::to_string_pretty(v)? + "\n";
    let file = dir.join(format!("{kind}-{unix_time}.json"));
    fs::write(&file, &text).with_context(|| format!("writing {}", file.display()))?;
    let latest = match kind {
        "bench" => dir.join("latest.json"),
        other => dir.join(format!("{other}-latest.json")),
    };
    fs::write(&latest, &text).with_context(|| format!("writing {}", latest.display()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_mappings_are_charged_to_their_kind() {
        let smaps = "\
55a0-55a8 r--p 00000000 fe:00 11  /usr/local/bin/ztunnel
Size:                 32 kB
Rss:                  20 kB
55a8-55b8 r-xp 00008000 fe:00 11  /usr/local/bin/ztunnel
Rss:                 100 kB
55b8-55c0 rw-p 00018000 fe:00 11  /usr/local/bin/ztunnel
Rss:                   8 kB
55c0-55d0 rw-p 00000000 00:00 0  [heap]
Rss:                  64 kB
7f00-7f10 rw-p 00000000 00:00 0 
Rss:                 128 kB
7f10-7f12 rw-s 00000000 00:0e 9  anon_inode:bpf-map
Rss:                   4 kB
7f20-7f30 r-xp 00000000 fe:00 12  /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                  40 kB
7ffd-7ffe rw-p 00000000 00:00 0  [stack]
Rss:                  12 kB
7fff-7fff r-xp 00000000 00:00 0  [vdso]
Rss:                   4 kB
";
        let v = classify_smaps(smaps, "/usr/local/bin/ztunnel");
        let kib = |k: &str| v[k].as_u64().unwrap();
        assert_eq!(
            [
                kib("rodata"),
                kib("text"),
                kib("data"),
                kib("heap"),
                kib("anon")
            ],
            [20, 100, 8, 64, 128]
        );
        assert_eq!(
            [kib("bpf_maps"), kib("libs"), kib("stack"), kib("other")],
            [4, 40, 12, 4]
        );
        assert_eq!(kib("rss"), 380);
    }
}
