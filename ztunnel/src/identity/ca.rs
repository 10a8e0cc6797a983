//! The embedded CA: a root key and certificate on disk (`ztunnel ca init`), shared by the proxies
//! of one machine or test, signing workload CSRs as X.509 SVIDs.
//!
//! The CA only ever sees CSRs: it signs the CSR's public key for the one SPIFFE id the CSR asks
//! for, and everything else in the certificate (validity, usages, subject) is its own choice.
use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, Ia5String, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::FromDer;

use super::{BoxFuture, CertificateProvider, ProviderError, SpiffeId};

/// File names inside the CA directory (the names Istio uses for its plug-in CA files).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";

/// The longest leaf the CA issues unless configured otherwise.
pub const DEFAULT_MAX_LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// Leaves start this much in the past so peers with a slightly slow clock accept them.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("a CA already exists in {0}; refusing to overwrite it (force replaces it)")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("invalid trust domain {domain:?}: {reason}")]
    TrustDomain { domain: String, reason: String },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("cannot create the CA certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The CA's files in a directory.
pub struct CaFiles;

impl CaFiles {
    pub fn cert_path(dir: &Path) -> PathBuf {
        dir.join(ROOT_CERT_FILE)
    }

    pub fn key_path(dir: &Path) -> PathBuf {
        dir.join(ROOT_KEY_FILE)
    }

    /// Creates a new root for `trust_domain` valid for `validity` in `dir` (created 0700 if
    /// missing). An existing CA is replaced only with `force`.
    pub fn init(
        dir: &Path,
        trust_domain: &str,
        validity: Duration,
        force: bool,
    ) -> Result<EmbeddedCa, CaError> {
        check_trust_domain(trust_domain)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error(dir))?;
        let (cert_path, key_path) = (Self::cert_path(dir), Self::key_path(dir));
        // symlink_metadata also sees dangling symlinks, which a write would follow.
        let exists = |p: &Path| fs::symlink_metadata(p).is_ok();
        if !force && (exists(&cert_path) || exists(&key_path)) {
            return Err(CaError::Exists(dir.to_owned()));
        }
        let (cert_pem, key_pem) = generate_root(trust_domain, validity)?;
        write_file(&key_path, &key_pem, 0o600, force)?;
        if let Err(e) = write_file(&cert_path, &cert_pem, 0o644, force) {
            if !force {
                // Don't leave a key without its certificate behind.
                let _ = fs::remove_file(&key_path);
            }
            return Err(e);
        }
        tracing::info!(dir = %dir.display(), trust_domain, "created a new root CA");
        EmbeddedCa::from_pem(&cert_pem, &key_pem)
    }

    /// Loads the CA in `dir`. The key must be private to the CA (see [`key_file_problem`]).
    pub fn load(dir: &Path) -> Result<EmbeddedCa, CaError> {
        let (cert_path, key_path) = (Self::cert_path(dir), Self::key_path(dir));
        let meta = fs::metadata(&key_path).map_err(io_error(&key_path))?;
        if let Some(reason) = key_file_problem(&meta, &KeyReader::current()) {
            return Err(CaError::Invalid {
                what: key_path.display().to_string(),
                reason,
            });
        }
        let key_pem = fs::read_to_string(&key_path).map_err(io_error(&key_path))?;
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_error(&cert_path))?;
        // Name the file at fault by its full path.
        EmbeddedCa::from_pem(&cert_pem, &key_pem).map_err(|e| match e {
            CaError::Invalid { what, reason } => CaError::Invalid {
                what: dir.join(what).display().to_string(),
                reason,
            },
            e => e,
        })
    }
}

/// Who reads the CA key: the process's effective uid and all its groups.
pub struct KeyReader {
    pub uid: u32,
    pub groups: Vec<u32>,
}

impl KeyReader {
    pub fn current() -> KeyReader {
        // SAFETY: plain getters; getgroups fills at most `n` entries of a buffer of that size.
        unsafe {
            let mut groups = vec![libc::getegid()];
            let n = libc::getgroups(0, std::ptr::null_mut());
            if n > 0 {
                let mut more = vec![0 as libc::gid_t; n as usize];
                let got = libc::getgroups(n, more.as_mut_ptr());
                more.truncate(got.max(0) as usize);
                groups.extend(more);
            }
            KeyReader {
                uid: libc::geteuid(),
                groups,
            }
        }
    }
}

/// Why the CA key file is not private enough, if it is not. Accepted: no access for others and
/// none for the group (0600, 0400), or, as a Kubernetes Secret volume with `fsGroup` makes it,
/// read-only for a group the CA itself is in on a file owned by root or by the CA (0440,
/// 0640): the kubelet adds group read to Secret files whatever `defaultMode` says, and without
/// `fsGroup` a non-root CA cannot read them at all. Never writable by the group, never any
/// access for others.
pub fn key_file_problem(meta: &fs::Metadata, reader: &KeyReader) -> Option<String> {
    key_mode_problem(meta.mode(), meta.uid(), meta.gid(), reader)
}

fn key_mode_problem(mode: u32, owner: u32, group: u32, reader: &KeyReader) -> Option<String> {
    let mode = mode & 0o777;
    if mode & 0o077 == 0 {
        return None;
    }
    if mode & 0o037 == 0 && (owner == 0 || owner == reader.uid) && reader.groups.contains(&group) {
        return None;
    }
    Some(format!(
        "the CA key is accessible to {} (mode {mode:o}, owner {owner}, group {group}); chmod \
         600 it, or (a Kubernetes Secret with fsGroup) make it 0440, owned by root and a group \
         of the CA's",
        if mode & 0o007 != 0 {
            "others"
        } else {
            "a group the CA is not in, or writable by its group"
        }
    ))
}

/// Writes a new file created with `mode` (never wider at any moment). With `replace`, writes a
/// temporary file and renames it over `path`; otherwise fails if `path` exists.
fn write_file(path: &Path, contents: &str, mode: u32, replace: bool) -> Result<(), CaError> {
    let write_new = |p: &Path| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(p)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()
    };
    if !replace {
        return write_new(path).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => {
                CaError::Exists(path.parent().unwrap_or(path).to_owned())
            }
            _ => io_error(path)(e),
        });
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    write_new(&tmp).map_err(io_error(&tmp))?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_error(path)(e)
    })
}

fn check_trust_domain(domain: &str) -> Result<(), CaError> {
    SpiffeId::new(domain, "ns", "sa")
        .map(|_| ())
        .map_err(|e| CaError::TrustDomain {
            domain: domain.to_owned(),
            reason: e.to_string(),
        })
}

fn random_serial() -> Result<SerialNumber, rcgen::Error> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    // Positive (DER integers are signed) and without a leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Sets a certificate's validity, in whole seconds as X.509 stores it. (x509-parser's time type
/// converts to rcgen's without another dependency.)
pub(crate) fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), rcgen::Error> {
    let t = |t| {
        x509_parser::time::ASN1Time::from_timestamp(unix_secs(t))
            .map(|t| t.to_datetime())
            .map_err(|_| rcgen::Error::Time)
    };
    params.not_before = t(not_before)?;
    params.not_after = t(not_after)?;
    Ok(())
}

/// A self-signed ECDSA P-256 root: (certificate PEM, PKCS#8 key PEM).
fn generate_root(trust_domain: &str, validity: Duration) -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // O carries the trust domain so `load` can recover it from the certificate alone.
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(
        DnType::CommonName,
        format!("ztunnel root CA {trust_domain}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial()?);
    let now = SystemTime::now();
    set_validity(&mut params, now - CLOCK_SKEW, now + validity)?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Decides whether an identity may be issued (policy hook; `Err` carries the reason).
pub type Authorizer = dyn Fn(&SpiffeId) -> Result<(), String> + Send + Sync;

/// A CA signing workload CSRs with a root key held in memory.
pub struct EmbeddedCa {
    trust_domain: String,
    root_pem: String,
    root_der: CertificateDer<'static>,
    root_not_after: SystemTime,
    /// The root as rcgen needs it to sign (its name and key identifier).
    issuer: rcgen::Certificate,
    key: KeyPair,
    max_validity: Duration,
    authorizer: Option<Box<Authorizer>>,
}

impl fmt::Debug for EmbeddedCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("EmbeddedCa")
            .field("trust_domain", &self.trust_domain)
            .field("max_validity", &self.max_validity)
            .finish_non_exhaustive()
    }
}

impl EmbeddedCa {
    /// A fresh CA in memory only (tests, single-process demos).
    pub fn generate(trust_domain: &str, validity: Duration) -> Result<Self, CaError> {
        check_trust_domain(trust_domain)?;
        let (cert, key) = generate_root(trust_domain, validity)?;
        Self::from_pem(&cert, &key)
    }

    /// A CA from a root certificate (with the trust domain as its O) and its private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let invalid = |what: &str, reason: String| CaError::Invalid {
            what: what.to_owned(),
            reason,
        };
        let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(ROOT_CERT_FILE, format!("not PEM: {e}")))?;
        let [root_der] = <[_; 1]>::try_from(certs).map_err(|certs: Vec<_>| {
            invalid(
                ROOT_CERT_FILE,
                format!("expected exactly one certificate, found {}", certs.len()),
            )
        })?;
        let (_, x509) = x509_parser::certificate::X509Certificate::from_der(&root_der)
            .map_err(|e| invalid(ROOT_CERT_FILE, format!("cannot parse the certificate: {e}")))?;
        let is_ca = matches!(x509.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        if !is_ca {
            return Err(invalid(ROOT_CERT_FILE, "not a CA certificate".into()));
        }
        let root_not_after =
            UNIX_EPOCH + Duration::from_secs(x509.validity().not_after.timestamp().max(0) as u64);
        if root_not_after <= SystemTime::now() {
            return Err(invalid(
                ROOT_CERT_FILE,
                format!(
                    "the root certificate expired at {}",
                    x509.validity().not_after
                ),
            ));
        }
        let orgs: Vec<&str> = x509
            .subject()
            .iter_organization()
            .filter_map(|o| o.as_str().ok())
            .collect();
        let [trust_domain] = orgs.as_slice() else {
            return Err(invalid(
                ROOT_CERT_FILE,
                "the root's subject must carry the trust domain as its one O attribute".into(),
            ));
        };
        let trust_domain = trust_domain.to_string();
        check_trust_domain(&trust_domain)?;

        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| invalid(ROOT_KEY_FILE, format!("not a usable private key: {e}")))?;
        if key.public_key_raw() != x509.public_key().subject_public_key.data.as_ref() {
            return Err(invalid(
                ROOT_KEY_FILE,
                "the key does not belong to the root certificate".into(),
            ));
        }
        let issuer = CertificateParams::from_ca_cert_der(&root_der)?.self_signed(&key)?;
        Ok(Self {
            trust_domain,
            root_pem: pem_of(&root_der),
            root_der,
            root_not_after,
            issuer,
            key,
            max_validity: DEFAULT_MAX_LEAF_VALIDITY,
            authorizer: None,
        })
    }

    /// Caps the validity of issued leaves.
    pub fn with_max_validity(mut self, max: Duration) -> Self {
        self.max_validity = max;
        self
    }

    /// Consults `authorize` before issuing any identity.
    pub fn with_authorizer(
        mut self,
        authorize: impl Fn(&SpiffeId) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.authorizer = Some(Box::new(authorize));
        self
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn max_validity(&self) -> Duration {
        self.max_validity
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The mesh roots this CA's leaves chain to.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.root_der.clone()]
    }

    /// Checks `csr_pem` and signs it for at most `validity` (0: the maximum). Returns the PEM
    /// chain, leaf then root.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        validity: Duration,
    ) -> Result<Vec<String>, ProviderError> {
        let refuse = |reason: String| ProviderError::Refused(reason);
        // rcgen verifies the CSR's self-signature while parsing (proof of key possession).
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
            rcgen::Error::RingUnspecified => refuse("the CSR's signature does not verify".into()),
            rcgen::Error::UnsupportedExtension => refuse(
                "the CSR requests extensions other than subjectAltName and key usages".into(),
            ),
            e => refuse(format!("not a usable PEM CSR: {e}")),
        })?;
        let id = match csr.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] => uri.as_str().parse::<SpiffeId>().map_err(|e| {
                refuse(format!(
                    "the CSR's URI SAN {:?} is not a workload SPIFFE id: {e}",
                    uri.as_str()
                ))
            })?,
            [] => {
                return Err(refuse(
                    "the CSR has no SAN; it must carry one SPIFFE id".into(),
                ))
            }
            [_] => {
                return Err(refuse(
                    "the CSR's SAN is not a URI; it must carry one SPIFFE id".into(),
                ))
            }
            sans => {
                return Err(refuse(format!(
                    "the CSR has {} SANs; exactly one (the SPIFFE id) is allowed",
                    sans.len()
                )))
            }
        };
        if id.trust_domain() != self.trust_domain {
            return Err(refuse(format!(
                "{id} is outside this CA's trust domain {:?}",
                self.trust_domain
            )));
        }
        if let Some(authorize) = &self.authorizer {
            authorize(&id).map_err(|reason| refuse(format!("{id} is not allowed: {reason}")))?;
        }
        self.issue(&id, Vec::new(), &csr.public_key, validity)
    }

    /// The CA service's own serving certificate for `public_key`: its SPIFFE `id` plus the DNS
    /// names and IPs its clients dial it by (Istio's ztunnel and istiod's clients verify the CA
    /// by that name). Never reachable through a CSR, which may only ask for one SPIFFE id.
    pub fn sign_serving_certificate(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        public_key: &impl PublicKeyData,
        validity: Duration,
    ) -> Result<Vec<String>, ProviderError> {
        let mut names = Vec::with_capacity(dns_names.len() + ips.len());
        for name in dns_names {
            let ia5 = Ia5String::try_from(name.as_str())
                .map_err(|e| ProviderError::Refused(format!("DNS name {name:?}: {e}")))?;
            names.push(SanType::DnsName(ia5));
        }
        names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        self.issue(id, names, public_key, validity)
    }

    /// Issues a leaf for `id` (plus `extra_sans`) and `public_key`, for at most `validity`
    /// (0: the maximum) and never beyond the root. Returns the PEM chain, leaf then root.
    fn issue(
        &self,
        id: &SpiffeId,
        extra_sans: Vec<SanType>,
        public_key: &impl PublicKeyData,
        validity: Duration,
    ) -> Result<Vec<String>, ProviderError> {
        let refuse = |reason: String| ProviderError::Refused(reason);
        let validity = if validity.is_zero() {
            self.max_validity
        } else {
            validity.min(self.max_validity)
        };
        let now = SystemTime::now();
        // A leaf never outlives its root: it would be useless after the root expires.
        let not_after = (now + validity).min(self.root_not_after);
        if not_after <= now {
            return Err(ProviderError::Unavailable(
                "the CA's root certificate has expired".into(),
            ));
        }
        let mut params = leaf_params(id).map_err(|e| refuse(format!("cannot encode {id}: {e}")))?;
        params.subject_alt_names.extend(extra_sans);
        set_validity(&mut params, now - CLOCK_SKEW, not_after)
            .map_err(|e| ProviderError::Unavailable(format!("cannot set the validity: {e}")))?;
        let leaf = self
            .issue_with(params, public_key)
            .map_err(|e| ProviderError::Unavailable(format!("signing failed: {e}")))?;
        tracing::debug!(identity = %id, validity_s = validity.as_secs(), "issued a certificate");
        Ok(vec![leaf, self.root_pem.clone()])
    }

    /// Signs `params` for `public_key` with the root key, unchecked: callers build the params.
    fn issue_with(
        &self,
        params: CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> Result<String, rcgen::Error> {
        Ok(params.signed_by(public_key, &self.issuer, &self.key)?.pem())
    }

    /// Test helper: signs arbitrary params (expired, no SAN, ...) with this CA.
    #[cfg(test)]
    pub(crate) fn issue_unchecked(
        &self,
        params: CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> String {
        self.issue_with(params, public_key).unwrap()
    }
}

/// The leaf profile: the SPIFFE id as the only SAN, TLS client and server usage, not a CA.
/// The subject carries only the trust domain (RFC 5280 wants a non-critical SAN, as rcgen
/// writes it, to come with a non-empty subject). Validity and serial are set by the caller.
pub(crate) fn leaf_params(id: &SpiffeId) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, id.trust_domain());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id.to_string())?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, &b| acc << 8 | b as u32) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

impl CertificateProvider for EmbeddedCa {
    fn create_certificate(
        &self,
        csr_pem: String,
        validity: Duration,
    ) -> BoxFuture<'_, Result<Vec<String>, ProviderError>> {
        // Signing takes microseconds: no need to leave the caller's task.
        let result = self.sign_csr(&csr_pem, validity);
        Box::pin(async move { result })
    }
}

/// Helpers for tests across the crate: certificates issued through the real CSR path, and
/// deliberately bad ones signed directly with a test CA's key.
#[cfg(test)]
pub(crate) mod test_support {
    use std::{
        path::{Path, PathBuf},
        sync::atomic::{AtomicU64, Ordering},
        time::{Duration, SystemTime},
    };

    use rcgen::{CertificateParams, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::{leaf_params, set_validity, EmbeddedCa};
    use crate::identity::{certificate::csr_for, SpiffeId, WorkloadCertificate};

    pub fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    pub fn ca(trust_domain: &str) -> EmbeddedCa {
        EmbeddedCa::generate(trust_domain, Duration::from_secs(3600)).unwrap()
    }

    fn key() -> (KeyPair, PrivateKeyDer<'static>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (key, der)
    }

    /// A certificate for `id` through CSR, CA and validation, as the cache gets one.
    pub fn issue(ca: &EmbeddedCa, id: &SpiffeId) -> WorkloadCertificate {
        let (key, der) = key();
        let chain = ca
            .sign_csr(&csr_for(id, &key).unwrap(), Duration::from_secs(600))
            .unwrap();
        WorkloadCertificate::from_pem_chain(id.clone(), &chain, der, &ca.roots()).unwrap()
    }

    /// The CA's leaf profile for `id`, valid from `not_before` to `not_after`.
    pub fn params(
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> CertificateParams {
        let mut p = leaf_params(id).unwrap();
        set_validity(&mut p, not_before, not_after).unwrap();
        p
    }

    /// `params` signed by `ca` without any check, wrapped with a fresh key.
    pub fn issue_unchecked(
        ca: &EmbeddedCa,
        id: &SpiffeId,
        params: CertificateParams,
    ) -> WorkloadCertificate {
        let (key, der) = key();
        let pem = ca.issue_unchecked(params, &key);
        let chain = vec![pem_to_der(&pem)];
        WorkloadCertificate::unchecked(id.clone(), chain, der)
    }

    /// `params` self-signed.
    pub fn self_signed(id: &SpiffeId, params: CertificateParams) -> WorkloadCertificate {
        let (key, der) = key();
        let cert = params.self_signed(&key).unwrap();
        WorkloadCertificate::unchecked(id.clone(), vec![cert.der().clone()], der)
    }

    pub fn pem_to_der(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    }

    /// A directory removed on drop.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new() -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "ztunnel-ca-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            Self(dir)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

    use super::{test_support::*, *};
    use crate::identity::trust::MeshTrust;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn csr(sans: Vec<SanType>) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, pem)
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(Ia5String::try_from(s).unwrap())
    }

    fn refused(ca: &EmbeddedCa, csr_pem: &str) -> String {
        match ca.sign_csr(csr_pem, DAY) {
            Err(ProviderError::Refused(reason)) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn init_and_load_round_trip_with_a_private_key_file() {
        let dir = TempDir::new();
        let ca = CaFiles::init(dir.path(), "cluster.local", DAY * 365, false).unwrap();
        assert_eq!(ca.trust_domain(), "cluster.local");

        let key_meta = fs::metadata(CaFiles::key_path(dir.path())).unwrap();
        assert_eq!(key_meta.permissions().mode() & 0o777, 0o600);
        let dir_meta = fs::metadata(dir.path()).unwrap();
        assert_eq!(dir_meta.permissions().mode() & 0o077, 0);

        let loaded = CaFiles::load(dir.path()).unwrap();
        assert_eq!(loaded.trust_domain(), "cluster.local");
        assert_eq!(loaded.root_pem(), ca.root_pem());
        assert_eq!(
            loaded.root_pem(),
            fs::read_to_string(CaFiles::cert_path(dir.path())).unwrap(),
            "the served root PEM is the file's certificate"
        );
        // What the loaded CA signs chains to the root created by init.
        let cert = issue(&loaded, &id("spiffe://cluster.local/ns/a/sa/b"));
        assert_eq!(
            cert.chain.len(),
            1,
            "the root is not part of the presented chain"
        );

        let root = ca.roots().remove(0);
        let (_, x509) = X509Certificate::from_der(&root).unwrap();
        assert!(x509.basic_constraints().unwrap().unwrap().value.ca);
        let ku = x509.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert_eq!(
            x509.subject().to_string(),
            "O=cluster.local, CN=ztunnel root CA cluster.local"
        );
        // Debug never shows the key.
        assert!(!format!("{loaded:?}").contains("PRIVATE"));
    }

    #[test]
    fn init_refuses_to_overwrite_unless_forced() {
        let dir = TempDir::new();
        let first = CaFiles::init(dir.path(), "cluster.local", DAY, false).unwrap();
        let err = CaFiles::init(dir.path(), "cluster.local", DAY, false).unwrap_err();
        assert!(matches!(err, CaError::Exists(_)), "{err}");
        assert_eq!(
            CaFiles::load(dir.path()).unwrap().root_pem(),
            first.root_pem()
        );

        // A key alone (half-written CA) also counts as existing.
        let other = TempDir::new();
        fs::create_dir_all(other.path()).unwrap();
        fs::write(CaFiles::key_path(other.path()), "x").unwrap();
        assert!(matches!(
            CaFiles::init(other.path(), "cluster.local", DAY, false),
            Err(CaError::Exists(_))
        ));

        let second = CaFiles::init(dir.path(), "cluster.local", DAY, true).unwrap();
        assert_ne!(second.root_pem(), first.root_pem());
        assert_eq!(
            CaFiles::load(dir.path()).unwrap().root_pem(),
            second.root_pem()
        );
        let mode = fs::metadata(CaFiles::key_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn init_rejects_a_bad_trust_domain() {
        let dir = TempDir::new();
        let err = CaFiles::init(dir.path(), "Cluster.Local", DAY, false).unwrap_err();
        assert!(matches!(err, CaError::TrustDomain { .. }), "{err}");
        assert!(!dir.path().exists());
    }

    #[test]
    fn a_key_is_private_to_its_owner_or_to_the_cas_own_group() {
        // The CA as the chart runs it: uid/gid 65532 (fsGroup 65532 as a supplementary group).
        let ca = KeyReader {
            uid: 65532,
            groups: vec![65532],
        };
        let ok = |mode, owner, group| key_mode_problem(mode, owner, group, &ca).is_none();
        assert!(ok(0o600, 65532, 65532));
        assert!(ok(0o400, 0, 0));
        // The kubelet's Secret file with fsGroup: root:65532 0440.
        assert!(ok(0o440, 0, 65532));
        assert!(ok(0o640, 65532, 65532));
        // Others may never read; the group must be the CA's and may not write; a group-readable
        // file of another user is that user's to change.
        assert!(!ok(0o444, 0, 65532));
        assert!(!ok(0o404, 65532, 65532));
        assert!(!ok(0o440, 0, 100));
        assert!(!ok(0o460, 0, 65532));
        assert!(!ok(0o440, 1000, 65532));
        let msg = key_mode_problem(0o444, 0, 65532, &ca).unwrap();
        assert!(msg.contains("others") && msg.contains("mode 444"), "{msg}");
    }

    #[test]
    fn load_refuses_unsafe_or_mismatched_files() {
        let dir = TempDir::new();
        CaFiles::init(dir.path(), "cluster.local", DAY, false).unwrap();
        let key_path = CaFiles::key_path(dir.path());
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = CaFiles::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("chmod") && err.contains("others"), "{err}");
        // What a Secret volume with fsGroup gives a non-root CA: root-owned, 0440, its group.
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o440)).unwrap();
        assert!(CaFiles::load(dir.path()).is_ok());
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();

        // Another CA's key next to this certificate.
        let other = TempDir::new();
        CaFiles::init(other.path(), "cluster.local", DAY, false).unwrap();
        fs::copy(CaFiles::key_path(other.path()), &key_path).unwrap();
        let err = CaFiles::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("does not belong"), "{err}");

        let missing = TempDir::new();
        assert!(matches!(
            CaFiles::load(missing.path()),
            Err(CaError::Io { .. })
        ));
    }

    #[test]
    fn signs_a_valid_csr_as_an_svid() {
        let ca = ca("cluster.local");
        let (key, pem) = csr(vec![uri("spiffe://cluster.local/ns/shop/sa/web")]);
        let before = SystemTime::now();
        let chain = ca.sign_csr(&pem, Duration::from_secs(3600)).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1], ca.root_pem());

        let leaf = pem_to_der(&chain[0]);
        let (_, x509) = X509Certificate::from_der(&leaf).unwrap();
        assert_eq!(
            x509.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        let sans = &x509
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(
            sans,
            &vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/web")]
        );
        assert!(!x509.basic_constraints().unwrap().unwrap().value.ca);
        let ku = x509.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert_eq!(x509.subject().to_string(), "O=cluster.local");

        let nb = x509.validity().not_before.timestamp();
        let na = x509.validity().not_after.timestamp();
        let now = unix_secs(before);
        assert!((now - 61..=now - 59).contains(&nb), "backdated by a minute");
        assert!((now + 3599..=now + 3601).contains(&na));

        let id = MeshTrust::new(&ca.roots(), "cluster.local")
            .verify(
                &leaf,
                &[],
                rustls::pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
            )
            .unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");

        // Serials are random.
        let again = ca.sign_csr(&pem, Duration::from_secs(3600)).unwrap();
        let again = pem_to_der(&again[0]);
        let (_, x2) = X509Certificate::from_der(&again).unwrap();
        assert_ne!(x509.raw_serial(), x2.raw_serial());
    }

    #[test]
    fn caps_the_validity() {
        let ca = ca("cluster.local").with_max_validity(Duration::from_secs(600));
        let (_, pem) = csr(vec![uri("spiffe://cluster.local/ns/a/sa/b")]);
        for requested in [DAY * 2, Duration::ZERO] {
            let now = unix_secs(SystemTime::now());
            let chain = ca.sign_csr(&pem, requested).unwrap();
            let leaf = pem_to_der(&chain[0]);
            let (_, x509) = X509Certificate::from_der(&leaf).unwrap();
            let na = x509.validity().not_after.timestamp();
            assert!(
                (now + 599..=now + 601).contains(&na),
                "{requested:?}: {}",
                na - now
            );
        }
        // Never beyond the root's own expiry (the test root lives an hour).
        let ca = super::test_support::ca("cluster.local");
        let chain = ca.sign_csr(&pem, DAY).unwrap();
        let (leaf, root) = (pem_to_der(&chain[0]), ca.roots().remove(0));
        let (_, leaf) = X509Certificate::from_der(&leaf).unwrap();
        let (_, root) = X509Certificate::from_der(&root).unwrap();
        assert!(leaf.validity().not_after <= root.validity().not_after);
    }

    #[test]
    fn refuses_bad_csrs_with_a_reason() {
        let ca = ca("cluster.local");
        let good = "spiffe://cluster.local/ns/a/sa/b";

        let reason = refused(&ca, &csr(vec![]).1);
        assert!(reason.contains("no SAN"), "{reason}");

        let two = csr(vec![uri(good), uri("spiffe://cluster.local/ns/a/sa/c")]).1;
        assert!(refused(&ca, &two).contains("2 SANs"));

        let dns = SanType::DnsName(Ia5String::try_from("web.example").unwrap());
        assert!(refused(&ca, &csr(vec![dns.clone()]).1).contains("not a URI"));
        assert!(refused(&ca, &csr(vec![uri(good), dns]).1).contains("2 SANs"));

        let foreign = csr(vec![uri("spiffe://evil.example/ns/a/sa/b")]).1;
        assert!(refused(&ca, &foreign).contains("outside this CA's trust domain"));

        let not_workload = csr(vec![uri("spiffe://cluster.local/admin")]).1;
        assert!(refused(&ca, &not_workload).contains("not a workload SPIFFE id"));

        for garbage in [
            "",
            "hello",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            assert!(
                refused(&ca, garbage).contains("not a usable PEM CSR"),
                "{garbage:?}"
            );
        }

        // A CSR whose signature was tampered with: no proof that the caller holds the key.
        let (_, pem) = csr(vec![uri(good)]);
        let der = rustls_pemfile::csr(&mut pem.as_bytes()).unwrap().unwrap();
        let mut bytes = der.as_ref().to_vec();
        *bytes.last_mut().unwrap() ^= 1;
        let tampered = pem::encode("CERTIFICATE REQUEST", &bytes);
        assert!(refused(&ca, &tampered).contains("signature does not verify"));
    }

    #[test]
    fn the_authorizer_can_refuse_identities() {
        let ca = ca("cluster.local").with_authorizer(|id| match id.namespace() {
            "kube-system" => Err("namespace kube-system is not served".into()),
            _ => Ok(()),
        });
        let ok = csr(vec![uri("spiffe://cluster.local/ns/a/sa/b")]).1;
        assert!(ca.sign_csr(&ok, DAY).is_ok());
        let no = csr(vec![uri("spiffe://cluster.local/ns/kube-system/sa/b")]).1;
        assert!(refused(&ca, &no).contains("kube-system is not served"));
    }

    #[test]
    fn pem_encoding_matches_the_der() {
        let ca = ca("cluster.local");
        for n in 0..3 {
            let der =
                CertificateDer::from(ca.roots()[0].as_ref()[..ca.roots()[0].len() - n].to_vec());
            let pem = pem_of(&der);
            let back = rustls_pemfile::certs(&mut pem.as_bytes())
                .next()
                .unwrap()
                .unwrap();
            assert_eq!(back, der);
            assert!(pem.lines().all(|l| l.len() <= 64));
        }
    }

    mod pem {
        /// Minimal PEM encoding for the tampered-CSR test, via the module's own encoder.
        pub fn encode(label: &str, der: &[u8]) -> String {
            let cert = super::pem_of(&rustls::pki_types::CertificateDer::from(der.to_vec()));
            cert.replace("CERTIFICATE", label)
        }
    }
}
