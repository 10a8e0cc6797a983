//! The virtual cluster's address plan, per IP family, and the host route that keeps its IPv6
//! ranges on this machine.
//!
//! ```text
//!               IPv4                 IPv6 (ULA, inside the test netns only)
//!  underlay     10.255.0.<i>/24      fd10:ff::<i>/64
//!  pod j, node i 10.<i>.0.<j+2>/32   fd10:<i>::<j+2>/128
//!  Service n    10.96.0.<10+n>       fd10:96::<10+n>
//!  pod gateway  169.254.1.1          fe80::1 (both resolve to the node veth's MAC)
//! ```
//! The host's own IPv6 network (`fd00::/64` on this machine) is not inside `fd10::/16`.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Mutex,
};

use anyhow::Result;

use crate::process::host;

/// An IP family of the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// Node `i`'s address on the underlay.
    pub fn node_ip(self, i: usize) -> IpAddr {
        match self {
            Self::V4 => Ipv4Addr::new(10, 255, 0, i as u8).into(),
            Self::V6 => Ipv6Addr::new(0xfd10, 0xff, 0, 0, 0, 0, 0, i as u16).into(),
        }
    }

    /// The prefix length of the underlay subnet.
    pub fn underlay_prefix_len(self) -> u8 {
        match self {
            Self::V4 => 24,
            Self::V6 => 64,
        }
    }

    /// The `j`-th pod (from 0) of node `i`.
    pub fn pod_ip(self, i: usize, j: usize) -> IpAddr {
        match self {
            Self::V4 => Ipv4Addr::new(10, i as u8, 0, (j + 2) as u8).into(),
            Self::V6 => Ipv6Addr::new(0xfd10, i as u16, 0, 0, 0, 0, 0, (j + 2) as u16).into(),
        }
    }

    /// The pod range of node `i`, as a route destination.
    pub fn node_pod_range(self, i: usize) -> String {
        match self {
            Self::V4 => format!("10.{i}.0.0/24"),
            Self::V6 => format!("fd10:{i:x}::/64"),
        }
    }

    /// The cluster IP of the `n`-th Service (from 0).
    pub fn service_vip(self, n: usize) -> IpAddr {
        match self {
            Self::V4 => Ipv4Addr::new(10, 96, 0, (10 + n) as u8).into(),
            Self::V6 => Ipv6Addr::new(0xfd10, 0x96, 0, 0, 0, 0, 0, (10 + n) as u16).into(),
        }
    }

    /// A pod's default gateway (an address nobody has: pods resolve it to the node veth's MAC).
    pub fn gateway(self) -> &'static str {
        match self {
            Self::V4 => "169.254.1.1",
            Self::V6 => "fe80::1",
        }
    }

    /// The longest prefix of an address of this family.
    pub fn host_prefix_len(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// `ip:port` as a socket address is written (`[v6]:port`).
pub fn socket_addr(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// Every IPv6 address of the plan is inside this range.
pub const V6_RANGE: &str = "fd10::/16";

/// Holders of the host's guard route, in this process.
static GUARD_USERS: Mutex<usize> = Mutex::new(0);

/// While alive, the host netns has `unreachable fd10::/16 metric <pid>`: a process outside
/// the cluster's namespaces that dials a cluster IPv6 address gets `EHOSTUNREACH` instead of
/// following the host's IPv6 default route. One route per test process (concurrent test
/// processes each add their own, told apart by the metric); removed when the last cluster of
/// this process that uses IPv6 drops, and swept with the other leftovers of a crashed run.
pub struct HostGuard(());

impl HostGuard {
    pub fn take() -> Result<Self> {
        let mut users = GUARD_USERS.lock().unwrap_or_else(|p| p.into_inner());
        if *users == 0 {
            let pid = std::process::id();
            // A route left by a crashed process that had this pid would make `add` fail.
            let _ = guard_route("del", pid);
            guard_route("add", pid)?;
        }
        *users += 1;
        Ok(Self(()))
    }
}

impl Drop for HostGuard {
    fn drop(&mut self) {
        let mut users = GUARD_USERS.lock().unwrap_or_else(|p| p.into_inner());
        *users -= 1;
        if *users == 0 {
            remove_guard(std::process::id());
        }
    }
}

/// `ip -6 route <op> unreachable fd10::/16 metric <pid>` in the host netns.
fn guard_route(op: &str, pid: u32) -> Result<()> {
    let metric = pid.to_string();
    host(
        "ip",
        &[
            "-6",
            "route",
            op,
            "unreachable",
            V6_RANGE,
            "metric",
            &metric,
        ],
    )
    .map(drop)
}

fn remove_guard(pid: u32) {
    if let Err(e) = guard_route("del", pid) {
        eprintln!("ztunnel-tests: removing the host route unreachable {V6_RANGE}: {e:#}");
    }
}

/// The pids whose guard route is in the host netns.
pub fn guard_route_owners() -> Vec<u32> {
    let Ok(out) = host(
        "ip",
        &["-6", "route", "show", "type", "unreachable", V6_RANGE],
    ) else {
        return Vec::new();
    };
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "metric")?;
            words.next()?.parse().ok()
        })
        .collect()
}

/// Removes the guard routes of processes that are gone.
pub fn sweep_stale_guards() {
    for pid in guard_route_owners() {
        if !crate::cleanup::pid_alive(pid) {
            remove_guard(pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_keeps_families_apart_and_v6_inside_its_range() {
        assert_eq!(Family::V4.pod_ip(2, 0).to_string(), "10.2.0.2");
        assert_eq!(Family::V6.pod_ip(2, 0).to_string(), "fd10:2::2");
        assert_eq!(Family::V6.node_ip(1).to_string(), "fd10:ff::1");
        assert_eq!(Family::V6.service_vip(0).to_string(), "fd10:96::a");
        assert_eq!(Family::V6.node_pod_range(12), "fd10:c::/64");
        assert_eq!(socket_addr(Family::V6.pod_ip(1, 1), 80), "[fd10:1::3]:80");
        for ip in [
            Family::V6.pod_ip(250, 250),
            Family::V6.node_ip(250),
            Family::V6.service_vip(100),
        ] {
            let IpAddr::V6(v6) = ip else { unreachable!() };
            assert_eq!(v6.segments()[0], 0xfd10, "{ip} is outside {V6_RANGE}");
        }
    }
}
