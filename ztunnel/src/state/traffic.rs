//! Traffic rules as a snapshot answers for them: which VirtualService applies to a client's
//! traffic to a Service, which DestinationRule (client's namespace, then the service's, then
//! the root namespace, as Istio looks them up), and what a route's destination resolves to (a
//! Service port, a subset of its endpoints, the policy of that cluster).
//!
//! The outbound side and `ztunnel route check` both decide with these, so the check answers
//! what the proxy does.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use super::{Endpoint, Key, Snapshot};
use crate::{
    model::{Labels, Service},
    traffic::{
        values::{service_fqdn, HostPattern, CLUSTER_DOMAIN},
        virtual_service::{Destination, HttpAction, RequestView, Source},
        AbortFault, Cluster, Conflict, Delay, DestinationRule, FaultAction, HeaderOps,
        HttpDecision, HttpRouteRequest, MirrorAction, ObjectRef, RewriteAction, RouteAction,
        RouteRef, SourceWorkload, TcpDecision, TrafficPolicy, Unroutable, VirtualService,
        WeightedCluster,
    },
};

/// The traffic rules of a snapshot, indexed.
#[derive(Debug, Default)]
pub struct TrafficIndex {
    pub virtual_services: Vec<Arc<VirtualService>>,
    pub destination_rules: Vec<Arc<DestinationRule>>,
    /// Per Service, the mesh VirtualServices naming it, most specific host first, then
    /// oldest, then by namespace and name.
    by_service: HashMap<Key, Vec<Arc<VirtualService>>>,
    /// Per namespace, its DestinationRules merged by host (oldest first).
    rules_by_namespace: HashMap<String, Vec<Arc<DestinationRule>>>,
    /// Endpoints per Service port, computed on first use.
    endpoints: EndpointCache,
}

type EndpointCache = RwLock<HashMap<(Key, u16), Arc<Vec<Endpoint>>>>;

/// The VirtualService a client's traffic to a Service takes, and those it shadows.
#[derive(Debug, Default)]
pub struct Selection<'a> {
    pub chosen: Option<&'a Arc<VirtualService>>,
    /// Other VirtualServices visible to the client for the same Service: not merged (Istio
    /// does not merge them for mesh traffic either), ignored for it.
    pub shadowed: Vec<&'a Arc<VirtualService>>,
}

impl TrafficIndex {
    /// Indexes the rules against the Services; what cannot work is added to `problems`.
    pub(super) fn build(
        mut virtual_services: Vec<Arc<VirtualService>>,
        destination_rules: Vec<Arc<DestinationRule>>,
        services: &imbl::OrdMap<Key, Arc<Service>>,
        problems: &mut Vec<String>,
    ) -> Self {
        virtual_services.sort_by(|a, b| a.precedence_key().cmp(&b.precedence_key()));
        let mut by_service: HashMap<Key, Vec<(usize, Arc<VirtualService>)>> = HashMap::new();
        for vs in virtual_services.iter() {
            for note in &vs.unsupported {
                problems.push(format!(
                    "VirtualService {} ({}): {note}",
                    vs.id(),
                    vs.origin
                ));
            }
            if !vs.mesh {
                continue;
            }
            let mut named_any = false;
            for (key, svc) in services {
                let fqdn = service_fqdn(&svc.name, &svc.namespace);
                if let Some(spec) = vs
                    .hosts
                    .iter()
                    .filter_map(|h| h.specificity(&fqdn, &svc.vips))
                    .max()
                {
                    by_service
                        .entry(key.clone())
                        .or_default()
                        .push((spec, vs.clone()));
                    named_any = true;
                }
            }
            if !named_any {
                let hosts: Vec<String> = vs.hosts.iter().map(|h| h.to_string()).collect();
                problems.push(format!(
                    "VirtualService {} ({}): its hosts ({}) name no Service; it routes nothing",
                    vs.id(),
                    vs.origin,
                    hosts.join(", ")
                ));
            }
        }
        let by_service: HashMap<Key, Vec<Arc<VirtualService>>> = by_service
            .into_iter()
            .map(|(key, mut list)| {
                // Stable: the precedence order of `virtual_services` is kept among equals.
                list.sort_by_key(|e| std::cmp::Reverse(e.0));
                (key, list.into_iter().map(|(_, vs)| vs).collect())
            })
            .collect();
        // In Service order: the problems of equal configurations read the same.
        let mut shadowing: Vec<_> = by_service.iter().filter(|(_, l)| l.len() > 1).collect();
        shadowing.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (key, list) in shadowing {
            if let [first, rest @ ..] = list.as_slice() {
                for other in rest {
                    problems.push(format!(
                        "VirtualServices {} ({}) and {} ({}) both route Service {}/{}; for clients that see both, {} is used (most specific host, then oldest, then name) and {} is ignored: Istio does not merge them for mesh traffic either",
                        first.id(), first.origin, other.id(), other.origin, key.0, key.1, first.id(), other.id()
                    ));
                }
            }
        }

        // Merged below: each rule is copied (rarely more than a few per namespace).
        let mut rules: Vec<DestinationRule> = destination_rules
            .into_iter()
            .map(Arc::unwrap_or_clone)
            .collect();
        rules.sort_by(|a, b| a.precedence_key().cmp(&b.precedence_key()));
        let mut merged: Vec<DestinationRule> = Vec::new();
        for dr in rules {
            for note in &dr.unsupported {
                problems.push(format!(
                    "DestinationRule {} ({}): {note}",
                    dr.id(),
                    dr.origin
                ));
            }
            if let Some(host) = match &dr.host {
                HostPattern::Exact(h) => Some(h),
                _ => None,
            } {
                if service_key(host).is_none_or(|k| !services.contains_key(&k)) {
                    problems.push(format!(
                        "DestinationRule {} ({}): host {host} is not a known Service",
                        dr.id(),
                        dr.origin
                    ));
                }
            }
            // Istio merges the rules of one namespace and host (no workload selector).
            match merged.iter_mut().find(|m| {
                m.namespace == dr.namespace
                    && m.host == dr.host
                    && m.workload_selector.is_none()
                    && dr.workload_selector.is_none()
            }) {
                Some(first) => {
                    for s in &dr.subsets {
                        if first.subset(&s.name).is_some() {
                            problems.push(format!(
                                "DestinationRules {} and {} ({}) both define subset {} of {}; the one of {} is used",
                                first.id(), dr.id(), dr.origin, s.name, dr.host, first.id()
                            ));
                        }
                    }
                    first.merge(&dr);
                }
                None => merged.push(dr),
            }
        }
        let destination_rules: Vec<Arc<DestinationRule>> =
            merged.into_iter().map(Arc::new).collect();
        let mut rules_by_namespace: HashMap<String, Vec<Arc<DestinationRule>>> = HashMap::new();
        for dr in &destination_rules {
            rules_by_namespace
                .entry(dr.namespace.clone())
                .or_default()
                .push(dr.clone());
        }
        let index = TrafficIndex {
            virtual_services,
            destination_rules,
            by_service,
            rules_by_namespace,
            endpoints: RwLock::default(),
        };
        index.check_destinations(services, problems);
        index
    }

    /// The same rules for a snapshot whose Services did not change: the endpoints, which
    /// follow the pods, are computed again on use.
    pub(super) fn share(&self) -> Self {
        TrafficIndex {
            virtual_services: self.virtual_services.clone(),
            destination_rules: self.destination_rules.clone(),
            by_service: self.by_service.clone(),
            rules_by_namespace: self.rules_by_namespace.clone(),
            endpoints: RwLock::default(),
        }
    }

    /// Routes to hosts that are not Services, or to subsets no rule defines, are reported
    /// here; their requests are answered 503 (with the reason) when they come.
    fn check_destinations(
        &self,
        services: &imbl::OrdMap<Key, Arc<Service>>,
        problems: &mut Vec<String>,
    ) {
        for vs in self.virtual_services.iter().filter(|v| v.mesh) {
            let mut destinations: Vec<(String, &Destination)> = Vec::new();
            let mut splits: Vec<(String, Vec<u32>)> = Vec::new();
            for (i, r) in vs.http.iter().enumerate() {
                if let HttpAction::Forward(ds) = &r.action {
                    splits.push((format!("http[{i}]"), ds.iter().map(|d| d.weight).collect()));
                    destinations.extend(
                        ds.iter()
                            .enumerate()
                            .map(|(k, d)| (format!("http[{i}].route[{k}]"), &d.destination)),
                    );
                }
                destinations.extend(
                    r.mirrors
                        .iter()
                        .map(|m| (format!("http[{i}] mirror"), &m.destination)),
                );
            }
            for (i, r) in vs.tcp.iter().enumerate() {
                splits.push((
                    format!("tcp[{i}]"),
                    r.route.iter().map(|d| d.weight).collect(),
                ));
                destinations.extend(
                    r.route
                        .iter()
                        .enumerate()
                        .map(|(k, d)| (format!("tcp[{i}].route[{k}]"), &d.destination)),
                );
            }
            for (what, weights) in splits {
                let total: u32 = weights.iter().sum();
                if weights.len() > 1 && total != 100 {
                    problems.push(format!(
                        "VirtualService {} ({}) {what}: the weights add up to {total}, not 100; traffic is split by their total (as Istio does)",
                        vs.id(),
                        vs.origin
                    ));
                }
            }
            for (what, d) in destinations {
                let known = service_key(&d.fqdn).and_then(|k| services.get(&k));
                let Some(svc) = known else {
                    problems.push(format!(
                        "VirtualService {} ({}) {what}: host {} is not a known Service; its requests are answered 503",
                        vs.id(), vs.origin, d.fqdn
                    ));
                    continue;
                };
                if let Some(port) = d.port {
                    if !svc.ports.iter().any(|p| p.port == port) {
                        problems.push(format!(
                            "VirtualService {} ({}) {what}: Service {} has no port {port}",
                            vs.id(),
                            vs.origin,
                            d.fqdn
                        ));
                    }
                }
                if let Some(subset) = &d.subset {
                    let defined = self.destination_rules.iter().any(|dr| {
                        dr.host.specificity(&d.fqdn, &svc.vips).is_some()
                            && dr.subset(subset).is_some()
                    });
                    if !defined {
                        problems.push(format!(
                            "VirtualService {} ({}) {what}: subset {subset} of {} is not defined by any DestinationRule; its requests are answered 503",
                            vs.id(), vs.origin, d.fqdn
                        ));
                    }
                }
            }
        }
    }
}

/// `(namespace, name)` of `<name>.<namespace>.svc.cluster.local`.
pub fn service_key(fqdn: &str) -> Option<Key> {
    let rest = fqdn.strip_suffix(CLUSTER_DOMAIN)?.strip_suffix(".svc.")?;
    let (name, ns) = rest.split_once('.')?;
    (!name.is_empty() && !ns.is_empty() && !ns.contains('.'))
        .then(|| (ns.to_owned(), name.to_owned()))
}

impl Snapshot {
    pub fn service_by_fqdn(&self, fqdn: &str) -> Option<&Arc<Service>> {
        self.services.get(&service_key(fqdn)?)
    }

    /// The VirtualService that routes `src`'s traffic to `svc` (one it can see, that applies
    /// to mesh traffic), and the others it shadows.
    pub fn virtual_service_for(&self, src_namespace: &str, svc: &Service) -> Selection<'_> {
        let mut sel = Selection::default();
        let Some(list) = self
            .traffic
            .by_service
            .get(&(svc.namespace.clone(), svc.name.clone()))
        else {
            return sel;
        };
        for vs in list
            .iter()
            .filter(|v| v.export_to.visible_to(src_namespace))
        {
            match sel.chosen {
                None => sel.chosen = Some(vs),
                Some(_) => sel.shadowed.push(vs),
            }
        }
        sel
    }

    /// The DestinationRule for `fqdn` as `src` sees it: of the client's namespace (those
    /// selecting the client first), then of the Service's, then of the root namespace; in
    /// each, the most specific host. Rules must be exported to the client.
    pub fn destination_rule_for(
        &self,
        src: &Source<'_>,
        svc: &Service,
    ) -> Option<&Arc<DestinationRule>> {
        let fqdn = service_fqdn(&svc.name, &svc.namespace);
        let in_namespace = |ns: &str, own: bool| -> Option<&Arc<DestinationRule>> {
            let rules = self.traffic.rules_by_namespace.get(ns)?;
            let candidates = rules.iter().filter(|dr| {
                dr.export_to.visible_to(src.namespace)
                    && match &dr.workload_selector {
                        None => true,
                        Some(sel) => own && selects(sel, src.labels),
                    }
            });
            candidates
                .filter_map(|dr| {
                    let spec = dr.host.specificity(&fqdn, &svc.vips)?;
                    Some(((dr.workload_selector.is_some(), spec), dr))
                })
                .fold(
                    None::<((bool, usize), &Arc<DestinationRule>)>,
                    |best, (key, dr)| match best {
                        Some((k, _)) if k >= key => best,
                        _ => Some((key, dr)),
                    },
                )
                .map(|(_, dr)| dr)
        };
        in_namespace(src.namespace, true)
            .or_else(|| in_namespace(&svc.namespace, false))
            .or_else(|| in_namespace(&self.root_namespace, false))
    }

    /// Whether traffic from `src` to `svc` is routed by rules (a VirtualService or a
    /// DestinationRule applies), rather than carried as the plain connection it is.
    pub fn routes_by_rules(&self, src: &Source<'_>, svc: &Service) -> bool {
        self.virtual_service_for(src.namespace, svc)
            .chosen
            .is_some()
            || self.destination_rule_for(src, svc).is_some()
    }

    /// What `destination` (of a route of a VirtualService, or the default route) resolves to
    /// for `src`, for a request sent to Service port `request_port`.
    pub fn resolve_destination(
        &self,
        src: &Source<'_>,
        destination: &Destination,
        request_port: u16,
    ) -> Result<Cluster, Unroutable> {
        let service = self
            .service_by_fqdn(&destination.fqdn)
            .ok_or_else(|| Unroutable::UnknownHost(destination.fqdn.clone()))?;
        let port = match destination.port {
            Some(p) if service.ports.iter().any(|sp| sp.port == p) => p,
            Some(p) => {
                return Err(Unroutable::NoPort {
                    host: destination.fqdn.clone(),
                    why: format!("the Service has no port {p}"),
                })
            }
            None if service.ports.iter().any(|sp| sp.port == request_port) => request_port,
            None => match service.ports.as_slice() {
                [only] => only.port,
                _ => {
                    return Err(Unroutable::NoPort {
                        host: destination.fqdn.clone(),
                        why: format!(
                            "the Service has no port {request_port} and the route names none of its ports"
                        ),
                    })
                }
            },
        };
        let rule = self.destination_rule_for(src, service);
        let subset = match &destination.subset {
            None => None,
            Some(name) => Some(rule.and_then(|r| r.subset(name)).cloned().ok_or_else(|| {
                Unroutable::MissingSubset {
                    host: destination.fqdn.clone(),
                    subset: name.clone(),
                }
            })?),
        };
        let policy = match rule {
            Some(r) => r.policy_for(subset.as_ref(), port),
            None => TrafficPolicy::default(),
        };
        let protocol = service
            .ports
            .iter()
            .find(|sp| sp.port == port)
            .and_then(|sp| sp.protocol());
        Ok(Cluster {
            fqdn: service_fqdn(&service.name, &service.namespace),
            service: service.clone(),
            port,
            protocol,
            subset,
            destination_rule: rule.map(|r| ObjectRef {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
            }),
            policy,
        })
    }

    /// The default destination of traffic to `svc`:`port` (no route names another).
    pub fn default_destination(svc: &Service, port: u16) -> Destination {
        let fqdn = service_fqdn(&svc.name, &svc.namespace);
        Destination {
            host: fqdn.clone(),
            fqdn,
            subset: None,
            port: Some(port),
        }
    }

    /// The endpoints of a cluster: the Service port's endpoints (both address families) whose
    /// pods the subset's labels select.
    pub fn cluster_endpoints(&self, cluster: &Cluster) -> Vec<Endpoint> {
        let all = self.port_endpoints(&cluster.service, cluster.port);
        all.iter()
            .filter(|e| {
                cluster
                    .subset
                    .as_ref()
                    .is_none_or(|s| s.selects(&e.pod.labels))
            })
            .cloned()
            .collect()
    }

    /// [`Snapshot::endpoints`], computed once per snapshot and Service port.
    fn port_endpoints(&self, svc: &Service, port: u16) -> Arc<Vec<Endpoint>> {
        let key = ((svc.namespace.clone(), svc.name.clone()), port);
        if let Some(e) = self
            .traffic
            .endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return e.clone();
        }
        let computed = Arc::new(self.endpoints(svc, port));
        self.traffic
            .endpoints
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, computed.clone());
        computed
    }
}

/// The decisions the data path and `ztunnel route check` take (see [`crate::traffic`]).
impl Snapshot {
    /// Which route one HTTP request takes, resolved down to clusters and policies.
    pub fn http_route(&self, req: &HttpRouteRequest<'_>) -> HttpDecision {
        let src = Source {
            namespace: req.source.namespace,
            labels: req.source.labels,
        };
        let Some(vs) = self.virtual_service_for(src.namespace, req.service).chosen else {
            return HttpDecision::NoVirtualService;
        };
        if vs.http.is_empty() {
            // Only `tcp` (or unsupported `tls`) routes: HTTP takes the default route.
            return HttpDecision::NoVirtualService;
        }
        let virtual_service = object_ref(&vs.namespace, &vs.name);
        let (path, query) = match req.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (req.path, None),
        };
        let view = RequestView {
            method: req.method.as_str(),
            path,
            query,
            authority: req.authority,
            scheme: "http",
            port: req.port,
            headers: req.headers,
        };
        let Some(matched) = vs.http_route(&view, &src) else {
            return HttpDecision::NoRoute { virtual_service };
        };
        let route = matched.route;
        let route_ref = RouteRef {
            index: matched.index,
            name: route_name(
                route.name.as_deref(),
                matched.matched.and_then(|m| m.name.as_deref()),
            ),
        };
        let destinations = match &route.action {
            HttpAction::Forward(ds) => ds
                .iter()
                .map(|d| WeightedCluster {
                    host: d.destination.fqdn.clone(),
                    subset: d.destination.subset.clone(),
                    weight: d.weight,
                    headers: d.headers.clone(),
                    target: self.resolve_destination(&src, &d.destination, req.port),
                })
                .collect(),
            HttpAction::Redirect(r) => {
                return HttpDecision::Redirect {
                    virtual_service,
                    route: route_ref,
                    status: r.code,
                    location: r.location(req.authority, req.path, req.port),
                }
            }
            HttpAction::DirectResponse { status, body } => {
                return HttpDecision::DirectResponse {
                    virtual_service,
                    route: route_ref,
                    status: *status,
                    body: body.clone(),
                }
            }
            HttpAction::Unsupported(what) => vec![WeightedCluster {
                host: service_fqdn(&req.service.name, &req.service.namespace),
                subset: None,
                weight: 100,
                headers: HeaderOps::default(),
                target: Err(Unroutable::Unsupported(what)),
            }],
        };
        let new_path = matched.rewritten_path(path).map(|p| match query {
            Some(q) => format!("{p}?{q}"),
            None => p,
        });
        let new_authority = route
            .rewrite
            .as_ref()
            .and_then(|r| r.authority.clone())
            .or_else(|| route.headers.authority.clone());
        let rewrite = (new_path.is_some() || new_authority.is_some()).then_some(RewriteAction {
            path: new_path,
            authority: new_authority,
        });
        let fault = FaultAction {
            delay: route.fault.delay.map(|(duration, percentage)| Delay {
                duration,
                percentage,
            }),
            abort: route
                .fault
                .abort
                .map(|(status, percentage)| AbortFault { status, percentage }),
        };
        let mirrors = route
            .mirrors
            .iter()
            .map(|m| MirrorAction {
                host: m.destination.fqdn.clone(),
                target: self.resolve_destination(&src, &m.destination, req.port),
                percentage: m.share,
            })
            .collect();
        HttpDecision::Routed(Box::new(RouteAction {
            virtual_service,
            route: route_ref,
            destinations,
            rewrite,
            headers: route.headers.clone(),
            fault,
            timeout: route.timeout,
            retries: route.retries.clone(),
            mirrors,
        }))
    }

    /// Which `tcp` route an opaque connection from `source` to `service`, dialled at `dst`
    /// (a cluster IP and Service port), takes.
    pub fn tcp_route(
        &self,
        source: SourceWorkload<'_>,
        service: &Service,
        dst: SocketAddr,
    ) -> TcpDecision {
        let src = Source {
            namespace: source.namespace,
            labels: source.labels,
        };
        let Some(vs) = self.virtual_service_for(src.namespace, service).chosen else {
            return TcpDecision::NoVirtualService;
        };
        if vs.tcp.is_empty() {
            return TcpDecision::NoVirtualService;
        }
        let virtual_service = object_ref(&vs.namespace, &vs.name);
        let Some((index, route)) = vs.tcp_route(dst.ip(), dst.port(), &src) else {
            return TcpDecision::NoRoute { virtual_service };
        };
        TcpDecision::Routed {
            virtual_service,
            route: RouteRef { index, name: None },
            destinations: route
                .route
                .iter()
                .map(|d| WeightedCluster {
                    host: d.destination.fqdn.clone(),
                    subset: d.destination.subset.clone(),
                    weight: d.weight,
                    headers: HeaderOps::default(),
                    target: self.resolve_destination(&src, &d.destination, dst.port()),
                })
                .collect(),
        }
    }

    /// The DestinationRule policy for `source`'s traffic to `service`'s `port` (a Service
    /// port) and `subset`: for traffic no VirtualService routes (`subset` `None`) as much as
    /// for a routed cluster (whose [`Cluster::policy`] is this). A subset no rule defines has
    /// the rule's policy without subset-level settings.
    pub fn destination_policy(
        &self,
        source: SourceWorkload<'_>,
        service: &Service,
        subset: Option<&str>,
        port: u16,
    ) -> TrafficPolicy {
        let src = Source {
            namespace: source.namespace,
            labels: source.labels,
        };
        match self.destination_rule_for(&src, service) {
            Some(rule) => rule.policy_for(subset.and_then(|s| rule.subset(s)), port),
            None => TrafficPolicy::default(),
        }
    }

    /// The VirtualServices `source` sees for `service` when more than one names it.
    pub fn virtual_service_conflict(
        &self,
        source_namespace: &str,
        service: &Service,
    ) -> Option<Conflict> {
        let sel = self.virtual_service_for(source_namespace, service);
        let chosen = sel.chosen?;
        (!sel.shadowed.is_empty()).then(|| Conflict {
            chosen: object_ref(&chosen.namespace, &chosen.name),
            ignored: sel
                .shadowed
                .iter()
                .map(|v| object_ref(&v.namespace, &v.name))
                .collect(),
        })
    }
}

fn object_ref(namespace: &str, name: &str) -> ObjectRef {
    ObjectRef {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

/// As Istio names an Envoy route: the route's name, then `.` and the match block's name.
fn route_name(route: Option<&str>, matched: Option<&str>) -> Option<String> {
    match (route, matched) {
        (Some(r), Some(m)) => Some(format!("{r}.{m}")),
        (Some(r), None) => Some(r.to_owned()),
        (None, Some(m)) => Some(m.to_owned()),
        (None, None) => None,
    }
}

fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_keys_read_cluster_names_only() {
        assert_eq!(
            service_key("reviews.bookinfo.svc.cluster.local"),
            Some(("bookinfo".into(), "reviews".into()))
        );
        assert_eq!(service_key("reviews.bookinfo"), None);
        assert_eq!(service_key("a.b.c.svc.cluster.local"), None);
    }
}
