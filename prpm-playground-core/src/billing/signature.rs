//! Stripe's webhook signature scheme: the `Stripe-Signature` header carries a timestamp `t` and
//! one or more `v1` signatures, each an HMAC-SHA256 of `"{t}.{raw body}"` under an endpoint
//! secret, in hex. Several `v1` values appear while a secret is being rolled; any match passes.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::Error;

/// Stripe's default tolerance between the signed timestamp and now.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;
/// Longest header read (bounds the parsing).
const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Most `v1` signatures looked at (Stripe sends one per active secret).
const MAX_SIGNATURES: usize = 8;

/// Why a webhook was refused. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no Stripe-Signature header")]
    MissingHeader,
    #[error("malformed Stripe-Signature header: {0}")]
    Malformed(&'static str),
    #[error("no signature matches the payload")]
    Mismatch,
    #[error("the signed timestamp is {age_secs} s away from now (tolerance {tolerance_secs} s)")]
    Stale { age_secs: i64, tolerance_secs: i64 },
}

impl From<SignatureError> for Error {
    fn from(e: SignatureError) -> Self {
        Error::InvalidSignature(e.to_string())
    }
}

fn mac(secret: &str, t: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    m.update(t.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..32).map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}

/// Checks `header` against `body` under any of `secrets` (constant-time comparisons), and the
/// timestamp against `now` within `tolerance_secs` either way.
pub fn verify(header: Option<&str>, body: &[u8], secrets: &[String], now: DateTime<Utc>, tolerance_secs: i64) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::MissingHeader)?;
    if header.len() > MAX_HEADER_BYTES {
        return Err(SignatureError::Malformed("too long"));
    }
    let mut t = None;
    let mut sigs = Vec::new();
    for item in header.split(',') {
        let (k, v) = item.trim().split_once('=').ok_or(SignatureError::Malformed("an item without '='"))?;
        match k {
            "t" => t = Some(v.parse::<i64>().map_err(|_| SignatureError::Malformed("t is not a number"))?),
            "v1" => sigs.push(v),
            _ => {} // v0 (test mode) and future schemes
        }
    }
    let t = t.ok_or(SignatureError::Malformed("no timestamp"))?;
    if sigs.is_empty() {
        return Err(SignatureError::Malformed("no v1 signature"));
    }
    if sigs.len() > MAX_SIGNATURES {
        return Err(SignatureError::Malformed("too many signatures"));
    }
    let candidates: Vec<Vec<u8>> = sigs.iter().filter_map(|s| hex_decode(s)).collect();
    let mut matched = false;
    // One MAC per secret over the body; each candidate compared in constant time.
    for secret in secrets {
        let expected = mac(secret, t, body).finalize();
        for c in &candidates {
            matched |= expected == hmac::digest::CtOutput::new(hmac::digest::generic_array::GenericArray::clone_from_slice(c));
        }
    }
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    let age_secs = now.timestamp().saturating_sub(t);
    if age_secs.abs() > tolerance_secs {
        return Err(SignatureError::Stale { age_secs, tolerance_secs });
    }
    Ok(())
}

/// A `Stripe-Signature` header for `body` signed at `t` with `secret`, as Stripe builds it
/// (for tests, and for replaying stored events through the same path).
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    let sig: String = mac(secret, t, body).finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={sig}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(t, 0).unwrap()
    }

    #[test]
    fn an_independently_computed_signature_verifies() {
        // `printf '1492774577.{"id":"evt_test_webhook","object":"event"}' | openssl dgst -sha256 -hmac whsec_test`
        let body = br#"{"id":"evt_test_webhook","object":"event"}"#;
        let expected = "t=1492774577,v1=67350faf457ae85329ccd74ce494668a82b67bf58c9c00a8a2c59765873cb454";
        assert_eq!(sign("whsec_test", 1_492_774_577, body), expected);
        verify(Some(expected), body, &["whsec_test".into()], at(1_492_774_577), 300).unwrap();
    }

    #[test]
    fn every_refusal_is_typed() {
        let secrets = vec!["whsec_a".to_owned()];
        let body = br#"{"id":"evt_1"}"#;
        let good = sign("whsec_a", 1_000, body);
        assert_eq!(verify(None, body, &secrets, at(1_000), 300), Err(SignatureError::MissingHeader));
        assert!(matches!(verify(Some("garbage"), body, &secrets, at(1_000), 300), Err(SignatureError::Malformed(_))));
        assert!(matches!(verify(Some("t=abc,v1=00"), body, &secrets, at(1_000), 300), Err(SignatureError::Malformed(_))));
        assert!(matches!(verify(Some("v1=00"), body, &secrets, at(1_000), 300), Err(SignatureError::Malformed(_))));
        assert!(matches!(verify(Some("t=1000"), body, &secrets, at(1_000), 300), Err(SignatureError::Malformed(_))));
        assert_eq!(verify(Some(&good), br#"{"id":"evt_2"}"#, &secrets, at(1_000), 300), Err(SignatureError::Mismatch), "tampered body");
        assert_eq!(verify(Some(&good), body, &["whsec_b".into()], at(1_000), 300), Err(SignatureError::Mismatch), "wrong secret");
        assert_eq!(verify(Some(&good), body, &secrets, at(1_301), 300), Err(SignatureError::Stale { age_secs: 301, tolerance_secs: 300 }));
        assert_eq!(verify(Some(&good), body, &secrets, at(699), 300), Err(SignatureError::Stale { age_secs: -301, tolerance_secs: 300 }));
        verify(Some(&good), body, &secrets, at(1_300), 300).unwrap();
        let non_hex = good.replace("v1=", "v1=zz").chars().take(good.len()).collect::<String>();
        assert_eq!(verify(Some(&non_hex), body, &secrets, at(1_000), 300), Err(SignatureError::Mismatch));
    }

    #[test]
    fn several_signatures_and_secrets_for_rotation() {
        let body = b"payload";
        let old = sign("whsec_old", 5_000, body);
        let new = sign("whsec_new", 5_000, body);
        // Stripe sends one v1 per active secret while rolling: "t=..,v1=<old>,v1=<new>".
        let both = format!("{old},v1={}", &new[new.find("v1=").unwrap() + 3..]);
        verify(Some(&both), body, &["whsec_new".into()], at(5_000), 300).unwrap();
        verify(Some(&both), body, &["whsec_old".into()], at(5_000), 300).unwrap();
        // And a receiver with both secrets configured takes either.
        verify(Some(&old), body, &["whsec_new".into(), "whsec_old".into()], at(5_000), 300).unwrap();
        // v0 (test-mode) signatures are ignored, not trusted.
        let v0 = old.replace("v1=", "v0=");
        assert!(verify(Some(&v0), body, &["whsec_old".into()], at(5_000), 300).is_err());
        // A header stuffed with signatures is refused before any MAC is computed.
        let stuffed = format!("t=5000{}", ",v1=00".repeat(9));
        assert_eq!(verify(Some(&stuffed), body, &["whsec_old".into()], at(5_000), 300), Err(SignatureError::Malformed("too many signatures")));
    }
}
