//! The providers' wire formats: request bodies, responses, stream events and error bodies, as
//! the Anthropic Messages API and the OpenAI Chat Completions API document them.

use serde::Deserialize;
use serde_json::{Value, json};

use super::ProviderError;
use super::client::{ChatRequest, ChatResponse};
use crate::pricing::{Provider, TokenUsage};

/// Usage as far as the provider has reported it (a stream reports it in pieces).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReportedUsage {
    pub input: Option<u64>,
    pub output: Option<u64>,
    pub cache_read: Option<u64>,
    pub cache_write: Option<u64>,
}

impl ReportedUsage {
    /// Complete usage, if input and output are both known.
    pub fn complete(&self) -> Option<TokenUsage> {
        Some(TokenUsage { input: self.input?, output: self.output?, cache_read: self.cache_read.unwrap_or(0), cache_write: self.cache_write.unwrap_or(0) })
    }
}

pub fn request_body(provider: Provider, req: &ChatRequest, stream: bool) -> Value {
    let messages: Vec<Value> = req.messages.iter().map(|m| json!({"role": m.role.as_str(), "content": m.content})).collect();
    match provider {
        Provider::Anthropic => {
            let mut body = json!({"model": req.model, "max_tokens": req.max_tokens, "messages": messages});
            if let Some(s) = req.system.as_deref().filter(|s| !s.is_empty()) {
                body["system"] = json!(s);
            }
            if let Some(t) = req.temperature {
                body["temperature"] = json!(t);
            }
            if stream {
                body["stream"] = json!(true);
            }
            body
        }
        Provider::Openai | Provider::OpenaiCompatible => {
            let mut all = Vec::with_capacity(messages.len() + 1);
            if let Some(s) = req.system.as_deref().filter(|s| !s.is_empty()) {
                all.push(json!({"role": "system", "content": s}));
            }
            all.extend(messages);
            let mut body = json!({"model": req.model, "messages": all});
            // OpenAI replaced `max_tokens` with `max_completion_tokens` (the reasoning models
            // take only the new one); compatible servers mostly know only the old one.
            let field = if provider == Provider::Openai { "max_completion_tokens" } else { "max_tokens" };
            body[field] = json!(req.max_tokens);
            if let Some(t) = req.temperature {
                body["temperature"] = json!(t);
            }
            if stream {
                body["stream"] = json!(true);
                body["stream_options"] = json!({"include_usage": true});
            }
            body
        }
    }
}

fn malformed(what: impl std::fmt::Display) -> ProviderError {
    ProviderError::Malformed(what.to_string())
}

fn count(v: &Value, field: &str) -> Result<Option<u64>, ProviderError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(n) => n.as_u64().map(Some).ok_or_else(|| malformed(format!("usage.{field} is not a token count"))),
    }
}

/// Anthropic's `usage` object: `input_tokens` excludes the cache reads and writes.
fn anthropic_usage(u: &Value, into: &mut ReportedUsage) -> Result<(), ProviderError> {
    if !u.is_object() {
        return Err(malformed("usage is not an object"));
    }
    if let Some(n) = count(u, "input_tokens")? {
        into.input = Some(n);
    }
    if let Some(n) = count(u, "output_tokens")? {
        into.output = Some(n);
    }
    if let Some(n) = count(u, "cache_read_input_tokens")? {
        into.cache_read = Some(n);
    }
    if let Some(n) = count(u, "cache_creation_input_tokens")? {
        into.cache_write = Some(n);
    }
    Ok(())
}

/// OpenAI's `usage` object: `prompt_tokens` includes the cached ones
/// (`prompt_tokens_details.cached_tokens`), billed at the cache-read rate.
fn openai_usage(u: &Value) -> Result<TokenUsage, ProviderError> {
    let prompt = count(u, "prompt_tokens")?.ok_or_else(|| malformed("usage.prompt_tokens is missing"))?;
    let completion = count(u, "completion_tokens")?.ok_or_else(|| malformed("usage.completion_tokens is missing"))?;
    let cached = match u.get("prompt_tokens_details") {
        Some(d) if d.is_object() => count(d, "cached_tokens")?.unwrap_or(0),
        _ => 0,
    };
    if cached > prompt {
        return Err(malformed("usage: more cached tokens than prompt tokens"));
    }
    Ok(TokenUsage { input: prompt - cached, output: completion, cache_read: cached, cache_write: 0 })
}

#[derive(Deserialize)]
struct AnthropicMessage {
    id: String,
    model: String,
    content: Vec<Value>,
    stop_reason: Option<String>,
    usage: Value,
}

pub fn parse_response(provider: Provider, body: &[u8]) -> Result<ChatResponse, ProviderError> {
    match provider {
        Provider::Anthropic => {
            let m: AnthropicMessage = serde_json::from_slice(body).map_err(|e| malformed(format!("message: {e}")))?;
            let mut text = String::new();
            for block in &m.content {
                if block.get("type").and_then(Value::as_str) == Some("text") {
                    text.push_str(block.get("text").and_then(Value::as_str).ok_or_else(|| malformed("text block without text"))?);
                }
            }
            let mut reported = ReportedUsage::default();
            anthropic_usage(&m.usage, &mut reported)?;
            let usage = reported.complete().ok_or_else(|| malformed("usage without input_tokens or output_tokens"))?;
            Ok(ChatResponse { id: m.id, model: m.model, text, usage, usage_reported: true, stop_reason: m.stop_reason })
        }
        Provider::Openai | Provider::OpenaiCompatible => {
            let v: Value = serde_json::from_slice(body).map_err(|e| malformed(format!("completion: {e}")))?;
            let choice = v.get("choices").and_then(|c| c.get(0)).ok_or_else(|| malformed("no choices"))?;
            let text = match choice.get("message").and_then(|m| m.get("content")) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(_) => return Err(malformed("message.content is not text")),
            };
            let (usage, usage_reported) = match v.get("usage").filter(|u| !u.is_null()) {
                Some(u) => (openai_usage(u)?, true),
                // Compatible servers may leave usage out; OpenAI always reports it.
                None if provider == Provider::OpenaiCompatible => (TokenUsage::default(), false),
                None => return Err(malformed("no usage")),
            };
            Ok(ChatResponse {
                usage_reported,
                id: v.get("id").and_then(Value::as_str).unwrap_or_default().to_owned(),
                model: v.get("model").and_then(Value::as_str).unwrap_or_default().to_owned(),
                text,
                usage,
                stop_reason: choice.get("finish_reason").and_then(Value::as_str).map(str::to_owned),
            })
        }
    }
}

/// What one stream event means.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamStep {
    Nothing,
    Text(String),
    /// The response is complete.
    Finished,
}

/// The state of a stream being read.
#[derive(Debug, Default)]
pub struct StreamState {
    pub id: String,
    pub model: String,
    pub usage: ReportedUsage,
    pub stop_reason: Option<String>,
    /// OpenAI: `[DONE]` seen.
    pub done: bool,
}

/// Applies one server-sent event of `provider`'s stream.
pub fn stream_event(provider: Provider, st: &mut StreamState, event: &str, data: &str) -> Result<StreamStep, ProviderError> {
    match provider {
        Provider::Anthropic => {
            let v: Value = serde_json::from_str(data).map_err(|e| malformed(format!("stream event {event:?}: {e}")))?;
            let kind = v.get("type").and_then(Value::as_str).unwrap_or(event);
            match kind {
                "message_start" => {
                    let m = v.get("message").ok_or_else(|| malformed("message_start without message"))?;
                    st.id = m.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
                    st.model = m.get("model").and_then(Value::as_str).unwrap_or_default().to_owned();
                    if let Some(u) = m.get("usage") {
                        anthropic_usage(u, &mut st.usage)?;
                    }
                    Ok(StreamStep::Nothing)
                }
                "content_block_delta" => {
                    let d = v.get("delta").ok_or_else(|| malformed("content_block_delta without delta"))?;
                    match d.get("type").and_then(Value::as_str) {
                        Some("text_delta") => {
                            Ok(StreamStep::Text(d.get("text").and_then(Value::as_str).ok_or_else(|| malformed("text_delta without text"))?.to_owned()))
                        }
                        _ => Ok(StreamStep::Nothing),
                    }
                }
                "message_delta" => {
                    if let Some(r) = v.get("delta").and_then(|d| d.get("stop_reason")).and_then(Value::as_str) {
                        st.stop_reason = Some(r.to_owned());
                    }
                    if let Some(u) = v.get("usage") {
                        anthropic_usage(u, &mut st.usage)?;
                    }
                    Ok(StreamStep::Nothing)
                }
                "message_stop" => Ok(StreamStep::Finished),
                "error" => {
                    let e = v.get("error");
                    let t = e.and_then(|e| e.get("type")).and_then(Value::as_str).unwrap_or("error");
                    let msg = e.and_then(|e| e.get("message")).and_then(Value::as_str).unwrap_or("");
                    Err(match t {
                        "rate_limit_error" => ProviderError::RateLimited { retry_after_ms: None },
                        "invalid_request_error" => ProviderError::BadRequest(msg.to_owned()),
                        "authentication_error" | "permission_error" => ProviderError::Auth(msg.to_owned()),
                        _ => ProviderError::Unavailable(format!("stream error {t}: {msg}")),
                    })
                }
                // ping, content_block_start, content_block_stop and any future event type.
                _ => Ok(StreamStep::Nothing),
            }
        }
        Provider::Openai | Provider::OpenaiCompatible => {
            if data == "[DONE]" {
                st.done = true;
                return Ok(StreamStep::Finished);
            }
            let v: Value = serde_json::from_str(data).map_err(|e| malformed(format!("stream chunk: {e}")))?;
            if let Some(e) = v.get("error") {
                let msg = e.get("message").and_then(Value::as_str).unwrap_or("");
                return Err(ProviderError::Unavailable(format!("stream error: {msg}")));
            }
            if st.id.is_empty() {
                st.id = v.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
                st.model = v.get("model").and_then(Value::as_str).unwrap_or_default().to_owned();
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                let u = openai_usage(u)?;
                st.usage = ReportedUsage { input: Some(u.input), output: Some(u.output), cache_read: Some(u.cache_read), cache_write: Some(0) };
            }
            let mut text = String::new();
            if let Some(choices) = v.get("choices").and_then(Value::as_array) {
                for c in choices {
                    if let Some(s) = c.get("delta").and_then(|d| d.get("content")).and_then(Value::as_str) {
                        text.push_str(s);
                    }
                    if let Some(r) = c.get("finish_reason").and_then(Value::as_str) {
                        st.stop_reason = Some(r.to_owned());
                    }
                }
            }
            Ok(if text.is_empty() { StreamStep::Nothing } else { StreamStep::Text(text) })
        }
    }
}

/// The message of a provider's error body (both providers nest it under `error.message`).
pub fn error_message(body: &[u8]) -> String {
    let msg = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.get("message")).and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    msg.chars().take(500).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Role;

    #[test]
    fn anthropic_response_and_usage() {
        let body = br#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hi"},{"type":"text","text":"!"}],
            "stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":100,"cache_read_input_tokens":50,"output_tokens":7}}"#;
        let r = parse_response(Provider::Anthropic, body).unwrap();
        assert_eq!(r.text, "Hi!");
        assert_eq!(r.usage, TokenUsage { input: 12, output: 7, cache_read: 50, cache_write: 100 });
    }

    #[test]
    fn openai_cached_tokens_are_cut_from_input() {
        let body = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],
            "usage":{"prompt_tokens":2000,"completion_tokens":30,"total_tokens":2030,"prompt_tokens_details":{"cached_tokens":1536},"completion_tokens_details":{"reasoning_tokens":0}}}"#;
        let r = parse_response(Provider::Openai, body).unwrap();
        assert_eq!(r.usage, TokenUsage { input: 464, output: 30, cache_read: 1536, cache_write: 0 });
        assert_eq!(r.stop_reason.as_deref(), Some("stop"));
    }

    #[test]
    fn malformed_bodies() {
        for (p, b) in [
            (Provider::Anthropic, &b"{not json"[..]),
            (Provider::Anthropic, br#"{"id":"m","model":"x","content":[],"stop_reason":null,"usage":{"input_tokens":-1,"output_tokens":1}}"#),
            (Provider::Anthropic, br#"{"id":"m","model":"x","content":[],"stop_reason":null,"usage":{"output_tokens":1}}"#),
            (Provider::Openai, br#"{"choices":[{"message":{"content":"x"}}]}"#),
            (Provider::Openai, br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#),
            (
                Provider::Openai,
                br#"{"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":1,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":2}}}"#,
            ),
        ] {
            assert!(matches!(parse_response(p, b), Err(ProviderError::Malformed(_))), "{}", String::from_utf8_lossy(b));
        }
    }

    #[test]
    fn openai_request_uses_the_new_max_tokens_field() {
        let req = ChatRequest {
            model: "gpt-4o".into(),
            system: Some("sys".into()),
            messages: vec![super::super::ChatMessage { role: Role::User, content: "hi".into() }],
            max_tokens: 100,
            temperature: None,
        };
        let b = request_body(Provider::Openai, &req, true);
        assert_eq!(b["max_completion_tokens"], 100);
        assert_eq!(b["messages"][0]["role"], "system");
        assert_eq!(b["stream_options"]["include_usage"], true);
        let b = request_body(Provider::OpenaiCompatible, &req, false);
        assert_eq!(b["max_tokens"], 100);
        let b = request_body(Provider::Anthropic, &req, false);
        assert_eq!(b["system"], "sys");
        assert_eq!(b["messages"][0]["role"], "user");
    }
}
