//! The same-netns fast path (docs/capture.md, "Fast path"): `zt_fast_path_sockops` puts both
//! ends of each app↔proxy connection into the `fast_path_sockets` SOCKHASH when they are
//! established, and `zt_fast_path_msg`, attached to that map, moves each message one end sends
//! into the other end's receive queue.
//!
//! On: the sock_ops program is linked to the pods' cgroup and, when the proxy runs outside it
//! (the virtual cluster), to the proxy's own cgroup, whose sockets are the proxy's ends; the
//! sk_msg program is attached to the map, which holds the attachment as long as it is pinned.
//! Off: both links are unpinned and the sk_msg program detached, so no new connection joins;
//! connections already on the fast path keep it until they close (taking a socket out of the
//! sockhash would drop the bytes waiting in its redirect queue).
use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{MapData, PerCpuArray, SockHash},
    programs::{links::FdLink, CgroupAttachMode, SkMsg, SockOps},
    Ebpf,
};
use tracing::{info, warn};
use ztunnel_common::{fast_path_stats, maps, pins, programs, SocketKey};

use super::{remove_pin, repin_program, take_map};

/// The fast path's counters (`fast_path_stats`), summed over CPUs.
pub struct FastPathStats(PerCpuArray<MapData, u64>);

impl FastPathStats {
    /// Each counter of [`fast_path_stats::NAMES`], in that order.
    pub fn read(&self) -> Result<[u64; fast_path_stats::COUNT as usize]> {
        let mut out = [0u64; fast_path_stats::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = self
                .0
                .get(&(i as u32), 0)
                .with_context(|| format!("reading {}", maps::FAST_PATH_STATS))?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }
}

/// Sets the fast path up (or down) at load time; returns its counters either way.
pub(super) fn install(
    ebpf: &mut Ebpf,
    bpf_dir: &Path,
    on: bool,
    pods_cgroup: (&File, &Path),
) -> Result<FastPathStats> {
    let sockets: SockHash<MapData, SocketKey> =
        SockHash::try_from(take_map(ebpf, maps::FAST_PATH_SOCKETS)?)?;
    let stats = FastPathStats(PerCpuArray::try_from(take_map(
        ebpf,
        maps::FAST_PATH_STATS,
    )?)?);
    let sock_ops_link = bpf_dir.join(pins::FAST_PATH_SOCK_OPS.link);
    let proxy_link = bpf_dir.join(pins::FAST_PATH_PROXY_LINK);
    let msg_pin = bpf_dir.join(pins::FAST_PATH_MSG.pin);
    if !on {
        // Links first: no new socket joins, then nothing runs on a new socket's sends.
        remove_pin(&sock_ops_link)?;
        remove_pin(&proxy_link)?;
        if msg_pin.exists() {
            let old = SkMsg::from_pin(&msg_pin)
                .with_context(|| format!("opening {}", msg_pin.display()))?;
            let fd = old.fd()?;
            match detach_msg(sockets.fd().as_fd(), fd.as_fd()) {
                Ok(()) => {}
                // Not attached (an earlier start detached it): nothing to do.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "detaching {} from {}",
                            programs::FAST_PATH_MSG,
                            maps::FAST_PATH_SOCKETS
                        )
                    })
                }
            }
            remove_pin(&msg_pin)?;
        }
        remove_pin(&bpf_dir.join(pins::FAST_PATH_SOCK_OPS.program.pin))?;
        info!("fast path off: app↔proxy bytes go through loopback TCP");
        return Ok(stats);
    }

    let msg: &mut SkMsg = ebpf
        .program_mut(programs::FAST_PATH_MSG)
        .ok_or_else(|| anyhow!("program {} missing", programs::FAST_PATH_MSG))?
        .try_into()?;
    msg.load()
        .with_context(|| format!("loading {}", programs::FAST_PATH_MSG))?;
    repin_program(|path| msg.pin(path), &msg_pin)?;
    // Attaching replaces the program a previous run attached; sockets already in the map keep
    // the one they joined with.
    let id = msg.attach(sockets.fd()).with_context(|| {
        format!(
            "attaching {} to {}",
            programs::FAST_PATH_MSG,
            maps::FAST_PATH_SOCKETS
        )
    })?;
    // The attachment belongs to the pinned map from here on (as the pinned links belong to their
    // cgroup): a restart keeps the fast path of the connections that outlive this process.
    std::mem::forget(msg.take_link(id)?);

    let ops: &mut SockOps = ebpf
        .program_mut(programs::FAST_PATH_SOCK_OPS)
        .ok_or_else(|| anyhow!("program {} missing", programs::FAST_PATH_SOCK_OPS))?
        .try_into()?;
    ops.load()
        .with_context(|| format!("loading {}", programs::FAST_PATH_SOCK_OPS))?;
    repin_program(
        |path| ops.pin(path),
        &bpf_dir.join(pins::FAST_PATH_SOCK_OPS.program.pin),
    )?;
    let (cgroup, cgroup_path) = pods_cgroup;
    link_sock_ops(ops, cgroup, cgroup_path, &sock_ops_link)?;
    warn!(
        "the fast path has no flow control yet: a reader slower than its writer lets the \
         kernel's queue grow without bound (docs/capture.md); use it for measurements only"
    );
    match own_cgroup_outside(cgroup_path) {
        Ok(Some(own)) => {
            let file = File::open(&own).with_context(|| format!("opening {}", own.display()))?;
            link_sock_ops(ops, &file, &own, &proxy_link)?;
            info!(proxy_cgroup = %own.display(),
                "fast path on (also for the proxy's own cgroup, which is outside --cgroup)");
        }
        Ok(None) => {
            remove_pin(&proxy_link)?;
            info!("fast path on");
        }
        Err(e) => {
            // Without it the proxy's ends never join: connections stay on loopback TCP.
            warn!(error = %format!("{e:#}"),
                "cannot tell the proxy's own cgroup: the fast path may not apply");
        }
    }
    Ok(stats)
}

/// Links the sock_ops program to a cgroup and pins the link, replacing a previous run's
/// (after the new one is attached: a connection established in between still joins).
fn link_sock_ops(ops: &mut SockOps, cgroup: &File, path: &Path, pin: &Path) -> Result<()> {
    let id = ops
        .attach(cgroup, CgroupAttachMode::Single)
        .with_context(|| {
            format!(
                "attaching {} to {}",
                programs::FAST_PATH_SOCK_OPS,
                path.display()
            )
        })?;
    let link: FdLink = ops.take_link(id)?.try_into()?;
    remove_pin(pin)?;
    link.pin(pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}

/// This process's cgroup v2 directory if it is not at or below `pods` (then the proxy's
/// sockets are outside the pods' cgroup and need their own link).
fn own_cgroup_outside(pods: &Path) -> Result<Option<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| anyhow!("/proc/self/cgroup has no cgroup v2 entry"))?;
    let own = super::cgroup2_root()?.join(rel.trim_start_matches('/'));
    let own = own
        .canonicalize()
        .with_context(|| format!("resolving {}", own.display()))?;
    let pods = pods
        .canonicalize()
        .with_context(|| format!("resolving {}", pods.display()))?;
    Ok((!own.starts_with(&pods)).then_some(own))
}

/// `BPF_PROG_DETACH` of an sk_msg program from a sockmap (aya detaches only the attachments it
/// made in this process).
fn detach_msg(map: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    const BPF_PROG_DETACH: libc::c_long = 9;
    const BPF_SK_MSG_VERDICT: u32 = 7;
    // The prefix of `union bpf_attr` these commands read; the kernel wants the rest zero.
    #[repr(C)]
    struct Attr {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
        replace_bpf_fd: u32,
        zero: [u32; 11],
    }
    let attr = Attr {
        target_fd: map.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_SK_MSG_VERDICT,
        attach_flags: 0,
        replace_bpf_fd: 0,
        zero: [0; 11],
    };
    // SAFETY: a valid attribute block of the size passed; the fds outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_DETACH,
            &attr as *const Attr,
            std::mem::size_of::<Attr>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
