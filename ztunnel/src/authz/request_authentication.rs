//! Istio's `RequestAuthentication`: which end-user JWTs a workload accepts.
//!
//! As in Istio: a request without a token goes on with no request principal; a request with a
//! token must carry one that validates against a rule of its issuer (signature from the rule's
//! JWKS, `exp`/`nbf` with 60 s of leeway, audience if the rule names audiences), or it is
//! answered `401` even when no AuthorizationPolicy exists. A valid token gives the request
//! `request.auth.principal` (`iss/sub`), audiences, presenter (`azp`) and claims.
//!
//! Tokens are looked for where each rule says (`fromHeaders` with a prefix, `fromParams`,
//! `fromCookies`), by default in `Authorization: Bearer …` and the `access_token` parameter.
//! `alg: none` never validates (it is not an algorithm here), and a key only verifies the
//! algorithms of its own family (no HMAC with an RSA public key).
use std::collections::HashSet;

use base64::Engine as _;
use jsonwebtoken::{
    jwk::{Jwk, JwkSet},
    Algorithm, DecodingKey, Validation,
};
use serde::Deserialize;

use super::{authorization_policy::Target, matching::RequestAuth};
use crate::model::Origin;

/// Where a token may be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenLocation {
    /// A header (lower-case name) and the prefix before the token (`Bearer `).
    Header {
        name: String,
        prefix: String,
    },
    /// A query parameter.
    Param(String),
    Cookie(String),
}

/// Where a rule's keys come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Keys {
    Inline(std::sync::Arc<JwkSet>),
    /// Fetched (and refreshed) by the proxy.
    Uri(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct JwtRule {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: Keys,
    pub locations: Vec<TokenLocation>,
    pub forward_original_token: bool,
    pub output_payload_to_header: Option<String>,
    /// (header, claim) pairs.
    pub output_claim_to_headers: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RequestAuthentication {
    pub namespace: String,
    pub name: String,
    pub target: Target,
    pub rules: Vec<JwtRule>,
    pub origin: Origin,
}

impl RequestAuthentication {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

// ---- the YAML as written --------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpecDoc {
    selector: Option<super::authorization_policy::SelectorDoc>,
    target_ref: Option<super::authorization_policy::TargetRefDoc>,
    target_refs: Option<Vec<super::authorization_policy::TargetRefDoc>>,
    jwt_rules: Option<Vec<JwtRuleDoc>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JwtRuleDoc {
    issuer: Option<String>,
    audiences: Option<Vec<String>>,
    jwks_uri: Option<String>,
    jwks: Option<String>,
    from_headers: Option<Vec<HeaderDoc>>,
    from_params: Option<Vec<String>>,
    from_cookies: Option<Vec<String>>,
    output_payload_to_header: Option<String>,
    #[serde(default)]
    forward_original_token: bool,
    output_claim_to_headers: Option<Vec<ClaimHeaderDoc>>,
    /// The JWKS fetch timeout.
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderDoc {
    name: String,
    #[serde(default)]
    prefix: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimHeaderDoc {
    header: String,
    claim: String,
}

impl SpecDoc {
    pub fn into_policy(
        self,
        namespace: String,
        name: String,
        origin: Origin,
    ) -> Result<RequestAuthentication, String> {
        let target = super::authorization_policy::target_of(
            &namespace,
            self.selector,
            self.target_ref,
            self.target_refs,
        )?;
        let mut rules = Vec::new();
        for (i, r) in self.jwt_rules.unwrap_or_default().into_iter().enumerate() {
            rules.push(r.compile().map_err(|e| format!("jwtRules[{i}]: {e}"))?);
        }
        Ok(RequestAuthentication {
            namespace,
            name,
            target,
            rules,
            origin,
        })
    }
}

impl JwtRuleDoc {
    fn compile(self) -> Result<JwtRule, String> {
        let issuer = self
            .issuer
            .filter(|i| !i.is_empty())
            .ok_or("issuer is required")?;
        let keys = match (self.jwks, self.jwks_uri) {
            (Some(_), Some(_)) => return Err("set jwks or jwksUri, not both".into()),
            (Some(text), None) => {
                let set: JwkSet = serde_json::from_str(&text)
                    .map_err(|e| format!("jwks is not a JSON Web Key Set: {e}"))?;
                for k in &set.keys {
                    DecodingKey::from_jwk(k).map_err(|e| format!("jwks: unusable key: {e}"))?;
                }
                Keys::Inline(std::sync::Arc::new(set))
            }
            (None, Some(uri)) => {
                if !(uri.starts_with("http://") || uri.starts_with("https://")) {
                    return Err(format!("jwksUri {uri:?} is not an http(s) URL"));
                }
                Keys::Uri(uri)
            }
            (None, None) => return Err(
                "jwks or jwksUri is required (OpenID discovery from the issuer is not supported)"
                    .into(),
            ),
        };
        if let Some(t) = &self.timeout {
            if !t.ends_with('s') || t.trim_end_matches('s').parse::<f64>().is_err() {
                return Err(format!("timeout {t:?} is not a duration like 5s"));
            }
        }
        let mut locations = Vec::new();
        for h in self.from_headers.unwrap_or_default() {
            if h.name.is_empty() {
                return Err("fromHeaders: a header needs a name".into());
            }
            locations.push(TokenLocation::Header {
                name: h.name.to_ascii_lowercase(),
                prefix: h.prefix,
            });
        }
        locations.extend(
            self.from_params
                .unwrap_or_default()
                .into_iter()
                .map(TokenLocation::Param),
        );
        locations.extend(
            self.from_cookies
                .unwrap_or_default()
                .into_iter()
                .map(TokenLocation::Cookie),
        );
        if locations.is_empty() {
            locations = vec![
                TokenLocation::Header {
                    name: "authorization".into(),
                    prefix: "Bearer ".into(),
                },
                TokenLocation::Param("access_token".into()),
            ];
        }
        Ok(JwtRule {
            issuer,
            audiences: self.audiences.unwrap_or_default(),
            keys,
            locations,
            forward_original_token: self.forward_original_token,
            output_payload_to_header: self.output_payload_to_header,
            output_claim_to_headers: self
                .output_claim_to_headers
                .unwrap_or_default()
                .into_iter()
                .map(|c| (c.header.to_ascii_lowercase(), c.claim))
                .collect(),
        })
    }
}

// ---- validation ---------------------------------------------------------------------------

/// What the request looks like to token extraction.
pub struct TokenSource<'a> {
    /// (lower-case name, value) pairs, repeated names allowed.
    pub headers: &'a [(String, String)],
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
}

impl TokenSource<'_> {
    fn find(&self, location: &TokenLocation) -> Option<String> {
        match location {
            TokenLocation::Header { name, prefix } => self
                .headers
                .iter()
                .filter(|(n, _)| n == name)
                .find_map(|(_, v)| v.strip_prefix(prefix.as_str()))
                .map(|t| t.trim().to_owned()),
            TokenLocation::Param(name) => self.query?.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == name).then(|| v.to_owned())
            }),
            TokenLocation::Cookie(name) => self
                .headers
                .iter()
                .filter(|(n, _)| n == "cookie")
                .flat_map(|(_, v)| v.split(';'))
                .find_map(|c| {
                    let (k, v) = c.trim().split_once('=')?;
                    (k == name).then(|| v.to_owned())
                }),
        }
    }
}

/// Header changes a validated token asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    /// Headers to remove (the token's, unless `forwardOriginalToken`).
    pub remove: Vec<String>,
    /// Headers to set.
    pub set: Vec<(String, String)>,
}

/// The outcome of [`authenticate`].
#[derive(Clone, Debug)]
pub enum JwtOutcome {
    /// No token where any rule looks: the request goes on without a request principal.
    NoToken,
    Valid(RequestAuth, HeaderEdits),
    /// Answer 401.
    Invalid(JwtError),
}

/// What is wrong with a refused token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JwtFailure {
    /// Not a JWT at all (no readable issuer).
    Malformed,
    /// No rule of the workload names its issuer.
    UnknownIssuer,
    /// The issuer's key set could not be had (a `jwksUri` that could not be fetched).
    JwksUnavailable,
    /// No key of the set has the token's `kid` and algorithm: a key that rotated in since
    /// the set was fetched, which is worth one refetch.
    UnknownKey,
    Expired,
    NotYetValid,
    Audience,
    Signature,
    /// Anything else about its header, signature or claims.
    Invalid,
}

impl JwtFailure {
    /// The `reason` label of `ztunnel_jwt_failures_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            JwtFailure::Expired => "expired",
            JwtFailure::NotYetValid => "not_yet_valid",
            JwtFailure::Audience => "audience",
            JwtFailure::UnknownIssuer => "unknown_issuer",
            JwtFailure::JwksUnavailable => "jwks_unavailable",
            JwtFailure::Signature => "signature",
            JwtFailure::Malformed | JwtFailure::UnknownKey | JwtFailure::Invalid => "invalid",
        }
    }

    fn of(e: &jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::ExpiredSignature => JwtFailure::Expired,
            K::ImmatureSignature => JwtFailure::NotYetValid,
            K::InvalidAudience => JwtFailure::Audience,
            K::InvalidSignature => JwtFailure::Signature,
            _ => JwtFailure::Invalid,
        }
    }
}

/// A refused token: what is wrong with it, and the message for logs and the caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JwtError {
    pub kind: JwtFailure,
    message: String,
}

impl JwtError {
    fn new(kind: JwtFailure, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The `iss` of a token, read before it is verified (to pick the rule).
fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

fn family(alg: Algorithm) -> u8 {
    use Algorithm::*;
    match alg {
        HS256 | HS384 | HS512 => 0,
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => 1,
        ES256 | ES384 => 2,
        EdDSA => 3,
    }
}

fn key_family(jwk: &Jwk) -> u8 {
    use jsonwebtoken::jwk::AlgorithmParameters::*;
    match &jwk.algorithm {
        OctetKey(_) => 0,
        RSA(_) => 1,
        EllipticCurve(_) => 2,
        OctetKeyPair(_) => 3,
    }
}

/// How far `exp` and `nbf` may be off.
const LEEWAY_SECS: u64 = 60;

/// Verifies `token` with the keys of `rule`.
fn verify(token: &str, rule: &JwtRule, keys: &JwkSet) -> Result<serde_json::Value, JwtError> {
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| JwtError::new(JwtFailure::Invalid, format!("Jwt header is not valid: {e}")))?;
    let mut validation = Validation::new(header.alg);
    validation.leeway = LEEWAY_SECS;
    validation.required_spec_claims = HashSet::new();
    validation.validate_nbf = true;
    validation.set_issuer(&[rule.issuer.as_str()]);
    if rule.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&rule.audiences);
    }
    let candidates: Vec<&Jwk> = keys
        .keys
        .iter()
        .filter(|k| header.kid.is_none() || k.common.key_id == header.kid)
        .filter(|k| key_family(k) == family(header.alg))
        .filter(|k| {
            k.common
                .key_algorithm
                .is_none_or(|a| a.to_string() == format!("{:?}", header.alg))
        })
        .collect();
    if candidates.is_empty() {
        return Err(JwtError::new(
            JwtFailure::UnknownKey,
            format!(
                "Jwt verification fails: no key for kid {:?} and algorithm {:?}",
                header.kid, header.alg
            ),
        ));
    }
    let mut last = JwtError::new(JwtFailure::Invalid, "");
    for jwk in candidates {
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| JwtError::new(JwtFailure::Invalid, format!("unusable key: {e}")))?;
        match jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation) {
            Ok(data) => return registered_claims(&data.claims, rule).map(|()| data.claims),
            Err(e) => {
                last = JwtError::new(JwtFailure::of(&e), format!("Jwt verification fails: {e}"))
            }
        }
    }
    Err(last)
}

/// What jsonwebtoken leaves unchecked: it skips an `exp` or `nbf` that is not a number or is
/// beyond `u64` (an `nbf` of 1e100 would not hold a token back) and an `aud` that is absent or
/// not a string or list of strings, which would let a token never expire, be used too early or
/// pass a rule that names audiences. Istio refuses such tokens, and so does this.
fn registered_claims(claims: &serde_json::Value, rule: &JwtRule) -> Result<(), JwtError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let leeway = LEEWAY_SECS as f64;
    for name in ["exp", "nbf"] {
        let Some(t) = claims.get(name) else { continue };
        let t = t.as_f64().filter(|t| *t >= 0.0).ok_or_else(|| {
            JwtError::new(
                JwtFailure::Invalid,
                format!("Jwt {name} is not a NumericDate"),
            )
        })?;
        if name == "exp" && t < now - leeway {
            let message = "Jwt verification fails: ExpiredSignature";
            return Err(JwtError::new(JwtFailure::Expired, message));
        }
        if name == "nbf" && t > now + leeway {
            let message = "Jwt verification fails: ImmatureSignature";
            return Err(JwtError::new(JwtFailure::NotYetValid, message));
        }
    }
    let malformed = || {
        let message = "Jwt aud is not a string or a list of strings";
        JwtError::new(JwtFailure::Invalid, message)
    };
    let audiences: Vec<&str> = match claims.get("aud") {
        None => Vec::new(),
        Some(serde_json::Value::String(a)) => vec![a.as_str()],
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .map(serde_json::Value::as_str)
            .collect::<Option<_>>()
            .ok_or_else(malformed)?,
        Some(_) => return Err(malformed()),
    };
    if !rule.audiences.is_empty()
        && !audiences
            .iter()
            .any(|a| rule.audiences.iter().any(|r| r == a))
    {
        let message = "Jwt verification fails: InvalidAudience";
        return Err(JwtError::new(JwtFailure::Audience, message));
    }
    Ok(())
}

/// Authenticates a request against the `rules` of the RequestAuthentications that apply to its
/// workload; `keys` gives a rule's key set (`None`: not available, e.g. a jwksUri that could
/// not be fetched, which fails the token).
pub fn authenticate<'a>(
    rules: &[&'a JwtRule],
    source: &TokenSource<'_>,
    keys: impl Fn(&'a JwtRule) -> Option<std::sync::Arc<JwkSet>>,
) -> JwtOutcome {
    // The first token found, in the rules' order, and where.
    let mut found = None;
    'rules: for rule in rules {
        for loc in &rule.locations {
            if let Some(t) = source.find(loc) {
                found = Some((t, loc.clone()));
                break 'rules;
            }
        }
    }
    let Some((token, location)) = found else {
        return JwtOutcome::NoToken;
    };
    let Some(issuer) = unverified_issuer(&token) else {
        let message = "Jwt is not in a valid format";
        return JwtOutcome::Invalid(JwtError::new(JwtFailure::Malformed, message));
    };
    let mut candidates = rules
        .iter()
        .filter(|r| r.issuer == issuer && r.locations.contains(&location))
        .peekable();
    if candidates.peek().is_none() {
        let message = format!("Jwt issuer {issuer:?} is not configured");
        return JwtOutcome::Invalid(JwtError::new(JwtFailure::UnknownIssuer, message));
    }
    let mut last = JwtError::new(JwtFailure::Invalid, "");
    for rule in candidates {
        let Some(set) = keys(rule) else {
            let message = format!("Jwks for issuer {issuer:?} is not available");
            last = JwtError::new(JwtFailure::JwksUnavailable, message);
            continue;
        };
        match verify(&token, rule, &set) {
            Ok(claims) => return valid(rule, &token, &location, claims),
            Err(e) => last = e,
        }
    }
    JwtOutcome::Invalid(last)
}

fn valid(
    rule: &JwtRule,
    token: &str,
    location: &TokenLocation,
    claims: serde_json::Value,
) -> JwtOutcome {
    let text = |v: Option<&serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Null) | None => None,
        Some(other) => Some(other.to_string()),
    };
    let audiences = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => vec![a.clone()],
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let auth = RequestAuth {
        principal: format!(
            "{}/{}",
            rule.issuer,
            text(claims.get("sub")).unwrap_or_default()
        ),
        audiences,
        presenter: text(claims.get("azp")),
        claims: claims.clone(),
    };
    let mut edits = HeaderEdits::default();
    if !rule.forward_original_token {
        if let TokenLocation::Header { name, .. } = location {
            edits.remove.push(name.clone());
        }
    }
    if let Some(h) = &rule.output_payload_to_header {
        if let Some(payload) = token.split('.').nth(1) {
            edits.set.push((h.to_ascii_lowercase(), payload.to_owned()));
        }
    }
    for (header, claim) in &rule.output_claim_to_headers {
        if let Some(v) = text(claims.get(claim)) {
            edits.set.push((header.clone(), v));
        }
    }
    JwtOutcome::Valid(auth, edits)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    /// An ES256 signing key and its JWKS (kid `k1`), as an identity provider would have.
    pub(crate) struct Issuer {
        pub key: EncodingKey,
        pub jwks: String,
        pub public_der: Vec<u8>,
    }

    pub(crate) fn issuer() -> Issuer {
        let kp = rcgen::KeyPair::generate().unwrap();
        let raw = kp.public_key_raw();
        let (x, y) = (&raw[1..33], &raw[33..65]);
        let jwks = json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
        }]})
        .to_string();
        Issuer {
            key: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwks,
            public_der: kp.public_key_der(),
        }
    }

    pub(crate) fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    pub(crate) fn token(i: &Issuer, claims: serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(&h, &claims, &i.key).unwrap()
    }

    fn rule(i: &Issuer, extra: &str) -> JwtRule {
        let spec = format!(
            "jwtRules:\n- issuer: auth@istioinaction.io\n  jwks: '{}'\n{extra}",
            i.jwks
        );
        let doc: SpecDoc = serde_yaml::from_str(&spec).unwrap();
        let mut ra = doc
            .into_policy("shop".into(), "jwt".into(), Origin::default())
            .unwrap();
        ra.rules.remove(0)
    }

    fn run(rule: &JwtRule, headers: &[(&str, &str)], query: Option<&str>) -> JwtOutcome {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let source = TokenSource {
            headers: &headers,
            query,
        };
        authenticate(&[rule], &source, |r| match &r.keys {
            Keys::Inline(set) => Some(Arc::clone(set)),
            Keys::Uri(_) => None,
        })
    }

    fn claims(exp_in: i64) -> serde_json::Value {
        json!({"iss": "auth@istioinaction.io", "sub": "user", "aud": ["webapp", "other"],
               "azp": "cli", "group": "admin", "exp": now() + exp_in})
    }

    #[test]
    fn a_valid_token_gives_the_request_principal_and_claims() {
        let i = issuer();
        let r = rule(
            &i,
            "  audiences: [webapp]\n  outputClaimToHeaders: [{header: x-group, claim: group}]\n  outputPayloadToHeader: x-payload\n",
        );
        let t = token(&i, claims(600));
        let JwtOutcome::Valid(auth, edits) =
            run(&r, &[("authorization", &format!("Bearer {t}"))], None)
        else {
            panic!("valid token refused")
        };
        assert_eq!(auth.principal, "auth@istioinaction.io/user");
        assert_eq!(auth.audiences, ["webapp", "other"]);
        assert_eq!(auth.presenter.as_deref(), Some("cli"));
        assert_eq!(auth.claims["group"], "admin");
        assert_eq!(edits.remove, ["authorization"], "not forwarded by default");
        assert!(edits.set.contains(&("x-group".into(), "admin".into())));
        assert!(edits.set.iter().any(|(h, _)| h == "x-payload"));
        // The access_token parameter is the other default location.
        assert!(matches!(
            run(&r, &[], Some(&format!("a=1&access_token={t}"))),
            JwtOutcome::Valid(..)
        ));
        let fwd = rule(&i, "  forwardOriginalToken: true\n");
        let JwtOutcome::Valid(_, edits) =
            run(&fwd, &[("authorization", &format!("Bearer {t}"))], None)
        else {
            panic!()
        };
        assert!(edits.remove.is_empty());
    }

    #[test]
    fn no_token_is_not_an_error() {
        let i = issuer();
        let r = rule(&i, "");
        assert!(matches!(run(&r, &[("x", "y")], None), JwtOutcome::NoToken));
        // Only the rule's locations count once fromHeaders is set.
        let custom = rule(&i, "  fromHeaders: [{name: x-jwt, prefix: \"Token \"}]\n");
        let t = token(&i, claims(600));
        assert!(matches!(
            run(&custom, &[("authorization", &format!("Bearer {t}"))], None),
            JwtOutcome::NoToken
        ));
        assert!(matches!(
            run(&custom, &[("x-jwt", &format!("Token {t}"))], None),
            JwtOutcome::Valid(..)
        ));
    }

    #[test]
    fn bad_tokens_are_refused() {
        let i = issuer();
        let other = issuer();
        let r = rule(&i, "  audiences: [webapp]\n");
        let bearer = |t: &str| format!("Bearer {t}");
        let refused = |t: String| match run(&r, &[("authorization", &bearer(&t))], None) {
            JwtOutcome::Invalid(e) => e,
            o => panic!("accepted: {o:?}"),
        };
        let invalid = |t: String| refused(t).to_string();
        let kind = |t: String| refused(t).kind;
        assert!(invalid(token(&i, claims(-3600))).contains("Expired"));
        assert_eq!(kind(token(&i, claims(-3600))), JwtFailure::Expired);
        let mut future = claims(600);
        future["nbf"] = json!(now() + 3600);
        assert!(invalid(token(&i, future)).contains("Immature"));
        let mut aud = claims(600);
        aud["aud"] = json!("someone-else");
        assert!(invalid(token(&i, aud)).contains("Audience"));
        let mut iss = claims(600);
        iss["iss"] = json!("evil");
        assert!(invalid(token(&i, iss.clone())).contains("not configured"));
        assert_eq!(kind(token(&i, iss)), JwtFailure::UnknownIssuer);
        // Signed by another key with the same kid.
        assert!(invalid(token(&other, claims(600))).contains("InvalidSignature"));
        // Tampered payload.
        let t = token(&i, claims(600));
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        let mut c = claims(600);
        c["group"] = json!("root");
        parts[1] = URL_SAFE_NO_PAD.encode(c.to_string());
        assert!(invalid(parts.join(".")).contains("fails"));
        // alg none: no signature at all.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims(600).to_string())
        );
        invalid(none);
        // Algorithm confusion: HS256 keyed with the issuer's public key.
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        let forged =
            jsonwebtoken::encode(&h, &claims(600), &EncodingKey::from_secret(&i.public_der))
                .unwrap();
        assert!(invalid(forged.clone()).contains("no key"));
        assert_eq!(kind(forged), JwtFailure::UnknownKey);
        assert!(invalid("not.a.jwt".into()).contains("format"));
    }

    /// Found by the `jwt` fuzz target: jsonwebtoken skipped these claims instead of refusing
    /// the token, so an `exp` written as a string never expired, an `nbf` too large for it
    /// did not hold the token back, and a rule's audiences let through a token without a
    /// usable `aud`.
    #[test]
    fn malformed_time_and_audience_claims_are_refused() {
        let i = issuer();
        let with_aud = rule(&i, "  audiences: [webapp]\n");
        let any_aud = rule(&i, "");
        let base = || json!({"iss": "auth@istioinaction.io", "sub": "user", "aud": "webapp"});
        let outcome = |r: &JwtRule, c: &serde_json::Value| {
            let bearer = format!("Bearer {}", token(&i, c.clone()));
            run(r, &[("authorization", &bearer)], None)
        };
        for (claim, value) in [
            ("exp", json!("1000000000")),
            ("exp", json!(-1)),
            ("exp", json!(null)),
            ("nbf", json!("4102444800")),
            ("nbf", json!([1])),
            ("nbf", json!(4.1e137)),
            ("aud", json!(5)),
            ("aud", json!(null)),
            ("aud", json!(["webapp", 5])),
        ] {
            let mut c = base();
            c[claim] = value.clone();
            for r in [&with_aud, &any_aud] {
                assert!(
                    matches!(outcome(r, &c), JwtOutcome::Invalid(_)),
                    "{claim}: {value} accepted"
                );
            }
        }
        // No aud: fine where the rule names no audiences, refused where it does.
        let mut c = base();
        c.as_object_mut().unwrap().remove("aud");
        assert!(matches!(outcome(&any_aud, &c), JwtOutcome::Valid(..)));
        assert!(
            matches!(outcome(&with_aud, &c), JwtOutcome::Invalid(r) if r.to_string().contains("InvalidAudience") && r.kind == JwtFailure::Audience)
        );
        // Fractional times are NumericDates too.
        let mut c = base();
        c["exp"] = json!(now() as f64 + 600.5);
        c["aud"] = json!(["other", "webapp"]);
        assert!(matches!(outcome(&with_aud, &c), JwtOutcome::Valid(..)));
    }

    #[test]
    fn bad_rules_are_refused() {
        for (spec, expect) in [
            ("jwtRules: [{jwks: '{\"keys\":[]}'}]", "issuer is required"),
            ("jwtRules: [{issuer: a}]", "jwks or jwksUri is required"),
            (
                "jwtRules: [{issuer: a, jwks: 'nope'}]",
                "not a JSON Web Key Set",
            ),
            (
                "jwtRules: [{issuer: a, jwksUri: 'ftp://x'}]",
                "not an http(s) URL",
            ),
            (
                "jwtRules: [{issuer: a, jwksUri: 'http://x', jwks: '{}'}]",
                "not both",
            ),
            (
                "jwtRules: [{issuer: a, jwksUri: 'http://x', fromHeader: []}]",
                "unknown field",
            ),
            (
                "jwtRules: [{issuer: a, jwksUri: 'http://x', timeout: soon}]",
                "duration",
            ),
        ] {
            let e = serde_yaml::from_str::<SpecDoc>(spec)
                .map_err(|e| e.to_string())
                .and_then(|d| d.into_policy("a".into(), "b".into(), Origin::default()))
                .unwrap_err();
            assert!(e.contains(expect), "{spec}: {e}");
        }
    }
}
