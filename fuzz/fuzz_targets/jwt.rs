//! The proxy's JWT path (RequestAuthentication): token extraction, issuer lookup, key choice,
//! signature and claim validation, as the inbound HTTP path runs it.
//!
//! Input: a flags byte, then the body.
//! * bit 0 clear: the body is the token text, as sent;
//! * bit 0 set: the body is `payload \n before \n after`: the payload bytes are signed with a
//!   test key (bit 4: ES256 or HS256; bits 5-6: the header's kid and alg) and the token is sent
//!   as `before + token + after`, so claims and their surroundings are the fuzzer's while the
//!   signature is genuine;
//! * bits 1-3: where the token is sent (header, parameter or cookie, see [`place`]).
//!
//! Nothing may panic, and a token the proxy accepts must be one it should accept: signed by
//! the key of its issuer's rule (checked with ring alone), sent where that rule looks, within
//! its `exp` and `nbf` (numbers, 60 s leeway), with one of the rule's audiences if it names any.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use ztunnel::authz::request_authentication::{
    authenticate, JwtOutcome, JwtRule, Keys, TokenSource,
};
use ztunnel_fuzz::{jwt_rules, location_name, sign, verify_independently, Signer};

/// Where the token text is sent: request headers and query, and the names it is under.
struct Placement {
    headers: Vec<(String, String)>,
    query: Option<String>,
    /// Header, parameter and cookie names the token text can be found under.
    names: Vec<String>,
}

fn place(kind: u8, text: &str) -> Placement {
    let header = |name: &str, value: String| Placement {
        headers: vec![("accept".into(), "*/*".into()), (name.into(), value)],
        query: None,
        names: vec![name.into()],
    };
    // Every name in a query or cookie list counts: the text itself may add pairs.
    let names_in = |list: &str, sep: char| -> Vec<String> {
        list.split(sep)
            .filter_map(|pair| pair.trim().split_once('='))
            .map(|(k, _)| k.to_owned())
            .collect()
    };
    let in_query = |query: String| Placement {
        headers: vec![],
        names: names_in(&query, '&'),
        query: Some(query),
    };
    match kind & 7 {
        0 => header("authorization", format!("Bearer {text}")),
        1 => in_query(format!("a=1&access_token={text}")),
        2 => header("x-jwt", format!("Token {text}")),
        3 => in_query(format!("jwt={text}&b=2")),
        4 => {
            let cookie = format!("theme=dark; session={text}");
            let mut p = header("cookie", cookie.clone());
            p.names = names_in(&cookie, ';');
            p
        }
        5 => header("x-rsa", text.to_owned()),
        6 => header("authorization", text.to_owned()),
        _ => Placement {
            headers: vec![
                ("authorization".into(), format!("Bearer {text}")),
                ("x-jwt".into(), format!("Token {text}")),
            ],
            query: None,
            names: vec!["authorization".into(), "x-jwt".into()],
        },
    }
}

fn rules() -> &'static [JwtRule] {
    static RULES: OnceLock<Vec<JwtRule>> = OnceLock::new();
    RULES.get_or_init(jwt_rules)
}

fn run(p: &Placement) -> JwtOutcome {
    let rules: Vec<&JwtRule> = rules().iter().collect();
    let source = TokenSource {
        headers: &p.headers,
        query: p.query.as_deref(),
    };
    authenticate(&rules, &source, |r| match &r.keys {
        Keys::Inline(set) => Some(set.clone()),
        Keys::Uri(_) => None,
    })
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs_f64()
}

/// Why a token with these verified claims must not be accepted by `rule`, if it must not.
/// (One second beyond the leeway, so rounding of fractional times never counts.)
fn claims_problem(claims: &Value, rule: &JwtRule) -> Option<String> {
    let Some(obj) = claims.as_object() else {
        return Some("the payload is not a JSON object".into());
    };
    if obj.get("iss").and_then(Value::as_str) != Some(rule.issuer.as_str()) {
        return Some(format!("iss is not {:?}", rule.issuer));
    }
    let now = now();
    for (claim, refused) in [("exp", -61.0), ("nbf", 61.0)] {
        match obj.get(claim) {
            None => {}
            Some(v) => match v.as_f64() {
                None => return Some(format!("{claim} {v} is not a number")),
                Some(t) if claim == "exp" && t < now + refused => {
                    return Some(format!("expired (exp {t})"))
                }
                Some(t) if claim == "nbf" && t > now + refused => {
                    return Some(format!("not valid yet (nbf {t})"))
                }
                Some(_) => {}
            },
        }
    }
    if !rule.audiences.is_empty() {
        let allowed = |a: &Value| {
            a.as_str()
                .is_some_and(|a| rule.audiences.iter().any(|r| r == a))
        };
        let ok = match obj.get("aud") {
            Some(a @ Value::String(_)) => allowed(a),
            Some(Value::Array(list)) => list.iter().any(allowed),
            _ => false,
        };
        if !ok {
            return Some(format!("aud has none of {:?}", rule.audiences));
        }
    }
    None
}

/// Panics unless an accepted token is one the proxy should accept (see the module comment).
fn check_accepted(p: &Placement, claims: &Value, principal: &str) {
    let texts = p
        .headers
        .iter()
        .map(|(_, v)| v.as_str())
        .chain(p.query.as_deref());
    let mut reasons = Vec::new();
    let jwt_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
    for candidate in texts.flat_map(|t| t.split(|c| !jwt_char(c))) {
        if candidate.matches('.').count() != 2 {
            continue;
        }
        let Some(v) = verify_independently(candidate) else {
            continue;
        };
        if &v.claims != claims {
            continue;
        }
        let rule = rules()
            .iter()
            .find(|r| r.issuer == v.signer.issuer())
            .expect("each signer has a rule");
        let sent_where_it_looks = rule
            .locations
            .iter()
            .any(|l| p.names.iter().any(|n| n == location_name(l)));
        let problem = if !sent_where_it_looks {
            Some(format!(
                "sent under {:?}, where the rule does not look",
                p.names
            ))
        } else {
            claims_problem(&v.claims, rule)
        };
        let sub = match claims.get("sub") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        match problem {
            None if principal == format!("{}/{sub}", rule.issuer) => return,
            None => reasons.push(format!("wrong principal {principal:?}")),
            Some(why) => reasons.push(format!("{:?} token: {why}", v.signer)),
        }
    }
    panic!(
        "a token was accepted that must not be: {}\nclaims {claims}\nrequest {:?} query {:?}",
        if reasons.is_empty() {
            "no part of the request verifies with a test key".to_owned()
        } else {
            reasons.join("; ")
        },
        p.headers,
        p.query
    );
}

/// The token for the signed mode: the payload signed with the key and header `flags` pick.
fn signed_token(flags: u8, payload: &[u8]) -> String {
    let signer = if flags & 0x10 == 0 {
        Signer::Es256
    } else {
        Signer::Hs256
    };
    let kid = match signer {
        Signer::Es256 => "k1",
        Signer::Hs256 => "h1",
    };
    let header = match (flags >> 5) & 3 {
        0 => json!({"alg": signer.alg(), "kid": kid}),
        1 => json!({"alg": signer.alg(), "typ": "JWT"}),
        // The key's family, another algorithm: refused by the key's own `alg`.
        2 => json!({"alg": if signer == Signer::Es256 { "ES384" } else { "HS512" }, "kid": kid}),
        _ => json!({"alg": signer.alg(), "kid": "unknown"}),
    };
    sign(signer, &header.to_string(), payload)
}

/// The harness must be able to tell valid from invalid tokens, or the run would prove nothing.
fn self_test() {
    let claims = |iss: &str, exp: f64| {
        json!({"iss": iss, "sub": "alice", "aud": "webapp", "exp": exp as u64}).to_string()
    };
    let fresh = now() + 600.0;
    let valid = [
        (0, Signer::Es256, claims(ztunnel_fuzz::ES_ISSUER, fresh)),
        (
            0x10 | 2 << 1,
            Signer::Hs256,
            claims(ztunnel_fuzz::HS_ISSUER, fresh),
        ),
    ];
    for (flags, signer, payload) in valid {
        let p = place(flags >> 1, &signed_token(flags, payload.as_bytes()));
        match run(&p) {
            JwtOutcome::Valid(auth, _) => {
                assert_eq!(auth.principal, format!("{}/alice", signer.issuer()));
                check_accepted(&p, &auth.claims, &auth.principal);
            }
            o => panic!("self-test: a valid {signer:?} token was not accepted: {o:?}"),
        }
    }
    let expired = claims(ztunnel_fuzz::ES_ISSUER, now() - 3600.0);
    let p = place(0, &signed_token(0, expired.as_bytes()));
    assert!(
        matches!(run(&p), JwtOutcome::Invalid(_)),
        "self-test: an expired token was accepted"
    );
}

fuzz_target!(
    init: {
        self_test();
    },
    |data: &[u8]| {
        let Some((&flags, body)) = data.split_first() else {
            return;
        };
        let text = if flags & 1 == 0 {
            String::from_utf8_lossy(body).into_owned()
        } else {
            let mut parts = body.splitn(3, |b| *b == b'\n');
            let payload = parts.next().unwrap_or_default();
            let before = String::from_utf8_lossy(parts.next().unwrap_or_default());
            let after = String::from_utf8_lossy(parts.next().unwrap_or_default());
            format!("{before}{}{after}", signed_token(flags, payload))
        };
        let p = place(flags >> 1, &text);
        if let JwtOutcome::Valid(auth, _) = run(&p) {
            check_accepted(&p, &auth.claims, &auth.principal);
        }
    }
);
