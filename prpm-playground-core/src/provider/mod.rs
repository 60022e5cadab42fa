//! The provider client: Anthropic Messages, OpenAI Chat Completions and OpenAI-compatible
//! servers over HTTP, with timeouts, bounded retries, streaming and exact usage pricing.

/// What a provider call can fail with. Every variant has a stable [`ProviderError::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The provider could not be reached, timed out, or kept failing (5xx) past the retries.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    /// The provider kept answering 429 past the retries; `retry_after_ms` is its last hint.
    #[error("provider rate limited (retry after {retry_after_ms:?} ms)")]
    RateLimited { retry_after_ms: Option<u64> },
    /// The provider refused the request as malformed (4xx other than 401/403/429).
    #[error("provider refused the request: {0}")]
    BadRequest(String),
    /// The API key is missing, wrong or not allowed (401/403).
    #[error("provider authentication failed: {0}")]
    Auth(String),
    /// The provider's answer could not be understood.
    #[error("malformed provider response: {0}")]
    Malformed(String),
}

impl ProviderError {
    pub fn code(&self) -> &'static str {
        match self {
            ProviderError::Unavailable(_) => "provider_unavailable",
            ProviderError::RateLimited { .. } => "provider_rate_limited",
            ProviderError::BadRequest(_) => "provider_bad_request",
            ProviderError::Auth(_) => "provider_auth",
            ProviderError::Malformed(_) => "provider_malformed",
        }
    }
}

mod client;
pub mod fake;
mod sse;
pub mod tokens;
mod wire;

pub use client::{ApiKey, ChatMessage, ChatRequest, ChatResponse, ChatStream, ClientConfig, ProviderClient, StreamEvent};
pub use wire::ReportedUsage;
