//! CUSTOM policies: asking the extension provider about a request, as Envoy's HTTP ext_authz
//! filter does (the provider's address, headers and failure handling come from the mesh
//! configuration).
use std::io;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::info;

use super::Inbound;
use crate::proxy::http::{request_host, set_headers, text_response, Body, Headers};
use crate::{authz::CustomCheck, state::Snapshot};

/// Copies the headers named in `names` from `from`.
fn pick(from: &http::HeaderMap, names: &[String]) -> Headers {
    from.iter()
        .filter(|(n, _)| names.iter().any(|x| x == n.as_str()))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

/// What a CUSTOM provider said.
pub(super) enum ProviderAnswer {
    /// Go on, adding these headers to the request and to its response.
    Allow { to_app: Headers, to_client: Headers },
    /// Answer the client with `response` instead.
    Deny {
        response: Response<Body>,
        reason: String,
    },
}

/// The largest body taken from an ext-authz denial.
const MAX_PROVIDER_BODY: usize = 64 * 1024;

impl Inbound {
    /// Asks the CUSTOM policy's provider about `req` (Envoy's HTTP ext_authz). `Ok` carries the
    /// headers to add to the request and to the response when it allows; `Err` the response to
    /// send instead, and why.
    pub(super) async fn ask_provider(
        &self,
        snapshot: &Snapshot,
        check: &CustomCheck,
        req: &Request<Incoming>,
    ) -> ProviderAnswer {
        use crate::authz::ext_authz::{provider_host, ProviderHost};
        let Some(p) = snapshot.mesh_config.http_providers.get(&check.provider) else {
            self.shared.metrics.ext_authz_checks.add("unknown_provider");
            let reason = format!(
                "extension provider {:?} is not an envoyExtAuthzHttp provider of the mesh configuration",
                check.provider
            );
            let response = text_response(StatusCode::FORBIDDEN, "RBAC: access denied");
            return ProviderAnswer::Deny { response, reason };
        };
        let on_error = |reason: String| {
            if p.fail_open {
                self.shared.metrics.ext_authz_checks.add("error_fail_open");
                info!(provider = %p.name, reason = %reason, "ext_authz check failed; failOpen allows");
                ProviderAnswer::Allow {
                    to_app: Vec::new(),
                    to_client: Vec::new(),
                }
            } else {
                self.shared.metrics.ext_authz_checks.add("error");
                let status =
                    StatusCode::from_u16(p.status_on_error).unwrap_or(StatusCode::FORBIDDEN);
                let response = text_response(status, "ext_authz check failed");
                ProviderAnswer::Deny { response, reason }
            }
        };
        let addr = match provider_host(&p.service) {
            Ok(ProviderHost::Ip(ip)) => std::net::SocketAddr::new(ip, p.port),
            Ok(ProviderHost::Service { namespace, name }) => {
                let endpoint = snapshot
                    .services
                    .get(&(namespace.clone(), name.clone()))
                    .and_then(|svc| {
                        let mut eps = snapshot.endpoints(svc, p.port);
                        (!eps.is_empty()).then(|| eps.swap_remove(0))
                    });
                match endpoint {
                    Some(e) => e.addr,
                    None => {
                        return on_error(format!(
                            "provider service {namespace}/{name} has no endpoint for port {}",
                            p.port
                        ))
                    }
                }
            }
            Err(e) => return on_error(e),
        };
        let path = req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        let mut check_req = Request::builder()
            .method(req.method().clone())
            .uri(format!("{}{path}", p.path_prefix));
        check_req = check_req.header(header::HOST, request_host(req));
        for (n, v) in pick(req.headers(), &p.include_request_headers) {
            if n != header::HOST {
                check_req = check_req.header(n, v);
            }
        }
        for (n, v) in &p.additional_headers {
            check_req = check_req.header(n.as_str(), v.as_str());
        }
        let check_req = match check_req.body(http_body_util::Empty::<Bytes>::new()) {
            Ok(r) => r,
            Err(e) => return on_error(format!("building the check request: {e}")),
        };
        let exchange = async {
            let socket = crate::socket::marked(addr)?;
            let tcp = tokio::net::TcpSocket::from_std_stream(socket.into())
                .connect(addr)
                .await?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(io::Error::other)?;
            tokio::spawn(conn);
            let resp = sender
                .send_request(check_req)
                .await
                .map_err(io::Error::other)?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, MAX_PROVIDER_BODY)
                .collect()
                .await
                .map_err(io::Error::other)?
                .to_bytes();
            Ok::<_, io::Error>((parts, body))
        };
        let (parts, body) = match tokio::time::timeout(p.timeout, exchange).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return on_error(format!("provider {addr}: {e}")),
            Err(_) => {
                return on_error(format!("provider {addr} did not answer in {:?}", p.timeout))
            }
        };
        if parts.status.is_success() {
            self.shared.metrics.ext_authz_checks.add("allowed");
            return ProviderAnswer::Allow {
                to_app: pick(&parts.headers, &p.headers_to_upstream_on_allow),
                to_client: pick(&parts.headers, &p.headers_to_downstream_on_allow),
            };
        }
        self.shared.metrics.ext_authz_checks.add("denied");
        let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
        *response.status_mut() = parts.status;
        set_headers(
            response.headers_mut(),
            pick(&parts.headers, &p.headers_to_downstream_on_deny),
        );
        ProviderAnswer::Deny {
            response,
            reason: format!("provider answered {}", parts.status),
        }
    }
}
