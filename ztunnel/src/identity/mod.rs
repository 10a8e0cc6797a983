//! Workload identity: SPIFFE ids, certificate providers (an embedded CA, Istio's CSR API) and
//! the per-identity certificate cache that requests, caches and rotates X.509 SVIDs.
//!
//! Keys are generated inside the proxy and never leave it: a provider only ever sees a CSR.
use std::{future::Future, pin::Pin, time::Duration};

pub mod ca;
pub mod cache;
pub mod certificate;
pub mod istio_ca;
mod spiffe;
pub mod trust;

pub use ca::{CaError, CaFiles, EmbeddedCa};
pub use cache::{CacheOptions, CertificateCache};
pub use certificate::{CertError, WorkloadCertificate};
pub use spiffe::{SpiffeId, SpiffeIdError};

/// A boxed future, so providers can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a provider did not issue a certificate.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The CA could not be reached or failed; worth retrying.
    #[error("certificate authority unavailable: {0}")]
    Unavailable(String),
    /// The CA refused this request (bad CSR, identity not allowed); retrying will not help.
    #[error("certificate authority refused the request: {0}")]
    Refused(String),
}

/// Something that turns a CSR into a certificate chain: the embedded CA, or a client of Istio's
/// `istio.v1.auth.IstioCertificateService/CreateCertificate`.
pub trait CertificateProvider: Send + Sync + 'static {
    /// Signs `csr_pem` for at most `validity`. Returns the PEM certificate chain, leaf first and
    /// root last, exactly as Istio's `CreateCertificateResponse.cert_chain`.
    fn create_certificate(
        &self,
        csr_pem: String,
        validity: Duration,
    ) -> BoxFuture<'_, Result<Vec<String>, ProviderError>>;
}
