//! Istio's `AuthorizationPolicy`, parsed and validated into the form the evaluator uses.
//!
//! Every field Istio documents is read; a field or `when` key we do not know is an error, never
//! ignored (an ignored `notPrincipals` in a DENY policy would let through what the operator
//! meant to stop). Values are compiled once here: `*`-patterns into [`StrMatch`], addresses
//! into [`IpBlock`], ports into numbers.
use std::{fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::model::{Labels, Origin};

/// `spec.action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string pattern as Istio writes them: `*` (present, non-empty), `abc*` (prefix), `*abc`
/// (suffix), anything else exact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StrMatch {
    pub fn parse(v: &str) -> Self {
        if v == "*" {
            StrMatch::Presence
        } else if let Some(rest) = v.strip_prefix('*') {
            StrMatch::Suffix(rest.to_owned())
        } else if let Some(rest) = v.strip_suffix('*') {
            StrMatch::Prefix(rest.to_owned())
        } else {
            StrMatch::Exact(v.to_owned())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(s) => value == s,
            StrMatch::Prefix(s) => value.starts_with(s.as_str()),
            StrMatch::Suffix(s) => value.ends_with(s.as_str()),
            StrMatch::Presence => !value.is_empty(),
        }
    }

    /// Case-insensitive, for hosts (DNS names are).
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        let lower = |s: &str| s.to_ascii_lowercase();
        match self {
            StrMatch::Exact(s) => value.eq_ignore_ascii_case(s),
            StrMatch::Prefix(s) => lower(value).starts_with(&lower(s)),
            StrMatch::Suffix(s) => lower(value).ends_with(&lower(s)),
            StrMatch::Presence => !value.is_empty(),
        }
    }
}

/// An address or CIDR block of `ipBlocks`, `remoteIpBlocks` and the ip `when` keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpBlock {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpBlock {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IP address or CIDR block");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(bad)?,
            None => max,
        };
        Ok(IpBlock { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            // An IPv4 client seen through an IPv6 socket.
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(IpAddr::V4(v4))),
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (bytes, rest) = ((bits / 8) as usize, bits % 8);
    if a[..bytes] != b[..bytes] {
        return false;
    }
    rest == 0 || (a[bytes] ^ b[bytes]) >> (8 - rest) == 0
}

/// A field and its `not` twin: a value must match one of `any_of` (when given) and none of
/// `none_of` (when given).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Values<T> {
    pub any_of: Vec<T>,
    pub none_of: Vec<T>,
}

impl<T> Default for Values<T> {
    fn default() -> Self {
        Self {
            any_of: Vec::new(),
            none_of: Vec::new(),
        }
    }
}

impl<T> Values<T> {
    pub fn is_empty(&self) -> bool {
        self.any_of.is_empty() && self.none_of.is_empty()
    }

    fn build<R>(
        any_of: Option<Vec<R>>,
        none_of: Option<Vec<R>>,
        parse: impl Fn(R) -> Result<T, String>,
    ) -> Result<Self, String> {
        let conv = |v: Option<Vec<R>>| -> Result<Vec<T>, String> {
            v.unwrap_or_default().into_iter().map(&parse).collect()
        };
        Ok(Values {
            any_of: conv(any_of)?,
            none_of: conv(none_of)?,
        })
    }
}

/// `rules[].from[].source`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Values<StrMatch>,
    pub request_principals: Values<StrMatch>,
    pub namespaces: Values<StrMatch>,
    /// `serviceAccounts` (`namespace/name`), Istio's shorter form of principals.
    pub service_accounts: Values<StrMatch>,
    pub ip_blocks: Values<IpBlock>,
    pub remote_ip_blocks: Values<IpBlock>,
}

/// `rules[].to[].operation`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operation {
    pub hosts: Values<StrMatch>,
    pub ports: Values<u16>,
    pub methods: Values<StrMatch>,
    pub paths: Values<StrMatch>,
}

/// A `when` key Istio documents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    RequestHeader(String),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    RequestAuthPrincipal,
    RequestAuthAudiences,
    RequestAuthPresenter,
    /// `request.auth.claims[a][b]`: the path into nested claims.
    RequestAuthClaim(Vec<String>),
    DestinationIp,
    DestinationPort,
    ConnectionSni,
}

impl Key {
    pub fn parse(key: &str) -> Result<Self, String> {
        let bracketed = |prefix: &str| -> Option<Result<Vec<String>, String>> {
            let rest = key.strip_prefix(prefix)?;
            let mut parts = Vec::new();
            let mut rest = rest;
            while !rest.is_empty() {
                let Some(inner) = rest.strip_prefix('[') else {
                    return Some(Err(format!("bad key {key:?}: expected [name]")));
                };
                let Some(end) = inner.find(']') else {
                    return Some(Err(format!("bad key {key:?}: missing ]")));
                };
                let name = &inner[..end];
                if name.is_empty() {
                    return Some(Err(format!("bad key {key:?}: empty name")));
                }
                parts.push(name.to_owned());
                rest = &inner[end + 1..];
            }
            if parts.is_empty() {
                return Some(Err(format!("bad key {key:?}: expected [name]")));
            }
            Some(Ok(parts))
        };
        if let Some(parts) = bracketed("request.headers") {
            let parts = parts?;
            if parts.len() != 1 {
                return Err(format!("bad key {key:?}: one header name"));
            }
            return Ok(Key::RequestHeader(parts[0].to_ascii_lowercase()));
        }
        if let Some(parts) = bracketed("request.auth.claims") {
            return Ok(Key::RequestAuthClaim(parts?));
        }
        Ok(match key {
            "source.ip" => Key::SourceIp,
            "remote.ip" => Key::RemoteIp,
            "source.namespace" => Key::SourceNamespace,
            "source.principal" => Key::SourcePrincipal,
            "request.auth.principal" => Key::RequestAuthPrincipal,
            "request.auth.audiences" => Key::RequestAuthAudiences,
            "request.auth.presenter" => Key::RequestAuthPresenter,
            "destination.ip" => Key::DestinationIp,
            "destination.port" => Key::DestinationPort,
            "connection.sni" => Key::ConnectionSni,
            _ => return Err(format!("unknown condition key {key:?}")),
        })
    }

    /// Whether the key is an HTTP request attribute (decided per request, at L7).
    pub fn is_l7(&self) -> bool {
        matches!(
            self,
            Key::RequestHeader(_)
                | Key::RequestAuthPrincipal
                | Key::RequestAuthAudiences
                | Key::RequestAuthPresenter
                | Key::RequestAuthClaim(_)
        )
    }
}

/// What a `when` condition compares, by the key's type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConditionValues {
    Strings(Values<StrMatch>),
    Ips(Values<IpBlock>),
    Ports(Values<u16>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub key: Key,
    pub values: ConditionValues,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

impl Rule {
    /// Whether any part of the rule needs HTTP request attributes.
    pub fn is_l7(&self) -> bool {
        self.from.iter().any(|s| !s.request_principals.is_empty())
            || self
                .to
                .iter()
                .any(|o| !(o.hosts.is_empty() && o.methods.is_empty() && o.paths.is_empty()))
            || self.when.iter().any(|c| c.key.is_l7())
    }
}

/// Which workloads a policy is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `selector.matchLabels`; empty = every workload of the namespace (of the mesh, in the
    /// root namespace).
    Selector(Labels),
    /// `targetRef(s)` of kind Service: the workloads those Services select.
    Services(Vec<String>),
    /// `targetRef(s)` of other kinds (Gateway, GatewayClass, ServiceEntry): enforced by
    /// gateways and waypoints, never by this proxy.
    NotHere(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub namespace: String,
    pub name: String,
    pub target: Target,
    pub action: Action,
    /// `provider.name`, for CUSTOM.
    pub provider: Option<String>,
    /// Empty: the policy matches nothing (for ALLOW that is allow-nothing).
    pub rules: Vec<Rule>,
    pub origin: Origin,
}

impl AuthorizationPolicy {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn is_l7(&self) -> bool {
        // A CUSTOM check is an HTTP request to the provider.
        self.action == Action::Custom || self.rules.iter().any(Rule::is_l7)
    }
}

// ---- the YAML as written --------------------------------------------------------------------

type List = Option<Vec<String>>;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpecDoc {
    selector: Option<SelectorDoc>,
    target_ref: Option<TargetRefDoc>,
    target_refs: Option<Vec<TargetRefDoc>>,
    action: Option<Action>,
    provider: Option<ProviderDoc>,
    rules: Option<Vec<RuleDoc>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct SelectorDoc {
    match_labels: Option<Labels>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct TargetRefDoc {
    #[serde(default)]
    group: String,
    kind: String,
    name: String,
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderDoc {
    name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    from: Option<Vec<FromDoc>>,
    to: Option<Vec<ToDoc>>,
    when: Option<Vec<ConditionDoc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FromDoc {
    source: Option<SourceDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToDoc {
    operation: Option<OperationDoc>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SourceDoc {
    principals: List,
    not_principals: List,
    request_principals: List,
    not_request_principals: List,
    namespaces: List,
    not_namespaces: List,
    service_accounts: List,
    not_service_accounts: List,
    ip_blocks: List,
    not_ip_blocks: List,
    remote_ip_blocks: List,
    not_remote_ip_blocks: List,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OperationDoc {
    hosts: List,
    not_hosts: List,
    ports: List,
    not_ports: List,
    methods: List,
    not_methods: List,
    paths: List,
    not_paths: List,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConditionDoc {
    key: String,
    values: List,
    not_values: List,
}

fn strings(any: List, none: List) -> Result<Values<StrMatch>, String> {
    Values::build(any, none, |s| Ok(StrMatch::parse(&s)))
}

fn ips(any: List, none: List) -> Result<Values<IpBlock>, String> {
    Values::build(any, none, |s| IpBlock::parse(&s))
}

fn ports(any: List, none: List) -> Result<Values<u16>, String> {
    Values::build(any, none, |s| {
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {s:?} is not a number in 1-65535"))
    })
}

impl SourceDoc {
    fn compile(self) -> Result<Source, String> {
        let s = Source {
            principals: strings(self.principals, self.not_principals)?,
            request_principals: strings(self.request_principals, self.not_request_principals)?,
            namespaces: strings(self.namespaces, self.not_namespaces)?,
            service_accounts: Values::build(
                self.service_accounts,
                self.not_service_accounts,
                |s| {
                    if s.split('/').count() == 2 && !s.contains('*') {
                        Ok(StrMatch::Exact(s))
                    } else {
                        Err(format!(
                            "service account {s:?} must be written namespace/name, without wildcards"
                        ))
                    }
                },
            )?,
            ip_blocks: ips(self.ip_blocks, self.not_ip_blocks)?,
            remote_ip_blocks: ips(self.remote_ip_blocks, self.not_remote_ip_blocks)?,
        };
        if s == Source::default() {
            return Err("from.source must name at least one field".into());
        }
        if !(s.service_accounts.is_empty() || s.principals.is_empty()) {
            return Err("from.source cannot set both serviceAccounts and principals".into());
        }
        Ok(s)
    }
}

impl OperationDoc {
    fn compile(self) -> Result<Operation, String> {
        let o = Operation {
            hosts: strings(self.hosts, self.not_hosts)?,
            ports: ports(self.ports, self.not_ports)?,
            methods: strings(self.methods, self.not_methods)?,
            paths: strings(self.paths, self.not_paths)?,
        };
        if o == Operation::default() {
            return Err("to.operation must name at least one field".into());
        }
        Ok(o)
    }
}

impl ConditionDoc {
    fn compile(self) -> Result<Condition, String> {
        let key = Key::parse(&self.key)?;
        if self.values.as_ref().is_none_or(Vec::is_empty)
            && self.not_values.as_ref().is_none_or(Vec::is_empty)
        {
            return Err(format!(
                "condition {:?} needs values or notValues",
                self.key
            ));
        }
        let values = match key {
            Key::SourceIp | Key::RemoteIp | Key::DestinationIp => {
                ConditionValues::Ips(ips(self.values, self.not_values)?)
            }
            Key::DestinationPort => ConditionValues::Ports(ports(self.values, self.not_values)?),
            _ => ConditionValues::Strings(strings(self.values, self.not_values)?),
        };
        Ok(Condition { key, values })
    }
}

impl RuleDoc {
    fn compile(self) -> Result<Rule, String> {
        let mut rule = Rule::default();
        for (i, f) in self.from.unwrap_or_default().into_iter().enumerate() {
            let source = f
                .source
                .ok_or_else(|| format!("from[{i}]: source is missing"))?;
            rule.from
                .push(source.compile().map_err(|e| format!("from[{i}]: {e}"))?);
        }
        for (i, t) in self.to.unwrap_or_default().into_iter().enumerate() {
            let operation = t
                .operation
                .ok_or_else(|| format!("to[{i}]: operation is missing"))?;
            rule.to
                .push(operation.compile().map_err(|e| format!("to[{i}]: {e}"))?);
        }
        for (i, c) in self.when.unwrap_or_default().into_iter().enumerate() {
            rule.when
                .push(c.compile().map_err(|e| format!("when[{i}]: {e}"))?);
        }
        Ok(rule)
    }
}

/// The workloads a policy is for, from `selector` or `targetRef(s)` (not both), as Istio reads
/// them for AuthorizationPolicy and RequestAuthentication alike.
pub(super) fn target_of(
    namespace: &str,
    selector: Option<SelectorDoc>,
    target_ref: Option<TargetRefDoc>,
    target_refs: Option<Vec<TargetRefDoc>>,
) -> Result<Target, String> {
    let refs: Vec<TargetRefDoc> = target_ref
        .into_iter()
        .chain(target_refs.unwrap_or_default())
        .collect();
    let labels = selector.and_then(|s| s.match_labels).unwrap_or_default();
    if refs.is_empty() {
        return Ok(Target::Selector(labels));
    }
    if !labels.is_empty() {
        return Err("selector and targetRef(s) cannot both be set".into());
    }
    let mut services = Vec::new();
    let mut elsewhere = Vec::new();
    for r in refs {
        if r.namespace.as_deref().is_some_and(|ns| ns != namespace) {
            return Err(format!(
                "targetRef {} {} must be in the policy's namespace {namespace}",
                r.kind, r.name
            ));
        }
        match (r.group.as_str(), r.kind.as_str()) {
            ("" | "core", "Service") => services.push(r.name),
            (_, kind) => elsewhere.push(format!("{kind} {}", r.name)),
        }
    }
    match (services.is_empty(), elsewhere.is_empty()) {
        (_, true) => Ok(Target::Services(services)),
        (true, false) => Ok(Target::NotHere(elsewhere.join(", "))),
        (false, false) => {
            Err("targetRefs mix Services with kinds this proxy does not serve".into())
        }
    }
}

impl SpecDoc {
    /// Validates the spec as Istio's admission webhook does, into a policy.
    pub fn into_policy(
        self,
        namespace: String,
        name: String,
        origin: Origin,
    ) -> Result<AuthorizationPolicy, String> {
        let action = self.action.unwrap_or(Action::Allow);
        let provider = match (action, self.provider) {
            (Action::Custom, Some(ProviderDoc { name: Some(n) })) if !n.is_empty() => Some(n),
            (Action::Custom, _) => return Err("action CUSTOM needs provider.name".into()),
            (_, Some(_)) => {
                return Err(format!("provider is only for action CUSTOM, not {action}"))
            }
            (_, None) => None,
        };
        let target = target_of(&namespace, self.selector, self.target_ref, self.target_refs)?;
        let mut rules = Vec::new();
        for (i, r) in self.rules.unwrap_or_default().into_iter().enumerate() {
            rules.push(r.compile().map_err(|e| format!("rules[{i}].{e}"))?);
        }
        Ok(AuthorizationPolicy {
            namespace,
            name,
            target,
            action,
            provider,
            rules,
            origin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(spec: &str) -> Result<AuthorizationPolicy, String> {
        let doc: SpecDoc = serde_yaml::from_str(spec).map_err(|e| e.to_string())?;
        doc.into_policy("shop".into(), "p".into(), Origin::default())
    }

    #[test]
    fn patterns_follow_istio() {
        assert_eq!(StrMatch::parse("*"), StrMatch::Presence);
        assert_eq!(StrMatch::parse("/api/*"), StrMatch::Prefix("/api/".into()));
        assert_eq!(StrMatch::parse("*.svc"), StrMatch::Suffix(".svc".into()));
        assert_eq!(StrMatch::parse("a*b"), StrMatch::Exact("a*b".into()));
        assert!(StrMatch::Presence.matches("x") && !StrMatch::Presence.matches(""));
        assert!(StrMatch::parse("*.Example.com").matches_ignore_case("www.example.COM"));
    }

    #[test]
    fn ip_blocks_match_by_prefix() {
        let b = IpBlock::parse("10.1.0.0/16").unwrap();
        assert!(b.contains("10.1.200.3".parse().unwrap()));
        assert!(!b.contains("10.2.0.1".parse().unwrap()));
        assert!(b.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one = IpBlock::parse("10.1.0.5").unwrap();
        assert!(
            one.contains("10.1.0.5".parse().unwrap()) && !one.contains("10.1.0.6".parse().unwrap())
        );
        assert!(IpBlock::parse("10.1.0.0/13")
            .unwrap()
            .contains("10.7.255.255".parse().unwrap()));
        assert!(IpBlock::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        assert!(IpBlock::parse("0.0.0.0/0")
            .unwrap()
            .contains("192.0.2.1".parse().unwrap()));
        for bad in ["10.1.0.0/33", "10.1/8", "x", "fd00::/129", ""] {
            assert!(IpBlock::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_field_is_read() {
        let p = parse(
            r#"
selector: {matchLabels: {app: web}}
action: DENY
rules:
- from:
  - source:
      principals: [cluster.local/ns/a/sa/b]
      notPrincipals: ["*"]
      requestPrincipals: ["iss/*"]
      notRequestPrincipals: [x]
      namespaces: [a]
      notNamespaces: [b]
      ipBlocks: [10.0.0.0/8]
      notIpBlocks: [10.1.0.0/16]
      remoteIpBlocks: [1.2.3.4]
      notRemoteIpBlocks: [1.2.3.5]
  to:
  - operation:
      hosts: ["*.example.com"]
      notHosts: [a.example.com]
      ports: ["8080"]
      notPorts: ["9090"]
      methods: [GET]
      notMethods: [POST]
      paths: ["/api/*"]
      notPaths: ["/api/admin"]
  when:
  - key: request.headers[X-Token]
    values: ["abc"]
  - key: request.auth.claims[groups][0]
    notValues: [guest]
  - key: destination.port
    values: ["8080"]
  - key: source.ip
    values: [10.0.0.0/8]
"#,
        )
        .unwrap();
        assert_eq!(p.action, Action::Deny);
        let r = &p.rules[0];
        let s = &r.from[0];
        assert_eq!(s.principals.any_of.len(), 1);
        assert_eq!(s.principals.none_of, [StrMatch::Presence]);
        assert_eq!(s.remote_ip_blocks.none_of.len(), 1);
        assert_eq!(r.to[0].ports.any_of, [8080]);
        assert_eq!(r.to[0].ports.none_of, [9090]);
        assert_eq!(r.when[0].key, Key::RequestHeader("x-token".into()));
        assert_eq!(
            r.when[1].key,
            Key::RequestAuthClaim(vec!["groups".into(), "0".into()])
        );
        assert!(matches!(r.when[2].values, ConditionValues::Ports(_)));
        assert!(matches!(r.when[3].values, ConditionValues::Ips(_)));
        assert!(r.is_l7() && p.is_l7());
    }

    #[test]
    fn defaults_and_targets() {
        let p = parse("{}").unwrap();
        assert_eq!(p.action, Action::Allow);
        assert!(p.rules.is_empty(), "empty spec = allow nothing");
        assert_eq!(p.target, Target::Selector(Labels::new()));
        let p = parse("rules: [{}]").unwrap();
        assert_eq!(p.rules, [Rule::default()], "one empty rule = match all");
        assert!(!p.is_l7());
        let p = parse("targetRefs: [{kind: Service, group: \"\", name: web}]").unwrap();
        assert_eq!(p.target, Target::Services(vec!["web".into()]));
        let p = parse("targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: gw}")
            .unwrap();
        assert!(matches!(p.target, Target::NotHere(_)));
        let p = parse("action: CUSTOM\nprovider: {name: ext}\nrules: [{to: [{operation: {ports: [\"80\"]}}]}]").unwrap();
        assert_eq!(p.provider.as_deref(), Some("ext"));
        assert!(p.is_l7(), "CUSTOM asks an HTTP provider");
        let p = parse("rules: [{from: [{source: {principals: [a]}}], to: [{operation: {ports: [\"80\"]}}], when: [{key: source.namespace, values: [x]}]}]").unwrap();
        assert!(!p.is_l7(), "principals, ports and source.* are L4");
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        for (spec, expect) in [
            ("action: ALLOWED", "unknown variant"),
            (
                "rules: [{from: [{source: {principal: [a]}}]}]",
                "unknown field `principal`",
            ),
            ("rules: [{from: [{}]}]", "source is missing"),
            ("rules: [{from: [{source: {}}]}]", "at least one field"),
            ("rules: [{to: [{operation: {}}]}]", "at least one field"),
            (
                "rules: [{to: [{operation: {ports: [\"http\"]}}]}]",
                "not a number",
            ),
            (
                "rules: [{to: [{operation: {ports: [\"0\"]}}]}]",
                "not a number",
            ),
            (
                "rules: [{from: [{source: {ipBlocks: [\"10.0.0.0/40\"]}}]}]",
                "CIDR",
            ),
            (
                "rules: [{when: [{key: request.foo, values: [a]}]}]",
                "unknown condition key",
            ),
            (
                "rules: [{when: [{key: source.ip, values: [nope]}]}]",
                "not an IP",
            ),
            (
                "rules: [{when: [{key: destination.port, values: [x]}]}]",
                "not a number",
            ),
            (
                "rules: [{when: [{key: source.ip}]}]",
                "needs values or notValues",
            ),
            (
                "rules: [{when: [{key: \"request.headers[]\", values: [a]}]}]",
                "empty name",
            ),
            (
                "rules: [{when: [{key: \"request.headers\", values: [a]}]}]",
                "expected [name]",
            ),
            ("action: CUSTOM", "provider.name"),
            (
                "action: DENY\nprovider: {name: x}",
                "only for action CUSTOM",
            ),
            (
                "selector: {matchLabels: {a: b}}\ntargetRef: {kind: Service, name: web}",
                "cannot both",
            ),
            (
                "targetRef: {kind: Service, name: web, namespace: other}",
                "policy's namespace",
            ),
            (
                "rules: [{from: [{source: {serviceAccounts: [sa]}}]}]",
                "namespace/name",
            ),
            (
                "rules: [{from: [{source: {serviceAccounts: [a/b], principals: [x]}}]}]",
                "both",
            ),
        ] {
            let e = parse(spec).unwrap_err();
            assert!(e.contains(expect), "{spec}: {e}");
        }
    }
}
