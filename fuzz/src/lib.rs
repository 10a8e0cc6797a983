//! What the fuzz targets share: fixed test keys, the RequestAuthentication configuration built
//! from them, token signing and an independent signature check for the oracles.
//!
//! The keys below were made for these targets and sign nothing else; they are public test
//! material, like the keys in the proxy's unit tests.
use std::path::Path;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine as _};
use ring::{
    hmac,
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair as _},
};
use ztunnel::{
    authz::request_authentication::{JwtRule, Keys, TokenLocation},
    model::Pod,
    state::{MeshSettings, Objects, Snapshot},
};

/// A P-256 key (PKCS#8), the identity provider of issuer [`ES_ISSUER`] (kid `k1`).
const ES256_PKCS8_PEM: &str = "\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgxGP2YcSREnG331/X
mttVVSqXZs/79FcNJDGSOhU8wHOhRANCAASePFEUYFwkhnf5EFICE7LqTPCRHl3+
He/RAGE+rD+GJ1wth3TonMzCaAKkA8R9FbNBoEZ8p/SPXvi1FJyobqXo";

/// The HS256 secret of issuer [`HS_ISSUER`] (kid `h1`).
pub const HMAC_SECRET: &[u8] = b"ztunnel fuzzing secret, not used anywhere else";

/// The modulus of an RSA key whose private half was thrown away: RS256 tokens can be parsed
/// and checked against it, never signed.
const RSA_N: &str = "8BTuzs8HDV1TbQ3OQhMFY0rdRSeX4Bu7ki4tkHs4g_NdM-Fb9a4vcqhpWO49fH0q2JfaR5BCuTwjJq2wrgA38r0Jb7lNl1RIy1nv4a1x30th9seedkECu6Nv1uLWnRvyehsfwlQKiBqvq9RNxnlIgBQMOnBawHAGnPvNYlNytFR06w9RnltucVueqKYH-MAm6-EYWTaLvjCjOUfuvKf-LwAmc-hPErD8FX750wWCvtrUq2vM49LOKJBYIgmuONrY2UAi5VBeBfa3raQsvkqJHjU4agyVUsbCyDLNE3tSZj6tMdDNBEBWUrzZCqubj1NZs39n3cogq7RBcKzc0wP-mQ";

pub const ES_ISSUER: &str = "es@fuzz.test";
pub const HS_ISSUER: &str = "hs@fuzz.test";
pub const RSA_ISSUER: &str = "rsa@fuzz.test";
/// A rule whose keys come from a jwksUri that is never fetched (its tokens must fail).
pub const REMOTE_ISSUER: &str = "remote@fuzz.test";
/// The audiences the ES256 rule requires.
pub const ES_AUDIENCES: [&str; 2] = ["webapp", "api"];

fn es256_pkcs8() -> Vec<u8> {
    let b64: String = ES256_PKCS8_PEM.lines().collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("the test key is base64")
}

fn es256_key() -> EcdsaKeyPair {
    EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &es256_pkcs8(),
        &SystemRandom::new(),
    )
    .expect("the test key is a P-256 PKCS#8 key")
}

/// The uncompressed public point (0x04 || x || y) of the ES256 key.
fn es256_public() -> Vec<u8> {
    es256_key().public_key().as_ref().to_vec()
}

/// The configuration the JWT target authenticates against: one pod and a RequestAuthentication
/// per key, written as an operator would (inline JWKS, header, parameter and cookie locations).
pub fn jwt_config() -> String {
    let public = es256_public();
    let es_jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
        "x": B64.encode(&public[1..33]), "y": B64.encode(&public[33..65]),
    }]});
    let hs_jwks = serde_json::json!({"keys": [{
        "kty": "oct", "kid": "h1", "alg": "HS256", "k": B64.encode(HMAC_SECRET),
    }]});
    let rsa_jwks = serde_json::json!({"keys": [{
        "kty": "RSA", "kid": "r1", "alg": "RS256", "n": RSA_N, "e": "AQAB",
    }]});
    let ra = |name: &str, namespace: &str, spec: String| {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
             metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}"
        )
    };
    let workload = "apiVersion: v1\n\
        kind: Namespace\n\
        metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n\
        ---\n\
        apiVersion: v1\n\
        kind: Pod\n\
        metadata: {name: web, namespace: shop, labels: {app: web}}\n\
        spec: {serviceAccountName: web, containers: [{ports: [{containerPort: 8080}]}]}\n\
        status: {podIP: 10.1.0.2}\n";
    [
        workload.to_owned(),
        ra(
            "a-es",
            "shop",
            format!(
                "  selector: {{matchLabels: {{app: web}}}}\n  jwtRules:\n  - issuer: {ES_ISSUER}\n    \
                 audiences: [{}]\n    jwks: '{es_jwks}'\n",
                ES_AUDIENCES.join(", ")
            ),
        ),
        ra(
            "b-hs",
            "shop",
            format!(
                "  jwtRules:\n  - issuer: {HS_ISSUER}\n    jwks: '{hs_jwks}'\n    \
                 fromHeaders: [{{name: x-jwt, prefix: \"Token \"}}]\n    fromParams: [jwt]\n    \
                 fromCookies: [session]\n    outputPayloadToHeader: x-jwt-payload\n    \
                 outputClaimToHeaders: [{{header: x-group, claim: group}}]\n"
            ),
        ),
        ra(
            "c-remote",
            "shop",
            format!(
                "  jwtRules:\n  - issuer: {REMOTE_ISSUER}\n    \
                 jwksUri: http://127.0.0.1:1/jwks.json\n"
            ),
        ),
        // Mesh-wide, from the root namespace.
        ra(
            "d-rsa",
            "istio-system",
            format!(
                "  jwtRules:\n  - issuer: {RSA_ISSUER}\n    jwks: '{rsa_jwks}'\n    \
                 fromHeaders: [{{name: x-rsa}}]\n"
            ),
        ),
    ]
    .concat()
}

/// The JWT rules that apply to the pod of [`jwt_config`], read through the proxy's own parser
/// and snapshot, in the order the proxy uses them.
pub fn jwt_rules() -> Vec<JwtRule> {
    let mut objects = Objects::default();
    ztunnel::config::parse_file(Path::new("jwt.yaml"), &jwt_config(), &mut objects)
        .expect("the JWT fuzzing configuration parses");
    let snapshot = Snapshot::build(1, objects, &MeshSettings::default());
    let pod: &Pod = snapshot.pods.values().next().expect("one pod");
    let rules: Vec<JwtRule> = snapshot
        .request_authentications_for(pod)
        .into_iter()
        .flat_map(|ra| ra.rules.iter().cloned())
        .collect();
    assert_eq!(rules.len(), 4, "every RequestAuthentication applies");
    assert!(rules.iter().any(|r| matches!(r.keys, Keys::Uri(_))));
    rules
}

/// The signing keys the JWT target can sign with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signer {
    Es256,
    Hs256,
}

impl Signer {
    pub fn alg(self) -> &'static str {
        match self {
            Signer::Es256 => "ES256",
            Signer::Hs256 => "HS256",
        }
    }

    pub fn issuer(self) -> &'static str {
        match self {
            Signer::Es256 => ES_ISSUER,
            Signer::Hs256 => HS_ISSUER,
        }
    }
}

/// `header.payload.signature` over the given header JSON and payload bytes (any bytes: the
/// fuzzer chooses them), signed with `signer`.
pub fn sign(signer: Signer, header: &str, payload: &[u8]) -> String {
    let input = format!("{}.{}", B64.encode(header), B64.encode(payload));
    let sig = match signer {
        Signer::Es256 => es256_key()
            .sign(&SystemRandom::new(), input.as_bytes())
            .expect("ES256 signing")
            .as_ref()
            .to_vec(),
        Signer::Hs256 => hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, HMAC_SECRET),
            input.as_bytes(),
        )
        .as_ref()
        .to_vec(),
    };
    format!("{input}.{}", B64.encode(sig))
}

/// A token that verifies, checked apart from the proxy's JWT library.
pub struct Verified {
    pub signer: Signer,
    pub header: serde_json::Value,
    pub claims: serde_json::Value,
}

/// Checks `token` (`header.payload.signature`) against the test keys with ring alone: the
/// signature must be the key's own algorithm's (ES256 or HS256) over the first two parts.
pub fn verify_independently(token: &str) -> Option<Verified> {
    let mut parts = token.split('.');
    let (h, p, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let header: serde_json::Value = serde_json::from_slice(&B64.decode(h).ok()?).ok()?;
    let sig = B64.decode(s).ok()?;
    let input = format!("{h}.{p}");
    let signer = match header.get("alg")?.as_str()? {
        "ES256" => {
            signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, es256_public())
                .verify(input.as_bytes(), &sig)
                .ok()?;
            Signer::Es256
        }
        "HS256" => {
            hmac::verify(
                &hmac::Key::new(hmac::HMAC_SHA256, HMAC_SECRET),
                input.as_bytes(),
                &sig,
            )
            .ok()?;
            Signer::Hs256
        }
        _ => return None,
    };
    let claims = serde_json::from_slice(&B64.decode(p).ok()?).ok()?;
    Some(Verified {
        signer,
        header,
        claims,
    })
}

/// The name a location looks under (header, parameter or cookie name), for the oracle.
pub fn location_name(l: &TokenLocation) -> &str {
    match l {
        TokenLocation::Header { name, .. } => name,
        TokenLocation::Param(name) | TokenLocation::Cookie(name) => name,
    }
}
