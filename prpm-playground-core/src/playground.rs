//! Playground runs: a package's prompt (and the session's history) plus the user's input, sent
//! to a model, paid for with credits.
//!
//! A run is: count the input tokens (refused over the request cap before anything is held),
//! estimate the worst case (input + max output), **hold** it (admission: credits, rate limit,
//! throttle, cost limits), call the provider, then in one step (one commit on SQLite)
//! **settle** with the provider's reported usage, record the run and append the turns to the
//! session (a run that starts a session creates it then: a failed first run leaves none). A
//! failed call releases the hold and charges nothing. A stream that breaks, or whose caller goes away, is settled for what was
//! consumed (input plus the output produced), never more than the hold; the hold is never left
//! open (and if the process dies, `expire_holds` returns it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::ledger::*;
use crate::pricing::{Estimate, EstimateRequest, Pricing, Provider, TokenUsage};
use crate::provider::tokens::Counter;
use crate::provider::{ChatMessage, ChatRequest, ChatResponse, ProviderClient, ProviderError, StreamEvent};
use crate::session::*;
use crate::store::{SettleRun, Store, record_settled_run};

/// Where package prompts come from: the embedding registry implements this; self-hosters use
/// [`StorePackages`] (the store's `packages` table).
#[async_trait]
pub trait PackageSource: Send + Sync {
    async fn package(&self, id: &str) -> Result<Option<Package>>;
}

/// The store's own packages table.
pub struct StorePackages(pub Arc<dyn Store>);

#[async_trait]
impl PackageSource for StorePackages {
    async fn package(&self, id: &str) -> Result<Option<Package>> {
        self.0.package(id).await
    }
}

/// The `operation` of a run's usage record.
pub const RUN_OPERATION: &str = "playground_run";
/// Longest title derived from a first input, in characters.
const TITLE_CHARS: usize = 60;

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRequest {
    pub account: AccountId,
    /// The package whose prompt is the system prompt; `None` runs without one.
    pub package_id: Option<String>,
    /// The session to continue; `None` starts a new one.
    pub session: Option<SessionId>,
    pub input: String,
    pub model: String,
    pub temperature: Option<f32>,
    /// The run's `max_tokens`; defaults to the pricing's default, capped by the model's limit.
    pub max_tokens: Option<u32>,
    /// The run's id, also the idempotency key of its hold. A run id runs once: repeating it is
    /// an idempotency conflict (list the runs for its result). Generated when `None`.
    pub run_id: Option<RunId>,
}

/// A run's estimate before anything is held.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RunEstimate {
    /// System prompt + history + input, with framing.
    pub input_tokens: u64,
    pub estimate: Estimate,
}

/// A finished (or interrupted) run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RunResult {
    pub run_id: RunId,
    pub session: Option<SessionId>,
    pub text: String,
    pub model: String,
    pub usage: TokenUsage,
    /// Credits charged (at most the hold).
    pub credits: Credits,
    pub cost_micros: i64,
    /// The provider call's duration (request to the answer's end; for a stream, through the
    /// delivery of its deltas), as the run record stores it.
    pub latency_ms: u64,
    /// The same, in microseconds: what the run took minus this is the library's own time.
    pub provider_micros: u64,
    pub outcome: RunOutcome,
    /// Usage was worth more credits than the hold: the hold was charged.
    pub capped: bool,
    pub estimate: Estimate,
}

/// A no-prompt comparison: the same input with and without the package prompt.
#[derive(Debug)]
pub struct Comparison {
    pub with_prompt: Result<Result<RunResult, Rejection>>,
    pub without_prompt: Result<Result<RunResult, Rejection>>,
}

/// What a streamed run sends its caller.
#[derive(Debug)]
pub enum RunEvent {
    Delta(String),
    /// The run completed; nothing follows.
    Done(RunResult),
    /// The provider failed. `result` is the interrupted run's settlement when the stream had
    /// started (what was consumed was charged), `None` when nothing was (the hold was released).
    Failed {
        error: Error,
        result: Option<RunResult>,
    },
}

/// A streamed run, as its caller reads it. Dropping it stops the run: what was consumed so far
/// is settled and the rest released.
#[derive(Debug)]
pub struct RunStream {
    pub run_id: RunId,
    /// The run's session: the one it continues, or the one it starts (created when the run
    /// settles, so it exists once `Done` arrives).
    pub session: Option<SessionId>,
    pub estimate: Estimate,
    rx: mpsc::Receiver<RunEvent>,
}

impl RunStream {
    pub async fn next(&mut self) -> Option<RunEvent> {
        self.rx.recv().await
    }
}

#[derive(Debug, Clone)]
pub struct PlaygroundConfig {
    /// Extra life of a hold beyond the longest the provider call may take with its retries.
    pub hold_margin_secs: u32,
    /// Events buffered between a streamed run and its caller.
    pub stream_buffer: usize,
    /// A streamed run whose caller takes no event for this long is treated as abandoned:
    /// settled for what was consumed (so a stalled reader cannot keep a hold open).
    pub stall_timeout: std::time::Duration,
    /// Refuse runs of accounts that owe refunded credits ([`Rejection::InDebt`]); for
    /// billing with the `debt` refund policy.
    pub check_debt: bool,
}

impl Default for PlaygroundConfig {
    fn default() -> Self {
        PlaygroundConfig { hold_margin_secs: 120, stream_buffer: 64, stall_timeout: std::time::Duration::from_secs(60), check_debt: false }
    }
}

/// Runs and sessions over a store, a price table, a package source and provider clients.
/// Cheap to clone.
#[derive(Clone)]
pub struct Playground {
    store: Arc<dyn Store>,
    pricing: Arc<Pricing>,
    packages: Arc<dyn PackageSource>,
    clients: Arc<HashMap<Provider, ProviderClient>>,
    cfg: PlaygroundConfig,
    in_flight: Arc<InFlight>,
}

/// Runs holding credits: from their hold until they settle or release.
#[derive(Default)]
struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Counts a run in flight while it lives (it lives in the run's [`Prepared`]).
struct InFlightGuard(Arc<InFlight>);

impl InFlightGuard {
    fn new(f: &Arc<InFlight>) -> Self {
        f.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlightGuard(f.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Everything decided before the provider is called.
struct Prepared {
    run_id: RunId,
    account: AccountId,
    package_id: Option<String>,
    session: Option<SessionId>,
    chat: ChatRequest,
    client: ProviderClient,
    input_tokens: u64,
    estimate: Estimate,
    with_prompt: bool,
    input: String,
    hold: HoldId,
    /// The session this run starts, created when it settles (`session` is its id).
    new_session: Option<NewSession>,
    _in_flight: InFlightGuard,
}

impl Playground {
    pub fn new(store: Arc<dyn Store>, pricing: Pricing, packages: Arc<dyn PackageSource>) -> Self {
        Playground {
            store,
            pricing: Arc::new(pricing),
            packages,
            clients: Arc::new(HashMap::new()),
            cfg: PlaygroundConfig::default(),
            in_flight: Arc::default(),
        }
    }

    /// Runs holding credits now (held, not yet settled or released), streamed ones whose
    /// caller left included.
    pub fn runs_in_flight(&self) -> usize {
        self.in_flight.count.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until no run holds credits, at most `timeout`; `true` if none does. For a host's
    /// graceful shutdown: stop taking runs, then wait.
    pub async fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let f = &self.in_flight;
        tokio::time::timeout(timeout, async {
            loop {
                let idle = f.idle.notified();
                if f.count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await
        .is_ok()
    }

    /// Adds (or replaces) the client of its provider.
    pub fn with_client(mut self, client: ProviderClient) -> Self {
        Arc::make_mut(&mut self.clients).insert(client.provider(), client);
        self
    }

    pub fn with_config(mut self, cfg: PlaygroundConfig) -> Self {
        self.cfg = cfg;
        self
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn pricing(&self) -> &Pricing {
        &self.pricing
    }

    /// Counts the input (system prompt + history + input) and prices the worst and expected
    /// cases. Over the request cap: [`Error::RequestTooLarge`].
    pub async fn estimate(&self, req: &RunRequest) -> Result<RunEstimate> {
        let (_, input_tokens, estimate, ..) = self.plan(req, true).await?;
        Ok(RunEstimate { input_tokens, estimate })
    }

    /// Runs to completion. The run is driven by its own task: if the caller's future is
    /// dropped, the run still finishes, settles and is recorded (a hold is never left open).
    pub async fn run(&self, req: RunRequest) -> Result<Result<RunResult, Rejection>> {
        let me = self.clone();
        detached(async move { me.run_here(req, true, true).await }).await
    }

    async fn run_here(&self, req: RunRequest, with_prompt: bool, in_session: bool) -> Result<Result<RunResult, Rejection>> {
        let p = match self.prepare(&req, with_prompt, in_session).await? {
            Ok(p) => p,
            Err(r) => return Ok(Err(r)),
        };
        Ok(Ok(self.driver().complete(p).await?))
    }

    /// The same input with and without the package prompt, concurrently; both are charged and
    /// recorded (outside any session) and returned side by side.
    pub async fn compare(&self, req: RunRequest) -> Result<Comparison> {
        if req.package_id.is_none() {
            return Err(Error::invalid("package_id", "a comparison needs a package"));
        }
        if req.session.is_some() {
            return Err(Error::invalid("session", "a comparison runs outside sessions"));
        }
        if req.run_id.is_some() {
            return Err(Error::invalid("run_id", "a comparison generates its two run ids"));
        }
        let half = |with_prompt: bool| {
            let (me, req) = (self.clone(), req.clone());
            detached(async move { me.run_here(req, with_prompt, false).await })
        };
        let (with_prompt, without_prompt) = tokio::join!(half(true), half(false));
        Ok(Comparison { with_prompt, without_prompt })
    }

    /// Starts a streamed run. Text arrives as [`RunEvent::Delta`]s, then one `Done` or
    /// `Failed`. The run is driven by its own task, so it settles whatever the caller does.
    pub async fn run_stream(&self, req: RunRequest) -> Result<Result<RunStream, Rejection>> {
        let p = match self.prepare(&req, true, true).await? {
            Ok(p) => p,
            Err(r) => return Ok(Err(r)),
        };
        let (tx, rx) = mpsc::channel(self.cfg.stream_buffer.max(1));
        let stream = RunStream { run_id: p.run_id.clone(), session: p.session.clone(), estimate: p.estimate.clone(), rx };
        let driver = self.driver();
        let stall = self.cfg.stall_timeout;
        tokio::spawn(async move { driver.stream(p, tx, stall).await });
        Ok(Ok(stream))
    }

    // ---- sessions -------------------------------------------------------------------------

    pub async fn session(&self, owner: &AccountId, id: &SessionId) -> Result<Session> {
        self.store.session(owner, id).await?.ok_or(Error::NotFound { what: "session" })
    }

    pub async fn sessions(&self, owner: &AccountId, cursor: Option<&str>, limit: u32) -> Result<SessionPage> {
        self.store.sessions(owner, cursor, limit).await
    }

    pub async fn delete_session(&self, owner: &AccountId, id: &SessionId) -> Result<()> {
        if self.store.delete_session(owner, id).await? { Ok(()) } else { Err(Error::NotFound { what: "session" }) }
    }

    /// Shares the session under a fresh token (256 bits from the CSPRNG), replacing any
    /// earlier one.
    pub async fn share(&self, owner: &AccountId, id: &SessionId) -> Result<ShareToken> {
        let token = ShareToken::generate();
        if self.store.share_session(owner, id, &token).await? { Ok(token) } else { Err(Error::NotFound { what: "session" }) }
    }

    pub async fn revoke_share(&self, owner: &AccountId, id: &SessionId) -> Result<()> {
        if self.store.revoke_share(owner, id).await? { Ok(()) } else { Err(Error::NotFound { what: "session" }) }
    }

    /// The public view of a shared session: the conversation only.
    pub async fn shared(&self, token: &str) -> Result<SharedSession> {
        let token = ShareToken::parse(token).map_err(|_| Error::NotFound { what: "shared session" })?;
        self.store.shared_session(&token).await?.ok_or(Error::NotFound { what: "shared session" })
    }

    // ---- the run --------------------------------------------------------------------------

    /// Validates the request and builds the chat request and its estimate. No writes.
    /// The client is `None` when no client is configured for the model's provider: an
    /// estimate needs none, a run does.
    async fn plan(&self, req: &RunRequest, with_prompt: bool) -> Result<(ChatRequest, u64, Estimate, Option<ProviderClient>, Option<Session>)> {
        NewTurn { role: Role::User, content: req.input.clone() }.validate()?;
        if req.input.trim().is_empty() {
            return Err(Error::invalid("input", "must not be empty"));
        }
        let price = self.pricing.table.get(&req.model)?;
        let client = self.clients.get(&price.provider).cloned();
        if let Some(t) = req.temperature {
            let max = if price.provider == Provider::Anthropic { 1.0 } else { 2.0 };
            if !(t.is_finite() && (0.0..=max).contains(&t)) {
                return Err(Error::invalid("temperature", format!("must be between 0 and {max} for this model")));
            }
        }
        // The package and the session are read at once.
        let package = async {
            match &req.package_id {
                // The package must exist even when its prompt is left out.
                Some(id) => self.packages.package(id).await?.ok_or(Error::NotFound { what: "package" }).map(Some),
                None => Ok(None),
            }
        };
        let session = async {
            match &req.session {
                Some(id) => self.store.session(&req.account, id).await?.ok_or(Error::NotFound { what: "session" }).map(Some),
                None => Ok(None),
            }
        };
        let (package, session) = tokio::join!(package, session);
        let system = package?.filter(|_| with_prompt).map(|p| p.prompt);
        let session = session?;
        let mut messages: Vec<ChatMessage> =
            session.iter().flat_map(|s| s.turns.iter()).map(|t| ChatMessage { role: t.role, content: t.content.clone() }).collect();
        if session.as_ref().is_some_and(|s| s.summary.turns + 2 > MAX_TURNS_PER_SESSION) {
            return Err(Error::invalid("session", format!("a session holds at most {MAX_TURNS_PER_SESSION} turns")));
        }
        messages.push(ChatMessage { role: Role::User, content: req.input.clone() });
        let counter = Counter::for_model(price.provider, &price.id);
        let input_tokens = counter.count_chat(system.as_deref(), messages.iter().map(|m| (m.role, m.content.as_str())));
        let estimate = self.pricing.estimate(&EstimateRequest {
            model: price.id.clone(),
            input_tokens,
            max_output_tokens: req.max_tokens,
            expected_output_tokens: None,
        })?;
        let max_tokens = req.max_tokens.unwrap_or(self.pricing.default_max_output_tokens.min(price.max_output_tokens));
        let chat = ChatRequest { model: price.id.clone(), system, messages, max_tokens, temperature: req.temperature };
        Ok((chat, input_tokens, estimate, client, session))
    }

    /// Plans the run and holds its worst case. A rejection holds nothing. `in_session`: the
    /// run continues its session or starts one (a comparison's halves stay outside).
    async fn prepare(&self, req: &RunRequest, with_prompt: bool, in_session: bool) -> Result<Result<Prepared, Rejection>> {
        let (chat, input_tokens, estimate, client, session) = self.plan(req, with_prompt).await?;
        let client = client.ok_or_else(|| {
            Error::Provider(ProviderError::Unavailable(match client_provider(&self.pricing, &chat.model) {
                Some(p) => format!("no client is configured for {p:?} models"),
                None => format!("no client is configured for {}", chat.model),
            }))
        })?;
        if self.cfg.check_debt {
            let credits = self.store.debt(&req.account).await?;
            if credits > 0 {
                return Ok(Err(Rejection::InDebt { credits }));
            }
        }
        let run_id = req.run_id.clone().unwrap_or_else(RunId::generate);
        let key = format!("run:{run_id}:hold");
        let hold = Hold {
            account: req.account.clone(),
            amount: estimate.worst_case.credits as Credits,
            ttl_secs: hold_ttl_secs(&client, self.cfg.hold_margin_secs),
            cost_micros: estimate.worst_case.cost_micros,
            reference: format!("run {run_id}"),
            key: IdempotencyKey::new(key.clone())?,
        };
        let committed = match self.store.hold(hold).await? {
            Ok(c) => c,
            Err(r) => return Ok(Err(r)),
        };
        if committed.replayed {
            return Err(Error::IdempotencyConflict { key });
        }
        let Effect::Held { hold, .. } = committed.effect else {
            return Err(Error::Invariant("a hold that did not hold".into()));
        };
        let (session, new_session) = match (session, in_session) {
            (Some(s), _) => (Some(s.summary.id), None),
            (None, true) => {
                let title: String = req.input.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(TITLE_CHARS).collect();
                let ns =
                    NewSession { id: SessionId::generate(), owner: req.account.clone(), package_id: req.package_id.clone(), model: chat.model.clone(), title };
                (Some(ns.id.clone()), Some(ns))
            }
            (None, false) => (None, None),
        };
        Ok(Ok(Prepared {
            run_id,
            account: req.account.clone(),
            package_id: req.package_id.clone(),
            session,
            chat,
            client,
            input_tokens,
            estimate,
            with_prompt,
            input: req.input.clone(),
            hold,
            new_session,
            _in_flight: InFlightGuard::new(&self.in_flight),
        }))
    }

    fn driver(&self) -> Driver {
        Driver { store: self.store.clone(), pricing: self.pricing.clone() }
    }
}

fn client_provider(pricing: &Pricing, model: &str) -> Option<Provider> {
    pricing.table.get(model).ok().map(|p| p.provider)
}

/// Runs `f` on its own task, so that it completes even if the caller's future is dropped.
async fn detached<T: Send + 'static>(f: impl std::future::Future<Output = Result<T>> + Send + 'static) -> Result<T> {
    tokio::spawn(f).await.map_err(|e| Error::Invariant(format!("a run's task failed: {e}")))?
}

/// A hold outlives the longest provider call (every attempt, every wait) by a margin.
fn hold_ttl_secs(client: &ProviderClient, margin_secs: u32) -> u32 {
    let c = client.config();
    let attempts = u64::from(c.max_retries) + 1;
    let secs = |d: std::time::Duration| d.as_millis().div_ceil(1_000) as u64;
    let worst = attempts * secs(c.total_timeout) + u64::from(c.max_retries) * secs(c.backoff_max.max(c.max_retry_after));
    (worst + u64::from(margin_secs)).min(u64::from(MAX_HOLD_TTL_SECS)) as u32
}

/// Settles, releases and records runs. Holds only shared handles, so a spawned stream task
/// carries its own.
struct Driver {
    store: Arc<dyn Store>,
    pricing: Arc<Pricing>,
}

enum StreamStep {
    Event(Option<std::result::Result<StreamEvent, ProviderError>>),
    CallerGone,
}

fn run_key(run_id: &RunId, step: &str) -> Result<IdempotencyKey> {
    IdempotencyKey::new(format!("run:{run_id}:{step}"))
}

impl Driver {
    async fn complete(&self, p: Prepared) -> Result<RunResult> {
        let started = Instant::now();
        match p.client.complete(&p.chat).await {
            Ok(ChatResponse { usage, usage_reported, text, .. }) => {
                // A compatible server that reports no usage: our own count of input and output.
                let usage = if usage_reported { usage } else { consumed(&p, Default::default(), &text) };
                self.finish(&p, usage, text, RunOutcome::Completed, None, started).await
            }
            Err(e) => {
                self.fail(&p, &e, started).await;
                Err(Error::Provider(e))
            }
        }
    }

    async fn stream(&self, p: Prepared, tx: mpsc::Sender<RunEvent>, stall: std::time::Duration) {
        let started = Instant::now();
        let mut s = match p.client.stream(&p.chat).await {
            Ok(s) => s,
            Err(e) => {
                self.fail(&p, &e, started).await;
                let _ = tx.send(RunEvent::Failed { error: Error::Provider(e), result: None }).await;
                return;
            }
        };
        loop {
            let step = tokio::select! {
                ev = s.next() => StreamStep::Event(ev),
                _ = tx.closed() => StreamStep::CallerGone,
            };
            let error = match step {
                StreamStep::Event(Some(Ok(StreamEvent::Delta(t)))) => {
                    // A caller that stops reading is a caller gone (bounded: a stalled reader
                    // must not keep the hold open).
                    if let Ok(Ok(())) = tokio::time::timeout(stall, tx.send(RunEvent::Delta(t))).await {
                        continue;
                    }
                    None
                }
                StreamStep::Event(Some(Ok(StreamEvent::Done(resp)))) => {
                    let usage = if resp.usage_reported { resp.usage } else { consumed(&p, Default::default(), &resp.text) };
                    let event = match self.finish(&p, usage, resp.text, RunOutcome::Completed, None, started).await {
                        Ok(r) => RunEvent::Done(r),
                        Err(error) => RunEvent::Failed { error, result: None },
                    };
                    let _ = tx.send(event).await;
                    return;
                }
                StreamStep::Event(Some(Err(e))) => Some(e),
                StreamStep::Event(None) => Some(ProviderError::Unavailable("the stream ended early".into())),
                StreamStep::CallerGone => None,
            };
            // Interrupted: charge what was consumed, never more than the hold.
            let usage = consumed(&p, s.reported_usage(), s.text());
            let code = error.as_ref().map_or("caller_gone", ProviderError::code);
            let result = self.finish(&p, usage, s.text().to_owned(), RunOutcome::Interrupted, Some(code), started).await;
            if let Some(e) = error {
                let event = match result {
                    Ok(r) => RunEvent::Failed { error: Error::Provider(e), result: Some(r) },
                    Err(error) => RunEvent::Failed { error, result: None },
                };
                let _ = tx.send(event).await;
            }
            return;
        }
    }

    /// Settles the hold with `usage`, records the run and appends its turns.
    async fn finish(&self, p: &Prepared, usage: TokenUsage, text: String, outcome: RunOutcome, error: Option<&str>, started: Instant) -> Result<RunResult> {
        let provider_micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let latency_ms = provider_micros / 1_000;
        let quote = match self.pricing.price_usage(&p.chat.model, &usage) {
            Ok(q) => q,
            Err(e) => {
                // Usage no price can be put on (absurd token counts): a malformed answer.
                let pe = ProviderError::Malformed(format!("reported usage: {e}"));
                self.fail(p, &pe, started).await;
                return Err(Error::Provider(pe));
            }
        };
        let record = Usage { operation: RUN_OPERATION.into(), model: p.chat.model.clone(), tokens: usage, cost_micros: quote.cost_micros };
        let settle = Settle { hold: p.hold, credits: quote.credits as Credits, usage: Some(record.clone()), key: run_key(&p.run_id, "settle")? };
        let run = RunRecord {
            id: p.run_id.clone(),
            account: p.account.clone(),
            session: p.session.clone(),
            package_id: p.package_id.clone(),
            model: p.chat.model.clone(),
            with_prompt: p.with_prompt,
            tokens: usage,
            credits: 0,
            cost_micros: quote.cost_micros,
            latency_ms,
            outcome,
            error: error.map(str::to_owned),
            hold: Some(p.hold),
            at: self.store.clock().now(),
        };
        let turns = match &p.session {
            Some(_) if outcome == RunOutcome::Completed || !text.is_empty() => {
                vec![NewTurn { role: Role::User, content: p.input.clone() }, NewTurn { role: Role::Assistant, content: NewTurn::storable(&text) }]
            }
            _ => Vec::new(),
        };
        // Settle, record the run and append its turns at once. Keyed (the settle by its key,
        // the run by its id), so a retry after a store error cannot settle or record twice.
        // Whatever happened to the session meanwhile (deleted, full), a settled run is recorded.
        let job = SettleRun { settle, run: run.clone(), turns: turns.clone(), new_session: p.new_session.clone() };
        let done = match self.store.settle_run(job.clone()).await {
            Err(_) => self.store.settle_run(job).await?,
            r => r?,
        };
        let (credits, capped, session) = match done.settled {
            Ok(Committed { effect: Effect::Settled { charged, capped, .. }, .. }) => (charged.total(), capped, done.session),
            Ok(other) => return Err(Error::Invariant(format!("settle of run {} gave {other:?}", p.run_id))),
            Err(Rejection::HoldExpired(_)) => {
                // The sweep returned the hold before the provider answered (a call longer than
                // the hold's life): no credits, but the cost still counts toward the limits.
                let meter = Meter { account: p.account.clone(), usage: record, reference: format!("run {}", p.run_id), key: run_key(&p.run_id, "meter")? };
                self.store.meter(meter).await?.map_err(|r| Error::Invariant(format!("meter of run {}: {r}", p.run_id)))?;
                // Best effort, as for a failure: the caller hears of the run either way.
                let session = record_settled_run(&*self.store, run, &turns, p.new_session.as_ref()).await.unwrap_or(None);
                (0, false, session)
            }
            Err(r) => return Err(Error::Invariant(format!("settle of run {}: {r}", p.run_id))),
        };
        Ok(RunResult {
            run_id: p.run_id.clone(),
            session,
            text,
            model: p.chat.model.clone(),
            usage,
            credits,
            cost_micros: quote.cost_micros,
            latency_ms,
            provider_micros,
            outcome,
            capped,
            estimate: p.estimate.clone(),
        })
    }

    /// The provider failed: release the hold (nothing is charged) and record the failure.
    async fn fail(&self, p: &Prepared, e: &ProviderError, started: Instant) {
        self.release(&p.run_id, p.hold).await;
        let run = RunRecord {
            id: p.run_id.clone(),
            account: p.account.clone(),
            session: p.session.clone(),
            package_id: p.package_id.clone(),
            model: p.chat.model.clone(),
            with_prompt: p.with_prompt,
            tokens: TokenUsage::default(),
            credits: 0,
            cost_micros: 0,
            latency_ms: started.elapsed().as_millis() as u64,
            outcome: RunOutcome::Failed,
            error: Some(e.code().to_owned()),
            hold: Some(p.hold),
            at: self.store.clock().now(),
        };
        // Best effort: the failure is what the caller hears about; a store that cannot record
        // it now leaves the hold to `expire_holds`. A session this run would have started is
        // never created, and the record does not point at it.
        let run = if p.new_session.is_some() { RunRecord { session: None, ..run } } else { run };
        let _ = self.store.record_run(&run, &[]).await;
    }

    async fn release(&self, run_id: &RunId, hold: HoldId) {
        if let Ok(key) = run_key(run_id, "release") {
            let _ = self.store.release(hold, key).await;
        }
    }
}

/// What an interrupted stream consumed: the input (as reported, else as counted) and the
/// output produced (as reported, or as counted from the text received, whichever is more).
fn consumed(p: &Prepared, reported: crate::provider::ReportedUsage, text: &str) -> TokenUsage {
    let produced = Counter::for_model(p.client.provider(), &p.chat.model).count(text);
    TokenUsage {
        input: reported.input.unwrap_or(p.input_tokens),
        output: reported.output.unwrap_or(0).max(produced),
        cache_read: reported.cache_read.unwrap_or(0),
        cache_write: reported.cache_write.unwrap_or(0),
    }
}
