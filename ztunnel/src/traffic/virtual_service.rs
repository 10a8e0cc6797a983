//! Istio's `VirtualService`, parsed and validated into the form the outbound side decides
//! with, and the decision that needs nothing but the resource: which route a request (or a
//! connection) takes.
//!
//! Every field Istio documents is read. A field this proxy does not know is an error (a
//! misspelt `retries` silently ignored would change behaviour); a field it knows but does not
//! apply (`corsPolicy`, `tls` routes, `delegate`…) is listed in [`VirtualService::unsupported`]
//! and reported as a configuration problem. Values are compiled here: regexes, durations,
//! header names, percentages.
use std::{borrow::Cow, collections::BTreeMap, net::IpAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use time::OffsetDateTime;

use super::{
    re2::Re2,
    retry::{RetryDoc, RetryPolicy},
    string_match::StringMatch,
    values::{service_fqdn, ExportTo, HostPattern, IstioDuration, PercentDoc, Share},
};
use crate::{
    authz::authorization_policy::IpBlock,
    model::{Labels, Origin},
};

/// The gateway name Istio gives to sidecars (here: the node proxy's outbound side).
pub const MESH_GATEWAY: &str = "mesh";

#[derive(Clone, Debug, PartialEq)]
pub struct VirtualService {
    pub namespace: String,
    pub name: String,
    pub created: Option<OffsetDateTime>,
    pub origin: Origin,
    pub hosts: Vec<HostPattern>,
    pub export_to: ExportTo,
    /// Whether it applies to mesh traffic: `gateways` absent, or naming `mesh`.
    pub mesh: bool,
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<TcpRoute>,
    /// What was read but is not applied here, for the configuration's problems.
    pub unsupported: Vec<String>,
}

impl VirtualService {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Among VirtualServices for one host: oldest first, then by namespace and name.
    pub fn precedence_key(&self) -> (Option<OffsetDateTime>, &str, &str) {
        (self.created, &self.namespace, &self.name)
    }

    /// The first HTTP route whose match admits the request (Istio: in order, first wins).
    pub fn http_route(&self, req: &RequestView<'_>, src: &Source<'_>) -> Option<MatchedRoute<'_>> {
        self.http.iter().enumerate().find_map(|(index, route)| {
            if route.matches.is_empty() {
                return Some(MatchedRoute {
                    index,
                    route,
                    matched: None,
                });
            }
            route
                .matches
                .iter()
                .find(|m| m.admits(req, src))
                .map(|m| MatchedRoute {
                    index,
                    route,
                    matched: Some(m),
                })
        })
    }

    /// The first TCP route whose match admits a connection to `dst` (a Service port).
    pub fn tcp_route(
        &self,
        dst: IpAddr,
        port: u16,
        src: &Source<'_>,
    ) -> Option<(usize, &TcpRoute)> {
        self.tcp.iter().enumerate().find(|(_, r)| {
            r.matches.is_empty() || r.matches.iter().any(|m| m.admits(dst, port, src))
        })
    }
}

/// The request as routing sees it.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Without the query string.
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// `:authority`, or HTTP/1.1's `Host`.
    pub authority: &'a str,
    pub scheme: &'a str,
    /// The Service port the request was sent to.
    pub port: u16,
    pub headers: &'a HeaderMap,
}

impl<'a> RequestView<'a> {
    /// A header's value, its repeats joined with `,` (as Envoy's matchers see them).
    pub fn header(&self, name: &str) -> Option<Cow<'a, str>> {
        let mut values = self.headers.get_all(name).iter();
        let first = values.next()?;
        let mut out = String::from_utf8_lossy(first.as_bytes());
        for v in values {
            let joined = out.to_mut();
            joined.push(',');
            joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
        }
        Some(out)
    }

    /// The first value of a query parameter, decoded; `""` for `?name`.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query?.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// The client a rule is decided for: the source pod.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    pub namespace: &'a str,
    pub labels: &'a Labels,
}

impl Source<'_> {
    fn selected_by(&self, labels: &Labels, namespace: Option<&str>, gateways: &[String]) -> bool {
        // Istio: a match naming gateways applies to those only (`mesh`: sidecars, here).
        if !gateways.is_empty() {
            return gateways.iter().any(|g| g == MESH_GATEWAY);
        }
        labels.iter().all(|(k, v)| self.labels.get(k) == Some(v))
            && namespace.is_none_or(|ns| ns == self.namespace)
    }
}

/// The route a request took, and which of its match blocks admitted it.
#[derive(Clone, Copy, Debug)]
pub struct MatchedRoute<'a> {
    pub index: usize,
    pub route: &'a HttpRoute,
    pub matched: Option<&'a HttpMatch>,
}

impl MatchedRoute<'_> {
    /// As Istio names the Envoy route: the route's name, `.` the match's name; else the index.
    pub fn name(&self) -> String {
        let route = self
            .route
            .name
            .clone()
            .unwrap_or_else(|| self.index.to_string());
        match self.matched.and_then(|m| m.name.as_deref()) {
            Some(m) => format!("{route}.{m}"),
            None => route,
        }
    }

    /// The request path after `rewrite.uri` / `uriRegexRewrite`, if the route rewrites it.
    pub fn rewritten_path(&self, path: &str) -> Option<String> {
        let rw = self.route.rewrite.as_ref()?;
        if let Some((re, sub)) = &rw.uri_regex {
            return Some(re.substitute(path, sub));
        }
        let uri = rw.uri.as_deref()?;
        // Envoy's prefix_rewrite: a prefix match swaps the matched prefix; an exact or regex
        // match swaps the whole path; no URI match is the prefix `/`.
        let prefix = match self.matched.and_then(|m| m.uri.as_ref()) {
            Some(UriMatch {
                m: StringMatch::Prefix(p),
                ..
            }) => p.as_str(),
            Some(UriMatch {
                m: StringMatch::Present,
                ..
            })
            | None => "/",
            Some(_) => return Some(uri.to_owned()),
        };
        Some(format!(
            "{uri}{}",
            path.get(prefix.len()..).unwrap_or_default()
        ))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct HttpRoute {
    pub name: Option<String>,
    /// OR-ed; none matches everything.
    pub matches: Vec<HttpMatch>,
    pub action: HttpAction,
    pub rewrite: Option<Rewrite>,
    /// The whole request, retries included; `None`: no timeout (Istio's default).
    pub timeout: Option<Duration>,
    pub retries: RetryPolicy,
    pub fault: Fault,
    pub mirrors: Vec<Mirror>,
    pub headers: HeaderOps,
}

#[derive(Clone, Debug, PartialEq)]
pub enum HttpAction {
    /// `route`: weighted destinations (those of weight 0 dropped when others remain).
    Forward(Vec<WeightedDestination>),
    Redirect(Redirect),
    DirectResponse {
        status: u16,
        body: Bytes,
    },
    /// A form this proxy does not apply (`delegate`): answered 503, reported.
    Unsupported(&'static str),
}

/// A destination as a route names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// As written, for messages.
    pub host: String,
    /// The fully qualified name it resolves to (in the VirtualService's namespace).
    pub fqdn: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
}

impl Destination {
    pub fn describe(&self) -> String {
        let mut s = self.fqdn.clone();
        if let Some(p) = self.port {
            s.push_str(&format!(":{p}"));
        }
        if let Some(sub) = &self.subset {
            s.push_str(&format!(" subset {sub}"));
        }
        s
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct WeightedDestination {
    pub destination: Destination,
    pub weight: u32,
    pub headers: HeaderOps,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UriMatch {
    pub m: StringMatch,
    pub ignore_case: bool,
}

/// One `match` block: every condition must hold.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpMatch {
    pub name: Option<String>,
    pub uri: Option<UriMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: Vec<(String, StringMatch)>,
    pub without_headers: Vec<(String, StringMatch)>,
    pub query_params: Vec<(String, StringMatch)>,
    pub port: Option<u16>,
    pub source_labels: Labels,
    pub source_namespace: Option<String>,
    pub gateways: Vec<String>,
}

impl HttpMatch {
    pub fn admits(&self, req: &RequestView<'_>, src: &Source<'_>) -> bool {
        if self.port.is_some_and(|p| p != req.port) {
            return false;
        }
        if !src.selected_by(
            &self.source_labels,
            self.source_namespace.as_deref(),
            &self.gateways,
        ) {
            return false;
        }
        if let Some(u) = &self.uri {
            let ok = match u.ignore_case {
                true => u.m.matches_ignoring_case(req.path),
                false => u.m.matches(req.path),
            };
            if !ok {
                return false;
            }
        }
        let pseudo = [
            (&self.scheme, req.scheme),
            (&self.method, req.method),
            (&self.authority, req.authority),
        ];
        if pseudo
            .iter()
            .any(|(m, v)| m.as_ref().is_some_and(|m| !m.matches(v)))
        {
            return false;
        }
        self.headers
            .iter()
            .all(|(name, m)| m.matches_present(req.header(name).as_deref()))
            && self
                .without_headers
                .iter()
                .all(|(name, m)| m.matches_absent(req.header(name).as_deref()))
            && self
                .query_params
                .iter()
                .all(|(name, m)| m.matches_present(req.query_param(name).as_deref()))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex: Option<(Re2, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedirectPort {
    /// The scheme's default (no port in `Location`).
    ProtocolDefault,
    /// The port the request was sent to.
    FromRequest,
    Number(u16),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<RedirectPort>,
    pub scheme: Option<String>,
    pub code: u16,
}

impl Redirect {
    /// The `Location` for a request to `authority` `path_and_query` on `port`, as Envoy builds
    /// it: each part the redirect names replaces the request's.
    pub fn location(&self, authority: &str, path_and_query: &str, port: u16) -> String {
        let scheme = self.scheme.as_deref().unwrap_or("http");
        let host = self.authority.as_deref().unwrap_or(authority);
        let bare = strip_port(host);
        let port = match &self.port {
            None => None,
            Some(RedirectPort::ProtocolDefault) => Some(0),
            Some(RedirectPort::FromRequest) => Some(port),
            Some(RedirectPort::Number(n)) => Some(*n),
        };
        let host = match port {
            None => host.to_owned(),
            Some(0) => bare.to_owned(),
            Some(80) if scheme == "http" => bare.to_owned(),
            Some(443) if scheme == "https" => bare.to_owned(),
            Some(p) => format!("{bare}:{p}"),
        };
        let path = match &self.uri {
            None => path_and_query.to_owned(),
            Some(uri) if uri.contains('?') => uri.clone(),
            Some(uri) => match path_and_query.split_once('?') {
                Some((_, q)) => format!("{uri}?{q}"),
                None => uri.clone(),
            },
        };
        format!("{scheme}://{host}{path}")
    }
}

/// `host:port` without its port (`[::1]:80` → `[::1]`).
pub fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p))
            if !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']')) =>
        {
            h
        }
        _ => host,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    Http(u16),
    /// A gRPC status code (answered as a trailers-only response).
    Grpc(u32),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fault {
    pub delay: Option<(Duration, Share)>,
    pub abort: Option<(Abort, Share)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Mirror {
    pub destination: Destination,
    pub share: Share,
}

/// Header changes of one direction: removals first, then sets, then additions (Envoy's order).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeaderEdits {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderEdits {
    pub fn apply(&self, h: &mut HeaderMap) {
        for name in &self.remove {
            h.remove(name);
        }
        for (name, value) in &self.set {
            h.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            h.append(name.clone(), value.clone());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeaderOps {
    pub request: HeaderEdits,
    pub response: HeaderEdits,
    /// `host` / `:authority` in `request.set` or `add`: a rewrite of the authority.
    pub authority: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TcpRoute {
    pub matches: Vec<L4Match>,
    pub route: Vec<WeightedDestination>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct L4Match {
    pub port: Option<u16>,
    pub destination_subnets: Vec<IpBlock>,
    pub source_labels: Labels,
    pub source_namespace: Option<String>,
    pub gateways: Vec<String>,
}

impl L4Match {
    fn admits(&self, dst: IpAddr, port: u16, src: &Source<'_>) -> bool {
        self.port.is_none_or(|p| p == port)
            && (self.destination_subnets.is_empty()
                || self.destination_subnets.iter().any(|b| b.contains(dst)))
            && src.selected_by(
                &self.source_labels,
                self.source_namespace.as_deref(),
                &self.gateways,
            )
    }
}

// ---- the resource as written -----------------------------------------------------------------

/// `spec` as written.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpecDoc {
    #[serde(default)]
    hosts: Vec<String>,
    gateways: Option<Vec<String>>,
    #[serde(default)]
    http: Vec<HttpRouteDoc>,
    #[serde(default)]
    tls: Vec<serde_yaml::Value>,
    #[serde(default)]
    tcp: Vec<TcpRouteDoc>,
    export_to: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpRouteDoc {
    name: Option<String>,
    #[serde(rename = "match", default)]
    matches: Vec<HttpMatchDoc>,
    #[serde(default)]
    route: Vec<HttpRouteDestinationDoc>,
    redirect: Option<RedirectDoc>,
    direct_response: Option<DirectResponseDoc>,
    delegate: Option<serde_yaml::Value>,
    rewrite: Option<RewriteDoc>,
    timeout: Option<IstioDuration>,
    retries: Option<RetryDoc>,
    fault: Option<FaultDoc>,
    mirror: Option<DestinationDoc>,
    #[serde(default)]
    mirrors: Vec<MirrorDoc>,
    mirror_percentage: Option<PercentDoc>,
    /// Deprecated integer form of `mirrorPercentage`.
    mirror_percent: Option<u32>,
    cors_policy: Option<serde_yaml::Value>,
    headers: Option<HeadersDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpMatchDoc {
    name: Option<String>,
    uri: Option<StringMatch>,
    scheme: Option<StringMatch>,
    method: Option<StringMatch>,
    authority: Option<StringMatch>,
    headers: Option<BTreeMap<String, StringMatch>>,
    port: Option<u32>,
    source_labels: Option<Labels>,
    gateways: Option<Vec<String>>,
    query_params: Option<BTreeMap<String, StringMatch>>,
    #[serde(default)]
    ignore_uri_case: bool,
    without_headers: Option<BTreeMap<String, StringMatch>>,
    source_namespace: Option<String>,
    stat_prefix: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DestinationDoc {
    host: String,
    subset: Option<String>,
    port: Option<PortSelectorDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PortSelectorDoc {
    pub(super) number: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpRouteDestinationDoc {
    destination: DestinationDoc,
    weight: Option<i64>,
    headers: Option<HeadersDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RedirectDoc {
    uri: Option<String>,
    authority: Option<String>,
    port: Option<u32>,
    derive_port: Option<String>,
    scheme: Option<String>,
    redirect_code: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectResponseDoc {
    status: u32,
    body: Option<HttpBodyDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpBodyDoc {
    string: Option<String>,
    /// Base64, as protobuf's JSON writes bytes.
    bytes: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RewriteDoc {
    uri: Option<String>,
    authority: Option<String>,
    uri_regex_rewrite: Option<RegexRewriteDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegexRewriteDoc {
    #[serde(rename = "match")]
    pattern: String,
    rewrite: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultDoc {
    delay: Option<DelayDoc>,
    abort: Option<AbortDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DelayDoc {
    fixed_delay: Option<IstioDuration>,
    exponential_delay: Option<IstioDuration>,
    percentage: Option<PercentDoc>,
    /// Deprecated integer form of `percentage`.
    percent: Option<i32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AbortDoc {
    http_status: Option<i32>,
    grpc_status: Option<String>,
    http2_error: Option<String>,
    percentage: Option<PercentDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorDoc {
    destination: DestinationDoc,
    percentage: Option<PercentDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HeadersDoc {
    request: Option<HeaderOpsDoc>,
    response: Option<HeaderOpsDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderOpsDoc {
    set: Option<BTreeMap<String, String>>,
    add: Option<BTreeMap<String, String>>,
    remove: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpRouteDoc {
    #[serde(rename = "match", default)]
    matches: Vec<L4MatchDoc>,
    #[serde(default)]
    route: Vec<RouteDestinationDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct L4MatchDoc {
    destination_subnets: Option<Vec<String>>,
    port: Option<u32>,
    source_labels: Option<Labels>,
    gateways: Option<Vec<String>>,
    source_namespace: Option<String>,
    /// Deprecated, and not applied by Istio either.
    source_subnet: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteDestinationDoc {
    destination: DestinationDoc,
    weight: Option<i64>,
}

/// gRPC status names Istio accepts for `abort.grpcStatus`, by code.
const GRPC_STATUS: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

pub(super) fn port_number(p: u32, what: &str) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what}: port {p} is not in 1-65535"))
}

impl DestinationDoc {
    pub(super) fn compile(self, namespace: &str, what: &str) -> Result<Destination, String> {
        let fqdn = match HostPattern::resolve(&self.host, namespace) {
            Ok(HostPattern::Exact(h)) => h,
            Ok(_) => {
                return Err(format!(
                    "{what}: destination host {:?} must name one service (no wildcard or address)",
                    self.host
                ))
            }
            Err(e) => return Err(format!("{what}: {e}")),
        };
        if self.subset.as_deref() == Some("") {
            return Err(format!("{what}: an empty subset name"));
        }
        Ok(Destination {
            host: self.host,
            fqdn,
            subset: self.subset,
            port: self.port.map(|p| port_number(p.number, what)).transpose()?,
        })
    }
}

fn header_name(name: &str, what: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{what}: {name:?} is not a header name"))
}

fn header_value(value: &str, what: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(value).map_err(|_| format!("{what}: {value:?} is not a header value"))
}

/// `host` and pseudo-headers are not headers to edit; `host`/`:authority` set the authority.
fn is_authority(name: &str) -> bool {
    name.eq_ignore_ascii_case("host") || name.eq_ignore_ascii_case(":authority")
}

impl HeadersDoc {
    pub(super) fn compile(self, what: &str) -> Result<HeaderOps, String> {
        let mut ops = HeaderOps::default();
        let mut edits = |doc: Option<HeaderOpsDoc>, request: bool| -> Result<HeaderEdits, String> {
            let mut e = HeaderEdits::default();
            let Some(doc) = doc else { return Ok(e) };
            let side = if request { "request" } else { "response" };
            for (key, list) in [("set", doc.set), ("add", doc.add)] {
                for (name, value) in list.unwrap_or_default() {
                    if is_authority(&name) {
                        if request && (key == "set" || ops.authority.is_none()) {
                            ops.authority = Some(value);
                        }
                        continue;
                    }
                    if name.starts_with(':') {
                        continue;
                    }
                    let w = format!("{what}.headers.{side}.{key}");
                    let pair = (header_name(&name, &w)?, header_value(&value, &w)?);
                    match key {
                        "set" => e.set.push(pair),
                        _ => e.add.push(pair),
                    }
                }
            }
            for name in doc.remove.unwrap_or_default() {
                if is_authority(&name) || name.starts_with(':') {
                    continue;
                }
                e.remove.push(header_name(
                    &name,
                    &format!("{what}.headers.{side}.remove"),
                )?);
            }
            Ok(e)
        };
        let request = edits(self.request, true)?;
        let response = edits(self.response, false)?;
        ops.request = request;
        ops.response = response;
        Ok(ops)
    }
}

fn string_matches(
    map: Option<BTreeMap<String, StringMatch>>,
    what: &str,
) -> Result<Vec<(String, StringMatch)>, String> {
    let mut out = Vec::new();
    for (name, m) in map.unwrap_or_default() {
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(format!(
                "{what}: header name {name:?} must be lower case (as in Istio)"
            ));
        }
        out.push((name, m));
    }
    Ok(out)
}

/// Weights as Istio applies them: one destination takes everything whatever its weight; of
/// several, those of weight 0 are dropped and the rest split by their total (not necessarily
/// 100, as current Istio does).
fn weights(weights: Vec<Option<i64>>, what: &str) -> Result<Vec<u32>, String> {
    if weights.len() == 1 {
        return Ok(vec![100]);
    }
    let mut out = Vec::with_capacity(weights.len());
    for w in weights {
        let w = w.unwrap_or(0);
        if !(0..=i64::from(u32::MAX)).contains(&w) {
            return Err(format!("{what}: weight {w} is negative or too large"));
        }
        out.push(w as u32);
    }
    if out.iter().all(|w| *w == 0) {
        return Err(format!("{what}: every destination has weight 0"));
    }
    Ok(out)
}

impl SpecDoc {
    /// Validates the spec as Istio's admission does (and what this proxy needs), into a
    /// VirtualService of `namespace`.
    pub fn into_virtual_service(
        self,
        namespace: String,
        name: String,
        created: Option<OffsetDateTime>,
        origin: Origin,
    ) -> Result<VirtualService, String> {
        let ns = namespace.as_str();
        if self.hosts.is_empty() {
            return Err("spec.hosts is empty".into());
        }
        let hosts = self
            .hosts
            .iter()
            .map(|h| HostPattern::resolve(h, ns).map_err(|e| format!("spec.hosts: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let gateways = self.gateways.unwrap_or_default();
        let mesh = gateways.is_empty() || gateways.iter().any(|g| g == MESH_GATEWAY);
        let mut unsupported = Vec::new();
        if !self.tls.is_empty() {
            unsupported.push("tls routes (SNI routing of TLS traffic) are not applied".to_owned());
        }
        let mut http = Vec::new();
        for (i, r) in self.http.into_iter().enumerate() {
            http.push(r.compile(ns, &format!("http[{i}]"), &mut unsupported)?);
        }
        let mut tcp = Vec::new();
        for (i, r) in self.tcp.into_iter().enumerate() {
            tcp.push(r.compile(ns, &format!("tcp[{i}]"), &mut unsupported)?);
        }
        Ok(VirtualService {
            export_to: ExportTo::parse(self.export_to, ns)?,
            namespace,
            name,
            created,
            origin,
            hosts,
            mesh,
            http,
            tcp,
            unsupported,
        })
    }
}

impl HttpRouteDoc {
    fn compile(
        self,
        ns: &str,
        what: &str,
        unsupported: &mut Vec<String>,
    ) -> Result<HttpRoute, String> {
        let mut matches = Vec::new();
        for (j, m) in self.matches.into_iter().enumerate() {
            matches.push(m.compile(&format!("{what}.match[{j}]"))?);
        }
        let kinds = [
            !self.route.is_empty(),
            self.redirect.is_some(),
            self.direct_response.is_some(),
            self.delegate.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(format!(
                "{what}: a route takes exactly one of route, redirect, directResponse and delegate"
            ));
        }
        let action = if let Some(r) = self.redirect {
            HttpAction::Redirect(r.compile(what)?)
        } else if let Some(d) = self.direct_response {
            d.compile(what)?
        } else if self.delegate.is_some() {
            unsupported.push(format!("{what}: delegate (gateway VirtualServices only) is not applied; its requests are answered 503"));
            HttpAction::Unsupported("delegate")
        } else {
            let ws = weights(self.route.iter().map(|d| d.weight).collect(), what)?;
            let mut out = Vec::new();
            for (k, (d, weight)) in self.route.into_iter().zip(ws).enumerate() {
                let w = format!("{what}.route[{k}]");
                if weight == 0 {
                    continue;
                }
                out.push(WeightedDestination {
                    destination: d.destination.compile(ns, &w)?,
                    weight,
                    headers: d
                        .headers
                        .map(|h| h.compile(&w))
                        .transpose()?
                        .unwrap_or_default(),
                });
            }
            HttpAction::Forward(out)
        };
        if self.cors_policy.is_some() {
            unsupported.push(format!("{what}: corsPolicy is not applied"));
        }
        let rewrite = self.rewrite.map(|r| r.compile(what)).transpose()?;
        if rewrite.is_some() && !matches!(action, HttpAction::Forward(_)) {
            return Err(format!(
                "{what}: rewrite needs a route (not a redirect or directResponse)"
            ));
        }
        let retries = match self.retries {
            None => RetryPolicy::default(),
            Some(doc) => {
                let (policy, notes) = doc.into_policy().map_err(|e| format!("{what}: {e}"))?;
                unsupported.extend(notes.into_iter().map(|n| format!("{what}: {n}")));
                policy
            }
        };
        let timeout = self.timeout.map(|t| t.0).filter(|t| !t.is_zero());
        let fault = match self.fault {
            Some(f) => f.compile(what, unsupported)?,
            None => Fault::default(),
        };
        let mut mirrors = Vec::new();
        if let Some(m) = self.mirror {
            let share = match (self.mirror_percentage, self.mirror_percent) {
                (Some(p), _) => p
                    .share()
                    .map_err(|e| format!("{what}.mirrorPercentage: {e}"))?,
                (None, Some(p)) => Share::of_percent(f64::from(p))
                    .map_err(|e| format!("{what}.mirrorPercent: {e}"))?,
                (None, None) => Share::ALL,
            };
            mirrors.push(Mirror {
                destination: m.compile(ns, &format!("{what}.mirror"))?,
                share,
            });
        }
        for (k, m) in self.mirrors.into_iter().enumerate() {
            let w = format!("{what}.mirrors[{k}]");
            let share = match m.percentage {
                Some(p) => p.share().map_err(|e| format!("{w}: {e}"))?,
                None => Share::ALL,
            };
            mirrors.push(Mirror {
                destination: m.destination.compile(ns, &w)?,
                share,
            });
        }
        mirrors.retain(|m| m.share > Share::NONE);
        Ok(HttpRoute {
            name: self.name.filter(|n| !n.is_empty()),
            matches,
            action,
            rewrite,
            timeout,
            retries,
            fault,
            mirrors,
            headers: self
                .headers
                .map(|h| h.compile(what))
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

impl HttpMatchDoc {
    fn compile(self, what: &str) -> Result<HttpMatch, String> {
        if let Some((k, _)) = self
            .query_params
            .iter()
            .flatten()
            .find(|(_, m)| matches!(m, StringMatch::Prefix(_)))
        {
            return Err(format!(
                "{what}.queryParams.{k}: prefix is not supported for query parameters (as in Istio): use exact or regex"
            ));
        }
        let _ = self.stat_prefix;
        Ok(HttpMatch {
            name: self.name.filter(|n| !n.is_empty()),
            uri: self.uri.map(|m| UriMatch {
                m,
                ignore_case: self.ignore_uri_case,
            }),
            scheme: self.scheme,
            method: self.method,
            authority: self.authority,
            headers: string_matches(self.headers, &format!("{what}.headers"))?,
            without_headers: string_matches(
                self.without_headers,
                &format!("{what}.withoutHeaders"),
            )?,
            query_params: self.query_params.unwrap_or_default().into_iter().collect(),
            port: self.port.map(|p| port_number(p, what)).transpose()?,
            source_labels: self.source_labels.unwrap_or_default(),
            source_namespace: self.source_namespace.filter(|n| !n.is_empty()),
            gateways: self.gateways.unwrap_or_default(),
        })
    }
}

impl RedirectDoc {
    fn compile(self, what: &str) -> Result<Redirect, String> {
        let code = match self.redirect_code.unwrap_or(301) {
            0 => 301,
            c @ (301 | 302 | 303 | 307 | 308) => c as u16,
            c => {
                return Err(format!(
                    "{what}.redirect: redirectCode {c} is not 301, 302, 303, 307 or 308"
                ))
            }
        };
        let port = match (self.port, self.derive_port.as_deref()) {
            (Some(_), Some(_)) => {
                return Err(format!("{what}.redirect: port and derivePort exclude each other"))
            }
            (Some(p), None) => Some(RedirectPort::Number(port_number(p, &format!("{what}.redirect"))?)),
            (None, Some("FROM_PROTOCOL_DEFAULT")) => Some(RedirectPort::ProtocolDefault),
            (None, Some("FROM_REQUEST_PORT")) => Some(RedirectPort::FromRequest),
            (None, Some(other)) => {
                return Err(format!(
                    "{what}.redirect: derivePort {other:?} is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"
                ))
            }
            (None, None) => None,
        };
        if let Some(uri) = &self.uri {
            if !uri.starts_with('/') {
                return Err(format!("{what}.redirect: uri {uri:?} must start with /"));
            }
        }
        Ok(Redirect {
            uri: self.uri,
            authority: self.authority.filter(|a| !a.is_empty()),
            port,
            scheme: self.scheme.filter(|s| !s.is_empty()),
            code,
        })
    }
}

impl DirectResponseDoc {
    fn compile(self, what: &str) -> Result<HttpAction, String> {
        if !(200..=599).contains(&self.status) {
            return Err(format!(
                "{what}.directResponse: status {} is not in 200-599",
                self.status
            ));
        }
        let body = match self.body {
            None => Bytes::new(),
            Some(HttpBodyDoc {
                string: Some(s),
                bytes: None,
            }) => Bytes::from(s),
            Some(HttpBodyDoc {
                string: None,
                bytes: Some(b),
            }) => {
                use base64::Engine as _;
                Bytes::from(
                    base64::engine::general_purpose::STANDARD
                        .decode(b.trim())
                        .map_err(|e| format!("{what}.directResponse.body.bytes: {e}"))?,
                )
            }
            Some(_) => {
                return Err(format!(
                    "{what}.directResponse.body takes one of string and bytes"
                ))
            }
        };
        Ok(HttpAction::DirectResponse {
            status: self.status as u16,
            body,
        })
    }
}

impl RewriteDoc {
    fn compile(self, what: &str) -> Result<Rewrite, String> {
        let uri_regex = match self.uri_regex_rewrite {
            Some(r) => {
                if self.uri.is_some() {
                    return Err(format!(
                        "{what}.rewrite: uri and uriRegexRewrite exclude each other"
                    ));
                }
                let re = Re2::new(&r.pattern)
                    .map_err(|e| format!("{what}.rewrite.uriRegexRewrite: {e}"))?;
                Some((re, r.rewrite))
            }
            None => None,
        };
        Ok(Rewrite {
            uri: self.uri.filter(|u| !u.is_empty()),
            authority: self.authority.filter(|a| !a.is_empty()),
            uri_regex,
        })
    }
}

impl FaultDoc {
    fn compile(self, what: &str, unsupported: &mut Vec<String>) -> Result<Fault, String> {
        let mut fault = Fault::default();
        if let Some(d) = self.delay {
            let share = match (d.percentage, d.percent) {
                (Some(p), _) => p.share().map_err(|e| format!("{what}.fault.delay: {e}"))?,
                (None, Some(p)) => Share::of_percent(f64::from(p))
                    .map_err(|e| format!("{what}.fault.delay.percent: {e}"))?,
                // Istio: "If left unspecified, no request will be delayed."
                (None, None) => Share::NONE,
            };
            match (d.fixed_delay, d.exponential_delay) {
                (Some(fixed), _) => {
                    fault.delay = Some((
                        fixed.positive(&format!("{what}.fault.delay.fixedDelay"))?,
                        share,
                    ));
                }
                (None, Some(_)) => unsupported.push(format!(
                    "{what}.fault.delay: exponentialDelay is not applied (nor is it by Istio)"
                )),
                (None, None) => return Err(format!("{what}.fault.delay needs fixedDelay")),
            }
        }
        if let Some(a) = self.abort {
            let share = match a.percentage {
                Some(p) => p.share().map_err(|e| format!("{what}.fault.abort: {e}"))?,
                None => Share::NONE,
            };
            let abort = match (a.http_status, a.grpc_status, a.http2_error) {
                (Some(s), None, None) => {
                    if !(200..=599).contains(&s) {
                        return Err(format!(
                            "{what}.fault.abort: httpStatus {s} is not in 200-599"
                        ));
                    }
                    Some(Abort::Http(s as u16))
                }
                (None, Some(g), None) => {
                    let code = GRPC_STATUS.iter().position(|n| *n == g).ok_or_else(|| {
                        format!("{what}.fault.abort: grpcStatus {g:?} is not a gRPC status name")
                    })?;
                    Some(Abort::Grpc(code as u32))
                }
                (None, None, Some(_)) => {
                    unsupported.push(format!(
                        "{what}.fault.abort: http2Error is not applied (nor is it by Istio)"
                    ));
                    None
                }
                _ => {
                    return Err(format!(
                        "{what}.fault.abort takes one of httpStatus, grpcStatus and http2Error"
                    ))
                }
            };
            fault.abort = abort.map(|a| (a, share));
        }
        Ok(fault)
    }
}

impl TcpRouteDoc {
    fn compile(
        self,
        ns: &str,
        what: &str,
        unsupported: &mut Vec<String>,
    ) -> Result<TcpRoute, String> {
        let mut matches = Vec::new();
        for (j, m) in self.matches.into_iter().enumerate() {
            let w = format!("{what}.match[{j}]");
            if m.source_subnet.is_some() {
                unsupported.push(format!("{w}: sourceSubnet is deprecated and not applied"));
            }
            let subnets = m
                .destination_subnets
                .unwrap_or_default()
                .iter()
                .map(|s| IpBlock::parse(s).map_err(|e| format!("{w}.destinationSubnets: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            matches.push(L4Match {
                port: m.port.map(|p| port_number(p, &w)).transpose()?,
                destination_subnets: subnets,
                source_labels: m.source_labels.unwrap_or_default(),
                source_namespace: m.source_namespace.filter(|n| !n.is_empty()),
                gateways: m.gateways.unwrap_or_default(),
            });
        }
        if self.route.is_empty() {
            return Err(format!(
                "{what}: a TCP route needs at least one destination"
            ));
        }
        let ws = weights(self.route.iter().map(|d| d.weight).collect(), what)?;
        let mut route = Vec::new();
        for (k, (d, weight)) in self.route.into_iter().zip(ws).enumerate() {
            if weight == 0 {
                continue;
            }
            route.push(WeightedDestination {
                destination: d.destination.compile(ns, &format!("{what}.route[{k}]"))?,
                weight,
                headers: HeaderOps::default(),
            });
        }
        Ok(TcpRoute { matches, route })
    }
}

/// The fully qualified name of a Service, for matching against hosts.
pub fn fqdn_of(namespace: &str, name: &str) -> String {
    service_fqdn(name, namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn vs(spec: &str) -> Result<VirtualService, String> {
        let doc: SpecDoc = serde_yaml::from_str(spec).map_err(|e| e.to_string())?;
        doc.into_virtual_service("bookinfo".into(), "vs".into(), None, Origin::default())
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    struct Req {
        method: &'static str,
        path: &'static str,
        query: Option<&'static str>,
        headers: HeaderMap,
        port: u16,
    }

    fn req(path: &'static str, h: &[(&str, &str)]) -> Req {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        Req {
            method: "GET",
            path,
            query,
            headers: headers(h),
            port: 9080,
        }
    }

    fn view(r: &Req) -> RequestView<'_> {
        RequestView {
            method: r.method,
            path: r.path,
            query: r.query,
            authority: "reviews:9080",
            scheme: "http",
            port: r.port,
            headers: &r.headers,
        }
    }

    fn route_of(v: &VirtualService, r: &Req, labels: &[(&str, &str)], ns: &str) -> Option<String> {
        let labels: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let src = Source {
            namespace: ns,
            labels: &labels,
        };
        v.http_route(&view(r), &src).map(|m| m.name())
    }

    /// Match semantics, one row per case: which route a request takes.
    #[test]
    fn http_match_table() {
        let v = vs(r#"
hosts: [reviews]
http:
- name: jason
  match: [{headers: {end-user: {exact: jason}}}]
  route: [{destination: {host: reviews, subset: v2}}]
- name: api
  match:
  - {name: exact, uri: {exact: /api}, method: {exact: POST}}
  - {name: prefix, uri: {prefix: /API/v1/}, ignoreUriCase: true}
  - {name: regex, uri: {regex: '/api/v[0-9]+/items/[0-9]+'}}
  route: [{destination: {host: reviews, subset: v3}}]
- name: query
  match: [{queryParams: {debug: {exact: "1"}, trace: {}}}]
  route: [{destination: {host: reviews}}]
- name: not-mobile
  match: [{withoutHeaders: {x-mobile: {}}, headers: {x-beta: {prefix: "y"}}}]
  route: [{destination: {host: reviews}}]
- name: port
  match: [{port: 9999}]
  route: [{destination: {host: reviews}}]
- name: from-canary
  match: [{sourceLabels: {track: canary}, sourceNamespace: bookinfo}]
  route: [{destination: {host: reviews}}]
- name: gateway-only
  match: [{gateways: [my-gateway], uri: {prefix: /gw}}]
  route: [{destination: {host: reviews}}]
- name: mesh-gateway
  match: [{gateways: [mesh], uri: {prefix: /mesh}}]
  route: [{destination: {host: reviews}}]
- name: rest
  route: [{destination: {host: reviews, subset: v1}}]
"#)
        .unwrap();
        type Row<'a> = (Req, &'a [(&'a str, &'a str)], &'a str, &'a str);
        let rows: &[Row] = &[
            (req("/", &[("end-user", "jason")]), &[], "bookinfo", "jason"),
            (req("/", &[("end-user", "Jason")]), &[], "bookinfo", "rest"),
            (req("/", &[("end-user", "jason2")]), &[], "bookinfo", "rest"),
            (req("/", &[]), &[], "bookinfo", "rest"),
            (
                Req {
                    method: "POST",
                    ..req("/api", &[])
                },
                &[],
                "bookinfo",
                "api.exact",
            ),
            (req("/api", &[]), &[], "bookinfo", "rest"),
            (req("/api/V1/x", &[]), &[], "bookinfo", "api.prefix"),
            (req("/api/v12/items/7", &[]), &[], "bookinfo", "api.regex"),
            (req("/api/v12/items/7/x", &[]), &[], "bookinfo", "rest"),
            (
                req("/api/v12/items/7?x=1", &[]),
                &[],
                "bookinfo",
                "api.regex",
            ),
            (req("/q?debug=1&trace", &[]), &[], "bookinfo", "query"),
            (req("/q?debug=1", &[]), &[], "bookinfo", "rest"),
            (req("/q?debug=2&trace=x", &[]), &[], "bookinfo", "rest"),
            (req("/q?debug=%31&trace=", &[]), &[], "bookinfo", "query"),
            (
                req("/", &[("x-beta", "yes")]),
                &[],
                "bookinfo",
                "not-mobile",
            ),
            (
                req("/", &[("x-beta", "yes"), ("x-mobile", "1")]),
                &[],
                "bookinfo",
                "rest",
            ),
            (
                Req {
                    port: 9999,
                    ..req("/", &[])
                },
                &[],
                "bookinfo",
                "port",
            ),
            (
                req("/", &[]),
                &[("track", "canary")],
                "bookinfo",
                "from-canary",
            ),
            (req("/", &[]), &[("track", "canary")], "other", "rest"),
            (req("/gw", &[]), &[], "bookinfo", "rest"),
            (req("/mesh", &[]), &[], "bookinfo", "mesh-gateway"),
        ];
        for (r, labels, ns, expect) in rows {
            assert_eq!(
                route_of(&v, r, labels, ns).as_deref(),
                Some(*expect),
                "{} {}?{:?} {:?} from {ns} {labels:?}",
                r.method,
                r.path,
                r.query,
                r.headers
            );
        }
    }

    /// Header regex and presence, authority, and AND within a block (OR across blocks).
    #[test]
    fn header_authority_and_conjunction_table() {
        let v = vs(r#"
hosts: [reviews]
http:
- name: both
  match: [{headers: {x-user: {regex: "[a-z]+-[0-9]{2}"}, x-debug: {}}}]
  route: [{destination: {host: reviews}}]
- name: either
  match: [{headers: {x-a: {exact: "1"}}}, {headers: {x-b: {exact: "1"}}}]
  route: [{destination: {host: reviews}}]
- name: authority
  match: [{authority: {prefix: "reviews"}}]
  route: [{destination: {host: reviews}}]
"#)
        .unwrap();
        let at = |r: Req, authority: &'static str| {
            let labels = Labels::new();
            let src = Source {
                namespace: "bookinfo",
                labels: &labels,
            };
            let view = RequestView {
                authority,
                ..view(&r)
            };
            v.http_route(&view, &src).map(|m| m.name())
        };
        type Row<'a> = (&'a [(&'a str, &'a str)], &'a str, Option<&'a str>);
        let rows: &[Row] = &[
            (&[("x-user", "ann-42"), ("x-debug", "")], "x", Some("both")),
            (&[("x-user", "ann-42")], "x", None),
            (&[("x-user", "ann-421"), ("x-debug", "1")], "x", None),
            (&[("x-user", "Ann-42"), ("x-debug", "1")], "x", None),
            (&[("x-a", "1")], "x", Some("either")),
            (&[("x-b", "1")], "x", Some("either")),
            (&[("x-b", "2")], "x", None),
            (&[], "reviews.bookinfo:9080", Some("authority")),
            (&[], "ratings", None),
        ];
        for (h, authority, expect) in rows {
            assert_eq!(
                at(req("/", h), authority).as_deref(),
                *expect,
                "{h:?} {authority}"
            );
        }
    }

    #[test]
    fn repeated_headers_are_joined_and_no_catch_all_means_no_route() {
        let v = vs("hosts: [reviews]\nhttp:\n- match: [{headers: {x: {exact: 'a,b'}}}]\n  route: [{destination: {host: reviews}}]\n").unwrap();
        assert_eq!(
            route_of(&v, &req("/", &[("x", "a"), ("x", "b")]), &[], "bookinfo").as_deref(),
            Some("0")
        );
        assert_eq!(
            route_of(&v, &req("/", &[("x", "a")]), &[], "bookinfo"),
            None,
            "no route: 404"
        );
    }

    #[test]
    fn weights_split_by_their_total_and_zero_weights_drop() {
        let v = vs("hosts: [reviews]\nhttp:\n- route:\n  - {destination: {host: reviews, subset: v1}, weight: 30}\n  - {destination: {host: reviews, subset: v2}, weight: 0}\n  - {destination: {host: reviews, subset: v3}, weight: 30}\n").unwrap();
        let HttpAction::Forward(d) = &v.http[0].action else {
            panic!()
        };
        assert_eq!(
            d.iter()
                .map(|d| (d.destination.subset.as_deref().unwrap(), d.weight))
                .collect::<Vec<_>>(),
            [("v1", 30), ("v3", 30)]
        );
        let one =
            vs("hosts: [reviews]\nhttp:\n- route: [{destination: {host: reviews}, weight: 5}]\n")
                .unwrap();
        let HttpAction::Forward(d) = &one.http[0].action else {
            panic!()
        };
        assert_eq!(d[0].weight, 100, "a single destination takes everything");
        let zero = vs("hosts: [reviews]\nhttp:\n- route:\n  - {destination: {host: a}}\n  - {destination: {host: b}}\n");
        assert!(zero.unwrap_err().contains("weight 0"));
    }

    #[test]
    fn rewrites_follow_envoys_prefix_rewrite() {
        let v = vs(r#"
hosts: [reviews]
http:
- match: [{uri: {prefix: /old}}, {uri: {exact: /exact}}]
  rewrite: {uri: /new}
  route: [{destination: {host: reviews}}]
- match: [{uri: {prefix: /re}}]
  rewrite: {uriRegexRewrite: {match: '^/re/([^/]+)/(.*)$', rewrite: '/\2/\1'}}
  route: [{destination: {host: reviews}}]
- rewrite: {uri: /v2}
  route: [{destination: {host: reviews}}]
"#)
        .unwrap();
        let labels = Labels::new();
        let src = Source {
            namespace: "bookinfo",
            labels: &labels,
        };
        let rw = |path: &'static str| {
            let r = req(path, &[]);
            let m = v.http_route(&view(&r), &src).unwrap();
            m.rewritten_path(r.path)
        };
        assert_eq!(rw("/old/x").as_deref(), Some("/new/x"));
        assert_eq!(rw("/exact").as_deref(), Some("/new"));
        assert_eq!(rw("/re/a/b/c").as_deref(), Some("/b/c/a"));
        assert_eq!(
            rw("/foo").as_deref(),
            Some("/v2foo"),
            "no URI match is the prefix /"
        );
    }

    #[test]
    fn redirects_build_their_location() {
        let r = Redirect {
            uri: Some("/new".into()),
            authority: None,
            port: Some(RedirectPort::Number(8080)),
            scheme: None,
            code: 301,
        };
        assert_eq!(
            r.location("reviews:9080", "/old?a=1", 9080),
            "http://reviews:8080/new?a=1"
        );
        let r = Redirect {
            uri: None,
            authority: Some("example.com".into()),
            port: None,
            scheme: Some("https".into()),
            code: 302,
        };
        assert_eq!(
            r.location("reviews:9080", "/p", 9080),
            "https://example.com/p"
        );
        let r = Redirect {
            uri: None,
            authority: None,
            port: Some(RedirectPort::FromRequest),
            scheme: None,
            code: 301,
        };
        assert_eq!(
            r.location("reviews", "/p", 80),
            "http://reviews/p",
            "no :80 for http"
        );
    }

    #[test]
    fn faults_mirrors_and_defaults_read_as_istio_means_them() {
        let v = vs(r#"
hosts: [ratings]
http:
- fault:
    delay: {fixedDelay: 7s, percentage: {value: 100}}
    abort: {httpStatus: 500}
  mirror: {host: ratings, subset: v2}
  route: [{destination: {host: ratings}}]
  timeout: 0s
- fault: {delay: {fixedDelay: 1s, percent: 50}, abort: {grpcStatus: UNAVAILABLE, percentage: {value: 10}}}
  mirrorPercentage: {value: 0}
  mirror: {host: ratings}
  timeout: 2s
  retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,409"}
  route: [{destination: {host: ratings}}]
"#)
        .unwrap();
        let (a, b) = (&v.http[0], &v.http[1]);
        assert_eq!(a.fault.delay, Some((Duration::from_secs(7), Share::ALL)));
        assert_eq!(
            a.fault.abort,
            Some((Abort::Http(500), Share::NONE)),
            "no percentage: never"
        );
        assert_eq!(a.mirrors[0].share, Share::ALL);
        assert_eq!(a.timeout, None, "0s: no timeout");
        assert_eq!(a.retries, RetryPolicy::default());
        assert_eq!(b.fault.delay.unwrap().1, Share(500_000));
        assert_eq!(b.fault.abort, Some((Abort::Grpc(14), Share(100_000))));
        assert!(b.mirrors.is_empty(), "a 0 % mirror is none");
        assert_eq!(b.timeout, Some(Duration::from_secs(2)));
        assert_eq!(b.retries.attempts, 3);
        assert_eq!(b.retries.status_codes, [409]);
    }

    #[test]
    fn bad_virtual_services_are_refused_with_the_field() {
        for (spec, expect) in [
            ("hosts: []", "hosts is empty"),
            ("hosts: [a]\nhttp: [{route: [{destination: {host: a}}], retires: {}}]", "unknown field `retires`"),
            ("hosts: [a]\nhttp: [{match: [{uri: {regex: '(a'}}], route: [{destination: {host: a}}]}]", "invalid regex"),
            ("hosts: [a]\nhttp: [{match: [{uri: {regex: '[a&&b]'}}], route: [{destination: {host: a}}]}]", "not RE2"),
            ("hosts: [a]\nhttp: [{route: [{destination: {host: a}}], redirect: {uri: /x}}]", "exactly one"),
            ("hosts: [a]\nhttp: [{}]", "exactly one"),
            ("hosts: [a]\nhttp: [{match: [{headers: {End-User: {exact: x}}}], route: [{destination: {host: a}}]}]", "lower case"),
            ("hosts: [a]\nhttp: [{match: [{queryParams: {a: {prefix: x}}}], route: [{destination: {host: a}}]}]", "prefix is not supported"),
            ("hosts: [a]\nhttp: [{route: [{destination: {host: '*.a'}}]}]", "must name one service"),
            ("hosts: [a]\nhttp: [{route: [{destination: {host: a}}], timeout: 5}]", "duration"),
            ("hosts: [a]\nhttp: [{route: [{destination: {host: a}}], fault: {abort: {httpStatus: 99}}}]", "200-599"),
            ("hosts: [a]\nhttp: [{route: [{destination: {host: a}}], retries: {attempts: 2, retryOn: 'bogus'}}]", "retry conditions"),
            ("hosts: [a]\ntcp: [{route: [{destination: {host: a}, weight: -1}, {destination: {host: b}}]}]", "negative"),
            ("hosts: [a]\nexportTo: ['~']", "exportTo"),
        ] {
            let e = vs(spec).unwrap_err();
            assert!(e.contains(expect), "{spec}: {e}");
        }
    }

    #[test]
    fn unsupported_parts_are_listed_not_silently_dropped() {
        let v = vs("hosts: [a]\ngateways: [gw]\ntls: [{match: [{sniHosts: [a]}], route: [{destination: {host: a}}]}]\nhttp: [{route: [{destination: {host: a}}], corsPolicy: {allowOrigins: [{exact: x}]}}]\n").unwrap();
        assert!(
            !v.mesh,
            "a gateway-only VirtualService does not apply to mesh traffic"
        );
        assert_eq!(v.unsupported.len(), 2, "{:?}", v.unsupported);
    }

    #[test]
    fn tcp_routes_match_port_subnet_and_source() {
        let v = vs("hosts: [db]\ntcp:\n- match: [{port: 5432, destinationSubnets: [10.96.0.0/16]}]\n  route: [{destination: {host: db, subset: primary}}]\n- route: [{destination: {host: db}}]\n").unwrap();
        let labels = Labels::new();
        let src = Source {
            namespace: "bookinfo",
            labels: &labels,
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            v.tcp_route(ip("10.96.0.5"), 5432, &src).map(|r| r.0),
            Some(0)
        );
        assert_eq!(
            v.tcp_route(ip("10.97.0.5"), 5432, &src).map(|r| r.0),
            Some(1)
        );
        assert_eq!(
            v.tcp_route(ip("10.96.0.5"), 5433, &src).map(|r| r.0),
            Some(1)
        );
    }
}
