//! The return path of inbound deliveries that keep the caller's address (docs/capture.md,
//! "Inbound delivery"): inside an enrolled pod's netns, the application's replies to a caller
//! that is not local must come back to the proxy's socket over `lo` instead of following the
//! pod's default route out. Three pieces of kernel state, no iptables:
//!
//! * `net.ipv4.tcp_fwmark_accept = 1`: a connection the application accepts takes the mark of
//!   its SYN, which the proxy's socket set to [`DELIVERY_MARK`] (the SYN-ACK included);
//! * the rule `fwmark DELIVERY_MARK lookup DELIVERY_ROUTE_TABLE` (IPv4, and IPv6 for a pod
//!   with IPv6 addresses), priority [`DELIVERY_RULE_PRIORITY`];
//! * in that table, `local default dev lo`: every marked packet is delivered locally, where
//!   the proxy's transparent socket takes it.
//!
//! One [`ReturnPath`] per netns, shared by the pod's enrolment and every connection delivered
//! through it; the state is removed when the last of them lets go, so connections that outlive
//! their pod's enrolment keep working. Setting it up is idempotent: a restarted proxy finds
//! the state its predecessor left and keeps it.
use std::{
    io::{self, Read as _, Seek as _, Write as _},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use tracing::{debug, warn};
use ztunnel_common::{
    DELIVERY_MARK, DELIVERY_ROUTE_TABLE, DELIVERY_RULE_PRIORITY, LOOPBACK_IFINDEX,
};

use crate::netns::Netns;

/// The sysctl the application's accepted sockets inherit the SYN's mark through, below
/// `/proc/sys` (whose `net/` shows the netns of the thread that opens it).
const FWMARK_ACCEPT: &str = "net/ipv4/tcp_fwmark_accept";

/// The return path of one pod netns, installed; removed when dropped.
#[derive(Debug)]
pub struct ReturnPath {
    netns: Arc<Netns>,
    home: Arc<Netns>,
    v4: bool,
    v6: bool,
    /// What `tcp_fwmark_accept` goes back to on removal: its value before, or the kernel's
    /// default when the state was already there (left by a previous proxy, which set it).
    fwmark_accept_after: u8,
    /// Left in place when dropped: the next proxy process takes it over.
    handed_over: AtomicBool,
    /// The sysctl's path.
    sysctl: PathBuf,
}

impl ReturnPath {
    /// Installs the return path for the families a pod has (`v4`, `v6`) in `netns`.
    pub fn install(
        netns: Arc<Netns>,
        home: Arc<Netns>,
        proc_sys: &Path,
        (v4, v6): (bool, bool),
    ) -> io::Result<Self> {
        let path = proc_sys.join(FWMARK_ACCEPT);
        let (rtnl, mut sysctl) = netns.run(&home, || -> io::Result<_> {
            Ok((Rtnl::open()?, sysctl_file(&path)?))
        })??;
        let before = read_sysctl(&mut sysctl)?;
        // From here on, a failure drops it, which removes what was added.
        let mut installed = Self {
            netns,
            home,
            v4,
            v6,
            fwmark_accept_after: before,
            handed_over: AtomicBool::new(false),
            sysctl: path,
        };
        let mut found = false;
        for (family, wanted) in [(libc::AF_INET, v4), (libc::AF_INET6, v6)] {
            if wanted {
                found |= rtnl.route(family, true)?;
                found |= rtnl.rule(family, true)?;
            }
        }
        if found {
            installed.fwmark_accept_after = 0;
        }
        write_sysctl(&mut sysctl, 1)?;
        debug!(netns = %installed.netns.path().display(), v4, v6, "inbound return path installed");
        Ok(installed)
    }

    /// Leaves the state in place when the last user drops it: a restart, whose next process
    /// finds it and keeps using it (removing it then would cut the new process's deliveries).
    pub fn hand_over(&self) {
        self.handed_over.store(true, Ordering::Relaxed);
    }

    /// Whether replies of `ip`'s family come back (the pod has an address of that family).
    pub fn covers(&self, ip: std::net::IpAddr) -> bool {
        match ip {
            std::net::IpAddr::V4(_) => self.v4,
            std::net::IpAddr::V6(_) => self.v6,
        }
    }

    fn remove(&self) -> io::Result<()> {
        let (rtnl, mut sysctl) = self.netns.run(&self.home, || -> io::Result<_> {
            Ok((Rtnl::open()?, sysctl_file(&self.sysctl)?))
        })??;
        // The sysctl first: from here on no new connection takes the mark.
        write_sysctl(&mut sysctl, self.fwmark_accept_after)?;
        for (family, wanted) in [(libc::AF_INET, self.v4), (libc::AF_INET6, self.v6)] {
            if wanted {
                rtnl.rule(family, false)?;
                rtnl.route(family, false)?;
            }
        }
        Ok(())
    }
}

impl Drop for ReturnPath {
    fn drop(&mut self) {
        if self.handed_over.load(Ordering::Relaxed) {
            return;
        }
        match self.remove() {
            Ok(()) => debug!(netns = %self.netns.path().display(), "inbound return path removed"),
            Err(e) => warn!(netns = %self.netns.path().display(), error = %e,
                "cannot remove the inbound return path from the pod netns"),
        }
    }
}

fn sysctl_file(path: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))
}

fn read_sysctl(f: &mut std::fs::File) -> io::Result<u8> {
    let mut text = String::new();
    f.rewind()?;
    f.read_to_string(&mut text)?;
    text.trim()
        .parse()
        .map_err(|_| io::Error::other(format!("{FWMARK_ACCEPT} reads {text:?}")))
}

fn write_sysctl(f: &mut std::fs::File, value: u8) -> io::Result<()> {
    f.rewind()?;
    f.write_all(format!("{value}\n").as_bytes())
}

/// A route netlink socket bound to the netns it was opened in.
struct Rtnl {
    fd: OwnedFd,
}

const NLMSG_ERROR: u16 = 2;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RT_TABLE_UNSPEC: u8 = 0;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RT_SCOPE_NOWHERE: u8 = 255;
const RTN_LOCAL: u8 = 2;
const FR_ACT_TO_TBL: u8 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;

impl Rtnl {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Adds (or removes) `local default dev lo table DELIVERY_ROUTE_TABLE`; returns whether
    /// an add found it already there.
    fn route(&self, family: i32, add: bool) -> io::Result<bool> {
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        // A removal matches any scope.
        let scope = if add { RT_SCOPE_HOST } else { RT_SCOPE_NOWHERE };
        let mut body = vec![family as u8, 0, 0, 0, RT_TABLE_UNSPEC, RTPROT_STATIC, scope];
        body.push(RTN_LOCAL);
        body.extend(0u32.to_ne_bytes());
        attr(&mut body, RTA_TABLE, &DELIVERY_ROUTE_TABLE.to_ne_bytes());
        attr(&mut body, RTA_OIF, &LOOPBACK_IFINDEX.to_ne_bytes());
        let kind = if add { RTM_NEWROUTE } else { RTM_DELROUTE };
        self.request(kind, add, &body)
    }

    /// Adds (or removes) `fwmark DELIVERY_MARK lookup DELIVERY_ROUTE_TABLE`; returns whether
    /// an add found it already there.
    fn rule(&self, family: i32, add: bool) -> io::Result<bool> {
        // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags.
        let mut body = vec![family as u8, 0, 0, 0, RT_TABLE_UNSPEC, 0, 0, FR_ACT_TO_TBL];
        body.extend(0u32.to_ne_bytes());
        attr(
            &mut body,
            FRA_PRIORITY,
            &DELIVERY_RULE_PRIORITY.to_ne_bytes(),
        );
        attr(&mut body, FRA_FWMARK, &DELIVERY_MARK.to_ne_bytes());
        attr(&mut body, FRA_FWMASK, &u32::MAX.to_ne_bytes());
        attr(&mut body, FRA_TABLE, &DELIVERY_ROUTE_TABLE.to_ne_bytes());
        let kind = if add { RTM_NEWRULE } else { RTM_DELRULE };
        self.request(kind, add, &body)
    }

    /// Sends one request and reads its acknowledgement. An add of what exists and a removal
    /// of what does not are success (the first returns `true`).
    fn request(&self, kind: u16, add: bool, body: &[u8]) -> io::Result<bool> {
        let flags = NLM_F_REQUEST | NLM_F_ACK | if add { NLM_F_CREATE | NLM_F_EXCL } else { 0 };
        let len = 16 + body.len() as u32;
        let mut msg = Vec::with_capacity(len as usize);
        msg.extend(len.to_ne_bytes());
        msg.extend(kind.to_ne_bytes());
        msg.extend(flags.to_ne_bytes());
        msg.extend(1u32.to_ne_bytes()); // sequence
        msg.extend(0u32.to_ne_bytes()); // port id: the kernel
        msg.extend_from_slice(body);
        // SAFETY: send(2) of an initialised buffer on our socket (to the kernel, pid 0, by
        // default for an unbound netlink socket).
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply = [0u8; 1024];
        // SAFETY: recv(2) into a buffer we own, of its length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                reply.as_mut_ptr().cast(),
                reply.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        let word = |at: usize| {
            reply
                .get(at..at + 4)
                .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
        };
        let msg_type = reply
            .get(4..6)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
            .filter(|_| n >= 20);
        if msg_type != Some(NLMSG_ERROR) {
            return Err(io::Error::other("unexpected netlink reply"));
        }
        let errno = -(word(16).unwrap_or(0) as i32);
        match errno {
            0 => Ok(false),
            libc::EEXIST if add => Ok(true),
            libc::ENOENT | libc::ESRCH if !add => Ok(false),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// Appends one netlink attribute, padded to 4 bytes.
fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend((len as u16).to_ne_bytes());
    buf.extend(kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len() + (len.next_multiple_of(4) - len), 0);
}
