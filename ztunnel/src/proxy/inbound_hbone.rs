//! Inbound HBONE: mTLS + HTTP/2 CONNECT arriving at an enrolled pod's port 15008, steered by
//! `sk_lookup` to the pod's HBONE listener. Each tunnel is delivered to the application inside
//! the pod, and only to this pod: the listener belongs to one pod, so a CONNECT for any other
//! address is refused (the proxy is never an open relay).
use std::{net::SocketAddr, sync::Arc, time::Instant};

use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use super::{
    inbound_policy::{Admission, CustomCheck, InboundCall, Transport},
    PodContext, Proxy,
};
use crate::{
    authz::Unknowns,
    hbone::{self, server::Handler},
    metrics::{Carrier, ConnectionLabels, Reporter, Side},
    ports::is_proxy_port,
    relay::{relay_until, reset},
};

impl Proxy {
    /// Accepts HBONE connections for `pod` until the task is aborted (un-enrolment).
    pub async fn serve_inbound_hbone(self: Arc<Self>, pod: Arc<PodContext>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    // Small writes (TLS records, HTTP/2 frames, request/response exchanges)
                    // must not wait for Nagle: latency is the product.
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(self.clone().inbound_hbone(pod.clone(), stream, peer));
                }
                Err(e) => {
                    warn!(pod = %pod.workload, error = %e, "HBONE accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn inbound_hbone(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        tcp: TcpStream,
        peer: SocketAddr,
    ) {
        let mesh = &self.mesh;
        let tls = match hbone::server::accept(tcp, &mesh.certs, &pod.identity, &mesh.roots).await {
            Ok(tls) => tls,
            Err(e) => {
                self.metrics.handshake(Side::Inbound, e.reason());
                warn!(direction = "inbound", dst_workload = %pod.workload, src_addr = %peer,
                    reason = e.reason(), error = %e, "HBONE connection refused");
                return;
            }
        };
        self.metrics.handshake(Side::Inbound, "ok");
        let src_identity = tls.peer;
        let proxy = self.clone();
        let (hpod, src, src_id) = (pod.clone(), src_identity.to_string(), src_identity.clone());
        let handler: Handler = Arc::new(move |req, tunnel| {
            let (proxy, pod, src, src_id) =
                (proxy.clone(), hpod.clone(), src.clone(), src_id.clone());
            Box::pin(async move {
                let start = Instant::now();
                let refuse = |tunnel: hbone::Tunnel,
                              status: StatusCode,
                              label: &'static str,
                              reason: &str| {
                    proxy.metrics.hbone_refused.add(label);
                    info!(direction = "inbound", hbone = true, src_identity = %src, src_addr = %peer,
                        dst_addr = %req.target, dst_workload = %pod.workload, outcome = "refused",
                        status = status.as_u16(), error = reason, "connection closed");
                    tunnel.refuse(status);
                };
                if !pod.ips.contains(&req.target.ip()) {
                    return refuse(
                        tunnel,
                        StatusCode::FORBIDDEN,
                        "not_this_pod",
                        "target is not this pod",
                    );
                }
                if is_proxy_port(req.target.port()) {
                    return refuse(
                        tunnel,
                        StatusCode::FORBIDDEN,
                        "reserved_port",
                        "target port is reserved for the proxy",
                    );
                }
                // The peer's workload and address: the address it says it comes from, but only
                // if a pod with that address runs as the identity the certificate proved.
                let config = proxy.config.clone();
                let snapshot = config.borrow().clone();
                let src_pod = req
                    .forwarded_for
                    .and_then(|ip| snapshot.pod_by_ip(ip))
                    .filter(|p| {
                        p.service_account == src_id.service_account()
                            && p.namespace == src_id.namespace()
                    });
                let src_workload = src_pod.map(|p| p.workload());
                let source_ip = match src_pod {
                    Some(_) => req.forwarded_for,
                    None => Some(peer.ip()),
                };
                let call = InboundCall::new(Transport::Mesh, Some(&src_id), source_ip, req.target);
                let decision = match proxy.admit(&snapshot, &pod, &call, Unknowns::Defer) {
                    Admission::Allowed(d) => {
                        proxy.record(&pod, &call, &d);
                        Some(d)
                    }
                    Admission::Denied(d)
                    | Admission::MtlsRequired(d)
                    | Admission::Custom(CustomCheck { denied: d, .. }) => {
                        proxy.record(&pod, &call, &d);
                        info!(direction = "inbound", hbone = true, src_identity = %src,
                            src_workload = src_workload.as_deref(), src_addr = %peer,
                            dst_addr = %req.target, dst_workload = %pod.workload,
                            authz_policy = d.policy.as_deref(), authz_rule = d.rule,
                            outcome = "denied", status = StatusCode::FORBIDDEN.as_u16(),
                            error = %d.reason, "connection closed");
                        return tunnel.refuse(StatusCode::FORBIDDEN);
                    }
                    // Decided request by request, once the bytes are read.
                    Admission::PerRequest => None,
                };
                let upstream = match proxy.connect_from(&pod, req.target).await {
                    Ok(s) => s,
                    Err(e) => {
                        let reason = format!("delivery to the application failed: {e}");
                        return refuse(
                            tunnel,
                            StatusCode::SERVICE_UNAVAILABLE,
                            "connect_failed",
                            &reason,
                        );
                    }
                };
                let Ok(downstream) = tunnel.accept() else {
                    return reset(upstream);
                };
                let per_request = decision.is_none();
                let mut counted = proxy.metrics.open(ConnectionLabels::new(
                    Reporter::Destination,
                    Carrier::Hbone,
                    (src_workload.as_deref(), Some(src.clone())),
                    (Some(&pod.workload), Some(pod.identity.to_string())),
                    true,
                ));
                let revoke = proxy
                    .clone()
                    .revoked(config, pod.clone(), call.clone(), per_request);
                // Logged from the client's view, like the plaintext path (sent = client →
                // application).
                let r = if per_request {
                    proxy
                        .serve_per_request(pod.clone(), call, downstream, upstream, revoke)
                        .await
                } else {
                    relay_until(downstream, upstream, revoke).await
                };
                counted.bytes(r.sent, r.received);
                let decision = decision.as_ref();
                info!(direction = "inbound", hbone = true, src_identity = %src,
                    src_workload = src_workload.as_deref(), src_addr = %peer, forwarded_for = req.forwarded_for.map(|a| a.to_string()).as_deref(),
                    dst_addr = %req.target, dst_workload = %pod.workload, upstream = %req.target,
                    authz_policy = decision.and_then(|d| d.policy.as_deref()),
                    authz_rule = decision.and_then(|d| d.rule), per_request,
                    bytes_sent = r.sent, bytes_received = r.received,
                    duration_ms = start.elapsed().as_millis() as u64, outcome = r.outcome(),
                    error = r.error_text().as_deref(),
                    "connection closed");
            })
        });
        let metrics = self.metrics.clone();
        let dst = pod.workload.clone();
        let refused = move |status: StatusCode, reason: &str| {
            metrics.hbone_refused.add("bad_request");
            info!(direction = "inbound", hbone = true, src_addr = %peer, dst_workload = %dst,
                outcome = "refused", status = status.as_u16(), error = reason, "connection closed");
        };
        if let Err(e) = hbone::server::serve(tls.stream, handler, refused).await {
            warn!(dst_workload = %pod.workload, src_addr = %peer, error = %e, "HBONE connection failed");
        }
    }
}
