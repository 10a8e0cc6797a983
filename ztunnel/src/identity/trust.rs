//! Trust in a mesh: which certificate chains are the mesh's (they end at its roots), and
//! which workload a certificate names (its one SPIFFE URI SAN, in the mesh's trust domain).
//! The certificate cache checks what a CA returns with it; the HBONE verifiers
//! ([`crate::tls`]) check every peer with it.
//!
//! Refusals are [`TlsError`]s, which travel inside rustls errors so a handshake failure can be
//! told apart by its cause.
use std::{
    fmt,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, TrustAnchor, UnixTime},
    CertificateError, OtherError,
};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use super::SpiffeId;

/// Why a peer certificate (or handshake) was refused. [`TlsError::reason`] is a stable label
/// for metrics; the `Display` text carries the details for logs.
#[derive(Clone, thiserror::Error)]
pub enum TlsError {
    #[error("certificate expired at {} (now {})", fmt_unix(.not_after), fmt_unix(.now))]
    Expired { now: UnixTime, not_after: UnixTime },
    #[error("certificate is not valid before {} (now {})", fmt_unix(.not_before), fmt_unix(.now))]
    NotYetValid { now: UnixTime, not_before: UnixTime },
    #[error("certificate does not chain to the mesh roots: {0}")]
    UnknownIssuer(String),
    #[error("peer identity {id} is outside the trust domain {expected:?}")]
    ForeignTrustDomain { id: SpiffeId, expected: String },
    #[error("certificate has no usable SPIFFE id: {0}")]
    BadSan(String),
    #[error("peer identity {id} is not one of the identities expected for the destination ({})",
        fmt_expected(.expected))]
    UnexpectedIdentity {
        id: SpiffeId,
        expected: Vec<SpiffeId>,
    },
    #[error("unusable certificate: {0}")]
    BadCertificate(String),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
}

// rustls prints the error it carries with `Debug`: make that the readable message.
impl fmt::Debug for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl TlsError {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TlsError::Expired { .. } => "expired",
            TlsError::NotYetValid { .. } => "not_yet_valid",
            TlsError::UnknownIssuer(_) => "unknown_issuer",
            TlsError::ForeignTrustDomain { .. } => "foreign_trust_domain",
            TlsError::BadSan(_) => "bad_san",
            TlsError::UnexpectedIdentity { .. } => "unexpected_identity",
            TlsError::BadCertificate(_) => "bad_certificate",
            TlsError::NoPeerCertificate => "no_certificate",
        }
    }
}

impl From<TlsError> for rustls::Error {
    fn from(e: TlsError) -> Self {
        // Time and issuer failures use rustls's own variants so the peer gets the matching
        // alert (certificate_expired, unknown_ca); the rest travel as `Other` with full detail.
        let cert_error = match e {
            TlsError::Expired { now, not_after } => CertificateError::ExpiredContext {
                time: now,
                not_after,
            },
            TlsError::NotYetValid { now, not_before } => CertificateError::NotValidYetContext {
                time: now,
                not_before,
            },
            TlsError::UnknownIssuer(_) => CertificateError::UnknownIssuer,
            TlsError::NoPeerCertificate => return rustls::Error::NoCertificatesPresented,
            other => CertificateError::Other(OtherError(Arc::new(other))),
        };
        rustls::Error::InvalidCertificate(cert_error)
    }
}

/// The workload SPIFFE id in a certificate: its one URI SAN. Other SAN types are ignored, as
/// the X.509-SVID spec allows them.
pub fn leaf_identity(der: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| TlsError::BadCertificate(format!("cannot parse the certificate: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCertificate(format!("bad subjectAltName extension: {e}")))?
        .ok_or_else(|| TlsError::BadSan("the certificate has no subjectAltName".into()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => uri.parse().map_err(|e| {
            TlsError::BadSan(format!("URI SAN {uri:?} is not a workload SPIFFE id: {e}"))
        }),
        [] => Err(TlsError::BadSan("the certificate has no URI SAN".into())),
        _ => Err(TlsError::BadSan(format!(
            "the certificate has {} URI SANs; exactly one SPIFFE id is allowed",
            uris.len()
        ))),
    }
}

/// The process-independent crypto provider used for every mesh config (never the process
/// default, which another library could install).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

pub(crate) fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// Trust in the mesh roots plus the trust domain peers must belong to.
#[derive(Clone)]
pub(crate) struct MeshTrust {
    anchors: Arc<Vec<TrustAnchor<'static>>>,
    trust_domain: String,
}

impl fmt::Debug for MeshTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshTrust")
            .field("roots", &self.anchors.len())
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl MeshTrust {
    pub(crate) fn new(roots: &[CertificateDer<'_>], trust_domain: &str) -> Self {
        // A root that does not parse is simply not trusted: that fails closed.
        let anchors = roots
            .iter()
            .filter_map(|r| match webpki::anchor_from_trusted_cert(r) {
                Ok(a) => Some(a.to_owned()),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a mesh root that does not parse");
                    None
                }
            })
            .collect();
        Self {
            anchors: Arc::new(anchors),
            trust_domain: trust_domain.to_owned(),
        }
    }

    /// Verifies the chain to the mesh roots for `usage` at `now`, then the leaf's SPIFFE id
    /// and trust domain. The chain is checked first so an untrusted certificate is reported
    /// as such whatever it claims to be.
    pub(crate) fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, TlsError> {
        let ee = EndEntityCert::try_from(end_entity)
            .map_err(|e| TlsError::BadCertificate(format!("cannot parse the certificate: {e}")))?;
        ee.verify_for_usage(
            algorithms().all,
            &self.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(from_webpki)?;
        let id = leaf_identity(end_entity)?;
        if id.trust_domain() != self.trust_domain {
            return Err(TlsError::ForeignTrustDomain {
                id,
                expected: self.trust_domain.clone(),
            });
        }
        Ok(id)
    }
}

fn from_webpki(e: webpki::Error) -> TlsError {
    use webpki::Error as W;
    match e {
        W::CertExpired { time, not_after } => TlsError::Expired {
            now: time,
            not_after,
        },
        W::CertNotValidYet { time, not_before } => TlsError::NotYetValid {
            now: time,
            not_before,
        },
        W::UnknownIssuer => TlsError::UnknownIssuer("no mesh root issued it".into()),
        // A name that matches a mesh root but a signature by another key: a different CA
        // that happens to use the same name.
        W::InvalidSignatureForPublicKey => {
            TlsError::UnknownIssuer("the issuer's signature does not verify".into())
        }
        W::CaUsedAsEndEntity => TlsError::BadCertificate("a CA certificate used as a leaf".into()),
        W::RequiredEkuNotFoundContext(_) => {
            TlsError::BadCertificate("not valid for this usage (extended key usage)".into())
        }
        other => TlsError::BadCertificate(other.to_string()),
    }
}

fn fmt_unix(t: &UnixTime) -> String {
    fmt_system_time(UNIX_EPOCH + Duration::from_secs(t.as_secs()))
}

/// An X.509-style UTC time for messages.
pub(crate) fn fmt_system_time(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    match x509_parser::time::ASN1Time::from_timestamp(secs) {
        Ok(t) => t.to_string(),
        Err(_) => format!("{secs} s after the epoch"),
    }
}

fn fmt_expected(expected: &[SpiffeId]) -> String {
    if expected.is_empty() {
        return "none is expected".into();
    }
    expected
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
