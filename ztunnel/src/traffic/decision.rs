//! The decisions the snapshot hands the data path (see the module documentation of
//! [`crate::traffic`] for what to do with each field) and `ztunnel route check` prints.
//! Everything is resolved: hosts to Services, subsets to label selectors, DestinationRules to
//! the merged [`TrafficPolicy`], rewrites to the new path; nothing here needs another lookup.
use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Method};

use super::{
    destination_rule::{Subset, TrafficPolicy},
    retry::RetryPolicy,
    values::Share,
    virtual_service::{Abort, HeaderOps},
};
use crate::model::{AppProtocol, Labels, Service};

/// The client a decision is made for: the source pod's namespace and labels
/// (`sourceNamespace`, `sourceLabels`, `exportTo` and DestinationRule lookup read them).
#[derive(Clone, Copy, Debug)]
pub struct SourceWorkload<'a> {
    pub namespace: &'a str,
    pub labels: &'a Labels,
}

/// One HTTP request as the client sent it, to a Service (found by the cluster IP it dialled).
#[derive(Clone, Copy, Debug)]
pub struct HttpRouteRequest<'a> {
    pub source: SourceWorkload<'a>,
    pub service: &'a Service,
    /// The Service port the connection was addressed to.
    pub port: u16,
    pub method: &'a Method,
    /// `:path` as sent: path and query string.
    pub path: &'a str,
    /// `:authority`, or HTTP/1.1's `Host`.
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
}

/// A VirtualService or DestinationRule, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A route of a VirtualService: its index in `http` (or `tcp`), and its name with the name of
/// the match block that admitted the request (`route.match`, as Istio names Envoy routes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteRef {
    pub index: usize,
    pub name: Option<String>,
}

impl fmt::Display for RouteRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(n) => f.write_str(n),
            None => write!(f, "{}", self.index),
        }
    }
}

/// Several VirtualServices the client sees name one Service: `chosen` routes, the others are
/// ignored (Istio does not merge them for mesh traffic either).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub chosen: ObjectRef,
    pub ignored: Vec<ObjectRef>,
}

/// What to do with one HTTP request.
#[derive(Clone, Debug)]
pub enum HttpDecision {
    /// No VirtualService applies: to the addressed Service and port, as without rules.
    NoVirtualService,
    /// A VirtualService applies and no route matched: `404` (Envoy's `NR`).
    NoRoute {
        virtual_service: ObjectRef,
    },
    /// `redirect`: answer `status` with `Location: location`.
    Redirect {
        virtual_service: ObjectRef,
        route: RouteRef,
        status: u16,
        location: String,
    },
    /// `directResponse`: answer `status` with `body`.
    DirectResponse {
        virtual_service: ObjectRef,
        route: RouteRef,
        status: u16,
        body: Bytes,
    },
    Routed(Box<RouteAction>),
}

impl HttpDecision {
    pub fn virtual_service(&self) -> Option<&ObjectRef> {
        match self {
            HttpDecision::NoVirtualService => None,
            HttpDecision::NoRoute { virtual_service }
            | HttpDecision::Redirect {
                virtual_service, ..
            }
            | HttpDecision::DirectResponse {
                virtual_service, ..
            } => Some(virtual_service),
            HttpDecision::Routed(a) => Some(&a.virtual_service),
        }
    }
}

/// A matched route, resolved.
#[derive(Clone, Debug)]
pub struct RouteAction {
    pub virtual_service: ObjectRef,
    pub route: RouteRef,
    /// Never empty. Pick one by `weight` (relative weights: split by their total).
    pub destinations: Vec<WeightedCluster>,
    /// `None`: the request keeps its path and authority.
    pub rewrite: Option<RewriteAction>,
    /// The route's header edits (a picked destination's own come after these).
    pub headers: HeaderOps,
    pub fault: FaultAction,
    /// The whole request, retries included; `None`: no timeout (Istio's default).
    pub timeout: Option<Duration>,
    /// Istio's default when the route says nothing: 2 attempts on
    /// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`.
    pub retries: RetryPolicy,
    pub mirrors: Vec<MirrorAction>,
}

/// One weighted destination of a route.
#[derive(Clone, Debug)]
pub struct WeightedCluster {
    /// As the route names it: `reviews.bookinfo.svc.cluster.local`.
    pub host: String,
    pub subset: Option<String>,
    pub weight: u32,
    /// Header edits that apply when this destination is picked.
    pub headers: HeaderOps,
    /// `Err`: answer `503` with the reason (the configuration check reported it too).
    pub target: Result<Cluster, Unroutable>,
}

/// Where traffic goes: a Service port, a subset of its endpoints, and the DestinationRule
/// policy in force for that cluster.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub service: Arc<Service>,
    /// `<name>.<namespace>.svc.cluster.local`.
    pub fqdn: String,
    /// The Service port.
    pub port: u16,
    /// What the Service port declares (`None`: undeclared, sniffed).
    pub protocol: Option<AppProtocol>,
    /// The subset, its label selector resolved from the DestinationRule.
    pub subset: Option<Subset>,
    /// The DestinationRule the policy came from (`None`: Istio's defaults).
    pub destination_rule: Option<ObjectRef>,
    pub policy: TrafficPolicy,
}

impl Cluster {
    /// `outbound|9080|v1|reviews.bookinfo.svc.cluster.local`, Envoy's cluster name.
    pub fn name(&self) -> String {
        format!(
            "outbound|{}|{}|{}",
            self.port,
            self.subset.as_ref().map_or("", |s| s.name.as_str()),
            self.fqdn
        )
    }

    /// The subset name, for `destination_version`-style labels.
    pub fn subset_name(&self) -> Option<&str> {
        self.subset.as_ref().map(|s| s.name.as_str())
    }
}

/// Why a destination resolves to nothing; its requests are answered 503 with this reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unroutable {
    UnknownHost(String),
    /// The Service has no such port, or several and the route names none.
    NoPort {
        host: String,
        why: String,
    },
    MissingSubset {
        host: String,
        subset: String,
    },
    /// A route form this proxy does not apply (`delegate`).
    Unsupported(&'static str),
}

impl fmt::Display for Unroutable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unroutable::UnknownHost(h) => write!(f, "host {h} is not a known Service"),
            Unroutable::NoPort { host, why } => write!(f, "{host}: {why}"),
            Unroutable::MissingSubset { host, subset } => write!(
                f,
                "subset {subset} of {host} is not defined by any DestinationRule the client sees"
            ),
            Unroutable::Unsupported(what) => write!(f, "{what} is not supported"),
        }
    }
}

/// The request's new `:path` and `:authority`, already computed for this request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RewriteAction {
    /// Path and query to send (`rewrite.uri` keeps the query string).
    pub path: Option<String>,
    pub authority: Option<String>,
}

/// `fault`: both parts are independent draws.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultAction {
    pub delay: Option<Delay>,
    pub abort: Option<AbortFault>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Delay {
    pub duration: Duration,
    pub percentage: Share,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AbortFault {
    pub status: Abort,
    pub percentage: Share,
}

/// `mirror` / `mirrors`: a copy of the request, fire and forget.
#[derive(Clone, Debug)]
pub struct MirrorAction {
    pub host: String,
    pub target: Result<Cluster, Unroutable>,
    pub percentage: Share,
}

/// What to do with one opaque (TCP) connection to a Service.
#[derive(Clone, Debug)]
pub enum TcpDecision {
    /// No VirtualService applies, or it has no `tcp` routes: as without rules.
    NoVirtualService,
    /// Its `tcp` routes match nothing: the connection is closed.
    NoRoute { virtual_service: ObjectRef },
    Routed {
        virtual_service: ObjectRef,
        route: RouteRef,
        /// Never empty; pick by weight as for HTTP.
        destinations: Vec<WeightedCluster>,
    },
}
