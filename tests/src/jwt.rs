//! An identity provider for the RequestAuthentication tests: an ES256 key, its JWKS (inline in
//! a policy, or served), and end-user tokens signed with it.
use base64::Engine as _;

pub struct IdentityProvider {
    pub issuer: String,
    key: jsonwebtoken::EncodingKey,
    /// The public key as a JWKS document (kid `k1`).
    pub jwks: String,
}

impl IdentityProvider {
    pub fn new(issuer: &str) -> Self {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let kp = rcgen::KeyPair::generate().expect("key");
        let raw = kp.public_key_raw();
        let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
            "alg": "ES256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]});
        Self {
            issuer: issuer.to_owned(),
            key: jsonwebtoken::EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes())
                .expect("PKCS#8 EC key"),
            jwks: jwks.to_string(),
        }
    }

    /// A token for `sub` with a `group` claim, expiring `exp_in` seconds from now (negative:
    /// already expired).
    pub fn token(&self, sub: &str, group: &str, exp_in: i64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("k1".into());
        let claims = serde_json::json!({"iss": self.issuer, "sub": sub,
            "group": group, "exp": now + exp_in});
        jsonwebtoken::encode(&h, &claims, &self.key).expect("signing")
    }
}
