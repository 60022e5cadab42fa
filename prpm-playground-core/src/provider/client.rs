//! The HTTP client: one per provider, with timeouts, bounded retries with backoff and jitter,
//! and streaming.

use std::collections::VecDeque;
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderMap};
use serde::{Deserialize, Serialize};

use super::ProviderError;
use super::sse::SseDecoder;
use super::wire::{self, ReportedUsage, StreamState, StreamStep};
use crate::error::{Error, Result};
use crate::pricing::{Provider, TokenUsage};
use crate::session::Role;

/// Largest response body read (a completion, or an error body).
const MAX_BODY_BYTES: usize = 16 << 20;
const MAX_ERROR_BODY_BYTES: usize = 64 << 10;
/// Upper bound of [`ClientConfig::max_retries`].
pub const MAX_RETRIES: u32 = 10;

/// An API key. Its `Debug` form never shows it, and no error message includes it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Result<Self> {
        let key = key.into();
        if key.is_empty() || key.len() > 1024 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::invalid("api_key", "must be 1..=1024 printable ASCII characters"));
        }
        Ok(ApiKey(key))
    }
    /// The key as a header value marked sensitive (kept out of logs and debug output).
    fn header(&self) -> Result<reqwest::header::HeaderValue, ProviderError> {
        let mut v = reqwest::header::HeaderValue::from_str(&self.0).map_err(|_| ProviderError::Auth("the API key is not a valid header value".into()))?;
        v.set_sensitive(true);
        Ok(v)
    }
    fn bearer(&self) -> Result<reqwest::header::HeaderValue, ProviderError> {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", self.0))
            .map_err(|_| ProviderError::Auth("the API key is not a valid header value".into()))?;
        v.set_sensitive(true);
        Ok(v)
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// How to reach one provider.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub provider: Provider,
    /// `https://api.anthropic.com` for Anthropic (the client adds `/v1/messages`);
    /// `https://api.openai.com/v1` for OpenAI and the equivalent for a compatible server (the
    /// client adds `/chat/completions`), as the official SDKs take them.
    pub base_url: String,
    pub api_key: Option<ApiKey>,
    /// Time to open a connection.
    pub connect_timeout: Duration,
    /// Time for one attempt, from sending the request to the end of the response (stream
    /// included).
    pub total_timeout: Duration,
    /// Retries after the first attempt, on connection errors, 429 and 5xx only.
    pub max_retries: u32,
    /// Backoff before retry n (0-based): `backoff_base * 2^n`, at most `backoff_max`, with
    /// jitter (a random point in its upper half).
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A `retry-after` longer than this is not waited for: the call fails as rate limited.
    pub max_retry_after: Duration,
}

impl ClientConfig {
    fn with(provider: Provider, base_url: &str, api_key: Option<ApiKey>) -> Self {
        ClientConfig {
            provider,
            base_url: base_url.to_owned(),
            api_key,
            connect_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(300),
            max_retries: 2,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(30),
        }
    }
    pub fn anthropic(key: ApiKey) -> Self {
        ClientConfig::with(Provider::Anthropic, "https://api.anthropic.com", Some(key))
    }
    pub fn openai(key: ApiKey) -> Self {
        ClientConfig::with(Provider::Openai, "https://api.openai.com/v1", Some(key))
    }
    /// An OpenAI-compatible server (vLLM, llama.cpp, Ollama, ...); the key is optional.
    pub fn compatible(base_url: &str, key: Option<ApiKey>) -> Self {
        ClientConfig::with(Provider::OpenaiCompatible, base_url, key)
    }

    /// From the environment: `ANTHROPIC_API_KEY` (and optional `ANTHROPIC_BASE_URL`),
    /// `OPENAI_API_KEY` (`OPENAI_BASE_URL`), or `OPENAI_COMPATIBLE_BASE_URL` (and optional
    /// `OPENAI_COMPATIBLE_API_KEY`). `Ok(None)` when the provider is not configured.
    pub fn from_env(provider: Provider) -> Result<Option<Self>> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let cfg = match provider {
            Provider::Anthropic => var("ANTHROPIC_API_KEY").map(ApiKey::new).transpose()?.map(|k| {
                let mut c = ClientConfig::anthropic(k);
                if let Some(u) = var("ANTHROPIC_BASE_URL") {
                    c.base_url = u;
                }
                c
            }),
            Provider::Openai => var("OPENAI_API_KEY").map(ApiKey::new).transpose()?.map(|k| {
                let mut c = ClientConfig::openai(k);
                if let Some(u) = var("OPENAI_BASE_URL") {
                    c.base_url = u;
                }
                c
            }),
            Provider::OpenaiCompatible => match var("OPENAI_COMPATIBLE_BASE_URL") {
                Some(u) => Some(ClientConfig::compatible(&u, var("OPENAI_COMPATIBLE_API_KEY").map(ApiKey::new).transpose()?)),
                None => None,
            },
        };
        if let Some(c) = &cfg {
            c.validate()?;
        }
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let url = reqwest::Url::parse(&self.base_url).map_err(|e| Error::invalid("base_url", e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(Error::invalid("base_url", "must be an http or https URL"));
        }
        if self.provider != Provider::OpenaiCompatible && self.api_key.is_none() {
            return Err(Error::invalid("api_key", "required for this provider"));
        }
        if self.max_retries > MAX_RETRIES {
            return Err(Error::invalid("max_retries", format!("at most {MAX_RETRIES}")));
        }
        for (field, d) in [("connect_timeout", self.connect_timeout), ("total_timeout", self.total_timeout)] {
            if d.is_zero() || d > Duration::from_secs(3_600) {
                return Err(Error::invalid(field, "must be between 1 ms and an hour"));
            }
        }
        if self.backoff_base > self.backoff_max || self.backoff_max > Duration::from_secs(300) || self.max_retry_after > Duration::from_secs(3_600) {
            return Err(Error::invalid("backoff", "backoff_base <= backoff_max <= 300 s, max_retry_after <= 1 h"));
        }
        Ok(())
    }

    fn endpoint(&self) -> String {
        let base = self.base_url.trim_end_matches('/');
        match self.provider {
            Provider::Anthropic => format!("{base}/v1/messages"),
            Provider::Openai | Provider::OpenaiCompatible => format!("{base}/chat/completions"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

/// One model call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    /// The system prompt (the package's prompt).
    pub system: Option<String>,
    /// The conversation, oldest first, ending with the user's input.
    pub messages: Vec<ChatMessage>,
    pub max_tokens: u32,
    pub temperature: Option<f32>,
}

/// A complete answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatResponse {
    pub id: String,
    pub model: String,
    pub text: String,
    pub usage: TokenUsage,
    /// False when an OpenAI-compatible server reported no usage (many ignore
    /// `stream_options.include_usage`); `usage` is then zero and the caller counts.
    pub usage_reported: bool,
    pub stop_reason: Option<String>,
}

/// What a stream yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// Text as it arrives.
    Delta(String),
    /// The end, with the provider's final usage. Nothing follows.
    Done(ChatResponse),
}

/// A client for one provider. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProviderClient {
    cfg: ClientConfig,
    http: reqwest::Client,
}

impl ProviderClient {
    pub fn new(cfg: ClientConfig) -> Result<Self> {
        cfg.validate()?;
        // One crypto provider for the whole process (ring); a second install is a no-op error.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // No redirects: reqwest strips `Authorization` on a cross-host redirect but not
        // Anthropic's `x-api-key`, and a provider API has no reason to redirect.
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Backend(format!("cannot build the HTTP client: {e}")))?;
        Ok(ProviderClient { cfg, http })
    }

    pub fn provider(&self) -> Provider {
        self.cfg.provider
    }

    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// A complete (non-streaming) call.
    pub async fn complete(&self, req: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let resp = self.send(req, false).await?;
        let body = read_limited(resp, MAX_BODY_BYTES).await?;
        wire::parse_response(self.cfg.provider, &body)
    }

    /// A streaming call: the request is retried like [`ProviderClient::complete`] until the
    /// provider accepts it; once the stream has started nothing is retried.
    pub async fn stream(&self, req: &ChatRequest) -> Result<ChatStream, ProviderError> {
        let resp = self.send(req, true).await?;
        let ct = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !ct.starts_with("text/event-stream") {
            return Err(ProviderError::Malformed(format!("expected an event stream, got content type {ct:?}")));
        }
        Ok(ChatStream {
            provider: self.cfg.provider,
            resp,
            decoder: SseDecoder::default(),
            state: StreamState::default(),
            text: String::new(),
            pending: VecDeque::new(),
            finished: false,
        })
    }

    async fn send(&self, req: &ChatRequest, stream: bool) -> Result<reqwest::Response, ProviderError> {
        let body = wire::request_body(self.cfg.provider, req, stream);
        let url = self.cfg.endpoint();
        let mut attempt = 0u32;
        loop {
            let mut rb = self.http.post(&url).json(&body).timeout(self.cfg.total_timeout);
            rb = match (self.cfg.provider, &self.cfg.api_key) {
                (Provider::Anthropic, Some(k)) => rb.header("x-api-key", k.header()?).header("anthropic-version", "2023-06-01"),
                (_, Some(k)) => rb.header(reqwest::header::AUTHORIZATION, k.bearer()?),
                (_, None) => rb,
            };
            let (err, wait) = match rb.send().await {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = retry_after(resp.headers());
                    let msg = read_limited(resp, MAX_ERROR_BODY_BYTES).await.map(|b| wire::error_message(&b)).unwrap_or_default();
                    match status {
                        401 | 403 => return Err(ProviderError::Auth(format!("HTTP {status}: {msg}"))),
                        429 => {
                            let err = ProviderError::RateLimited { retry_after_ms: retry_after.map(|d| d.as_millis() as u64) };
                            if retry_after.is_some_and(|d| d > self.cfg.max_retry_after) {
                                return Err(err);
                            }
                            (err, retry_after)
                        }
                        // 529: Anthropic's "overloaded".
                        500..=599 | 408 => {
                            (ProviderError::Unavailable(format!("HTTP {status}: {msg}")), retry_after.filter(|d| *d <= self.cfg.max_retry_after))
                        }
                        _ => return Err(ProviderError::BadRequest(format!("HTTP {status}: {msg}"))),
                    }
                }
                // Not retried: the provider may be running (and billing) the request already.
                Err(e) if e.is_timeout() && !e.is_connect() => {
                    return Err(ProviderError::Unavailable(format!("no answer within {:?}", self.cfg.total_timeout)));
                }
                Err(e) => (ProviderError::Unavailable(format!("connection failed: {}", without_url(&e))), None),
            };
            if attempt >= self.cfg.max_retries {
                return Err(err);
            }
            tokio::time::sleep(wait.unwrap_or_else(|| self.backoff(attempt))).await;
            attempt += 1;
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let d = self.cfg.backoff_base.saturating_mul(1u32 << attempt.min(16)).min(self.cfg.backoff_max);
        let half = d / 2;
        let mut r = [0u8; 8];
        let _ = getrandom::fill(&mut r);
        let span = (d - half).as_nanos().max(1) as u64;
        half + Duration::from_nanos(u64::from_le_bytes(r) % span)
    }
}

/// reqwest's message without the URL (it carries no key, but keeps messages short and stable).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(&format!(" ({u})"), "").replace(u.as_str(), "<endpoint>");
    }
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// `retry-after-ms` (milliseconds), else `retry-after` in seconds (an HTTP date is ignored:
/// the backoff applies).
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<u64>().ok()) {
        return Some(Duration::from_millis(ms));
    }
    let v = text("retry-after")?;
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: u64 = secs.parse().ok()?;
    let frac_ms: u64 = if frac.is_empty() {
        0
    } else if frac.len() <= 9 && frac.bytes().all(|b| b.is_ascii_digit()) {
        format!("{frac:0<3}")[..3].parse().ok()?
    } else {
        return None;
    };
    Some(Duration::from_secs(secs.min(86_400)) + Duration::from_millis(frac_ms))
}

async fn read_limited(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, ProviderError> {
    let mut out = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if out.len() + c.len() > max {
                    return Err(ProviderError::Malformed(format!("response body over {max} bytes")));
                }
                out.extend_from_slice(&c);
            }
            Ok(None) => return Ok(out),
            Err(e) if e.is_timeout() => return Err(ProviderError::Unavailable("timed out reading the response".into())),
            Err(e) => return Err(ProviderError::Unavailable(format!("reading the response: {}", without_url(&e)))),
        }
    }
}

/// A response being streamed. Read it with [`ChatStream::next`]; what has arrived so far is
/// in [`ChatStream::text`] and [`ChatStream::reported_usage`], which is what a broken stream
/// is settled on.
#[derive(Debug)]
pub struct ChatStream {
    provider: Provider,
    resp: reqwest::Response,
    decoder: SseDecoder,
    state: StreamState,
    text: String,
    pending: VecDeque<Result<StreamEvent, ProviderError>>,
    finished: bool,
}

impl ChatStream {
    /// The next event; `None` after `Done` or an error.
    pub async fn next(&mut self) -> Option<Result<StreamEvent, ProviderError>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.finished {
                return None;
            }
            let chunk = match self.resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => {
                    self.finished = true;
                    return Some(Err(ProviderError::Unavailable("the stream ended before the response was complete".into())));
                }
                Err(e) => {
                    self.finished = true;
                    let why = if e.is_timeout() { "timed out".to_owned() } else { without_url(&e) };
                    return Some(Err(ProviderError::Unavailable(format!("the stream broke: {why}"))));
                }
            };
            let events = match self.decoder.feed(&chunk) {
                Ok(ev) => ev,
                Err(e) => {
                    self.finished = true;
                    return Some(Err(ProviderError::Malformed(e)));
                }
            };
            for ev in events {
                match wire::stream_event(self.provider, &mut self.state, &ev.event, &ev.data) {
                    Ok(StreamStep::Nothing) => {}
                    Ok(StreamStep::Text(t)) => {
                        self.text.push_str(&t);
                        self.pending.push_back(Ok(StreamEvent::Delta(t)));
                    }
                    Ok(StreamStep::Finished) => {
                        self.finished = true;
                        let usage = match self.state.usage.complete() {
                            Some(u) => Some((u, true)),
                            None if self.provider == Provider::OpenaiCompatible => Some((TokenUsage::default(), false)),
                            None => None,
                        };
                        let done = match usage {
                            Some((usage, usage_reported)) => Ok(StreamEvent::Done(ChatResponse {
                                id: self.state.id.clone(),
                                model: self.state.model.clone(),
                                text: self.text.clone(),
                                usage,
                                usage_reported,
                                stop_reason: self.state.stop_reason.clone(),
                            })),
                            None => Err(ProviderError::Malformed("the stream ended without usage".into())),
                        };
                        self.pending.push_back(done);
                        break;
                    }
                    Err(e) => {
                        self.finished = true;
                        self.pending.push_back(Err(e));
                        break;
                    }
                }
            }
        }
    }

    /// The text received so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The usage the provider has reported so far (Anthropic reports input at the start and
    /// output as it goes; OpenAI only at the end).
    pub fn reported_usage(&self) -> ReportedUsage {
        self.state.usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after", "1.25".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1_250)));
        h.insert("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after-ms", "40".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(40)));
    }

    #[test]
    fn keys_never_show() {
        let k = ApiKey::new("sk-secret-123").unwrap();
        assert_eq!(format!("{k:?}"), "ApiKey(***)");
        assert!(!format!("{:?}", ClientConfig::openai(k)).contains("secret"));
        assert!(ApiKey::new("has space").is_err());
    }

    #[test]
    fn config_validation() {
        let k = ApiKey::new("k").unwrap();
        assert!(ClientConfig { base_url: "ftp://x".into(), ..ClientConfig::openai(k.clone()) }.validate().is_err());
        assert!(ClientConfig { max_retries: 11, ..ClientConfig::openai(k.clone()) }.validate().is_err());
        assert!(ClientConfig { api_key: None, ..ClientConfig::anthropic(k) }.validate().is_err());
        ClientConfig::compatible("http://127.0.0.1:8080/v1", None).validate().unwrap();
    }
}
