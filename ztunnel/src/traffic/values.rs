//! The small value types of Istio's networking API, each checked where it is read so that a bad
//! one is reported at its own line: durations, percentages, host names and `exportTo`.
use std::{fmt, net::IpAddr, time::Duration};

use serde::{de, Deserialize, Deserializer};

/// Kubernetes' DNS domain of Services: `<name>.<namespace>.svc.cluster.local`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// A duration as Istio reads them (Go's syntax: `7s`, `1.5s`, `100ms`, `1m30s`, `2h`), to
/// the millisecond, as Istio's validation requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IstioDuration(pub Duration);

impl IstioDuration {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{text:?} is not a duration like 7s, 100ms or 1m30s: {why}");
        let mut rest = text.trim();
        if rest.is_empty() {
            return Err(bad("empty"));
        }
        if rest.starts_with('-') {
            return Err(bad("negative"));
        }
        let mut nanos: f64 = 0.0;
        while !rest.is_empty() {
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| bad("a unit is missing"))?;
            let (number, tail) = rest.split_at(number_len);
            let value: f64 = number.parse().map_err(|_| bad("not a number"))?;
            let unit_len = tail
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(unit_len);
            let scale = match unit {
                "ns" => 1.0,
                "us" | "µs" => 1e3,
                "ms" => 1e6,
                "s" => 1e9,
                "m" => 60e9,
                "h" => 3600e9,
                _ => return Err(bad(&format!("unknown unit {unit:?}"))),
            };
            nanos += value * scale;
            rest = tail;
        }
        if nanos > 1e18 {
            return Err(bad("too long"));
        }
        let nanos = nanos.round() as u64;
        if !nanos.is_multiple_of(1_000_000) {
            return Err(bad("only whole milliseconds are supported (as in Istio)"));
        }
        Ok(Self(Duration::from_nanos(nanos)))
    }

    /// Refuses zero (Istio requires at least 1ms where a duration means a wait).
    pub fn positive(self, field: &str) -> Result<Duration, String> {
        if self.0.is_zero() {
            return Err(format!("{field} must be at least 1ms"));
        }
        Ok(self.0)
    }
}

impl<'de> Deserialize<'de> for IstioDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(de::Error::custom)
    }
}

/// A share of requests, in millionths (Envoy's `FractionalPercent` with a denominator of a
/// million, which is what Istio turns `percentage.value` into).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Share(pub u32);

impl Share {
    pub const ALL: Share = Share(1_000_000);
    pub const NONE: Share = Share(0);

    pub fn of_percent(value: f64) -> Result<Self, String> {
        if !(0.0..=100.0).contains(&value) {
            return Err(format!("percentage {value} is not between 0 and 100"));
        }
        Ok(Share((value * 10_000.0).round() as u32))
    }

    /// Whether this request is one of the share (a fresh random draw each time).
    pub fn draw(self) -> bool {
        self.0 >= Self::ALL.0 || (self.0 > 0 && fastrand::u32(0..Self::ALL.0) < self.0)
    }

    pub fn percent(self) -> f64 {
        f64::from(self.0) / 10_000.0
    }
}

/// `percentage: {value: 12.5}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PercentDoc {
    #[serde(default)]
    value: f64,
}

impl PercentDoc {
    pub fn share(&self) -> Result<Share, String> {
        Share::of_percent(self.value)
    }
}

/// A host a VirtualService or DestinationRule names, resolved as Istio resolves it: a short
/// name in the resource's own namespace, anything with a dot as written, `*.suffix` and `*` as
/// wildcards, and an IP address (a Service's cluster IP).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    /// A lower-case fully qualified name.
    Exact(String),
    /// `*.example.com`: this suffix (with its leading dot).
    Suffix(String),
    /// `*`.
    Any,
    Ip(IpAddr),
}

impl HostPattern {
    /// Resolves `host` as written in a resource of `namespace`.
    pub fn resolve(host: &str, namespace: &str) -> Result<Self, String> {
        let h = host.trim().trim_end_matches('.').to_ascii_lowercase();
        if h.is_empty() {
            return Err("an empty host".into());
        }
        if let Ok(ip) = h.parse::<IpAddr>() {
            return Ok(HostPattern::Ip(ip));
        }
        if h == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(suffix) = h.strip_prefix('*') {
            if !suffix.starts_with('.') || suffix.len() < 2 || suffix.contains('*') {
                return Err(format!(
                    "host {host:?}: a wildcard must be `*` or `*.<domain>`"
                ));
            }
            check_dns(&suffix[1..], host)?;
            return Ok(HostPattern::Suffix(suffix.to_owned()));
        }
        check_dns(&h, host)?;
        if h.contains('.') {
            Ok(HostPattern::Exact(h))
        } else {
            Ok(HostPattern::Exact(service_fqdn(&h, namespace)))
        }
    }

    /// Whether this pattern names `fqdn` (or, for an address, `vip`). Specificity: exact names
    /// and addresses beat suffixes, longer suffixes beat shorter ones, `*` comes last.
    pub fn specificity(&self, fqdn: &str, vips: &[IpAddr]) -> Option<usize> {
        match self {
            HostPattern::Exact(h) => (h == fqdn).then_some(usize::MAX),
            HostPattern::Ip(ip) => vips.contains(ip).then_some(usize::MAX),
            HostPattern::Suffix(s) => fqdn.ends_with(s.as_str()).then_some(s.len()),
            HostPattern::Any => Some(0),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Suffix(s) => write!(f, "*{s}"),
            HostPattern::Any => f.write_str("*"),
            HostPattern::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

fn check_dns(name: &str, host: &str) -> Result<(), String> {
    let ok = name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("host {host:?} is not a DNS name"))
    }
}

/// `<name>.<namespace>.svc.cluster.local`.
pub fn service_fqdn(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}")
}

/// Which namespaces see a resource (`exportTo`): absent or `*` is every namespace, `.` its
/// own, and names the ones named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportTo {
    All,
    Namespaces(Vec<String>),
}

impl ExportTo {
    pub fn parse(values: Option<Vec<String>>, own: &str) -> Result<Self, String> {
        let Some(values) = values.filter(|v| !v.is_empty()) else {
            return Ok(ExportTo::All);
        };
        let mut out = Vec::new();
        for v in values {
            match v.as_str() {
                "*" => return Ok(ExportTo::All),
                "." => out.push(own.to_owned()),
                name if !name.is_empty()
                    && name.len() <= 63
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
                {
                    out.push(name.to_owned())
                }
                other => {
                    return Err(format!(
                        "exportTo {other:?} is not `*`, `.` or a namespace name"
                    ))
                }
            }
        }
        Ok(ExportTo::Namespaces(out))
    }

    pub fn visible_to(&self, namespace: &str) -> bool {
        match self {
            ExportTo::All => true,
            ExportTo::Namespaces(n) => n.iter().any(|n| n == namespace),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_istio_reads_them() {
        let ms = |t: &str| IstioDuration::parse(t).map(|d| d.0.as_millis());
        assert_eq!(ms("7s"), Ok(7000));
        assert_eq!(ms("1.5s"), Ok(1500));
        assert_eq!(ms("100ms"), Ok(100));
        assert_eq!(ms("1m30s"), Ok(90_000));
        assert_eq!(ms("2h"), Ok(7_200_000));
        assert_eq!(ms("0s"), Ok(0));
        for bad in ["", "7", "-1s", "1x", "1.5ms", "s", "10 s"] {
            assert!(IstioDuration::parse(bad).is_err(), "{bad:?}");
        }
        assert!(IstioDuration::parse("0s")
            .unwrap()
            .positive("interval")
            .is_err());
    }

    #[test]
    fn shares_are_millionths() {
        assert_eq!(Share::of_percent(100.0), Ok(Share::ALL));
        assert_eq!(Share::of_percent(0.1), Ok(Share(1000)));
        assert!(Share::of_percent(100.5).is_err());
        assert!(Share::ALL.draw() && !Share::NONE.draw());
    }

    #[test]
    fn hosts_resolve_in_their_namespace() {
        let r = |h: &str| HostPattern::resolve(h, "bookinfo");
        assert_eq!(
            r("reviews"),
            Ok(HostPattern::Exact(
                "reviews.bookinfo.svc.cluster.local".into()
            ))
        );
        assert_eq!(
            r("Reviews.Default.svc.cluster.local."),
            Ok(HostPattern::Exact(
                "reviews.default.svc.cluster.local".into()
            ))
        );
        assert_eq!(
            r("*.default.svc.cluster.local"),
            Ok(HostPattern::Suffix(".default.svc.cluster.local".into()))
        );
        assert_eq!(r("*"), Ok(HostPattern::Any));
        assert_eq!(
            r("10.96.0.12"),
            Ok(HostPattern::Ip("10.96.0.12".parse().unwrap()))
        );
        for bad in ["", "a*b", "*foo", "foo..bar", "with space"] {
            assert!(r(bad).is_err(), "{bad:?}");
        }
        let fqdn = "reviews.default.svc.cluster.local";
        let exact = r(fqdn).unwrap().specificity(fqdn, &[]);
        let suffix = r("*.svc.cluster.local").unwrap().specificity(fqdn, &[]);
        let any = r("*").unwrap().specificity(fqdn, &[]);
        assert!(exact > suffix && suffix > any && any == Some(0));
        assert_eq!(
            r("*.other.svc.cluster.local")
                .unwrap()
                .specificity(fqdn, &[]),
            None
        );
    }

    #[test]
    fn export_to_names_namespaces() {
        let e = ExportTo::parse(Some(vec![".".into(), "web".into()]), "shop").unwrap();
        assert!(e.visible_to("shop") && e.visible_to("web") && !e.visible_to("other"));
        assert_eq!(ExportTo::parse(None, "shop"), Ok(ExportTo::All));
        assert_eq!(
            ExportTo::parse(Some(vec!["*".into()]), "shop"),
            Ok(ExportTo::All)
        );
        assert!(ExportTo::parse(Some(vec!["~".into()]), "shop").is_err());
    }
}
