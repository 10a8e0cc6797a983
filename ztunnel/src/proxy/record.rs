//! One record per proxied connection and side: it owns the connection's access-log line
//! (`connection closed`, the schema docs/operations.md describes) and its connection metrics,
//! and writes both when it is dropped, whatever way the connection ended: a path that returns
//! early, fails or panics still leaves its line.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use tracing::info;

use crate::{
    authz::{Decision, MtlsDecision},
    memory::Live,
    metrics::{Carrier, ConnectionGuard, ConnectionLabels, Metrics},
    model::AppProtocol,
    relay::Relayed,
};

/// Which side of the proxy a line is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Toward the destination pod (this proxy serves the destination).
    Inbound,
    /// From the source pod (this proxy serves the caller).
    Outbound,
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

/// The fields of a `connection closed` line; each is logged only once it is known.
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
}

/// A connection's log line and metrics, written on drop.
pub struct ConnectionRecord {
    direction: Direction,
    start: Instant,
    metrics: Arc<Metrics>,
    pub line: Line,
    counted: Option<ConnectionGuard>,
    /// Bytes from and to the caller.
    bytes: Option<(u64, u64)>,
    ending: Option<(Ending, Option<String>)>,
    _live: Live,
}

impl ConnectionRecord {
    pub fn new(direction: Direction, metrics: Arc<Metrics>) -> Self {
        Self {
            direction,
            start: Instant::now(),
            metrics,
            line: Line::default(),
            counted: None,
            bytes: None,
            ending: None,
            _live: Live::new(),
        }
    }

    /// Notes the authorization decision that admitted or denied the connection.
    pub fn decided(&mut self, d: &Decision) {
        self.line.authz_policy = d.policy.clone();
        self.line.authz_rule = d.rule;
    }

    /// The connection is established: counted as opened now, closed when the record drops.
    pub fn count(&mut self, labels: ConnectionLabels) {
        self.counted = Some(self.metrics.open(labels));
    }

    /// It ended before carrying any byte, `why`.
    pub fn refuse(&mut self, ending: Ending, why: impl Into<String>) {
        self.ending = Some((ending, Some(why.into())));
    }

    /// It was carried, with this result.
    pub fn finish(&mut self, r: &Relayed) {
        self.bytes = Some((r.sent, r.received));
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
        let l = &self.line;
        let (ending, error) = match &self.ending {
            Some((ending, error)) => (*ending, error.as_deref()),
            None => (
                Ending::Error,
                Some("the connection's task ended before the connection did"),
            ),
        };
        let direction = match self.direction {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        };
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
            bytes_sent = self.bytes.map(|b| b.0),
            bytes_received = self.bytes.map(|b| b.1),
            duration_ms = self.start.elapsed().as_millis() as u64,
            outcome = ending.as_str(),
            error,
            "connection closed"
        );
    }
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        self.log();
        // The metrics guard drops after the line: the connection counts as closed now.
    }
}
