//! `retries`: when an attempt is tried again, with Envoy's `retryOn` names and Istio's defaults
//! (a route without `retries` gets 2 retries on `connect-failure,refused-stream,unavailable,
//! cancelled,retriable-status-codes` with 503 retriable; `attempts: 0` turns retries off).
use std::time::Duration;

use serde::Deserialize;

use super::values::IstioDuration;

/// One of Envoy's `retry_on` conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryOn {
    /// Any 5xx, and attempts that got no response at all.
    FiveXx,
    /// 502, 503, 504, and attempts that got no response at all.
    GatewayError,
    /// No response: a reset, a dropped connection, a per-try timeout, a failed connect.
    Reset,
    /// No response before the request went out: a failed connect or a refused stream.
    ResetBeforeRequest,
    ConnectFailure,
    /// A response carrying `x-envoy-ratelimited`.
    EnvoyRateLimited,
    /// 409.
    Retriable4xx,
    /// HTTP/2 REFUSED_STREAM.
    RefusedStream,
    /// The codes of `retryOn` given as numbers.
    RetriableStatusCodes,
    /// Needs `retriable_headers`, which Istio cannot set: accepted, never true.
    RetriableHeaders,
    /// HTTP/3 only: accepted, never true (the proxy speaks no HTTP/3).
    Http3PostConnectFailure,
    /// gRPC status 1.
    Cancelled,
    /// gRPC status 4.
    DeadlineExceeded,
    /// gRPC status 8.
    ResourceExhausted,
    /// gRPC status 13.
    Internal,
    /// gRPC status 14.
    Unavailable,
}

impl RetryOn {
    const NAMES: [(&'static str, RetryOn); 16] = [
        ("5xx", RetryOn::FiveXx),
        ("gateway-error", RetryOn::GatewayError),
        ("reset", RetryOn::Reset),
        ("reset-before-request", RetryOn::ResetBeforeRequest),
        ("connect-failure", RetryOn::ConnectFailure),
        ("envoy-ratelimited", RetryOn::EnvoyRateLimited),
        ("retriable-4xx", RetryOn::Retriable4xx),
        ("refused-stream", RetryOn::RefusedStream),
        ("retriable-status-codes", RetryOn::RetriableStatusCodes),
        ("retriable-headers", RetryOn::RetriableHeaders),
        (
            "http3-post-connect-failure",
            RetryOn::Http3PostConnectFailure,
        ),
        ("cancelled", RetryOn::Cancelled),
        ("deadline-exceeded", RetryOn::DeadlineExceeded),
        ("resource-exhausted", RetryOn::ResourceExhausted),
        ("internal", RetryOn::Internal),
        ("unavailable", RetryOn::Unavailable),
    ];

    pub fn as_str(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, c)| *c == self)
            .map_or("", |(n, _)| n)
    }

    fn parse(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| *c)
    }
}

/// How an attempt ended, as far as a retry is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    Response {
        status: u16,
        /// `grpc-status` of a trailers-only response.
        grpc_status: Option<u32>,
        rate_limited: bool,
    },
    /// The upstream could not be reached (or refused the tunnel).
    ConnectFailed,
    /// HTTP/2 REFUSED_STREAM: the request was not processed.
    RefusedStream,
    /// The connection or stream ended before a response.
    Reset,
    /// `perTryTimeout` elapsed before a response.
    PerTryTimeout,
}

/// A route's retry policy, with Istio's defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (Envoy's `num_retries`); 0 is none.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: Vec<RetryOn>,
    pub status_codes: Vec<u16>,
    /// Envoy's jittered exponential backoff starts here (25 ms unless `backoff` says).
    pub backoff: Duration,
    /// Prefer endpoints not tried yet (Istio's default `previous_hosts` predicate).
    pub other_hosts: bool,
}

/// Envoy's base retry interval.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            retry_on: vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Unavailable,
                RetryOn::Cancelled,
                RetryOn::RetriableStatusCodes,
            ],
            status_codes: vec![503],
            backoff: DEFAULT_BACKOFF,
            other_hosts: true,
        }
    }
}

impl RetryPolicy {
    pub const NONE: RetryPolicy = RetryPolicy {
        attempts: 0,
        per_try_timeout: None,
        retry_on: Vec::new(),
        status_codes: Vec::new(),
        backoff: DEFAULT_BACKOFF,
        other_hosts: true,
    };

    /// Whether an attempt that ended as `a` is tried again (when attempts remain).
    pub fn retries(&self, a: Attempt) -> bool {
        self.retry_on
            .iter()
            .any(|c| Self::condition(*c, a, &self.status_codes))
    }

    fn condition(c: RetryOn, a: Attempt, codes: &[u16]) -> bool {
        use Attempt::*;
        let no_response = matches!(a, ConnectFailed | RefusedStream | Reset | PerTryTimeout);
        match (c, a) {
            (RetryOn::FiveXx, Response { status, .. }) => status >= 500,
            (RetryOn::GatewayError, Response { status, .. }) => (502..=504).contains(&status),
            (RetryOn::FiveXx | RetryOn::GatewayError | RetryOn::Reset, _) => no_response,
            (RetryOn::ResetBeforeRequest, _) => matches!(a, ConnectFailed | RefusedStream),
            (RetryOn::ConnectFailure, _) => a == ConnectFailed,
            (RetryOn::RefusedStream, _) => a == RefusedStream,
            (RetryOn::Retriable4xx, Response { status, .. }) => status == 409,
            (RetryOn::RetriableStatusCodes, Response { status, .. }) => codes.contains(&status),
            (RetryOn::EnvoyRateLimited, Response { rate_limited, .. }) => rate_limited,
            (RetryOn::Cancelled, Response { grpc_status, .. }) => grpc_status == Some(1),
            (RetryOn::DeadlineExceeded, Response { grpc_status, .. }) => grpc_status == Some(4),
            (RetryOn::ResourceExhausted, Response { grpc_status, .. }) => grpc_status == Some(8),
            (RetryOn::Internal, Response { grpc_status, .. }) => grpc_status == Some(13),
            (RetryOn::Unavailable, Response { grpc_status, .. }) => grpc_status == Some(14),
            _ => false,
        }
    }

    /// How long to wait before retry number `n` (1-based): Envoy's fully jittered exponential
    /// backoff, a random time below `backoff × (2ⁿ − 1)`, at most ten times `backoff`.
    pub fn backoff_before(&self, n: u32) -> Duration {
        let factor = (1u64 << n.min(16)) - 1;
        let cap = self.backoff.saturating_mul(10);
        let ceiling = self.backoff.saturating_mul(factor as u32).min(cap);
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(if ms == 0 { 0 } else { fastrand::u64(0..ms) })
    }

    pub fn describe(&self) -> String {
        if self.attempts == 0 {
            return "none".into();
        }
        let mut on: Vec<String> = self
            .retry_on
            .iter()
            .map(|c| c.as_str().to_owned())
            .collect();
        on.extend(self.status_codes.iter().map(u16::to_string));
        let per_try = match self.per_try_timeout {
            Some(t) => format!(", {} ms per try", t.as_millis()),
            None => String::new(),
        };
        format!("{} on {}{per_try}", self.attempts, on.join(","))
    }
}

/// `retries:` as written.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryDoc {
    #[serde(default)]
    attempts: i32,
    per_try_timeout: Option<IstioDuration>,
    retry_on: Option<String>,
    retry_remote_localities: Option<bool>,
    retry_ignore_previous_hosts: Option<bool>,
    backoff: Option<IstioDuration>,
}

impl RetryDoc {
    /// The policy, or the problems worth reporting with it (fields read but without effect).
    pub fn into_policy(self) -> Result<(RetryPolicy, Vec<String>), String> {
        let mut notes = Vec::new();
        if self.attempts <= 0 {
            return Ok((RetryPolicy::NONE, notes));
        }
        let mut p = RetryPolicy {
            attempts: self.attempts as u32,
            ..RetryPolicy::default()
        };
        if let Some(on) = self.retry_on.filter(|s| !s.trim().is_empty()) {
            let (conditions, codes) = parse_retry_on(&on)?;
            p.retry_on = conditions;
            p.status_codes = codes;
            if !p.status_codes.is_empty() && !p.retry_on.contains(&RetryOn::RetriableStatusCodes) {
                p.retry_on.push(RetryOn::RetriableStatusCodes);
            }
        }
        if let Some(t) = self.per_try_timeout {
            p.per_try_timeout = Some(t.positive("retries.perTryTimeout")?);
        }
        if let Some(b) = self.backoff {
            p.backoff = b.positive("retries.backoff")?;
        }
        if let Some(ignore) = self.retry_ignore_previous_hosts {
            p.other_hosts = ignore;
        }
        if self.retry_remote_localities == Some(true) {
            notes.push("retries.retryRemoteLocalities has no effect (no localities here)".into());
        }
        Ok((p, notes))
    }
}

/// `5xx,connect-failure,503`: conditions by Envoy's names, status codes as numbers.
pub fn parse_retry_on(text: &str) -> Result<(Vec<RetryOn>, Vec<u16>), String> {
    let mut conditions = Vec::new();
    let mut codes = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Ok(code) = part.parse::<u16>() {
            if !(100..=599).contains(&code) {
                return Err(format!(
                    "retries.retryOn: {code} is not an HTTP status code"
                ));
            }
            codes.push(code);
        } else if let Some(c) = RetryOn::parse(part) {
            if !conditions.contains(&c) {
                conditions.push(c);
            }
        } else {
            return Err(format!(
                "retries.retryOn: {part:?} is not one of Envoy's retry conditions ({})",
                RetryOn::NAMES.map(|(n, _)| n).join(", ")
            ));
        }
    }
    Ok((conditions, codes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16) -> Attempt {
        Attempt::Response {
            status,
            grpc_status: None,
            rate_limited: false,
        }
    }

    #[test]
    fn retry_conditions_table() {
        use Attempt::*;
        let rows: &[(&str, Attempt, bool)] = &[
            ("5xx", resp(500), true),
            ("5xx", resp(503), true),
            ("5xx", resp(404), false),
            ("5xx", Reset, true),
            ("5xx", ConnectFailed, true),
            ("5xx", PerTryTimeout, true),
            ("gateway-error", resp(500), false),
            ("gateway-error", resp(502), true),
            ("gateway-error", resp(504), true),
            ("gateway-error", Reset, true),
            ("reset", resp(503), false),
            ("reset", Reset, true),
            ("reset", PerTryTimeout, true),
            ("connect-failure", ConnectFailed, true),
            ("connect-failure", Reset, false),
            ("reset-before-request", RefusedStream, true),
            ("reset-before-request", Reset, false),
            ("refused-stream", RefusedStream, true),
            ("retriable-4xx", resp(409), true),
            ("retriable-4xx", resp(400), false),
            ("503", resp(503), true),
            ("503", resp(500), false),
            ("retriable-status-codes,500", resp(500), true),
            ("retriable-headers", resp(500), false),
            (
                "unavailable",
                Response {
                    status: 200,
                    grpc_status: Some(14),
                    rate_limited: false,
                },
                true,
            ),
            (
                "envoy-ratelimited",
                Response {
                    status: 429,
                    grpc_status: None,
                    rate_limited: true,
                },
                true,
            ),
        ];
        for (on, attempt, expect) in rows {
            let doc = RetryDoc {
                attempts: 3,
                retry_on: Some((*on).into()),
                ..Default::default()
            };
            let (p, _) = doc.into_policy().unwrap();
            assert_eq!(p.retries(*attempt), *expect, "{on} on {attempt:?}");
        }
    }

    #[test]
    fn istio_defaults_and_refusals() {
        let d = RetryPolicy::default();
        assert_eq!(d.attempts, 2);
        assert!(d.retries(resp(503)) && !d.retries(resp(500)) && d.retries(Attempt::ConnectFailed));
        let off = RetryDoc::default().into_policy().unwrap().0;
        assert_eq!(off.attempts, 0, "attempts: 0 disables retries");
        let only_attempts = RetryDoc {
            attempts: 5,
            ..Default::default()
        };
        let p = only_attempts.into_policy().unwrap().0;
        assert_eq!(
            (p.attempts, p.retry_on.len()),
            (5, 5),
            "the default conditions"
        );
        let bad = RetryDoc {
            attempts: 1,
            retry_on: Some("5xx,timeout".into()),
            ..Default::default()
        };
        assert!(bad.into_policy().unwrap_err().contains("\"timeout\""));
        let bad_code = parse_retry_on("700");
        assert!(bad_code.is_err());
    }

    #[test]
    fn backoff_is_jittered_below_its_ceiling() {
        let p = RetryPolicy::default();
        for n in 1..6 {
            let cap = (25u64 * ((1 << n) - 1)).min(250);
            for _ in 0..50 {
                assert!(p.backoff_before(n).as_millis() < u128::from(cap));
            }
        }
    }
}
