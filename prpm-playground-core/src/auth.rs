//! Bearer tokens: HS256 JSON Web Tokens (RFC 7519) with the claims a host needs to gate the
//! API: `sub` (the account), `role` (`user` or `admin`), `exp` and `iat` (seconds since the
//! epoch).
//!
//! Only HS256 is accepted: the header's `alg` must say so (no `none`, no other algorithm, so a
//! token cannot pick its own check). The signature is compared in constant time, then `exp` is
//! checked against the caller's clock with no leeway.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::ledger::AccountId;

/// Shortest secret accepted: 32 bytes, the hash's size (RFC 7518 §3.2).
pub const MIN_SECRET_BYTES: usize = 32;
/// Longest token read (a header line's worth): longer ones are refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 4_096;
/// Longest life a token may be minted with: one year.
pub const MAX_TTL_SECS: i64 = 366 * 86_400;

/// What a token lets its bearer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

/// A verified token's claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: AccountId,
    pub role: Role,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Issued at, seconds since the epoch.
    #[serde(default)]
    pub iat: i64,
}

/// Why a token was refused. Each is a 401 to an HTTP caller; the reason is for logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("the token's algorithm is not HS256")]
    Algorithm,
    #[error("bad signature")]
    Signature,
    #[error("the token expired")]
    Expired,
}

/// The HS256 key of a deployment.
#[derive(Clone)]
pub struct JwtKey {
    secret: Vec<u8>,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKey(***)")
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

impl JwtKey {
    /// A key of at least [`MIN_SECRET_BYTES`] bytes.
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self> {
        let secret = secret.as_ref();
        if secret.len() < MIN_SECRET_BYTES {
            return Err(Error::InvalidInput { field: "jwt_secret", reason: format!("must be at least {MIN_SECRET_BYTES} bytes") });
        }
        Ok(JwtKey { secret: secret.to_vec() })
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key length")
    }

    /// Mints a token for `sub` with `role`, valid for `ttl_secs` (1..=[`MAX_TTL_SECS`]) from `now`.
    pub fn mint(&self, sub: &AccountId, role: Role, now: DateTime<Utc>, ttl_secs: i64) -> Result<String> {
        if !(1..=MAX_TTL_SECS).contains(&ttl_secs) {
            return Err(Error::InvalidInput { field: "ttl_secs", reason: format!("must be in 1..={MAX_TTL_SECS}") });
        }
        let claims = Claims { sub: sub.clone(), role, exp: now.timestamp() + ttl_secs, iat: now.timestamp() };
        self.sign(&claims)
    }

    /// Signs any claims (tests use it for expired tokens).
    pub fn sign(&self, claims: &Claims) -> Result<String> {
        let header = serde_json::to_vec(&Header { alg: "HS256".into(), typ: Some("JWT".into()) }).map_err(|e| Error::Invariant(e.to_string()))?;
        let payload = serde_json::to_vec(claims).map_err(|e| Error::Invariant(e.to_string()))?;
        let signing_input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        Ok(format!("{signing_input}.{sig}"))
    }

    /// Verifies a token at `now`: HS256 only, the signature, then the expiry.
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed("too long"));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError::Malformed("not three parts"));
        };
        let header: Header = URL_SAFE_NO_PAD.decode(h).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or(TokenError::Malformed("header"))?;
        if header.alg != "HS256" {
            return Err(TokenError::Algorithm);
        }
        let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| TokenError::Malformed("signature encoding"))?;
        let mut mac = self.mac();
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(p.as_bytes());
        mac.verify_slice(&sig).map_err(|_| TokenError::Signature)?;
        let claims: Claims = URL_SAFE_NO_PAD.decode(p).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or(TokenError::Malformed("claims"))?;
        if claims.exp <= now.timestamp() {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn key() -> JwtKey {
        JwtKey::new("0123456789abcdef0123456789abcdef").unwrap()
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap()
    }

    #[test]
    fn minted_tokens_verify_until_they_expire() {
        let alice = AccountId::new("alice").unwrap();
        let t = key().mint(&alice, Role::Admin, now(), 60).unwrap();
        let c = key().verify(&t, now()).unwrap();
        assert_eq!((c.sub, c.role, c.exp, c.iat), (alice.clone(), Role::Admin, now().timestamp() + 60, now().timestamp()));
        assert_eq!(key().verify(&t, now() + chrono::Duration::seconds(59)).unwrap().role, Role::Admin);
        assert_eq!(key().verify(&t, now() + chrono::Duration::seconds(60)), Err(TokenError::Expired));
        assert!(key().mint(&alice, Role::User, now(), 0).is_err());
        assert!(key().mint(&alice, Role::User, now(), MAX_TTL_SECS + 1).is_err());
    }

    #[test]
    fn forged_and_malformed_tokens_are_refused() {
        let alice = AccountId::new("alice").unwrap();
        let t = key().mint(&alice, Role::User, now(), 60).unwrap();
        // Another secret.
        let other = JwtKey::new("another secret of thirty-two bytes!!").unwrap();
        assert_eq!(other.verify(&t, now()), Err(TokenError::Signature));
        // Claims changed (role raised to admin) under the old signature.
        let parts: Vec<&str> = t.split('.').collect();
        let forged_claims = URL_SAFE_NO_PAD.encode(br#"{"sub":"alice","role":"admin","exp":9999999999,"iat":0}"#);
        assert_eq!(key().verify(&format!("{}.{forged_claims}.{}", parts[0], parts[2]), now()), Err(TokenError::Signature));
        // alg none, and another algorithm.
        let none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        assert_eq!(key().verify(&format!("{none}.{}.", parts[1]), now()), Err(TokenError::Algorithm));
        let rs = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#);
        assert_eq!(key().verify(&format!("{rs}.{}.{}", parts[1], parts[2]), now()), Err(TokenError::Algorithm));
        for bad in ["", "a.b", "a.b.c.d", "!!.??.**", &"x".repeat(MAX_TOKEN_BYTES + 1)] {
            assert!(matches!(key().verify(bad, now()), Err(TokenError::Malformed(_))), "{bad:.20}");
        }
        // Well signed, but the claims are not ours (unknown role, bad account id).
        for claims in [r#"{"sub":"alice","role":"root","exp":9999999999}"#, r#"{"sub":"","role":"user","exp":9999999999}"#] {
            let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256"}"#);
            let p = URL_SAFE_NO_PAD.encode(claims);
            let mut mac = key().mac();
            mac.update(format!("{h}.{p}").as_bytes());
            let s = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
            assert_eq!(key().verify(&format!("{h}.{p}.{s}"), now()), Err(TokenError::Malformed("claims")));
        }
        assert!(JwtKey::new("short").is_err());
    }
}
