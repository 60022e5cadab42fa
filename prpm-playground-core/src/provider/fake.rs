//! A scripted local model server that speaks the providers' real wire formats over HTTP/1.1:
//! Anthropic Messages (`POST /v1/messages`) and OpenAI Chat Completions
//! (`POST /v1/chat/completions`), JSON and server-sent events, errors with `retry-after`,
//! hangs, and streams cut in the middle. For tests and benches of code that calls providers
//! (ours, and an embedding application's).
//!
//! Each request takes the next scripted [`Reply`] (or the default reply once the script is
//! empty) and is recorded with its headers and JSON body.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::pricing::TokenUsage;

/// What the server answers one request with.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A complete response.
    Json { status: u16, headers: Vec<(String, String)>, body: String },
    /// `200 text/event-stream`, chunked: each event block (`"event: ...\ndata: ...\n\n"`) in
    /// its own chunk, `delay` apart. With `cut_after: Some(n)`, the connection is closed after
    /// n events, without ending the chunked body (a broken stream).
    Stream { events: Vec<String>, delay: Duration, cut_after: Option<usize> },
    /// Reads the request, waits, then closes without answering.
    Hang(Duration),
}

impl Reply {
    pub fn ok(body: String) -> Reply {
        Reply::Json { status: 200, headers: Vec::new(), body }
    }
    pub fn stream(events: Vec<String>) -> Reply {
        Reply::Stream { events, delay: Duration::ZERO, cut_after: None }
    }
}

/// A request as the server received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON (`Null` when it is not JSON).
    pub body: Value,
    /// The body as sent (a form, for Stripe).
    pub raw: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<Reply>,
    default: Option<Reply>,
    requests: Vec<Recorded>,
}

/// The server. Stops when dropped.
pub struct FakeProvider {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeProvider {
    /// Listens on 127.0.0.1, on a free port.
    pub async fn start() -> std::io::Result<FakeProvider> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = serve(sock, st).await;
                });
            }
        });
        Ok(FakeProvider { addr, state, task })
    }

    /// `http://127.0.0.1:port`: the Anthropic base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:port/v1`: the OpenAI (and compatible) base URL.
    pub fn openai_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn push(&self, r: Reply) {
        self.state.lock().unwrap().script.push_back(r);
    }

    /// The reply once the script is empty (without one, an empty script answers 500).
    pub fn set_default(&self, r: Reply) {
        self.state.lock().unwrap().default = Some(r);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }
}

const MAX_REQUEST_BYTES: usize = 8 << 20;

/// Serves one connection: JSON answers keep it alive for the next request (as the providers'
/// servers do); streams and hangs close it.
async fn serve(mut sock: TcpStream, st: Arc<Mutex<State>>) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if buf.len() > MAX_REQUEST_BYTES {
                return Ok(());
            }
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let path = lines.next().and_then(|l| l.split(' ').nth(1)).unwrap_or("").to_owned();
        let headers: Vec<(String, String)> =
            lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned())).collect();
        let len: usize = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0).min(MAX_REQUEST_BYTES);
        buf.drain(..head_end + 4);
        while buf.len() < len {
            let mut chunk = vec![0u8; len - buf.len()];
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body: Vec<u8> = buf.drain(..len).collect();
        let reply = {
            let mut s = st.lock().unwrap();
            s.requests.push(Recorded {
                path,
                headers,
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                raw: String::from_utf8_lossy(&body).into_owned(),
            });
            s.script.pop_front().or_else(|| s.default.clone())
        };
        match reply {
            None => write_json(&mut sock, 500, &[], r#"{"error":{"message":"the fake provider has no reply scripted"}}"#).await?,
            Some(Reply::Json { status, headers, body }) => write_json(&mut sock, status, &headers, &body).await?,
            Some(Reply::Hang(d)) => {
                tokio::time::sleep(d).await;
                return Ok(());
            }
            Some(Reply::Stream { events, delay, cut_after }) => {
                sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
                    .await?;
                for (i, ev) in events.iter().enumerate() {
                    if cut_after == Some(i) {
                        sock.flush().await?;
                        // Closing without the final zero-length chunk: the body is cut.
                        return sock.shutdown().await;
                    }
                    if !delay.is_zero() && i > 0 {
                        tokio::time::sleep(delay).await;
                    }
                    sock.write_all(format!("{:x}\r\n{ev}\r\n", ev.len()).as_bytes()).await?;
                    sock.flush().await?;
                }
                sock.write_all(b"0\r\n\r\n").await?;
                return sock.shutdown().await;
            }
        }
    }
}

async fn write_json(sock: &mut TcpStream, status: u16, headers: &[(String, String)], body: &str) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n", reason(status), body.len());
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.flush().await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        529 => "Site Overloaded",
        _ => "Status",
    }
}

// ---- real-shaped bodies ---------------------------------------------------------------------

fn sse(event: Option<&str>, data: &Value) -> String {
    match event {
        Some(e) => format!("event: {e}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

/// An Anthropic Messages response (`input_tokens` excludes the cache tokens).
pub fn anthropic_message(model: &str, text: &str, u: TokenUsage) -> String {
    json!({
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": u.input, "cache_creation_input_tokens": u.cache_write, "cache_read_input_tokens": u.cache_read, "output_tokens": u.output,
                  "service_tier": "standard"}
    })
    .to_string()
}

/// An Anthropic event stream: `message_start` (input usage), a text block whose deltas are
/// `chunks`, `message_delta` (final output usage), `message_stop`; with a `ping` as the API
/// sends one.
pub fn anthropic_stream(model: &str, chunks: &[&str], u: TokenUsage) -> Vec<String> {
    let mut ev = vec![
        sse(
            Some("message_start"),
            &json!({"type": "message_start", "message": {"id": "msg_01stream", "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": u.input, "cache_creation_input_tokens": u.cache_write, "cache_read_input_tokens": u.cache_read, "output_tokens": 1}}}),
        ),
        sse(Some("content_block_start"), &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
        sse(Some("ping"), &json!({"type": "ping"})),
    ];
    for c in chunks {
        ev.push(sse(Some("content_block_delta"), &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": c}})));
    }
    ev.push(sse(Some("content_block_stop"), &json!({"type": "content_block_stop", "index": 0})));
    ev.push(sse(
        Some("message_delta"),
        &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": u.output}}),
    ));
    ev.push(sse(Some("message_stop"), &json!({"type": "message_stop"})));
    ev
}

/// An Anthropic error body (`{"type":"error","error":{...}}`).
pub fn anthropic_error(status: u16, kind: &str, message: &str) -> Reply {
    Reply::Json { status, headers: Vec::new(), body: json!({"type": "error", "error": {"type": kind, "message": message}}).to_string() }
}

/// An OpenAI chat completion; `u.input` excludes `u.cache_read` (OpenAI's `prompt_tokens`
/// includes its `cached_tokens`).
pub fn openai_completion(model: &str, text: &str, u: TokenUsage) -> String {
    json!({
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion", "created": 1_741_569_952, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null, "annotations": []}, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": u.input + u.cache_read, "completion_tokens": u.output, "total_tokens": u.input + u.cache_read + u.output,
                  "prompt_tokens_details": {"cached_tokens": u.cache_read, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
        "service_tier": "default"
    })
    .to_string()
}

/// An OpenAI chunk stream with `stream_options.include_usage`: a role chunk, one chunk per
/// text piece, a finish chunk, the usage chunk (empty `choices`), then `[DONE]`.
pub fn openai_stream(model: &str, chunks: &[&str], u: TokenUsage) -> Vec<String> {
    let chunk = |delta: Value, finish: Value| {
        sse(
            None,
            &json!({"id": "chatcmpl-stream", "object": "chat.completion.chunk", "created": 1_741_569_952, "model": model, "system_fingerprint": "fp_1",
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}], "usage": null}),
        )
    };
    let mut ev = vec![chunk(json!({"role": "assistant", "content": "", "refusal": null}), Value::Null)];
    for c in chunks {
        ev.push(chunk(json!({"content": c}), Value::Null));
    }
    ev.push(chunk(json!({}), json!("stop")));
    ev.push(sse(
        None,
        &json!({"id": "chatcmpl-stream", "object": "chat.completion.chunk", "created": 1_741_569_952, "model": model, "system_fingerprint": "fp_1", "choices": [],
            "usage": {"prompt_tokens": u.input + u.cache_read, "completion_tokens": u.output, "total_tokens": u.input + u.cache_read + u.output,
                      "prompt_tokens_details": {"cached_tokens": u.cache_read}, "completion_tokens_details": {"reasoning_tokens": 0}}}),
    ));
    ev.push("data: [DONE]\n\n".to_owned());
    ev
}

/// An OpenAI error body (`{"error":{...}}`).
pub fn openai_error(status: u16, kind: &str, code: &str, message: &str) -> Reply {
    Reply::Json { status, headers: Vec::new(), body: json!({"error": {"message": message, "type": kind, "param": null, "code": code}}).to_string() }
}
