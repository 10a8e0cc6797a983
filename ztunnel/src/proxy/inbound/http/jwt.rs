//! RequestAuthentication on each request: the token checked against the workload's rules,
//! with key sets of `jwksUri`s fetched (and refetched once, for a key that rotated in).
use http::{header, Request};
use hyper::body::Incoming;

use super::Inbound;
use crate::{
    authz::{
        request_authentication::{JwtError, JwtFailure},
        RequestAuth,
    },
    proxy::PodContext,
    state::Snapshot,
};

impl Inbound {
    /// Checks the request's JWT against the RequestAuthentications of `pod`: `Ok(None)` without
    /// a token (or without any RequestAuthentication), `Ok(Some)` for a valid one (the request's
    /// headers edited as the rule says), `Err` for a token that must be refused with 401.
    pub(super) async fn authenticate(
        &self,
        snapshot: &Snapshot,
        pod: &PodContext,
        req: &mut Request<Incoming>,
    ) -> Result<Option<RequestAuth>, JwtError> {
        use crate::authz::request_authentication::{authenticate, JwtOutcome, Keys, TokenSource};
        let Some(p) = pod.in_snapshot(snapshot) else {
            return Ok(None);
        };
        let rules: Vec<_> = snapshot
            .request_authentications_for(p)
            .into_iter()
            .flat_map(|ra| &ra.rules)
            .collect();
        if rules.is_empty() {
            return Ok(None);
        }
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let source = TokenSource {
            headers: &headers,
            query: req.uri().query(),
        };
        let mut outcome = JwtOutcome::NoToken;
        // A second round refetches key sets, for a token signed with a key that rotated in.
        for refresh in [false, true] {
            let mut fetched = std::collections::HashMap::new();
            for rule in &rules {
                if let Keys::Uri(uri) = &rule.keys {
                    if !fetched.contains_key(uri) {
                        fetched.insert(uri.clone(), self.jwks.get(uri, refresh).await);
                    }
                }
            }
            outcome = authenticate(&rules, &source, |rule| match &rule.keys {
                Keys::Inline(set) => Some(set.clone()),
                Keys::Uri(uri) => fetched.get(uri).cloned().flatten(),
            });
            let retry = matches!(&outcome, JwtOutcome::Invalid(e) if e.kind == JwtFailure::UnknownKey)
                && rules.iter().any(|r| matches!(r.keys, Keys::Uri(_)));
            if !retry {
                break;
            }
        }
        match outcome {
            JwtOutcome::NoToken => Ok(None),
            JwtOutcome::Invalid(reason) => Err(reason),
            JwtOutcome::Valid(auth, edits) => {
                let h = req.headers_mut();
                for name in &edits.remove {
                    h.remove(name.as_str());
                }
                for (name, value) in &edits.set {
                    if let (Ok(n), Ok(v)) = (
                        header::HeaderName::from_bytes(name.as_bytes()),
                        header::HeaderValue::from_str(value),
                    ) {
                        h.insert(n, v);
                    }
                }
                Ok(Some(auth))
            }
        }
    }
}
