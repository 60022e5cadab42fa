//! The PostgreSQL backend: many stateless app nodes over one database.
//!
//! Every command is one transaction that locks the row of the account it changes
//! (`SELECT ... FOR UPDATE`), decides with the same pure rules as every backend
//! ([`rules::apply`]), writes, and commits. Commands on different accounts run in parallel on
//! different connections; commands on one account queue on its row lock, on whichever node they
//! arrive. A command that loses a race (two first uses of one idempotency key, two creations of
//! one account) fails on a unique key, rolls back, and is retried: the retry sees the winner's
//! row (a replay, or `account_exists`).
//!
//! The schema lives in `migrations/postgres/`; [`PgStore::open`] applies what is pending under
//! an advisory lock, so nodes starting at once migrate once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};

use super::outcome;
use super::*;
use crate::clock::{SystemClock, to_millis};
use crate::cost::{Alert, AlertSink, CostState, TierLimits, TierTable};
use crate::ledger::rules::{self, ChargeRecord, HoldRecord, HoldStatus, NEW_HOLD, OpenHold, Snapshot};
use crate::purchase::{PurchaseKind, PurchaseStatus};
use crate::session::{Role, RunId, RunOutcome, SharedTurn, Turn};

mod embedded {
    refinery::embed_migrations!("../migrations/postgres");
}

/// The advisory lock every node takes while it migrates ("PRPM" and "MIGR"), so that nodes
/// starting at once migrate once: the others wait, then find nothing to do.
pub const MIGRATION_LOCK: i64 = 0x5052_504D_4D49_4752;
/// Attempts of one command that keeps losing races (unique keys, serialization, deadlocks).
const MAX_ATTEMPTS: u32 = 8;
const MAX_DISCREPANCIES: i64 = 10_000;

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        use tokio_postgres::error::SqlState;
        let lost = e.is_closed() || matches!(e.code(), Some(c) if *c == SqlState::ADMIN_SHUTDOWN || *c == SqlState::CRASH_SHUTDOWN);
        let text = match e.as_db_error() {
            Some(db) => format!("postgres: {} ({})", db.message(), db.code().code()),
            None => format!("postgres: {e}"),
        };
        if lost { Error::ConnectionLost(text) } else { Error::Backend(text) }
    }
}

/// The schema version this code knows.
pub fn supported_version() -> i64 {
    embedded::migrations::runner().get_migrations().iter().map(|m| i64::from(m.version())).max().unwrap_or(0)
}

/// Applies pending migrations under [`MIGRATION_LOCK`]. Refuses a database migrated by a newer
/// version of this library. Returns the versions applied by this call.
pub async fn migrate(client: &mut Client) -> Result<Vec<i64>> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    let result = migrate_locked(client).await;
    let unlock = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn migrate_locked(client: &mut Client) -> Result<Vec<i64>> {
    let found: Option<i64> = match client.query_opt("SELECT max(version)::bigint FROM refinery_schema_history", &[]).await {
        Ok(row) => row.and_then(|r| r.get(0)),
        // No history table yet: a fresh database.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
        Err(e) => return Err(e.into()),
    };
    let supported = supported_version();
    if let Some(found) = found.filter(|f| *f > supported) {
        return Err(Error::SchemaTooNew { found, supported });
    }
    let report = embedded::migrations::runner()
        .set_abort_divergent(true)
        .set_abort_missing(true)
        .run_async(client)
        .await
        .map_err(|e| Error::Backend(format!("migration failed: {e}")))?;
    Ok(report.applied_migrations().iter().map(|m| i64::from(m.version())).collect())
}

/// Applies the migrations up to `version` only: for tests of a migration that moves data.
#[doc(hidden)]
pub async fn migrate_up_to(client: &mut Client, version: i32) -> Result<()> {
    embedded::migrations::runner()
        .set_target(refinery::Target::Version(version))
        .run_async(client)
        .await
        .map_err(|e| Error::Backend(format!("migration failed: {e}")))?;
    Ok(())
}

/// Whether `url` names a PostgreSQL database (a `postgres://` / `postgresql://` URL, or
/// `key=value` pairs with a `dbname`) rather than a SQLite file path.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://") || url.split_whitespace().any(|kv| kv.starts_with("dbname="))
}

/// How to open a PostgreSQL store.
#[derive(Clone)]
pub struct PgOptions {
    /// `postgres://user@host:port/db` or `host=/tmp port=5432 user=... dbname=...` (a `host`
    /// that is a directory means a unix socket). TLS-less.
    pub url: String,
    /// Connections in the pool.
    pub pool_size: usize,
    pub ledger: LedgerConfig,
    pub clock: Arc<dyn Clock>,
    pub alert_sink: Option<Arc<dyn AlertSink>>,
    /// Batches this node keeps in flight at once, each on its own connection. Default 2: one
    /// batch runs its statement while the other waits for its `COMMIT`'s flush. Concurrent
    /// commands share batches (one transaction whatever its size); the batcher splits them
    /// into batches of equal size that take turns (the README's PostgreSQL section has the
    /// measurements).
    pub lanes: usize,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("PgOptions").field("pool_size", &self.pool_size).finish_non_exhaustive()
    }
}

impl PgOptions {
    pub fn new(url: impl Into<String>) -> Self {
        PgOptions { url: url.into(), pool_size: 16, ledger: LedgerConfig::default(), clock: Arc::new(SystemClock), alert_sink: None, lanes: 2 }
    }
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
    pub fn ledger(mut self, ledger: LedgerConfig) -> Self {
        self.ledger = ledger;
        self
    }
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n;
        self
    }
    pub fn alert_sink(mut self, sink: Arc<dyn AlertSink>) -> Self {
        self.alert_sink = Some(sink);
        self
    }
}

/// The PostgreSQL store. Cheap to share behind an `Arc`.
pub struct PgStore {
    core: Arc<Core>,
    /// Batchers of this node: concurrent commands are committed in groups (see [`Core::run_batch`]).
    batcher: mpsc::UnboundedSender<Job>,
}

/// What the store and its batchers share.
struct Core {
    pool: Pool,
    clock: Arc<dyn Clock>,
    ledger: LedgerConfig,
    sink: Option<Arc<dyn AlertSink>>,
    stats: Stats,
    ids: std::sync::Mutex<IdBlock>,
}

#[derive(Default)]
struct Stats {
    batches: AtomicU64,
    batched_commands: AtomicU64,
    failed_batches: AtomicU64,
    unlocked_batches: AtomicU64,
    stale_batches: AtomicU64,
    block_batches: AtomicU64,
    last_failure: std::sync::Mutex<Option<String>>,
}

/// How group commit has gone on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Batches committed (a lone command is a batch of one).
    pub batches: u64,
    /// Commands committed in them.
    pub batched_commands: u64,
    /// Batches that failed and whose commands were retried one by one (lost races with other
    /// nodes, lost connections).
    pub failed_batches: u64,
    /// Batches applied to the node's cached state without the locked reads (one round trip).
    pub unlocked_batches: u64,
    /// Unlocked batches that found the account changed (or a key used) and took the locked
    /// path instead.
    pub stale_batches: u64,
    /// Unlocked batches that took their ids from the node's block (see `IdBlock`), not from
    /// the sequences in a round trip of their own.
    pub block_batches: u64,
    pub last_failure: Option<String>,
}

struct Job {
    cmd: Command,
    fp: i64,
    /// Taken when the command is answered: once, as soon as its result is known (a batch
    /// answers right after its `COMMIT`, before it updates the node's cache).
    reply: Option<oneshot::Sender<Result<Outcome>>>,
}

impl Job {
    fn answer(&mut self, r: Result<Outcome>) {
        debug_assert!(self.reply.is_some(), "a command is answered once");
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(r);
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

/// Lost races, and lost connections: retrying is safe for every command, since keyed ones
/// replay if their first try committed after all, and the others are idempotent by state.
fn is_retryable(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    let code = e.code();
    e.is_closed()
        || matches!(code, Some(c) if *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::ADMIN_SHUTDOWN || *c == SqlState::CRASH_SHUTDOWN)
}

/// A command's failure inside its transaction: retry it, or give up with this error.
enum TxError {
    Retry(Error),
    Fail(Error),
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        if is_retryable(&e) { TxError::Retry(e.into()) } else { TxError::Fail(e.into()) }
    }
}

impl From<Error> for TxError {
    fn from(e: Error) -> Self {
        TxError::Fail(e)
    }
}

impl PgStore {
    /// Connects, applies pending migrations (once across nodes), and returns the store.
    pub async fn open(opts: PgOptions) -> Result<PgStore> {
        if opts.pool_size == 0 {
            return Err(Error::invalid("pool_size", "must be at least 1"));
        }
        let mut pg: tokio_postgres::Config = opts.url.parse().map_err(|e| Error::invalid("url", format!("{e}")))?;
        // Our statements are prepared once per connection and run with different arrays each
        // time: plan them once (a custom plan per execution costs more than it saves here).
        let options = format!("{} -c plan_cache_mode=force_generic_plan", pg.get_options().unwrap_or_default());
        pg.options(options.trim());
        let mgr = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        // The most recently used connection first: a warm backend (its caches and prepared
        // plans) rather than each of the pool's in turn.
        let pool = Pool::builder(mgr)
            .max_size(opts.pool_size)
            .queue_mode(deadpool_postgres::QueueMode::Lifo)
            .build()
            .map_err(|e| Error::Backend(format!("pool: {e}")))?;
        let core = Arc::new(Core { pool, clock: opts.clock, ledger: opts.ledger, sink: opts.alert_sink, stats: Stats::default(), ids: Default::default() });
        let mut client = core.client().await?;
        migrate(&mut client).await?;
        // The id block relies on ids taken later being higher (no per-session cache of ids);
        // a sequence altered to cache them turns the block off.
        let caches: i64 = client
            .query_one("SELECT count(*) FROM pg_sequence WHERE seqrelid IN ('holds_id_seq'::regclass, 'ledger_entries_id_seq'::regclass) AND seqcache = 1", &[])
            .await?
            .get(0);
        core.id_block().enabled = caches == 2;
        drop(client);
        let (batcher, rx) = mpsc::unbounded_channel();
        tokio::spawn(batcher_loop(core.clone(), rx, opts.lanes.max(1)));
        Ok(PgStore { core, batcher })
    }

    /// How group commit has gone on this node so far.
    pub fn batch_stats(&self) -> BatchStats {
        let s = &self.core.stats;
        BatchStats {
            batches: s.batches.load(Ordering::Relaxed),
            batched_commands: s.batched_commands.load(Ordering::Relaxed),
            failed_batches: s.failed_batches.load(Ordering::Relaxed),
            unlocked_batches: s.unlocked_batches.load(Ordering::Relaxed),
            stale_batches: s.stale_batches.load(Ordering::Relaxed),
            block_batches: s.block_batches.load(Ordering::Relaxed),
            last_failure: s.last_failure.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

impl Core {
    /// A pooled connection that is still open (a server restart or an administrator may have
    /// ended pooled ones: those are dropped from the pool, not handed out).
    /// The node's id block (see `IdBlock`); never held across an `.await`.
    fn id_block(&self) -> std::sync::MutexGuard<'_, IdBlock> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        for _ in 0..=self.pool.status().max_size {
            let c = self.pool.get().await.map_err(|e| Error::Backend(format!("postgres pool: {e}")))?;
            if !c.is_closed() {
                return Ok(c);
            }
            drop(deadpool_postgres::Object::take(c));
        }
        Err(Error::Backend("postgres: no open connection".into()))
    }

    /// A command on its own transaction, retried while it loses races.
    async fn execute_single(&self, cmd: &Command, fp: i64) -> Result<Outcome> {
        let mut last = None;
        for _ in 0..MAX_ATTEMPTS {
            match self.attempt(cmd, fp).await {
                Ok((outcome, alerts)) => {
                    self.notify(&alerts);
                    return Ok(outcome);
                }
                Err(TxError::Retry(e)) => last = Some(e),
                Err(TxError::Fail(e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Backend("postgres: gave up".into())))
    }

    fn notify(&self, alerts: &[(AccountId, Alert)]) {
        if let Some(sink) = &self.sink {
            for (account, alert) in alerts {
                sink.alert(account, alert);
            }
        }
    }

    /// One attempt of a command, in its own transaction.
    async fn attempt(&self, cmd: &Command, fp: i64) -> Result<(Outcome, Vec<(AccountId, Alert)>), TxError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if let Command::SetTier(c) = cmd {
            if let Some(replay) = stored_outcome(&tx, cmd, fp).await? {
                return Ok((replay, Vec::new()));
            }
            let now = to_millis(self.clock.now());
            let warnings = c.limits.validate()?;
            write_tier(&tx, &c.limits).await?;
            let effect = Effect::TierSet { warnings };
            remember(&tx, cmd, &effect, fp, now).await?;
            tx.commit().await?;
            return Ok((Ok(Committed { effect, replayed: false }), Vec::new()));
        }
        // Before any id is taken (see `USAGE_LOCK`).
        tx.execute("SELECT pg_advisory_xact_lock_shared($1)", &[&USAGE_LOCK]).await?;
        // Lock the account (for a settle or release: the hold's account), then read.
        let mut snap = Snapshot::default();
        let account_id: Option<i64> = match (cmd.hold(), cmd.account()) {
            (Some(hold), _) => tx.query_opt("SELECT account_id FROM holds WHERE id = $1", &[&hold.0]).await?.map(|r| r.get(0)),
            (None, Some(ext)) => tx.query_opt("SELECT id FROM accounts WHERE external_id = $1", &[&ext.as_str()]).await?.map(|r| r.get(0)),
            (None, None) => None,
        };
        let mut ext = cmd.account().cloned();
        if let Some(id) = account_id {
            let row = tx.query_one(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1 FOR UPDATE"), &[&id]).await?;
            let (_, e, state) = account_from_row(&row)?;
            ext = Some(e);
            snap.state = Some(state);
            snap.open_holds = load_open_holds(&tx, id).await?;
            if let Some(hold) = cmd.hold() {
                let r = tx.query_one("SELECT amount, deadline, status FROM holds WHERE id = $1", &[&hold.0]).await?;
                snap.hold = Some(HoldRecord { id: hold, amount: r.get(0), deadline: r.get(1), status: HoldStatus::parse(r.get(2))? });
            }
            if let Command::Refund(r) = cmd {
                snap.charge = load_charge(&tx, id, r.entry).await?;
            }
        }
        // The key is read after the lock: a command with this key that committed while we
        // waited is seen (a replay), not decided again on the state it left.
        if let Some(replay) = stored_outcome(&tx, cmd, fp).await? {
            return Ok((replay, Vec::new()));
        }
        let tiers = load_tiers(&tx).await?;
        // The time is read after the lock wait, too.
        let now = to_millis(self.clock.now());
        let transition = match rules::apply(&self.ledger, &tiers, &snap, cmd, now)? {
            Ok(t) => t,
            // A rejection writes nothing. Without a row to lock (a creation), a command with the
            // same key may have committed since the key was read: read it again.
            Err(rejection) => {
                if account_id.is_none()
                    && let Some(replay) = stored_outcome(&tx, cmd, fp).await?
                {
                    return Ok((replay, Vec::new()));
                }
                return Ok((Err(rejection), Vec::new()));
            }
        };
        let mut t = transition;
        let id = match (account_id, cmd) {
            (Some(id), _) => id,
            (None, Command::CreateAccount(c)) => {
                let row = tx
                    .query_one(
                        "INSERT INTO accounts (external_id, kind, monthly, rollover, purchased, held, created_at, updated_at)
                         VALUES ($1, $2, 0, 0, 0, 0, $3, $3) RETURNING id",
                        &[&c.account.as_str(), &c.kind.as_str(), &now],
                    )
                    .await?;
                row.get(0)
            }
            (None, _) => return Err(TxError::Fail(Error::Invariant("transition without an account".into()))),
        };
        let mut new_hold = None;
        if let Some(h) = &t.new_hold {
            let row = tx
                .query_one(
                    "INSERT INTO holds (account_id, amount, cost_micros, deadline, status, reference, created_at) VALUES ($1, $2, $3, $4, 'open', $5, $6) RETURNING id",
                    &[&id, &h.amount, &h.cost_micros, &h.deadline, &h.reference, &now],
                )
                .await?;
            let hold_id = HoldId(row.get(0));
            t.effect.set_hold(hold_id);
            new_hold = Some(hold_id);
        }
        for (hold_id, status) in &t.closed_holds {
            let n = tx.execute("UPDATE holds SET status = $2, closed_at = $3 WHERE id = $1 AND status = 'open'", &[&hold_id.0, &status.as_str(), &now]).await?;
            if n != 1 {
                return Err(TxError::Fail(Error::Invariant(format!("hold {hold_id:?} was not open"))));
            }
        }
        let mut main_entry = None;
        let ins = tx
            .prepare_cached(
                "INSERT INTO ledger_entries (account_id, at, kind, d_monthly, d_rollover, d_purchased, d_held, balance_after, held_after, source, hold_id, ref_entry, reference, rollover_expires_at,
                     operation, model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_micros)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21) RETURNING id",
            )
            .await?;
        if t.usage.is_some() && !t.entries.iter().any(|e| e.main) {
            return Err(TxError::Fail(Error::Invariant("usage without a charge entry".into())));
        }
        for e in &t.entries {
            let hold = e.hold.map(|h| if h == NEW_HOLD { new_hold.unwrap_or(h) } else { h });
            // A charge's usage is its main entry's (migration V10).
            let u = UsageColumns::of(if e.main { t.usage.as_ref() } else { None });
            let row = tx
                .query_one(
                    &ins,
                    &[
                        &id,
                        &now,
                        &e.kind.as_str(),
                        &e.delta.monthly,
                        &e.delta.rollover,
                        &e.delta.purchased,
                        &e.held_delta,
                        &e.balance_after,
                        &e.held_after,
                        &e.source.map(GrantSource::as_str),
                        &hold.map(|h| h.0),
                        &e.ref_entry.map(|r| r.0),
                        &e.reference,
                        &e.rollover_expires_at,
                        &u.operation,
                        &u.model,
                        &u.tokens[0],
                        &u.tokens[1],
                        &u.tokens[2],
                        &u.tokens[3],
                        &u.cost_micros,
                    ],
                )
                .await?;
            if e.main {
                main_entry = Some((EntryId(row.get(0)), e.delta, hold));
            }
        }
        if let Some((entry, _, _)) = main_entry {
            t.effect.set_entry(entry);
        }
        let mut alerts = Vec::new();
        for a in &t.alerts {
            let n = tx
                .execute(
                    "INSERT INTO cost_alerts (account_id, kind, month, cost_micros, limit_micros, at) VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (account_id, kind, month) DO NOTHING",
                    &[&id, &alert_kind_str(a.kind), &a.month, &a.cost_micros, &a.limit_micros, &a.at],
                )
                .await?;
            if n == 1 {
                let account = match (&ext, cmd) {
                    (Some(e), _) => e.clone(),
                    (None, _) => return Err(TxError::Fail(Error::Invariant("alert without an account".into()))),
                };
                alerts.push((account, a.clone()));
            }
        }
        write_account(&tx, id, &t.state, now).await?;
        remember(&tx, cmd, &t.effect, fp, now).await?;
        tx.commit().await?;
        Ok((Ok(Committed { effect: t.effect, replayed: false }), alerts))
    }
}

/// The first result of a keyed command, if its key was used: a replay, or a conflict if the key
/// was used for a different command.
async fn stored_outcome(tx: &impl GenericClient, cmd: &Command, fp: i64) -> Result<Option<Outcome>, TxError> {
    let Some(key) = cmd.key() else { return Ok(None) };
    let Some(row) = tx.query_opt("SELECT fingerprint, outcome FROM idempotency WHERE key = $1", &[&key.as_str()]).await? else {
        return Ok(None);
    };
    let stored: i64 = row.get(0);
    if stored != fp {
        return Err(TxError::Fail(Error::IdempotencyConflict { key: key.to_string() }));
    }
    let effect = outcome::from_bytes(row.get(1))?;
    Ok(Some(Ok(Committed { effect, replayed: true })))
}

async fn remember(tx: &impl GenericClient, cmd: &Command, effect: &Effect, fp: i64, now: DateTime<Utc>) -> Result<(), TxError> {
    if let Some(key) = cmd.key() {
        let stored = outcome::to_bytes(effect);
        tx.execute("INSERT INTO idempotency (key, fingerprint, outcome, at) VALUES ($1, $2, $3, $4)", &[&key.as_str(), &fp, &stored, &now]).await?;
    }
    Ok(())
}

async fn write_tier(tx: &impl GenericClient, l: &TierLimits) -> Result<(), TxError> {
    tx.execute(
        "INSERT INTO cost_tiers (name, monthly_revenue_micros, monthly_cost_limit_micros, daily_cost_limit_micros, hourly_request_limit, alert_threshold_pct, throttle_on_exceed)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (name) DO UPDATE SET monthly_revenue_micros = excluded.monthly_revenue_micros,
            monthly_cost_limit_micros = excluded.monthly_cost_limit_micros, daily_cost_limit_micros = excluded.daily_cost_limit_micros,
            hourly_request_limit = excluded.hourly_request_limit, alert_threshold_pct = excluded.alert_threshold_pct,
            throttle_on_exceed = excluded.throttle_on_exceed",
        &[
            &l.name,
            &l.monthly_revenue_micros,
            &l.monthly_cost_limit_micros,
            &l.daily_cost_limit_micros,
            &l.hourly_request_limit.map(|v| v as i32),
            &l.alert_threshold_pct.map(|v| v as i32),
            &l.throttle_on_exceed,
        ],
    )
    .await?;
    Ok(())
}

const ACCOUNT_COLUMNS: &str = "id, external_id, kind, monthly, purchased, held, rollover_lots, plan_credits, plan_active, period_end, plan_anchor_day,
    org_member, tier_override, cost_day, day_cost_micros, cost_month, month_cost_micros, held_cost_micros, throttle, requests, alerted";

fn lots_value(lots: &[Lot]) -> serde_json::Value {
    serde_json::Value::Array(lots.iter().map(|l| serde_json::json!([l.amount, l.expires_at.timestamp_millis()])).collect())
}

fn parse_lots(v: serde_json::Value) -> Result<Vec<Lot>> {
    let pairs: Vec<(i64, i64)> = serde_json::from_value(v).map_err(|e| Error::Invariant(format!("rollover_lots: {e}")))?;
    pairs
        .into_iter()
        .map(|(amount, ms)| {
            let expires_at = DateTime::from_timestamp_millis(ms).ok_or_else(|| Error::Invariant(format!("rollover lot expiry {ms}")))?;
            Ok(Lot { amount, expires_at })
        })
        .collect()
}

fn account_from_row(r: &Row) -> Result<(i64, AccountId, AccountState)> {
    let plan = match (r.get::<_, Option<i64>>("plan_credits"), r.get::<_, Option<bool>>("plan_active"), r.get::<_, Option<DateTime<Utc>>>("period_end")) {
        (Some(c), Some(a), Some(p)) => {
            let anchor_day = r.get::<_, Option<i32>>("plan_anchor_day").map_or_else(|| chrono::Datelike::day(&p), |d| d as u32);
            Some(PlanState { monthly_credits: c, active: a, period_end: p, anchor_day })
        }
        _ => None,
    };
    let throttle =
        r.get::<_, Option<serde_json::Value>>("throttle").map(serde_json::from_value).transpose().map_err(|e| Error::Invariant(format!("throttle: {e}")))?;
    let cost = CostState {
        day: r.get("cost_day"),
        day_cost_micros: r.get("day_cost_micros"),
        month: r.get("cost_month"),
        month_cost_micros: r.get("month_cost_micros"),
        held_cost_micros: r.get("held_cost_micros"),
        throttle,
        requests_ms: r.get("requests"),
        alerted: decode_alerted(i64::from(r.get::<_, i32>("alerted"))),
    };
    let state = AccountState {
        kind: parse_kind(r.get("kind"))?,
        monthly: r.get("monthly"),
        purchased: r.get("purchased"),
        rollover: parse_lots(r.get("rollover_lots"))?,
        held: r.get("held"),
        plan,
        cost,
        org_member: r.get("org_member"),
        tier: r.get("tier_override"),
    };
    Ok((r.get("id"), AccountId::new(r.get::<_, String>("external_id"))?, state))
}

/// Writes one account's state (`$24`, its kind, is checked: never another account's row).
const UPDATE_ACCOUNT_SQL: &str = "UPDATE accounts SET monthly = $2, rollover = $3, purchased = $4, held = $5, rollover_lots = $6, updated_at = $7,
    cost_day = $8, day_cost_micros = $9, cost_month = $10, month_cost_micros = $11, held_cost_micros = $12, throttle = $13,
    throttle_lifts = $14, requests = $15, alerted = $16, org_member = $17, tier_override = $18, next_expiry = $19,
    plan_credits = $20, plan_active = $21, period_end = $22, plan_anchor_day = $23
 WHERE id = $1 AND kind = $24";

/// [`UPDATE_ACCOUNT_SQL`] for a write that changed only the columns a spend changes (see
/// [`hot_columns_only`]): the buckets but rollover, what is held, the cost counters. The row is
/// still written whole (a new version, on its page), but the statement neither decodes nor
/// rewrites the rest: the rollover lots, the throttle and the request window (JSON), the plan,
/// the tier.
const UPDATE_ACCOUNT_HOT_SQL: &str = "UPDATE accounts SET monthly = $2, purchased = $3, held = $4, updated_at = $5,
    cost_day = $6, day_cost_micros = $7, cost_month = $8, month_cost_micros = $9, held_cost_micros = $10
 WHERE id = $1 AND kind = $11";

/// Whether `after` differs from `before` only in the columns [`UPDATE_ACCOUNT_HOT_SQL`] writes.
/// (Every field is named, so a field added to the state must be placed on one side or the
/// other here.)
fn hot_columns_only(before: &AccountState, after: &AccountState) -> bool {
    let AccountState { kind, monthly: _, purchased: _, rollover, held: _, plan, cost, org_member, tier } = before;
    let crate::cost::CostState { day: _, day_cost_micros: _, month: _, month_cost_micros: _, held_cost_micros: _, throttle, requests_ms, alerted } = cost;
    *kind == after.kind
        && *rollover == after.rollover
        && *plan == after.plan
        && *org_member == after.org_member
        && *tier == after.tier
        && *throttle == after.cost.throttle
        && *requests_ms == after.cost.requests_ms
        && *alerted == after.cost.alerted
}

async fn write_account(tx: &impl GenericClient, id: i64, s: &AccountState, now: DateTime<Utc>) -> Result<(), TxError> {
    let st = tx.prepare_cached(UPDATE_ACCOUNT_SQL).await?;
    let n = tx.execute(&st, &AccountRow::new(id, s, now, true).params()).await?;
    if n != 1 {
        return Err(TxError::Fail(Error::Invariant(format!("account {id} not found to update"))));
    }
    Ok(())
}

/// The parameters of [`UPDATE_ACCOUNT_SQL`] for one account.
struct AccountRow<'a> {
    id: i64,
    s: &'a AccountState,
    wide: bool,
    rollover: i64,
    lots: serde_json::Value,
    now: DateTime<Utc>,
    throttle: Option<serde_json::Value>,
    lifts: Option<DateTime<Utc>>,
    alerted: i32,
    next_expiry: Option<DateTime<Utc>>,
    kind: &'static str,
    plan: (Option<i64>, Option<bool>, Option<DateTime<Utc>>, Option<i32>),
}

impl<'a> AccountRow<'a> {
    /// `wide`: the row is for [`AccountRow::params`] or [`AccountColumns`]; otherwise only for
    /// [`AccountRow::hot_params`] or [`HotColumns`], and its JSON columns are not made.
    fn new(id: i64, s: &'a AccountState, now: DateTime<Utc>, wide: bool) -> Self {
        let c = &s.cost;
        AccountRow {
            id,
            s,
            wide,
            rollover: s.rollover_total(),
            lots: if wide { lots_value(&s.rollover) } else { serde_json::Value::Null },
            now,
            throttle: c.throttle.as_ref().filter(|_| wide).map(|t| serde_json::to_value(t).expect("throttles serialize")),
            lifts: c.throttle.as_ref().and_then(crate::cost::Throttle::lifts_at),
            alerted: encode_alerted(&c.alerted) as i32,
            next_expiry: s.next_expiry().map(|l| l.expires_at),
            kind: s.kind.as_str(),
            plan: match s.plan {
                Some(p) => (Some(p.monthly_credits), Some(p.active), Some(p.period_end), Some(p.anchor_day as i32)),
                None => (None, None, None, None),
            },
        }
    }

    /// The parameters of [`UPDATE_ACCOUNT_HOT_SQL`].
    fn hot_params(&self) -> [&(dyn ToSql + Sync); 11] {
        let (s, c) = (self.s, &self.s.cost);
        [&self.id, &s.monthly, &s.purchased, &s.held, &self.now, &c.day, &c.day_cost_micros, &c.month, &c.month_cost_micros, &c.held_cost_micros, &self.kind]
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 24] {
        assert!(self.wide, "a row made for the hot columns only");
        let (s, c) = (self.s, &self.s.cost);
        [
            &self.id,
            &s.monthly,
            &self.rollover,
            &s.purchased,
            &s.held,
            &self.lots,
            &self.now,
            &c.day,
            &c.day_cost_micros,
            &c.month,
            &c.month_cost_micros,
            &c.held_cost_micros,
            &self.throttle,
            &self.lifts,
            &c.requests_ms,
            &self.alerted,
            &s.org_member,
            &s.tier,
            &self.next_expiry,
            &self.plan.0,
            &self.plan.1,
            &self.plan.2,
            &self.plan.3,
            &self.kind,
        ]
    }
}

/// [`UPDATE_ACCOUNT_SQL`] for several accounts, their rows unpacked from the arrays of
/// [`AccountColumns::params`] (`u.n` is a row's place in them), one after the other in id order
/// (a batch's transaction begins with joins as nested loops: see [`PLAN_SQL`]), so that
/// batches, on any node, lock accounts in the same order.
const UPDATE_ACCOUNTS_SQL: &str = "UPDATE accounts SET monthly = u.m, rollover = u.r, purchased = u.p, held = u.h, rollover_lots = u.lots, updated_at = $23,
    cost_day = u.cday, day_cost_micros = u.dc, cost_month = u.cmonth, month_cost_micros = u.mc, held_cost_micros = u.hc,
    throttle = u.throttle, throttle_lifts = u.lifts, requests = ARRAY(SELECT jsonb_array_elements_text(u.requests)::bigint),
    alerted = u.alerted, org_member = u.org, tier_override = u.tier, next_expiry = u.next, plan_credits = u.pc, plan_active = u.pa,
    period_end = u.pe, plan_anchor_day = u.anchor
    FROM (SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::jsonb[], $7::date[], $8::bigint[], $9::date[],
    $10::bigint[], $11::bigint[], $12::jsonb[], $13::timestamptz[], $14::jsonb[], $15::int[], $16::bool[], $17::text[],
    $18::timestamptz[], $19::bigint[], $20::bool[], $21::timestamptz[], $22::int[]) WITH ORDINALITY
    AS u(id, m, r, p, h, lots, cday, dc, cmonth, mc, hc, throttle, lifts, requests, alerted, org, tier, next, pc, pa, pe, anchor, n) ORDER BY id) AS u
    WHERE accounts.id = u.id";

/// [`UPDATE_ACCOUNTS_SQL`] when every account's write changed only the columns
/// [`UPDATE_ACCOUNT_HOT_SQL`] writes: nine arrays to unpack, not twenty-two, and no JSON.
const UPDATE_ACCOUNTS_HOT_SQL: &str = "UPDATE accounts SET monthly = u.m, purchased = u.p, held = u.h, updated_at = $10,
    cost_day = u.cday, day_cost_micros = u.dc, cost_month = u.cmonth, month_cost_micros = u.mc, held_cost_micros = u.hc
    FROM (SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::date[], $6::bigint[], $7::date[], $8::bigint[], $9::bigint[])
    WITH ORDINALITY AS u(id, m, p, h, cday, dc, cmonth, mc, hc, n) ORDER BY id) AS u
    WHERE accounts.id = u.id";

/// Several accounts' hot columns, column by column (for [`UPDATE_ACCOUNTS_HOT_SQL`]).
struct HotColumns {
    ints: [Vec<i64>; 7],
    day: Vec<Option<NaiveDate>>,
    month: Vec<Option<NaiveDate>>,
}

impl HotColumns {
    fn new(rows: &[AccountRow]) -> Self {
        let col = |f: &dyn Fn(&AccountRow) -> i64| -> Vec<i64> { rows.iter().map(f).collect() };
        HotColumns {
            ints: [
                col(&|r| r.id),
                col(&|r| r.s.monthly),
                col(&|r| r.s.purchased),
                col(&|r| r.s.held),
                col(&|r| r.s.cost.day_cost_micros),
                col(&|r| r.s.cost.month_cost_micros),
                col(&|r| r.s.cost.held_cost_micros),
            ],
            day: rows.iter().map(|r| r.s.cost.day).collect(),
            month: rows.iter().map(|r| r.s.cost.month).collect(),
        }
    }

    fn params<'a>(&'a self, now: &'a DateTime<Utc>) -> Vec<&'a (dyn ToSql + Sync)> {
        let [ids, monthly, purchased, held, day_cost, month_cost, held_cost] = &self.ints;
        vec![ids, monthly, purchased, held, &self.day, day_cost, &self.month, month_cost, held_cost, now]
    }
}

/// Several accounts' rows for one statement: all their columns, or only the hot ones.
enum Columns<'r> {
    All(AccountColumns<'r>),
    Hot(HotColumns),
}

impl<'r> Columns<'r> {
    /// The update and its parameters.
    fn statement<'a>(&'a self, now: &'a DateTime<Utc>) -> (&'static str, Vec<&'a (dyn ToSql + Sync)>) {
        match self {
            Columns::All(c) => (UPDATE_ACCOUNTS_SQL, c.params(now)),
            Columns::Hot(c) => (UPDATE_ACCOUNTS_HOT_SQL, c.params(now)),
        }
    }
}

/// Several accounts' rows, column by column (for [`UPDATE_ACCOUNTS_SQL`]).
struct AccountColumns<'r> {
    ints: [Vec<i64>; 8],
    lots: Vec<&'r serde_json::Value>,
    day: Vec<Option<NaiveDate>>,
    month: Vec<Option<NaiveDate>>,
    throttle: Vec<&'r Option<serde_json::Value>>,
    lifts: Vec<Option<DateTime<Utc>>>,
    // Arrays of arrays do not unnest row by row: each request window goes as JSON.
    requests: Vec<serde_json::Value>,
    alerted: Vec<i32>,
    org: Vec<bool>,
    tier: Vec<Option<&'r str>>,
    next: Vec<Option<DateTime<Utc>>>,
    plan_credits: Vec<Option<i64>>,
    plan_active: Vec<Option<bool>>,
    period_end: Vec<Option<DateTime<Utc>>>,
    anchor: Vec<Option<i32>>,
}

impl<'r> AccountColumns<'r> {
    fn new(rows: &'r [AccountRow<'r>]) -> Self {
        assert!(rows.iter().all(|r| r.wide), "rows made for the hot columns only");
        let col = |f: &dyn Fn(&AccountRow) -> i64| -> Vec<i64> { rows.iter().map(f).collect() };
        AccountColumns {
            ints: [
                col(&|r| r.id),
                col(&|r| r.s.monthly),
                col(&|r| r.rollover),
                col(&|r| r.s.purchased),
                col(&|r| r.s.held),
                col(&|r| r.s.cost.day_cost_micros),
                col(&|r| r.s.cost.month_cost_micros),
                col(&|r| r.s.cost.held_cost_micros),
            ],
            lots: rows.iter().map(|r| &r.lots).collect(),
            day: rows.iter().map(|r| r.s.cost.day).collect(),
            month: rows.iter().map(|r| r.s.cost.month).collect(),
            throttle: rows.iter().map(|r| &r.throttle).collect(),
            lifts: rows.iter().map(|r| r.lifts).collect(),
            requests: rows.iter().map(|r| serde_json::json!(r.s.cost.requests_ms)).collect(),
            alerted: rows.iter().map(|r| r.alerted).collect(),
            org: rows.iter().map(|r| r.s.org_member).collect(),
            tier: rows.iter().map(|r| r.s.tier.as_deref()).collect(),
            next: rows.iter().map(|r| r.next_expiry).collect(),
            plan_credits: rows.iter().map(|r| r.plan.0).collect(),
            plan_active: rows.iter().map(|r| r.plan.1).collect(),
            period_end: rows.iter().map(|r| r.plan.2).collect(),
            anchor: rows.iter().map(|r| r.plan.3).collect(),
        }
    }

    fn params<'a>(&'a self, now: &'a DateTime<Utc>) -> Vec<&'a (dyn ToSql + Sync)> {
        let [ids, monthly, rollover, purchased, held, day_cost, month_cost, held_cost] = &self.ints;
        vec![
            ids,
            monthly,
            rollover,
            purchased,
            held,
            &self.lots,
            &self.day,
            day_cost,
            &self.month,
            month_cost,
            held_cost,
            &self.throttle,
            &self.lifts,
            &self.requests,
            &self.alerted,
            &self.org,
            &self.tier,
            &self.next,
            &self.plan_credits,
            &self.plan_active,
            &self.period_end,
            &self.anchor,
            now,
        ]
    }
}

async fn load_open_holds(tx: &impl GenericClient, account_id: i64) -> Result<Vec<OpenHold>, TxError> {
    let rows = tx.query("SELECT id, amount, deadline, cost_micros FROM holds WHERE account_id = $1 AND status = 'open' ORDER BY id", &[&account_id]).await?;
    Ok(rows.iter().map(|r| OpenHold { id: HoldId(r.get(0)), amount: r.get(1), deadline: r.get(2), cost_micros: r.get(3) }).collect())
}

async fn load_charge(tx: &impl GenericClient, account_id: i64, entry: EntryId) -> Result<Option<ChargeRecord>, TxError> {
    let Some(r) = tx
        .query_opt(
            "SELECT kind, d_monthly, d_rollover, d_purchased, rollover_expires_at FROM ledger_entries WHERE id = $1 AND account_id = $2",
            &[&entry.0, &account_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let refunded = tx
        .query_one(
            "SELECT COALESCE(SUM(d_monthly), 0)::bigint, COALESCE(SUM(d_rollover), 0)::bigint, COALESCE(SUM(d_purchased), 0)::bigint
             FROM ledger_entries WHERE ref_entry = $1 AND kind = 'refund'",
            &[&entry.0],
        )
        .await?;
    Ok(Some(ChargeRecord {
        id: entry,
        kind: EntryKind::parse(r.get(0))?,
        charged: BucketAmounts { monthly: -r.get::<_, i64>(1), rollover: -r.get::<_, i64>(2), purchased: -r.get::<_, i64>(3) },
        rollover_expires_at: r.get(4),
        refunded: BucketAmounts { monthly: refunded.get(0), rollover: refunded.get(1), purchased: refunded.get(2) },
    }))
}

/// A log entry's usage columns: all set (a charge with usage), or all NULL.
struct UsageColumns<'a> {
    operation: Option<&'a str>,
    model: Option<&'a str>,
    tokens: [Option<i64>; 4],
    cost_micros: Option<i64>,
}

impl<'a> UsageColumns<'a> {
    fn of(u: Option<&'a Usage>) -> Self {
        UsageColumns {
            operation: u.map(|u| u.operation.as_str()),
            model: u.map(|u| u.model.as_str()),
            tokens: [
                u.map(|u| u.tokens.input as i64),
                u.map(|u| u.tokens.output as i64),
                u.map(|u| u.tokens.cache_read as i64),
                u.map(|u| u.tokens.cache_write as i64),
            ],
            cost_micros: u.map(|u| u.cost_micros),
        }
    }
}

/// An account's usage records (`$1`, its internal id), newest first, below the entry `$3`, at
/// most `$2`: its log walked newest first by `ledger_entries_by_account`, the entries with usage
/// (the `usage_records` view of migration V10: a charge's usage is columns of its entry).
pub const USAGE_PAGE_SQL: &str =
    "SELECT at, entry_id, hold_id, operation, model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, credits, cost_micros
    FROM usage_records WHERE account_id = $1 AND entry_id < $3 ORDER BY entry_id DESC LIMIT $2";

/// Allocates `$1` hold ids and `$2` entry ids, each list ascending.
const IDS_SQL: &str =
    "SELECT (SELECT COALESCE(array_agg(n ORDER BY n), '{}') FROM (SELECT nextval('holds_id_seq') AS n FROM generate_series(1, $1::bigint)) h),
    (SELECT COALESCE(array_agg(n ORDER BY n), '{}') FROM (SELECT nextval('ledger_entries_id_seq') AS n FROM generate_series(1, $2::bigint)) e)";

const TIERS_SQL: &str = "SELECT name, monthly_revenue_micros, monthly_cost_limit_micros, daily_cost_limit_micros, hourly_request_limit, alert_threshold_pct,
    throttle_on_exceed, xmin::text::bigint FROM cost_tiers ORDER BY name";

async fn load_tiers(c: &impl GenericClient) -> Result<TierTable, TxError> {
    let rows = c.query(TIERS_SQL, &[]).await?;
    Ok(tiers_from_rows(&rows)?)
}

fn tiers_from_rows(rows: &[Row]) -> Result<TierTable> {
    let tiers = rows.iter().map(|r| TierLimits {
        name: r.get(0),
        monthly_revenue_micros: r.get(1),
        monthly_cost_limit_micros: r.get(2),
        daily_cost_limit_micros: r.get(3),
        hourly_request_limit: r.get::<_, Option<i32>>(4).map(|v| v as u32),
        alert_threshold_pct: r.get::<_, Option<i32>>(5).map(|v| v as u32),
        throttle_on_exceed: r.get(6),
    });
    TierTable::from_tiers(tiers).map_err(|e| Error::Invariant(format!("cost_tiers: {e}")))
}

fn tx_err(e: TxError) -> Error {
    match e {
        TxError::Retry(e) | TxError::Fail(e) => e,
    }
}

fn entry_from_row(r: &Row, account: &AccountId) -> Result<Entry> {
    Ok(Entry {
        id: EntryId(r.get("id")),
        account: account.clone(),
        at: r.get("at"),
        kind: EntryKind::parse(r.get("kind"))?,
        delta: BucketAmounts { monthly: r.get("d_monthly"), rollover: r.get("d_rollover"), purchased: r.get("d_purchased") },
        held_delta: r.get("d_held"),
        balance_after: r.get("balance_after"),
        held_after: r.get("held_after"),
        source: r.get::<_, Option<&str>>("source").map(parse_source).transpose()?,
        hold: r.get::<_, Option<i64>>("hold_id").map(HoldId),
        ref_entry: r.get::<_, Option<i64>>("ref_entry").map(EntryId),
        reference: r.get("reference"),
        rollover_expires_at: r.get("rollover_expires_at"),
    })
}

const COST_COLUMNS: &str = "external_id, kind, plan_credits IS NOT NULL AS plan, org_member, tier_override, cost_day, day_cost_micros, cost_month,
    month_cost_micros, held_cost_micros, throttle, requests";

fn cost_view_from_row(r: &Row, tiers: &TierTable, now: DateTime<Utc>) -> Result<CostView> {
    let cost = CostState {
        day: r.get("cost_day"),
        day_cost_micros: r.get("day_cost_micros"),
        month: r.get("cost_month"),
        month_cost_micros: r.get("month_cost_micros"),
        held_cost_micros: r.get("held_cost_micros"),
        throttle: r
            .get::<_, Option<serde_json::Value>>("throttle")
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| Error::Invariant(format!("throttle: {e}")))?,
        requests_ms: r.get("requests"),
        alerted: Vec::new(),
    };
    CostView::build(
        AccountId::new(r.get::<_, String>("external_id"))?,
        parse_kind(r.get("kind"))?,
        r.get("plan"),
        r.get("org_member"),
        r.get::<_, Option<&str>>("tier_override"),
        &cost,
        tiers,
        now,
    )
}

/// Reads, each retried (up to three times) when its connection turns out to be lost.
impl PgStore {
    async fn balance_once(&self, account: &AccountId) -> Result<BalanceView> {
        let mut client = self.core.client().await?;
        let tx = client.build_transaction().read_only(true).isolation_level(tokio_postgres::IsolationLevel::RepeatableRead).start().await?;
        let row = tx
            .query_opt(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE external_id = $1"), &[&account.as_str()])
            .await?
            .ok_or_else(|| Error::UnknownAccount(account.to_string()))?;
        let (id, _, state) = account_from_row(&row)?;
        let holds = load_open_holds(&tx, id).await.map_err(tx_err)?;
        tx.commit().await?;
        let (state, holds) = rules::view_at(&state, &holds, to_millis(self.core.clock.now()));
        Ok(BalanceView::from_state(account.clone(), &state, holds.len() as u32))
    }

    async fn history_once(&self, q: &HistoryQuery) -> Result<HistoryPage> {
        q.validate()?;
        let client = self.core.client().await?;
        let id: i64 = client
            .query_opt("SELECT id FROM accounts WHERE external_id = $1", &[&q.account.as_str()])
            .await?
            .map(|r| r.get(0))
            .ok_or_else(|| Error::UnknownAccount(q.account.to_string()))?;
        let kinds: Vec<&str> = q.kinds.iter().map(|k| k.as_str()).collect();
        let all_kinds = kinds.is_empty();
        let before = q.before.map_or(i64::MAX, |b| b.0);
        let limit = i64::from(q.limit) + 1;
        let rows = client
            .query(
                "SELECT * FROM ledger_entries WHERE account_id = $1 AND id < $2 AND ($3::timestamptz IS NULL OR at >= $3)
                   AND ($4::timestamptz IS NULL OR at < $4) AND ($5 OR kind = ANY($6)) ORDER BY id DESC LIMIT $7",
                &[&id, &before, &q.from, &q.until, &all_kinds, &kinds, &limit],
            )
            .await?;
        let mut entries = rows.iter().map(|r| entry_from_row(r, &q.account)).collect::<Result<Vec<_>>>()?;
        let next = if entries.len() > q.limit as usize {
            entries.truncate(q.limit as usize);
            entries.last().map(|e| e.id)
        } else {
            None
        };
        Ok(HistoryPage { entries, next })
    }

    async fn usage_once(&self, account: &AccountId, before: Option<EntryId>, limit: u32) -> Result<Vec<UsageRow>> {
        check_page(limit, MAX_PAGE)?;
        let client = self.core.client().await?;
        let id: i64 = client
            .query_opt("SELECT id FROM accounts WHERE external_id = $1", &[&account.as_str()])
            .await?
            .map(|r| r.get(0))
            .ok_or_else(|| Error::UnknownAccount(account.to_string()))?;
        let rows = client.query(USAGE_PAGE_SQL, &[&id, &i64::from(limit), &before.map_or(i64::MAX, |e| e.0)]).await?;
        Ok(rows
            .iter()
            .map(|r| UsageRow {
                account: account.clone(),
                at: r.get(0),
                entry: EntryId(r.get(1)),
                hold: r.get::<_, Option<i64>>(2).map(HoldId),
                usage: Usage {
                    operation: r.get(3),
                    model: r.get(4),
                    tokens: TokenUsage {
                        input: r.get::<_, i64>(5) as u64,
                        output: r.get::<_, i64>(6) as u64,
                        cache_read: r.get::<_, i64>(7) as u64,
                        cache_write: r.get::<_, i64>(8) as u64,
                    },
                    cost_micros: r.get(10),
                },
                credits: r.get(9),
            })
            .collect())
    }

    async fn due_once(&self, due: Due, after: Option<&AccountId>, limit: u32) -> Result<Vec<AccountId>> {
        check_page(limit, MAX_PAGE)?;
        let now = to_millis(self.core.clock.now());
        let today = now.date_naive();
        let month = crate::cost::month_start(today);
        let after = after.map_or("", |a| a.as_str());
        let limit = i64::from(limit);
        let client = self.core.client().await?;
        let rows = match due {
            Due::Rollover => {
                client
                    .query(
                        "SELECT external_id FROM accounts WHERE period_end <= $1 AND external_id > $2 ORDER BY external_id LIMIT $3",
                        &[&now, &after, &limit],
                    )
                    .await?
            }
            Due::ExpiredCredits => {
                client
                    .query(
                        "SELECT external_id FROM accounts WHERE next_expiry <= $1 AND external_id > $2 ORDER BY external_id LIMIT $3",
                        &[&now, &after, &limit],
                    )
                    .await?
            }
            Due::ExpiredHolds => {
                client
                    .query(
                        "SELECT a.external_id FROM accounts a WHERE a.external_id > $2
                           AND EXISTS (SELECT 1 FROM holds h WHERE h.account_id = a.id AND h.status = 'open' AND h.deadline <= $1)
                         ORDER BY a.external_id LIMIT $3",
                        &[&now, &after, &limit],
                    )
                    .await?
            }
            Due::CostReset => {
                client
                    .query(
                        "SELECT external_id FROM accounts WHERE external_id > $2
                           AND (cost_month < $4 OR (cost_day < $5 AND day_cost_micros > 0) OR throttle_lifts <= $1)
                         ORDER BY external_id LIMIT $3",
                        &[&now, &after, &limit, &month, &today],
                    )
                    .await?
            }
        };
        rows.iter().map(|r| AccountId::new(r.get::<_, String>(0))).collect()
    }

    async fn verify_once(&self) -> Result<VerifyReport> {
        let mut client = self.core.client().await?;
        let tx = client.build_transaction().read_only(true).isolation_level(tokio_postgres::IsolationLevel::RepeatableRead).start().await?;
        let mut report = VerifyReport::default();
        let totals = tx.query_one("SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM ledger_entries)", &[]).await?;
        report.accounts = totals.get::<_, i64>(0) as u64;
        report.entries = totals.get::<_, i64>(1) as u64;
        // Every stored figure against what the log (and the open holds) say, and each entry's
        // balance_after / held_after against the running sums.
        let rows = tx
            .query(
                "WITH l AS (SELECT account_id, SUM(d_monthly) AS m, SUM(d_rollover) AS r, SUM(d_purchased) AS p, SUM(d_held) AS h
                            FROM ledger_entries GROUP BY account_id),
                      o AS (SELECT account_id, SUM(amount) AS held, SUM(cost_micros) AS cost FROM holds WHERE status = 'open' GROUP BY account_id),
                      lots AS (SELECT a.id, COALESCE((SELECT SUM((x->>0)::bigint) FROM jsonb_array_elements(a.rollover_lots) x), 0) AS s FROM accounts a),
                      d AS (
                        SELECT a.external_id, 'monthly' AS what, a.monthly AS stored, COALESCE(l.m, 0) AS logged FROM accounts a LEFT JOIN l ON l.account_id = a.id
                        UNION ALL SELECT a.external_id, 'rollover', a.rollover, COALESCE(l.r, 0) FROM accounts a LEFT JOIN l ON l.account_id = a.id
                        UNION ALL SELECT a.external_id, 'purchased', a.purchased, COALESCE(l.p, 0) FROM accounts a LEFT JOIN l ON l.account_id = a.id
                        UNION ALL SELECT a.external_id, 'held', a.held, COALESCE(l.h, 0) FROM accounts a LEFT JOIN l ON l.account_id = a.id
                        UNION ALL SELECT a.external_id, 'open holds', a.held, COALESCE(o.held, 0) FROM accounts a LEFT JOIN o ON o.account_id = a.id
                        UNION ALL SELECT a.external_id, 'held cost (micro-USD) of open holds', a.held_cost_micros, COALESCE(o.cost, 0)
                                  FROM accounts a LEFT JOIN o ON o.account_id = a.id
                        UNION ALL SELECT a.external_id, 'rollover lots', a.rollover, lots.s FROM accounts a JOIN lots ON lots.id = a.id
                        UNION ALL SELECT a.external_id, 'entry balance_after', x.balance_after, x.bal FROM (
                            SELECT account_id, balance_after, held_after, SUM(d_monthly + d_rollover + d_purchased) OVER w AS bal, SUM(d_held) OVER w AS hld
                            FROM ledger_entries WINDOW w AS (PARTITION BY account_id ORDER BY id ROWS UNBOUNDED PRECEDING)) x
                            JOIN accounts a ON a.id = x.account_id WHERE x.balance_after != x.bal
                        UNION ALL SELECT a.external_id, 'entry held_after', x.held_after, x.hld FROM (
                            SELECT account_id, held_after, SUM(d_held) OVER w AS hld
                            FROM ledger_entries WINDOW w AS (PARTITION BY account_id ORDER BY id ROWS UNBOUNDED PRECEDING)) x
                            JOIN accounts a ON a.id = x.account_id WHERE x.held_after != x.hld
                      )
                 SELECT external_id, what, stored::bigint, logged::bigint FROM d WHERE stored != logged ORDER BY external_id, what LIMIT $1",
                &[&MAX_DISCREPANCIES],
            )
            .await?;
        for r in rows {
            report.discrepancies.push(Discrepancy { account: AccountId::new(r.get::<_, String>(0))?, what: r.get(1), stored: r.get(2), from_log: r.get(3) });
        }
        // Rows that name no account (the hot tables carry no foreign keys; the code keeps them
        // right, and this checks it).
        let orphans = tx
            .query(
                "SELECT t, account_id, count(*) FROM (
                     SELECT 'log entries' AS t, account_id FROM ledger_entries
                     UNION ALL SELECT 'holds', account_id FROM holds UNION ALL SELECT 'alerts', account_id FROM cost_alerts) x
                 WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = x.account_id) GROUP BY t, account_id ORDER BY t, account_id LIMIT 1000",
                &[],
            )
            .await?;
        for r in orphans {
            let (what, id, n): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
            report.discrepancies.push(Discrepancy { account: AccountId::new(format!("(no account with internal id {id})"))?, what, stored: n, from_log: 0 });
        }
        tx.commit().await?;
        Ok(report)
    }

    async fn tiers_once(&self) -> Result<TierTable> {
        let client = self.core.client().await?;
        load_tiers(&client).await.map_err(tx_err)
    }

    async fn cost_once(&self, account: &AccountId) -> Result<CostView> {
        let client = self.core.client().await?;
        let tiers = load_tiers(&client).await.map_err(tx_err)?;
        let row = client
            .query_opt(&format!("SELECT {COST_COLUMNS} FROM accounts WHERE external_id = $1"), &[&account.as_str()])
            .await?
            .ok_or_else(|| Error::UnknownAccount(account.to_string()))?;
        cost_view_from_row(&row, &tiers, to_millis(self.core.clock.now()))
    }

    async fn cost_accounts_once(&self, filter: CostFilter, after: Option<&AccountId>, limit: u32) -> Result<Vec<CostView>> {
        check_page(limit, MAX_PAGE)?;
        let now = to_millis(self.core.clock.now());
        let mut client = self.core.client().await?;
        let tx = client.build_transaction().read_only(true).isolation_level(tokio_postgres::IsolationLevel::RepeatableRead).start().await?;
        let tiers = load_tiers(&tx).await.map_err(tx_err)?;
        let mut out = Vec::new();
        let mut after = after.map_or(String::new(), |a| a.to_string());
        // Pages of accounts in id order, until `limit` matched or none are left.
        loop {
            let rows = tx.query(&format!("SELECT {COST_COLUMNS} FROM accounts WHERE external_id > $1 ORDER BY external_id LIMIT 1000"), &[&after]).await?;
            let Some(last) = rows.last() else { break };
            after = last.get::<_, String>("external_id");
            for r in &rows {
                let v = cost_view_from_row(r, &tiers, now)?;
                if filter.matches(&v) {
                    out.push(v);
                    if out.len() == limit as usize {
                        return Ok(out);
                    }
                }
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn summary_once(&self) -> Result<crate::cost::Summary> {
        let now = to_millis(self.core.clock.now());
        let mut client = self.core.client().await?;
        let tx = client.build_transaction().read_only(true).isolation_level(tokio_postgres::IsolationLevel::RepeatableRead).start().await?;
        let tiers = load_tiers(&tx).await.map_err(tx_err)?;
        let rows = tx.query(&format!("SELECT {COST_COLUMNS} FROM accounts"), &[]).await?;
        let users = rows.iter().map(|r| cost_view_from_row(r, &tiers, now).map(|v| v.user_cost())).collect::<Result<Vec<_>>>()?;
        tx.commit().await?;
        crate::cost::summarize(&tiers, &users)
    }

    async fn alerts_once(&self, q: &AlertQuery) -> Result<Vec<StoredAlert>> {
        check_page(q.limit, MAX_PAGE)?;
        let client = self.core.client().await?;
        let rows = client
            .query(
                "SELECT c.id, a.external_id, c.kind, c.month, c.cost_micros, c.limit_micros, c.at
                 FROM cost_alerts c JOIN accounts a ON a.id = c.account_id
                 WHERE c.id > $1 AND ($2::text IS NULL OR a.external_id = $2) ORDER BY c.id LIMIT $3",
                &[&q.after.unwrap_or(0), &q.account.as_ref().map(|a| a.as_str()), &i64::from(q.limit)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredAlert {
                    id: r.get(0),
                    account: AccountId::new(r.get::<_, String>(1))?,
                    alert: Alert { kind: parse_alert_kind(r.get(2))?, month: r.get(3), cost_micros: r.get(4), limit_micros: r.get(5), at: r.get(6) },
                })
            })
            .collect()
    }

    async fn daily_usage_once(&self, q: &DailyUsageQuery) -> Result<Vec<DailyUsage>> {
        q.validate()?;
        let mut client = self.core.client().await?;
        let tx = client.build_transaction().read_only(true).isolation_level(tokio_postgres::IsolationLevel::RepeatableRead).start().await?;
        let account_id: Option<i64> = match &q.account {
            Some(a) => Some(
                tx.query_opt("SELECT id FROM accounts WHERE external_id = $1", &[&a.as_str()])
                    .await?
                    .map(|r| r.get(0))
                    .ok_or_else(|| Error::UnknownAccount(a.to_string()))?,
            ),
            None => None,
        };
        // The rollups plus the usage above the watermark, grouped alike.
        let rows = tx
            .query(
                "SELECT day, SUM(runs)::bigint, SUM(credits)::bigint, SUM(i)::bigint, SUM(o)::bigint, SUM(cr)::bigint, SUM(cw)::bigint, SUM(cost)::bigint FROM (
                     SELECT day, runs, credits, input_tokens AS i, output_tokens AS o, cache_read_tokens AS cr, cache_write_tokens AS cw, cost_micros AS cost
                     FROM usage_daily WHERE day >= $1 AND day < $2 AND ($3::bigint IS NULL OR account_id = $3)
                     UNION ALL
                     SELECT (at AT TIME ZONE 'UTC')::date, 1, credits, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_micros
                     FROM usage_records WHERE entry_id > (SELECT rolled_upto FROM usage_rollup WHERE id = 1)
                       AND at >= $4 AND at < $5 AND ($3::bigint IS NULL OR account_id = $3)
                 ) u GROUP BY day ORDER BY day",
                &[&q.from, &q.until, &account_id, &crate::cost::day_start(q.from), &crate::cost::day_start(q.until)],
            )
            .await?;
        tx.commit().await?;
        Ok(rows
            .iter()
            .map(|r| DailyUsage {
                day: r.get(0),
                runs: r.get::<_, i64>(1) as u64,
                credits: r.get(2),
                tokens: TokenUsage {
                    input: r.get::<_, i64>(3) as u64,
                    output: r.get::<_, i64>(4) as u64,
                    cache_read: r.get::<_, i64>(5) as u64,
                    cache_write: r.get::<_, i64>(6) as u64,
                },
                cost_micros: r.get(7),
            })
            .collect())
    }

    async fn refresh_analytics_once(&self) -> Result<AnalyticsReport> {
        let mut client = self.core.client().await?;
        let tx = client.transaction().await?;
        // Alone (see `USAGE_LOCK`): every transaction that took entry ids before this has
        // committed, and this statement's snapshot (taken after the lock) sees them all. Every
        // entry with usage up to the log's highest id is rolled up, and the watermark moves
        // there. A node running it at the same moment waits, then finds nothing new.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&USAGE_LOCK]).await?;
        let row = tx
            .query_one(
                "WITH top AS (SELECT COALESCE(max(id), 0) AS id FROM ledger_entries),
                 w AS (SELECT rolled_upto FROM usage_rollup WHERE id = 1 FOR UPDATE),
                 r AS (
                     SELECT account_id, (at AT TIME ZONE 'UTC')::date AS day, credits, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_micros
                     FROM usage_records WHERE entry_id > (SELECT rolled_upto FROM w) AND entry_id <= (SELECT id FROM top)
                 ), ins AS (
                     INSERT INTO usage_daily (account_id, day, runs, credits, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_micros)
                     SELECT account_id, day, count(*), SUM(credits), SUM(input_tokens), SUM(output_tokens), SUM(cache_read_tokens), SUM(cache_write_tokens), SUM(cost_micros)
                     FROM r GROUP BY account_id, day
                     ON CONFLICT (account_id, day) DO UPDATE SET runs = usage_daily.runs + excluded.runs, credits = usage_daily.credits + excluded.credits,
                        input_tokens = usage_daily.input_tokens + excluded.input_tokens, output_tokens = usage_daily.output_tokens + excluded.output_tokens,
                        cache_read_tokens = usage_daily.cache_read_tokens + excluded.cache_read_tokens,
                        cache_write_tokens = usage_daily.cache_write_tokens + excluded.cache_write_tokens,
                        cost_micros = usage_daily.cost_micros + excluded.cost_micros
                     RETURNING 1
                 ), moved AS (
                     UPDATE usage_rollup SET rolled_upto = GREATEST(rolled_upto, (SELECT id FROM top)) WHERE id = 1 RETURNING 1
                 )
                 SELECT (SELECT count(*) FROM r), (SELECT count(*) FROM moved)",
                &[],
            )
            .await?;
        if row.get::<_, i64>(1) != 1 {
            return Err(Error::Invariant("the usage roll-up's watermark is missing".into()));
        }
        tx.commit().await?;
        Ok(AnalyticsReport { usage_records: row.get::<_, i64>(0) as u64 })
    }
}

// ---------------------------------------------------------------------------------------------
// The playground: packages, sessions and their turns, runs

const SESSION_COLUMNS: &str = "id, owner, package_id, model, title, turn_count, share_token, created_at, updated_at";

/// Reads a row of [`SESSION_COLUMNS`]: the summary and the share token.
fn session_from_row(r: &Row) -> Result<(SessionSummary, Option<ShareToken>)> {
    let token: Option<String> = r.get("share_token");
    let turns: i32 = r.get("turn_count");
    let summary = SessionSummary {
        id: stored("session id", SessionId::parse(r.get("id")))?,
        owner: stored("session owner", AccountId::new(r.get::<_, String>("owner")))?,
        package_id: r.get("package_id"),
        model: r.get("model"),
        title: r.get("title"),
        turns: u32::try_from(turns).map_err(|_| Error::Invariant(format!("sessions: turn_count {turns}")))?,
        shared: token.is_some(),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    };
    let token = token.map(|t| stored("share token", ShareToken::parse(&t))).transpose()?;
    Ok((summary, token))
}

async fn load_turns(c: &impl GenericClient, session: &str) -> Result<Vec<Turn>> {
    let rows = c.query("SELECT seq, role, content, run_id, at FROM session_turns WHERE session_id = $1 ORDER BY seq", &[&session]).await?;
    rows.iter()
        .map(|r| {
            let seq: i32 = r.get(0);
            Ok(Turn {
                seq: u32::try_from(seq).map_err(|_| Error::Invariant(format!("session_turns: seq {seq}")))?,
                role: Role::parse(r.get(1))?,
                content: r.get(2),
                run_id: r.get::<_, Option<&str>>(3).map(|id| stored("run id", RunId::parse(id))).transpose()?,
                at: r.get(4),
            })
        })
        .collect()
}

fn run_from_row(r: &Row, account: &AccountId) -> Result<RunRecord> {
    let count = |name: &str| -> Result<u64> {
        let v: i64 = r.get(name);
        u64::try_from(v).map_err(|_| Error::Invariant(format!("runs: negative {name} {v}")))
    };
    Ok(RunRecord {
        id: stored("run id", RunId::parse(r.get("id")))?,
        account: account.clone(),
        session: r.get::<_, Option<&str>>("session_id").map(|id| stored("session id", SessionId::parse(id))).transpose()?,
        package_id: r.get("package_id"),
        model: r.get("model"),
        with_prompt: r.get("with_prompt"),
        tokens: TokenUsage {
            input: count("input_tokens")?,
            output: count("output_tokens")?,
            cache_read: count("cache_read_tokens")?,
            cache_write: count("cache_write_tokens")?,
        },
        credits: r.get("credits"),
        cost_micros: r.get("cost_micros"),
        latency_ms: count("latency_ms")?,
        outcome: RunOutcome::parse(r.get("outcome"))?,
        error: r.get("error"),
        hold: r.get::<_, Option<i64>>("hold_id").map(HoldId),
        at: r.get("at"),
    })
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

impl PgStore {
    async fn put_package_once(&self, p: &Package) -> Result<()> {
        let now = to_millis(self.core.clock.now());
        let client = self.core.client().await?;
        client
            .execute(
                "INSERT INTO packages (id, name, version, prompt, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $5)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, version = excluded.version, prompt = excluded.prompt, updated_at = excluded.updated_at",
                &[&p.id, &p.name, &p.version, &p.prompt, &now],
            )
            .await?;
        Ok(())
    }

    async fn package_once(&self, id: &str) -> Result<Option<Package>> {
        let client = self.core.client().await?;
        let row = client.query_opt("SELECT id, name, version, prompt FROM packages WHERE id = $1", &[&id]).await?;
        Ok(row.map(|r| Package { id: r.get(0), name: r.get(1), version: r.get(2), prompt: r.get(3) }))
    }

    async fn create_session_once(&self, s: &NewSession) -> Result<SessionSummary> {
        let now = to_millis(self.core.clock.now());
        let client = self.core.client().await?;
        let n = client
            .execute(
                "INSERT INTO sessions (id, owner, package_id, model, title, turn_count, share_token, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, 0, NULL, $6, $6) ON CONFLICT (id) DO NOTHING",
                &[&s.id.as_str(), &s.owner.as_str(), &s.package_id, &s.model, &s.title, &now],
            )
            .await?;
        if n == 0 {
            return Err(Error::invalid("session_id", "a session with this id exists"));
        }
        Ok(SessionSummary {
            id: s.id.clone(),
            owner: s.owner.clone(),
            package_id: s.package_id.clone(),
            model: s.model.clone(),
            title: s.title.clone(),
            turns: 0,
            shared: false,
            created_at: now,
            updated_at: now,
        })
    }

    async fn session_once(&self, owner: &AccountId, id: &SessionId) -> Result<Option<Session>> {
        let mut client = self.core.client().await?;
        let tx = client.build_transaction().read_only(true).isolation_level(tokio_postgres::IsolationLevel::RepeatableRead).start().await?;
        let row = tx.query_opt(&format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1 AND owner = $2"), &[&id.as_str(), &owner.as_str()]).await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let (summary, share_token) = session_from_row(&row)?;
        let turns = load_turns(&tx, id.as_str()).await?;
        tx.commit().await?;
        Ok(Some(Session { summary, share_token, turns }))
    }

    async fn sessions_once(&self, owner: &AccountId, cursor: Option<&(DateTime<Utc>, SessionId)>, limit: u32) -> Result<SessionPage> {
        let client = self.core.client().await?;
        let fetch = i64::from(limit) + 1;
        let rows = match cursor {
            None => {
                client
                    .query(
                        &format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE owner = $1 ORDER BY created_at DESC, id DESC LIMIT $2"),
                        &[&owner.as_str(), &fetch],
                    )
                    .await?
            }
            Some((created, id)) => {
                client
                    .query(
                        &format!(
                            "SELECT {SESSION_COLUMNS} FROM sessions WHERE owner = $1 AND (created_at, id) < ($2, $3)
                             ORDER BY created_at DESC, id DESC LIMIT $4"
                        ),
                        &[&owner.as_str(), created, &id.as_str(), &fetch],
                    )
                    .await?
            }
        };
        let mut sessions = rows.iter().map(|r| session_from_row(r).map(|(s, _)| s)).collect::<Result<Vec<_>>>()?;
        let next = if sessions.len() > limit as usize {
            sessions.truncate(limit as usize);
            sessions.last().map(session_cursor)
        } else {
            None
        };
        Ok(SessionPage { sessions, next })
    }

    async fn delete_session_once(&self, owner: &AccountId, id: &SessionId) -> Result<bool> {
        let mut client = self.core.client().await?;
        let tx = client.transaction().await?;
        // The session's row lock: an append waiting on it then finds the session gone.
        if tx.query_opt("SELECT 1 FROM sessions WHERE id = $1 AND owner = $2 FOR UPDATE", &[&id.as_str(), &owner.as_str()]).await?.is_none() {
            return Ok(false);
        }
        tx.execute("DELETE FROM session_turns WHERE session_id = $1", &[&id.as_str()]).await?;
        tx.execute("DELETE FROM sessions WHERE id = $1", &[&id.as_str()]).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn record_run_once(&self, run: &RunRecord, turns: &[NewTurn]) -> Result<bool> {
        let latency = i64::try_from(run.latency_ms).map_err(|_| Error::invalid("latency_ms", "too large"))?;
        let t = &run.tokens;
        let (input, output, cache_read, cache_write) = (t.input as i64, t.output as i64, t.cache_read as i64, t.cache_write as i64);
        let at = to_millis(run.at);
        let mut client = self.core.client().await?;
        let tx = client.transaction().await?;
        // First the run: a run stored already (or being stored by a transaction this one then
        // waits for) is a replay, whatever its session has become since.
        let inserted = tx
            .execute(
                "INSERT INTO runs (id, account, session_id, package_id, model, with_prompt, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                                   credits, cost_micros, latency_ms, outcome, error, hold_id, at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
                 ON CONFLICT (id) DO NOTHING",
                &[
                    &run.id.as_str(),
                    &run.account.as_str(),
                    &run.session.as_ref().map(SessionId::as_str),
                    &run.package_id,
                    &run.model,
                    &run.with_prompt,
                    &input,
                    &output,
                    &cache_read,
                    &cache_write,
                    &run.credits,
                    &run.cost_micros,
                    &latency,
                    &run.outcome.as_str(),
                    &run.error,
                    &run.hold.map(|h| h.0),
                    &at,
                ],
            )
            .await?;
        if inserted == 0 {
            return Ok(false);
        }
        if let Some(session) = &run.session {
            // The session's row lock serializes appends: each numbers its turns after the
            // previous one's.
            let row =
                tx.query_opt("SELECT turn_count FROM sessions WHERE id = $1 AND owner = $2 FOR UPDATE", &[&session.as_str(), &run.account.as_str()]).await?;
            let Some(row) = row else {
                return Err(Error::NotFound { what: "session" });
            };
            let stored_turns: i32 = row.get(0);
            let stored_turns = u32::try_from(stored_turns).map_err(|_| Error::Invariant(format!("sessions: turn_count {stored_turns}")))?;
            if !turns.is_empty() {
                check_turn_limit(stored_turns, turns.len())?;
                // The time is read after the lock wait.
                let now = to_millis(self.core.clock.now());
                let first = stored_turns as i32 + 1;
                let seqs: Vec<i32> = (0..turns.len() as i32).map(|i| first + i).collect();
                let roles: Vec<&str> = turns.iter().map(|t| t.role.as_str()).collect();
                let contents: Vec<&str> = turns.iter().map(|t| t.content.as_str()).collect();
                tx.execute(
                    "INSERT INTO session_turns (session_id, seq, role, content, run_id, at)
                     SELECT $1, t.seq, t.role, t.content, $5, $6 FROM unnest($2::int[], $3::text[], $4::text[]) AS t (seq, role, content)",
                    &[&session.as_str(), &seqs, &roles, &contents, &run.id.as_str(), &now],
                )
                .await?;
                tx.execute(
                    "UPDATE sessions SET turn_count = turn_count + $2, updated_at = $3 WHERE id = $1",
                    &[&session.as_str(), &(turns.len() as i32), &now],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn runs_once(&self, account: &AccountId, limit: u32) -> Result<Vec<RunRecord>> {
        let client = self.core.client().await?;
        let rows = client.query("SELECT * FROM runs WHERE account = $1 ORDER BY at DESC, id DESC LIMIT $2", &[&account.as_str(), &i64::from(limit)]).await?;
        rows.iter().map(|r| run_from_row(r, account)).collect()
    }

    async fn share_session_once(&self, owner: &AccountId, id: &SessionId, token: &ShareToken) -> Result<bool> {
        let client = self.core.client().await?;
        let n = client
            .execute("UPDATE sessions SET share_token = $3 WHERE id = $1 AND owner = $2", &[&id.as_str(), &owner.as_str(), &token.as_str()])
            .await
            .map_err(|e| if is_unique_violation(&e) { Error::invalid("share_token", "another session has this token") } else { e.into() })?;
        Ok(n == 1)
    }

    async fn revoke_share_once(&self, owner: &AccountId, id: &SessionId) -> Result<bool> {
        let client = self.core.client().await?;
        let n = client
            .execute("UPDATE sessions SET share_token = NULL WHERE id = $1 AND owner = $2 AND share_token IS NOT NULL", &[&id.as_str(), &owner.as_str()])
            .await?;
        Ok(n == 1)
    }

    async fn shared_session_once(&self, token: &ShareToken) -> Result<Option<SharedSession>> {
        let mut client = self.core.client().await?;
        let tx = client.build_transaction().read_only(true).isolation_level(tokio_postgres::IsolationLevel::RepeatableRead).start().await?;
        let Some(row) = tx.query_opt("SELECT id, title, package_id, model FROM sessions WHERE share_token = $1", &[&token.as_str()]).await? else {
            return Ok(None);
        };
        let turns = load_turns(&tx, row.get(0)).await?.into_iter().map(|t| SharedTurn { role: t.role, content: t.content }).collect();
        tx.commit().await?;
        Ok(Some(SharedSession { title: row.get(1), package_id: row.get(2), model: row.get(3), turns }))
    }
}

// ---------------------------------------------------------------------------------------------
// Billing: purchases, Stripe events, customers, credit debts

const PURCHASE_COLUMNS: &str = "id, account, kind, product, credits, amount_cents, currency, status, checkout_session, payment_intent, customer, credited,
    refunded_cents, credits_reversed, version, created_at, updated_at, reversing_to";

fn purchase_from_row(r: &Row) -> Result<Purchase> {
    Ok(Purchase {
        id: r.get("id"),
        account: stored("purchase account", AccountId::new(r.get::<_, String>("account")))?,
        kind: PurchaseKind::parse(r.get("kind"))?,
        product: r.get("product"),
        credits: r.get("credits"),
        amount_cents: r.get("amount_cents"),
        currency: r.get("currency"),
        status: PurchaseStatus::parse(r.get("status"))?,
        checkout_session: r.get("checkout_session"),
        payment_intent: r.get("payment_intent"),
        customer: r.get("customer"),
        credited: r.get("credited"),
        refunded_cents: r.get("refunded_cents"),
        credits_reversed: r.get("credits_reversed"),
        version: r.get("version"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
        reversing_to: r.get("reversing_to"),
    })
}

/// A purchase's id, checkout session or payment intent that another purchase has already
/// (the primary key or one of the unique indexes): [`purchase_conflict`].
fn purchase_write_error(e: tokio_postgres::Error) -> Error {
    if !is_unique_violation(&e) {
        return e.into();
    }
    purchase_conflict(e.as_db_error().and_then(|d| d.constraint()).unwrap_or_default())
}

const EVENT_COLUMNS: &str = "id, kind, created, status, account, payload, received_at, object_ref";

fn event_from_row(r: &Row) -> Result<StripeEventRecord> {
    Ok(StripeEventRecord {
        id: r.get("id"),
        kind: r.get("kind"),
        created: r.get("created"),
        status: EventStatus::parse(r.get("status"))?,
        account: r.get::<_, Option<String>>("account").map(|a| stored("event account", AccountId::new(a))).transpose()?,
        payload: r.get("payload"),
        received_at: r.get("received_at"),
        object_ref: r.get("object_ref"),
    })
}

impl PgStore {
    async fn create_purchase_once(&self, p: &Purchase) -> Result<Purchase> {
        let now = to_millis(self.core.clock.now());
        let client = self.core.client().await?;
        client
            .execute(
                &format!("INSERT INTO purchases ({PURCHASE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 1, $15, $15, $16)"),
                &[
                    &p.id,
                    &p.account.as_str(),
                    &p.kind.as_str(),
                    &p.product,
                    &p.credits,
                    &p.amount_cents,
                    &p.currency,
                    &p.status.as_str(),
                    &p.checkout_session,
                    &p.payment_intent,
                    &p.customer,
                    &p.credited,
                    &p.refunded_cents,
                    &p.credits_reversed,
                    &now,
                    &p.reversing_to,
                ],
            )
            .await
            .map_err(purchase_write_error)?;
        Ok(Purchase { version: 1, created_at: now, updated_at: now, ..p.clone() })
    }

    async fn purchase_once(&self, id: &str) -> Result<Option<Purchase>> {
        let client = self.core.client().await?;
        let row = client.query_opt(&format!("SELECT {PURCHASE_COLUMNS} FROM purchases WHERE id = $1"), &[&id]).await?;
        row.as_ref().map(purchase_from_row).transpose()
    }

    async fn purchase_by_stripe_id_once(&self, stripe_id: &str) -> Result<Option<Purchase>> {
        let client = self.core.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {PURCHASE_COLUMNS}, 0 AS pref FROM purchases WHERE checkout_session = $1
                     UNION ALL SELECT {PURCHASE_COLUMNS}, 1 AS pref FROM purchases WHERE payment_intent = $1
                     ORDER BY pref LIMIT 1"
                ),
                &[&stripe_id],
            )
            .await?;
        row.as_ref().map(purchase_from_row).transpose()
    }

    async fn save_purchase_once(&self, p: &Purchase) -> Result<Option<Purchase>> {
        let Some(next) = p.version.checked_add(1) else {
            return self.unsaved(p).await;
        };
        let now = to_millis(self.core.clock.now());
        let client = self.core.client().await?;
        // The compare-and-set: one statement, so concurrent saves of one version queue on the
        // row and all but the first find the version moved. The immutable fields are compared
        // too, so that a change to one writes nothing.
        let row = client
            .query_opt(
                "UPDATE purchases SET status = $9, checkout_session = $10, payment_intent = $11, customer = $12, credited = $13, refunded_cents = $14,
                                      credits_reversed = $15, version = $16, updated_at = $17, reversing_to = $18
                 WHERE id = $1 AND version = $2 AND account = $3 AND kind = $4 AND product = $5 AND credits = $6 AND amount_cents = $7 AND currency = $8
                 RETURNING created_at",
                &[
                    &p.id,
                    &p.version,
                    &p.account.as_str(),
                    &p.kind.as_str(),
                    &p.product,
                    &p.credits,
                    &p.amount_cents,
                    &p.currency,
                    &p.status.as_str(),
                    &p.checkout_session,
                    &p.payment_intent,
                    &p.customer,
                    &p.credited,
                    &p.refunded_cents,
                    &p.credits_reversed,
                    &next,
                    &now,
                    &p.reversing_to,
                ],
            )
            .await
            .map_err(purchase_write_error)?;
        // Back to the pool before `unsaved` takes one: a save must never hold two connections.
        drop(client);
        match row {
            Some(row) => Ok(Some(Purchase { version: next, created_at: row.get(0), updated_at: now, ..p.clone() })),
            None => self.unsaved(p).await,
        }
    }

    /// Why a save wrote nothing: no such purchase, a change to an immutable field, or (`None`)
    /// another version.
    async fn unsaved(&self, p: &Purchase) -> Result<Option<Purchase>> {
        let Some(stored) = self.purchase_once(&p.id).await? else {
            return Err(Error::NotFound { what: "purchase" });
        };
        check_immutable(&stored, p)?;
        Ok(None)
    }

    async fn purchases_once(&self, after: &str, limit: u32) -> Result<Vec<Purchase>> {
        let client = self.core.client().await?;
        let rows = client.query(&format!("SELECT {PURCHASE_COLUMNS} FROM purchases WHERE id > $1 ORDER BY id LIMIT $2"), &[&after, &i64::from(limit)]).await?;
        rows.iter().map(purchase_from_row).collect()
    }

    async fn record_stripe_event_once(&self, e: &StripeEventRecord) -> Result<bool> {
        let now = to_millis(self.core.clock.now());
        let client = self.core.client().await?;
        let n = client
            .execute(
                &format!("INSERT INTO stripe_events ({EVENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING"),
                &[&e.id, &e.kind, &e.created, &e.status.as_str(), &e.account.as_ref().map(AccountId::as_str), &e.payload, &now, &e.object_ref],
            )
            .await?;
        Ok(n == 1)
    }

    async fn set_stripe_event_status_once(&self, id: &str, status: EventStatus, account: Option<&AccountId>) -> Result<()> {
        let client = self.core.client().await?;
        let n = client
            .execute(
                "UPDATE stripe_events SET status = $2, account = COALESCE($3, account) WHERE id = $1",
                &[&id, &status.as_str(), &account.map(AccountId::as_str)],
            )
            .await?;
        if n == 0 {
            return Err(Error::NotFound { what: "stripe event" });
        }
        Ok(())
    }

    async fn stripe_event_once(&self, id: &str) -> Result<Option<StripeEventRecord>> {
        let client = self.core.client().await?;
        let row = client.query_opt(&format!("SELECT {EVENT_COLUMNS} FROM stripe_events WHERE id = $1"), &[&id]).await?;
        row.as_ref().map(event_from_row).transpose()
    }

    async fn stripe_events_once(&self, status: Option<EventStatus>, limit: u32) -> Result<Vec<StripeEventRecord>> {
        let client = self.core.client().await?;
        let limit = i64::from(limit);
        let rows = match status {
            Some(status) => {
                client
                    .query(
                        &format!("SELECT {EVENT_COLUMNS} FROM stripe_events WHERE status = $1 ORDER BY received_at, id LIMIT $2"),
                        &[&status.as_str(), &limit],
                    )
                    .await?
            }
            None => client.query(&format!("SELECT {EVENT_COLUMNS} FROM stripe_events ORDER BY received_at, id LIMIT $1"), &[&limit]).await?,
        };
        rows.iter().map(event_from_row).collect()
    }

    async fn link_customer_once(&self, customer: &str, account: &AccountId) -> Result<()> {
        let now = to_millis(self.core.clock.now());
        let client = self.core.client().await?;
        client
            .execute(
                "INSERT INTO stripe_customers (customer, account, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (customer) DO UPDATE SET account = excluded.account, updated_at = excluded.updated_at",
                &[&customer, &account.as_str(), &now],
            )
            .await?;
        Ok(())
    }

    async fn customer_account_once(&self, customer: &str) -> Result<Option<AccountId>> {
        let client = self.core.client().await?;
        let row = client.query_opt("SELECT account FROM stripe_customers WHERE customer = $1", &[&customer]).await?;
        row.map(|r| stored("customer account", AccountId::new(r.get::<_, String>(0)))).transpose()
    }

    async fn add_debt_once(&self, account: &AccountId, credits: i64, key: &str) -> Result<DebtChange> {
        const SEEN: &str = "SELECT account, requested, applied, debt_after FROM debt_updates WHERE key = $1";
        let seen = |r: &Row| (r.get::<_, String>(0), r.get::<_, i64>(1), r.get::<_, i64>(2), r.get::<_, i64>(3));
        let now = to_millis(self.core.clock.now());
        let mut client = self.core.client().await?;
        let tx = client.transaction().await?;
        if let Some(r) = tx.query_opt(SEEN, &[&key]).await? {
            return replay_debt_change(key, account, credits, seen(&r));
        }
        // The account's debt row, locked: changes to one debt queue here.
        tx.execute("INSERT INTO credit_debts (account, credits, updated_at) VALUES ($1, 0, $2) ON CONFLICT (account) DO NOTHING", &[&account.as_str(), &now])
            .await?;
        let before: i64 = tx.query_one("SELECT credits FROM credit_debts WHERE account = $1 FOR UPDATE", &[&account.as_str()]).await?.get(0);
        // The same key may have committed while this waited for the lock.
        if let Some(r) = tx.query_opt(SEEN, &[&key]).await? {
            return replay_debt_change(key, account, credits, seen(&r));
        }
        let after = (before + credits).clamp(0, MAX_BUCKET_CREDITS);
        tx.execute("UPDATE credit_debts SET credits = $2, updated_at = $3 WHERE account = $1", &[&account.as_str(), &after, &now]).await?;
        tx.execute(
            "INSERT INTO debt_updates (key, account, requested, applied, debt_after, at) VALUES ($1, $2, $3, $4, $5, $6)",
            &[&key, &account.as_str(), &credits, &(after - before), &after, &now],
        )
        .await
        .map_err(|e| if is_unique_violation(&e) { Error::IdempotencyConflict { key: key.to_owned() } } else { e.into() })?;
        tx.commit().await?;
        Ok(DebtChange { applied: after - before, debt_after: after, replayed: false })
    }

    async fn stripe_events_about_once(&self, object_ref: &str, status: EventStatus, limit: u32) -> Result<Vec<StripeEventRecord>> {
        let client = self.core.client().await?;
        let rows = client
            .query(
                &format!("SELECT {EVENT_COLUMNS} FROM stripe_events WHERE object_ref = $1 AND status = $2 ORDER BY created DESC, id DESC LIMIT $3"),
                &[&object_ref, &status.as_str(), &i64::from(limit)],
            )
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn keyed_once(&self, account: &AccountId, key: &str) -> Result<Option<KeyedResponse>> {
        let client = self.core.client().await?;
        let row = client
            .query_opt("SELECT fingerprint, status, body, at_ms FROM keyed_responses WHERE account = $1 AND key = $2", &[&account.as_str(), &key])
            .await?;
        row.map(|r| {
            let status: i32 = r.get(1);
            let at_ms: i64 = r.get(3);
            Ok(KeyedResponse {
                account: account.clone(),
                key: key.to_owned(),
                fingerprint: r.get(0),
                status: u16::try_from(status).map_err(|_| Error::Invariant(format!("stored status {status}")))?,
                body: r.get(2),
                at: DateTime::<Utc>::from_timestamp_millis(at_ms).ok_or_else(|| Error::Invariant(format!("stored time {at_ms}")))?,
            })
        })
        .transpose()
    }

    async fn debt_once(&self, account: &AccountId) -> Result<i64> {
        let client = self.core.client().await?;
        let row = client.query_opt("SELECT credits FROM credit_debts WHERE account = $1", &[&account.as_str()]).await?;
        Ok(row.map_or(0, |r| r.get(0)))
    }
}

/// Runs `f` again while it fails because its connection was lost (a restarted server, an
/// administrator ending connections), at most three times in all.
async fn retrying<T, F, Fut>(f: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match f().await {
            Err(Error::ConnectionLost(_)) if tries < 3 => continue,
            r => return r,
        }
    }
}

#[async_trait]
impl Store for PgStore {
    async fn execute(&self, cmd: Command) -> Result<Outcome> {
        cmd.validate()?;
        let fp = fingerprint(&cmd);
        if !batchable(&cmd) || (cmd.account().is_none() && cmd.hold().is_none()) {
            return self.core.execute_single(&cmd, fp).await;
        }
        let (reply, rx) = oneshot::channel();
        self.batcher.send(Job { cmd, fp, reply: Some(reply) }).map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    async fn balance(&self, account: &AccountId) -> Result<BalanceView> {
        retrying(|| self.balance_once(account)).await
    }

    async fn history(&self, q: &HistoryQuery) -> Result<HistoryPage> {
        retrying(|| self.history_once(q)).await
    }

    async fn usage_before(&self, account: &AccountId, before: Option<EntryId>, limit: u32) -> Result<Vec<UsageRow>> {
        retrying(|| self.usage_once(account, before, limit)).await
    }

    async fn due(&self, due: Due, after: Option<&AccountId>, limit: u32) -> Result<Vec<AccountId>> {
        retrying(|| self.due_once(due, after, limit)).await
    }

    async fn verify(&self) -> Result<VerifyReport> {
        retrying(|| self.verify_once()).await
    }

    async fn tiers(&self) -> Result<TierTable> {
        retrying(|| self.tiers_once()).await
    }

    async fn cost(&self, account: &AccountId) -> Result<CostView> {
        retrying(|| self.cost_once(account)).await
    }

    async fn cost_accounts(&self, filter: CostFilter, after: Option<&AccountId>, limit: u32) -> Result<Vec<CostView>> {
        retrying(|| self.cost_accounts_once(filter, after, limit)).await
    }

    async fn summary(&self) -> Result<crate::cost::Summary> {
        retrying(|| self.summary_once()).await
    }

    async fn alerts(&self, q: &AlertQuery) -> Result<Vec<StoredAlert>> {
        retrying(|| self.alerts_once(q)).await
    }

    async fn daily_usage(&self, q: &DailyUsageQuery) -> Result<Vec<DailyUsage>> {
        retrying(|| self.daily_usage_once(q)).await
    }

    async fn refresh_analytics(&self) -> Result<AnalyticsReport> {
        retrying(|| self.refresh_analytics_once()).await
    }

    async fn put_package(&self, p: &Package) -> Result<()> {
        p.validate()?;
        // An upsert: trying again is harmless.
        retrying(|| self.put_package_once(p)).await
    }

    async fn package(&self, id: &str) -> Result<Option<Package>> {
        retrying(|| self.package_once(id)).await
    }

    /// Not retried on a lost connection (a retry of a creation that did commit would report
    /// the id as taken): the caller gets [`Error::ConnectionLost`].
    async fn create_session(&self, s: &NewSession) -> Result<SessionSummary> {
        s.validate()?;
        self.create_session_once(s).await
    }

    async fn session(&self, owner: &AccountId, id: &SessionId) -> Result<Option<Session>> {
        retrying(|| self.session_once(owner, id)).await
    }

    async fn sessions(&self, owner: &AccountId, cursor: Option<&str>, limit: u32) -> Result<SessionPage> {
        check_session_page(limit)?;
        let cursor = cursor.map(parse_session_cursor).transpose()?;
        retrying(|| self.sessions_once(owner, cursor.as_ref(), limit)).await
    }

    /// Not retried on a lost connection (a retry of a deletion that did commit would answer
    /// `false`): the caller gets [`Error::ConnectionLost`].
    async fn delete_session(&self, owner: &AccountId, id: &SessionId) -> Result<bool> {
        self.delete_session_once(owner, id).await
    }

    async fn record_run(&self, run: &RunRecord, turns: &[NewTurn]) -> Result<bool> {
        check_run(run, turns)?;
        // Idempotent by run id: a retry after a lost commit answers `false` (stored already).
        retrying(|| self.record_run_once(run, turns)).await
    }

    async fn runs(&self, account: &AccountId, limit: u32) -> Result<Vec<RunRecord>> {
        check_session_page(limit)?;
        retrying(|| self.runs_once(account, limit)).await
    }

    async fn share_session(&self, owner: &AccountId, id: &SessionId, token: &ShareToken) -> Result<bool> {
        retrying(|| self.share_session_once(owner, id, token)).await
    }

    /// Not retried on a lost connection (see [`Store::delete_session`]).
    async fn revoke_share(&self, owner: &AccountId, id: &SessionId) -> Result<bool> {
        self.revoke_share_once(owner, id).await
    }

    async fn shared_session(&self, token: &ShareToken) -> Result<Option<SharedSession>> {
        retrying(|| self.shared_session_once(token)).await
    }

    /// Not retried on a lost connection (a retry of a creation that did commit would report
    /// the id as taken): the caller gets [`Error::ConnectionLost`].
    async fn create_purchase(&self, p: &Purchase) -> Result<Purchase> {
        p.validate()?;
        self.create_purchase_once(p).await
    }

    async fn purchase(&self, id: &str) -> Result<Option<Purchase>> {
        check_purchase_id(id)?;
        retrying(|| self.purchase_once(id)).await
    }

    async fn purchase_by_stripe_id(&self, stripe_id: &str) -> Result<Option<Purchase>> {
        check_stripe_id(stripe_id)?;
        retrying(|| self.purchase_by_stripe_id_once(stripe_id)).await
    }

    /// Not retried on a lost connection (a retry of a save that did commit would find the
    /// version moved and answer `None`): the caller gets [`Error::ConnectionLost`].
    async fn save_purchase(&self, p: &Purchase) -> Result<Option<Purchase>> {
        p.validate()?;
        self.save_purchase_once(p).await
    }

    async fn purchases(&self, after: Option<&str>, limit: u32) -> Result<Vec<Purchase>> {
        check_billing_page(limit)?;
        if let Some(after) = after {
            check_purchase_id(after)?;
        }
        let after = after.unwrap_or_default();
        retrying(|| self.purchases_once(after, limit)).await
    }

    async fn record_stripe_event(&self, e: &StripeEventRecord) -> Result<bool> {
        check_stripe_event(e)?;
        // Insert-if-absent: a retry after a lost commit answers `false` (stored already).
        retrying(|| self.record_stripe_event_once(e)).await
    }

    async fn set_stripe_event_status(&self, id: &str, status: EventStatus, account: Option<&AccountId>) -> Result<()> {
        check_stripe_id(id)?;
        // Setting the same values again is harmless.
        retrying(|| self.set_stripe_event_status_once(id, status, account)).await
    }

    async fn stripe_event(&self, id: &str) -> Result<Option<StripeEventRecord>> {
        check_stripe_id(id)?;
        retrying(|| self.stripe_event_once(id)).await
    }

    async fn stripe_events(&self, status: Option<EventStatus>, limit: u32) -> Result<Vec<StripeEventRecord>> {
        check_billing_page(limit)?;
        retrying(|| self.stripe_events_once(status, limit)).await
    }

    async fn link_customer(&self, customer: &str, account: &AccountId) -> Result<()> {
        check_stripe_id(customer)?;
        // An upsert: trying again is harmless.
        retrying(|| self.link_customer_once(customer, account)).await
    }

    async fn customer_account(&self, customer: &str) -> Result<Option<AccountId>> {
        check_stripe_id(customer)?;
        retrying(|| self.customer_account_once(customer)).await
    }

    /// Keyed, so a retry after a lost connection is a replay if the first try committed.
    async fn add_debt(&self, account: &AccountId, credits: i64, key: &str) -> Result<DebtChange> {
        check_debt_change(credits, key)?;
        retrying(|| self.add_debt_once(account, credits, key)).await
    }

    async fn stripe_events_about(&self, object_ref: &str, status: EventStatus, limit: u32) -> Result<Vec<StripeEventRecord>> {
        check_stripe_id(object_ref)?;
        check_billing_page(limit)?;
        retrying(|| self.stripe_events_about_once(object_ref, status, limit)).await
    }

    async fn debt(&self, account: &AccountId) -> Result<i64> {
        retrying(|| self.debt_once(account)).await
    }

    async fn keyed_response(&self, account: &AccountId, key: &str) -> Result<Option<KeyedResponse>> {
        check_request_key(key)?;
        retrying(|| self.keyed_once(account, key)).await
    }

    async fn remember_response(&self, r: &KeyedResponse) -> Result<KeyedResponse> {
        r.validate()?;
        let client = self.core.client().await?;
        client
            .execute(
                "INSERT INTO keyed_responses (account, key, fingerprint, status, body, at_ms) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (account, key) DO NOTHING",
                &[&r.account.as_str(), &r.key, &r.fingerprint, &i32::from(r.status), &r.body, &to_millis(r.at).timestamp_millis()],
            )
            .await?;
        drop(client);
        self.keyed_once(&r.account, &r.key).await?.ok_or_else(|| Error::Invariant("a keyed response vanished".into()))
    }

    fn clock(&self) -> Arc<dyn Clock> {
        self.core.clock.clone()
    }

    fn config(&self) -> &LedgerConfig {
        &self.core.ledger
    }
}

// ---------------------------------------------------------------------------------------------
// Group commit

/// Most commands one batch takes.
const MAX_BATCH: usize = 256;
/// The fewest commands a batch takes as its share when the commands about are split between
/// lanes (it takes fewer only if fewer are queued). A batch has a cost of its own whatever
/// its size, so very small batches cost more than their overlap gains. 32 callers over 1,000
/// accounts ran faster as two batches of 16 that overlap (one runs its statement while the
/// other waits for its `COMMIT`'s flush and its callers) than as one batch of 32: `pg_profile`,
/// 20 runs each, medians 20.0k against 18.0k spends/s, the machine 71 % busy against 49 %
/// (README, PostgreSQL figures; before V10 and the early answers, one batch of 32 had won).
/// Commands that arrive while a batch is in flight still take the other lanes.
const MIN_SHARE: usize = 16;
/// Most commands the batcher takes off its channel ahead of the batches.
const QUEUED_JOBS: usize = 4 * MAX_BATCH;
/// How long the batcher waits for the callers its landed batches answered (the timer's
/// granularity is a millisecond).
const GATHER_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

/// A batch's transaction begins with its plans made without scans (see `read_batch`), its
/// joins as nested loops (a batch joins a few rows unpacked from arrays to the rows they name,
/// found by key, in the arrays' order: see [`UPDATE_ACCOUNTS_SQL`]), and without JIT
/// compilation: a statement that must scan (none should) would otherwise be costed as huge and
/// compiled on every execution. Prepared once per connection and sent after a plain `BEGIN`:
/// as text, the server parsed and planned it for every batch (87 µs per batch in the server's
/// log, against 46 µs now).
/// It also takes [`USAGE_LOCK`] shared, before the batch takes ids or reads the watermark.
const PLAN_SQL: &str = "SELECT set_config('enable_seqscan', 'off', true), set_config('enable_hashjoin', 'off', true), \
                        set_config('enable_mergejoin', 'off', true), set_config('jit', 'off', true), \
                        pg_advisory_xact_lock_shared(8102099357864587111)";

/// The usage roll-up's lock (migration V10). Every transaction that may write log entries with
/// usage holds it shared from before it takes their ids until it commits; the roll-up takes it
/// alone, so when it reads the log's highest id, every entry up to it has committed. A batch
/// whose ids were taken before its lock (from the node's block, or allocated ahead) checks that
/// they lie above the roll-up's watermark.
pub const USAGE_LOCK: i64 = 8_102_099_357_864_587_111;

/// A batch that committed: its commands answered, its alerts sent, its stats counted.
type BatchResult = Result<()>;

/// What a batch reads before it applies its commands: under row locks, or from the node's cache.
struct Reads {
    stored: HashMap<String, (i64, Vec<u8>)>,
    accounts: HashMap<i64, BatchAccount>,
    by_ext: HashMap<AccountId, i64>,
    named: HashMap<i64, (i64, HoldRecord)>,
    tiers: TierTable,
    /// The tier rows' versions (`xmin`), in name order.
    tier_stamp: Vec<i64>,
    hold_ids: Vec<i64>,
    entry_ids: Vec<i64>,
    now: DateTime<Utc>,
}

/// At most this many accounts in the node's cache (it is emptied when full).
const CACHED_ACCOUNTS: usize = 8_192;
/// Ids a locked batch allocates beyond its guess, for the node's block.
const SPARE_IDS: i64 = 32;
/// Ids an unlocked batch that found the block short allocates for it, after its `COMMIT`.
const BLOCK_IDS: i64 = 256;
/// Unlocked batches that take fresh ids after a block was found stale (another node, a batch
/// that allocated fresh ids, or a path that allocates on its own, wrote higher ids since), at
/// most: the first time [`BLOCK_COOL_DOWN_FIRST`], doubled by each stale block, halved by each
/// block used. Two busy nodes fail each other's blocks and soon stay on fresh ids; a rare race
/// on this node costs a few batches a round trip, not 64.
const BLOCK_COOL_DOWN: u32 = 64;
const BLOCK_COOL_DOWN_FIRST: u32 = 4;

/// Ids this node took from the sequences and has not used, for unlocked batches: one round trip
/// fewer than allocating them. Ids must follow the order of writes (a write that ended before
/// another began has the lower ids; exports page by id), so a block serves only while it holds
/// the newest ids this node took (its tops), and the unlocked statement checks that no id
/// above the block's last was written (the tables' highest `id`, as its snapshot sees them):
/// it fails, like a stale account, if any write that ended before it began (another node's, a
/// path that allocates on its own) used higher ids. Ids within the block that lie above its
/// own were written by another batch of this node in flight at the same time (the block is
/// contiguous and served in order, so no one else holds them), so the order between the two
/// does not matter. Ids taken but not yet written (another node's block) do
/// not fail it: they order nothing.
#[derive(Default)]
struct IdBlock {
    holds: std::collections::VecDeque<i64>,
    entries: std::collections::VecDeque<i64>,
    /// The block's last ids.
    last: (i64, i64),
    /// The highest ids this node has taken from each sequence.
    top: (i64, i64),
    cool_down: u32,
    /// The cool-down the next stale block starts (0: [`BLOCK_COOL_DOWN_FIRST`]).
    next_cool_down: u32,
    /// Both sequences hand out one id at a time (`CACHE 1`), so ids taken later are higher;
    /// checked on open, otherwise no block is ever used.
    enabled: bool,
}

impl IdBlock {
    /// Records ids this node took from the sequences (ascending).
    fn note(&mut self, holds: &[i64], entries: &[i64]) {
        self.top.0 = self.top.0.max(holds.last().copied().unwrap_or(0));
        self.top.1 = self.top.1.max(entries.last().copied().unwrap_or(0));
    }

    /// Ids this node took and will not use (ascending): the block, if they are the newest and
    /// contiguous. (`nextval` per row: another session's id can fall between two of ours.)
    fn offer(&mut self, holds: Vec<i64>, entries: Vec<i64>) {
        self.note(&holds, &entries);
        let contiguous = |ids: &[i64]| ids.last().zip(ids.first()).is_some_and(|(l, f)| l - f + 1 == ids.len() as i64);
        if let (Some(h), Some(e)) = (holds.last(), entries.last())
            && (*h, *e) == self.top
            && self.enabled
            && contiguous(&holds)
            && contiguous(&entries)
        {
            self.last = (*h, *e);
            self.holds = holds.into();
            self.entries = entries.into();
        }
    }

    /// `holds` and `entries` ids from the block; `None` if it is short, not the newest, or
    /// cooling down.
    fn take(&mut self, holds: usize, entries: usize) -> Option<(Vec<i64>, Vec<i64>)> {
        if self.cool_down > 0 {
            self.cool_down -= 1;
            return None;
        }
        if self.last != self.top || self.holds.len() < holds || self.entries.len() < entries {
            return None;
        }
        Some((self.holds.drain(..holds).collect(), self.entries.drain(..entries).collect()))
    }

    /// Someone else wrote higher ids since the block was taken (or an account changed): drop
    /// it, and take fresh ids a while.
    fn stale(&mut self) {
        self.holds.clear();
        self.entries.clear();
        self.last = (0, 0);
        self.cool_down = self.next_cool_down.max(BLOCK_COOL_DOWN_FIRST);
        self.next_cool_down = (self.cool_down * 2).min(BLOCK_COOL_DOWN);
    }

    /// A batch committed with ids from the block.
    fn served(&mut self) {
        self.next_cool_down /= 2;
    }
}

/// An account as this node's last write left it: its state, its open holds and its row's
/// version (`xmin`, the id of the transaction that wrote it).
struct CachedAccount {
    ext: AccountId,
    state: AccountState,
    holds: Vec<OpenHold>,
    xmin: i64,
    /// Its `updated_at`: the time of that write.
    written_at: DateTime<Utc>,
}

/// What the node knows from its own writes. A batch in flight takes the entries of its
/// accounts and gives them back as it leaves them (no two batches in flight share an
/// account). A batch whose commands all name accounts found here
/// (by id, or by one of their open holds) skips the locked reads: it applies the commands to
/// the cached states and sends one statement, with its `BEGIN` and `COMMIT`, that locks the
/// accounts in id order, updates each only if its row is still at the cached version (the
/// statement fails unless every one is), and checks the ids and tiers it used. Any other write
/// of an account (another node, a refund, a sweep) changes its version, so a stale cache makes
/// that statement fail and commit nothing; the batch then takes the locked path. So the cache
/// can make a batch slower, never wrong.
#[derive(Default)]
struct NodeCache {
    accounts: HashMap<i64, CachedAccount>,
    by_ext: HashMap<AccountId, i64>,
    /// The cached accounts' open holds: hold id → account id.
    by_hold: HashMap<i64, i64>,
    tiers: Option<(TierTable, Vec<i64>)>,
}

impl NodeCache {
    fn clear(&mut self) {
        *self = NodeCache::default();
    }

    fn put(&mut self, id: i64, a: CachedAccount) {
        if self.accounts.len() >= CACHED_ACCOUNTS && !self.accounts.contains_key(&id) {
            self.accounts.clear();
            self.by_ext.clear();
            self.by_hold.clear();
        }
        self.take(id);
        self.by_ext.insert(a.ext.clone(), id);
        self.by_hold.extend(a.holds.iter().map(|h| (h.id.0, id)));
        self.accounts.insert(id, a);
    }

    /// Removes the account `id` and gives its entry.
    fn take(&mut self, id: i64) -> Option<CachedAccount> {
        let a = self.accounts.remove(&id)?;
        self.by_ext.remove(&a.ext);
        for h in &a.holds {
            self.by_hold.remove(&h.id.0);
        }
        Some(a)
    }

    /// Drops `ids`.
    fn forget(&mut self, ids: &[i64]) {
        for id in ids {
            self.take(*id);
        }
    }

    /// The reads of a batch whose every command names a cached account (by its id or one of
    /// its open holds); `None` otherwise.
    fn reads_for(&self, jobs: &[Job], now: DateTime<Utc>) -> Option<Reads> {
        let (tiers, tier_stamp) = self.tiers.as_ref()?;
        let mut accounts: HashMap<i64, BatchAccount> = HashMap::new();
        let mut by_ext: HashMap<AccountId, i64> = HashMap::new();
        let mut named: HashMap<i64, (i64, HoldRecord)> = HashMap::new();
        for j in jobs {
            let id = match (j.cmd.hold(), j.cmd.account()) {
                (Some(h), _) => {
                    let id = *self.by_hold.get(&h.0)?;
                    let open = self.accounts.get(&id)?.holds.iter().find(|o| o.id == h)?;
                    named.insert(h.0, (id, HoldRecord { id: h, amount: open.amount, deadline: open.deadline, status: HoldStatus::Open }));
                    id
                }
                (None, Some(ext)) => *self.by_ext.get(ext)?,
                (None, None) => return None,
            };
            if !accounts.contains_key(&id) {
                let a = self.accounts.get(&id)?;
                by_ext.insert(a.ext.clone(), id);
                accounts.insert(id, BatchAccount { ext: a.ext.clone(), state: a.state.clone(), holds: a.holds.clone(), dirty: false, hot: true });
            }
        }
        if accounts.is_empty() {
            return None;
        }
        Some(Reads {
            stored: HashMap::new(),
            accounts,
            by_ext,
            named,
            tiers: tiers.clone(),
            tier_stamp: tier_stamp.clone(),
            hold_ids: Vec::new(),
            entry_ids: Vec::new(),
            now,
        })
    }
}

/// Commands that go through the batchers. Account creation, refunds (their charge's refunded
/// amount is read from the table) and tier changes take the single path.
fn batchable(cmd: &Command) -> bool {
    !matches!(cmd, Command::CreateAccount(_) | Command::Refund(_) | Command::SetTier(_))
}

/// A batch on its way: how many commands it answered, the cache entries it took (as it left
/// them), and the accounts and holds it keeps from other batches until it lands.
struct Flight {
    done: usize,
    cache: NodeCache,
    accounts: Vec<AccountId>,
    holds: Vec<i64>,
}

/// The node's batcher. It keeps up to `lanes` batches in flight, each in one transaction of a
/// few round trips whatever its size, on its own connection, so one batch runs its statement
/// while another waits for its `COMMIT`'s flush. Two batches in flight never share an account
/// (a command on an account, or a hold, that a batch in flight has waits for it to land), so
/// each takes the node's cache entries for its accounts and gives them back as it left them.
///
/// A batch takes at most its share of the commands about (in flight, queued, and those the
/// landed batches answered, whose callers send their next command at once): batches of equal
/// size take turns instead of one batch of all and idle lanes, but none is cut below
/// [`MIN_SHARE`] for it (see [`batch_share`]). It waits (at most [`GATHER_WAIT`] after the
/// last landing) until its share is queued.
///
/// If a batch fails (a lost race with another node, a connection lost), each of its commands
/// is retried alone, so one cannot fail the others.
async fn batcher_loop(core: Arc<Core>, mut rx: mpsc::UnboundedReceiver<Job>, lanes: usize) {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let mut cache = NodeCache::default();
    let mut queue: Vec<Job> = Vec::new();
    let mut flights = FuturesUnordered::new();
    let mut in_flight = 0usize;
    let (mut busy_accounts, mut busy_holds): (HashSet<AccountId>, HashSet<i64>) = Default::default();
    // Callers answered that have not sent their next command yet (an estimate), and until when
    // a batch waits for them.
    let mut owed = 0usize;
    let mut wait_until = tokio::time::Instant::now();
    let mut open = true;
    loop {
        while flights.len() < lanes && !queue.is_empty() {
            // Commands on one account make one batch at a time: a queue of them waits for all.
            let one_account = queue.iter().all(|j| j.cmd.account().is_some() && j.cmd.account() == queue[0].cmd.account());
            let about = in_flight + queue.len() + owed;
            let share = batch_share(about, lanes, one_account);
            if queue.len() < share && owed > 0 && tokio::time::Instant::now() < wait_until {
                break;
            }
            // In queue order, the commands no batch in flight keeps, up to `share` accounts.
            let mut batch: Vec<Job> = Vec::new();
            let mut accounts: HashSet<AccountId> = HashSet::new();
            let mut holds: HashSet<i64> = HashSet::new();
            let mut rest = Vec::with_capacity(queue.len());
            for j in queue.drain(..) {
                let (acc, hold) = (j.cmd.account(), j.cmd.hold());
                let cached_acc = hold.and_then(|h| cache.by_hold.get(&h.0)).and_then(|id| cache.accounts.get(id)).map(|a| &a.ext);
                let busy = acc.is_some_and(|a| busy_accounts.contains(a)) || hold.is_some_and(|h| busy_holds.contains(&h.0));
                let joins = acc.or(cached_acc).is_some_and(|a| accounts.contains(a));
                if busy || batch.len() >= MAX_BATCH || (!joins && accounts.len() >= share) {
                    rest.push(j);
                    continue;
                }
                if let Some(a) = acc.or(cached_acc) {
                    accounts.insert(a.clone());
                }
                if let Some(h) = hold {
                    holds.insert(h.0);
                }
                batch.push(j);
            }
            queue = rest;
            if batch.is_empty() {
                // All queued wait for batches in flight.
                break;
            }
            // The batch's accounts' cache entries go with it.
            let mut taken = NodeCache { tiers: cache.tiers.clone(), ..NodeCache::default() };
            for a in &accounts {
                if let Some(id) = cache.by_ext.get(a).copied()
                    && let Some(entry) = cache.take(id)
                {
                    holds.extend(entry.holds.iter().map(|h| h.id.0));
                    taken.put(id, entry);
                }
            }
            let (accounts, holds): (Vec<AccountId>, Vec<i64>) = (accounts.into_iter().collect(), holds.into_iter().collect());
            busy_accounts.extend(accounts.iter().cloned());
            busy_holds.extend(holds.iter().copied());
            in_flight += batch.len();
            owed = owed.saturating_sub(batch.len());
            let core = &core;
            flights.push(async move {
                let mut taken = taken;
                let done = run_one_batch(core, batch, &mut taken).await;
                Flight { done, cache: taken, accounts, holds }
            });
        }
        if !open && flights.is_empty() && queue.is_empty() {
            break;
        }
        let waiting = flights.len() < lanes && !queue.is_empty();
        tokio::select! {
            j = rx.recv(), if open && queue.len() < QUEUED_JOBS => match j {
                Some(j) => {
                    owed = owed.saturating_sub(1);
                    queue.push(j);
                    while queue.len() < QUEUED_JOBS && let Ok(j) = rx.try_recv() {
                        owed = owed.saturating_sub(1);
                        queue.push(j);
                    }
                }
                None => open = false,
            },
            Some(f) = flights.next(), if !flights.is_empty() => {
                let Flight { done, cache: back, accounts, holds } = f;
                for a in &accounts {
                    busy_accounts.remove(a);
                }
                for h in &holds {
                    busy_holds.remove(h);
                }
                let NodeCache { accounts: entries, tiers, .. } = back;
                for (id, entry) in entries {
                    cache.put(id, entry);
                }
                if tiers.is_some() {
                    cache.tiers = tiers;
                }
                // Its callers were answered as it committed.
                in_flight -= done;
                owed += done;
                wait_until = tokio::time::Instant::now() + GATHER_WAIT;
            },
            _ = tokio::time::sleep_until(wait_until), if waiting && owed > 0 => owed = 0,
        }
    }
}

/// The most commands (of distinct accounts) the next batch takes, of `about` commands in
/// flight, queued or owed: its share of the lanes, but at least [`MIN_SHARE`]; all of them
/// when they name one account (they could not share lanes anyway).
fn batch_share(about: usize, lanes: usize, one_account: bool) -> usize {
    if one_account { about } else { about.div_ceil(lanes.max(1)).max(MIN_SHARE) }.clamp(1, MAX_BATCH)
}

/// One batch, whose commands are all answered when it returns; the number of them.
async fn run_one_batch(core: &Core, mut batch: Vec<Job>, cache: &mut NodeCache) -> usize {
    match core.run_batch(&mut batch, cache).await {
        // Its commands were answered as it committed.
        Ok(()) => {}
        // Nothing was answered (a batch answers only once it has committed).
        Err(e) => {
            // Whether it committed is unknown, and the commands below change the accounts.
            cache.clear();
            core.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
            *core.stats.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            for j in &mut batch {
                let r = core.execute_single(&j.cmd, j.fp).await;
                j.answer(r);
            }
        }
    }
    batch.len()
}

/// A batch's connection, inside the transaction the batch began on it (in the round trip of
/// its reads, not one of its own). Unless committed, the connection is taken out of the pool
/// and closed when this is dropped (the server then rolls the transaction back), so no caller
/// is ever handed a connection in the middle of a transaction.
struct BatchTx(Option<deadpool_postgres::Object>);

impl BatchTx {
    fn client(&self) -> &deadpool_postgres::ClientWrapper {
        self.0.as_ref().expect("a batch transaction holds its connection until it ends")
    }

    /// Commits; the connection goes back to the pool only if the commit succeeded.
    async fn commit(&mut self) -> Result<(), tokio_postgres::Error> {
        self.client().batch_execute("COMMIT").await?;
        self.release();
        Ok(())
    }

    /// The connection goes back to the pool: the transaction was committed (by a COMMIT sent
    /// with its last statement), or none began (nothing was sent).
    fn release(&mut self) {
        self.0.take();
    }
}

impl Drop for BatchTx {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            drop(deadpool_postgres::Object::take(c));
        }
    }
}

/// A batch's writes as one statement: a `WITH` part per table with rows to write, each with its
/// own parameters, and the number of rows each must take; the statement fails unless each
/// took exactly that many (see `prpm_written` in the migrations). It returns the counts, the
/// writing transaction's id, then the alerts.
#[derive(Default)]
struct BatchWrite<'a> {
    parts: Vec<String>,
    want: Vec<i64>,
    /// The part whose rows the statement returns (the alerts), with no count to check.
    returning: Option<String>,
    params: Vec<&'a (dyn ToSql + Sync)>,
}

impl<'a> BatchWrite<'a> {
    /// Adds a part that must take `want` rows. `sql` numbers its parameters from `$1`.
    fn part(&mut self, sql: &str, params: Vec<&'a (dyn ToSql + Sync)>, want: usize) {
        let sql = renumber(sql, self.params.len());
        self.parts.push(format!("w{} AS ({sql} RETURNING 1)", self.parts.len()));
        self.want.push(want as i64);
        self.params.extend(params);
    }

    /// Adds a read-only part that must return exactly one row. `sql` numbers its parameters
    /// from `$1`.
    fn check(&mut self, sql: &str, params: Vec<&'a (dyn ToSql + Sync)>) {
        let sql = renumber(sql, self.params.len());
        self.parts.push(format!("w{} AS ({sql})", self.parts.len()));
        self.want.push(1);
        self.params.extend(params);
    }

    /// Adds the part whose `RETURNING` rows the statement returns, as arrays, after the counts.
    fn returning(&mut self, sql: &str, params: Vec<&'a (dyn ToSql + Sync)>) {
        debug_assert!(self.returning.is_none(), "one returning part per batch");
        self.returning = Some(renumber(sql, self.params.len()));
        self.params.extend(params);
    }

    /// The statement and its parameters; `None` when there is nothing to write.
    fn statement(&'a self) -> Option<(String, Vec<&'a (dyn ToSql + Sync)>)> {
        if self.parts.is_empty() && self.returning.is_none() {
            return None;
        }
        let mut ctes = self.parts.clone();
        let counts: Vec<String> = (0..self.parts.len()).map(|i| format!("(SELECT count(*) FROM w{i})")).collect();
        let want = format!("${}", self.params.len() + 1);
        let mut select = format!("SELECT prpm_written(ARRAY[{}]::bigint[], {want}::bigint[]), pg_current_xact_id()::text::bigint", counts.join(", "));
        if let Some(r) = &self.returning {
            ctes.push(format!("r AS ({r})"));
            select.push_str(
                ", (SELECT COALESCE(array_agg(account_id), '{}') FROM r), (SELECT COALESCE(array_agg(kind), '{}') FROM r), \
                 (SELECT COALESCE(array_agg(month), '{}') FROM r)",
            );
        }
        let mut params = self.params.clone();
        params.push(&self.want);
        Some((format!("WITH {} {select}", ctes.join(", ")), params))
    }
}

/// `sql` with each parameter `$n` renumbered `$(n + offset)`.
fn renumber(sql: &str, offset: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 32);
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        match rest[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&rest[..digits]),
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

/// An account inside a batch: its state as the batch's commands leave it.
struct BatchAccount {
    ext: AccountId,
    state: AccountState,
    holds: Vec<OpenHold>,
    dirty: bool,
    /// Whether the batch's commands changed only the account's hot columns (see
    /// [`hot_columns_only`]).
    hot: bool,
}

/// A log entry a batch appends, with the command it belongs to.
struct PendingEntry {
    job: usize,
    account_id: i64,
    entry: rules::NewEntry,
}

/// How a batched command ended.
enum Slot {
    Done(Result<Outcome>),
    /// Applied: its effect is completed with ids once they are allocated.
    Applied(Effect),
    /// Its key was used by an earlier command of this batch (the index).
    Replay(usize),
}

impl Core {
    /// Applies `jobs` one after the other in one transaction, against the state the previous
    /// ones left, and writes everything with one statement. The state comes from the node's
    /// cache when it has everything the batch needs (one round trip: see [`NodeCache`]), and
    /// otherwise is read under the accounts' row locks taken in id order (two round trips).
    /// `Ok`: it committed, and every command has been answered. `Err`: nothing was committed,
    /// or it is not known whether it was; no command has been answered.
    async fn run_batch(&self, jobs: &mut [Job], cache: &mut NodeCache) -> BatchResult {
        if let Some(reads) = cache.reads_for(jobs, to_millis(self.clock.now())) {
            let ids: Vec<i64> = reads.accounts.keys().copied().collect();
            match self.apply_batch(jobs, reads, BatchTx(Some(self.client().await?)), false, cache).await {
                Ok(Some(())) => return Ok(()),
                // A command the cache cannot decide alone (a rejection may be a replay of a
                // key it does not know): nothing was sent.
                Ok(None) => {}
                // The cache was stale (another node, or this one on another path, wrote the
                // account since), or a key was already used: nothing was committed. (Or the
                // connection was lost: then the locked path reads the keys after the lock and
                // replays what committed.)
                Err(e) => {
                    self.stats.stale_batches.fetch_add(1, Ordering::Relaxed);
                    *self.stats.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("unlocked batch: {e}"));
                    cache.forget(&ids);
                }
            }
        }
        let batch_tx = BatchTx(Some(self.client().await?));
        let reads = self.read_batch(&batch_tx, jobs).await?;
        let done = self.apply_batch(jobs, reads, batch_tx, true, cache).await?;
        done.ok_or_else(|| Error::Invariant("a locked batch decides every command".into()))
    }

    /// The batch's reads, in one round trip that also begins its transaction: the accounts
    /// locked in id order, then (after the lock) their open holds, the named holds, the keys,
    /// the tiers and ids.
    async fn read_batch(&self, batch_tx: &BatchTx, jobs: &[Job]) -> Result<Reads> {
        let tx: &deadpool_postgres::ClientWrapper = batch_tx.client();

        let keys: Vec<&str> = jobs.iter().filter_map(|j| j.cmd.key()).map(|k| k.as_str()).collect();
        let exts: Vec<&str> = jobs.iter().filter(|j| j.cmd.hold().is_none()).filter_map(|j| j.cmd.account()).map(|a| a.as_str()).collect();
        let hold_ids: Vec<i64> = jobs.iter().filter_map(|j| j.cmd.hold()).map(|h| h.0).collect();
        // Everything the batch reads, sent together (pipelined): the statements run in this
        // order, so those after the lock see what was committed before it. The accounts are
        // locked in id order (no deadlock with other batches, on any node).
        // (A union, not an OR: each side uses its index; collected into an array and matched
        // with `= ANY`, so the index is probed, see the plans below.)
        let accounts_of = "ARRAY(SELECT id FROM accounts WHERE external_id = ANY($1) UNION ALL SELECT account_id FROM holds WHERE id = ANY($2))";
        let lock_sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ANY({accounts_of}) ORDER BY id FOR UPDATE");
        let open_sql =
            format!("SELECT id, account_id, amount, deadline, cost_micros FROM holds WHERE account_id = ANY({accounts_of}) AND status = 'open' ORDER BY id");
        // Ids are allocated with the reads, after the lock (so each account's entries get
        // increasing ids): a guess that covers most batches, topped up below if short. Unused
        // ids leave gaps, which nothing minds.
        // The spare ones become the node's block (see `IdBlock`).
        let holds_guess = jobs.iter().filter(|j| matches!(j.cmd, Command::Hold(_))).count() as i64 + SPARE_IDS;
        let entries_guess = 2 * jobs.len() as i64 + SPARE_IDS;
        let (st_keys, st_lock, st_open, st_named, st_tiers, st_ids, st_plan) = tokio::try_join!(
            tx.prepare_cached("SELECT key, fingerprint, outcome FROM idempotency WHERE key = ANY($1)"),
            tx.prepare_cached(&lock_sql),
            tx.prepare_cached(&open_sql),
            tx.prepare_cached("SELECT id, account_id, amount, deadline, status FROM holds WHERE id = ANY($1)"),
            tx.prepare_cached(TIERS_SQL),
            tx.prepare_cached(IDS_SQL),
            tx.prepare_cached(PLAN_SQL),
        )?;
        let p_keys: [&(dyn ToSql + Sync); 1] = [&keys];
        let p_accounts: [&(dyn ToSql + Sync); 2] = [&exts, &hold_ids];
        let p_named: [&(dyn ToSql + Sync); 1] = [&hold_ids];
        let p_ids: [&(dyn ToSql + Sync); 2] = [&holds_guess, &entries_guess];
        // The keys are read after the lock, like everything else: a command with one of them
        // that committed while we waited is seen (a replay), not decided again.
        // First, in the same round trip: the transaction begins, and its plans are made
        // without scans. Every statement of a batch finds its rows by key (the updates too, by
        // `id = ANY($1)`), so an index is always right; but a generic plan is made once per
        // connection, at a statement's first execution, and is kept while the tables grow:
        // made on a fresh database's near-empty tables, it scanned them on every batch.
        let (_, _, rows, key_rows, open_rows, named_rows, tier_rows, id_row) = tokio::try_join!(
            tx.batch_execute("BEGIN"),
            tx.query_one(&st_plan, &[]),
            tx.query(&st_lock, &p_accounts),
            async {
                if keys.is_empty() {
                    return Ok(Vec::new());
                }
                tx.query(&st_keys, &p_keys).await
            },
            tx.query(&st_open, &p_accounts),
            async {
                if hold_ids.is_empty() {
                    return Ok(Vec::new());
                }
                tx.query(&st_named, &p_named).await
            },
            tx.query(&st_tiers, &[]),
            tx.query_one(&st_ids, &p_ids),
        )?;
        let stored: HashMap<String, (i64, Vec<u8>)> = key_rows.into_iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect();
        let mut accounts: HashMap<i64, BatchAccount> = HashMap::new();
        let mut by_ext: HashMap<AccountId, i64> = HashMap::new();
        for r in &rows {
            let (id, ext, state) = account_from_row(r)?;
            by_ext.insert(ext.clone(), id);
            accounts.insert(id, BatchAccount { ext, state, holds: Vec::new(), dirty: false, hot: true });
        }
        for r in open_rows {
            let account: i64 = r.get(1);
            if let Some(a) = accounts.get_mut(&account) {
                a.holds.push(OpenHold { id: HoldId(r.get(0)), amount: r.get(2), deadline: r.get(3), cost_micros: r.get(4) });
            }
        }
        let mut named: HashMap<i64, (i64, HoldRecord)> = HashMap::new();
        for r in named_rows {
            let id: i64 = r.get(0);
            named.insert(id, (r.get(1), HoldRecord { id: HoldId(id), amount: r.get(2), deadline: r.get(3), status: HoldStatus::parse(r.get(4))? }));
        }
        let tiers = tiers_from_rows(&tier_rows)?;
        let tier_stamp: Vec<i64> = tier_rows.iter().map(|r| r.get(7)).collect();
        // The time is read after the lock wait.
        let now = to_millis(self.clock.now());
        Ok(Reads { stored, accounts, by_ext, named, tiers, tier_stamp, hold_ids: id_row.get(0), entry_ids: id_row.get(1), now })
    }

    /// Applies the batch to `reads` and writes it on `batch_tx`: inside the transaction the
    /// reads began if `locked`; otherwise `reads` came from the node's cache, and the statement
    /// is sent with its `BEGIN` and `COMMIT` and fails unless every account is still as cached.
    /// `Ok(None)` (only when not `locked`): declined, nothing sent. `Ok(Some(()))`: it
    /// committed and, right after the `COMMIT`, counted itself, sent its alerts and answered
    /// each command (in that order: a caller that has its answer sees the rest).
    async fn apply_batch(&self, jobs: &mut [Job], reads: Reads, mut batch_tx: BatchTx, locked: bool, cache: &mut NodeCache) -> Result<Option<()>> {
        let Reads { stored, mut accounts, by_ext, mut named, tiers, tier_stamp, hold_ids: read_hold_ids, entry_ids: read_entry_ids, now } = reads;
        let tx: &deadpool_postgres::ClientWrapper = batch_tx.client();

        let mut slots: Vec<Slot> = Vec::with_capacity(jobs.len());
        let mut batch_keys: HashMap<&str, (i64, usize)> = HashMap::new();
        let mut entries: Vec<PendingEntry> = Vec::new();
        let mut new_holds: Vec<(usize, i64, rules::NewHold)> = Vec::new();
        let mut closed: Vec<(i64, &'static str)> = Vec::new();
        let mut usages: Vec<(usize, Usage)> = Vec::new();
        let mut alerts: Vec<(i64, Alert)> = Vec::new();
        let mut temp_hold = 0i64;
        for (i, job) in jobs.iter().enumerate() {
            let cmd = &job.cmd;
            if let Some(key) = cmd.key() {
                if let Some((fp, stored_effect)) = stored.get(key.as_str()) {
                    let slot = if *fp != job.fp {
                        Slot::Done(Err(Error::IdempotencyConflict { key: key.to_string() }))
                    } else {
                        match outcome::from_bytes(stored_effect) {
                            Ok(effect) => Slot::Done(Ok(Ok(Committed { effect, replayed: true }))),
                            Err(e) => Slot::Done(Err(e)),
                        }
                    };
                    slots.push(slot);
                    continue;
                }
                if let Some((fp, first)) = batch_keys.get(key.as_str()) {
                    slots.push(if *fp != job.fp { Slot::Done(Err(Error::IdempotencyConflict { key: key.to_string() })) } else { Slot::Replay(*first) });
                    continue;
                }
            }
            let mut snap = Snapshot::default();
            let account_id = match (cmd.hold(), cmd.account()) {
                (Some(h), _) => named.get(&h.0).map(|(a, rec)| {
                    snap.hold = Some(*rec);
                    *a
                }),
                (None, Some(ext)) => by_ext.get(ext).copied(),
                (None, None) => None,
            };
            if let Some(id) = account_id {
                let a = accounts.get(&id).ok_or_else(|| Error::Invariant(format!("account {id} not locked by the batch")))?;
                snap.state = Some(a.state.clone());
                snap.open_holds = a.holds.clone();
            }
            let t = match rules::apply(&self.ledger, &tiers, &snap, cmd, now) {
                Err(e) => {
                    slots.push(Slot::Done(Err(e)));
                    continue;
                }
                Ok(Err(rejection)) => {
                    slots.push(Slot::Done(Ok(Err(rejection))));
                    continue;
                }
                Ok(Ok(t)) => t,
            };
            let id = account_id.ok_or_else(|| Error::Invariant("transition without an account".into()))?;
            let a = accounts.get_mut(&id).expect("checked above");
            for (hold, status) in &t.closed_holds {
                a.holds.retain(|h| h.id != *hold);
                closed.push((hold.0, status.as_str()));
                if let Some((_, rec)) = named.get_mut(&hold.0) {
                    rec.status = *status;
                }
            }
            if let Some(h) = &t.new_hold {
                // A placeholder until ids are allocated; nothing in the batch can name it.
                temp_hold -= 1;
                a.holds.push(OpenHold { id: HoldId(temp_hold), amount: h.amount, deadline: h.deadline, cost_micros: h.cost_micros });
                new_holds.push((i, id, h.clone()));
            }
            a.hot = a.hot && hot_columns_only(&a.state, &t.state);
            a.state = t.state;
            a.dirty = true;
            entries.extend(t.entries.into_iter().map(|entry| PendingEntry { job: i, account_id: id, entry }));
            if let Some(u) = t.usage {
                usages.push((i, u));
            }
            alerts.extend(t.alerts.into_iter().map(|al| (id, al)));
            if let Some(key) = cmd.key() {
                batch_keys.insert(key.as_str(), (job.fp, i));
            }
            slots.push(Slot::Applied(t.effect));
        }

        // Unlocked, the batch goes ahead only if it applied every command (a rejection or an
        // error may be the replay of a key the cache does not know).
        let dirty_accounts = accounts.values().filter(|a| a.dirty).count();
        if !locked && (dirty_accounts == 0 || slots.iter().any(|s| matches!(s, Slot::Done(_)))) {
            batch_tx.release();
            return Ok(None);
        }

        // Ids, in command order, so that ids follow the order of writes across accounts as
        // closely as a sequence can (exports page by id). Locked: allocated after the lock,
        // with the reads. Unlocked: from the node's block (the write checks that they lie above
        // every id written: see `IdBlock`), or allocated now (the write checks that they lie
        // above each account's last entry).
        let mut from_block = false;
        // The block's last ids: no row above them may have been written.
        let mut block_last: (Option<i64>, Option<i64>) = (None, None);
        let mut refill = false;
        let (mut h, mut e) = if locked {
            self.id_block().note(&read_hold_ids, &read_entry_ids);
            (read_hold_ids, read_entry_ids)
        } else {
            let mut ids = self.id_block();
            match ids.take(new_holds.len(), entries.len()) {
                Some((h, e)) => {
                    from_block = true;
                    block_last = (Some(ids.last.0), Some(ids.last.1));
                    // What is left would not serve two more batches like this one (the next
                    // may begin before this one lands): a new block, after the COMMIT (its ids
                    // lie above the ones this batch checks).
                    refill = ids.holds.len() < 2 * h.len() || ids.entries.len() < 2 * e.len();
                    (h, e)
                }
                None => {
                    // It allocates a new block after its COMMIT (same round trip), unless
                    // blocks are cooling down.
                    refill = ids.cool_down == 0;
                    (Vec::new(), Vec::new())
                }
            }
        };
        let (more_holds, more_entries) = (new_holds.len().saturating_sub(h.len()) as i64, entries.len().saturating_sub(e.len()) as i64);
        if more_holds > 0 || more_entries > 0 {
            let st_ids = tx.prepare_cached(IDS_SQL).await?;
            let r = tx.query_one(&st_ids, &[&more_holds, &more_entries]).await?;
            let (mh, me): (Vec<i64>, Vec<i64>) = (r.get(0), r.get(1));
            self.id_block().note(&mh, &me);
            h.extend(mh);
            e.extend(me);
        }
        // A locked batch's guess may exceed its needs: the rest, allocated last, is offered as
        // the node's block.
        let spare = (h.split_off(new_holds.len().min(h.len())), e.split_off(entries.len().min(e.len())));
        let (hold_id_list, entry_id_list) = (h, e);

        let mut hold_of_job: HashMap<usize, HoldId> = HashMap::new();
        for ((job, _, _), id) in new_holds.iter().zip(&hold_id_list) {
            hold_of_job.insert(*job, HoldId(*id));
        }
        let mut main_of_job: HashMap<usize, (EntryId, BucketAmounts, Option<HoldId>)> = HashMap::new();
        for (e, id) in entries.iter_mut().zip(&entry_id_list) {
            if e.entry.hold == Some(NEW_HOLD) {
                e.entry.hold = hold_of_job.get(&e.job).copied();
            }
            if e.entry.main {
                main_of_job.insert(e.job, (EntryId(*id), e.entry.delta, e.entry.hold));
            }
        }
        for (i, slot) in slots.iter_mut().enumerate() {
            if let Slot::Applied(effect) = slot {
                if let Some(h) = hold_of_job.get(&i) {
                    effect.set_hold(*h);
                }
                if let Some((entry, _, _)) = main_of_job.get(&i) {
                    effect.set_entry(*entry);
                }
            }
        }

        // The writes: one statement per table, sent together (pipelined).
        let holds_ins = {
            let acc: Vec<i64> = new_holds.iter().map(|h| h.1).collect();
            let amount: Vec<i64> = new_holds.iter().map(|h| h.2.amount).collect();
            let cost: Vec<i64> = new_holds.iter().map(|h| h.2.cost_micros).collect();
            let deadline: Vec<DateTime<Utc>> = new_holds.iter().map(|h| h.2.deadline).collect();
            let reference: Vec<String> = new_holds.iter().map(|h| h.2.reference.clone()).collect();
            (acc, amount, cost, deadline, reference)
        };
        let closed_ids: Vec<i64> = closed.iter().map(|c| c.0).collect();
        let closed_status: Vec<&str> = closed.iter().map(|c| c.1).collect();
        let e_acc: Vec<i64> = entries.iter().map(|e| e.account_id).collect();
        let e_kind: Vec<&str> = entries.iter().map(|e| e.entry.kind.as_str()).collect();
        let e_m: Vec<i64> = entries.iter().map(|e| e.entry.delta.monthly).collect();
        let e_r: Vec<i64> = entries.iter().map(|e| e.entry.delta.rollover).collect();
        let e_p: Vec<i64> = entries.iter().map(|e| e.entry.delta.purchased).collect();
        let e_h: Vec<i64> = entries.iter().map(|e| e.entry.held_delta).collect();
        let e_bal: Vec<i64> = entries.iter().map(|e| e.entry.balance_after).collect();
        let e_held: Vec<i64> = entries.iter().map(|e| e.entry.held_after).collect();
        let e_src: Vec<Option<&str>> = entries.iter().map(|e| e.entry.source.map(GrantSource::as_str)).collect();
        let e_hold: Vec<Option<i64>> = entries.iter().map(|e| e.entry.hold.map(|h| h.0)).collect();
        let e_ref: Vec<Option<i64>> = entries.iter().map(|e| e.entry.ref_entry.map(|r| r.0)).collect();
        let e_reference: Vec<&str> = entries.iter().map(|e| e.entry.reference.as_str()).collect();
        let e_exp: Vec<Option<DateTime<Utc>>> = entries.iter().map(|e| e.entry.rollover_expires_at).collect();
        // A charge's usage goes in its main entry's columns (migration V10).
        let mut usage_of_job: HashMap<usize, &Usage> = HashMap::new();
        for (job, u) in &usages {
            if !main_of_job.contains_key(job) {
                return Err(Error::Invariant("usage without a charge entry".into()));
            }
            usage_of_job.insert(*job, u);
        }
        let e_usage: Vec<UsageColumns> =
            entries.iter().map(|e| UsageColumns::of(if e.entry.main { usage_of_job.get(&e.job).copied() } else { None })).collect();
        let u_op: Vec<Option<&str>> = e_usage.iter().map(|u| u.operation).collect();
        let u_model: Vec<Option<&str>> = e_usage.iter().map(|u| u.model).collect();
        let u_tok: [Vec<Option<i64>>; 4] = std::array::from_fn(|k| e_usage.iter().map(|u| u.tokens[k]).collect());
        let u_cost: Vec<Option<i64>> = e_usage.iter().map(|u| u.cost_micros).collect();
        let a_acc: Vec<i64> = alerts.iter().map(|a| a.0).collect();
        let a_kind: Vec<&str> = alerts.iter().map(|a| alert_kind_str(a.1.kind)).collect();
        let a_month: Vec<NaiveDate> = alerts.iter().map(|a| a.1.month).collect();
        let a_cost: Vec<i64> = alerts.iter().map(|a| a.1.cost_micros).collect();
        let a_limit: Vec<i64> = alerts.iter().map(|a| a.1.limit_micros).collect();
        let a_at: Vec<DateTime<Utc>> = alerts.iter().map(|a| a.1.at).collect();
        let mut k_key = Vec::new();
        let mut k_fp = Vec::new();
        let mut k_outcome = Vec::new();
        for (i, slot) in slots.iter().enumerate() {
            if let (Slot::Applied(effect), Some(key)) = (slot, jobs[i].cmd.key()) {
                k_key.push(key.as_str());
                k_fp.push(jobs[i].fp);
                k_outcome.push(outcome::to_bytes(effect));
            }
        }
        // Each written account's row, derived once, in id order (the order the unlocked
        // update locks them in, as the locked path does).
        // Only the hot columns changed, on every account written: the narrower statements.
        let hot = accounts.values().filter(|a| a.dirty).all(|a| a.hot);
        let mut dirty: Vec<AccountRow> = accounts.iter().filter(|(_, a)| a.dirty).map(|(id, a)| AccountRow::new(*id, &a.state, now, !hot)).collect();
        dirty.sort_unstable_by_key(|r| r.id);
        // Two or more accounts: one statement that unpacks their rows from arrays.
        let columns = (dirty.len() > 1).then(|| if hot { Columns::Hot(HotColumns::new(&dirty)) } else { Columns::All(AccountColumns::new(&dirty)) });

        // Unlocked: each account must still be as cached (its row's version, `xmin`, and its
        // `updated_at` are what this node's last write of it left: any other write changes the
        // version, and the update then takes fewer rows than it must; the time guards against
        // a transaction id used again, after a restore or a wraparound), and the tiers as
        // cached. Ids from the block must lie above every id written so far (so a write that
        // ended before this one began, on this node or another, has lower ids); ids allocated now,
        // above each account's last entry. Either way they were taken before the batch's
        // `USAGE_LOCK`: they must lie above the usage roll-up's watermark.
        let mut stamps: (Vec<i64>, Vec<DateTime<Utc>>) = (Vec::new(), Vec::new());
        if !locked {
            for row in &dirty {
                let c = cache.accounts.get(&row.id).ok_or_else(|| Error::Invariant("unlocked batch on an account not cached".into()))?;
                stamps.0.push(c.xmin);
                stamps.1.push(c.written_at);
            }
        }
        let first_entry = entry_id_list.first().copied().unwrap_or(i64::MAX);
        let each_account: Vec<i64> = if from_block { Vec::new() } else { dirty.iter().map(|r| r.id).collect() };

        let (hacc, hamount, hcost, hdeadline, hreference) = &holds_ins;
        // The writes: one statement for the whole batch, a `WITH` part per table that has rows
        // to take, sent with the COMMIT (one round trip). The statement checks the rows each
        // part took against what the batch computed and fails on a difference, which rolls the
        // transaction back: the COMMIT behind it then ends nothing.
        let mut w = BatchWrite::default();
        if !locked {
            // The accounts' update comes first, so their rows are locked before any other row,
            // as on the locked path.
            match (dirty.as_slice(), &columns) {
                ([row], _) => {
                    let (sql, mut params) = if hot { (UPDATE_ACCOUNT_HOT_SQL, row.hot_params().to_vec()) } else { (UPDATE_ACCOUNT_SQL, row.params().to_vec()) };
                    let n = params.len();
                    params.push(&stamps.0[0]);
                    params.push(&stamps.1[0]);
                    w.part(&format!("{sql} AND xmin::text::bigint = ${} AND updated_at = ${}", n + 1, n + 2), params, 1);
                }
                (_, Some(c)) => {
                    // In id order, as every other batch locks accounts, so two batches (on any
                    // nodes) never wait on each other in a cycle; each only if it is at the
                    // cached version (checked again on the row's newest version when the update
                    // had to wait on another write).
                    let (sql, mut params) = c.statement(&now);
                    let n = params.len();
                    params.push(&stamps.0);
                    params.push(&stamps.1);
                    w.part(
                        &format!(
                            "{sql} AND accounts.xmin::text::bigint = (${}::bigint[])[u.n] AND accounts.updated_at = (${}::timestamptz[])[u.n]",
                            n + 1,
                            n + 2
                        ),
                        params,
                        dirty.len(),
                    );
                }
                _ => return Err(Error::Invariant("an unlocked batch without an account".into())),
            }
            w.check(
                "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM unnest($1::bigint[]) AS a(id) WHERE (SELECT max(id) FROM ledger_entries WHERE account_id = a.id) >= $2)
                   AND (SELECT COALESCE(array_agg(xmin::text::bigint ORDER BY name), '{}') FROM cost_tiers WHERE name >= '') = $3::bigint[]
                   AND ($4::bigint IS NULL OR COALESCE((SELECT max(id) FROM holds), 0) <= $4)
                   AND ($5::bigint IS NULL OR COALESCE((SELECT max(id) FROM ledger_entries), 0) <= $5)
                   AND (SELECT rolled_upto FROM usage_rollup WHERE id = 1) < $2",
                vec![&each_account, &first_entry, &tier_stamp, &block_last.0, &block_last.1],
            );
        }
        if !new_holds.is_empty() {
            w.part(
                "INSERT INTO holds (id, account_id, amount, cost_micros, deadline, status, reference, created_at)
             SELECT id, account_id, amount, cost_micros, deadline, 'open', reference, $7
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::timestamptz[], $6::text[]) AS u(id, account_id, amount, cost_micros, deadline, reference)",
                vec![&hold_id_list, hacc, hamount, hcost, hdeadline, hreference, &now],
                new_holds.len(),
            );
        }
        if !closed.is_empty() {
            w.part(
                "UPDATE holds SET status = u.status, closed_at = $3 FROM unnest($1::bigint[], $2::text[]) AS u(id, status)
             WHERE holds.id = u.id AND holds.id = ANY($1) AND holds.status = 'open'",
                vec![&closed_ids, &closed_status, &now],
                closed.len(),
            );
        }
        if !entries.is_empty() {
            w.part("INSERT INTO ledger_entries (id, account_id, at, kind, d_monthly, d_rollover, d_purchased, d_held, balance_after, held_after, source, hold_id, ref_entry, reference, rollover_expires_at,
                                        operation, model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_micros)
             SELECT id, account_id, $22, kind, m, r, p, h, bal, held, src, hold, ref, reference, exp, op, model, i, o, cr, cw, cost
             FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[],
                         $10::text[], $11::bigint[], $12::bigint[], $13::text[], $14::timestamptz[],
                         $15::text[], $16::text[], $17::bigint[], $18::bigint[], $19::bigint[], $20::bigint[], $21::bigint[])
                  AS u(id, account_id, kind, m, r, p, h, bal, held, src, hold, ref, reference, exp, op, model, i, o, cr, cw, cost)",
                vec![
                    &entry_id_list,
                    &e_acc,
                    &e_kind,
                    &e_m,
                    &e_r,
                    &e_p,
                    &e_h,
                    &e_bal,
                    &e_held,
                    &e_src,
                    &e_hold,
                    &e_ref,
                    &e_reference,
                    &e_exp,
                    &u_op,
                    &u_model,
                    &u_tok[0],
                    &u_tok[1],
                    &u_tok[2],
                    &u_tok[3],
                    &u_cost,
                    &now,
                ],
                entries.len(),
            );
        }
        if !k_key.is_empty() {
            w.part(
                "INSERT INTO idempotency (key, fingerprint, outcome, at) SELECT k, f, o, $4 FROM unnest($1::text[], $2::bigint[], $3::bytea[]) AS u(k, f, o)",
                vec![&k_key, &k_fp, &k_outcome, &now],
                k_key.len(),
            );
        }
        if !locked {
            // Written first, above.
        } else if let [row] = dirty.as_slice() {
            // One account (a lone command, a hot account): the plain statement costs the
            // server half what the one that unpacks arrays does.
            if hot {
                w.part(UPDATE_ACCOUNT_HOT_SQL, row.hot_params().to_vec(), 1);
            } else {
                w.part(UPDATE_ACCOUNT_SQL, row.params().to_vec(), 1);
            }
        } else if let Some(c) = &columns {
            let (sql, params) = c.statement(&now);
            w.part(sql, params, dirty.len());
        }
        if !alerts.is_empty() {
            // Not counted: an alert already sent this month is skipped (and not returned).
            w.returning(
                "INSERT INTO cost_alerts (account_id, kind, month, cost_micros, limit_micros, at)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::date[], $4::bigint[], $5::bigint[], $6::timestamptz[])
             ON CONFLICT (account_id, kind, month) DO NOTHING RETURNING account_id, kind, month",
                vec![&a_acc, &a_kind, &a_month, &a_cost, &a_limit, &a_at],
            );
        }
        let mut new_alerts: Vec<(i64, String, NaiveDate)> = Vec::new();
        // The transaction that wrote: the new rows' `xmin`.
        let mut xid: Option<i64> = None;
        if let Some((sql, params)) = w.statement() {
            let st = tx.prepare_cached(&sql).await?;
            let st_ids = if refill { Some(tx.prepare_cached(IDS_SQL).await?) } else { None };
            // (The locked path prepared it with its reads: found in the connection's cache.)
            let st_plan = tx.prepare_cached(PLAN_SQL).await?;
            let block_params: [&(dyn ToSql + Sync); 2] = [&BLOCK_IDS, &BLOCK_IDS];
            // After the COMMIT, in the same round trip: a new block, if this batch found none.
            // Its failure must not fail a batch that committed: the block is only not made.
            let new_block = async {
                Ok::<_, tokio_postgres::Error>(match &st_ids {
                    Some(st) => tx.query_one(st, &block_params).await.ok(),
                    None => None,
                })
            };
            let written = if locked {
                tokio::try_join!(tx.query_one(&st, &params), tx.batch_execute("COMMIT"), new_block).map(|r| (r.0, r.2))
            } else {
                // Sent together: one round trip. (The plans are made without scans, as above.)
                tokio::try_join!(tx.batch_execute("BEGIN"), tx.query_one(&st_plan, &[]), tx.query_one(&st, &params), tx.batch_execute("COMMIT"), new_block)
                    .map(|r| (r.2, r.4))
            };
            let (row, block_row) = match written {
                Ok(w) => w,
                Err(e) => {
                    if from_block {
                        // Perhaps ids above the block were written (or an account changed).
                        self.id_block().stale();
                    }
                    return Err(e.into());
                }
            };
            if from_block {
                self.stats.block_batches.fetch_add(1, Ordering::Relaxed);
            }
            {
                let mut ids = self.id_block();
                if from_block {
                    ids.served();
                }
                if locked {
                    ids.offer(spare.0, spare.1);
                }
                if let Some(r) = block_row {
                    ids.offer(r.get(0), r.get(1));
                }
            }
            xid = Some(row.get::<_, i64>(1) & 0xffff_ffff);
            if w.returning.is_some() {
                let (acc, kind, month): (Vec<i64>, Vec<String>, Vec<NaiveDate>) = (row.get(2), row.get(3), row.get(4));
                new_alerts = acc.into_iter().zip(kind).zip(month).map(|((a, k), m)| (a, k, m)).collect();
            }
            batch_tx.release();
        } else if locked {
            batch_tx.commit().await?;
        } else {
            return Err(Error::Invariant("an unlocked batch with nothing to write".into()));
        }
        // Committed: nothing below can fail. The callers are answered before the node updates
        // its cache, so they send their next commands meanwhile.
        if !locked {
            self.stats.unlocked_batches.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.batched_commands.fetch_add(jobs.len() as u64, Ordering::Relaxed);
        let fresh = new_alerts;
        let sent: Vec<(AccountId, Alert)> = alerts
            .into_iter()
            .filter(|(acc, a)| fresh.iter().any(|(fa, fk, fm)| fa == acc && fk == alert_kind_str(a.kind) && *fm == a.month))
            .filter_map(|(acc, a)| accounts.get(&acc).map(|x| (x.ext.clone(), a)))
            .collect();
        self.notify(&sent);
        let finals: Vec<Option<Effect>> = slots.iter().map(|s| if let Slot::Applied(e) = s { Some(e.clone()) } else { None }).collect();
        for (job, slot) in jobs.iter_mut().zip(slots) {
            job.answer(match slot {
                Slot::Done(r) => r,
                Slot::Applied(effect) => Ok(Ok(Committed { effect, replayed: false })),
                Slot::Replay(first) => match &finals[first] {
                    Some(effect) => Ok(Ok(Committed { effect: effect.clone(), replayed: true })),
                    None => Err(Error::Invariant("replay of a command that did not apply".into())),
                },
            });
        }

        // What the node now knows of the accounts it wrote (their holds with their ids).
        if let Some(xid) = xid {
            let real: HashMap<i64, i64> = hold_id_list.iter().enumerate().map(|(k, id)| (-(k as i64) - 1, *id)).collect();
            for (id, a) in accounts.iter().filter(|(_, a)| a.dirty) {
                let holds: Option<Vec<OpenHold>> = a
                    .holds
                    .iter()
                    .map(|h| if h.id.0 < 0 { real.get(&h.id.0).map(|id| OpenHold { id: HoldId(*id), ..h.clone() }) } else { Some(h.clone()) })
                    .collect();
                match holds {
                    Some(holds) => cache.put(*id, CachedAccount { ext: a.ext.clone(), state: a.state.clone(), holds, xmin: xid, written_at: now }),
                    // Cannot happen (every new hold got an id); not cached, to be safe.
                    None => cache.forget(&[*id]),
                }
            }
            if locked {
                cache.tiers = Some((tiers.clone(), tier_stamp.clone()));
            }
        }

        Ok(Some(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Commands are split between lanes only into batches of at least `MIN_SHARE`; commands on
    /// one account make one batch; a batch holds at most `MAX_BATCH`.
    #[test]
    fn a_batch_takes_its_share_but_not_fewer_than_min_share() {
        assert_eq!(MIN_SHARE, 16);
        // 32 callers on two lanes: two batches of 16; 20 callers: 16, not two of 10.
        assert_eq!(batch_share(32, 2, false), 16);
        assert_eq!(batch_share(20, 2, false), 16);
        assert_eq!(batch_share(5, 2, false), 16);
        // More: split evenly.
        assert_eq!(batch_share(64, 2, false), 32);
        assert_eq!(batch_share(100, 2, false), 50);
        assert_eq!(batch_share(101, 4, false), 26);
        assert_eq!(batch_share(40, 4, false), 16);
        assert_eq!(batch_share(300, 4, false), 75);
        // Never more than a batch holds.
        assert_eq!(batch_share(10_000, 2, false), MAX_BATCH);
        assert_eq!(batch_share(10_000, 1, true), MAX_BATCH);
        // One account: all of them, and at least one.
        assert_eq!(batch_share(3, 2, true), 3);
        assert_eq!(batch_share(0, 2, true), 1);
        assert_eq!(batch_share(7, 0, false), 16);
    }

    /// Every batch takes the usage roll-up's lock shared (the number is written out in the SQL).
    #[test]
    fn the_batch_statement_takes_the_usage_lock() {
        assert!(PLAN_SQL.contains(&format!("pg_advisory_xact_lock_shared({USAGE_LOCK})")), "{PLAN_SQL}");
    }

    /// A write takes the narrow statements only when nothing but the hot columns changed.
    #[test]
    fn only_a_change_of_hot_columns_is_hot() {
        let before = AccountState { purchased: 50, monthly: 10, ..AccountState::new(AccountKind::User) };
        let mut after = before.clone();
        after.purchased -= 7;
        after.monthly = 0;
        after.held = 3;
        after.cost.day = NaiveDate::from_ymd_opt(2026, 11, 24);
        after.cost.day_cost_micros = 9_600;
        after.cost.month = NaiveDate::from_ymd_opt(2026, 11, 1);
        after.cost.month_cost_micros = 9_600;
        after.cost.held_cost_micros = 100;
        assert!(hot_columns_only(&before, &after));
        let lot = Lot { amount: 5, expires_at: DateTime::from_timestamp(2_000_000_000, 0).unwrap() };
        let changes: [&dyn Fn(&mut AccountState); 8] = [
            &|s| s.rollover.push(lot),
            &|s| s.cost.requests_ms.push(1),
            &|s| s.cost.alerted.push(crate::cost::AlertKind::Threshold),
            &|s| {
                s.cost.throttle =
                    Some(crate::cost::Throttle { reason: crate::cost::ThrottleReason::Admin { by: "ops".into(), why: "test".into() }, since: lot.expires_at })
            },
            &|s| s.org_member = true,
            &|s| s.tier = Some("pro".into()),
            &|s| s.plan = Some(rules::PlanState { monthly_credits: 100, active: true, period_end: lot.expires_at, anchor_day: 1 }),
            &|s| s.kind = AccountKind::Organisation,
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut wide = after.clone();
            change(&mut wide);
            assert!(!hot_columns_only(&before, &wide), "change {i}");
        }
    }

    fn block() -> IdBlock {
        IdBlock { enabled: true, ..IdBlock::default() }
    }

    #[test]
    fn an_id_block_serves_only_contiguous_newest_ids() {
        let mut b = block();
        // Another session's id (13) fell between ours: not a block.
        b.offer(vec![1, 2], vec![10, 11, 12, 14]);
        assert_eq!(b.take(0, 1), None);
        // Contiguous and newest: served from the front.
        b.offer(vec![3, 4], vec![20, 21, 22]);
        assert_eq!(b.take(1, 2), Some((vec![3], vec![20, 21])));
        // Short: not served (and nothing taken).
        assert_eq!(b.take(0, 2), None);
        assert_eq!(b.take(1, 1), Some((vec![4], vec![22])));
        // Ids this node took elsewhere since: the block is no longer the newest.
        b.offer(vec![5, 6], vec![30, 31]);
        b.note(&[], &[32]);
        assert_eq!(b.take(0, 1), None);
        // Older ids than the top are never a block.
        b.offer(vec![5, 6], vec![25, 26]);
        assert_eq!(b.take(0, 1), None);
        // Stale: cools down for BLOCK_COOL_DOWN_FIRST takes, whatever is offered.
        b.offer(vec![7], vec![40, 41]);
        b.stale();
        b.offer(vec![8], vec![50, 51]);
        for _ in 0..BLOCK_COOL_DOWN_FIRST {
            assert_eq!(b.take(0, 1), None);
        }
        assert_eq!(b.take(0, 1), Some((vec![], vec![50])));
        // Stale again and again (two busy nodes): each cool-down twice the last, up to
        // BLOCK_COOL_DOWN; each block used halves the next.
        let mut next = 100;
        let mut cool_down_after_stale = |b: &mut IdBlock| {
            b.stale();
            next += 1;
            b.offer(vec![next], vec![next]);
            let mut cooled = 0;
            while b.take(0, 1).is_none() {
                cooled += 1;
                assert!(cooled <= BLOCK_COOL_DOWN, "cools down for good");
            }
            cooled
        };
        let mut want = 2 * BLOCK_COOL_DOWN_FIRST;
        for round in 0..6 {
            assert_eq!(cool_down_after_stale(&mut b), want, "round {round}");
            want = (want * 2).min(BLOCK_COOL_DOWN);
        }
        assert_eq!(want, BLOCK_COOL_DOWN);
        b.served();
        b.served();
        assert_eq!(cool_down_after_stale(&mut b), BLOCK_COOL_DOWN / 4);
        for _ in 0..8 {
            b.served();
        }
        assert_eq!(cool_down_after_stale(&mut b), BLOCK_COOL_DOWN_FIRST);
        // Turned off (a sequence caches ids): never a block.
        let mut off = IdBlock::default();
        off.offer(vec![1], vec![1, 2]);
        assert_eq!(off.take(0, 1), None);
    }
}
