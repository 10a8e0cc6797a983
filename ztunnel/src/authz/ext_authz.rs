//! CUSTOM authorization: Istio's `extensionProviders` of kind `envoyExtAuthzHttp`, read from
//! the mesh configuration (the `istio` ConfigMap's `mesh` key in the root namespace, as on a
//! cluster), and the HTTP check the proxy makes for a request a CUSTOM policy applies to.
//!
//! The check follows Envoy's HTTP ext_authz, which Istio configures: the original method, the
//! provider's `pathPrefix` + the original path and query, the original `Host`, and the headers
//! `includeRequestHeadersInCheck` names (plus `includeAdditionalHeadersInCheck`), no body. A 2xx
//! answer allows (then DENY and ALLOW policies still apply) and copies
//! `headersToUpstreamOnAllow` into the request; any other answer is returned to the client
//! with its status, body and `headersToDownstreamOnDeny`. A provider that cannot be reached or
//! does not answer within `timeout` denies with `statusOnError` (403), unless `failOpen`.
use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

/// One `envoyExtAuthzHttp` provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpProvider {
    pub name: String,
    /// `[<namespace>/]<host>`: a Service host name (`name.ns.svc.cluster.local`, `name.ns`) or an
    /// IP address.
    pub service: String,
    pub port: u16,
    pub path_prefix: String,
    pub timeout: Duration,
    pub fail_open: bool,
    pub status_on_error: u16,
    /// Lower-case names.
    pub include_request_headers: Vec<String>,
    pub additional_headers: Vec<(String, String)>,
    pub headers_to_upstream_on_allow: Vec<String>,
    pub headers_to_downstream_on_allow: Vec<String>,
    pub headers_to_downstream_on_deny: Vec<String>,
}

/// The parts of Istio's MeshConfig this proxy uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshConfig {
    pub http_providers: BTreeMap<String, HttpProvider>,
    /// Providers of kinds this proxy cannot call (gRPC ext-authz, tracing, logging…): a CUSTOM
    /// policy naming one denies.
    pub other_providers: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct MeshDoc {
    #[serde(default)]
    extension_providers: Vec<ProviderDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderDoc {
    name: String,
    envoy_ext_authz_http: Option<HttpDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpDoc {
    service: String,
    port: u32,
    timeout: Option<String>,
    #[serde(default)]
    path_prefix: String,
    #[serde(default)]
    fail_open: bool,
    status_on_error: Option<String>,
    /// Deprecated alias of `includeRequestHeadersInCheck`.
    include_headers_in_check: Option<Vec<String>>,
    include_request_headers_in_check: Option<Vec<String>>,
    include_additional_headers_in_check: Option<BTreeMap<String, String>>,
    include_request_body_in_check: Option<serde_yaml::Value>,
    headers_to_upstream_on_allow: Option<Vec<String>>,
    headers_to_downstream_on_allow: Option<Vec<String>>,
    headers_to_downstream_on_deny: Option<Vec<String>>,
}

/// `5s`, `0.5s`, `100ms`.
fn parse_timeout(t: &str) -> Result<Duration, String> {
    let bad = || format!("timeout {t:?} is not a duration like 5s or 500ms");
    let secs = if let Some(ms) = t.strip_suffix("ms") {
        ms.parse::<f64>().map_err(|_| bad())? / 1000.0
    } else if let Some(s) = t.strip_suffix('s') {
        s.parse::<f64>().map_err(|_| bad())?
    } else {
        return Err(bad());
    };
    if !(secs > 0.0 && secs < 3600.0) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn lower(v: Option<Vec<String>>) -> Vec<String> {
    v.unwrap_or_default()
        .into_iter()
        .map(|h| h.to_ascii_lowercase())
        .collect()
}

impl MeshConfig {
    /// Parses the `mesh` key of the `istio` ConfigMap. Fields other than `extensionProviders`
    /// are Istio's to use and are not checked here; a provider of ours that is malformed is an
    /// error.
    pub fn parse(mesh: &str) -> Result<Self, String> {
        let doc: MeshDoc = serde_yaml::from_str(mesh).map_err(|e| e.to_string())?;
        let mut out = MeshConfig::default();
        for p in doc.extension_providers {
            let Some(http) = p.envoy_ext_authz_http else {
                out.other_providers.push(p.name);
                continue;
            };
            let context = |e: String| format!("extensionProviders {}: {e}", p.name);
            if http.include_request_body_in_check.is_some() {
                return Err(context("includeRequestBodyInCheck is not supported".into()));
            }
            let port = u16::try_from(http.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| context(format!("port {} is not in 1-65535", http.port)))?;
            let status_on_error = match &http.status_on_error {
                None => 403,
                Some(s) => s
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (100..600).contains(c))
                    .ok_or_else(|| context(format!("statusOnError {s:?} is not an HTTP status")))?,
            };
            let timeout = match &http.timeout {
                None => Duration::from_secs(600),
                Some(t) => parse_timeout(t).map_err(context)?,
            };
            let mut include = lower(http.include_request_headers_in_check);
            include.extend(lower(http.include_headers_in_check));
            let provider = HttpProvider {
                name: p.name.clone(),
                service: http.service,
                port,
                path_prefix: http.path_prefix,
                timeout,
                fail_open: http.fail_open,
                status_on_error,
                include_request_headers: include,
                additional_headers: http
                    .include_additional_headers_in_check
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect(),
                headers_to_upstream_on_allow: lower(http.headers_to_upstream_on_allow),
                headers_to_downstream_on_allow: lower(http.headers_to_downstream_on_allow),
                headers_to_downstream_on_deny: lower(http.headers_to_downstream_on_deny),
            };
            if out
                .http_providers
                .insert(p.name.clone(), provider)
                .is_some()
            {
                return Err(format!("extensionProviders: {} is defined twice", p.name));
            }
        }
        Ok(out)
    }
}

/// Where a provider's `service` points: a Service (namespace, name) or an address.
#[derive(Debug, PartialEq, Eq)]
pub enum ProviderHost {
    Service { namespace: String, name: String },
    Ip(std::net::IpAddr),
}

/// Reads `[<namespace>/]<host>` as Istio does: `name.ns.svc.<domain>`, `name.ns`, or with an
/// explicit namespace, a bare `name`.
pub fn provider_host(service: &str) -> Result<ProviderHost, String> {
    let (ns, host) = match service.split_once('/') {
        Some((ns, host)) => (Some(ns), host),
        None => (None, service),
    };
    if let Ok(ip) = host.parse() {
        return Ok(ProviderHost::Ip(ip));
    }
    let parts: Vec<&str> = host.split('.').collect();
    match (ns, parts.as_slice()) {
        (_, [name, namespace, "svc", ..]) | (None, [name, namespace]) => Ok(ProviderHost::Service {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }),
        (Some(ns), [name]) => Ok(ProviderHost::Service {
            namespace: ns.to_owned(),
            name: name.to_string(),
        }),
        _ => Err(format!(
            "provider service {service:?} is not a Service host (name.namespace.svc.cluster.local) or an IP address"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_providers_are_read_from_mesh_config() {
        let m = MeshConfig::parse(
            r#"
accessLogFile: /dev/stdout
extensionProviders:
- name: sample-ext-authz-http
  envoyExtAuthzHttp:
    service: ext-authz.foo.svc.cluster.local
    port: 8000
    timeout: 500ms
    pathPrefix: /check
    includeRequestHeadersInCheck: ["X-Ext-Authz"]
    headersToDownstreamOnDeny: [x-ext-authz-check-result]
- name: grpc
  envoyExtAuthzGrpc: {service: x, port: 9000}
"#,
        )
        .unwrap();
        let p = &m.http_providers["sample-ext-authz-http"];
        assert_eq!(p.port, 8000);
        assert_eq!(p.timeout, Duration::from_millis(500));
        assert_eq!(p.include_request_headers, ["x-ext-authz"]);
        assert_eq!(p.status_on_error, 403);
        assert!(!p.fail_open);
        assert_eq!(m.other_providers, ["grpc"]);
        for (bad, expect) in [
            ("extensionProviders: [{name: a, envoyExtAuthzHttp: {service: s, port: 70000}}]", "1-65535"),
            ("extensionProviders: [{name: a, envoyExtAuthzHttp: {service: s, port: 1, timeout: soon}}]", "duration"),
            ("extensionProviders: [{name: a, envoyExtAuthzHttp: {service: s, port: 1, statusOnError: nope}}]", "statusOnError"),
            ("extensionProviders: [{name: a, envoyExtAuthzHttp: {service: s, port: 1, bogus: 1}}]", "unknown field"),
        ] {
            let e = MeshConfig::parse(bad).unwrap_err();
            assert!(e.contains(expect), "{bad}: {e}");
        }
    }

    #[test]
    fn provider_hosts_name_services_or_addresses() {
        let svc = |ns: &str, name: &str| ProviderHost::Service {
            namespace: ns.into(),
            name: name.into(),
        };
        assert_eq!(
            provider_host("ext-authz.foo.svc.cluster.local"),
            Ok(svc("foo", "ext-authz"))
        );
        assert_eq!(provider_host("ext-authz.foo"), Ok(svc("foo", "ext-authz")));
        assert_eq!(provider_host("foo/ext-authz"), Ok(svc("foo", "ext-authz")));
        assert_eq!(
            provider_host("10.1.0.9"),
            Ok(ProviderHost::Ip("10.1.0.9".parse().unwrap()))
        );
        assert!(provider_host("ext-authz").is_err());
    }
}
