//! What a call is matched on ([`Attributes`]) and whether one rule matches it.
//!
//! In a rule `from`, `to` and `when` are AND-ed, their list items OR-ed; in a source or
//! operation every field set must match; a field matches one of its values (if any) and none of
//! its `not` values (if any).
//!
//! A connection is decided when it arrives, before any byte of it is read, so HTTP attributes
//! (methods, paths, hosts, headers, request principals) are unknown then. Matching is therefore
//! three-valued: a rule whose outcome depends on them is [`Tri::Unknown`].
use std::net::IpAddr;

use super::authorization_policy::{
    Condition, ConditionValues, Key, Operation, Rule, Source, StrMatch, Values,
};

/// What is known about the caller and the call.
#[derive(Clone, Debug, Default)]
pub struct Attributes {
    /// The peer's SPIFFE id without `spiffe://` (`td/ns/<ns>/sa/<sa>`): mTLS peers only.
    pub source_principal: Option<String>,
    /// From the peer's SPIFFE id: mTLS peers only.
    pub source_namespace: Option<String>,
    pub source_ip: Option<IpAddr>,
    /// The original client address (no trusted X-Forwarded-For hops here: the source address).
    pub remote_ip: Option<IpAddr>,
    pub destination_ip: Option<IpAddr>,
    pub destination_port: Option<u16>,
    pub sni: Option<String>,
    /// `None` until the request is parsed (or for traffic that is not HTTP).
    pub http: Option<HttpRequest>,
    /// A CUSTOM provider has allowed this request: CUSTOM policies are not asked again, and
    /// DENY and ALLOW decide.
    pub custom_allowed: bool,
}

impl Attributes {
    /// Fills the source from an mTLS peer's SPIFFE id (`spiffe://td/ns/<ns>/sa/<sa>`).
    pub fn with_peer(mut self, id: &crate::identity::SpiffeId) -> Self {
        let text = id.to_string();
        self.source_principal = Some(text.trim_start_matches("spiffe://").to_owned());
        self.source_namespace = Some(id.namespace().to_owned());
        self
    }
}

/// The HTTP attributes of one request.
#[derive(Clone, Debug, Default)]
pub struct HttpRequest {
    pub method: String,
    /// Without the query string.
    pub path: String,
    /// `:authority` / `Host`.
    pub host: String,
    /// Lower-case names; repeated headers joined with `,`.
    pub headers: Vec<(String, String)>,
    /// From a validated JWT (RequestAuthentication).
    pub auth: Option<RequestAuth>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A validated JWT's attributes.
#[derive(Clone, Debug, Default)]
pub struct RequestAuth {
    /// `iss/sub`.
    pub principal: String,
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    pub claims: serde_json::Value,
}

/// Three-valued match: `Unknown` when the answer depends on HTTP attributes not known yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tri {
    No,
    Unknown,
    Yes,
}

impl Tri {
    fn and(self, other: Tri) -> Tri {
        self.min(other)
    }

    fn or(self, other: Tri) -> Tri {
        self.max(other)
    }

    fn min(self, other: Tri) -> Tri {
        if self as u8 <= other as u8 {
            self
        } else {
            other
        }
    }

    fn max(self, other: Tri) -> Tri {
        if self as u8 >= other as u8 {
            self
        } else {
            other
        }
    }
}

impl From<bool> for Tri {
    fn from(b: bool) -> Self {
        if b {
            Tri::Yes
        } else {
            Tri::No
        }
    }
}

/// All of `items` (AND); `Yes` for none.
fn all<T>(items: &[T], f: impl Fn(&T) -> Tri) -> Tri {
    items
        .iter()
        .map(f)
        .try_fold(Tri::Yes, |acc, t| match acc.and(t) {
            Tri::No => Err(()),
            t => Ok(t),
        })
        .unwrap_or(Tri::No)
}

/// Any of `items` (OR); `Yes` for none (an absent list does not constrain).
fn any_or_unconstrained<T>(items: &[T], f: impl Fn(&T) -> Tri) -> Tri {
    if items.is_empty() {
        return Tri::Yes;
    }
    items.iter().map(f).fold(Tri::No, Tri::or)
}

/// A field against one attribute value; `value` of `None` is an absent attribute (no principal
/// for a plaintext peer), which matches no value and therefore every `not` list.
fn field<T, V: ?Sized>(values: &Values<T>, value: Option<&V>, m: impl Fn(&T, &V) -> bool) -> bool {
    let hit = |list: &[T]| value.is_some_and(|v| list.iter().any(|t| m(t, v)));
    (values.any_of.is_empty() || hit(&values.any_of)) && !hit(&values.none_of)
}

/// A field over an attribute with several values (audiences, list claims): matches if any
/// value matches; `not` fails if any value matches.
fn field_multi<T>(values: &Values<T>, value: &[String], m: impl Fn(&T, &str) -> bool) -> bool {
    let hit = |list: &[T]| value.iter().any(|v| list.iter().any(|t| m(t, v)));
    (values.any_of.is_empty() || hit(&values.any_of)) && !hit(&values.none_of)
}

/// An HTTP attribute's field: `Unknown` before the request is known.
fn http_field(
    values: &Values<StrMatch>,
    a: &Attributes,
    get: impl Fn(&HttpRequest) -> Option<&str>,
    m: impl Fn(&StrMatch, &str) -> bool,
) -> Tri {
    if values.is_empty() {
        return Tri::Yes;
    }
    match &a.http {
        None => Tri::Unknown,
        Some(req) => field(values, get(req), m).into(),
    }
}

/// The `namespace/name` a principal (`td/ns/<ns>/sa/<sa>`) names, as `serviceAccounts` match.
pub(super) fn service_account(principal: &str) -> Option<String> {
    let (_, rest) = principal.split_once("/ns/")?;
    let (ns, sa) = rest.split_once("/sa/")?;
    Some(format!("{ns}/{sa}"))
}

fn source_matches(s: &Source, a: &Attributes) -> Tri {
    let principal = a.source_principal.as_deref();
    // `serviceAccounts` name `namespace/name`, taken from the same identity (built only for
    // the sources that use it: this runs for every rule of every policy).
    let service_account = principal
        .filter(|_| !s.service_accounts.is_empty())
        .and_then(service_account);
    let l4 = field(&s.principals, principal, StrMatch::matches)
        && field(
            &s.namespaces,
            a.source_namespace.as_deref(),
            StrMatch::matches,
        )
        && field(
            &s.service_accounts,
            service_account.as_deref(),
            StrMatch::matches,
        )
        && field(&s.ip_blocks, a.source_ip.as_ref(), |b, ip| b.contains(*ip))
        && field(&s.remote_ip_blocks, a.remote_ip.as_ref(), |b, ip| {
            b.contains(*ip)
        });
    Tri::from(l4).and(http_field(
        &s.request_principals,
        a,
        |r| r.auth.as_ref().map(|auth| auth.principal.as_str()),
        StrMatch::matches,
    ))
}

fn operation_matches(o: &Operation, a: &Attributes) -> Tri {
    let port = field(&o.ports, a.destination_port.as_ref(), |p, v| p == v);
    Tri::from(port)
        .and(http_field(
            &o.hosts,
            a,
            |r| Some(r.host.as_str()),
            StrMatch::matches_ignore_case,
        ))
        .and(http_field(
            &o.methods,
            a,
            |r| Some(r.method.as_str()),
            StrMatch::matches,
        ))
        .and(http_field(
            &o.paths,
            a,
            |r| Some(r.path.as_str()),
            StrMatch::matches,
        ))
}

/// The string values of a (possibly nested) claim: a string, or each string of a list.
fn claim_values(claims: &serde_json::Value, path: &[String]) -> Vec<String> {
    let mut v = claims;
    for p in path {
        match v.get(p) {
            Some(next) => v = next,
            None => return Vec::new(),
        }
    }
    match v {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        serde_json::Value::Bool(b) => vec![b.to_string()],
        serde_json::Value::Number(n) => vec![n.to_string()],
        _ => Vec::new(),
    }
}

fn condition_matches(c: &Condition, a: &Attributes) -> Tri {
    let strs = |v: Option<&str>| match &c.values {
        ConditionValues::Strings(values) => field(values, v, StrMatch::matches),
        _ => false,
    };
    let ip = |v: Option<IpAddr>| match &c.values {
        ConditionValues::Ips(values) => field(values, v.as_ref(), |b, ip| b.contains(*ip)),
        _ => false,
    };
    let multi = |v: &[String]| match &c.values {
        ConditionValues::Strings(values) => field_multi(values, v, StrMatch::matches),
        _ => false,
    };
    if c.key.is_l7() {
        let Some(req) = &a.http else {
            return Tri::Unknown;
        };
        let auth = req.auth.as_ref();
        return Tri::from(match &c.key {
            Key::RequestHeader(name) => strs(req.header(name)),
            Key::RequestAuthPrincipal => strs(auth.map(|x| x.principal.as_str())),
            Key::RequestAuthPresenter => strs(auth.and_then(|x| x.presenter.as_deref())),
            Key::RequestAuthAudiences => multi(auth.map(|x| &x.audiences[..]).unwrap_or(&[])),
            Key::RequestAuthClaim(path) => multi(
                &auth
                    .map(|x| claim_values(&x.claims, path))
                    .unwrap_or_default(),
            ),
            _ => false,
        });
    }
    Tri::from(match &c.key {
        Key::SourceIp => ip(a.source_ip),
        Key::RemoteIp => ip(a.remote_ip),
        Key::DestinationIp => ip(a.destination_ip),
        Key::SourceNamespace => strs(a.source_namespace.as_deref()),
        Key::SourcePrincipal => strs(a.source_principal.as_deref()),
        Key::ConnectionSni => strs(a.sni.as_deref()),
        Key::DestinationPort => match &c.values {
            ConditionValues::Ports(values) => {
                field(values, a.destination_port.as_ref(), |p, v| p == v)
            }
            _ => false,
        },
        _ => false,
    })
}

/// Whether `rule` matches `a`.
pub fn rule_matches(rule: &Rule, a: &Attributes) -> Tri {
    // Sources first: most rules name their callers, and a rule that cannot match stops there.
    let from = any_or_unconstrained(&rule.from, |s| source_matches(s, a));
    if from == Tri::No {
        return Tri::No;
    }
    let to = any_or_unconstrained(&rule.to, |o| operation_matches(o, a));
    if to == Tri::No {
        return Tri::No;
    }
    from.and(to)
        .and(all(&rule.when, |c| condition_matches(c, a)))
}
