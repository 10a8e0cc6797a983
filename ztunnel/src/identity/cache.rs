//! The per-identity certificate cache (Istio calls it the SecretManager): requests a workload's
//! certificate on first use with a key generated here, validates what the CA returns, rotates it
//! at half its lifetime with a fresh key, and keeps serving it through a CA outage until expiry.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwapOption;
use rcgen::KeyPair;
use ring::rand::SecureRandom;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::task::AbortHandle;
use tracing::{info, warn};

use super::{
    certificate::{csr_for, CertError, WorkloadCertificate},
    trust::fmt_system_time,
    CertificateProvider, ProviderError, SpiffeId,
};

#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// The validity asked of the CA (it may issue less).
    pub validity: Duration,
    /// When to renew, as a fraction of the lifetime left when the certificate arrived.
    pub refresh_fraction: f64,
    /// Backoff between failed renewals: doubles from `retry_initial` up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// How long to wait for the CA per request.
    pub request_timeout: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            validity: Duration::from_secs(24 * 3600),
            refresh_fraction: 0.5,
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Certificates per identity, requested on first use and rotated in the background.
pub struct CertificateCache {
    inner: Arc<Inner>,
}

struct Inner {
    provider: Arc<dyn CertificateProvider>,
    roots: Vec<CertificateDer<'static>>,
    options: CacheOptions,
    entries: Mutex<HashMap<SpiffeId, Arc<Entry>>>,
    issued: AtomicU64,
    rotation_failures: AtomicU64,
}

struct Current {
    cert: Arc<WorkloadCertificate>,
    refresh_at: SystemTime,
}

struct Entry {
    id: SpiffeId,
    current: ArcSwapOption<Current>,
    /// Held while asking the CA, so one CSR serves every concurrent caller.
    fetch: tokio::sync::Mutex<()>,
    /// Finished requests, so callers that waited on a failed one share its outcome.
    attempts: AtomicU64,
    last_error: Mutex<Option<CertError>>,
    rotator: Mutex<Option<AbortHandle>>,
    forgotten: AtomicBool,
}

impl Entry {
    fn valid(&self) -> Option<Arc<WorkloadCertificate>> {
        self.current
            .load()
            .as_ref()
            .filter(|c| !c.cert.is_expired())
            .map(|c| c.cert.clone())
    }

    /// The error a caller gets after a failed request.
    fn failure(&self, error: CertError) -> CertError {
        match self.current.load_full() {
            Some(old) => CertError::Expired {
                id: self.id.clone(),
                not_after: old.cert.not_after,
                reason: error.to_string(),
            },
            None => error,
        }
    }

    fn stop(&self) {
        self.forgotten.store(true, Ordering::Release);
        if let Some(task) = self.rotator.lock().unwrap().take() {
            task.abort();
        }
    }
}

impl CertificateCache {
    pub fn new(
        provider: Arc<dyn CertificateProvider>,
        roots: Vec<CertificateDer<'static>>,
        options: CacheOptions,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                provider,
                roots,
                options,
                entries: Mutex::new(HashMap::new()),
                issued: AtomicU64::new(0),
                rotation_failures: AtomicU64::new(0),
            }),
        }
    }

    /// The mesh roots certificates are checked against.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.inner.roots
    }

    /// `id`'s current certificate, requested from the CA if there is none yet (or it expired).
    pub async fn get(&self, id: &SpiffeId) -> Result<Arc<WorkloadCertificate>, CertError> {
        let entry = self.inner.entry(id);
        if let Some(cert) = entry.valid() {
            return Ok(cert);
        }
        let seen = entry.attempts.load(Ordering::Acquire);
        let _fetching = entry.fetch.lock().await;
        if let Some(cert) = entry.valid() {
            return Ok(cert);
        }
        if entry.attempts.load(Ordering::Acquire) != seen {
            // A request finished (and failed) while we waited: share its outcome rather than
            // queueing one more request per caller behind a CA that is down.
            let error = entry.last_error.lock().unwrap().clone();
            if let Some(error) = error {
                return Err(entry.failure(error));
            }
        }
        let result = self.inner.fetch(&entry).await;
        drop(_fetching);
        match result {
            Ok(cert) => {
                self.inner.ensure_rotator(&entry);
                Ok(cert)
            }
            Err(e) => Err(entry.failure(e)),
        }
    }

    /// Stops caching and rotating `id` (no workload uses it any more).
    pub fn forget(&self, id: &SpiffeId) {
        if let Some(entry) = self.inner.entries.lock().unwrap().remove(id) {
            entry.stop();
        }
    }

    /// The certificates held now, one per identity, sorted by identity.
    pub fn current(&self) -> Vec<Arc<WorkloadCertificate>> {
        let entries = self.inner.entries.lock().unwrap();
        let mut certs: Vec<_> = entries
            .values()
            .filter_map(|e| e.current.load().as_ref().map(|c| c.cert.clone()))
            .collect();
        certs.sort_by_key(|c| c.id.to_string());
        certs
    }

    /// Certificates obtained from the CA (first issues and rotations).
    pub fn issued(&self) -> u64 {
        self.inner.issued.load(Ordering::Relaxed)
    }

    /// Failed background renewals.
    pub fn rotation_failures(&self) -> u64 {
        self.inner.rotation_failures.load(Ordering::Relaxed)
    }
}

impl Drop for CertificateCache {
    fn drop(&mut self) {
        for entry in self.inner.entries.lock().unwrap().values() {
            entry.stop();
        }
    }
}

impl Inner {
    fn entry(&self, id: &SpiffeId) -> Arc<Entry> {
        self.entries
            .lock()
            .unwrap()
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(Entry {
                    id: id.clone(),
                    current: ArcSwapOption::empty(),
                    fetch: tokio::sync::Mutex::new(()),
                    attempts: AtomicU64::new(0),
                    last_error: Mutex::new(None),
                    rotator: Mutex::new(None),
                    forgotten: AtomicBool::new(false),
                })
            })
            .clone()
    }

    /// Requests a certificate and installs it. Call with `entry.fetch` held.
    async fn fetch(&self, entry: &Entry) -> Result<Arc<WorkloadCertificate>, CertError> {
        let result = self.request(&entry.id).await;
        match &result {
            Ok(cert) => {
                let received = SystemTime::now().max(cert.not_before);
                // Measured from arrival, not not_before: CAs backdate leaves for clock skew,
                // which would otherwise pull the renewal of short-lived leaves to "now".
                let left = cert.not_after.duration_since(received).unwrap_or_default();
                let refresh_at =
                    received + left.mul_f64(self.options.refresh_fraction.clamp(0.0, 1.0));
                entry.current.store(Some(Arc::new(Current {
                    cert: cert.clone(),
                    refresh_at,
                })));
                *entry.last_error.lock().unwrap() = None;
                self.issued.fetch_add(1, Ordering::Relaxed);
                info!(identity = %entry.id, not_after = %fmt_system_time(cert.not_after),
                    refresh_at = %fmt_system_time(refresh_at), "workload certificate issued");
            }
            Err(e) => *entry.last_error.lock().unwrap() = Some(e.clone()),
        }
        entry.attempts.fetch_add(1, Ordering::Release);
        result
    }

    async fn request(&self, id: &SpiffeId) -> Result<Arc<WorkloadCertificate>, CertError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CertError::Internal(format!("key generation failed: {e}")))?;
        let csr =
            csr_for(id, &key).map_err(|e| CertError::Internal(format!("CSR for {id}: {e}")))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        drop(key);
        let timeout = self.options.request_timeout;
        let call = self.provider.create_certificate(csr, self.options.validity);
        let chain = match tokio::time::timeout(timeout, call).await {
            Err(_) => {
                return Err(CertError::Unavailable(format!(
                    "no answer within {} ms",
                    timeout.as_millis()
                )))
            }
            Ok(Err(ProviderError::Unavailable(r))) => return Err(CertError::Unavailable(r)),
            Ok(Err(ProviderError::Refused(r))) => return Err(CertError::Refused(r)),
            Ok(Ok(chain)) => chain,
        };
        WorkloadCertificate::from_pem_chain(id.clone(), &chain, key_der, &self.roots).map(Arc::new)
    }

    fn ensure_rotator(self: &Arc<Self>, entry: &Arc<Entry>) {
        // Under the map lock, so `forget` cannot slip between the check and the spawn.
        let entries = self.entries.lock().unwrap();
        let current = entries
            .get(&entry.id)
            .is_some_and(|e| Arc::ptr_eq(e, entry));
        let mut rotator = entry.rotator.lock().unwrap();
        if !current || entry.forgotten.load(Ordering::Acquire) || rotator.is_some() {
            return;
        }
        let task = tokio::spawn(rotate(Arc::downgrade(self), entry.clone()));
        *rotator = Some(task.abort_handle());
    }
}

/// Renews `entry` at each certificate's refresh time, retrying failures with backoff.
async fn rotate(cache: Weak<Inner>, entry: Arc<Entry>) {
    loop {
        let Some(current) = entry.current.load_full() else {
            return;
        };
        let (retry_initial, retry_max) = match cache.upgrade() {
            Some(inner) => (inner.options.retry_initial, inner.options.retry_max),
            None => return,
        };
        let wait = current
            .refresh_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        // A floor so a CA handing out nearly-expired leaves cannot make this spin.
        tokio::time::sleep(wait.max(retry_initial)).await;
        let mut backoff = retry_initial;
        loop {
            if entry.forgotten.load(Ordering::Acquire) {
                return;
            }
            let Some(inner) = cache.upgrade() else {
                return;
            };
            let guard = entry.fetch.lock().await;
            // `get` may have renewed an expired certificate meanwhile.
            let renewed = entry
                .current
                .load()
                .as_ref()
                .is_some_and(|c| !Arc::ptr_eq(&c.cert, &current.cert));
            let result = if renewed {
                Ok(())
            } else {
                inner.fetch(&entry).await.map(|_| ())
            };
            drop(guard);
            match result {
                Ok(()) => break,
                Err(e) => {
                    inner.rotation_failures.fetch_add(1, Ordering::Relaxed);
                    let left = current.cert.expires_in();
                    warn!(identity = %entry.id, error = %e, expires_in_s = left.as_secs(),
                        retry_in_ms = backoff.as_millis() as u64,
                        "certificate renewal failed; serving the current one until it expires");
                    drop(inner);
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(retry_max);
                }
            }
        }
    }
}

/// Between half and all of `d`, so identities renewing together spread their retries.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 1];
    let r = match ring::rand::SystemRandom::new().fill(&mut b) {
        Ok(()) => b[0] as f64 / 255.0,
        Err(_) => 1.0,
    };
    d.mul_f64(0.5 + 0.5 * r)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU8;

    use super::*;
    use crate::identity::{
        ca::test_support::{ca, id},
        BoxFuture, EmbeddedCa,
    };

    const DELEGATE: u8 = 0;
    const DOWN: u8 = 1;
    const HANG: u8 = 2;
    const WRONG_KEY: u8 = 3;
    const OTHER_CA: u8 = 4;

    /// The real embedded CA behind a switch that can take it down or make it misbehave.
    struct TestCa {
        ca: EmbeddedCa,
        other: EmbeddedCa,
        mode: AtomicU8,
        calls: AtomicU64,
        delay: Duration,
    }

    impl TestCa {
        fn new(delay: Duration) -> Arc<Self> {
            Arc::new(Self {
                ca: ca("cluster.local"),
                other: ca("cluster.local"),
                mode: AtomicU8::new(DELEGATE),
                calls: AtomicU64::new(0),
                delay,
            })
        }

        fn set(&self, mode: u8) {
            self.mode.store(mode, Ordering::SeqCst);
        }

        fn calls(&self) -> u64 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl CertificateProvider for TestCa {
        fn create_certificate(
            &self,
            csr_pem: String,
            validity: Duration,
        ) -> BoxFuture<'_, Result<Vec<String>, ProviderError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                match self.mode.load(Ordering::SeqCst) {
                    DOWN => Err(ProviderError::Unavailable("connection refused".into())),
                    HANG => std::future::pending().await,
                    WRONG_KEY => {
                        // A valid certificate for the right identity, but someone else's key.
                        let key = KeyPair::generate().unwrap();
                        let id = crate::identity::ca::test_support::id(
                            "spiffe://cluster.local/ns/shop/sa/web",
                        );
                        self.ca.sign_csr(&csr_for(&id, &key).unwrap(), validity)
                    }
                    OTHER_CA => self.other.sign_csr(&csr_pem, validity),
                    _ => self.ca.sign_csr(&csr_pem, validity),
                }
            })
        }
    }

    fn cache(test_ca: &Arc<TestCa>, validity: Duration) -> CertificateCache {
        let options = CacheOptions {
            validity,
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_millis(200),
            request_timeout: Duration::from_millis(500),
            ..CacheOptions::default()
        };
        CertificateCache::new(test_ca.clone(), test_ca.ca.roots(), options)
    }

    fn web() -> SpiffeId {
        id("spiffe://cluster.local/ns/shop/sa/web")
    }

    #[tokio::test]
    async fn first_get_issues_and_later_gets_reuse() {
        let test_ca = TestCa::new(Duration::ZERO);
        let cache = cache(&test_ca, Duration::from_secs(3600));
        let first = cache.get(&web()).await.unwrap();
        assert_eq!(first.id, web());
        assert_eq!(first.chain.len(), 1, "leaf only; the root is not presented");
        let left = first.expires_in();
        assert!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3600));
        let second = cache.get(&web()).await.unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!((test_ca.calls(), cache.issued()), (1, 1));

        // Another identity gets its own certificate and key.
        let api = cache
            .get(&id("spiffe://cluster.local/ns/shop/sa/api"))
            .await
            .unwrap();
        assert_ne!(api.leaf(), first.leaf());
        assert_ne!(api.key.secret_der(), first.key.secret_der());
        assert_eq!(test_ca.calls(), 2);
        // Debug leaves the key out.
        let debug = format!("{first:?}");
        assert!(debug.contains("spiffe://cluster.local/ns/shop/sa/web") && !debug.contains("key:"));
    }

    #[tokio::test]
    async fn concurrent_first_gets_share_one_csr() {
        let test_ca = TestCa::new(Duration::from_millis(100));
        let cache = Arc::new(cache(&test_ca, Duration::from_secs(3600)));
        let gets: Vec<_> = (0..16)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&web()).await.unwrap() })
            })
            .collect();
        let mut certs = Vec::new();
        for g in gets {
            certs.push(g.await.unwrap());
        }
        assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));
        assert_eq!(test_ca.calls(), 1);
    }

    #[tokio::test]
    async fn concurrent_gets_share_a_failure_too() {
        let test_ca = TestCa::new(Duration::from_millis(100));
        test_ca.set(DOWN);
        let cache = Arc::new(cache(&test_ca, Duration::from_secs(3600)));
        let gets: Vec<_> = (0..8)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&web()).await })
            })
            .collect();
        for g in gets {
            assert!(matches!(g.await.unwrap(), Err(CertError::Unavailable(_))));
        }
        assert_eq!(
            test_ca.calls(),
            1,
            "callers queued behind a failure share it"
        );
    }

    #[tokio::test]
    async fn a_ca_that_is_down_then_back_needs_no_restart() {
        let test_ca = TestCa::new(Duration::ZERO);
        let cache = cache(&test_ca, Duration::from_secs(3600));
        test_ca.set(DOWN);
        let err = cache.get(&web()).await.unwrap_err();
        assert!(matches!(err, CertError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("connection refused"), "{err}");
        test_ca.set(DELEGATE);
        assert_eq!(cache.get(&web()).await.unwrap().id, web());

        // A CA that never answers is given up on after the request timeout.
        let cache2 = self::cache(&test_ca, Duration::from_secs(3600));
        test_ca.set(HANG);
        let start = std::time::Instant::now();
        let err = cache2.get(&web()).await.unwrap_err();
        assert!(
            matches!(err, CertError::Unavailable(ref r) if r.contains("no answer")),
            "{err}"
        );
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn unusable_answers_from_the_ca_are_refused() {
        let test_ca = TestCa::new(Duration::ZERO);
        let cache = cache(&test_ca, Duration::from_secs(3600));
        test_ca.set(WRONG_KEY);
        let err = cache.get(&web()).await.unwrap_err();
        assert!(
            matches!(err, CertError::InvalidChain(ref r) if r.contains("our public key")),
            "{err}"
        );
        // Right key, wrong identity.
        let err = cache
            .get(&id("spiffe://cluster.local/ns/shop/sa/api"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CertError::InvalidChain(ref r) if r.contains("is for spiffe://cluster.local/ns/shop/sa/web")),
            "{err}"
        );
        // A CA whose root is not a mesh root.
        test_ca.set(OTHER_CA);
        let err = cache.get(&web()).await.unwrap_err();
        assert!(
            matches!(err, CertError::InvalidChain(ref r) if r.contains("mesh roots")),
            "{err}"
        );
        // Refusals pass through as such.
        let err = cache
            .get(&id("spiffe://other.example/ns/a/sa/b"))
            .await
            .unwrap_err();
        assert!(matches!(err, CertError::Refused(_)), "{err}");
        assert_eq!(cache.issued(), 0);
    }

    #[tokio::test]
    async fn rotates_at_half_life_with_a_fresh_key() {
        let test_ca = TestCa::new(Duration::ZERO);
        let cache = cache(&test_ca, Duration::from_secs(3));
        let first = cache.get(&web()).await.unwrap();
        let start = std::time::Instant::now();
        let rotated = loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = cache.get(&web()).await.unwrap();
            if !Arc::ptr_eq(&now, &first) {
                break now;
            }
            assert!(start.elapsed() < Duration::from_secs(3), "no rotation");
        };
        assert!(!first.is_expired(), "rotated before expiry");
        assert_ne!(rotated.leaf(), first.leaf());
        assert_ne!(rotated.key.secret_der(), first.key.secret_der());
        assert!(rotated.not_after > first.not_after);
        assert_eq!(cache.issued(), 2);
        assert_eq!(cache.rotation_failures(), 0);
    }

    #[tokio::test]
    async fn serves_the_current_certificate_through_an_outage_until_expiry() {
        let test_ca = TestCa::new(Duration::ZERO);
        let cache = cache(&test_ca, Duration::from_secs(3));
        let first = cache.get(&web()).await.unwrap();
        test_ca.set(DOWN);
        while !first.is_expired() {
            match cache.get(&web()).await {
                Ok(c) => assert!(Arc::ptr_eq(&c, &first)),
                // The last moments: `get` saw it expire before this loop did.
                Err(CertError::Expired { .. }) => break,
                Err(e) => panic!("{e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            cache.rotation_failures() > 0,
            "renewals were attempted and failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let err = cache.get(&web()).await.unwrap_err();
        match &err {
            CertError::Expired {
                id,
                not_after,
                reason,
            } => {
                assert_eq!(id, &web());
                assert_eq!(*not_after, first.not_after);
                assert!(reason.contains("connection refused"), "{reason}");
            }
            e => panic!("expected Expired, got {e}"),
        }
        assert!(err.to_string().contains("expired at"), "{err}");

        test_ca.set(DELEGATE);
        let renewed = cache.get(&web()).await.unwrap();
        assert!(!renewed.is_expired());
        assert_ne!(renewed.leaf(), first.leaf());
    }

    #[tokio::test]
    async fn forgotten_identities_stop_rotating() {
        let test_ca = TestCa::new(Duration::ZERO);
        let cache = cache(&test_ca, Duration::from_secs(2));
        cache.get(&web()).await.unwrap();
        cache.forget(&web());
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(test_ca.calls(), 1, "no renewal after forget");
        // Asking again starts over.
        cache.get(&web()).await.unwrap();
        assert_eq!(test_ca.calls(), 2);
    }
}
