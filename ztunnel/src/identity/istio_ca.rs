//! Istio's CSR API, `istio.v1.auth.IstioCertificateService/CreateCertificate`, over gRPC on TLS:
//! a client ([`IstioCaClient`], a [`CertificateProvider`](super::CertificateProvider) that asks
//! istiod or any compatible CA) and a server ([`serve`], [`run_ca_service`]) that puts any
//! certificate provider behind that API (`ztunnel ca serve`).
//!
//! The messages are written by hand with `prost` (no `protoc`, no build-time codegen) and follow
//! Istio's `security/proto/istioca.proto`. As in Istio, the caller authenticates with an
//! `authorization: Bearer <token>` header, and a node proxy asking for a workload's certificate
//! names that workload in the request's `metadata` struct under `ImpersonatedIdentity`.
//!
//! Transport: gRPC over HTTP/2 over TLS 1.3 (ALPN `h2`). TLS is tokio-rustls with the ring
//! provider, set up here rather than through tonic's TLS features, so that the verification of
//! the CA (by name, or by SPIFFE id) is ours and no second crypto backend comes in.
use std::collections::BTreeMap;

use super::{SpiffeId, SpiffeIdError};

mod auth;
mod client;
mod server;
#[cfg(test)]
mod tests;
pub mod token_review;

pub use auth::{AllowAll, AuthError, Authenticator, StaticToken};
pub use client::IstioCaClient;
pub use server::{
    issue_server_tls, run_ca_service, run_ca_service_until, serve, CaServiceOptions, CallerAuth,
    ServerTls, ServingNames, DEFAULT_SERVICE_NAMES,
};

/// The gRPC method path of `CreateCertificate`.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// The key of the request metadata struct that names the identity a node proxy asks for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// istiod's port for its CA (and XDS) over TLS; used when an address has no port.
pub const DEFAULT_CA_PORT: u16 = 15012;

/// The SPIFFE id our CA service runs as in `trust_domain`:
/// `spiffe://<trust domain>/ns/istio-system/sa/ztunnel-ca`. Its clients verify it with
/// [`IstioCaClient::with_server_identity`].
pub fn ca_service_identity(trust_domain: &str) -> Result<SpiffeId, SpiffeIdError> {
    SpiffeId::new(trust_domain, "istio-system", "ztunnel-ca")
}

/// Istio's `IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// The PEM-encoded certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// The requested validity in seconds (0: the CA's default).
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Free-form options; Istio reads `ImpersonatedIdentity` (a string) from it.
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// Istio's `IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates, leaf first, root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// The metadata struct Istio's ztunnel sends to ask for `identity`'s certificate.
pub fn impersonation_metadata(identity: &str) -> prost_types::Struct {
    let value = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(identity.to_owned())),
    };
    prost_types::Struct {
        fields: BTreeMap::from([(IMPERSONATED_IDENTITY.to_owned(), value)]),
    }
}

/// The SPIFFE id a CSR asks for: its one URI SAN. The CSR's signature is checked too, so a
/// caller cannot ask for a key it does not hold.
pub(crate) fn csr_spiffe_id(csr_pem: &str) -> Result<SpiffeId, String> {
    let params =
        rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
            rcgen::Error::RingUnspecified => "the CSR's signature does not verify".to_owned(),
            e => format!("not a usable PEM CSR: {e}"),
        })?;
    let uris: Vec<&str> = params
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            rcgen::SanType::URI(uri) => Some(uri.as_str()),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => uri
            .parse()
            .map_err(|e| format!("the CSR's URI SAN {uri:?} is not a workload SPIFFE id: {e}")),
        [] => Err("the CSR carries no SPIFFE id (URI SAN)".to_owned()),
        _ => Err(format!(
            "the CSR carries {} URI SANs; exactly one SPIFFE id is allowed",
            uris.len()
        )),
    }
}

/// The SPIFFE id of a certificate: its one URI SAN.
pub(crate) fn certificate_spiffe_id(
    der: &rustls::pki_types::CertificateDer<'_>,
) -> Result<SpiffeId, String> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer};
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let names = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .map(|san| san.value.general_names.clone())
        .unwrap_or_default();
    let uris: Vec<&str> = names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => uri
            .parse()
            .map_err(|e| format!("URI SAN {uri:?} is not a SPIFFE id: {e}")),
        _ => Err(format!(
            "the certificate has {} URI SANs, not one SPIFFE id",
            uris.len()
        )),
    }
}
