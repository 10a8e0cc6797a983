//! Istio's `StringMatch` (`exact`, `prefix` or `regex`), compiled where it is read, with the
//! meaning Istio gives it in Envoy: an empty match (`{}`) or the regex `*` asks only that the
//! value be present; a regex must match the whole value.
use serde::{de, Deserialize, Deserializer};

use super::re2::Re2;

#[derive(Clone, Debug, PartialEq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(Re2),
    /// `{}` or `regex: "*"`: any value, as long as there is one.
    Present,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.is_full_match(value),
            StringMatch::Present => true,
        }
    }

    /// `ignoreUriCase`: exact and prefix compare without case; a regex is unchanged (as in
    /// Envoy, where `case_sensitive` does not apply to `safe_regex`).
    pub fn matches_ignoring_case(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value.eq_ignore_ascii_case(s),
            StringMatch::Prefix(p) => value
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            other => other.matches(value),
        }
    }

    /// A header or query parameter rule: the value must be there and match.
    pub fn matches_present(&self, value: Option<&str>) -> bool {
        value.is_some_and(|v| self.matches(v))
    }

    /// A `withoutHeaders` rule: `{}` asks for the header's absence; any other match inverts,
    /// a missing header counting as the empty value (Envoy's `treat_missing_header_as_empty`).
    pub fn matches_absent(&self, value: Option<&str>) -> bool {
        match self {
            StringMatch::Present => value.is_none(),
            m => !m.matches(value.unwrap_or("")),
        }
    }

    /// For messages: `exact "v1"`, `prefix "/api"`, `regex "…"`, `present`.
    pub fn describe(&self) -> String {
        match self {
            StringMatch::Exact(s) => format!("exact {s:?}"),
            StringMatch::Prefix(s) => format!("prefix {s:?}"),
            StringMatch::Regex(r) => format!("regex {:?}", r.as_str()),
            StringMatch::Present => "present".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StringMatchDoc {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let doc = Option::<StringMatchDoc>::deserialize(d)?;
        let Some(doc) = doc else {
            return Ok(StringMatch::Present);
        };
        match (doc.exact, doc.prefix, doc.regex) {
            (None, None, None) => Ok(StringMatch::Present),
            (Some(e), None, None) => Ok(StringMatch::Exact(e)),
            (None, Some(p), None) => Ok(StringMatch::Prefix(p)),
            (None, None, Some(r)) if r == "*" => Ok(StringMatch::Present),
            (None, None, Some(r)) => Re2::new(&r)
                .map(StringMatch::Regex)
                .map_err(de::Error::custom),
            _ => Err(de::Error::custom(
                "a string match takes one of exact, prefix and regex",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<StringMatch, String> {
        serde_yaml::from_str(y).map_err(|e| e.to_string())
    }

    /// The match semantics, one row per case: (match, value or absent, header rule, without).
    #[test]
    fn string_match_table() {
        let rows: &[(&str, Option<&str>, bool, bool)] = &[
            ("{exact: jason}", Some("jason"), true, false),
            ("{exact: jason}", Some("Jason"), false, true),
            ("{exact: jason}", None, false, true),
            ("{exact: ''}", None, false, false),
            ("{exact: ''}", Some(""), true, false),
            ("{prefix: /api}", Some("/api/v1"), true, false),
            ("{prefix: /api}", Some("/ap"), false, true),
            ("{prefix: ''}", Some("x"), true, false),
            ("{prefix: ''}", None, false, false),
            ("{regex: 'v[12]'}", Some("v2"), true, false),
            ("{regex: 'v[12]'}", Some("v22"), false, true),
            ("{regex: '.*'}", None, false, false),
            ("{regex: '*'}", Some("anything"), true, false),
            ("{regex: '*'}", None, false, true),
            ("{}", Some(""), true, false),
            ("{}", None, false, true),
        ];
        for (m, value, present, absent) in rows {
            let sm = parse(m).unwrap();
            assert_eq!(sm.matches_present(*value), *present, "{m} on {value:?}");
            assert_eq!(
                sm.matches_absent(*value),
                *absent,
                "{m} without, on {value:?}"
            );
        }
    }

    #[test]
    fn uri_case_is_ignored_for_exact_and_prefix_only() {
        let p = parse("{prefix: /API}").unwrap();
        assert!(p.matches_ignoring_case("/api/x") && !p.matches("/api/x"));
        assert!(!p.matches_ignoring_case("/a"));
        let r = parse("{regex: '/API'}").unwrap();
        assert!(!r.matches_ignoring_case("/api"), "regexes keep their case");
        let e = parse("{exact: /Ab}").unwrap();
        assert!(e.matches_ignoring_case("/aB"));
    }

    #[test]
    fn bad_matches_are_refused() {
        assert!(parse("{exact: a, prefix: b}")
            .unwrap_err()
            .contains("one of"));
        assert!(parse("{regex: '('}").unwrap_err().contains("invalid regex"));
        assert!(parse("{suffix: a}").unwrap_err().contains("unknown field"));
    }
}
