//! Deciding a connection or a request against the AuthorizationPolicies of its destination
//! workload, with Istio's semantics:
//!
//! * CUSTOM first, then DENY, then ALLOW; AUDIT only marks the decision;
//! * with no ALLOW policy the request is allowed; with one or more, it must match one of them;
//! * a policy with no rules matches nothing (ALLOW: allow-nothing), an empty rule matches all;
//! * rules match as [`super::matching`] says.
//!
//! A connection is decided when it arrives, before any byte of it is read, so HTTP attributes
//! are unknown then: a decision that depends on a rule whose match is [`Tri::Unknown`] is
//! [`Verdict::NeedsHttp`], and the proxy must decide each HTTP request.
//! For traffic that is not HTTP, those rules are settled conservatively, as Istio does: a DENY
//! rule matches (deny) and an ALLOW rule does not.
use std::fmt;

use serde::Serialize;

use super::authorization_policy::Action;
use super::matching::{Attributes, Tri};
use super::policy_set::PolicySet;

/// How to settle rules that need HTTP attributes that are not known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unknowns {
    /// At connection time: say the request must be decided at L7.
    Defer,
    /// Traffic that is not HTTP: DENY rules match, ALLOW and AUDIT rules do not, CUSTOM denies.
    Conservative,
}

/// Who decided, for logs and `ztunnel policy check`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the deciding policy; `None` when no policy decided (allowed for
    /// lack of ALLOW policies, or denied because none of them matched).
    pub policy: Option<String>,
    pub rule: Option<usize>,
    pub action: Option<Action>,
    pub reason: String,
    /// The first AUDIT policy and rule that matched.
    pub audit: Option<(String, usize)>,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// The outcome of [`evaluate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Decided(Decision),
    /// A CUSTOM policy matched: the provider decides (the decision if it allows is attached).
    Custom {
        policy: String,
        rule: usize,
        provider: String,
    },
    /// Depends on HTTP attributes: decide per request.
    NeedsHttp,
}

/// Decides `a` against the policies that apply to the destination workload: CUSTOM, then
/// DENY, then ALLOW, each in its policies' order; AUDIT only marks.
pub fn evaluate(policies: &PolicySet, a: &Attributes, unknowns: Unknowns) -> Verdict {
    // Only the policies `a` may match, in evaluation order (AUDIT, CUSTOM, DENY, ALLOW).
    let mut matches = policies.matches(a).peekable();
    macro_rules! each_of {
        ($action:expr) => {
            std::iter::from_fn(|| matches.next_if(|m| m.policy.action == $action))
                .map(|m| (m.policy, m.matched, m.rule))
        };
    }
    let mut needs_http = false;
    // Whether a policy's match counts; an Unknown defers or is settled by `if_unknown`.
    let settle = |t: Tri, if_unknown: bool, needs_http: &mut bool| match (t, unknowns) {
        (Tri::Yes, _) => true,
        (Tri::No, _) => false,
        (Tri::Unknown, Unknowns::Defer) => {
            *needs_http = true;
            false
        }
        (Tri::Unknown, Unknowns::Conservative) => if_unknown,
    };

    let mut audit = None;
    for (p, t, rule) in each_of!(Action::Audit) {
        if settle(t, false, &mut needs_http) && audit.is_none() {
            audit = Some((p.id(), rule.unwrap_or(0)));
        }
    }
    for (p, t, rule) in each_of!(Action::Custom) {
        if a.custom_allowed {
            continue;
        }
        // The provider is asked with the HTTP request, so a CUSTOM policy that may match is
        // settled only once the request is known.
        match (&a.http, unknowns) {
            (Some(_), _) if t == Tri::Yes => {
                return Verdict::Custom {
                    policy: p.id(),
                    rule: rule.unwrap_or(0),
                    provider: p.provider.clone().unwrap_or_default(),
                }
            }
            (_, Unknowns::Defer) => needs_http = true,
            (_, Unknowns::Conservative) => {
                return Verdict::Decided(Decision {
                    allowed: false,
                    policy: Some(p.id()),
                    rule,
                    action: Some(Action::Custom),
                    reason: format!(
                        "denied: CUSTOM policy {} asks provider {} about HTTP requests, and this traffic is not HTTP",
                        p.id(),
                        p.provider.as_deref().unwrap_or("?")
                    ),
                    audit,
                })
            }
        }
    }
    for (p, t, rule) in each_of!(Action::Deny) {
        if settle(t, true, &mut needs_http) {
            let reason = match rule {
                Some(i) => format!("denied by DENY policy {} rule {i}", p.id()),
                None => format!(
                    "denied by DENY policy {}: its HTTP rules cannot be checked on traffic that is not HTTP",
                    p.id()
                ),
            };
            return Verdict::Decided(Decision {
                allowed: false,
                policy: Some(p.id()),
                rule,
                action: Some(Action::Deny),
                reason,
                audit,
            });
        }
    }
    let any_allow = policies.has_allow();
    let mut allowed_by = None;
    // An ALLOW that may match once HTTP is known matters only if none matches already.
    let mut allow_needs_http = false;
    for (p, t, rule) in each_of!(Action::Allow) {
        if settle(t, false, &mut allow_needs_http) {
            allowed_by = Some((p.id(), rule));
            break;
        }
    }
    if needs_http || (allow_needs_http && allowed_by.is_none()) {
        return Verdict::NeedsHttp;
    }
    Verdict::Decided(match (any_allow, allowed_by) {
        (false, _) => Decision {
            allowed: true,
            policy: None,
            rule: None,
            action: None,
            reason: "allowed: no ALLOW policy applies to the workload".into(),
            audit,
        },
        (true, Some((policy, rule))) => Decision {
            allowed: true,
            reason: format!(
                "allowed by ALLOW policy {policy} rule {}",
                rule.unwrap_or(0)
            ),
            policy: Some(policy),
            rule,
            action: Some(Action::Allow),
            audit,
        },
        (true, None) => Decision {
            allowed: false,
            policy: None,
            rule: None,
            action: Some(Action::Allow),
            reason: "denied: ALLOW policies apply to the workload and none of their rules matched"
                .into(),
            audit,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::authorization_policy::{AuthorizationPolicy, SpecDoc};
    use crate::authz::matching::{HttpRequest, RequestAuth};
    use crate::model::Origin;
    use std::net::IpAddr;

    fn policy(ns: &str, name: &str, spec: &str) -> AuthorizationPolicy {
        let doc: SpecDoc = serde_yaml::from_str(spec).unwrap();
        doc.into_policy(ns.into(), name.into(), Origin::default())
            .unwrap()
    }

    fn base(port: u16) -> Attributes {
        Attributes {
            source_ip: Some("10.1.0.2".parse().unwrap()),
            remote_ip: Some("10.1.0.2".parse().unwrap()),
            destination_ip: Some("10.2.0.2".parse().unwrap()),
            destination_port: Some(port),
            ..Default::default()
        }
    }

    /// An mTLS peer running as `ns`/`sa`.
    fn peer(ns: &str, sa: &str) -> Attributes {
        let mut a = base(8080);
        a.source_principal = Some(format!("cluster.local/ns/{ns}/sa/{sa}"));
        a.source_namespace = Some(ns.into());
        a
    }

    fn plaintext() -> Attributes {
        base(8080)
    }

    fn http(mut a: Attributes, method: &str, path: &str) -> Attributes {
        a.http = Some(HttpRequest {
            method: method.into(),
            path: path.into(),
            host: "webapp.istioinaction.io".into(),
            headers: vec![("user-agent".into(), "curl/8".into())],
            auth: None,
        });
        a
    }

    fn jwt(mut a: Attributes, iss: &str, sub: &str, claims: serde_json::Value) -> Attributes {
        let req = a.http.as_mut().expect("a JWT comes with an HTTP request");
        req.auth = Some(RequestAuth {
            principal: format!("{iss}/{sub}"),
            audiences: vec!["webapp".into()],
            presenter: None,
            claims,
        });
        a
    }

    /// "allow", "allow ns/name#rule", "deny", "deny ns/name#rule", "needs-http",
    /// "custom provider".
    fn verdict(policies: &[AuthorizationPolicy], a: &Attributes, unknowns: Unknowns) -> String {
        let refs = PolicySet::new(policies.iter().cloned().map(std::sync::Arc::new));
        match evaluate(&refs, a, unknowns) {
            Verdict::NeedsHttp => "needs-http".into(),
            Verdict::Custom { provider, .. } => format!("custom {provider}"),
            Verdict::Decided(d) => {
                let what = if d.allowed { "allow" } else { "deny" };
                match (&d.policy, d.rule) {
                    (Some(p), Some(r)) => format!("{what} {p}#{r}"),
                    (Some(p), None) => format!("{what} {p}"),
                    _ => what.into(),
                }
            }
        }
    }

    fn check(policies: &[AuthorizationPolicy], rows: &[(&str, Attributes, &str)]) {
        for (what, a, expected) in rows {
            let unknowns = if a.http.is_some() {
                Unknowns::Conservative
            } else {
                Unknowns::Defer
            };
            assert_eq!(&verdict(policies, a, unknowns), expected, "{what}");
        }
    }

    #[test]
    fn no_policy_allows_and_allow_nothing_denies() {
        check(&[], &[("no policy", plaintext(), "allow")]);
        let allow_nothing = [policy("istio-system", "allow-nothing", "{}")];
        check(
            &allow_nothing,
            &[
                ("empty spec: allow nothing", peer("a", "b"), "deny"),
                ("even HTTP", http(peer("a", "b"), "GET", "/"), "deny"),
            ],
        );
        let allow_all = [policy("foo", "allow-all", "rules: [{}]")];
        check(
            &allow_all,
            &[("one empty rule", plaintext(), "allow foo/allow-all#0")],
        );
        // A DENY with no rules never matches.
        let deny_none = [policy("foo", "deny", "action: DENY")];
        check(&deny_none, &[("DENY without rules", plaintext(), "allow")]);
    }

    #[test]
    fn istio_docs_http_tcp_and_deny_examples() {
        // Deny GET (docs: authorization/deny) and allow only some TCP ports (docs: tcp).
        let deny_get = [policy(
            "foo",
            "deny-method-get",
            "action: DENY\nrules: [{to: [{operation: {methods: [GET]}}]}]",
        )];
        check(
            &deny_get,
            &[
                (
                    "GET denied",
                    http(peer("foo", "sleep"), "GET", "/ip"),
                    "deny foo/deny-method-get#0",
                ),
                (
                    "POST allowed",
                    http(peer("foo", "sleep"), "POST", "/ip"),
                    "allow",
                ),
                ("unknown at connect", peer("foo", "sleep"), "needs-http"),
            ],
        );
        assert_eq!(
            verdict(&deny_get, &peer("foo", "sleep"), Unknowns::Conservative),
            "deny foo/deny-method-get",
            "not HTTP: a DENY with HTTP rules matches conservatively"
        );
        let tcp = [policy(
            "foo",
            "tcp-policy",
            "rules: [{to: [{operation: {ports: [\"9000\", \"9001\"]}}]}]",
        )];
        let mut on_9002 = peer("foo", "sleep");
        on_9002.destination_port = Some(9002);
        let mut on_9001 = on_9002.clone();
        on_9001.destination_port = Some(9001);
        check(
            &tcp,
            &[
                ("9001 allowed", on_9001, "allow foo/tcp-policy#0"),
                ("9002 denied at L4", on_9002, "deny"),
            ],
        );
        // An ALLOW that matches on L4 attributes settles it; another's HTTP rule does not matter.
        let mixed = [
            policy(
                "foo",
                "a-get",
                "rules: [{to: [{operation: {methods: [GET]}}]}]",
            ),
            policy(
                "foo",
                "b-port",
                "rules: [{to: [{operation: {ports: [\"8080\"]}}]}]",
            ),
        ];
        check(
            &mixed,
            &[(
                "L4 ALLOW decides",
                peer("foo", "sleep"),
                "allow foo/b-port#0",
            )],
        );
        // An ALLOW with an HTTP rule on plain TCP: the rule cannot match, so it denies.
        let allow_get = [policy(
            "foo",
            "allow-get",
            "rules: [{to: [{operation: {methods: [GET], ports: [\"8080\"]}}]}]",
        )];
        assert_eq!(
            verdict(&allow_get, &peer("foo", "sleep"), Unknowns::Conservative),
            "deny"
        );
        // notNamespaces: everything from outside foo is denied, including plaintext.
        let deny_others = [policy(
            "foo",
            "deny-others",
            "action: DENY\nrules: [{from: [{source: {notNamespaces: [foo]}}]}]",
        )];
        check(
            &deny_others,
            &[
                ("from foo", peer("foo", "a"), "allow"),
                ("from bar", peer("bar", "a"), "deny foo/deny-others#0"),
                (
                    "plaintext has no namespace",
                    plaintext(),
                    "deny foo/deny-others#0",
                ),
            ],
        );
        // ipBlocks, and a when on source.ip.
        let by_ip = [policy(
            "foo",
            "deny-ip",
            "action: DENY\nrules: [{from: [{source: {ipBlocks: [10.1.0.0/24]}}]}]",
        )];
        let mut other_ip = plaintext();
        other_ip.source_ip = Some("10.9.0.1".parse().unwrap());
        check(
            &by_ip,
            &[
                ("in block", plaintext(), "deny foo/deny-ip#0"),
                ("outside", other_ip, "allow"),
            ],
        );
    }

    #[test]
    fn matching_rules_and_lists() {
        let p = [policy(
            "foo",
            "p",
            r#"
rules:
- from: [{source: {principals: ["cluster.local/ns/foo/sa/a"]}}, {source: {namespaces: [bar]}}]
  to: [{operation: {ports: ["8080"]}}]
  when: [{key: destination.port, values: ["8080"]}, {key: source.ip, notValues: [10.9.0.0/16]}]
- from: [{source: {principals: ["*"], notPrincipals: ["*/sa/evil"]}}]
  to: [{operation: {ports: ["9090"]}}]
"#,
        )];
        let mut on_9090 = peer("baz", "x");
        on_9090.destination_port = Some(9090);
        let mut evil = peer("baz", "evil");
        evil.destination_port = Some(9090);
        let mut from_9 = peer("foo", "a");
        from_9.source_ip = Some("10.9.1.1".parse().unwrap());
        check(
            &p,
            &[
                ("first source", peer("foo", "a"), "allow foo/p#0"),
                ("second source (OR)", peer("bar", "z"), "allow foo/p#0"),
                ("neither source", peer("baz", "z"), "deny"),
                ("when AND: ip excluded", from_9, "deny"),
                ("presence and a not list", on_9090, "allow foo/p#1"),
                ("suffix in notPrincipals", evil, "deny"),
                ("plaintext has no principal", plaintext(), "deny"),
            ],
        );
        // Prefix and suffix patterns on paths and hosts; hosts ignore case.
        let paths = [policy(
            "foo",
            "paths",
            "rules: [{to: [{operation: {paths: [\"/api/*\", \"*.html\"], notPaths: [\"/api/admin*\"], hosts: [\"*.ISTIOINACTION.io\"]}}]}]",
        )];
        check(
            &paths,
            &[
                (
                    "prefix",
                    http(plaintext(), "GET", "/api/items"),
                    "allow foo/paths#0",
                ),
                (
                    "suffix",
                    http(plaintext(), "GET", "/index.html"),
                    "allow foo/paths#0",
                ),
                ("not", http(plaintext(), "GET", "/api/admin/x"), "deny"),
                ("neither", http(plaintext(), "GET", "/other"), "deny"),
            ],
        );
        // Headers, and CUSTOM comes first.
        let headers = [
            policy("foo", "ext", "action: CUSTOM\nprovider: {name: my-ext}\nrules: [{to: [{operation: {paths: [\"/ext*\"]}}]}]"),
            policy("foo", "deny-ua", "action: DENY\nrules: [{when: [{key: \"request.headers[User-Agent]\", values: [\"curl/*\"]}]}]"),
        ];
        check(
            &headers,
            &[
                (
                    "CUSTOM before DENY",
                    http(plaintext(), "GET", "/ext/a"),
                    "custom my-ext",
                ),
                (
                    "header",
                    http(plaintext(), "GET", "/x"),
                    "deny foo/deny-ua#0",
                ),
                ("unknown at connect", plaintext(), "needs-http"),
            ],
        );
        assert_eq!(
            verdict(&headers, &plaintext(), Unknowns::Conservative),
            "deny foo/ext",
            "CUSTOM cannot ask about traffic that is not HTTP"
        );
    }

    #[test]
    fn audit_marks_without_deciding() {
        let policies = [
            policy(
                "foo",
                "audit",
                "action: AUDIT\nrules: [{to: [{operation: {ports: [\"8080\"]}}]}]",
            ),
            policy("foo", "allow", "rules: [{}]"),
        ];
        let refs = PolicySet::new(policies.iter().cloned().map(std::sync::Arc::new));
        let Verdict::Decided(d) = evaluate(&refs, &plaintext(), Unknowns::Defer) else {
            panic!()
        };
        assert!(d.allowed);
        assert_eq!(d.audit, Some(("foo/audit".into(), 0)));
        assert_eq!(d.policy.as_deref(), Some("foo/allow"));
    }

    /// "Istio in Action", chapter 9, as decisions of the node proxy.
    #[test]
    fn istio_in_action_chapter_9() {
        // 9.4.2: allow only /api/catalog* on webapp.
        let catalog_requests = policy(
            "istioinaction",
            "allow-catalog-requests-in-web-app",
            "selector: {matchLabels: {app: webapp}}\nrules: [{to: [{operation: {paths: [\"/api/catalog*\"]}}]}]\naction: ALLOW",
        );
        check(
            &[catalog_requests],
            &[
                (
                    "catalog path",
                    http(peer("default", "sleep"), "GET", "/api/catalog/items"),
                    "allow istioinaction/allow-catalog-requests-in-web-app#0",
                ),
                (
                    "other path",
                    http(peer("default", "sleep"), "GET", "/hello/world"),
                    "deny",
                ),
            ],
        );

        // 9.4.3: mesh-wide deny-all, then namespace source for GETs, then unauthenticated GETs.
        let deny_all = policy("istio-system", "deny-all", "{}");
        let from_default = policy(
            "istioinaction",
            "webapp-allow-view-default-ns",
            "rules: [{from: [{source: {namespaces: [default]}}], to: [{operation: {methods: [GET]}}]}]",
        );
        check(
            std::slice::from_ref(&deny_all),
            &[(
                "deny-all",
                http(peer("default", "sleep"), "GET", "/"),
                "deny",
            )],
        );
        let ns_rows = [
            (
                "mTLS from default",
                http(peer("default", "sleep"), "GET", "/api/catalog"),
                "allow istioinaction/webapp-allow-view-default-ns#0",
            ),
            (
                "plaintext sleep has no namespace",
                http(plaintext(), "GET", "/api/catalog"),
                "deny",
            ),
            ("POST", http(peer("default", "sleep"), "POST", "/"), "deny"),
        ];
        check(&[deny_all.clone(), from_default], &ns_rows);
        let unauthenticated = policy(
            "istioinaction",
            "allow-unauthenticated-view-default-ns",
            "selector: {matchLabels: {app: webapp}}\nrules: [{to: [{operation: {methods: [GET]}}]}]",
        );
        check(
            &[deny_all.clone(), unauthenticated],
            &[(
                "anyone may GET",
                http(plaintext(), "GET", "/"),
                "allow istioinaction/allow-unauthenticated-view-default-ns#0",
            )],
        );

        // 9.4.4: catalog-viewer, by the caller's service account.
        let catalog_viewer = policy(
            "istioinaction",
            "catalog-viewer",
            "selector: {matchLabels: {app: catalog}}\nrules: [{from: [{source: {principals: [\"cluster.local/ns/istioinaction/sa/webapp\"]}}], to: [{operation: {methods: [GET]}}]}]",
        );
        check(
            &[deny_all.clone(), catalog_viewer],
            &[
                (
                    "webapp's identity",
                    http(peer("istioinaction", "webapp"), "GET", "/items"),
                    "allow istioinaction/catalog-viewer#0",
                ),
                (
                    "another identity",
                    http(peer("istioinaction", "other"), "GET", "/items"),
                    "deny",
                ),
                (
                    "connect-time",
                    peer("istioinaction", "webapp"),
                    "needs-http",
                ),
                (
                    "connect-time, wrong identity",
                    peer("istioinaction", "other"),
                    "deny",
                ),
            ],
        );

        // 9.4.5: end-user JWTs: GET for users, everything for admins, a token required.
        let users_get = policy(
            "istio-system",
            "allow-all-with-jwt-to-webapp",
            "rules: [{from: [{source: {requestPrincipals: [\"auth@istioinaction.io/*\"]}}], to: [{operation: {hosts: [\"webapp.istioinaction.io\"], methods: [GET]}}]}]",
        );
        let admins = policy(
            "istio-system",
            "allow-mesh-all-ops-admin",
            "rules: [{from: [{source: {requestPrincipals: [\"auth@istioinaction.io/*\"]}}], when: [{key: \"request.auth.claims[group]\", values: [admin]}]}]",
        );
        let require_jwt = policy(
            "istio-system",
            "app-requires-jwt",
            "action: DENY\nrules: [{from: [{source: {notRequestPrincipals: [\"*\"]}}], to: [{operation: {hosts: [\"webapp.istioinaction.io\"]}}]}]",
        );
        let set = [users_get, admins, require_jwt];
        let user = |m: &str| {
            jwt(
                http(plaintext(), m, "/api/catalog"),
                "auth@istioinaction.io",
                "user",
                serde_json::json!({"group": "user"}),
            )
        };
        let admin = jwt(
            http(plaintext(), "POST", "/api/catalog"),
            "auth@istioinaction.io",
            "admin",
            serde_json::json!({"group": "admin", "nested": {"role": ["ops"]}}),
        );
        check(
            &set,
            &[
                (
                    "no token",
                    http(plaintext(), "GET", "/"),
                    "deny istio-system/app-requires-jwt#0",
                ),
                (
                    "user GET",
                    user("GET"),
                    "allow istio-system/allow-all-with-jwt-to-webapp#0",
                ),
                ("user POST", user("POST"), "deny"),
                (
                    "admin POST",
                    admin.clone(),
                    "allow istio-system/allow-mesh-all-ops-admin#0",
                ),
            ],
        );
        // Nested claims.
        let nested = [policy(
            "foo",
            "nested",
            "rules: [{when: [{key: \"request.auth.claims[nested][role]\", values: [ops]}, {key: request.auth.audiences, values: [webapp]}, {key: request.auth.principal, values: [\"auth@istioinaction.io/admin\"]}]}]",
        )];
        check(&nested, &[("nested claim", admin, "allow foo/nested#0")]);
    }

    #[test]
    fn service_accounts_and_sni_and_destination_ip() {
        let p = [policy(
            "foo",
            "p",
            "rules: [{from: [{source: {serviceAccounts: [\"istioinaction/webapp\"]}}], when: [{key: destination.ip, values: [10.2.0.0/24]}, {key: connection.sni, notValues: [\"evil.*\"]}]}]",
        )];
        check(
            &p,
            &[
                (
                    "service account",
                    peer("istioinaction", "webapp"),
                    "allow foo/p#0",
                ),
                ("other", peer("istioinaction", "catalog"), "deny"),
            ],
        );
    }

    /// The index only skips work: on random policies and callers, decisions (including the
    /// reported policy and rule) equal those of a full scan. The policies name callers every
    /// way the index files them (exact principals, prefixes, suffixes and `*`; namespaces and
    /// service accounts exactly; IP blocks), exclude them (`not...` lists, alone or with
    /// something required) or leave the rule open (requestPrincipals), several sources per
    /// rule; the callers are mTLS peers of a few namespaces and service accounts, and
    /// plaintext clients, from a few addresses (IPv4, IPv6, IPv4-mapped).
    #[test]
    fn indexed_decisions_equal_a_full_scan() {
        use std::sync::Arc;

        use crate::authz::PolicySet;
        let seed = std::cell::Cell::new(0x2545_f491_4f6c_dd1d_u64);
        let next = |n: usize| {
            let mut x = seed.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            seed.set(x);
            (x % n as u64) as usize
        };
        let namespaces = ["shop", "shop-eu", "bank"];
        let accounts = ["sa0", "sa1", "sa10", "web"];
        let ips = [
            "10.1.0.2",
            "10.1.2.3",
            "10.9.0.1",
            "fd00::1",
            "::ffff:10.1.2.3",
        ];
        let blocks = [
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.2.3",
            "10.0.0.0/8",
            "0.0.0.0/0",
            "fd00::/8",
            "::ffff:10.1.0.0/112",
        ];
        let actions = ["ALLOW", "DENY", "AUDIT", "CUSTOM\nprovider: {name: authz}"];
        let mut scanned_rules = 0;
        for round in 0..2000 {
            // A value of each kind, as a pattern or exactly.
            let str_value = |pool: &[&str], full: &dyn Fn(&str) -> String| -> String {
                let v = full(pool[next(pool.len())]);
                // Any cut: a pattern may cover the whole value, or be just `*`.
                let cut = next(v.len() + 1);
                match next(6) {
                    0 => format!("\"{}*\"", &v[..cut]),
                    1 => format!("\"*{}\"", &v[cut..]),
                    2 => "\"*\"".to_owned(),
                    _ => format!("\"{v}\""),
                }
            };
            let principal = |sa: &str| format!("cluster.local/ns/shop/sa/{sa}");
            let mut policies = Vec::new();
            for pi in 0..1 + next(6) {
                let mut rules = Vec::new();
                for _ in 0..next(4) {
                    let mut sources = Vec::new();
                    for _ in 0..next(3) {
                        // Each field at most once (YAML refuses a key twice), at least one.
                        let mut kinds: Vec<usize> = (0..11).filter(|_| next(6) == 0).collect();
                        if kinds.is_empty() {
                            kinds.push(next(11));
                        }
                        // Istio refuses principals and service accounts in one source.
                        if kinds.iter().any(|k| *k < 2) {
                            kinds.retain(|k| !(4..6).contains(k));
                        }
                        let fields: Vec<String> = kinds
                            .into_iter()
                            .map(|kind| {
                                let (key, values) = match kind {
                                    0 | 1 => (
                                        "principals",
                                        format!(
                                            "{}, {}",
                                            str_value(&accounts, &principal),
                                            str_value(&accounts, &|sa| {
                                                let ns = ["shop", "bank"][sa.len() % 2];
                                                format!("cluster.local/ns/{ns}/sa/{sa}")
                                            })
                                        ),
                                    ),
                                    2 | 3 => {
                                        ("namespaces", str_value(&namespaces, &|n| n.to_owned()))
                                    }
                                    // Istio takes service accounts exactly.
                                    4 | 5 => (
                                        "serviceAccounts",
                                        format!("shop/{}", accounts[next(accounts.len())]),
                                    ),
                                    6..=9 => (
                                        if kind < 8 {
                                            "ipBlocks"
                                        } else {
                                            "remoteIpBlocks"
                                        },
                                        format!(
                                            "\"{}\", \"{}\"",
                                            blocks[next(blocks.len())],
                                            blocks[next(blocks.len())]
                                        ),
                                    ),
                                    _ => ("requestPrincipals", "\"*\"".to_owned()),
                                };
                                // Odd kinds (and the second of each IP pair) are the `not` twin.
                                let key = if kind % 2 == 1 && kind < 10 {
                                    format!("not{}{}", key[..1].to_uppercase(), &key[1..])
                                } else {
                                    key.to_owned()
                                };
                                format!("{key}: [{values}]")
                            })
                            .collect();
                        sources.push(format!("{{source: {{{}}}}}", fields.join(", ")));
                    }
                    let to = match next(3) {
                        0 => ", to: [{operation: {paths: [/admin]}}]",
                        1 => ", to: [{operation: {ports: [\"8080\"]}}]",
                        _ => "",
                    };
                    rules.push(format!("{{from: [{}]{to}}}", sources.join(", ")));
                }
                let spec = format!(
                    "action: {}\nrules: [{}]",
                    actions[next(actions.len())],
                    rules.join(", ")
                );
                let doc: SpecDoc =
                    serde_yaml::from_str(&spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
                let p = doc
                    .into_policy("shop".into(), format!("p{pi}"), Origin::default())
                    .unwrap_or_else(|e| panic!("{spec}: {e}"));
                policies.push(Arc::new(p));
            }
            let indexed = PolicySet::new(policies.iter().cloned());
            let scanned = PolicySet::unindexed(policies.iter().cloned());
            scanned_rules += policies.iter().map(|p| p.rules.len()).sum::<usize>();
            for caller in 0..8 {
                let source_ip: IpAddr = ips[next(ips.len())].parse().unwrap();
                let remote_ip: IpAddr = ips[next(ips.len())].parse().unwrap();
                let mut a = Attributes {
                    source_ip: Some(source_ip),
                    remote_ip: Some(if next(2) == 0 { source_ip } else { remote_ip }),
                    destination_port: Some(8080),
                    ..Default::default()
                };
                if caller < 6 {
                    let ns = namespaces[next(namespaces.len())];
                    let sa = accounts[next(accounts.len())];
                    a.source_principal = Some(format!("cluster.local/ns/{ns}/sa/{sa}"));
                    a.source_namespace = Some(ns.into());
                }
                for http in [None, Some("/admin"), Some("/")] {
                    a.http = http.map(|path| HttpRequest {
                        method: "GET".into(),
                        path: path.into(),
                        ..Default::default()
                    });
                    for unknowns in [Unknowns::Defer, Unknowns::Conservative] {
                        assert_eq!(
                            evaluate(&indexed, &a, unknowns),
                            evaluate(&scanned, &a, unknowns),
                            "round {round}, caller {a:?}, {unknowns:?}\npolicies: {policies:#?}"
                        );
                    }
                }
            }
        }
        assert!(
            scanned_rules > 5000,
            "the generator makes rules: {scanned_rules}"
        );
    }
}
