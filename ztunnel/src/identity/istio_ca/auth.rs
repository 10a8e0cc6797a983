//! Who may have which certificate: the [`Authenticator`] the CA service asks for every request,
//! and the simple ones (anyone, one shared token). The Kubernetes one, by TokenReview, is in
//! [`super::token_review`].
use std::{fmt, path::Path};

use anyhow::{bail, Context};
use subtle::ConstantTimeEq;

use crate::identity::{BoxFuture, SpiffeId};

/// Why a caller may not have the certificate it asked for.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// Missing or invalid credentials (gRPC `UNAUTHENTICATED`).
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials that do not cover the requested identity (gRPC `PERMISSION_DENIED`).
    #[error("{0}")]
    PermissionDenied(String),
    /// The credentials could not be checked now (gRPC `UNAVAILABLE`: the caller retries). The
    /// request is refused all the same.
    #[error("{0}")]
    Unavailable(String),
}

/// Decides whether the caller holding `token` (the bearer token of the request, if any) may get
/// a certificate for `requested`. Asynchronous so that an implementation can ask Kubernetes
/// (TokenReview). Implementations must never log the token.
pub trait Authenticator: Send + Sync + 'static {
    fn authorize<'a>(
        &'a self,
        token: Option<&'a str>,
        requested: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<(), AuthError>>;
}

/// Lets anyone have any identity. **Local/dev only**: whoever reaches the port can impersonate
/// every workload of the trust domain.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authenticator for AllowAll {
    fn authorize<'a>(
        &'a self,
        _token: Option<&'a str>,
        _requested: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<(), AuthError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Lets callers that present one shared bearer token have any identity (the node proxies of a
/// demo or test cluster share it). Only a SHA-256 of the token is kept, and the comparison is in
/// constant time over those digests, so neither the content nor the length leaks through timing.
#[derive(Clone)]
pub struct StaticToken {
    digest: [u8; 32],
}

impl fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StaticToken(..)")
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

impl StaticToken {
    /// The expected token; surrounding whitespace is not part of it (as in the client).
    pub fn new(token: &str) -> anyhow::Result<Self> {
        let token = token.trim();
        if token.is_empty() {
            bail!("the expected bearer token is empty");
        }
        Ok(Self {
            digest: sha256(token.as_bytes()),
        })
    }

    /// The expected token, read once from `path`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read token file {}", path.display()))?;
        Self::new(&token).with_context(|| format!("token file {}", path.display()))
    }
}

impl Authenticator for StaticToken {
    fn authorize<'a>(
        &'a self,
        token: Option<&'a str>,
        _requested: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<(), AuthError>> {
        let result = match token {
            None => Err(AuthError::Unauthenticated("no bearer token".to_owned())),
            Some(token) if bool::from(sha256(token.as_bytes()).ct_eq(&self.digest)) => Ok(()),
            Some(_) => Err(AuthError::Unauthenticated(
                "the bearer token is not the expected one".to_owned(),
            )),
        };
        Box::pin(async move { result })
    }
}
