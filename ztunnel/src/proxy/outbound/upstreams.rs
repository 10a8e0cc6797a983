//! What the source side remembers about the destinations it routes requests to, across
//! connections: the position of each route's weighted split, each destination's load-balancing
//! state, the endpoints outlier detection has ejected, and the connection pool's use. One
//! [`Destination`] per (Service, subset, port), made on first use and kept while it is used.
use std::{
    collections::HashMap,
    hash::{BuildHasher as _, Hasher as _, RandomState},
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use crate::traffic::{LoadBalancer, OutlierDetection};

/// The node's memory of its routed destinations.
#[derive(Default)]
pub struct Upstreams {
    /// By `source workload|cluster name`.
    destinations: Mutex<HashMap<String, Arc<Destination>>>,
    /// Each route's smooth weighted round-robin state, by `source workload|vs|route`.
    splits: Mutex<HashMap<String, Vec<i64>>>,
}

impl Upstreams {
    pub fn destination(&self, key: &str) -> Arc<Destination> {
        let mut d = self.destinations.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(dest) = d.get(key) {
            return dest.clone();
        }
        // Forget what nothing uses any more (a pod or cluster gone) before growing.
        if d.len() >= 1024 {
            d.retain(|_, v| Arc::strong_count(v) > 1);
        }
        d.entry(key.to_owned()).or_default().clone()
    }

    /// The index of the destination this request goes to, out of `weights`: a smooth weighted
    /// round-robin (nginx's), so 80/20 is exactly 4 in 5 over every 5 requests. Weights that do
    /// not add up to 100 split by their total; all zero means the first.
    pub fn split(&self, route: &str, weights: &[u32]) -> usize {
        if weights.len() <= 1 {
            return 0;
        }
        let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
        if total == 0 {
            return 0;
        }
        let mut splits = self.splits.lock().unwrap_or_else(|p| p.into_inner());
        let current = splits.entry(route.to_owned()).or_default();
        if current.len() != weights.len() {
            *current = vec![0; weights.len()];
        }
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += i64::from(*w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        best
    }
}

/// One destination's load-balancing, health and pool state.
#[derive(Default)]
pub struct Destination {
    round_robin: AtomicUsize,
    /// Requests in flight per endpoint (LEAST_REQUEST), and outlier state.
    endpoints: Mutex<HashMap<SocketAddr, EndpointState>>,
    /// Upstream connections open now (`tcp.maxConnections`).
    pub connections: Arc<AtomicUsize>,
    /// Requests sent and not yet answered (`http2MaxRequests`).
    pub in_flight: AtomicUsize,
    /// Requests waiting for one of the `maxConnections` (`http1MaxPendingRequests`).
    pub pending: AtomicUsize,
    pub ejections: AtomicU64,
}

#[derive(Default)]
struct EndpointState {
    in_flight: usize,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
}

/// How an attempt to an endpoint ended, as outlier detection counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// 500 and other 5xx that are not gateway errors.
    Error5xx,
    /// 502, 503, 504: Envoy's gateway errors.
    GatewayError,
    /// No response: no connection, a reset, a timeout (Envoy's local-origin failures).
    LocalFailure,
}

impl Outcome {
    pub fn of_status(status: u16) -> Self {
        match status {
            502..=504 => Outcome::GatewayError,
            500..=599 => Outcome::Error5xx,
            _ => Outcome::Ok,
        }
    }
}

impl Destination {
    /// The endpoint for a request, from `candidates`, skipping ejected ones; `None` if all are
    /// ejected.
    pub fn pick(
        &self,
        candidates: &[SocketAddr],
        lb: &LoadBalancer,
        hash: Option<u64>,
    ) -> Option<SocketAddr> {
        let now = Instant::now();
        let mut state = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let healthy: Vec<SocketAddr> = candidates
            .iter()
            .copied()
            .filter(|a| {
                state
                    .get(a)
                    .and_then(|s| s.ejected_until)
                    .is_none_or(|until| until <= now)
            })
            .collect();
        if healthy.is_empty() {
            return None;
        }
        let n = healthy.len();
        let i = match (lb, hash) {
            (LoadBalancer::ConsistentHash(_), Some(h)) => (h % n as u64) as usize,
            (LoadBalancer::Random, _) => (random() % n as u64) as usize,
            (LoadBalancer::LeastRequest, _) if n > 1 => {
                // Envoy's power of two choices: the less loaded of two at random.
                let (a, b) = (
                    (random() % n as u64) as usize,
                    (random() % n as u64) as usize,
                );
                let load = |i: usize| state.get(&healthy[i]).map_or(0, |s| s.in_flight);
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
            _ => self.round_robin.fetch_add(1, Ordering::Relaxed) % n,
        };
        let chosen = healthy[i];
        state.entry(chosen).or_default().in_flight += 1;
        Some(chosen)
    }

    /// An attempt to `endpoint` ended so: its in-flight count drops, and outlier detection
    /// counts it. Returns true if this ejected the endpoint.
    pub fn finished(
        &self,
        endpoint: SocketAddr,
        outcome: Outcome,
        outlier: Option<&OutlierDetection>,
        candidates: usize,
    ) -> bool {
        let now = Instant::now();
        let mut state = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let ejected_now = state
            .values()
            .filter(|s| s.ejected_until.is_some_and(|u| u > now))
            .count();
        let s = state.entry(endpoint).or_default();
        s.in_flight = s.in_flight.saturating_sub(1);
        let Some(od) = outlier else {
            return false;
        };
        // Local-origin failures count as gateway errors (and so as 5xx) unless split.
        let local_as_gateway = !od.split_local_origin;
        match outcome {
            Outcome::Ok => {
                s.consecutive_5xx = 0;
                s.consecutive_gateway = 0;
                s.consecutive_local = 0;
            }
            Outcome::Error5xx => {
                s.consecutive_5xx += 1;
                s.consecutive_gateway = 0;
            }
            Outcome::GatewayError => {
                s.consecutive_5xx += 1;
                s.consecutive_gateway += 1;
            }
            Outcome::LocalFailure if local_as_gateway => {
                s.consecutive_5xx += 1;
                s.consecutive_gateway += 1;
            }
            Outcome::LocalFailure => s.consecutive_local += 1,
        }
        if s.ejected_until.is_some_and(|u| u > now) {
            return false;
        }
        let over = |limit: u32, n: u32| limit > 0 && n >= limit;
        let tripped = over(od.consecutive_5xx, s.consecutive_5xx)
            || over(od.consecutive_gateway, s.consecutive_gateway)
            || (od.split_local_origin && over(od.consecutive_local_origin, s.consecutive_local));
        // maxEjectionPercent of the candidates may be out at once (at least one, as Envoy).
        let allowed = (candidates * od.max_ejection_percent as usize / 100).max(1);
        if !tripped || ejected_now >= allowed {
            return false;
        }
        s.times_ejected += 1;
        // Each ejection lasts baseEjectionTime times the number of ejections so far.
        s.ejected_until = Some(now + od.base_ejection_time * s.times_ejected);
        s.consecutive_5xx = 0;
        s.consecutive_gateway = 0;
        s.consecutive_local = 0;
        self.ejections.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Endpoints ejected now.
    #[cfg(test)]
    pub fn ejected(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let state = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        state
            .iter()
            .filter(|(_, s)| s.ejected_until.is_some_and(|u| u > now))
            .map(|(a, _)| *a)
            .collect()
    }
}

/// A hash for consistent-hash load balancing.
pub fn hash_of(bytes: &[u8]) -> u64 {
    // A fixed-key hasher: the same header value picks the same endpoint on every connection.
    let mut h = std::hash::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_of(&v4.octets()),
        IpAddr::V6(v6) => hash_of(&v6.octets()),
    }
}

/// A cheap random number (RANDOM and LEAST_REQUEST picks; nothing secret depends on it).
fn random() -> u64 {
    RandomState::new().hash_one(Instant::now())
}

/// How long a connection to an endpoint may take when nothing else says.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_weighted_split_is_exact_over_each_cycle() {
        let u = Upstreams::default();
        let picks: Vec<usize> = (0..500).map(|_| u.split("r", &[80, 20])).collect();
        assert_eq!(picks.iter().filter(|i| **i == 0).count(), 400);
        // Spread, not bunched: never more than four of the heavier in a row.
        assert!(picks
            .windows(5)
            .all(|w| w.contains(&1) || w.iter().all(|i| *i == 0)));
        assert!(picks
            .chunks(5)
            .all(|c| c.iter().filter(|i| **i == 1).count() == 1));
        // Weights that do not add up to 100 split by their total.
        let thirds: Vec<usize> = (0..300).map(|_| u.split("t", &[1, 2])).collect();
        assert_eq!(thirds.iter().filter(|i| **i == 1).count(), 200);
    }

    fn od(n: u32, base: Duration, max_percent: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: n,
            consecutive_gateway: 0,
            split_local_origin: false,
            consecutive_local_origin: 0,
            interval: Duration::from_secs(1),
            base_ejection_time: base,
            max_ejection_percent: max_percent,
            min_health_percent: 0,
        }
    }

    #[test]
    fn consecutive_errors_eject_an_endpoint_until_its_time_is_up() {
        let d = Destination::default();
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let od = od(2, Duration::from_millis(50), 100);
        assert!(!d.finished(a, Outcome::Error5xx, Some(&od), 2));
        assert!(
            !d.finished(a, Outcome::Ok, Some(&od), 2),
            "a success resets"
        );
        assert!(!d.finished(a, Outcome::Error5xx, Some(&od), 2));
        assert!(
            d.finished(a, Outcome::GatewayError, Some(&od), 2),
            "ejected"
        );
        assert_eq!(d.ejected(), vec![a]);
        for _ in 0..4 {
            assert_eq!(d.pick(&[a, b], &LoadBalancer::RoundRobin, None), Some(b));
        }
        std::thread::sleep(Duration::from_millis(60));
        assert!(d.ejected().is_empty(), "restored after baseEjectionTime");
        let picks: Vec<_> = (0..4)
            .filter_map(|_| d.pick(&[a, b], &LoadBalancer::RoundRobin, None))
            .collect();
        assert!(picks.contains(&a) && picks.contains(&b), "{picks:?}");
    }

    #[test]
    fn max_ejection_percent_keeps_endpoints_in() {
        let d = Destination::default();
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let od = od(1, Duration::from_secs(30), 50);
        assert!(d.finished(a, Outcome::Error5xx, Some(&od), 2));
        assert!(
            !d.finished(b, Outcome::Error5xx, Some(&od), 2),
            "50 % of 2 is one"
        );
        assert_eq!(d.pick(&[a, b], &LoadBalancer::RoundRobin, None), Some(b));
    }

    #[test]
    fn a_hash_picks_the_same_endpoint_every_time() {
        let d = Destination::default();
        let eps: Vec<SocketAddr> = (1..=5)
            .map(|i| format!("10.0.0.{i}:80").parse().unwrap())
            .collect();
        let lb = LoadBalancer::ConsistentHash(crate::traffic::HashKey::Header(
            http::HeaderName::from_static("x-user"),
        ));
        let h = hash_of(b"jason");
        let first = d.pick(&eps, &lb, Some(h));
        assert!((0..10).all(|_| d.pick(&eps, &lb, Some(h)) == first));
    }
}
