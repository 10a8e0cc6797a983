//! `ztunnel policy check`: would this call be allowed, and why? It builds the call the proxy
//! would see and runs the proxy's own decision ([`admit`]) on it, over the same snapshot a
//! configuration directory gives the proxy.
use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use jsonwebtoken::jwk::JwkSet;

use serde::Serialize;

use crate::authz::{
    admit, jwks,
    request_authentication::{
        authenticate, JwtError, JwtOutcome, JwtRule, Keys, TokenLocation, TokenSource,
    },
    Admission, CustomCheck, Decision, HttpRequest, InboundCall, RequestAuth, Transport, Unknowns,
};
use crate::{
    identity::SpiffeId,
    model::Pod,
    state::{EnrolmentPolicy, Snapshot},
};

/// Who calls.
#[derive(Clone, Debug)]
pub enum Caller {
    /// A pod of the configuration (`namespace/name`): mTLS with its identity if it is in the
    /// mesh, plaintext otherwise.
    Pod(String),
    /// An mTLS peer with this SPIFFE id (`spiffe://` optional).
    Principal(String),
    /// A client outside the mesh.
    Plaintext,
}

/// What to check; `None` fields take the defaults the proxy would see.
#[derive(Clone, Debug)]
pub struct CheckRequest {
    /// `namespace/name` of the destination pod.
    pub to: String,
    pub port: Option<u16>,
    pub from: Caller,
    pub from_ip: Option<IpAddr>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    /// `name: value` pairs.
    pub headers: Vec<String>,
    pub jwt: Option<String>,
    pub sni: Option<String>,
    pub trust_domain: String,
    pub enrolment: EnrolmentPolicy,
}

/// Whether the call would be let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Allow,
    Deny,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
        })
    }
}

/// The answer, as printed with `--output json`.
#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    /// `ALLOW` or `DENY`.
    pub decision: Verdict,
    /// 200, or 403 for a denial.
    pub status: u16,
    pub policy: Option<String>,
    pub rule: Option<usize>,
    pub audit: bool,
    pub audit_policy: Option<String>,
    pub reason: String,
    /// `http` (a request was described) or `tcp` (a connection only).
    pub evaluated_as: &'static str,
    /// `mtls` or `plaintext`.
    pub transport: &'static str,
    pub source_principal: Option<String>,
    pub source_ip: Option<IpAddr>,
    pub destination: String,
}

/// The pod `name` (`namespace/name`, given as flag `what`) of the configuration.
pub(crate) fn find_pod<'a>(
    snapshot: &'a Snapshot,
    what: &str,
    name: &str,
) -> Result<&'a Pod, String> {
    let (ns, pod) = name
        .split_once('/')
        .filter(|(ns, pod)| !ns.is_empty() && !pod.is_empty())
        .ok_or_else(|| format!("{what} must be written namespace/pod, got {name:?}"))?;
    snapshot
        .pods
        .get(&(ns.to_owned(), pod.to_owned()))
        .map(|p| p.as_ref())
        .ok_or_else(|| format!("no pod {ns}/{pod} in the configuration"))
}

/// Answers `req` against `snapshot`; `Err` is bad input. `jwks` gives the key set of a
/// RequestAuthentication `jwksUri` (the CLI fetches them first).
pub fn check(
    snapshot: &Snapshot,
    req: &CheckRequest,
    jwks: &dyn Fn(&str) -> Option<Arc<JwkSet>>,
) -> Result<CheckResult, String> {
    let pod = find_pod(snapshot, "--to", &req.to)?;
    let port = match (req.port, pod.container_ports.first()) {
        (Some(p), _) => p,
        (None, Some(c)) => c.port,
        (None, None) => {
            return Err(format!(
                "{} declares no container port: pass --port",
                pod.workload()
            ))
        }
    };
    let (transport, principal, mut source_ip) = match &req.from {
        Caller::Pod(name) => {
            let from = find_pod(snapshot, "--from", name)?;
            let ip = from.ips.first().copied();
            if snapshot.in_mesh(from, &req.enrolment) {
                let id = SpiffeId::new(&req.trust_domain, &from.namespace, &from.service_account)
                    .map_err(|e| format!("{}: {e}", from.workload()))?;
                (Transport::Mesh, Some(id), ip)
            } else {
                (Transport::Plaintext, None, ip)
            }
        }
        Caller::Principal(p) => {
            let text = if p.starts_with("spiffe://") {
                p.clone()
            } else {
                format!("spiffe://{p}")
            };
            let id: SpiffeId = text
                .parse()
                .map_err(|e| format!("--from-principal {p:?}: {e}"))?;
            (Transport::Mesh, Some(id), None)
        }
        Caller::Plaintext => (Transport::Plaintext, None, None),
    };
    if req.from_ip.is_some() {
        source_ip = req.from_ip;
    }
    let dst_ip = pod.ips.first().copied();
    let destination = match dst_ip {
        Some(ip) => SocketAddr::new(ip, port).to_string(),
        None => format!("{}:{port}", pod.workload()),
    };
    let mut call = InboundCall::new(
        transport,
        principal.as_ref(),
        source_ip,
        SocketAddr::new(
            dst_ip.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            port,
        ),
    );
    call.attributes.destination_ip = dst_ip;
    call.attributes.sni = req.sni.clone();
    let describes_http = req.method.is_some()
        || req.path.is_some()
        || req.host.is_some()
        || req.jwt.is_some()
        || !req.headers.is_empty();
    if describes_http {
        let mut headers: Vec<(String, String)> = Vec::new();
        for h in &req.headers {
            let (name, value) = h
                .split_once(':')
                .filter(|(n, _)| !n.trim().is_empty())
                .ok_or_else(|| format!("--header must be 'name: value', got {h:?}"))?;
            let name = name.trim().to_ascii_lowercase();
            match headers.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => {
                    v.push(',');
                    v.push_str(value.trim());
                }
                None => headers.push((name, value.trim().to_owned())),
            }
        }
        let path = req.path.clone().unwrap_or_else(|| "/".into());
        call.attributes.http = Some(HttpRequest {
            method: req.method.clone().unwrap_or_else(|| "GET".into()),
            // The proxy matches the path without its query string.
            path: path.split('?').next().unwrap_or_default().to_owned(),
            host: req.host.clone().unwrap_or_else(|| destination.clone()),
            headers,
            auth: None,
        });
    }
    let mut note = None;
    if let (Some(token), Some(http)) = (&req.jwt, call.attributes.http.as_mut()) {
        match authenticate_token(snapshot, pod, token, jwks) {
            Ok(auth) => http.auth = auth,
            Err(reason) => {
                let d = Decision {
                    allowed: false,
                    policy: None,
                    rule: None,
                    action: None,
                    reason: format!("the JWT is refused: {reason}"),
                    audit: None,
                };
                return Ok(result(
                    &call,
                    transport,
                    source_ip,
                    destination,
                    d,
                    401,
                    true,
                ));
            }
        }
    }
    let admission = match admit(snapshot, pod, &call, Unknowns::Defer) {
        Admission::PerRequest => {
            note = Some(
                "the answer depends on the HTTP request (pass --method, --path, --host or --header); as traffic that is not HTTP: ",
            );
            admit(snapshot, pod, &call, Unknowns::Conservative)
        }
        a => a,
    };
    let d = match admission {
        Admission::Allowed(d) | Admission::Denied(d) | Admission::MtlsRequired(d) => d,
        Admission::Custom(CustomCheck {
            mut denied,
            provider,
            ..
        }) => {
            denied.reason = format!(
                "{}: its provider {provider} decides, and policy check does not call it; if it allows, DENY and ALLOW policies decide next",
                denied.reason
            );
            denied
        }
        Admission::PerRequest => unreachable!("conservative decisions are final"),
    };
    let mut d = d;
    d.reason = format!("{}{}", note.unwrap_or_default(), d.reason);
    let status = if d.allowed { 200 } else { 403 };
    Ok(result(
        &call,
        transport,
        source_ip,
        destination,
        d,
        status,
        describes_http,
    ))
}

fn result(
    call: &InboundCall,
    transport: Transport,
    source_ip: Option<IpAddr>,
    destination: String,
    d: Decision,
    status: u16,
    http: bool,
) -> CheckResult {
    CheckResult {
        decision: if d.allowed {
            Verdict::Allow
        } else {
            Verdict::Deny
        },
        status,
        policy: d.policy.clone(),
        rule: d.rule,
        audit: d.audit.is_some(),
        audit_policy: d.audit.as_ref().map(|(p, r)| format!("{p} rule {r}")),
        reason: d.reason,
        evaluated_as: if http { "http" } else { "tcp" },
        transport: match transport {
            Transport::Mesh => "mtls",
            Transport::Plaintext => "plaintext",
        },
        source_principal: call.attributes.source_principal.clone(),
        source_ip,
        destination,
    }
}

/// Fetches every key set a RequestAuthentication of `snapshot` names by `jwksUri`, once, as
/// the proxy would. One that cannot be fetched is reported (on stderr) and left out, so tokens
/// of its issuer are refused as the proxy would refuse them; `Err` only if no runtime starts.
pub fn fetch_key_sets(snapshot: &Snapshot) -> Result<HashMap<String, Arc<JwkSet>>, String> {
    let uris: BTreeSet<String> = snapshot
        .request_authentications
        .iter()
        .flat_map(|ra| &ra.rules)
        .filter_map(|r| match &r.keys {
            Keys::Uri(uri) => Some(uri.clone()),
            Keys::Inline(_) => None,
        })
        .collect();
    let mut fetched = HashMap::new();
    if uris.is_empty() {
        return Ok(fetched);
    }
    let rt = tokio::runtime::Runtime::new().map_err(|e| format!("starting the runtime: {e}"))?;
    for uri in uris {
        match rt.block_on(tokio::time::timeout(jwks::TIMEOUT, jwks::fetch(&uri))) {
            Ok(Ok(set)) => {
                fetched.insert(uri, Arc::new(set));
            }
            Ok(Err(e)) => eprintln!("warning: fetching {uri}: {e}"),
            Err(_) => eprintln!("warning: fetching {uri}: timed out"),
        }
    }
    Ok(fetched)
}

/// Validates `token` as the workload's RequestAuthentications would, wherever they look for
/// tokens. `Ok(None)` when none applies (the token is then ignored, as in Istio).
fn authenticate_token(
    snapshot: &Snapshot,
    pod: &Pod,
    token: &str,
    jwks: &dyn Fn(&str) -> Option<Arc<JwkSet>>,
) -> Result<Option<RequestAuth>, JwtError> {
    let rules: Vec<&JwtRule> = snapshot
        .request_authentications_for(pod)
        .into_iter()
        .flat_map(|ra| &ra.rules)
        .collect();
    let mut headers = Vec::new();
    let mut query = Vec::new();
    for loc in rules.iter().flat_map(|r| &r.locations) {
        match loc {
            TokenLocation::Header { name, prefix } => {
                headers.push((name.clone(), format!("{prefix}{token}")))
            }
            TokenLocation::Param(name) => query.push(format!("{name}={token}")),
            TokenLocation::Cookie(name) => {
                headers.push(("cookie".into(), format!("{name}={token}")))
            }
        }
    }
    let query = query.join("&");
    let source = TokenSource {
        headers: &headers,
        query: Some(&query),
    };
    match authenticate(&rules, &source, |r| match &r.keys {
        Keys::Inline(set) => Some(set.clone()),
        Keys::Uri(uri) => jwks(uri),
    }) {
        JwtOutcome::NoToken => Ok(None),
        JwtOutcome::Valid(auth, _) => Ok(Some(auth)),
        JwtOutcome::Invalid(reason) => Err(reason),
    }
}

impl CheckResult {
    /// The text form, for people.
    pub fn text(&self) -> String {
        let mut out = format!("{} (status {})\n", self.decision, self.status);
        if let Some(p) = &self.policy {
            match self.rule {
                Some(r) => out.push_str(&format!("  policy:  {p}, rule {r}\n")),
                None => out.push_str(&format!("  policy:  {p}\n")),
            }
        }
        out.push_str(&format!("  reason:  {}\n", self.reason));
        let from = match (&self.source_principal, self.source_ip) {
            (Some(p), Some(ip)) => format!("{p} at {ip}"),
            (Some(p), None) => p.clone(),
            (None, Some(ip)) => ip.to_string(),
            (None, None) => "an unknown address".into(),
        };
        out.push_str(&format!(
            "  call:    {} from {from} to {} ({})\n",
            self.transport, self.destination, self.evaluated_as
        ));
        if let Some(a) = &self.audit_policy {
            out.push_str(&format!("  audit:   marked by {a}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::parse_file,
        state::{MeshSettings, Objects},
    };

    const CONFIG: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: istioinaction, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Pod
metadata: {name: webapp, namespace: istioinaction, labels: {app: webapp}}
spec: {serviceAccountName: webapp, containers: [{ports: [{containerPort: 8080}]}]}
status: {podIP: 10.2.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: istioinaction}
spec: {serviceAccountName: client}
status: {podIP: 10.1.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: default}
status: {podIP: 10.1.0.4}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: webapp-get, namespace: istioinaction}
spec:
  selector: {matchLabels: {app: webapp}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/istioinaction/sa/client"]}}]
    to: [{operation: {methods: [GET], paths: ["/api/*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-all, namespace: istio-system}
spec: {action: AUDIT, rules: [{}]}
"#;

    fn snapshot() -> Snapshot {
        let mut o = Objects::default();
        parse_file(std::path::Path::new("c.yaml"), CONFIG, &mut o).unwrap();
        Snapshot::build(1, o, &MeshSettings::default())
    }

    fn request(from: Caller) -> CheckRequest {
        CheckRequest {
            to: "istioinaction/webapp".into(),
            port: None,
            from,
            from_ip: None,
            method: None,
            path: None,
            host: None,
            headers: vec![],
            jwt: None,
            sni: None,
            trust_domain: "cluster.local".into(),
            enrolment: EnrolmentPolicy::default(),
        }
    }

    #[test]
    fn answers_like_the_proxy() {
        let s = snapshot();
        let mut r = request(Caller::Pod("istioinaction/client".into()));
        r.method = Some("GET".into());
        r.path = Some("/api/items?x=1".into());
        let a = check(&s, &r, &|_| None).unwrap();
        assert_eq!((a.decision, a.status), (Verdict::Allow, 200), "{a:?}");
        assert_eq!(a.policy.as_deref(), Some("istioinaction/webapp-get"));
        assert_eq!(a.rule, Some(0));
        assert!(a.audit, "the mesh-wide AUDIT marks it");
        assert_eq!(a.transport, "mtls");
        assert_eq!(a.destination, "10.2.0.2:8080", "the pod's only port");

        r.method = Some("POST".into());
        let a = check(&s, &r, &|_| None).unwrap();
        assert_eq!((a.decision, a.status), (Verdict::Deny, 403));
        assert!(
            a.reason.contains("none of their rules matched"),
            "{}",
            a.reason
        );

        // The sleep pod is outside the mesh: plaintext, no principal.
        let mut r = request(Caller::Pod("default/sleep".into()));
        r.method = Some("GET".into());
        r.path = Some("/api/items".into());
        let a = check(&s, &r, &|_| None).unwrap();
        assert_eq!((a.decision, a.transport), (Verdict::Deny, "plaintext"));
        assert_eq!(a.source_ip, Some("10.1.0.4".parse().unwrap()));

        // A connection only: it depends on the request, and is denied as opaque traffic.
        let a = check(
            &s,
            &request(Caller::Principal(
                "cluster.local/ns/istioinaction/sa/client".into(),
            )),
            &|_| None,
        )
        .unwrap();
        assert_eq!((a.decision, a.evaluated_as), (Verdict::Deny, "tcp"));
        assert!(
            a.reason.contains("depends on the HTTP request"),
            "{}",
            a.reason
        );
        assert!(a.text().starts_with("DENY (status 403)"));
    }

    #[test]
    fn tokens_are_validated_like_the_proxy_does() {
        use crate::authz::request_authentication::tests::{issuer, now, token};
        let idp = issuer();
        let ra = format!(
            "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: istioinaction}}\nspec:\n  jwtRules:\n  - issuer: auth@istioinaction.io\n    jwks: '{}'\n    fromHeaders: [{{name: x-token}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: admins, namespace: istioinaction}}\nspec:\n  selector: {{matchLabels: {{app: webapp}}}}\n  rules: [{{when: [{{key: \"request.auth.claims[group]\", values: [admin]}}]}}]\n",
            idp.jwks
        );
        let mut o = Objects::default();
        parse_file(
            std::path::Path::new("c.yaml"),
            &format!("{CONFIG}{ra}"),
            &mut o,
        )
        .unwrap();
        let s = Snapshot::build(1, o, &MeshSettings::default());
        let claims = |group: &str, exp: i64| serde_json::json!({"iss": "auth@istioinaction.io", "sub": "u", "group": group, "exp": now() + exp});
        let mut r = request(Caller::Plaintext);
        r.jwt = Some(token(&idp, claims("admin", 600)));
        let a = check(&s, &r, &|_| None).unwrap();
        assert_eq!((a.decision, a.status), (Verdict::Allow, 200), "{a:?}");
        assert_eq!(a.policy.as_deref(), Some("istioinaction/admins"));
        r.jwt = Some(token(&idp, claims("user", 600)));
        assert_eq!(check(&s, &r, &|_| None).unwrap().status, 403);
        r.jwt = Some(token(&idp, claims("admin", -3600)));
        let a = check(&s, &r, &|_| None).unwrap();
        assert_eq!((a.decision, a.status), (Verdict::Deny, 401));
        assert!(a.reason.contains("Expired"), "{}", a.reason);
    }

    #[test]
    fn bad_input_is_an_error() {
        let s = snapshot();
        for (r, expect) in [
            (
                CheckRequest {
                    to: "nope".into(),
                    ..request(Caller::Plaintext)
                },
                "namespace/pod",
            ),
            (
                CheckRequest {
                    to: "istioinaction/ghost".into(),
                    ..request(Caller::Plaintext)
                },
                "no pod",
            ),
            (
                request(Caller::Principal("not a principal".into())),
                "--from-principal",
            ),
            (
                CheckRequest {
                    headers: vec!["novalue".into()],
                    ..request(Caller::Plaintext)
                },
                "--header",
            ),
            (
                CheckRequest {
                    to: "istioinaction/client".into(),
                    ..request(Caller::Plaintext)
                },
                "--port",
            ),
        ] {
            let e = check(&s, &r, &|_| None).unwrap_err();
            assert!(e.contains(expect), "{e}");
        }
    }
}
