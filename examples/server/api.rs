//! Routes, request validation, auth and idempotency. Every route is registered through
//! `utoipa-axum`, so `/openapi.json` is generated from this file.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, NaiveDate, Utc};
use futures_util::stream;
use prpm_playground_core::auth::{JwtKey, Role as AuthRole};
use prpm_playground_core::billing::{Billing, Pack, Plan};
use prpm_playground_core::cost::{ThrottleReason, TierLimits};
use prpm_playground_core::playground::{Playground, RunEvent, RunRequest, RunResult};
use prpm_playground_core::pricing::Estimate;
use prpm_playground_core::store::{KeyedResponse, check_request_key};
use prpm_playground_core::*;
use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult, ErrorBody, error_json};
use crate::metrics::Metrics;
use crate::scheduler::{self, Job, JobResult};

/// The model a run uses when the request names none.
const DEFAULT_MODEL: &str = "claude-sonnet-4-5";
/// Accounts remembered as existing (so a request does not try to create its account again).
const MAX_KNOWN_ACCOUNTS: usize = 100_000;
/// Longest list an admin route returns in one page.
const MAX_LIST: u32 = 500;

pub struct AppState {
    pub store: Arc<dyn Store>,
    pub play: Playground,
    pub billing: Option<Billing>,
    pub jwt: JwtKey,
    pub clock: Arc<dyn Clock>,
    pub manual_clock: Option<Arc<ManualClock>>,
    pub metrics: Metrics,
    known: Mutex<HashSet<AccountId>>,
}

impl AppState {
    pub fn new(
        store: Arc<dyn Store>,
        play: Playground,
        billing: Option<Billing>,
        jwt: JwtKey,
        clock: Arc<dyn Clock>,
        manual: Option<Arc<ManualClock>>,
    ) -> Self {
        AppState { store, play, billing, jwt, clock, manual_clock: manual, metrics: Metrics::default(), known: Mutex::new(HashSet::new()) }
    }

    /// Creates the caller's account on first sight (a user with the sign-up credits).
    async fn ensure_account(&self, account: &AccountId) -> ApiResult<()> {
        if self.known.lock().unwrap().contains(account) {
            return Ok(());
        }
        let key = IdempotencyKey::new(format!("signup:{account}"))?;
        match self.store.create_account(account.clone(), AccountKind::User, key).await? {
            Ok(_) | Err(Rejection::AccountExists) => {}
            Err(r) => return Err(ApiError::from_rejection(r, self.clock.now())),
        }
        let mut known = self.known.lock().unwrap();
        if known.len() >= MAX_KNOWN_ACCOUNTS {
            known.clear();
        }
        known.insert(account.clone());
        Ok(())
    }

    fn rejected(&self, r: Rejection) -> ApiError {
        self.metrics.rejection(r.code());
        ApiError::from_rejection(r, self.clock.now())
    }
}

type AppStateRef = Arc<AppState>;

// ---- extractors -------------------------------------------------------------------------------

/// An authenticated caller (any role). Its account exists once extracted.
pub struct Caller {
    pub account: AccountId,
    pub role: AuthRole,
}

fn bearer(parts: &Parts, state: &AppState) -> ApiResult<Caller> {
    let value = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
    let value = value.to_str().map_err(|_| ApiError::unauthorized("malformed authorization header"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::unauthorized("the authorization header must be `Bearer <token>`"))?;
    let claims = state.jwt.verify(token.trim(), state.clock.now()).map_err(|e| {
        tracing::debug!(error = %e, "token refused");
        ApiError::unauthorized("invalid or expired token")
    })?;
    Ok(Caller { account: claims.sub, role: claims.role })
}

impl FromRequestParts<AppStateRef> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppStateRef) -> ApiResult<Self> {
        let caller = bearer(parts, state)?;
        state.ensure_account(&caller.account).await?;
        Ok(caller)
    }
}

/// An authenticated admin: 401 without a valid token, 403 with a user's.
pub struct Admin {
    pub account: AccountId,
}

impl FromRequestParts<AppStateRef> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppStateRef) -> ApiResult<Self> {
        let caller = bearer(parts, state)?;
        if caller.role != AuthRole::Admin {
            return Err(ApiError::forbidden());
        }
        Ok(Admin { account: caller.account })
    }
}

/// A query string, with a JSON 400 when it does not parse.
pub struct Q<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        Query::<T>::from_request_parts(parts, state).await.map(|q| Q(q.0)).map_err(|e| ApiError::invalid("query", e.body_text()))
    }
}

/// A path parameter, with a JSON 400 when it does not parse.
pub struct P<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for P<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        Path::<T>::from_request_parts(parts, state).await.map(|p| P(p.0)).map_err(|e| ApiError::invalid("path", e.body_text()))
    }
}

/// Parses a JSON body (an empty body is `{}`), with a JSON 400 when it does not parse.
fn json_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { body };
    serde_json::from_slice(body).map_err(|e| ApiError::invalid("body", e))
}

// ---- money and times --------------------------------------------------------------------------

use prpm_playground_core::pricing::format_usd as usd;

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn parse_time(field: &str, s: &str) -> ApiResult<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc())
        .map_err(|_| ApiError::invalid(field, "must be an RFC 3339 time or a YYYY-MM-DD date"))
}

// ---- idempotency ------------------------------------------------------------------------------

/// Runs `f` under the request's `Idempotency-Key`, if it has one: a repeat of the same request
/// (same caller, key, method, path and body) gets the first response again (with
/// `Idempotent-Replayed: true`) and does nothing; the same key with another request is a 409.
/// Responses of 5xx are not kept (the request may be retried).
async fn keyed<F>(state: &AppState, account: &AccountId, headers: &HeaderMap, method: &Method, path: &str, body: &[u8], f: F) -> Response
where
    F: std::future::Future<Output = Response>,
{
    let Some(key) = headers.get("idempotency-key") else { return f.await };
    let Some(key) = key.to_str().ok().filter(|k| check_request_key(k).is_ok()) else {
        return ApiError::invalid("idempotency_key", "must be 1 to 255 printable ASCII characters").into_response();
    };
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update(b" ");
    h.update(path.as_bytes());
    h.update(b"\n");
    h.update(body);
    let fingerprint = hex(&h.finalize());
    match state.store.keyed_response(account, key).await {
        Ok(Some(stored)) => return replay(stored, &fingerprint),
        Ok(None) => {}
        Err(e) => return ApiError::from(e).into_response(),
    }
    let res = f.await;
    if res.status().is_server_error() || res.headers().get(header::CONTENT_TYPE).is_some_and(|c| c.as_bytes().starts_with(b"text/event-stream")) {
        return res;
    }
    let (parts, body) = res.into_parts();
    let bytes = match axum::body::to_bytes(body, prpm_playground_core::store::MAX_KEYED_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => return ApiError::internal().into_response(),
    };
    let Ok(text) = String::from_utf8(bytes.to_vec()) else { return Response::from_parts(parts, Body::from(bytes)) };
    let record = KeyedResponse {
        account: account.clone(),
        key: key.to_owned(),
        fingerprint: fingerprint.clone(),
        status: parts.status.as_u16(),
        body: text,
        at: state.clock.now(),
    };
    match state.store.remember_response(&record).await {
        Ok(stored) if stored.fingerprint == fingerprint && stored.body == record.body => Response::from_parts(parts, Body::from(bytes)),
        // Another request with this key won the race.
        Ok(stored) => replay(stored, &fingerprint),
        Err(e) => {
            tracing::error!(error = %e, "could not keep a keyed response");
            Response::from_parts(parts, Body::from(bytes))
        }
    }
}

fn replay(stored: KeyedResponse, fingerprint: &str) -> Response {
    if stored.fingerprint != fingerprint {
        return ApiError::new(StatusCode::CONFLICT, "idempotency_conflict", "this idempotency key was used for a different request").into_response();
    }
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut res = (status, stored.body).into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    res
}

/// A run id from the caller's idempotency key: the same key names the same run.
fn run_id_for_key(account: &AccountId, headers: &HeaderMap) -> Option<RunId> {
    let key = headers.get("idempotency-key")?.to_str().ok()?;
    let mut h = Sha256::new();
    h.update(account.as_str().as_bytes());
    h.update(b"\0");
    h.update(key.as_bytes());
    RunId::parse(&hex(&h.finalize()[..16])).ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- playground -------------------------------------------------------------------------------

/// A run or an estimate.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunBody {
    /// The package whose prompt is the system prompt.
    pub package_id: Option<String>,
    /// The user's input.
    pub user_input: String,
    /// A model of the price table (default `claude-sonnet-4-5`).
    pub model: Option<String>,
    /// The session to continue; a run without one starts a session.
    pub session_id: Option<String>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    /// Run with and without the package prompt, side by side (not streamed).
    #[serde(default)]
    pub compare: bool,
}

impl RunBody {
    fn request(self, account: &AccountId, run_id: Option<RunId>) -> ApiResult<(RunRequest, bool)> {
        let session = self.session_id.as_deref().map(SessionId::parse).transpose().map_err(|_| ApiError::not_found("session"))?;
        let req = RunRequest {
            account: account.clone(),
            package_id: self.package_id,
            session,
            input: self.user_input,
            model: self.model.unwrap_or_else(|| DEFAULT_MODEL.into()),
            temperature: self.temperature,
            max_tokens: self.max_tokens,
            run_id,
        };
        Ok((req, self.compare))
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuoteDto {
    pub tokens: u64,
    pub credits: u64,
    /// Exact USD.
    pub cost_usd: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EstimateDto {
    pub model: String,
    pub input_tokens: u64,
    /// Input + max output tokens: what the run holds.
    pub worst_case: QuoteDto,
    /// Input + expected output tokens.
    pub expected: QuoteDto,
    pub expensive: bool,
    /// The caller's available credits, and whether the worst case fits in them.
    pub available_credits: i64,
    pub affordable: bool,
}

fn estimate_dto(e: &Estimate, input_tokens: u64, available: i64) -> EstimateDto {
    let q = |q: &prpm_playground_core::Quote| QuoteDto { tokens: q.tokens, credits: q.credits, cost_usd: usd(q.cost_micros) };
    EstimateDto {
        model: e.model.clone(),
        input_tokens,
        worst_case: q(&e.worst_case),
        expected: q(&e.expected),
        expensive: e.expensive,
        available_credits: available,
        affordable: i64::try_from(e.worst_case.credits).is_ok_and(|c| c <= available),
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageDto {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunDto {
    pub run_id: String,
    pub session_id: Option<String>,
    /// The model's answer.
    pub response: String,
    pub model: String,
    pub usage: UsageDto,
    pub credits_charged: i64,
    pub cost_usd: String,
    pub latency_ms: u64,
    /// `completed` or `interrupted`.
    pub outcome: String,
    /// The usage was worth more than the hold: the hold was charged.
    pub capped: bool,
    pub estimate_credits: u64,
}

fn run_dto(r: RunResult) -> RunDto {
    RunDto {
        run_id: r.run_id.to_string(),
        session_id: r.session.map(|s| s.to_string()),
        response: r.text,
        model: r.model,
        usage: UsageDto {
            input_tokens: r.usage.input,
            output_tokens: r.usage.output,
            cache_read_tokens: r.usage.cache_read,
            cache_write_tokens: r.usage.cache_write,
        },
        credits_charged: r.credits,
        cost_usd: usd(r.cost_micros),
        latency_ms: r.latency_ms,
        outcome: r.outcome.as_str().into(),
        capped: r.capped,
        estimate_credits: r.estimate.worst_case.credits,
    }
}

/// One half of a comparison: its run, or why it did not run.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HalfDto {
    pub run: Option<RunDto>,
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComparisonDto {
    pub with_prompt: HalfDto,
    pub without_prompt: HalfDto,
}

#[utoipa::path(post, path = "/api/v1/playground/estimate", tag = "playground", request_body = RunBody,
    responses((status = 200, body = EstimateDto), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)),
    security(("bearer" = [])))]
async fn estimate(State(state): State<AppStateRef>, caller: Caller, body: Bytes) -> ApiResult<Json<EstimateDto>> {
    let (req, _) = json_body::<RunBody>(&body)?.request(&caller.account, None)?;
    let (e, balance) = tokio::join!(state.play.estimate(&req), state.store.balance(&caller.account));
    let e = e?;
    Ok(Json(estimate_dto(&e.estimate, e.input_tokens, balance?.available)))
}

#[utoipa::path(post, path = "/api/v1/playground/run", tag = "playground", request_body = RunBody,
    description = "Runs a package's prompt with the user's input. With `Accept: text/event-stream` the answer streams as server-sent events: `start` (run id, session id, estimate), `delta` (text), then `done` (the run) or `error`. With an `Idempotency-Key`, a repeat returns the first response.",
    responses((status = 200, body = RunDto), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 402, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn run(State(state): State<AppStateRef>, caller: Caller, method: Method, headers: HeaderMap, body: Bytes) -> Response {
    let (st, account, h, b) = (state.clone(), caller.account.clone(), headers.clone(), body.clone());
    keyed(&state, &account, &headers, &method, "/api/v1/playground/run", &body, async move {
        run_inner(st, caller, h, b).await.unwrap_or_else(|e| e.into_response())
    })
    .await
}

async fn run_inner(state: AppStateRef, caller: Caller, headers: HeaderMap, body: Bytes) -> ApiResult<Response> {
    let (req, compare) = json_body::<RunBody>(&body)?.request(&caller.account, run_id_for_key(&caller.account, &headers))?;
    let wants_stream = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok()).is_some_and(|a| a.contains("text/event-stream"));
    if compare {
        let req = RunRequest { run_id: None, ..req };
        let c = state.play.compare(req).await?;
        let half = |r: Result<Result<RunResult, Rejection>, Error>| match r {
            Ok(Ok(run)) => {
                state.metrics.run(&run.model, run.outcome.as_str(), run.credits, run.cost_micros, run.latency_ms);
                HalfDto { run: Some(run_dto(run)), error: None }
            }
            Ok(Err(rej)) => HalfDto { run: None, error: Some(state.rejected(rej).body) },
            Err(e) => HalfDto { run: None, error: Some(ApiError::from(e).body) },
        };
        return Ok(Json(ComparisonDto { with_prompt: half(c.with_prompt), without_prompt: half(c.without_prompt) }).into_response());
    }
    if !wants_stream {
        return match state.play.run(req).await {
            Ok(Ok(r)) => {
                state.metrics.run(&r.model, r.outcome.as_str(), r.credits, r.cost_micros, r.latency_ms);
                Ok(Json(run_dto(r)).into_response())
            }
            Ok(Err(rej)) => Err(state.rejected(rej)),
            Err(e) => {
                if let Error::Provider(p) = &e {
                    state.metrics.rejection(p.code());
                }
                Err(e.into())
            }
        };
    }
    let stream = match state.play.run_stream(req).await? {
        Ok(s) => s,
        Err(rej) => return Err(state.rejected(rej)),
    };
    let start = serde_json::json!({
        "runId": stream.run_id.to_string(),
        "sessionId": stream.session.as_ref().map(|s| s.to_string()),
        "estimateCredits": stream.estimate.worst_case.credits,
    });
    let first = Event::default().event("start").json_data(start).map_err(|_| ApiError::internal())?;
    let events = stream::unfold((Some(first), Some(stream), state.clone()), |(first, stream, state)| async move {
        if let Some(ev) = first {
            return Some((Ok::<_, std::convert::Infallible>(ev), (None, stream, state)));
        }
        let mut s = stream?;
        let ev = s.next().await?;
        let (event, done) = match ev {
            RunEvent::Delta(t) => (Event::default().event("delta").json_data(serde_json::json!({ "text": t })), false),
            RunEvent::Done(r) => {
                state.metrics.run(&r.model, r.outcome.as_str(), r.credits, r.cost_micros, r.latency_ms);
                (Event::default().event("done").json_data(run_dto(r)), true)
            }
            RunEvent::Failed { error, result } => {
                if let Some(r) = &result {
                    state.metrics.run(&r.model, r.outcome.as_str(), r.credits, r.cost_micros, r.latency_ms);
                }
                let mut v = error_json(&ApiError::from(error));
                if let (Some(r), serde_json::Value::Object(m)) = (result, &mut v) {
                    m.insert("result".into(), serde_json::to_value(run_dto(r)).unwrap_or_default());
                }
                (Event::default().event("error").json_data(v), true)
            }
        };
        let event = event.unwrap_or_else(|_| Event::default().event("error").data("{\"error\":\"internal\"}"));
        Some((Ok(event), (None, if done { None } else { Some(s) }, state)))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

// ---- sessions ---------------------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionSummaryDto {
    pub id: String,
    pub package_id: Option<String>,
    pub model: String,
    pub title: String,
    pub turns: u32,
    pub shared: bool,
    pub created_at: String,
    pub updated_at: String,
}

fn summary_dto(s: SessionSummary) -> SessionSummaryDto {
    SessionSummaryDto {
        id: s.id.to_string(),
        package_id: s.package_id,
        model: s.model,
        title: s.title,
        turns: s.turns,
        shared: s.shared,
        created_at: time(s.created_at),
        updated_at: time(s.updated_at),
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionPageDto {
    pub sessions: Vec<SessionSummaryDto>,
    /// Pass as `cursor` for the next page.
    pub next: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TurnDto {
    pub seq: u32,
    /// `user` or `assistant`.
    pub role: String,
    pub content: String,
    pub run_id: Option<String>,
    pub at: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionDto {
    #[serde(flatten)]
    pub summary: SessionSummaryDto,
    pub share_token: Option<String>,
    pub turns_list: Vec<TurnDto>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub cursor: Option<String>,
    /// 1..=100 (default 20).
    pub limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/playground/sessions", tag = "sessions", params(PageQuery),
    responses((status = 200, body = SessionPageDto), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)), security(("bearer" = [])))]
async fn list_sessions(State(state): State<AppStateRef>, caller: Caller, Q(q): Q<PageQuery>) -> ApiResult<Json<SessionPageDto>> {
    let page = state.play.sessions(&caller.account, q.cursor.as_deref(), q.limit.unwrap_or(20)).await?;
    Ok(Json(SessionPageDto { sessions: page.sessions.into_iter().map(summary_dto).collect(), next: page.next }))
}

fn session_id(s: &str) -> ApiResult<SessionId> {
    // An id that cannot exist is a session that does not exist.
    SessionId::parse(s).map_err(|_| ApiError::not_found("session"))
}

#[utoipa::path(get, path = "/api/v1/playground/sessions/{id}", tag = "sessions", params(("id" = String, Path)),
    responses((status = 200, body = SessionDto), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn get_session(State(state): State<AppStateRef>, caller: Caller, P(id): P<String>) -> ApiResult<Json<SessionDto>> {
    let s = state.play.session(&caller.account, &session_id(&id)?).await?;
    Ok(Json(SessionDto {
        summary: summary_dto(s.summary),
        share_token: s.share_token.map(|t| t.to_string()),
        turns_list: s
            .turns
            .into_iter()
            .map(|t| TurnDto { seq: t.seq, role: t.role.as_str().into(), content: t.content, run_id: t.run_id.map(|r| r.to_string()), at: time(t.at) })
            .collect(),
    }))
}

#[utoipa::path(delete, path = "/api/v1/playground/sessions/{id}", tag = "sessions", params(("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn delete_session(State(state): State<AppStateRef>, caller: Caller, P(id): P<String>) -> ApiResult<StatusCode> {
    state.play.delete_session(&caller.account, &session_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShareDto {
    pub token: String,
    /// The public view's path.
    pub path: String,
}

#[utoipa::path(post, path = "/api/v1/playground/sessions/{id}/share", tag = "sessions", params(("id" = String, Path)),
    description = "Shares the session (a new token each time; the old one stops working).",
    responses((status = 200, body = ShareDto), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn share_session(State(state): State<AppStateRef>, caller: Caller, P(id): P<String>, method: Method, headers: HeaderMap) -> Response {
    let path = format!("/api/v1/playground/sessions/{id}/share");
    let st = state.clone();
    let account = caller.account.clone();
    keyed(&state, &account, &headers, &method, &path, b"", async move {
        let r: ApiResult<Json<ShareDto>> = async {
            let token = st.play.share(&caller.account, &session_id(&id)?).await?;
            Ok(Json(ShareDto { path: format!("/api/v1/playground/shared/{token}"), token: token.to_string() }))
        }
        .await;
        r.into_response()
    })
    .await
}

#[utoipa::path(delete, path = "/api/v1/playground/sessions/{id}/share", tag = "sessions", params(("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn revoke_share(State(state): State<AppStateRef>, caller: Caller, P(id): P<String>) -> ApiResult<StatusCode> {
    state.play.revoke_share(&caller.account, &session_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SharedTurnDto {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SharedSessionDto {
    pub title: String,
    pub package_id: Option<String>,
    pub model: String,
    pub turns: Vec<SharedTurnDto>,
}

#[utoipa::path(get, path = "/api/v1/playground/shared/{token}", tag = "sessions", params(("token" = String, Path)),
    description = "A shared session, public: the conversation only (no owner, credits or costs).",
    responses((status = 200, body = SharedSessionDto), (status = 404, body = ErrorBody)))]
async fn shared(State(state): State<AppStateRef>, P(token): P<String>) -> ApiResult<Json<SharedSessionDto>> {
    let s = state.play.shared(&token).await.map_err(|e| match e {
        Error::InvalidInput { .. } => ApiError::not_found("shared session"),
        other => other.into(),
    })?;
    Ok(Json(SharedSessionDto {
        title: s.title,
        package_id: s.package_id,
        model: s.model,
        turns: s.turns.into_iter().map(|t| SharedTurnDto { role: t.role.as_str().into(), content: t.content }).collect(),
    }))
}

// ---- credits ----------------------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExpiryDto {
    pub credits: i64,
    pub at: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BalanceDto {
    pub account: String,
    pub monthly: i64,
    pub rollover: i64,
    pub purchased: i64,
    pub total: i64,
    pub held: i64,
    pub available: i64,
    pub next_expiry: Option<ExpiryDto>,
    pub plan_monthly_credits: Option<i64>,
    pub plan_period_end: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/playground/credits", tag = "credits",
    responses((status = 200, body = BalanceDto), (status = 401, body = ErrorBody)), security(("bearer" = [])))]
async fn credits(State(state): State<AppStateRef>, caller: Caller) -> ApiResult<Json<BalanceDto>> {
    let b = state.store.balance(&caller.account).await?;
    Ok(Json(BalanceDto {
        account: b.account.to_string(),
        monthly: b.monthly,
        rollover: b.rollover,
        purchased: b.purchased,
        total: b.total,
        held: b.held,
        available: b.available,
        next_expiry: b.next_expiry.map(|l| ExpiryDto { credits: l.amount, at: time(l.expires_at) }),
        plan_monthly_credits: b.plan.filter(|p| p.active).map(|p| p.monthly_credits),
        plan_period_end: b.plan.filter(|p| p.active).map(|p| time(p.period_end)),
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct HistoryParams {
    /// Entry kinds, comma-separated (`grant,settle,...`).
    pub kind: Option<String>,
    /// RFC 3339 time or date: entries at or after.
    pub from: Option<String>,
    /// RFC 3339 time or date: entries before.
    pub until: Option<String>,
    /// The previous page's `next`.
    pub before: Option<i64>,
    /// 1..=1000 (default 50).
    pub limit: Option<u32>,
    /// `json` (default) or `csv` (every matching entry; also `Accept: text/csv`).
    pub format: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntryDto {
    pub id: i64,
    pub at: String,
    pub kind: String,
    pub monthly: i64,
    pub rollover: i64,
    pub purchased: i64,
    pub held: i64,
    pub balance_after: i64,
    pub held_after: i64,
    pub reference: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryDto {
    pub entries: Vec<EntryDto>,
    pub next: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/playground/credits/history", tag = "credits", params(HistoryParams),
    responses((status = 200, body = HistoryDto), (status = 200, content_type = "text/csv", body = String), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn history(State(state): State<AppStateRef>, caller: Caller, headers: HeaderMap, Q(p): Q<HistoryParams>) -> ApiResult<Response> {
    let kinds =
        p.kind.as_deref().map(|k| k.split(',').filter(|s| !s.is_empty()).map(EntryKind::parse).collect::<Result<Vec<_>>>()).transpose()?.unwrap_or_default();
    let query = HistoryQuery {
        account: caller.account.clone(),
        kinds,
        from: p.from.as_deref().map(|s| parse_time("from", s)).transpose()?,
        until: p.until.as_deref().map(|s| parse_time("until", s)).transpose()?,
        before: p.before.map(EntryId),
        limit: p.limit.unwrap_or(50),
    };
    let csv = match p.format.as_deref() {
        Some("csv") => true,
        Some("json") => false,
        None => headers.get(header::ACCEPT).and_then(|a| a.to_str().ok()).is_some_and(|a| a.contains("text/csv")),
        Some(other) => return Err(ApiError::invalid("format", format!("{other:?}: json or csv"))),
    };
    if csv {
        let mut out = Vec::new();
        prpm_playground_core::history::export_csv(&*state.store, &query, &mut out).await?;
        let mut res = out.into_response();
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
        res.headers_mut().insert(header::CONTENT_DISPOSITION, HeaderValue::from_static("attachment; filename=\"credit-history.csv\""));
        return Ok(res);
    }
    let page = state.store.history(&query).await?;
    Ok(Json(HistoryDto {
        entries: page
            .entries
            .into_iter()
            .map(|e| EntryDto {
                id: e.id.0,
                at: time(e.at),
                kind: e.kind.as_str().into(),
                monthly: e.delta.monthly,
                rollover: e.delta.rollover,
                purchased: e.delta.purchased,
                held: e.held_delta,
                balance_after: e.balance_after,
                held_after: e.held_after,
                reference: e.reference,
            })
            .collect(),
        next: page.next.map(|n| n.0),
    })
    .into_response())
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PackDto {
    /// `small`, `medium` or `large`.
    pub id: String,
    pub credits: i64,
    pub price_cents: i64,
    pub price_usd: String,
}

#[utoipa::path(get, path = "/api/v1/playground/credits/packages", tag = "credits",
    responses((status = 200, body = Vec<PackDto>), (status = 401, body = ErrorBody)), security(("bearer" = [])))]
async fn packages(_caller: Caller) -> Json<Vec<PackDto>> {
    Json(Pack::ALL.iter().map(|p| PackDto { id: p.name().into(), credits: p.credits(), price_cents: p.cents(), price_usd: usd(p.cents() * 10_000) }).collect())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PurchaseBody {
    /// `small`, `medium` or `large`.
    pub package: String,
    pub success_url: String,
    pub cancel_url: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubscribeBody {
    /// `individual` (default) or `org_member`.
    pub plan: Option<String>,
    pub success_url: String,
    pub cancel_url: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckoutDto {
    pub purchase_id: String,
    pub session_id: String,
    /// Stripe's hosted checkout page.
    pub url: Option<String>,
}

fn billing(state: &AppState) -> ApiResult<&Billing> {
    state.billing.as_ref().ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "billing_not_configured", "payments are not configured on this server"))
}

fn check_url(field: &str, url: &str) -> ApiResult<()> {
    if !(url.starts_with("https://") || url.starts_with("http://")) || url.len() > 2048 {
        return Err(ApiError::invalid(field, "must be an http(s) URL of at most 2048 bytes"));
    }
    Ok(())
}

#[utoipa::path(post, path = "/api/v1/playground/credits/purchase", tag = "credits", request_body = PurchaseBody,
    responses((status = 200, body = CheckoutDto), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn purchase(State(state): State<AppStateRef>, caller: Caller, method: Method, headers: HeaderMap, body: Bytes) -> Response {
    let st = state.clone();
    let account = caller.account.clone();
    let b = body.clone();
    keyed(&state, &account, &headers, &method, "/api/v1/playground/credits/purchase", &b, async move {
        let r: ApiResult<Json<CheckoutDto>> = async {
            let b: PurchaseBody = json_body(&body)?;
            let pack = Pack::ALL.into_iter().find(|p| p.name() == b.package).ok_or_else(|| ApiError::invalid("package", "small, medium or large"))?;
            check_url("successUrl", &b.success_url)?;
            check_url("cancelUrl", &b.cancel_url)?;
            let c = billing(&st)?.checkout_pack(&caller.account, pack, &b.success_url, &b.cancel_url).await?;
            Ok(Json(CheckoutDto { purchase_id: c.purchase_id, session_id: c.session_id, url: c.url }))
        }
        .await;
        r.into_response()
    })
    .await
}

#[utoipa::path(post, path = "/api/v1/playground/subscribe", tag = "credits", request_body = SubscribeBody,
    responses((status = 200, body = CheckoutDto), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn subscribe(State(state): State<AppStateRef>, caller: Caller, method: Method, headers: HeaderMap, body: Bytes) -> Response {
    let st = state.clone();
    let account = caller.account.clone();
    let b = body.clone();
    keyed(&state, &account, &headers, &method, "/api/v1/playground/subscribe", &b, async move {
        let r: ApiResult<Json<CheckoutDto>> = async {
            let b: SubscribeBody = json_body(&body)?;
            let plan = match b.plan.as_deref() {
                None | Some("individual") => Plan::PlusIndividual,
                Some("org_member") => Plan::PlusOrgMember,
                Some(_) => return Err(ApiError::invalid("plan", "individual or org_member")),
            };
            check_url("successUrl", &b.success_url)?;
            check_url("cancelUrl", &b.cancel_url)?;
            let c = billing(&st)?.checkout_subscription(&caller.account, plan, &b.success_url, &b.cancel_url).await?;
            Ok(Json(CheckoutDto { purchase_id: c.purchase_id, session_id: c.session_id, url: c.url }))
        }
        .await;
        r.into_response()
    })
    .await
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDto {
    pub received: bool,
    /// `processed`, `duplicate`, `ignored` or `unmatched`.
    pub outcome: String,
    pub event: String,
}

#[utoipa::path(post, path = "/api/v1/webhooks/stripe/credits", tag = "stripe", request_body(content = String, content_type = "application/json"),
    description = "Stripe's webhook: the raw body is checked against the `Stripe-Signature` header. Public.",
    responses((status = 200, body = WebhookDto), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn stripe_webhook(State(state): State<AppStateRef>, headers: HeaderMap, body: Bytes) -> ApiResult<Json<WebhookDto>> {
    let b = billing(&state)?;
    let sig = headers.get("stripe-signature").and_then(|v| v.to_str().ok());
    let outcome = b.handle_webhook(sig, &body).await?;
    use prpm_playground_core::billing::WebhookOutcome as W;
    let (outcome, event) = match outcome {
        W::Processed { event } => ("processed", event),
        W::Duplicate { event } => ("duplicate", event),
        W::Ignored { event } => ("ignored", event),
        W::Unmatched { event } => ("unmatched", event),
    };
    Ok(Json(WebhookDto { received: true, outcome: outcome.into(), event }))
}

// ---- admin ------------------------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SummaryDto {
    pub total_monthly_revenue: String,
    pub total_monthly_cost: String,
    /// Percent, one decimal; `null` without revenue.
    pub overall_margin: Option<String>,
    pub active_users: u64,
    pub throttled_users: u64,
    pub high_risk_users: u64,
    pub users: u64,
    pub margin_below_70: bool,
    pub throttled_over_5pct: bool,
}

#[utoipa::path(get, path = "/api/v1/admin/cost-analytics/summary", tag = "admin",
    responses((status = 200, body = SummaryDto), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn admin_summary(State(state): State<AppStateRef>, _admin: Admin) -> ApiResult<Json<SummaryDto>> {
    let s = state.store.summary().await?;
    Ok(Json(SummaryDto {
        total_monthly_revenue: usd(s.total_monthly_revenue_micros),
        total_monthly_cost: usd(s.total_monthly_cost_micros),
        overall_margin: s.overall_margin_pct.map(|m| m.to_string()),
        active_users: s.active_users,
        throttled_users: s.throttled_users,
        high_risk_users: s.high_risk_users,
        users: s.users,
        margin_below_70: s.margin_below_70,
        throttled_over_5pct: s.throttled_over_5pct,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserCostDto {
    pub user_id: String,
    pub tier: String,
    pub month_cost: String,
    pub day_cost: String,
    pub monthly_limit: Option<String>,
    /// Monthly cost as a percent of the limit, one decimal.
    pub pct_of_limit: Option<String>,
    pub throttled: bool,
    /// Why, for people: `daily cost limit reached on 2026-11-22`, `monthly cost limit reached
    /// in 2026-11`, `throttled by ops@example.com: abuse report 17`.
    pub throttle_reason: Option<String>,
    /// Why, for programs: `daily_cost_limit`, `monthly_cost_limit` or `admin`.
    pub throttle_kind: Option<String>,
    pub throttled_since: Option<String>,
    /// The library's risk level (`RiskLevel::as_str`).
    pub risk: String,
}

fn user_cost_dto(v: CostView) -> UserCostDto {
    let limit = v.limits.monthly_cost_limit_micros;
    UserCostDto {
        user_id: v.account.to_string(),
        tier: v.tier,
        month_cost: usd(v.month_cost_micros),
        day_cost: usd(v.day_cost_micros),
        monthly_limit: limit.map(usd),
        pct_of_limit: limit.filter(|l| *l > 0).map(|l| (Decimal::from(v.month_cost_micros) * Decimal::from(100) / Decimal::from(l)).round_dp(1).to_string()),
        throttled: v.throttle.is_some(),
        throttle_reason: v.throttle.as_ref().map(|t| throttle_text(&t.reason)),
        throttle_kind: v.throttle.as_ref().map(|t| t.reason.code().into()),
        throttled_since: v.throttle.as_ref().map(|t| time(t.since)),
        risk: v.risk.as_str().into(),
    }
}

/// The library's text, with an admin's throttle said in full (`throttled by ops: abuse`).
fn throttle_text(r: &ThrottleReason) -> String {
    match r {
        ThrottleReason::Admin { by, why } => format!("throttled by {by}: {why}"),
        limit => limit.to_string(),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// The last user id of the previous page.
    pub after: Option<String>,
    /// 1..=500 (default 100).
    pub limit: Option<u32>,
}

async fn cost_list(state: &AppState, filter: CostFilter, p: ListParams) -> ApiResult<Json<Vec<UserCostDto>>> {
    let limit = p.limit.unwrap_or(100);
    if !(1..=MAX_LIST).contains(&limit) {
        return Err(ApiError::invalid("limit", format!("must be in 1..={MAX_LIST}")));
    }
    let after = p.after.as_deref().map(AccountId::new).transpose()?;
    let list = state.store.cost_accounts(filter, after.as_ref(), limit).await?;
    Ok(Json(list.into_iter().map(user_cost_dto).collect()))
}

#[utoipa::path(get, path = "/api/v1/admin/cost-analytics/users-at-risk", tag = "admin", params(ListParams),
    description = "Users above 75 % of their monthly cost limit.",
    responses((status = 200, body = Vec<UserCostDto>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn users_at_risk(State(state): State<AppStateRef>, _admin: Admin, Q(p): Q<ListParams>) -> ApiResult<Json<Vec<UserCostDto>>> {
    cost_list(&state, CostFilter::AtRisk, p).await
}

#[utoipa::path(get, path = "/api/v1/admin/cost-analytics/high-risk-users", tag = "admin", params(ListParams),
    responses((status = 200, body = Vec<UserCostDto>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn high_risk_users(State(state): State<AppStateRef>, _admin: Admin, Q(p): Q<ListParams>) -> ApiResult<Json<Vec<UserCostDto>>> {
    cost_list(&state, CostFilter::HighRisk, p).await
}

#[utoipa::path(get, path = "/api/v1/admin/cost-analytics/throttled-users", tag = "admin", params(ListParams),
    responses((status = 200, body = Vec<UserCostDto>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn throttled_users(State(state): State<AppStateRef>, _admin: Admin, Q(p): Q<ListParams>) -> ApiResult<Json<Vec<UserCostDto>>> {
    cost_list(&state, CostFilter::Throttled, p).await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TopParams {
    /// 1..=100 (default 10).
    pub limit: Option<u32>,
}

/// Most users scanned for the top spenders.
const MAX_SCAN: usize = 200_000;

#[utoipa::path(get, path = "/api/v1/admin/cost-analytics/top-spenders", tag = "admin", params(TopParams),
    responses((status = 200, body = Vec<UserCostDto>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn top_spenders(State(state): State<AppStateRef>, _admin: Admin, Q(p): Q<TopParams>) -> ApiResult<Json<Vec<UserCostDto>>> {
    let limit = p.limit.unwrap_or(10);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be in 1..=100"));
    }
    let mut top: Vec<CostView> = Vec::new();
    let mut after: Option<AccountId> = None;
    let mut scanned = 0;
    loop {
        let page = state.store.cost_accounts(CostFilter::All, after.as_ref(), 1_000).await?;
        let Some(last) = page.last().map(|v| v.account.clone()) else { break };
        scanned += page.len();
        top.extend(page.into_iter().filter(|v| v.month_cost_micros > 0));
        top.sort_by(|a, b| b.month_cost_micros.cmp(&a.month_cost_micros).then_with(|| a.account.cmp(&b.account)));
        top.truncate(limit as usize);
        if scanned >= MAX_SCAN {
            break;
        }
        after = Some(last);
    }
    Ok(Json(top.into_iter().map(user_cost_dto).collect()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DailyParams {
    /// Days back from today, 1..=400 (default 30).
    pub days: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DayDto {
    pub day: String,
    pub runs: u64,
    pub credits: i64,
    pub cost: String,
    /// Plan revenue of the month spread evenly over its days, plus packs paid that day.
    pub revenue: String,
}

#[utoipa::path(get, path = "/api/v1/admin/cost-analytics/daily", tag = "admin", params(DailyParams),
    description = "Cost and revenue per day (the dashboard's chart). Cost comes from the daily usage rollups (refreshed hourly).",
    responses((status = 200, body = Vec<DayDto>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
async fn daily(State(state): State<AppStateRef>, _admin: Admin, Q(p): Q<DailyParams>) -> ApiResult<Json<Vec<DayDto>>> {
    let days = p.days.unwrap_or(30);
    if !(1..=400).contains(&days) {
        return Err(ApiError::invalid("days", "must be in 1..=400"));
    }
    let today = state.clock.now().date_naive();
    let from = today - chrono::Days::new(u64::from(days) - 1);
    let until = today + chrono::Days::new(1);
    let usage = state.store.daily_usage(&DailyUsageQuery { account: None, from, until }).await?;
    let summary = state.store.summary().await?;
    // Packs paid per day.
    let mut packs: std::collections::HashMap<NaiveDate, i64> = std::collections::HashMap::new();
    let mut after: Option<String> = None;
    for _ in 0..100 {
        let page = state.store.purchases(after.as_deref(), 1_000).await?;
        let Some(last) = page.last().map(|p| p.id.clone()) else { break };
        for pu in page {
            if pu.kind == prpm_playground_core::purchase::PurchaseKind::Pack && pu.credited {
                let day = pu.created_at.date_naive();
                if day >= from && day < until {
                    *packs.entry(day).or_default() += (pu.amount_cents - pu.refunded_cents) * 10_000;
                }
            }
        }
        after = Some(last);
    }
    let mut out = Vec::with_capacity(days as usize);
    let mut day = from;
    while day < until {
        let u = usage.iter().find(|u| u.day == day);
        let month_days = days_in_month(day);
        let plan = summary.total_monthly_revenue_micros / month_days;
        out.push(DayDto {
            day: day.to_string(),
            runs: u.map_or(0, |u| u.runs),
            credits: u.map_or(0, |u| u.credits),
            cost: usd(u.map_or(0, |u| u.cost_micros)),
            revenue: usd(plan + packs.get(&day).copied().unwrap_or(0)),
        });
        day = day + chrono::Days::new(1);
    }
    Ok(Json(out))
}

fn days_in_month(d: NaiveDate) -> i64 {
    use chrono::Datelike;
    let first = d.with_day(1).expect("day 1");
    ((first + chrono::Months::new(1)) - first).num_days()
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ThrottleBody {
    /// Why (kept in the log).
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DoneDto {
    pub done: bool,
    /// `true` when the request changed nothing (already in that state).
    pub unchanged: bool,
}

async fn set_throttle(state: AppStateRef, admin: Admin, id: String, body: Bytes, throttle: bool) -> ApiResult<Json<DoneDto>> {
    let b: ThrottleBody = json_body(&body)?;
    let account = AccountId::new(&id).map_err(|_| ApiError::not_found("user"))?;
    let why = b.reason.unwrap_or_else(|| if throttle { "throttled by an admin" } else { "unthrottled by an admin" }.into());
    // Each admin action is its own command (repeating one is harmless: already in that state).
    let key = IdempotencyKey::generate();
    let cmd = AdminThrottle { account, by: admin.account.to_string(), why, key };
    let outcome = if throttle { state.store.throttle(cmd).await? } else { state.store.unthrottle(cmd).await? };
    match outcome {
        Ok(_) => Ok(Json(DoneDto { done: true, unchanged: false })),
        Err(Rejection::NotThrottled | Rejection::AlreadyThrottled) => Ok(Json(DoneDto { done: true, unchanged: true })),
        Err(r) => Err(state.rejected(r)),
    }
}

#[utoipa::path(post, path = "/api/v1/admin/cost-analytics/users/{id}/unthrottle", tag = "admin", params(("id" = String, Path)), request_body = ThrottleBody,
    responses((status = 200, body = DoneDto), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn unthrottle(State(state): State<AppStateRef>, admin: Admin, P(id): P<String>, body: Bytes) -> ApiResult<Json<DoneDto>> {
    set_throttle(state, admin, id, body, false).await
}

#[utoipa::path(post, path = "/api/v1/admin/cost-analytics/users/{id}/throttle", tag = "admin", params(("id" = String, Path)), request_body = ThrottleBody,
    responses((status = 200, body = DoneDto), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn throttle(State(state): State<AppStateRef>, admin: Admin, P(id): P<String>, body: Bytes) -> ApiResult<Json<DoneDto>> {
    set_throttle(state, admin, id, body, true).await
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierDto {
    pub name: String,
    /// USD a user of the tier pays per month.
    pub monthly_revenue: String,
    pub monthly_cost_limit: Option<String>,
    pub daily_cost_limit: Option<String>,
    pub hourly_request_limit: Option<u32>,
    pub alert_threshold_pct: Option<u32>,
    pub throttle_on_exceed: bool,
}

fn micros(field: &str, s: &str) -> ApiResult<i64> {
    let d: Decimal = s.parse().map_err(|_| ApiError::invalid(field, "must be a decimal USD amount"))?;
    prpm_playground_core::cost::usd_to_micros(d).map_err(|e| match e {
        Error::InvalidInput { reason, .. } => ApiError::invalid(field, reason),
        other => other.into(),
    })
}

#[utoipa::path(get, path = "/api/v1/admin/cost-analytics/tier-limits", tag = "admin",
    responses((status = 200, body = Vec<TierDto>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn tier_limits(State(state): State<AppStateRef>, _admin: Admin) -> ApiResult<Json<Vec<TierDto>>> {
    let tiers = state.store.tiers().await?;
    Ok(Json(
        tiers
            .tiers()
            .map(|t| TierDto {
                name: t.name.clone(),
                monthly_revenue: usd(t.monthly_revenue_micros),
                monthly_cost_limit: t.monthly_cost_limit_micros.map(usd),
                daily_cost_limit: t.daily_cost_limit_micros.map(usd),
                hourly_request_limit: t.hourly_request_limit,
                alert_threshold_pct: t.alert_threshold_pct,
                throttle_on_exceed: t.throttle_on_exceed,
            })
            .collect(),
    ))
}

#[utoipa::path(put, path = "/api/v1/admin/cost-analytics/tier-limits/{name}", tag = "admin", params(("name" = String, Path)), request_body = TierDto,
    responses((status = 200, body = TierDto), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn put_tier(State(state): State<AppStateRef>, _admin: Admin, P(name): P<String>, body: Bytes) -> ApiResult<Json<TierDto>> {
    let t: TierDto = json_body(&body)?;
    if t.name != name {
        return Err(ApiError::invalid("name", "must match the path"));
    }
    let limits = TierLimits {
        name: t.name.clone(),
        monthly_revenue_micros: micros("monthlyRevenue", &t.monthly_revenue)?,
        monthly_cost_limit_micros: t.monthly_cost_limit.as_deref().map(|s| micros("monthlyCostLimit", s)).transpose()?,
        daily_cost_limit_micros: t.daily_cost_limit.as_deref().map(|s| micros("dailyCostLimit", s)).transpose()?,
        hourly_request_limit: t.hourly_request_limit,
        alert_threshold_pct: t.alert_threshold_pct,
        throttle_on_exceed: t.throttle_on_exceed,
    };
    let key = IdempotencyKey::generate();
    match state.store.set_tier(limits, key).await? {
        Ok(_) => Ok(Json(t)),
        Err(r) => Err(state.rejected(r)),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrantBody {
    /// Credits to add, 1..=1,000,000.
    pub credits: i64,
    /// `purchased` (default, never expires), `monthly` or `rollover` (expiring at `expiresAt`,
    /// by default a month from now).
    pub bucket: Option<String>,
    /// `admin` (default) or `bonus`.
    pub source: Option<String>,
    pub expires_at: Option<String>,
    /// Kept in the log.
    pub reference: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/admin/users/{id}/credits", tag = "admin", params(("id" = String, Path)), request_body = GrantBody,
    description = "Grants credits to a user (created if new). With an `Idempotency-Key`, a repeat grants nothing more.",
    responses((status = 200, body = BalanceDto), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
async fn grant_credits(State(state): State<AppStateRef>, admin: Admin, P(id): P<String>, method: Method, headers: HeaderMap, body: Bytes) -> Response {
    let path = format!("/api/v1/admin/users/{id}/credits");
    let st = state.clone();
    let b = body.clone();
    let by = admin.account.clone();
    keyed(&state, &by, &headers, &method, &path, &b, async move {
        let r: ApiResult<Json<BalanceDto>> = async {
            let g: GrantBody = json_body(&body)?;
            let account = AccountId::new(&id)?;
            let bucket = match g.bucket.as_deref() {
                None | Some("purchased") => Bucket::Purchased,
                Some("monthly") => Bucket::Monthly,
                Some("rollover") => Bucket::Rollover,
                Some(_) => return Err(ApiError::invalid("bucket", "purchased, monthly or rollover")),
            };
            let source = match g.source.as_deref() {
                None | Some("admin") => GrantSource::Admin,
                Some("bonus") => GrantSource::Bonus,
                Some(_) => return Err(ApiError::invalid("source", "admin or bonus")),
            };
            if !(1..=1_000_000).contains(&g.credits) {
                return Err(ApiError::invalid("credits", "must be in 1..=1000000"));
            }
            st.ensure_account(&account).await?;
            let grant = Grant {
                account: account.clone(),
                bucket,
                amount: g.credits,
                source,
                expires_at: g.expires_at.as_deref().map(|t| parse_time("expiresAt", t)).transpose()?,
                reference: g.reference.unwrap_or_else(|| format!("granted by {}", admin.account)),
                key: IdempotencyKey::generate(),
            };
            match st.store.grant(grant).await? {
                Ok(_) => credits(State(st.clone()), Caller { account, role: AuthRole::User }).await,
                Err(r) => Err(st.rejected(r)),
            }
        }
        .await;
        r.into_response()
    })
    .await
}

#[utoipa::path(post, path = "/api/v1/admin/jobs/{job}", tag = "admin",
    params(("job" = String, Path, description = "cost-reset, analytics-refresh, monthly-credit-reset, rollover-expiration or expire-holds")),
    responses((status = 200, body = JobResult), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn run_job(State(state): State<AppStateRef>, _admin: Admin, P(job): P<String>) -> ApiResult<Json<JobResult>> {
    let job = Job::parse(&job).ok_or_else(|| ApiError::not_found("job"))?;
    Ok(Json(scheduler::run_job(&state, job).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PackageBody {
    pub name: String,
    pub version: String,
    /// The system prompt.
    pub prompt: String,
}

#[utoipa::path(put, path = "/api/v1/admin/packages/{id}", tag = "admin", params(("id" = String, Path)), request_body = PackageBody,
    description = "Stores (or replaces) a package's prompt, for self-hosting without the registry.",
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn put_package(State(state): State<AppStateRef>, _admin: Admin, P(id): P<String>, body: Bytes) -> ApiResult<StatusCode> {
    let b: PackageBody = json_body(&body)?;
    state.store.put_package(&Package { id, name: b.name, version: b.version, prompt: b.prompt }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClockBody {
    /// Set the clock to this RFC 3339 time (never backwards).
    pub now: Option<String>,
    /// Or move it forward by this many seconds.
    pub advance_secs: Option<i64>,
}

#[utoipa::path(post, path = "/api/v1/admin/test/clock", tag = "admin", request_body = ClockBody,
    description = "Only with `PRPM_TEST_CLOCK=1` (end-to-end tests): moves the server's clock forward.",
    responses((status = 200, body = String), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn test_clock(State(state): State<AppStateRef>, _admin: Admin, body: Bytes) -> ApiResult<Json<String>> {
    let clock = state.manual_clock.as_ref().ok_or_else(|| ApiError::not_found("route"))?;
    let b: ClockBody = json_body(&body)?;
    let now = clock.now();
    let to = match (b.now, b.advance_secs) {
        (Some(t), None) => parse_time("now", &t)?,
        (None, Some(s)) if (0..=400 * 86_400).contains(&s) => now + chrono::Duration::seconds(s),
        _ => return Err(ApiError::invalid("body", "give `now` or `advanceSecs` (0..=400 days)")),
    };
    if to < now {
        return Err(ApiError::invalid("now", "the clock never goes back"));
    }
    clock.set(to);
    Ok(Json(time(to)))
}

// ---- operations -------------------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthDto {
    /// `ok`, or `unavailable` with a 503.
    pub status: String,
    pub database: String,
}

#[utoipa::path(get, path = "/healthz", tag = "operations", description = "Public: whether the database answers.",
    responses((status = 200, body = HealthDto), (status = 503, body = HealthDto)))]
async fn healthz(State(state): State<AppStateRef>) -> Response {
    match tokio::time::timeout(std::time::Duration::from_secs(5), state.store.tiers()).await {
        Ok(Ok(_)) => Json(HealthDto { status: "ok".into(), database: "reachable".into() }).into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check: database failed");
            (StatusCode::SERVICE_UNAVAILABLE, Json(HealthDto { status: "unavailable".into(), database: "error".into() })).into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, Json(HealthDto { status: "unavailable".into(), database: "timeout".into() })).into_response(),
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations", description = "Prometheus text format (admin).",
    responses((status = 200, content_type = "text/plain", body = String), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn metrics(State(state): State<AppStateRef>, _admin: Admin) -> Response {
    let mut res = state.metrics.render().into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    res
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

async fn not_found() -> ApiError {
    ApiError::not_found("route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this route does not take that method")
}

#[derive(OpenApi)]
#[openapi(
    info(title = "prpm-playground", description = "Pricing, gating, metering and billing of LLM playground runs."),
    modifiers(&BearerAuth),
    tags((name = "playground"), (name = "sessions"), (name = "credits"), (name = "stripe"), (name = "admin"), (name = "operations"))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()));
    }
}

/// Every route; the OpenAPI document is built from the same list.
pub fn api() -> (axum::Router<AppStateRef>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(estimate))
        .routes(routes!(run))
        .routes(routes!(list_sessions))
        .routes(routes!(get_session, delete_session))
        .routes(routes!(share_session, revoke_share))
        .routes(routes!(shared))
        .routes(routes!(credits))
        .routes(routes!(history))
        .routes(routes!(packages))
        .routes(routes!(purchase))
        .routes(routes!(subscribe))
        .routes(routes!(stripe_webhook))
        .routes(routes!(admin_summary))
        .routes(routes!(users_at_risk))
        .routes(routes!(high_risk_users))
        .routes(routes!(throttled_users))
        .routes(routes!(top_spenders))
        .routes(routes!(daily))
        .routes(routes!(unthrottle))
        .routes(routes!(throttle))
        .routes(routes!(tier_limits))
        .routes(routes!(put_tier))
        .routes(routes!(run_job))
        .routes(routes!(grant_credits))
        .routes(routes!(put_package))
        .routes(routes!(test_clock))
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .split_for_parts()
}

pub fn router(state: AppStateRef, frontend_url: Option<&str>, max_body_bytes: usize) -> axum::Router {
    let (api, doc) = api();
    let doc = Arc::new(doc);
    let metrics_state = state.clone();
    let mut app = api
        .route("/openapi.json", axum::routing::get(move || async move { Json((*doc).clone()) }))
        .route("/admin", axum::routing::get(dashboard))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            let m = metrics_state.clone();
            async move {
                let res = next.run(req).await;
                m.metrics.response(res.status().as_u16());
                res
            }
        }))
        .layer(axum::middleware::from_fn(limit_body))
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes));
    if let Some(origin) = frontend_url.and_then(|u| HeaderValue::from_str(u.trim_end_matches('/')).ok()) {
        use tower_http::cors::CorsLayer;
        app = app.layer(CorsLayer::new().allow_origin(origin).allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE]).allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            "idempotency-key".parse().expect("header name"),
        ]));
    }
    app.with_state(state)
}

/// A body over the limit is a JSON 413 (axum's own rejection is plain text).
async fn limit_body(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let res = next.run(req).await;
    if res.status() == StatusCode::PAYLOAD_TOO_LARGE && res.headers().get(header::CONTENT_TYPE).is_none_or(|c| !c.as_bytes().starts_with(b"application/json")) {
        return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "the request body is over the server's limit").into_response();
    }
    res
}
