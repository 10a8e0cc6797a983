//! Outbound: connections an enrolled pod makes, captured by `zt_connect4/6`.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use http::{HeaderMap, HeaderValue};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};
use ztunnel_common::{OrigDst, OrigDstKey, AF_INET, AF_INET6, HBONE_PORT};

use super::{
    inbound_policy::{Admission, CustomCheck, InboundCall, Transport},
    relay::{relay, relay_until, reset},
    PodContext, Proxy, Relayed,
};
use crate::{
    admin::metrics::ConnectionLabels,
    authz::Unknowns,
    hbone::{self, PoolKey},
    identity::SpiffeId,
    state::Snapshot,
};

/// Where an outbound connection goes, and what it was addressed to.
#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    pub upstream: SocketAddr,
    /// `namespace/name` of the Service whose VIP was dialled.
    pub service: Option<String>,
    /// `namespace/name` of the destination pod, if it is a known workload.
    pub workload: Option<String>,
}

impl Proxy {
    /// Accepts captured connections of `pod` until the task is aborted (un-enrolment).
    pub async fn serve_outbound(self: Arc<Self>, pod: Arc<PodContext>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    // Small writes (TLS records, HTTP/2 frames, request/response exchanges)
                    // must not wait for Nagle: latency is the product.
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(self.clone().outbound(pod.clone(), stream, peer));
                }
                Err(e) => {
                    warn!(pod = %pod.workload, error = %e, "outbound accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn outbound(self: Arc<Self>, pod: Arc<PodContext>, stream: TcpStream, peer: SocketAddr) {
        let start = Instant::now();
        let key = OrigDstKey {
            netns_cookie: pod.netns_cookie,
            port: peer.port(),
            family: if peer.is_ipv4() { AF_INET } else { AF_INET6 },
            _pad: 0,
        };
        let Some(orig) = self.orig_dst.take(&key).and_then(|d| orig_dst_addr(&d)) else {
            // Something connected to the listener without going through capture (e.g. the app
            // dialled 127.0.0.1:15001 itself): there is nowhere legitimate to send it.
            warn!(src_workload = %pod.workload, src_addr = %peer,
                "outbound connection without a recorded original destination; closing it");
            return reset(stream);
        };
        let snapshot = self.snapshot();
        let route = match self.route(&snapshot, orig) {
            Ok(route) => route,
            Err(reason) => {
                info!(direction = "outbound", src_workload = %pod.workload, dst_addr = %orig,
                    duration_ms = start.elapsed().as_millis() as u64, outcome = "refused",
                    error = %reason, "connection closed");
                return reset(stream);
            }
        };
        if let Some(key) = self.tunnel_for(&pod, &snapshot, &route) {
            return self
                .outbound_hbone(pod, stream, orig, route, key, start)
                .await;
        }
        if let Some(dst) = self.local_pod(route.upstream.ip()) {
            return self
                .outbound_same_node(pod, dst, stream, orig, route, start)
                .await;
        }
        let upstream = match self.connect_from(&pod, route.upstream).await {
            Ok(s) => s,
            Err(e) => {
                info!(direction = "outbound", src_workload = %pod.workload, dst_addr = %orig,
                    dst_service = route.service.as_deref(), dst_workload = route.workload.as_deref(),
                    upstream = %route.upstream, duration_ms = start.elapsed().as_millis() as u64,
                    outcome = "connect_failed", error = %e, "connection closed");
                return reset(stream);
            }
        };
        let src_addr = upstream.local_addr().ok();
        let mut counted = self.metrics.open(ConnectionLabels::new(
            "source",
            "passthrough",
            (Some(&pod.workload), Some(pod.identity.to_string())),
            (route.workload.as_deref(), None),
            false,
        ));
        let r = relay(stream, upstream).await;
        counted.bytes(r.sent, r.received);
        info!(direction = "outbound", src_workload = %pod.workload,
            src_addr = src_addr.map(|a| a.to_string()).as_deref(), dst_addr = %orig,
            dst_service = route.service.as_deref(), dst_workload = route.workload.as_deref(),
            upstream = %route.upstream, bytes_sent = r.sent, bytes_received = r.received,
            duration_ms = start.elapsed().as_millis() as u64,
            outcome = if r.error.is_some() { "error" } else { "ok" },
            error = r.error.as_ref().map(|e| e.to_string()).as_deref(), "connection closed");
    }

    /// The tunnel to use for `route`, if any: destinations that are enrolled workloads on
    /// another node are reached through HBONE to their pod's port 15008. Same-node pods and
    /// destinations outside the mesh are connected directly.
    fn tunnel_for(&self, pod: &PodContext, snapshot: &Snapshot, route: &Route) -> Option<PoolKey> {
        let dst = snapshot.pod_by_ip(route.upstream.ip())?;
        // A mesh pod whose node is unknown is still tunnelled: only a pod known to run here
        // may be reached without TLS.
        if dst.node_name.as_deref() == Some(self.node.as_str())
            || !snapshot.in_mesh(dst, &self.policy)
        {
            return None;
        }
        Some(PoolKey {
            src: pod.identity.clone(),
            // A service account that is not a valid SPIFFE segment cannot have been enrolled.
            dst: SpiffeId::new(self.trust_domain(), &dst.namespace, &dst.service_account).ok()?,
            addr: SocketAddr::new(route.upstream.ip(), HBONE_PORT),
            origin: hbone::Origin {
                netns: pod.netns.clone(),
                netns_cookie: pod.netns_cookie,
                ip: pod
                    .ips
                    .iter()
                    .copied()
                    .find(|ip| ip.is_ipv4() == route.upstream.is_ipv4()),
            },
        })
    }

    /// Carries a captured connection through an HBONE tunnel (mTLS to the destination pod's
    /// node proxy, which delivers it inside the destination pod).
    async fn outbound_hbone(
        &self,
        pod: Arc<PodContext>,
        stream: TcpStream,
        orig: SocketAddr,
        route: Route,
        key: PoolKey,
        start: Instant,
    ) {
        let mut headers = HeaderMap::new();
        if let Some(ip) = pod.ips.first() {
            let forwarded = match ip {
                IpAddr::V4(v4) => format!("for={v4}"),
                IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
            };
            if let Ok(v) = HeaderValue::from_str(&forwarded) {
                headers.insert("forwarded", v);
            }
        }
        let (ns, name) = pod.workload.split_once('/').unwrap_or(("", &pod.workload));
        if let Ok(v) = HeaderValue::from_str(&format!(
            "k8s.namespace.name={ns},k8s.pod.name={name},k8s.serviceaccount.name={}",
            pod.identity.service_account()
        )) {
            headers.insert("baggage", v);
        }
        let tunnel = match self.mesh.pool.connect(&key, route.upstream, headers).await {
            Ok(t) => t,
            Err(e) => {
                info!(direction = "outbound", hbone = true, src_workload = %pod.workload,
                    src_identity = %key.src, dst_addr = %orig, dst_service = route.service.as_deref(),
                    dst_workload = route.workload.as_deref(), dst_identity = %key.dst,
                    upstream = %route.upstream, duration_ms = start.elapsed().as_millis() as u64,
                    outcome = "connect_failed", error = %e, "connection closed");
                return reset(stream);
            }
        };
        let connection = tunnel.connection_id;
        let mut counted = self.metrics.open(ConnectionLabels::new(
            "source",
            "hbone",
            (Some(&pod.workload), Some(key.src.to_string())),
            (route.workload.as_deref(), Some(key.dst.to_string())),
            true,
        ));
        let r = hbone::stream::relay(stream, tunnel.send, tunnel.recv).await;
        counted.bytes(r.sent, r.received);
        info!(direction = "outbound", hbone = true, hbone_connection = connection,
            src_workload = %pod.workload, src_identity = %key.src, dst_addr = %orig,
            dst_service = route.service.as_deref(), dst_workload = route.workload.as_deref(),
            dst_identity = %key.dst, upstream = %route.upstream, bytes_sent = r.sent,
            bytes_received = r.received, duration_ms = start.elapsed().as_millis() as u64,
            outcome = if r.error.is_some() { "error" } else { "ok" },
            error = r.error.as_ref().map(|e| e.to_string()).as_deref(), "connection closed");
    }

    /// Same-node mesh traffic: delivered straight into the destination pod, inside its netns.
    /// No TLS, since the bytes never leave this host, but the destination's inbound side sees
    /// an authenticated mesh peer: the source is known by the listener that accepted it, not
    /// by an address, so PeerAuthentication treats it as mutual TLS.
    async fn outbound_same_node(
        self: &Arc<Self>,
        src: Arc<PodContext>,
        dst: Arc<PodContext>,
        stream: TcpStream,
        orig: SocketAddr,
        route: Route,
        start: Instant,
    ) {
        // The destination's inbound policy, with the source known by its listener.
        let config = self.config.clone();
        let snapshot = config.borrow().clone();
        let source_ip = src
            .ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == route.upstream.is_ipv4());
        let call = InboundCall::new(
            Transport::Mesh,
            Some(&src.identity),
            source_ip,
            route.upstream,
        );
        let decision = match self.admit(&snapshot, &dst, &call, Unknowns::Defer) {
            Admission::Allowed(d) => {
                self.record(&dst, &call, &d);
                Some(d)
            }
            Admission::Denied(d)
            | Admission::MtlsRequired(d)
            | Admission::Custom(CustomCheck { denied: d, .. }) => {
                self.record(&dst, &call, &d);
                reset(stream);
                for direction in ["outbound", "inbound"] {
                    info!(direction, same_node = true, src_workload = %src.workload,
                        src_identity = %src.identity, dst_addr = %orig,
                        dst_service = route.service.as_deref(), dst_workload = %dst.workload,
                        dst_identity = %dst.identity, upstream = %route.upstream,
                        authz_policy = d.policy.as_deref(), authz_rule = d.rule,
                        duration_ms = start.elapsed().as_millis() as u64, outcome = "denied",
                        error = %d.reason, "connection closed");
                }
                return;
            }
            // Decided request by request, once the bytes are read.
            Admission::PerRequest => None,
        };
        let per_request = decision.is_none();
        let (r, outcome) = match self.connect_from(&dst, route.upstream).await {
            Ok(upstream) => {
                // Both sides are this proxy's: counted once as each reporter. No TLS is
                // involved (the bytes never leave the host), so not `mutual_tls`.
                let counted = ["source", "destination"].map(|reporter| {
                    self.metrics.open(ConnectionLabels::new(
                        reporter,
                        "same_node",
                        (Some(&src.workload), Some(src.identity.to_string())),
                        (Some(&dst.workload), Some(dst.identity.to_string())),
                        false,
                    ))
                });
                let revoke = self
                    .clone()
                    .revoked(config, dst.clone(), call.clone(), per_request);
                let r = if per_request {
                    self.serve_per_request(dst.clone(), call, stream, upstream, revoke)
                        .await
                } else {
                    relay_until(stream, upstream, revoke).await
                };
                for mut c in counted {
                    c.bytes(r.sent, r.received);
                }
                let outcome = r.outcome();
                (r, outcome)
            }
            Err(e) => {
                reset(stream);
                let r = Relayed {
                    sent: 0,
                    received: 0,
                    error: Some(e),
                    revoked: None,
                };
                (r, "connect_failed")
            }
        };
        let error = r.error_text();
        // One line per side, as for traffic between nodes.
        info!(direction = "outbound", same_node = true, src_workload = %src.workload,
            src_identity = %src.identity, dst_addr = %orig, dst_service = route.service.as_deref(),
            dst_workload = %dst.workload, dst_identity = %dst.identity, upstream = %route.upstream,
            bytes_sent = r.sent, bytes_received = r.received,
            duration_ms = start.elapsed().as_millis() as u64, outcome, error = error.as_deref(),
            "connection closed");
        info!(direction = "inbound", same_node = true, src_workload = %src.workload,
            src_identity = %src.identity, src_addr = src.ips.first().map(|ip| ip.to_string()).as_deref(),
            dst_addr = %route.upstream, dst_workload = %dst.workload, upstream = %route.upstream,
            bytes_sent = r.sent, bytes_received = r.received,
            duration_ms = start.elapsed().as_millis() as u64, outcome, error = error.as_deref(),
            "connection closed");
    }

    /// Resolves an original destination: a Service VIP goes to one of its endpoints
    /// (round-robin), anything else goes where it was addressed.
    pub fn route(&self, snapshot: &Snapshot, orig: SocketAddr) -> Result<Route, String> {
        if let Some(svc) = snapshot.service_by_vip(orig.ip()) {
            let name = format!("{}/{}", svc.namespace, svc.name);
            if snapshot.service_port(svc, orig.port()).is_none() {
                return Err(format!("service {name} has no port {}", orig.port()));
            }
            let endpoints: Vec<_> = snapshot
                .endpoints(svc, orig.port())
                .into_iter()
                .filter(|e| e.addr.is_ipv4() == orig.is_ipv4())
                .collect();
            if endpoints.is_empty() {
                return Err(format!(
                    "service {name} has no endpoints for port {}",
                    orig.port()
                ));
            }
            let i = self.next_endpoint(
                (svc.namespace.clone(), svc.name.clone(), orig.port()),
                endpoints.len(),
            );
            let ep = &endpoints[i];
            return Ok(Route {
                upstream: ep.addr,
                service: Some(name),
                workload: Some(ep.pod.workload()),
            });
        }
        let workload = snapshot.pod_by_ip(orig.ip()).map(|p| p.workload());
        Ok(Route {
            upstream: orig,
            service: None,
            workload,
        })
    }
}

fn orig_dst_addr(d: &OrigDst) -> Option<SocketAddr> {
    let ip = match d.family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(d.addr[0].to_ne_bytes())),
        AF_INET6 => {
            let mut b = [0u8; 16];
            for (i, w) in d.addr.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, d.port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_destinations_decode_from_kernel_byte_order() {
        let v4 = OrigDst {
            addr: [u32::from_ne_bytes([10, 2, 0, 3]), 0, 0, 0],
            port: 8080,
            family: AF_INET,
            ..Default::default()
        };
        assert_eq!(orig_dst_addr(&v4), Some("10.2.0.3:8080".parse().unwrap()));
        let ip: Ipv6Addr = "fd00::1:2".parse().unwrap();
        let o = ip.octets();
        let words =
            [0, 1, 2, 3].map(|i| u32::from_ne_bytes(o[i * 4..i * 4 + 4].try_into().unwrap()));
        let v6 = OrigDst {
            addr: words,
            port: 443,
            family: AF_INET6,
            ..Default::default()
        };
        assert_eq!(orig_dst_addr(&v6), Some("[fd00::1:2]:443".parse().unwrap()));
        let bad = OrigDst {
            family: 99,
            ..Default::default()
        };
        assert_eq!(orig_dst_addr(&bad), None);
    }
}
