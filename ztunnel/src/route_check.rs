//! `ztunnel route check`: where would this request go, and why? It builds the request the
//! outbound side would see and asks the snapshot's own decision
//! ([`Snapshot::http_route`], [`Snapshot::tcp_route`]) over the snapshot a configuration
//! directory gives the proxy, then lists each candidate cluster's endpoints and policy.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::Serialize;

use crate::{
    model::Service,
    policy_check::find_pod,
    state::Snapshot,
    traffic::{
        values::{service_fqdn, CLUSTER_DOMAIN},
        Abort, Cluster, HeaderEdits, HttpDecision, HttpRouteRequest, RetryPolicy, SourceWorkload,
        TcpDecision, TrafficPolicy, WeightedCluster,
    },
};

/// What to check; `None` fields take the defaults a client would send.
#[derive(Clone, Debug)]
pub struct RouteRequest {
    /// `namespace/name` of the client pod.
    pub from: String,
    /// `host:port`: a Service name as a client in `from`'s namespace would resolve it
    /// (`reviews`, `reviews.bookinfo`, `reviews.bookinfo.svc.cluster.local`) or a cluster IP.
    pub to: String,
    pub method: Option<String>,
    pub path: Option<String>,
    /// `name: value` pairs.
    pub headers: Vec<String>,
}

/// The answer, as printed with `--output json`.
#[derive(Clone, Debug, Serialize)]
pub struct RouteResult {
    /// `routed`, `no_virtual_service` (plain: to the addressed Service), `no_route` (404),
    /// `redirect`, `direct_response`, or `unroutable` (every destination answers 503).
    pub outcome: &'static str,
    /// `http` or `tcp` (an opaque port).
    pub evaluated_as: &'static str,
    /// The Service addressed, `namespace/name`.
    pub service: String,
    pub port: u16,
    pub virtual_service: Option<String>,
    /// Other VirtualServices for the same Service the client sees: ignored (not merged).
    pub ignored_virtual_services: Vec<String>,
    pub route: Option<RouteOut>,
    pub destinations: Vec<DestinationOut>,
    /// The status the proxy answers itself with (404, a redirect's, a direct response's).
    pub status: Option<u16>,
    pub location: Option<String>,
    pub rewrite: Option<RewriteOut>,
    pub headers: Option<HeaderOpsOut>,
    pub fault: Option<FaultOut>,
    /// Istio's duration form (`3s`, `500ms`); `null`: no timeout.
    pub timeout: Option<String>,
    pub retries: Option<RetriesOut>,
    pub mirrors: Vec<MirrorOut>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RouteOut {
    pub index: usize,
    pub name: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DestinationOut {
    pub host: String,
    pub subset: Option<String>,
    /// The subset's pod labels, from the DestinationRule.
    pub subset_labels: Option<std::collections::BTreeMap<String, String>>,
    pub port: Option<u16>,
    pub weight: u32,
    /// The share of requests it gets (weights split by their total).
    pub percent: f64,
    pub endpoints: Vec<EndpointOut>,
    /// Why its requests are answered 503 (unknown host, missing subset...).
    pub error: Option<String>,
    pub destination_rule: Option<String>,
    pub policy: Option<PolicyOut>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EndpointOut {
    pub pod: String,
    pub address: SocketAddr,
}

#[derive(Clone, Debug, Serialize)]
pub struct PolicyOut {
    pub load_balancer: String,
    pub connection_pool: Vec<String>,
    pub outlier_detection: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RewriteOut {
    pub path: Option<String>,
    pub authority: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HeaderOpsOut {
    pub request: Vec<String>,
    pub response: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FaultOut {
    pub delay: Option<DelayOut>,
    pub abort: Option<AbortOut>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DelayOut {
    pub fixed_delay: String,
    pub percentage: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct AbortOut {
    pub http_status: Option<u16>,
    pub grpc_status: Option<u32>,
    pub percentage: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RetriesOut {
    pub attempts: u32,
    pub per_try_timeout: Option<String>,
    pub retry_on: Vec<&'static str>,
    pub retriable_status_codes: Vec<u16>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MirrorOut {
    pub host: String,
    pub percentage: f64,
    pub error: Option<String>,
}

impl RouteResult {
    /// Exit status 0: the request reaches a destination or is answered by its route
    /// (redirect, direct response); 1: no route, or nothing to send it to.
    pub fn delivered(&self) -> bool {
        !matches!(self.outcome, "no_route" | "unroutable")
    }

    /// The answer for a person.
    pub fn text(&self) -> String {
        let mut out = format!(
            "{} to {}:{} ({}): {}\n",
            self.evaluated_as.to_uppercase(),
            self.service,
            self.port,
            match &self.virtual_service {
                Some(vs) => format!("VirtualService {vs}"),
                None => "no VirtualService".into(),
            },
            self.outcome.replace('_', " "),
        );
        for vs in &self.ignored_virtual_services {
            out.push_str(&format!(
                "  conflict: VirtualService {vs} also names this Service and is ignored\n"
            ));
        }
        if let Some(r) = &self.route {
            match &r.name {
                Some(n) => out.push_str(&format!("  route: #{} ({n})\n", r.index)),
                None => out.push_str(&format!("  route: #{}\n", r.index)),
            }
        }
        if let Some(s) = self.status {
            out.push_str(&format!("  answered by the proxy: {s}"));
            if let Some(l) = &self.location {
                out.push_str(&format!(" Location: {l}"));
            }
            out.push('\n');
        }
        for d in &self.destinations {
            out.push_str(&format!(
                "  destination: {}{}{} weight {} ({:.1}%)\n",
                d.host,
                d.port.map(|p| format!(":{p}")).unwrap_or_default(),
                d.subset
                    .as_ref()
                    .map(|s| format!(" subset {s}"))
                    .unwrap_or_default(),
                d.weight,
                d.percent
            ));
            if let Some(e) = &d.error {
                out.push_str(&format!("    503: {e}\n"));
            }
            if let Some(p) = &d.policy {
                out.push_str(&format!(
                    "    policy{}: loadBalancer {}",
                    d.destination_rule
                        .as_ref()
                        .map(|r| format!(" (DestinationRule {r})"))
                        .unwrap_or_default(),
                    p.load_balancer
                ));
                if !p.connection_pool.is_empty() {
                    out.push_str(&format!(
                        ", connectionPool {}",
                        p.connection_pool.join(", ")
                    ));
                }
                if let Some(o) = &p.outlier_detection {
                    out.push_str(&format!(", outlierDetection {o}"));
                }
                out.push('\n');
            }
            if d.error.is_none() && d.endpoints.is_empty() {
                out.push_str("    no endpoints (503)\n");
            }
            for e in &d.endpoints {
                out.push_str(&format!("    endpoint {} {}\n", e.address, e.pod));
            }
        }
        if let Some(rw) = &self.rewrite {
            if let Some(p) = &rw.path {
                out.push_str(&format!("  rewrite path: {p}\n"));
            }
            if let Some(a) = &rw.authority {
                out.push_str(&format!("  rewrite authority: {a}\n"));
            }
        }
        if let Some(h) = &self.headers {
            for e in &h.request {
                out.push_str(&format!("  request header: {e}\n"));
            }
            for e in &h.response {
                out.push_str(&format!("  response header: {e}\n"));
            }
        }
        if let Some(f) = &self.fault {
            if let Some(d) = &f.delay {
                out.push_str(&format!(
                    "  fault: delay {} for {}% of requests\n",
                    d.fixed_delay, d.percentage
                ));
            }
            if let Some(a) = &f.abort {
                let what = match (a.http_status, a.grpc_status) {
                    (Some(s), _) => format!("HTTP {s}"),
                    (None, Some(g)) => format!("gRPC status {g}"),
                    (None, None) => String::new(),
                };
                out.push_str(&format!(
                    "  fault: abort {what} for {}% of requests\n",
                    a.percentage
                ));
            }
        }
        if self.outcome == "routed" {
            out.push_str(&format!(
                "  timeout: {}\n",
                self.timeout.as_deref().unwrap_or("none")
            ));
        }
        if let Some(r) = &self.retries {
            out.push_str(&format!(
                "  retries: {} attempts{} on {}\n",
                r.attempts,
                r.per_try_timeout
                    .as_ref()
                    .map(|t| format!(" of {t} each"))
                    .unwrap_or_default(),
                r.retry_on.join(",")
            ));
        }
        for m in &self.mirrors {
            out.push_str(&format!("  mirror: {} for {}%", m.host, m.percentage));
            if let Some(e) = &m.error {
                out.push_str(&format!(" (not sent: {e})"));
            }
            out.push('\n');
        }
        out
    }
}

/// The Service `host` names for a client of `namespace`, as its DNS search path would find it
/// (`name`, `name.ns`, `name.ns.svc`, the FQDN), or by cluster IP.
fn find_service<'a>(
    snapshot: &'a Snapshot,
    host: &str,
    namespace: &str,
) -> Result<&'a Arc<Service>, String> {
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
        return snapshot
            .service_by_vip(ip)
            .ok_or_else(|| format!("{ip} is not the cluster IP of any Service"));
    }
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    let fqdn = match h.split('.').count() {
        1 => service_fqdn(&h, namespace),
        2 => format!("{h}.svc.{CLUSTER_DOMAIN}"),
        3 if h.ends_with(".svc") => format!("{h}.{CLUSTER_DOMAIN}"),
        _ => h.clone(),
    };
    snapshot
        .service_by_fqdn(&fqdn)
        .ok_or_else(|| format!("{host} ({fqdn}) is not a Service of the configuration"))
}

/// Answers `req` against `snapshot`; `Err` is bad input.
pub fn check(snapshot: &Snapshot, req: &RouteRequest) -> Result<RouteResult, String> {
    let from = find_pod(snapshot, "--from", &req.from)?;
    let (host, port) = req
        .to
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .filter(|(h, _)| !h.is_empty())
        .ok_or_else(|| format!("--to must be written host:port, got {:?}", req.to))?;
    let service = find_service(snapshot, host, &from.namespace)?;
    let Some(service_port) = snapshot.service_port(service, port) else {
        return Err(format!(
            "Service {}/{} has no port {port}",
            service.namespace, service.name
        ));
    };
    let source = SourceWorkload {
        namespace: &from.namespace,
        labels: &from.labels,
    };
    let mut result = RouteResult {
        outcome: "no_virtual_service",
        evaluated_as: "http",
        service: format!("{}/{}", service.namespace, service.name),
        port,
        virtual_service: None,
        ignored_virtual_services: snapshot
            .virtual_service_conflict(&from.namespace, service)
            .map(|c| c.ignored.iter().map(|v| v.to_string()).collect())
            .unwrap_or_default(),
        route: None,
        destinations: Vec::new(),
        status: None,
        location: None,
        rewrite: None,
        headers: None,
        fault: None,
        timeout: None,
        retries: None,
        mirrors: Vec::new(),
    };
    let opaque = service_port.protocol().is_some_and(|p| !p.is_http());
    if opaque {
        result.evaluated_as = "tcp";
        let dst = SocketAddr::new(
            service
                .vips
                .first()
                .copied()
                .unwrap_or(IpAddr::from([0, 0, 0, 0])),
            port,
        );
        match snapshot.tcp_route(source, service, dst) {
            TcpDecision::NoVirtualService => {
                result.destinations = vec![plain(snapshot, source, service, port)];
            }
            TcpDecision::NoRoute { virtual_service } => {
                result.outcome = "no_route";
                result.virtual_service = Some(virtual_service.to_string());
            }
            TcpDecision::Routed {
                virtual_service,
                route,
                destinations,
            } => {
                result.outcome = "routed";
                result.virtual_service = Some(virtual_service.to_string());
                result.route = Some(RouteOut {
                    index: route.index,
                    name: route.name,
                });
                result.destinations = weighted(snapshot, &destinations);
            }
        }
        return Ok(finish(result));
    }

    let method = match &req.method {
        Some(m) => Method::from_bytes(m.as_bytes()).map_err(|_| format!("bad method {m:?}"))?,
        None => Method::GET,
    };
    let path = req.path.clone().unwrap_or_else(|| "/".into());
    if !path.starts_with('/') {
        return Err(format!("--path must start with /, got {path:?}"));
    }
    let mut headers = HeaderMap::new();
    for h in &req.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| format!("--header must be written 'name: value', got {h:?}"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("bad header name in {h:?}"))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| format!("bad header value in {h:?}"))?;
        headers.append(name, value);
    }
    let authority = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| req.to.clone());
    let decision = snapshot.http_route(&HttpRouteRequest {
        source,
        service,
        port,
        method: &method,
        path: &path,
        authority: &authority,
        headers: &headers,
    });
    result.virtual_service = decision.virtual_service().map(|v| v.to_string());
    match decision {
        HttpDecision::NoVirtualService => {
            result.destinations = vec![plain(snapshot, source, service, port)];
        }
        HttpDecision::NoRoute { .. } => {
            result.outcome = "no_route";
            result.status = Some(404);
        }
        HttpDecision::Redirect {
            route,
            status,
            location,
            ..
        } => {
            result.outcome = "redirect";
            result.route = Some(RouteOut {
                index: route.index,
                name: route.name,
            });
            result.status = Some(status);
            result.location = Some(location);
        }
        HttpDecision::DirectResponse { route, status, .. } => {
            result.outcome = "direct_response";
            result.route = Some(RouteOut {
                index: route.index,
                name: route.name,
            });
            result.status = Some(status);
        }
        HttpDecision::Routed(action) => {
            result.outcome = "routed";
            result.route = Some(RouteOut {
                index: action.route.index,
                name: action.route.name.clone(),
            });
            result.destinations = weighted(snapshot, &action.destinations);
            result.rewrite = action.rewrite.as_ref().map(|r| RewriteOut {
                path: r.path.clone(),
                authority: r.authority.clone(),
            });
            let ops = HeaderOpsOut {
                request: edits(&action.headers.request),
                response: edits(&action.headers.response),
            };
            if !ops.request.is_empty() || !ops.response.is_empty() {
                result.headers = Some(ops);
            }
            let f = &action.fault;
            if f.delay.is_some() || f.abort.is_some() {
                result.fault = Some(FaultOut {
                    delay: f.delay.map(|d| DelayOut {
                        fixed_delay: duration(d.duration),
                        percentage: d.percentage.percent(),
                    }),
                    abort: f.abort.map(|a| AbortOut {
                        http_status: match a.status {
                            Abort::Http(s) => Some(s),
                            Abort::Grpc(_) => None,
                        },
                        grpc_status: match a.status {
                            Abort::Grpc(g) => Some(g),
                            Abort::Http(_) => None,
                        },
                        percentage: a.percentage.percent(),
                    }),
                });
            }
            result.timeout = action.timeout.map(duration);
            result.retries = Some(retries(&action.retries));
            result.mirrors = action
                .mirrors
                .iter()
                .map(|m| MirrorOut {
                    host: m.host.clone(),
                    percentage: m.percentage.percent(),
                    error: m.target.as_ref().err().map(|e| e.to_string()),
                })
                .collect();
        }
    }
    Ok(finish(result))
}

/// A routed request none of whose destinations can be reached is `unroutable`.
fn finish(mut r: RouteResult) -> RouteResult {
    if r.outcome == "routed" && r.destinations.iter().all(|d| d.error.is_some()) {
        r.outcome = "unroutable";
    }
    r
}

/// The addressed Service itself, as traffic no VirtualService routes reaches it.
fn plain(
    snapshot: &Snapshot,
    source: SourceWorkload<'_>,
    service: &Arc<Service>,
    port: u16,
) -> DestinationOut {
    let policy = snapshot.destination_policy(source, service, None, port);
    DestinationOut {
        host: service_fqdn(&service.name, &service.namespace),
        subset: None,
        subset_labels: None,
        port: Some(port),
        weight: 100,
        percent: 100.0,
        endpoints: endpoints(snapshot.endpoints(service, port)),
        error: None,
        destination_rule: None,
        policy: Some(policy_out(&policy)),
    }
}

fn weighted(snapshot: &Snapshot, destinations: &[WeightedCluster]) -> Vec<DestinationOut> {
    let total: u64 = destinations.iter().map(|d| u64::from(d.weight)).sum();
    destinations
        .iter()
        .map(|d| {
            let percent = match total {
                0 => 100.0 / destinations.len() as f64,
                t => f64::from(d.weight) * 100.0 / t as f64,
            };
            let mut out = DestinationOut {
                host: d.host.clone(),
                subset: d.subset.clone(),
                subset_labels: None,
                port: None,
                weight: d.weight,
                percent,
                endpoints: Vec::new(),
                error: None,
                destination_rule: None,
                policy: None,
            };
            match &d.target {
                Ok(c) => fill(snapshot, c, &mut out),
                Err(e) => out.error = Some(e.to_string()),
            }
            out
        })
        .collect()
}

fn fill(snapshot: &Snapshot, c: &Cluster, out: &mut DestinationOut) {
    out.port = Some(c.port);
    out.subset_labels = c.subset.as_ref().map(|s| {
        s.labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    });
    out.endpoints = endpoints(snapshot.cluster_endpoints(c));
    out.destination_rule = c.destination_rule.as_ref().map(|r| r.to_string());
    out.policy = Some(policy_out(&c.policy));
}

fn endpoints(list: Vec<crate::state::Endpoint>) -> Vec<EndpointOut> {
    list.into_iter()
        .map(|e| EndpointOut {
            pod: e.pod.workload(),
            address: e.addr,
        })
        .collect()
}

fn policy_out(p: &TrafficPolicy) -> PolicyOut {
    PolicyOut {
        load_balancer: p.load_balancer.describe(),
        connection_pool: p.connection_pool.describe(),
        outlier_detection: p.outlier_detection.as_ref().map(|o| o.describe()),
    }
}

fn edits(e: &HeaderEdits) -> Vec<String> {
    let value = |v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    let mut out = Vec::new();
    out.extend(e.remove.iter().map(|n| format!("remove {n}")));
    out.extend(e.set.iter().map(|(n, v)| format!("set {n}: {}", value(v))));
    out.extend(e.add.iter().map(|(n, v)| format!("add {n}: {}", value(v))));
    out
}

fn retries(r: &RetryPolicy) -> RetriesOut {
    RetriesOut {
        attempts: r.attempts,
        per_try_timeout: r.per_try_timeout.map(duration),
        retry_on: r.retry_on.iter().map(|c| c.as_str()).collect(),
        retriable_status_codes: r.status_codes.clone(),
    }
}

/// Istio's duration form: whole seconds as `7s`, else milliseconds.
fn duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod decision_tables;
