//! What a node proxy has pinned, read back from the kernel: for the admin `/bpf` page,
//! `ztunnel bpf status` and the per-program metrics. Only reads; works on the pins of a proxy
//! that is not running (or of another proxy's directory) as well.
use std::{
    ffi::CString,
    fs,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    os::unix::ffi::OsStrExt,
    path::Path,
    time::Duration,
};

use aya::{maps::MapInfo, programs::ProgramInfo};
use serde::Serialize;
use ztunnel_common::pins;

/// A pinned program and the kernel's statistics for it.
#[derive(Clone, Debug, Serialize)]
pub struct PinnedProgram {
    /// Path relative to the pin directory (`prog_connect4`).
    pub pin: String,
    pub id: u32,
    pub name: String,
    pub kind: String,
    /// Runs and time in the program; counted only while BPF statistics are on.
    pub run_count: u64,
    #[serde(serialize_with = "nanos")]
    pub run_time: Duration,
    pub verified_instructions: Option<u32>,
}

/// A pinned map and how full it is.
#[derive(Clone, Debug, Serialize)]
pub struct PinnedMap {
    pub pin: String,
    pub id: u32,
    pub name: String,
    pub kind: String,
    pub max_entries: u32,
    /// `None` for maps whose keys cannot be walked (arrays are always full).
    pub entries: Option<u64>,
}

/// A pinned link: what program it attaches, and where.
#[derive(Clone, Debug, Serialize)]
pub struct PinnedLink {
    pub pin: String,
    pub id: u32,
    pub program_id: u32,
    /// `cgroup id N` or `netns inode N`.
    pub target: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Inventory {
    pub programs: Vec<PinnedProgram>,
    pub maps: Vec<PinnedMap>,
    pub links: Vec<PinnedLink>,
    /// Pins that could not be read, with why.
    pub errors: Vec<String>,
    pub stats_enabled: bool,
}

fn nanos<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_nanos() as u64)
}

/// Whether the kernel counts program runs (`kernel.bpf_stats_enabled`).
pub fn stats_enabled() -> bool {
    fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() == "1")
}

/// Pins of `dir` (and `dir/pods`), relative paths, sorted.
fn pins(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["", pins::PODS_DIR] {
        let Ok(entries) = fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                let name = e.file_name().to_string_lossy().into_owned();
                out.push(if sub.is_empty() {
                    name
                } else {
                    format!("{sub}/{name}")
                });
            }
        }
    }
    out.sort();
    out
}

/// The pod (`namespace_pod`) whose sk_lookup link `pin` is, if it is one.
pub fn pod_link(pin: &str) -> Option<&str> {
    pin.strip_prefix(pins::PODS_DIR)?.strip_prefix('/')
}

/// The pinned programs of `dir`, with their statistics.
pub fn programs(dir: &Path) -> Vec<PinnedProgram> {
    pins(dir)
        .into_iter()
        .filter(|p| p.starts_with(pins::PROGRAM_PREFIX))
        .filter_map(|pin| program(dir, pin).ok())
        .collect()
}

fn program(dir: &Path, pin: String) -> Result<PinnedProgram, String> {
    let info = ProgramInfo::from_pin(dir.join(&pin)).map_err(|e| format!("{pin}: {e}"))?;
    Ok(PinnedProgram {
        id: info.id(),
        name: info.name_as_str().unwrap_or_default().to_owned(),
        kind: format!("{:?}", info.program_type()),
        run_count: info.run_count(),
        run_time: info.run_time(),
        verified_instructions: info.verified_instruction_count(),
        pin,
    })
}

/// Everything pinned in `dir`.
pub fn inventory(dir: &Path) -> Inventory {
    let mut inv = Inventory {
        stats_enabled: stats_enabled(),
        ..Default::default()
    };
    for pin in pins(dir) {
        let result = if pin.starts_with(pins::PROGRAM_PREFIX) {
            program(dir, pin).map(|p| inv.programs.push(p))
        } else if pin.starts_with(pins::LINK_PREFIX) || pod_link(&pin).is_some() {
            link(dir, pin).map(|l| inv.links.push(l))
        } else {
            map(dir, pin).map(|m| inv.maps.push(m))
        };
        if let Err(e) = result {
            inv.errors.push(e);
        }
    }
    inv
}

fn map(dir: &Path, pin: String) -> Result<PinnedMap, String> {
    let info = MapInfo::from_pin(dir.join(&pin)).map_err(|e| format!("{pin}: {e}"))?;
    let kind = info
        .map_type()
        .map(|t| format!("{t:?}"))
        .unwrap_or_else(|_| "unknown".into());
    let entries = if kind.contains("Array") {
        None
    } else {
        info.fd()
            .ok()
            .and_then(|fd| count_keys(fd.as_fd().as_raw_fd(), info.key_size()))
    };
    Ok(PinnedMap {
        id: info.id(),
        name: info.name_as_str().unwrap_or_default().to_owned(),
        kind,
        max_entries: info.max_entries(),
        entries,
        pin,
    })
}

/// `bpf(2)`; `attr` is the command's part of `union bpf_attr`.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, correctly sized struct of the layout `cmd` expects.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// Walks a hash-like map's keys (without reading values) to count them.
fn count_keys(fd: RawFd, key_size: u32) -> Option<u64> {
    #[repr(C)]
    struct NextKey {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut count = 0u64;
    let mut first = true;
    loop {
        let mut attr = NextKey {
            map_fd: fd as u32,
            _pad: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                count += 1;
                std::mem::swap(&mut key, &mut next);
                first = false;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Some(count),
            Err(_) => return None,
        }
        // A map that changes while it is walked can restart; do not loop forever.
        if count > 10_000_000 {
            return None;
        }
    }
}

fn link(dir: &Path, pin: String) -> Result<PinnedLink, String> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    /// `struct bpf_link_info`: type, id, prog_id, then a union by link type.
    #[repr(C)]
    struct LinkInfo {
        kind: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        union: [u8; 48],
    }
    const CGROUP: u32 = 3; // BPF_LINK_TYPE_CGROUP
    const NETNS: u32 = 5; // BPF_LINK_TYPE_NETNS

    let path = CString::new(dir.join(&pin).as_os_str().as_bytes())
        .map_err(|_| format!("{pin}: bad path"))?;
    let mut get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut get).map_err(|e| format!("{pin}: {e}"))?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut info = LinkInfo {
        kind: 0,
        id: 0,
        prog_id: 0,
        _pad: 0,
        union: [0; 48],
    };
    let mut by_fd = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut by_fd).map_err(|e| format!("{pin}: {e}"))?;
    let u = &info.union;
    let target = match info.kind {
        CGROUP => format!(
            "cgroup id {}",
            u64::from_ne_bytes(u[..8].try_into().unwrap_or_default())
        ),
        NETNS => format!(
            "netns inode {}",
            u32::from_ne_bytes(u[..4].try_into().unwrap_or_default())
        ),
        other => format!("link type {other}"),
    };
    Ok(PinnedLink {
        pin,
        id: info.id,
        program_id: info.prog_id,
        target,
    })
}
