//! One record per proxied connection and side: it owns the connection's access-log line
//! (`connection closed`, the schema docs/operations.md describes) and its connection metrics,
//! and writes both when it is dropped, whatever way the connection ended: a path that returns
//! early, fails or panics still leaves its line. From the moment it is counted opened until
//! it is dropped, it is also listed among the proxy's open connections ([`OpenConnections`],
//! the admin API's `/connections`), with the bytes carried so far.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tracing::info;

use crate::{
    authz::{Decision, MtlsDecision},
    memory::Live,
    metrics::{Carrier, ConnectionGuard, ConnectionLabels, Metrics},
    model::AppProtocol,
    relay::{Progress, Relayed, Tally},
};

/// Which side of the proxy a line is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Toward the destination pod (this proxy serves the destination).
    Inbound,
    /// From the source pod (this proxy serves the caller).
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Both sides finished cleanly.
    Ok,
    Error,
    /// Refused before any policy: nowhere to send it, a reserved port, plaintext under STRICT.
    Refused,
    /// An authorization policy denied it.
    Denied,
    /// The upstream (the application, or the tunnel) could not be reached.
    ConnectFailed,
    /// Cut because a configuration change no longer admits it.
    Revoked,
}

impl Ending {
    pub fn as_str(self) -> &'static str {
        match self {
            Ending::Ok => "ok",
            Ending::Error => "error",
            Ending::Refused => "refused",
            Ending::Denied => "denied",
            Ending::ConnectFailed => "connect_failed",
            Ending::Revoked => "revoked",
        }
    }
}

/// The fields of a `connection closed` line; each is logged only once it is known. Complete
/// when the connection is counted (the open-connection list shows it from then on).
#[derive(Debug, Default)]
pub struct Line {
    /// How it was carried, as the connection metrics label it.
    pub transport: Option<Carrier>,
    pub hbone: bool,
    pub same_node: bool,
    /// Which pooled HBONE connection carried it.
    pub hbone_connection: Option<u64>,
    pub src_workload: Option<String>,
    pub src_identity: Option<String>,
    pub src_addr: Option<String>,
    pub forwarded_for: Option<String>,
    pub dst_addr: Option<SocketAddr>,
    pub dst_service: Option<String>,
    pub dst_workload: Option<String>,
    pub dst_identity: Option<String>,
    pub upstream: Option<SocketAddr>,
    /// The PeerAuthentication decision, for plaintext callers.
    pub mtls: Option<MtlsDecision>,
    /// The authorization policy and rule that admitted or denied it.
    pub authz_policy: Option<String>,
    pub authz_rule: Option<usize>,
    pub per_request: Option<bool>,
    /// The protocol the destination port is declared to speak (its Services' port names and
    /// `appProtocol`).
    pub app_protocol: Option<AppProtocol>,
    /// The HTTP status a refused CONNECT was answered with.
    pub status: Option<u16>,
    /// Why no policy applied (the node's own connections).
    pub exempt: Option<&'static str>,
    /// Inbound: whether the application saw the caller's address, or why not.
    pub src_preserved: Option<super::DeliverySource>,
}

/// What is known of a connection while it is open: its line and the bytes carried so far. The
/// record owns it (one allocation, which also holds the line the record would otherwise hold
/// inline) and shares it with the open-connection list while the connection is counted.
#[derive(Debug)]
pub struct OpenConnection {
    pub direction: Direction,
    start: Instant,
    pub line: Line,
    progress: Progress,
    /// On the same node, the destination's side: it carries the bytes of both.
    carried_by: Option<Arc<OpenConnection>>,
}

impl OpenConnection {
    pub fn age(&self) -> Duration {
        self.start.elapsed()
    }

    /// When it was accepted.
    pub fn opened(&self) -> SystemTime {
        SystemTime::now() - self.age()
    }

    /// Bytes from and to the caller so far.
    pub fn bytes(&self) -> (u64, u64) {
        match &self.carried_by {
            Some(other) => other.bytes(),
            None => self.progress.bytes(),
        }
    }

    /// The workload this proxy serves on this side: the caller outbound, the destination
    /// inbound.
    pub fn workload(&self) -> Option<&str> {
        match self.direction {
            Direction::Outbound => self.line.src_workload.as_deref(),
            Direction::Inbound => self.line.dst_workload.as_deref(),
        }
    }
}

/// Where the relay of a connection adds what it carries: its record's progress.
impl Tally for OpenConnection {
    fn sent(&self, n: u64) {
        self.progress.sent(n);
    }
    fn received(&self, n: u64) {
        self.progress.received(n);
    }
}

/// The connections counted open now (`ztunnel_active_connections` counts them; this says which
/// they are). One lock per open and close; a listing copies the pointers out under it.
#[derive(Debug, Default)]
pub struct OpenConnections {
    /// By the entry's address, so that a record needs no id of its own.
    open: Mutex<HashMap<usize, Arc<OpenConnection>>>,
}

impl OpenConnections {
    /// The connections open now, oldest first.
    pub fn list(&self) -> Vec<Arc<OpenConnection>> {
        let mut all: Vec<_> = self.lock().values().cloned().collect();
        all.sort_by_key(|c| std::cmp::Reverse(c.age()));
        all
    }

    fn insert(&self, c: &Arc<OpenConnection>) {
        self.lock().insert(Arc::as_ptr(c) as usize, c.clone());
    }

    fn remove(&self, c: &Arc<OpenConnection>) {
        self.lock().remove(&(Arc::as_ptr(c) as usize));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Arc<OpenConnection>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connection's log line and metrics, written on drop.
pub struct ConnectionRecord {
    metrics: Arc<Metrics>,
    open: Arc<OpenConnection>,
    /// Where it is listed while counted.
    listed: Option<Arc<OpenConnections>>,
    counted: Option<ConnectionGuard>,
    ending: Option<(Ending, Option<String>)>,
    _live: Live,
}

impl ConnectionRecord {
    pub fn new(direction: Direction, metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            open: Arc::new(OpenConnection {
                direction,
                start: Instant::now(),
                line: Line::default(),
                progress: Progress::default(),
                carried_by: None,
            }),
            listed: None,
            counted: None,
            ending: None,
            _live: Live::new(),
        }
    }

    pub fn line(&self) -> &Line {
        &self.open.line
    }

    /// The line, while it is being filled in: before [`ConnectionRecord::count`] (the list of
    /// open connections shares it from then on).
    pub fn line_mut(&mut self) -> &mut Line {
        &mut self.unshared().line
    }

    fn unshared(&mut self) -> &mut OpenConnection {
        Arc::get_mut(&mut self.open).expect("a connection's line is complete once it is counted")
    }

    /// Where the relay adds what it carries.
    pub fn tally(&self) -> &Arc<OpenConnection> {
        &self.open
    }

    /// Lists the bytes `other` carries as this connection's (the caller's record of a
    /// same-node connection, whose bytes the destination's relay carries); before
    /// [`ConnectionRecord::count`].
    pub fn carried_by(&mut self, other: &ConnectionRecord) {
        self.unshared().carried_by = Some(other.open.clone());
    }

    /// Notes the authorization decision that admitted or denied the connection.
    pub fn decided(&mut self, d: &Decision) {
        let line = self.line_mut();
        line.authz_policy = d.policy.clone();
        line.authz_rule = d.rule;
    }

    /// The connection is established: counted as opened and listed in `open` now, closed and
    /// unlisted when the record drops.
    pub fn count(&mut self, labels: ConnectionLabels, open: &Arc<OpenConnections>) {
        let line = self.line_mut();
        line.transport = line.transport.or(Some(labels.transport));
        self.counted = Some(self.metrics.open(labels));
        open.insert(&self.open);
        self.listed = Some(open.clone());
    }

    /// It ended before carrying any byte, `why`.
    pub fn refuse(&mut self, ending: Ending, why: impl Into<String>) {
        self.ending = Some((ending, Some(why.into())));
    }

    /// It was carried, with this result.
    pub fn finish(&mut self, r: &Relayed) {
        if let Some(c) = &mut self.counted {
            c.bytes(r.sent, r.received);
        }
        let ending = if r.revoked.is_some() {
            Ending::Revoked
        } else if r.error.is_some() {
            Ending::Error
        } else {
            Ending::Ok
        };
        let error = r
            .revoked
            .clone()
            .or_else(|| r.error.as_ref().map(|e| e.to_string()));
        self.ending = Some((ending, error));
    }

    fn log(&self) {
        let l = self.line();
        let (ending, error) = match &self.ending {
            Some((ending, error)) => (*ending, error.as_deref()),
            None => (
                Ending::Error,
                Some("the connection's task ended before the connection did"),
            ),
        };
        let direction = self.open.direction.as_str();
        // Carried bytes, from the counters the relay adds to: a connection that was never
        // counted (refused) carried none.
        let bytes = self.listed.is_some().then(|| self.open.bytes());
        let text = |a: Option<SocketAddr>| a.map(|a| a.to_string());
        info!(
            direction,
            transport = l.transport.map(Carrier::as_str),
            hbone = l.hbone.then_some(true),
            same_node = l.same_node.then_some(true),
            hbone_connection = l.hbone_connection,
            src_workload = l.src_workload.as_deref(),
            src_identity = l.src_identity.as_deref(),
            src_addr = l.src_addr.as_deref(),
            forwarded_for = l.forwarded_for.as_deref(),
            dst_addr = text(l.dst_addr).as_deref(),
            dst_service = l.dst_service.as_deref(),
            dst_workload = l.dst_workload.as_deref(),
            dst_identity = l.dst_identity.as_deref(),
            upstream = text(l.upstream).as_deref(),
            mtls_mode = l.mtls.as_ref().map(|m| m.mode.as_str()),
            mtls_policy = l.mtls.as_ref().and_then(|m| m.policy.as_deref()),
            authz_policy = l.authz_policy.as_deref(),
            authz_rule = l.authz_rule,
            per_request = l.per_request,
            app_protocol = l.app_protocol.map(AppProtocol::as_str),
            status = l.status,
            exempt = l.exempt,
            src_preserved = l.src_preserved.map(|s| s == super::DeliverySource::Caller),
            src_fallback = l.src_preserved.and_then(|s| match s {
                super::DeliverySource::Pod(why) => Some(why.as_str()),
                super::DeliverySource::Caller => None,
            }),
            bytes_sent = bytes.map(|b| b.0),
            bytes_received = bytes.map(|b| b.1),
            duration_ms = self.open.age().as_millis() as u64,
            outcome = ending.as_str(),
            error,
            "connection closed"
        );
    }
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        self.log();
        if let Some(open) = &self.listed {
            open.remove(&self.open);
        }
        // The metrics guard drops after the line: the connection counts as closed now.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Reporter, SecurityPolicy};

    fn labels() -> ConnectionLabels {
        let l = ConnectionLabels::new(
            Reporter::Destination,
            Carrier::Hbone,
            (
                Some("shop/client"),
                Some("spiffe://td/ns/shop/sa/client".into()),
            ),
            (Some("shop/web"), Some("spiffe://td/ns/shop/sa/web".into())),
            true,
        );
        assert_eq!(l.connection_security_policy, SecurityPolicy::MutualTls);
        l
    }

    #[test]
    fn a_connection_is_listed_from_counted_to_dropped_with_the_bytes_so_far() {
        let open = Arc::new(OpenConnections::default());
        let metrics = Arc::new(Metrics::default());
        let mut record = ConnectionRecord::new(Direction::Inbound, metrics.clone());
        record.line_mut().dst_workload = Some("shop/web".into());
        assert!(open.list().is_empty(), "not listed before it is counted");
        record.count(labels(), &open);
        let listed = open.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].workload(), Some("shop/web"));
        assert_eq!(listed[0].line.transport, Some(Carrier::Hbone));
        assert_eq!(listed[0].bytes(), (0, 0));
        record.tally().sent(5);
        record.tally().received(3);
        assert_eq!(listed[0].bytes(), (5, 3), "bytes show while carried");

        // The caller's side of a same-node connection shows the bytes its destination carries.
        let mut caller = ConnectionRecord::new(Direction::Outbound, metrics.clone());
        caller.line_mut().src_workload = Some("shop/client".into());
        caller.carried_by(&record);
        caller.count(labels(), &open);
        record.tally().sent(1);
        let both = open.list();
        assert_eq!(both.len(), 2);
        assert!(both.iter().all(|c| c.bytes() == (6, 3)), "{both:?}");
        assert_eq!(metrics.active_connections.get(), 2);

        drop(record);
        drop(caller);
        assert!(open.list().is_empty(), "unlisted when the record drops");
        assert_eq!(metrics.active_connections.get(), 0);
    }

    #[test]
    fn an_open_connection_costs_a_few_words_beyond_its_line() {
        // The record holds its line behind one pointer; listing adds the entry's counters,
        // start and map slot, not a copy of the line.
        let extra = std::mem::size_of::<OpenConnection>() - std::mem::size_of::<Line>();
        assert!(extra <= 56, "{extra} bytes");
    }
}
