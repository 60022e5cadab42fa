//! Playground runs against local servers that speak the providers' real wire formats
//! (`provider::fake`), on a SQLite file. Every scenario checks the ledger afterwards: the
//! charge is exactly the priced usage (or nothing), no hold is left open, `verify()` is clean.

use std::sync::Arc;
use std::time::Duration;

use prpm_playground_core::conformance::{applied, create_user, key};
use prpm_playground_core::playground::{Playground, RunEvent, RunRequest, StorePackages};
use prpm_playground_core::pricing::{Pricing, Provider, TokenUsage, credits_for_tokens};
use prpm_playground_core::provider::fake::{self, FakeProvider, Reply};
use prpm_playground_core::provider::tokens::Counter;
use prpm_playground_core::provider::{ApiKey, ClientConfig, ProviderClient, ProviderError};
use prpm_playground_core::*;

const SONNET: &str = "claude-sonnet-4-5";
const GPT: &str = "gpt-4o";

struct World {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    play: Playground,
    fake: FakeProvider,
    pricing: Pricing,
}

fn quick(mut c: ClientConfig) -> ClientConfig {
    c.backoff_base = Duration::from_millis(5);
    c.backoff_max = Duration::from_millis(20);
    c.total_timeout = Duration::from_millis(1_500);
    c.connect_timeout = Duration::from_millis(500);
    c
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("play.db")).unwrap());
    let fake = FakeProvider::start().await.unwrap();
    let anthropic = ClientConfig { base_url: fake.url(), ..quick(ClientConfig::anthropic(ApiKey::new("sk-ant-test-secret").unwrap())) };
    let openai = ClientConfig { base_url: fake.openai_url(), ..quick(ClientConfig::openai(ApiKey::new("sk-openai-test-secret").unwrap())) };
    let play = Playground::new(store.clone(), Pricing::default(), Arc::new(StorePackages(store.clone())))
        .with_client(ProviderClient::new(anthropic).unwrap())
        .with_client(ProviderClient::new(openai).unwrap());
    store
        .put_package(&Package { id: "pkg-reviewer".into(), name: "@prpm/code-reviewer".into(), version: "1.2.0".into(), prompt: "You review code.".into() })
        .await
        .unwrap();
    World { _dir: dir, store, play, fake, pricing: Pricing::default() }
}

/// A user in the unlimited tier with `credits` purchased credits (plus the 5 free ones).
async fn funded(w: &World, id: &str, credits: Credits) -> AccountId {
    let a = create_user(&*w.store, id).await;
    applied(
        w.store
            .grant(Grant {
                account: a.clone(),
                bucket: Bucket::Purchased,
                amount: credits,
                source: GrantSource::Purchase,
                expires_at: None,
                reference: "test".into(),
                key: key(&format!("fund:{id}")),
            })
            .await,
    );
    a
}

fn req(a: &AccountId, model: &str, input: &str) -> RunRequest {
    RunRequest {
        account: a.clone(),
        package_id: Some("pkg-reviewer".into()),
        session: None,
        input: input.into(),
        model: model.into(),
        temperature: Some(0.5),
        max_tokens: Some(1_000),
        run_id: None,
    }
}

/// The ledger is exact: no hold open, `verify()` clean; returns the total balance.
async fn settled_total(w: &World, a: &AccountId) -> Credits {
    let b = w.store.balance(a).await.unwrap();
    assert_eq!((b.held, b.open_holds), (0, 0), "a hold was left open: {b:?}");
    let report = w.store.verify().await.unwrap();
    assert!(report.is_clean(), "{:?}", report.discrepancies);
    b.total
}

fn usage(input: u64, output: u64, cache_read: u64, cache_write: u64) -> TokenUsage {
    TokenUsage { input, output, cache_read, cache_write }
}

fn provider_error(r: Result<Result<playground::RunResult, Rejection>>) -> ProviderError {
    match r {
        Err(Error::Provider(e)) => e,
        other => panic!("expected a provider error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_success_charges_the_reported_usage_exactly() {
    let w = world().await;
    let a = funded(&w, "ann", 100).await;
    let u = usage(2_400, 3_100, 1_000, 200);
    w.fake.push(Reply::ok(fake::anthropic_message(SONNET, "Looks good.", u)));
    let r = w.play.run(RunRequest { max_tokens: Some(8_000), ..req(&a, SONNET, "Review: fn main() {}") }).await.unwrap().unwrap();
    assert_eq!(r.text, "Looks good.");
    assert!(!r.capped);
    assert_eq!(r.usage, u);
    let quote = w.pricing.price_usage(SONNET, &u).unwrap();
    assert_eq!(r.credits, quote.credits as i64);
    assert_eq!(r.credits, credits_for_tokens(6_700, 1) as i64, "2 credits: 6,700 tokens");
    // $3/M input, $15/M output, $0.30/M cache read, $3.75/M cache write, in micro-dollars.
    assert_eq!(r.cost_micros, 2_400 * 3 + 3_100 * 15 + (1_000 * 3) / 10 + (200 * 375) / 100);
    assert_eq!(settled_total(&w, &a).await, 105 - r.credits);

    // The request on the wire: the package prompt as `system`, the key in `x-api-key`.
    let sent = &w.fake.requests()[0];
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.header("x-api-key"), Some("sk-ant-test-secret"));
    assert_eq!(sent.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(sent.body["system"], "You review code.");
    assert_eq!(sent.body["max_tokens"], 8_000);
    assert_eq!(sent.body["messages"][0]["content"], "Review: fn main() {}");

    // Recorded, with the turns in a new session.
    let runs = w.store.runs(&a, 10).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!((runs[0].outcome, runs[0].credits, runs[0].cost_micros, runs[0].tokens), (RunOutcome::Completed, r.credits, r.cost_micros, u));
    let s = w.play.session(&a, r.session.as_ref().unwrap()).await.unwrap();
    assert_eq!(
        s.turns.iter().map(|t| (t.role, t.content.as_str())).collect::<Vec<_>>(),
        [(Role::User, "Review: fn main() {}"), (Role::Assistant, "Looks good.")]
    );

    // Usage worth more than the hold (the provider counted far more input than our estimate):
    // the hold is charged, never more, and the real cost is still recorded.
    let big = usage(40_000, 900, 0, 0);
    w.fake.push(Reply::ok(fake::anthropic_message(SONNET, "long", big)));
    let r2 = w.play.run(req(&a, SONNET, "short")).await.unwrap().unwrap();
    assert!(r2.capped);
    assert_eq!(r2.credits, r2.estimate.worst_case.credits as i64);
    assert!(r2.credits < credits_for_tokens(40_900, 1) as i64);
    assert_eq!(r2.cost_micros, w.pricing.price_usage(SONNET, &big).unwrap().cost_micros);
    assert_eq!(settled_total(&w, &a).await, 105 - r.credits - r2.credits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_success_prices_cached_tokens_at_the_cached_rate() {
    let w = world().await;
    let a = funded(&w, "oli", 100).await;
    let u = usage(464, 30, 1_536, 0);
    w.fake.push(Reply::ok(fake::openai_completion(GPT, "Hello", u)));
    let r = w.play.run(req(&a, GPT, "hi")).await.unwrap().unwrap();
    assert_eq!(r.usage, u);
    let quote = w.pricing.price_usage(GPT, &u).unwrap();
    assert_eq!((r.credits, r.cost_micros), (quote.credits as i64, quote.cost_micros));
    let sent = &w.fake.requests()[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.header("authorization"), Some("Bearer sk-openai-test-secret"));
    assert_eq!(sent.body["messages"][0], serde_json::json!({"role": "system", "content": "You review code."}));
    assert_eq!(sent.body["max_completion_tokens"], 1_000);
    assert_eq!(settled_total(&w, &a).await, 105 - r.credits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_then_success_is_retried_and_charged_once() {
    let w = world().await;
    let a = funded(&w, "rl", 100).await;
    w.fake.push(Reply::Json {
        status: 429,
        headers: vec![("retry-after".into(), "0.05".into())],
        body: r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"}}"#.into(),
    });
    w.fake.push(Reply::ok(fake::anthropic_message(SONNET, "ok", usage(100, 10, 0, 0))));
    let t0 = std::time::Instant::now();
    let r = w.play.run(req(&a, SONNET, "x")).await.unwrap().unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(50), "the retry waited the provider's retry-after, not the shorter backoff");
    assert_eq!(w.fake.requests().len(), 2);
    assert_eq!(r.credits, 1);
    assert_eq!(settled_total(&w, &a).await, 104);

    // Past the retries: a typed rate-limit error carrying the provider's hint, nothing charged.
    for _ in 0..3 {
        w.fake.push(Reply::Json { status: 429, headers: vec![("retry-after".into(), "0".into())], body: "{}".into() });
    }
    let e = provider_error(w.play.run(req(&a, SONNET, "x")).await);
    assert_eq!(e, ProviderError::RateLimited { retry_after_ms: Some(0) });
    assert_eq!(e.code(), "provider_rate_limited");
    assert_eq!(w.fake.requests().len(), 5, "1 + 2 retries");
    // A retry-after longer than the client waits is not waited for.
    w.fake.push(Reply::Json { status: 429, headers: vec![("retry-after".into(), "3600".into())], body: "{}".into() });
    assert_eq!(provider_error(w.play.run(req(&a, SONNET, "x")).await), ProviderError::RateLimited { retry_after_ms: Some(3_600_000) });
    assert_eq!(w.fake.requests().len(), 6);
    assert_eq!(settled_total(&w, &a).await, 104);
    let failed = w.store.runs(&a, 10).await.unwrap().into_iter().filter(|r| r.outcome == RunOutcome::Failed).count();
    assert_eq!(failed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_error_then_success_and_persistent_outage() {
    let w = world().await;
    let a = funded(&w, "se", 100).await;
    w.fake.push(fake::openai_error(500, "server_error", "internal", "The server had an error while processing your request."));
    w.fake.push(fake::anthropic_error(529, "overloaded_error", "Overloaded"));
    w.fake.push(Reply::ok(fake::openai_completion(GPT, "fine", usage(50, 5, 0, 0))));
    let r = w.play.run(req(&a, GPT, "x")).await.unwrap().unwrap();
    assert_eq!((r.text.as_str(), r.credits), ("fine", 1));
    assert_eq!(w.fake.requests().len(), 3);

    w.fake.set_default(fake::openai_error(503, "server_error", "unavailable", "down"));
    let e = provider_error(w.play.run(req(&a, GPT, "x")).await);
    assert!(matches!(&e, ProviderError::Unavailable(m) if m.contains("503")), "{e:?}");
    assert_eq!(e.code(), "provider_unavailable");
    assert_eq!(settled_total(&w, &a).await, 104);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_release_the_hold_and_are_not_retried() {
    let w = world().await;
    let a = funded(&w, "to", 100).await;
    w.fake.push(Reply::Hang(Duration::from_secs(3)));
    let t0 = std::time::Instant::now();
    let e = provider_error(w.play.run(req(&a, SONNET, "x")).await);
    assert!(matches!(&e, ProviderError::Unavailable(m) if m.contains("no answer")), "{e:?}");
    assert!(t0.elapsed() < Duration::from_millis(2_900), "gave up at the total timeout");
    assert_eq!(w.fake.requests().len(), 1, "a timed-out call may be running: not retried");
    assert_eq!(settled_total(&w, &a).await, 105);
    let runs = w.store.runs(&a, 10).await.unwrap();
    assert_eq!((runs[0].outcome, runs[0].error.as_deref(), runs[0].credits), (RunOutcome::Failed, Some("provider_unavailable"), 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_retried_then_unavailable() {
    let w = world().await;
    let a = funded(&w, "cr", 100).await;
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = ClientConfig { base_url: format!("http://127.0.0.1:{port}"), ..quick(ClientConfig::anthropic(ApiKey::new("k").unwrap())) };
    let play = Playground::new(w.store.clone(), Pricing::default(), Arc::new(StorePackages(w.store.clone()))).with_client(ProviderClient::new(dead).unwrap());
    let e = provider_error(play.run(req(&a, SONNET, "x")).await);
    assert!(matches!(&e, ProviderError::Unavailable(m) if m.contains("connection failed")), "{e:?}");
    assert_eq!(settled_total(&w, &a).await, 105);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_answers_charge_nothing() {
    let w = world().await;
    let a = funded(&w, "mf", 100).await;
    w.fake.push(Reply::ok("{\"id\": \"msg_1\", \"content\": [".into()));
    assert!(matches!(provider_error(w.play.run(req(&a, SONNET, "x")).await), ProviderError::Malformed(_)));
    // Well-formed JSON without usage.
    w.fake.push(Reply::ok(
        r#"{"id":"c","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"x"},"finish_reason":"stop"}]}"#
            .into(),
    ));
    assert!(matches!(provider_error(w.play.run(req(&a, GPT, "x")).await), ProviderError::Malformed(_)));
    // Absurd usage (over the library's token bound) cannot be priced.
    w.fake.push(Reply::ok(fake::anthropic_message(SONNET, "x", usage(1 << 40, 1, 0, 0))));
    assert!(matches!(provider_error(w.play.run(req(&a, SONNET, "x")).await), ProviderError::Malformed(_)));
    assert_eq!(settled_total(&w, &a).await, 105);
    assert_eq!(w.fake.requests().len(), 3, "malformed answers are not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_bad_request_errors_are_not_retried() {
    let w = world().await;
    let a = funded(&w, "au", 100).await;
    w.fake.push(fake::anthropic_error(401, "authentication_error", "invalid x-api-key"));
    let e = provider_error(w.play.run(req(&a, SONNET, "x")).await);
    assert!(matches!(&e, ProviderError::Auth(m) if m.contains("invalid x-api-key")), "{e:?}");
    assert_eq!(e.code(), "provider_auth");
    assert!(!format!("{e:?}{e}").contains("sk-ant-test-secret"), "the key never appears in errors");
    w.fake.push(fake::openai_error(400, "invalid_request_error", "context_length_exceeded", "This model's maximum context length is 128000 tokens."));
    let e = provider_error(w.play.run(req(&a, GPT, "x")).await);
    assert!(matches!(&e, ProviderError::BadRequest(m) if m.contains("maximum context length")), "{e:?}");
    assert_eq!(w.fake.requests().len(), 2);
    assert_eq!(settled_total(&w, &a).await, 105);
}

async fn collect(mut s: playground::RunStream) -> (Vec<String>, RunEvent) {
    let mut deltas = Vec::new();
    loop {
        match s.next().await.expect("a stream ends with Done or Failed") {
            RunEvent::Delta(t) => deltas.push(t),
            end => return (deltas, end),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_deliver_deltas_then_settle_on_final_usage() {
    let w = world().await;
    let a = funded(&w, "st", 100).await;
    for (model, events) in [
        (SONNET, fake::anthropic_stream(SONNET, &["Hel", "lo", " world"], usage(5_000, 2_000, 0, 0))),
        (GPT, fake::openai_stream(GPT, &["Hel", "lo", " world"], usage(5_000, 2_000, 0, 0))),
    ] {
        let gaps = events.len() as u64 - 1;
        w.fake.push(Reply::Stream { events, delay: Duration::from_millis(5), cut_after: None });
        let s = w.play.run_stream(RunRequest { max_tokens: Some(8_000), ..req(&a, model, "say hello") }).await.unwrap().unwrap();
        let (deltas, end) = collect(s).await;
        assert_eq!(deltas, ["Hel", "lo", " world"]);
        let RunEvent::Done(r) = end else { panic!("{end:?}") };
        // The provider's time: at least the responder's pauses between its events.
        assert!(r.provider_micros >= gaps * 5_000, "{} us for {gaps} pauses of 5 ms", r.provider_micros);
        assert_eq!(r.latency_ms, r.provider_micros / 1_000);
        assert_eq!(w.store.runs(&a, 1).await.unwrap()[0].latency_ms, r.latency_ms);
        assert_eq!((r.text.as_str(), r.usage.input, r.usage.output, r.credits), ("Hello world", 5_000, 2_000, 2));
        assert_eq!(r.outcome, RunOutcome::Completed);
        let sent = w.fake.requests().pop().unwrap();
        assert_eq!(sent.body["stream"], true);
    }
    assert_eq!(settled_total(&w, &a).await, 105 - 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_in_the_middle_charges_what_was_consumed() {
    let w = world().await;
    let a = funded(&w, "cut", 100).await;
    // Anthropic: input reported at message_start (12,000 tokens); two deltas, then the cut.
    let events = fake::anthropic_stream(SONNET, &["partial ", "answer"], usage(12_000, 900, 0, 0));
    w.fake.push(Reply::Stream { events, delay: Duration::ZERO, cut_after: Some(5) });
    let s = w.play.run_stream(RunRequest { max_tokens: Some(16_000), ..req(&a, SONNET, "long") }).await.unwrap().unwrap();
    let hold_credits = s.estimate.worst_case.credits as i64;
    let (deltas, end) = collect(s).await;
    assert_eq!(deltas, ["partial ", "answer"]);
    let RunEvent::Failed { error: Error::Provider(ProviderError::Unavailable(_)), result: Some(r) } = end else { panic!("{end:?}") };
    assert_eq!(r.outcome, RunOutcome::Interrupted);
    // Consumed: the reported input and the output produced (counted from the text received,
    // at least the 1 token message_start reported).
    let produced = Counter::for_model(Provider::Anthropic, SONNET).count("partial answer");
    assert_eq!(r.usage, usage(12_000, produced, 0, 0));
    assert_eq!(r.credits, credits_for_tokens(12_000 + produced, 1) as i64);
    assert!(r.credits <= hold_credits);
    assert_eq!(settled_total(&w, &a).await, 105 - r.credits);
    let run = &w.store.runs(&a, 1).await.unwrap()[0];
    assert_eq!((run.outcome, run.error.as_deref()), (RunOutcome::Interrupted, Some("provider_unavailable")));

    // OpenAI reports usage only at the end: the input is our own count.
    let events = fake::openai_stream(GPT, &["only ", "half"], usage(30_000, 500, 0, 0));
    w.fake.push(Reply::Stream { events, delay: Duration::ZERO, cut_after: Some(3) });
    let s = w.play.run_stream(req(&a, GPT, "count me")).await.unwrap().unwrap();
    let counted = w.play.estimate(&req(&a, GPT, "count me")).await.unwrap().input_tokens;
    let (deltas, end) = collect(s).await;
    assert_eq!(deltas, ["only ", "half"]);
    let RunEvent::Failed { result: Some(r2), .. } = end else { panic!("{end:?}") };
    assert_eq!(r2.usage.input, counted);
    assert_eq!(r2.usage.output, Counter::O200k.count("only half"));
    assert_eq!(settled_total(&w, &a).await, 105 - r.credits - r2.credits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_caller_goes_away_is_settled_and_never_left_open() {
    let w = world().await;
    let a = funded(&w, "gone", 100).await;
    let chunks: Vec<String> = (0..200).map(|i| format!("word{i} ")).collect();
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let events = fake::anthropic_stream(SONNET, &refs, usage(3_000, 4_000, 0, 0));
    w.fake.push(Reply::Stream { events, delay: Duration::from_millis(10), cut_after: None });
    let mut s = w.play.run_stream(req(&a, SONNET, "talk")).await.unwrap().unwrap();
    let hold_credits = s.estimate.worst_case.credits as i64;
    for _ in 0..3 {
        assert!(matches!(s.next().await, Some(RunEvent::Delta(_))));
    }
    drop(s);
    // The run's task notices, settles for what was consumed, and records the run.
    let mut tries = 0;
    let run = loop {
        if let Some(r) = w.store.runs(&a, 1).await.unwrap().pop() {
            break r;
        }
        tries += 1;
        assert!(tries < 200, "the run was never settled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!((run.outcome, run.error.as_deref()), (RunOutcome::Interrupted, Some("caller_gone")));
    assert_eq!(run.tokens.input, 3_000);
    assert!(run.tokens.output < 4_000, "only what was produced before the caller left");
    assert!(run.credits >= 1 && run.credits <= hold_credits);
    assert_eq!(settled_total(&w, &a).await, 105 - run.credits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_refused_before_it_starts_releases_the_hold() {
    let w = world().await;
    let a = funded(&w, "sr", 100).await;
    w.fake.push(fake::anthropic_error(401, "authentication_error", "invalid x-api-key"));
    let s = w.play.run_stream(req(&a, SONNET, "x")).await.unwrap().unwrap();
    let (deltas, end) = collect(s).await;
    assert!(deltas.is_empty());
    assert!(matches!(end, RunEvent::Failed { error: Error::Provider(ProviderError::Auth(_)), result: None }), "{end:?}");
    // A JSON answer where a stream was asked for is malformed.
    w.fake.push(Reply::ok(fake::anthropic_message(SONNET, "x", usage(1, 1, 0, 0))));
    let (_, end) = collect(w.play.run_stream(req(&a, SONNET, "x")).await.unwrap().unwrap()).await;
    assert!(matches!(end, RunEvent::Failed { error: Error::Provider(ProviderError::Malformed(_)), result: None }), "{end:?}");
    assert_eq!(settled_total(&w, &a).await, 105);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_cap_and_short_of_credits_are_refused_before_any_call() {
    let w = world().await;
    let a = funded(&w, "cap", 100).await;
    let before = w.store.history(&HistoryQuery::new(a.clone())).await.unwrap().entries.len();
    let big = "lorem ipsum dolor sit amet ".repeat(4_000); // ~24k tokens in o200k
    match w.play.run(req(&a, GPT, &big)).await {
        Err(Error::RequestTooLarge { tokens, cap_tokens: 20_000 }) => assert!(tokens > 20_000),
        other => panic!("{other:?}"),
    }
    assert!(matches!(w.play.estimate(&req(&a, GPT, &big)).await, Err(Error::RequestTooLarge { .. })));
    // The worst case of an Opus run with 64k output is more than a 5-credit account has.
    let poor = create_user(&*w.store, "poor").await;
    let r = w.play.run(RunRequest { max_tokens: Some(64_000), ..req(&poor, "claude-opus-4-5", "hi") }).await.unwrap();
    assert!(matches!(r, Err(Rejection::InsufficientCredits { available: 5, .. })), "{r:?}");
    // Unknown model, package, session; bad temperature; empty input.
    assert!(matches!(w.play.run(req(&a, "no-such-model", "x")).await, Err(Error::UnknownModel(_))));
    assert!(matches!(w.play.run(RunRequest { package_id: Some("nope".into()), ..req(&a, SONNET, "x") }).await, Err(Error::NotFound { what: "package" })));
    assert!(matches!(w.play.run(RunRequest { session: Some(SessionId::generate()), ..req(&a, SONNET, "x") }).await, Err(Error::NotFound { what: "session" })));
    assert!(matches!(w.play.run(RunRequest { temperature: Some(1.5), ..req(&a, SONNET, "x") }).await, Err(Error::InvalidInput { .. })));
    assert!(matches!(w.play.run(RunRequest { temperature: Some(f32::NAN), ..req(&a, GPT, "x") }).await, Err(Error::InvalidInput { .. })));
    assert!(matches!(w.play.run(req(&a, SONNET, "  ")).await, Err(Error::InvalidInput { .. })));
    assert!(w.fake.requests().is_empty(), "nothing reached the provider");
    assert_eq!(w.store.history(&HistoryQuery::new(a.clone())).await.unwrap().entries.len(), before, "nothing was written");
    assert_eq!(settled_total(&w, &a).await, 105);
    assert!(w.store.sessions(&a, None, 10).await.unwrap().sessions.is_empty(), "refused runs start no session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_thread_history_into_the_price_and_stay_private() {
    let w = world().await;
    let a = funded(&w, "sess", 100).await;
    let mallory = funded(&w, "mallory", 100).await;
    w.fake.push(Reply::ok(fake::anthropic_message(SONNET, "first answer", usage(10, 5, 0, 0))));
    let r1 = w.play.run(req(&a, SONNET, "first question")).await.unwrap().unwrap();
    let sid = r1.session.clone().unwrap();
    // The second turn sends the history, and the history counts toward the estimate.
    let alone = w.play.estimate(&req(&a, SONNET, "second question")).await.unwrap().input_tokens;
    let threaded = w.play.estimate(&RunRequest { session: Some(sid.clone()), ..req(&a, SONNET, "second question") }).await.unwrap().input_tokens;
    let counter = Counter::for_model(Provider::Anthropic, SONNET);
    assert_eq!(threaded, alone + counter.count_chat(None, [(Role::User, "first question"), (Role::Assistant, "first answer")]) - 4);
    w.fake.push(Reply::ok(fake::anthropic_message(SONNET, "second answer", usage(30, 5, 0, 0))));
    let r2 = w.play.run(RunRequest { session: Some(sid.clone()), ..req(&a, SONNET, "second question") }).await.unwrap().unwrap();
    assert_eq!(r2.session.as_ref(), Some(&sid));
    let msgs = &w.fake.requests()[1].body["messages"];
    assert_eq!(msgs.as_array().unwrap().len(), 3);
    assert_eq!(msgs[1], serde_json::json!({"role": "assistant", "content": "first answer"}));
    let s = w.play.session(&a, &sid).await.unwrap();
    assert_eq!(s.turns.len(), 4);
    assert_eq!(s.summary.turns, 4);

    // Another user can neither read, continue, share nor delete it.
    assert!(matches!(w.play.session(&mallory, &sid).await, Err(Error::NotFound { .. })));
    assert!(matches!(w.play.run(RunRequest { session: Some(sid.clone()), ..req(&mallory, SONNET, "x") }).await, Err(Error::NotFound { what: "session" })));
    assert!(matches!(w.play.share(&mallory, &sid).await, Err(Error::NotFound { .. })));
    assert!(matches!(w.play.delete_session(&mallory, &sid).await, Err(Error::NotFound { .. })));
    assert_eq!(w.fake.requests().len(), 2);

    // Shared: the conversation only.
    let token = w.play.share(&a, &sid).await.unwrap();
    assert_eq!(token.as_str().len(), 64);
    let shared = w.play.shared(token.as_str()).await.unwrap();
    assert_eq!(shared.turns.len(), 4);
    let json = serde_json::to_string(&shared).unwrap();
    for leak in ["credits", "cost", "sess", "run_id", "hold"] {
        assert!(!json.contains(leak), "{leak} in {json}");
    }
    w.play.revoke_share(&a, &sid).await.unwrap();
    assert!(matches!(w.play.shared(token.as_str()).await, Err(Error::NotFound { .. })));
    assert!(matches!(w.play.shared("not-a-token").await, Err(Error::NotFound { .. })));
    w.play.delete_session(&a, &sid).await.unwrap();
    assert!(matches!(w.play.session(&a, &sid).await, Err(Error::NotFound { .. })));
    assert_eq!(w.store.runs(&a, 10).await.unwrap().len(), 2, "runs outlive their session: they are the billing record");
    assert_eq!(settled_total(&w, &a).await, 105 - r1.credits - r2.credits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comparison_runs_both_halves_and_charges_both() {
    let w = world().await;
    let a = funded(&w, "cmp", 100).await;
    w.fake.set_default(Reply::ok(fake::openai_completion(GPT, "answer", usage(6_000, 100, 0, 0))));
    let c = w.play.compare(req(&a, GPT, "same input")).await.unwrap();
    let with = c.with_prompt.unwrap().unwrap();
    let without = c.without_prompt.unwrap().unwrap();
    assert_ne!(with.run_id, without.run_id);
    assert_eq!((with.session.clone(), without.session.clone()), (None, None));
    let sent = w.fake.requests();
    assert_eq!(sent.len(), 2);
    let systems: Vec<bool> = sent.iter().map(|r| r.body["messages"][0]["role"] == "system").collect();
    assert!(systems.contains(&true) && systems.contains(&false), "one half with the package prompt, one without");
    let runs = w.store.runs(&a, 10).await.unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs.iter().filter(|r| r.with_prompt).count(), 1);
    assert_eq!(settled_total(&w, &a).await, 105 - with.credits - without.credits);
    assert!(matches!(w.play.compare(RunRequest { package_id: None, ..req(&a, GPT, "x") }).await, Err(Error::InvalidInput { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_id_runs_once() {
    let w = world().await;
    let a = funded(&w, "once", 100).await;
    w.fake.set_default(Reply::ok(fake::anthropic_message(SONNET, "x", usage(10, 10, 0, 0))));
    let id = RunId::generate();
    w.play.run(RunRequest { run_id: Some(id.clone()), ..req(&a, SONNET, "x") }).await.unwrap().unwrap();
    match w.play.run(RunRequest { run_id: Some(id), ..req(&a, SONNET, "x") }).await {
        Err(Error::IdempotencyConflict { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(w.fake.requests().len(), 1, "the repeat never reached the provider");
    assert_eq!(settled_total(&w, &a).await, 104);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_never_overspend() {
    let w = Arc::new(world().await);
    // 5 free credits only; each run holds 1 (a few hundred tokens, 100 max output).
    let a = create_user(&*w.store, "race").await;
    w.fake.set_default(Reply::Stream {
        events: fake::anthropic_stream(SONNET, &["ok"], usage(100, 50, 0, 0)),
        delay: Duration::from_millis(20),
        cut_after: None,
    });
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let w = w.clone();
            let a = a.clone();
            tokio::spawn(async move {
                let r = RunRequest { max_tokens: Some(100), ..req(&a, SONNET, &format!("q{i}")) };
                match w.play.run_stream(r).await.unwrap() {
                    Ok(s) => matches!(collect(s).await.1, RunEvent::Done(_)),
                    Err(Rejection::InsufficientCredits { .. }) => false,
                    Err(other) => panic!("{other:?}"),
                }
            })
        })
        .collect();
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap() as i64;
    }
    assert_eq!(done, 5, "exactly as many runs as credits");
    assert_eq!(settled_total(&w, &a).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_cannot_keep_a_hold_open() {
    let w = world().await;
    let a = funded(&w, "stall", 100).await;
    let play = w.play.clone().with_config(playground::PlaygroundConfig { stream_buffer: 1, stall_timeout: Duration::from_millis(300), ..Default::default() });
    let chunks: Vec<String> = (0..50).map(|i| format!("w{i} ")).collect();
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    w.fake.push(Reply::stream(fake::anthropic_stream(SONNET, &refs, usage(2_000, 500, 0, 0))));
    let stream = play.run_stream(req(&a, SONNET, "x")).await.unwrap().unwrap();
    // Held, never read.
    let mut tries = 0;
    let run = loop {
        if let Some(r) = w.store.runs(&a, 1).await.unwrap().pop() {
            break r;
        }
        tries += 1;
        assert!(tries < 300, "a stalled reader kept the run open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!((run.outcome, run.error.as_deref()), (RunOutcome::Interrupted, Some("caller_gone")));
    assert_eq!(settled_total(&w, &a).await, 105 - run.credits);
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_caller_is_dropped_still_finishes() {
    let w = world().await;
    let a = funded(&w, "drop", 100).await;
    w.fake.push(Reply::Hang(Duration::from_millis(200)));
    w.fake.set_default(Reply::ok(fake::anthropic_message(SONNET, "late", usage(100, 10, 0, 0))));
    // The caller gives up after 50 ms (an HTTP client that went away).
    assert!(tokio::time::timeout(Duration::from_millis(50), w.play.run(req(&a, SONNET, "x"))).await.is_err());
    let mut tries = 0;
    let run = loop {
        if let Some(r) = w.store.runs(&a, 1).await.unwrap().pop() {
            break r;
        }
        tries += 1;
        assert!(tries < 300, "the dropped run never finished");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // The hung connection closed without an answer: retried, answered, settled, recorded.
    assert_eq!(run.outcome, RunOutcome::Completed);
    assert_eq!(settled_total(&w, &a).await, 104);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_with_control_characters_are_kept() {
    let w = world().await;
    let a = funded(&w, "esc", 100).await;
    let text = "\u{1b}[31mred\u{1b}[0m and a bell \u{7}";
    w.fake.push(Reply::ok(fake::anthropic_message(SONNET, text, usage(100, 10, 0, 0))));
    let r = w.play.run(req(&a, SONNET, "colour")).await.unwrap().unwrap();
    let s = w.play.session(&a, r.session.as_ref().unwrap()).await.unwrap();
    assert_eq!(s.turns[1].content, text);
    assert_eq!(settled_total(&w, &a).await, 104);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed_so_keys_stay_home() {
    let w = world().await;
    let a = funded(&w, "redir", 100).await;
    let elsewhere = FakeProvider::start().await.unwrap();
    w.fake.push(Reply::Json { status: 307, headers: vec![("location".into(), format!("{}/v1/messages", elsewhere.url()))], body: "{}".into() });
    let e = provider_error(w.play.run(req(&a, SONNET, "x")).await);
    assert!(matches!(&e, ProviderError::BadRequest(m) if m.contains("307")), "{e:?}");
    assert!(elsewhere.requests().is_empty(), "the key went to another host");
    assert_eq!(settled_total(&w, &a).await, 105);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compatible_server_without_usage_is_charged_on_our_count() {
    let w = world().await;
    let a = funded(&w, "local", 100).await;
    let table = format!(
        "{}\n[[model]]\nid = \"llama-3.1-8b\"\nprovider = \"openai_compatible\"\ninput = \"0.20\"\noutput = \"0.20\"\ncache_read = \"0.20\"\ncache_write = \"0.20\"\nmultiplier = 1\nmax_output_tokens = 8192\n",
        pricing::DEFAULT_PRICES_TOML
    );
    let pricing = Pricing::with_table(pricing::PriceTable::from_toml_str(&table).unwrap());
    let cfg = ClientConfig { base_url: w.fake.openai_url(), ..quick(ClientConfig::compatible("http://unused.invalid/v1", None)) };
    let play = Playground::new(w.store.clone(), pricing.clone(), Arc::new(StorePackages(w.store.clone()))).with_client(ProviderClient::new(cfg).unwrap());
    let answer = "a local answer of a few words";
    w.fake.push(Reply::ok(
        serde_json::json!({"id": "cmpl-1", "object": "chat.completion", "model": "llama-3.1-8b",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]})
        .to_string(),
    ));
    let r = play.run(req(&a, "llama-3.1-8b", "hello there")).await.unwrap().unwrap();
    let counted = play.estimate(&req(&a, "llama-3.1-8b", "hello there")).await.unwrap().input_tokens;
    assert_eq!(r.outcome, RunOutcome::Completed);
    assert_eq!(r.usage, usage(counted, Counter::Approximate.count(answer), 0, 0));
    assert_eq!(r.cost_micros, pricing.price_usage("llama-3.1-8b", &r.usage).unwrap().cost_micros);
    let sent = &w.fake.requests()[0];
    assert_eq!(sent.header("authorization"), None, "no key configured, none sent");
    assert_eq!(sent.body["max_tokens"], 1_000, "compatible servers get the classic field");
    // Streamed, without the usage chunk.
    let mut events = fake::openai_stream("llama-3.1-8b", &["a local ", "answer"], usage(1, 1, 0, 0));
    events.remove(events.len() - 2);
    w.fake.push(Reply::stream(events));
    let (_, end) = collect(play.run_stream(req(&a, "llama-3.1-8b", "hello there")).await.unwrap().unwrap()).await;
    let RunEvent::Done(r2) = end else { panic!("{end:?}") };
    assert_eq!(r2.usage, usage(counted, Counter::Approximate.count("a local answer"), 0, 0));
    assert_eq!(settled_total(&w, &a).await, 105 - r.credits - r2.credits);
}
