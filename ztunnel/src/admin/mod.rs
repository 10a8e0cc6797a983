//! The operator's endpoints (docs/operations.md): Prometheus metrics on 15020, readiness on 15021, and
//! the admin API on 127.0.0.1:15000 — configuration dump, certificates (never keys), the open
//! connections, the pinned BPF state, and the log level, changeable at run time.
pub mod scrape;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{
    identity::CertificateCache,
    logging::SetLogLevel,
    proxy::{OpenConnection, Proxy},
};

/// The running proxy as the endpoints and the scrape-time metrics see it.
pub struct ProxyView {
    pub proxy: Arc<Proxy>,
    pub bpf_dir: PathBuf,
    /// The proxy holds the kernel's eBPF statistics on (`--bpf-stats`); the sysctl does not
    /// show that.
    pub bpf_stats_held: bool,
    /// The same-netns fast path's counters (docs/capture.md, "Fast path") and whether it is on.
    pub fast_path: Option<(Arc<crate::capture::fast_path::FastPathStats>, bool)>,
}

impl std::fmt::Debug for ProxyView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyView")
            .field("bpf_dir", &self.bpf_dir)
            .finish_non_exhaustive()
    }
}

/// What the endpoints read.
pub struct AdminState {
    pub registry: Registry,
    /// Set once the proxy captures and serves; cleared when it starts shutting down.
    pub ready: Arc<AtomicBool>,
    pub view: Arc<ProxyView>,
    pub set_log_level: Option<SetLogLevel>,
    /// The filter in force, as last set.
    pub log_level: std::sync::Mutex<String>,
}

/// Which endpoint set a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Metrics,
    Readiness,
    Admin,
}

/// Binds `addr` and serves `endpoint` there until the runtime stops. Binding fails loudly: an
/// operator who configured a port expects it.
pub async fn serve(
    endpoint: Endpoint,
    addr: SocketAddr,
    state: Arc<AdminState>,
) -> Result<tokio::task::JoinHandle<()>> {
    let bound = bind(endpoint, addr).await?;
    Ok(serve_on(bound, state))
}

/// An endpoint's port, bound but not served yet (so a busy port fails a start before it
/// changes any kernel state).
pub struct Bound {
    endpoint: Endpoint,
    listener: TcpListener,
}

pub async fn bind(endpoint: Endpoint, addr: SocketAddr) -> Result<Bound> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {endpoint:?} endpoint on {addr}"))?;
    Ok(Bound { endpoint, listener })
}

/// Serves a bound endpoint until the task is aborted.
pub fn serve_on(bound: Bound, state: Arc<AdminState>) -> tokio::task::JoinHandle<()> {
    let Bound { endpoint, listener } = bound;
    if let Ok(addr) = listener.local_addr() {
        info!(endpoint = ?endpoint, addr = %addr, "serving");
    }
    tokio::spawn(async move {
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(endpoint = ?endpoint, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(endpoint, &state, req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(v: &Value) -> Response<Full<Bytes>> {
    let mut r = text(
        StatusCode::OK,
        serde_json::to_string_pretty(v).unwrap_or_default() + "\n",
    );
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn route(endpoint: Endpoint, state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (endpoint, req.method(), path) {
        (Endpoint::Metrics, &Method::GET, "/metrics" | "/stats/prometheus") => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
                Ok(()) => {
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        (Endpoint::Readiness, &Method::GET, "/healthz/ready") => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (Endpoint::Admin, &Method::GET, "/") => text(
            StatusCode::OK,
            "/config_dump   workloads, services and policies in force\n\
             /certs         workload certificates (no keys)\n\
             /connections   connections open now: both ends and identities, bytes so far, age\n\
             /bpf           pinned programs (with run statistics), maps and links\n\
             /logging       GET: the log filter; POST ?level=<filter>: change it\n",
        ),
        (Endpoint::Admin, &Method::GET, "/config_dump") => json_response(&config_dump(state)),
        (Endpoint::Admin, &Method::GET, "/certs") => {
            json_response(&certs(&state.view.proxy.mesh().certs))
        }
        (Endpoint::Admin, &Method::GET, "/connections") => {
            json_response(&connections(&state.view.proxy.open_connections()))
        }
        (Endpoint::Admin, &Method::GET, "/bpf") => {
            let mut inventory = crate::capture::inventory::inventory(&state.view.bpf_dir);
            inventory.stats_enabled |= state.view.bpf_stats_held;
            json_response(&serde_json::to_value(inventory).unwrap_or_default())
        }
        (Endpoint::Admin, &Method::GET, "/logging") => {
            let level = state.log_level.lock().unwrap_or_else(|p| p.into_inner());
            text(StatusCode::OK, format!("{level}\n"))
        }
        (Endpoint::Admin, &Method::POST, "/logging") => set_log_level(state, req.uri().query()),
        (_, &Method::GET, _) => text(StatusCode::NOT_FOUND, "not found\n"),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
    }
}

fn set_log_level(state: &AdminState, query: Option<&str>) -> Response<Full<Bytes>> {
    let level = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "level")
            .map(|(_, v)| v.into_owned())
    });
    let Some(level) = level else {
        return text(
            StatusCode::BAD_REQUEST,
            "expected ?level=<filter>, e.g. debug or info,ztunnel::proxy=debug\n",
        );
    };
    let Some(set) = &state.set_log_level else {
        return text(
            StatusCode::NOT_IMPLEMENTED,
            "the log level cannot be changed\n",
        );
    };
    match set(&level) {
        Ok(()) => {
            info!(filter = %level, "log filter changed");
            *state.log_level.lock().unwrap_or_else(|p| p.into_inner()) = level.clone();
            text(StatusCode::OK, format!("{level}\n"))
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Public parts only: the key never leaves the certificate cache.
fn certs(cache: &CertificateCache) -> Value {
    let now = SystemTime::now();
    let certs: Vec<Value> = cache
        .current()
        .iter()
        .map(|c| {
            let pem: Vec<String> = c
                .chain
                .iter()
                .map(|der| pem_certificate(der.as_ref()))
                .collect();
            json!({
                "identity": c.id.to_string(),
                "not_before": unix(c.not_before),
                "not_after": unix(c.not_after),
                "expires_in_seconds": c.not_after.duration_since(now).map(|d| d.as_secs()).unwrap_or(0),
                "chain_pem": pem,
            })
        })
        .collect();
    json!({ "certificates": certs, "issued": cache.issued(), "rotation_failures": cache.rotation_failures() })
}

/// Each open connection as its `connection closed` line will name it, with the bytes so far.
fn connections(open: &[Arc<OpenConnection>]) -> Value {
    let list: Vec<Value> = open
        .iter()
        .map(|c| {
            let l = &c.line;
            let (sent, received) = c.bytes();
            let opened = c.opened().duration_since(UNIX_EPOCH).unwrap_or_default();
            json!({
                "workload": c.workload(),
                "direction": c.direction.as_str(),
                "transport": l.transport.map(|t| t.as_str()),
                "src_workload": l.src_workload,
                "src_identity": l.src_identity,
                "src_addr": l.src_addr,
                "dst_addr": l.dst_addr,
                "dst_service": l.dst_service,
                "dst_workload": l.dst_workload,
                "dst_identity": l.dst_identity,
                "upstream": l.upstream,
                "hbone_connection": l.hbone_connection,
                "authz_policy": l.authz_policy,
                "bytes_sent": sent,
                "bytes_received": received,
                "opened": opened.as_secs(),
                "age_ms": c.age().as_millis() as u64,
            })
        })
        .collect();
    json!({ "connections": list })
}

fn pem_certificate(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fn config_dump(state: &AdminState) -> Value {
    let proxy = &state.view.proxy;
    let s = proxy.snapshot();
    let enrolled = proxy.local_workloads();
    let pods: Vec<Value> = s
        .pods
        .values()
        .map(|p| {
            json!({
                "workload": p.workload(),
                "service_account": p.service_account,
                "node": p.node_name,
                "ips": p.ips,
                "labels": p.labels,
                "host_network": p.host_network,
                "enrolled_here": enrolled.contains(&p.workload()),
                "origin": p.origin.to_string(),
            })
        })
        .collect();
    let services: Vec<Value> = s
        .services
        .values()
        .map(|svc| {
            json!({
                "service": format!("{}/{}", svc.namespace, svc.name),
                "vips": svc.vips,
                "selector": svc.selector,
                "ports": svc.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
                "origin": svc.origin.to_string(),
            })
        })
        .collect();
    let namespaces: Vec<Value> = s
        .namespaces
        .values()
        .map(|ns| json!({"name": ns.name, "labels": ns.labels}))
        .collect();
    let authorization: Vec<Value> = s
        .authorization_policies
        .iter()
        .map(|p| {
            json!({
                "policy": p.id(),
                "action": p.action.to_string(),
                "provider": p.provider,
                "target": format!("{:?}", p.target),
                "rules": p.rules.len(),
                "origin": p.origin.to_string(),
            })
        })
        .collect();
    let peer: Vec<Value> = s
        .peer_authentications
        .iter()
        .map(|p| json!({"policy": p.id(), "origin": p.origin.to_string()}))
        .collect();
    let request: Vec<Value> = s
        .request_authentications
        .iter()
        .map(|p| json!({"policy": p.id(), "origin": p.origin.to_string()}))
        .collect();
    json!({
        "node": proxy.node(),
        "generation": s.generation,
        "root_namespace": s.root_namespace,
        "enrolled": enrolled,
        "namespaces": namespaces,
        "pods": pods,
        "services": services,
        "peer_authentications": peer,
        "authorization_policies": authorization,
        "request_authentications": request,
        "problems": s.problems,
        "certificates": certs(&proxy.mesh().certs)["certificates"],
    })
}
