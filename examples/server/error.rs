//! One JSON error body for every failure: `{ "error": <stable code>, "message": ... }`, plus
//! fields of the case (needed/available credits, retry after). Internal errors are logged and
//! answered with a generic message: a 500 never shows what broke.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Datelike, Months, NaiveTime, Utc};
use prpm_playground_core::cost::ThrottleReason;
use prpm_playground_core::provider::ProviderError;
use prpm_playground_core::{Error, Rejection};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// A stable code (`invalid_input`, `insufficient_credits`, `rate_limited`, ...).
    pub error: String,
    pub message: String,
    /// Credits a run needs (402 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needed: Option<i64>,
    /// Credits available (402 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available: Option<i64>,
    /// Seconds to wait (429 only; also the `Retry-After` header).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
    /// The field an `invalid_input` is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError { status, body: ErrorBody { error: code.into(), message: message.into(), needed: None, available: None, retry_after_secs: None, field: None } }
    }

    pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Self {
        let mut e = ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", format!("{field}: {reason}"));
        e.body.field = Some(field.into());
        e
    }

    pub fn unauthorized(why: &str) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", why)
    }

    pub fn forbidden() -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this route needs the admin role")
    }

    pub fn not_found(what: &str) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
    }

    pub fn internal() -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; the server's log has the details")
    }

    fn retry_after(mut self, secs: u64) -> Self {
        self.body.retry_after_secs = Some(secs.max(1));
        self
    }

    /// A library error as an answer.
    pub fn from_error(e: Error) -> Self {
        match e {
            Error::InvalidInput { field, reason } => ApiError::invalid(field, reason),
            Error::UnknownModel(m) => ApiError::new(StatusCode::BAD_REQUEST, "unknown_model", format!("unknown model {m:?}")),
            Error::UnknownAccount(a) => ApiError::new(StatusCode::NOT_FOUND, "unknown_account", format!("unknown account {a:?}")),
            e @ Error::RequestTooLarge { .. } => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.code(), e.to_string()),
            Error::IdempotencyConflict { .. } => ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_conflict",
                "this idempotency key was used for a different request (or that request is in progress)",
            ),
            Error::NotFound { what } => ApiError::not_found(what),
            Error::InvalidSignature(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_signature", "the webhook signature does not verify"),
            Error::Provider(p) => {
                let code = p.code();
                match p {
                    ProviderError::RateLimited { retry_after_ms } => {
                        let e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, "the model provider is rate limiting; retry later");
                        e.retry_after(retry_after_ms.map_or(30, |ms| ms.div_ceil(1000)))
                    }
                    ProviderError::Unavailable(_) => {
                        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, "the model provider is unavailable; nothing was charged")
                    }
                    ProviderError::BadRequest(m) => ApiError::new(StatusCode::BAD_REQUEST, code, format!("the model provider refused the request: {m}")),
                    other => {
                        tracing::error!(error = %other, "provider failure");
                        ApiError::new(StatusCode::BAD_GATEWAY, code, "the model provider failed; nothing was charged")
                    }
                }
            }
            Error::Stripe { code, message } => {
                tracing::error!(code, message, "stripe failure");
                ApiError::new(StatusCode::BAD_GATEWAY, "payment_provider", "the payment provider failed; try again")
            }
            other => {
                tracing::error!(error = %other, code = other.code(), "internal error");
                ApiError::internal()
            }
        }
    }

    /// A rejection (an expected refusal) as an answer, at `now` (for `Retry-After`).
    pub fn from_rejection(r: Rejection, now: DateTime<Utc>) -> Self {
        let code = r.code();
        let message = r.to_string();
        match r {
            Rejection::InsufficientCredits { needed, available } => {
                let mut e = ApiError::new(StatusCode::PAYMENT_REQUIRED, code, message);
                e.body.needed = Some(needed);
                e.body.available = Some(available);
                e
            }
            Rejection::InDebt { .. } => ApiError::new(StatusCode::PAYMENT_REQUIRED, code, message),
            Rejection::RateLimited { retry_after_ms, .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message).retry_after(u64::try_from(retry_after_ms).unwrap_or(0).div_ceil(1000))
            }
            Rejection::DailyCostLimit { .. } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message).retry_after(secs_to_next_day(now)),
            Rejection::MonthlyCostLimit { .. } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message).retry_after(secs_to_next_month(now)),
            Rejection::Throttled { reason } => {
                let secs = match reason {
                    ThrottleReason::DailyCostLimit { .. } => secs_to_next_day(now),
                    ThrottleReason::MonthlyCostLimit { .. } => secs_to_next_month(now),
                    // Lifted by an admin: ask again in an hour.
                    ThrottleReason::Admin { .. } => 3_600,
                };
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, "the account is throttled").retry_after(secs)
            }
            _ => ApiError::new(StatusCode::CONFLICT, code, message),
        }
    }
}

fn secs_to_next_day(now: DateTime<Utc>) -> u64 {
    let next = (now.date_naive() + chrono::Days::new(1)).and_time(NaiveTime::MIN).and_utc();
    (next - now).num_seconds().max(1) as u64
}

fn secs_to_next_month(now: DateTime<Utc>) -> u64 {
    let first = now.date_naive().with_day(1).expect("day 1 exists");
    let next = (first + Months::new(1)).and_time(NaiveTime::MIN).and_utc();
    (next - now).num_seconds().max(1) as u64
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError::from_error(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.body.retry_after_secs;
        let mut res = (self.status, axum::Json(&self.body)).into_response();
        if let Some(secs) = retry {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

/// The JSON form of an error body, for SSE error events.
pub fn error_json(e: &ApiError) -> Value {
    let mut v = serde_json::to_value(&e.body).unwrap_or_else(|_| Value::Object(Map::new()));
    if let Value::Object(m) = &mut v {
        m.insert("status".into(), Value::from(e.status.as_u16()));
    }
    v
}

pub type ApiResult<T> = Result<T, ApiError>;
