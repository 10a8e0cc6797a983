//! `ztunnel bpf status`: what a node proxy has pinned, read back from the kernel, for people
//! (text) or programs (JSON).
use anyhow::Result;
use ztunnel_common::{maps, pins};

use super::Output;
use crate::capture;

pub fn status(dir: &std::path::Path, output: Output) -> Result<()> {
    use capture::inventory::inventory;
    if !dir.is_dir() {
        anyhow::bail!(
            "{} does not exist: no node proxy has pinned its state there (see --bpf-dir)",
            dir.display()
        );
    }
    let inv = inventory(dir);
    if matches!(output, Output::Json) {
        println!("{}", serde_json::to_string_pretty(&inv)?);
        return Ok(());
    }
    let d = dir.display();
    println!("pin directory {d}");
    println!(
        "eBPF run statistics: {}",
        if inv.stats_enabled {
            "on (kernel.bpf_stats_enabled=1)"
        } else {
            "off by the sysctl (a proxy started with --bpf-stats may hold them on; \
             `sysctl -w kernel.bpf_stats_enabled=1` turns them on for everyone)"
        }
    );
    println!("\nprograms");
    for p in &inv.programs {
        let avg = (p.run_time.as_nanos() as u64)
            .checked_div(p.run_count)
            .map(|ns| format!("{ns} ns/run"))
            .unwrap_or_else(|| "-".into());
        println!(
            "  {:<20} id {:<6} {:<16} {:>10} runs  {avg}",
            p.pin, p.id, p.kind, p.run_count
        );
    }
    println!("\nlinks");
    for l in &inv.links {
        println!(
            "  {:<40} id {:<6} program {:<6} {}",
            l.pin, l.id, l.program_id, l.target
        );
    }
    println!("\nmaps");
    for m in &inv.maps {
        let entries = m
            .entries
            .map(|e| e.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "  {:<20} id {:<6} {:<12} {:>6} / {} entries",
            m.pin, m.id, m.kind, entries, m.max_entries
        );
    }
    let enrolled: Vec<&str> = inv
        .links
        .iter()
        .filter_map(|l| capture::inventory::pod_link(&l.pin))
        .collect();
    println!(
        "\nenrolled pods ({}, by their sk_lookup link; namespace_pod)",
        enrolled.len()
    );
    for p in &enrolled {
        println!("  {p}");
    }
    for e in &inv.errors {
        println!("\ncannot read {e}");
    }
    let (connect4, sk_lookup) = (pins::CONNECT4, pins::SK_LOOKUP);
    println!(
        "\ndig deeper (run_time_ns and run_cnt show while statistics are on):\n  \
         bpftool prog show pinned {d}/{}\n  \
         bpftool map dump pinned {d}/{}\n  \
         bpftool link show pinned {d}/{}\n  \
         bpftool cgroup tree\n  \
         bpftool prog profile pinned {d}/{} duration 5 cycles instructions \
         (needs a bpftool built with clang skeletons; Debian 12's is not)",
        connect4.program.pin,
        maps::ENROLLED_NETNS,
        connect4.link,
        sk_lookup.pin,
    );
    Ok(())
}
