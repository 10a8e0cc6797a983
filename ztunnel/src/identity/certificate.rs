//! A workload's X.509 SVID with its private key, as the proxy holds it: checked against the
//! mesh's trust when it arrives from a CA, with the parsed signing key built once for every TLS
//! configuration that presents it. A key never leaves it (nor its `Debug`); a CA only ever sees
//! a CSR ([`csr_for`]).
use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{CertificateParams, DistinguishedName, Ia5String, KeyPair, SanType};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime},
    sign::CertifiedKey,
};

use super::{
    trust::{self, fmt_system_time, MeshTrust},
    SpiffeId,
};

#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    #[error("no certificate: the CA is unavailable: {0}")]
    Unavailable(String),
    #[error("no certificate: the CA refused: {0}")]
    Refused(String),
    #[error("no certificate: the CA returned an unusable certificate: {0}")]
    InvalidChain(String),
    #[error("the certificate of {id} expired at {} and could not be renewed: {reason}",
        fmt_system_time(*.not_after))]
    Expired {
        id: SpiffeId,
        not_after: SystemTime,
        reason: String,
    },
    #[error("cannot make a key or CSR: {0}")]
    Internal(String),
}

/// A workload's X.509 SVID with its private key.
pub struct WorkloadCertificate {
    pub id: SpiffeId,
    /// Leaf first, then any intermediates: what the proxy presents (mesh roots left out).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The chain and parsed signing key, built once for every TLS config that uses them.
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs.
        f.debug_struct("WorkloadCertificate")
            .field("id", &format_args!("{}", self.id))
            .field("chain_len", &self.chain.len())
            .field("not_before", &fmt_system_time(self.not_before))
            .field("not_after", &fmt_system_time(self.not_after))
            .finish_non_exhaustive()
    }
}

impl WorkloadCertificate {
    /// Builds a certificate from a CA's PEM chain (leaf first) and our key, after checking
    /// that the leaf is for `id`, holds our key, is currently valid, and chains to `roots` for
    /// both TLS client and server use.
    pub fn from_pem_chain(
        id: SpiffeId,
        chain_pem: &[String],
        key: PrivateKeyDer<'static>,
        roots: &[CertificateDer<'static>],
    ) -> Result<Self, CertError> {
        let invalid = |reason: String| CertError::InvalidChain(format!("{id}: {reason}"));
        let mut chain = Vec::with_capacity(chain_pem.len());
        for pem in chain_pem {
            for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
                chain.push(cert.map_err(|e| invalid(format!("bad PEM: {e}")))?);
            }
        }
        let Some(leaf) = chain.first().cloned() else {
            return Err(invalid("empty certificate chain".into()));
        };
        let trust = MeshTrust::new(roots, id.trust_domain());
        let now = UnixTime::now();
        for usage in [
            webpki::KeyUsage::server_auth(),
            webpki::KeyUsage::client_auth(),
        ] {
            let got = trust
                .verify(&leaf, &chain[1..], now, usage)
                .map_err(|e| invalid(e.to_string()))?;
            if got != id {
                return Err(invalid(format!("the certificate is for {got}")));
            }
        }
        // Roots are known to every peer; send only the leaf and intermediates.
        while chain.len() > 1 && chain.last().is_some_and(|c| roots.contains(c)) {
            chain.pop();
        }
        let (not_before, not_after) = validity(&leaf).map_err(invalid)?;
        let certified = CertifiedKey::from_der(chain.clone(), key.clone_key(), &trust::provider())
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => {
                    invalid("the certificate does not hold our public key".into())
                }
                e => invalid(format!("unusable key: {e}")),
            })?;
        Ok(Self {
            id,
            chain,
            key,
            not_before,
            not_after,
            certified: Arc::new(certified),
        })
    }

    /// Test helper: wraps a chain and key without any check (expired, foreign, ...).
    #[cfg(test)]
    pub(crate) fn unchecked(
        id: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Self {
        let (not_before, not_after) = validity(&chain[0]).unwrap();
        let certified =
            CertifiedKey::from_der(chain.clone(), key.clone_key(), &trust::provider()).unwrap();
        Self {
            id,
            chain,
            key,
            not_before,
            not_after,
            certified: Arc::new(certified),
        }
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// Time left before expiry (zero once expired).
    pub fn expires_in(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }

    pub fn is_expired(&self) -> bool {
        SystemTime::now() >= self.not_after
    }

    /// The chain and signing key for rustls.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }
}

fn validity(leaf: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf)
        .map_err(|e| format!("cannot parse the leaf: {e}"))?;
    let at = |t: x509_parser::time::ASN1Time| {
        UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Ok((
        at(cert.validity().not_before),
        at(cert.validity().not_after),
    ))
}

/// A PEM CSR with `id` as the only SAN and an empty subject (the CA chooses the subject).
pub(crate) fn csr_for(id: &SpiffeId, key: &KeyPair) -> Result<String, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id.to_string())?)];
    params.serialize_request(key)?.pem()
}
