//! SPIFFE ids of workloads: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
//!
//! Parsing is strict (the SPIFFE spec's character sets, no ports, queries, fragments, empty or
//! dot segments): an identity is compared byte for byte in policy and secure naming, so two
//! spellings of the same workload must not both be accepted.
use std::{fmt, str::FromStr};

/// The SPIFFE spec caps an id at 2048 bytes.
const MAX_LEN: usize = 2048;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("a SPIFFE id must start with spiffe://")]
    Scheme,
    #[error("a SPIFFE id is at most {MAX_LEN} bytes")]
    TooLong,
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error(
        "the trust domain may only hold lowercase letters, digits, '.', '-' and '_' (got {0:?})"
    )]
    TrustDomain(String),
    #[error("a workload SPIFFE id has the path /ns/<namespace>/sa/<service-account> (got {0:?})")]
    Path(String),
    #[error("path segment {0:?} may only hold letters, digits, '.', '-' and '_', and not be '.' or '..'")]
    Segment(String),
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

fn valid_trust_domain(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        if trust_domain.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        if !valid_trust_domain(trust_domain) {
            return Err(SpiffeIdError::TrustDomain(trust_domain.to_owned()));
        }
        for segment in [namespace, service_account] {
            if !valid_segment(segment) {
                return Err(SpiffeIdError::Segment(segment.to_owned()));
            }
        }
        let id = Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        if id.to_string().len() > MAX_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if trust_domain.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        // Ports, user info and upper case are not allowed in SPIFFE trust domains; the
        // character check rejects ':' and '@' along with them.
        if !valid_trust_domain(trust_domain) {
            return Err(SpiffeIdError::TrustDomain(trust_domain.to_owned()));
        }
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["ns", ns, "sa", sa] => Self::new(trust_domain, ns, sa),
            _ => Err(SpiffeIdError::Path(format!("/{path}"))),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids_round_trip() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web-v1".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "web-v1");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web-v1");
        assert_eq!(
            SpiffeId::new("cluster.local", "shop", "web-v1").unwrap(),
            id
        );
    }

    #[test]
    fn malformed_ids_are_refused_with_a_reason() {
        use SpiffeIdError::*;
        let cases = [
            ("https://cluster.local/ns/a/sa/b", Scheme),
            ("SPIFFE://cluster.local/ns/a/sa/b", Scheme),
            ("spiffe:///ns/a/sa/b", EmptyTrustDomain),
            (
                "spiffe://Cluster.local/ns/a/sa/b",
                TrustDomain("Cluster.local".into()),
            ),
            ("spiffe://td:8443/ns/a/sa/b", TrustDomain("td:8443".into())),
            ("spiffe://user@td/ns/a/sa/b", TrustDomain("user@td".into())),
            ("spiffe://td", Path("/".into())),
            ("spiffe://td/ns/a/sa/b/", Path("/ns/a/sa/b/".into())),
            ("spiffe://td/ns/a/sa/b?x=1", Segment("b?x=1".into())),
            ("spiffe://td/ns/a/sa/b#f", Segment("b#f".into())),
            ("spiffe://td/ns//sa/b", Segment("".into())),
            ("spiffe://td/ns/../sa/b", Segment("..".into())),
            ("spiffe://td/sa/b/ns/a", Path("/sa/b/ns/a".into())),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<SpiffeId>(), Err(want), "{input}");
        }
        let long = format!("spiffe://td/ns/a/sa/{}", "x".repeat(MAX_LEN));
        assert_eq!(long.parse::<SpiffeId>(), Err(TooLong));
    }
}
