//! Python arguments to the library's types: exact money (never a float), times, ids, keys.

use std::str::FromStr;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, Utc};
use prpm_playground_core::cost::usd_to_micros;
use prpm_playground_core::ledger::{AccountId, IdempotencyKey};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyString};
use rust_decimal::Decimal;

use crate::errors::{PlayResult, invalid};

/// An exact USD amount: a `decimal.Decimal`, an `int` or a decimal string. Floats are refused
/// (0.1 is not exact); so are fractions of a micro-dollar.
pub fn usd(field: &'static str, v: &Bound<'_, PyAny>) -> PlayResult<i64> {
    if v.is_instance_of::<PyFloat>() {
        return Err(invalid(field, "a float is not exact money: pass a decimal.Decimal, an int or a string"));
    }
    if v.is_instance_of::<PyBool>() {
        return Err(invalid(field, "a bool is not money"));
    }
    let text: String = if v.is_instance_of::<PyString>() { v.extract()? } else { v.str()?.extract()? };
    let d = Decimal::from_str_exact(text.trim()).or_else(|_| Decimal::from_scientific(text.trim())).map_err(|e| invalid(field, format!("{text:?}: {e}")))?;
    usd_to_micros(d).map_err(|e| invalid(field, e.to_string()))
}

pub fn opt_usd(field: &'static str, v: Option<&Bound<'_, PyAny>>) -> PlayResult<Option<i64>> {
    match v {
        Some(v) if !v.is_none() => Ok(Some(usd(field, v)?)),
        _ => Ok(None),
    }
}

/// A time: an aware `datetime` (any zone), a naive one (taken as UTC), a `date` (its midnight
/// UTC), or an ISO 8601 / RFC 3339 string.
pub fn time(field: &'static str, v: &Bound<'_, PyAny>) -> PlayResult<DateTime<Utc>> {
    if let Ok(t) = v.extract::<DateTime<FixedOffset>>() {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(t) = v.extract::<NaiveDateTime>() {
        return Ok(t.and_utc());
    }
    if let Ok(d) = v.extract::<NaiveDate>() {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
    }
    if let Ok(s) = v.extract::<String>() {
        if let Ok(t) = DateTime::parse_from_rfc3339(&s) {
            return Ok(t.with_timezone(&Utc));
        }
        if let Ok(t) = NaiveDateTime::from_str(&s) {
            return Ok(t.and_utc());
        }
        if let Ok(d) = NaiveDate::from_str(&s) {
            return Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
        }
        return Err(invalid(field, format!("{s:?} is not an ISO 8601 time or date")));
    }
    Err(invalid(field, "expected a datetime, a date or an ISO 8601 string"))
}

pub fn opt_time(field: &'static str, v: Option<&Bound<'_, PyAny>>) -> PlayResult<Option<DateTime<Utc>>> {
    match v {
        Some(v) if !v.is_none() => Ok(Some(time(field, v)?)),
        _ => Ok(None),
    }
}

pub fn account(s: &str) -> PlayResult<AccountId> {
    Ok(AccountId::new(s)?)
}

pub fn opt_account(s: Option<&str>) -> PlayResult<Option<AccountId>> {
    s.map(account).transpose()
}

/// The caller's idempotency key, or a new time-ordered one.
pub fn key(k: Option<&str>) -> PlayResult<IdempotencyKey> {
    Ok(match k {
        Some(k) => IdempotencyKey::new(k)?,
        None => IdempotencyKey::generate(),
    })
}

/// A non-negative integer argument (token counts, credits).
pub fn nonneg(field: &'static str, v: i64) -> PlayResult<u64> {
    u64::try_from(v).map_err(|_| invalid(field, format!("{v} is negative")))
}
