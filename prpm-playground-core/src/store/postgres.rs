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

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};

use super::*;
use crate::clock::{SystemClock, to_millis};
use crate::cost::{Alert, AlertSink, CostState, TierLimits, TierTable};
use crate::ledger::rules::{self, ChargeRecord, HoldRecord, HoldStatus, NEW_HOLD, OpenHold, Snapshot};

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
        match e.as_db_error() {
            Some(db) => Error::Backend(format!("postgres: {} ({})", db.message(), db.code().code())),
            None => Error::Backend(format!("postgres: {e}")),
        }
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
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("PgOptions").field("pool_size", &self.pool_size).finish_non_exhaustive()
    }
}

impl PgOptions {
    pub fn new(url: impl Into<String>) -> Self {
        PgOptions { url: url.into(), pool_size: 16, ledger: LedgerConfig::default(), clock: Arc::new(SystemClock), alert_sink: None }
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
    pool: Pool,
    clock: Arc<dyn Clock>,
    ledger: LedgerConfig,
    sink: Option<Arc<dyn AlertSink>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

fn is_retryable(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(e.code(), Some(c) if *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
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
        let pg: tokio_postgres::Config = opts.url.parse().map_err(|e| Error::invalid("url", format!("{e}")))?;
        let mgr = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(mgr).max_size(opts.pool_size).build().map_err(|e| Error::Backend(format!("pool: {e}")))?;
        let store = PgStore { pool, clock: opts.clock, ledger: opts.ledger, sink: opts.alert_sink };
        let mut client = store.client().await?;
        migrate(&mut client).await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| Error::Backend(format!("postgres pool: {e}")))
    }

    /// One attempt of a command, in its own transaction.
    async fn attempt(&self, cmd: &Command, fp: i64) -> Result<(Outcome, Vec<(AccountId, Alert)>), TxError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now = to_millis(self.clock.now());
        if let Some(key) = cmd.key()
            && let Some(row) = tx.query_opt("SELECT fingerprint, outcome FROM idempotency WHERE key = $1", &[&key.as_str()]).await?
        {
            let stored: i64 = row.get(0);
            if stored != fp {
                return Err(TxError::Fail(Error::IdempotencyConflict { key: key.to_string() }));
            }
            let effect: Effect = serde_json::from_value(row.get(1)).map_err(|e| Error::Invariant(format!("stored outcome: {e}")))?;
            return Ok((Ok(Committed { effect, replayed: true }), Vec::new()));
        }
        if let Command::SetTier(c) = cmd {
            let warnings = c.limits.validate()?;
            write_tier(&tx, &c.limits).await?;
            let effect = Effect::TierSet { warnings };
            remember(&tx, cmd, &effect, fp, now).await?;
            tx.commit().await?;
            return Ok((Ok(Committed { effect, replayed: false }), Vec::new()));
        }
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
        let tiers = load_tiers(&tx).await?;
        let transition = match rules::apply(&self.ledger, &tiers, &snap, cmd, now)? {
            Ok(t) => t,
            // A rejection writes nothing.
            Err(rejection) => return Ok((Err(rejection), Vec::new())),
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
                "INSERT INTO ledger_entries (account_id, at, kind, d_monthly, d_rollover, d_purchased, d_held, balance_after, held_after, source, hold_id, ref_entry, reference, rollover_expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING id",
            )
            .await?;
        for e in &t.entries {
            let hold = e.hold.map(|h| if h == NEW_HOLD { new_hold.unwrap_or(h) } else { h });
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
        if let Some(u) = &t.usage {
            let (entry, delta, hold) = main_entry.ok_or_else(|| Error::Invariant("usage without a charge entry".into()))?;
            tx.execute(
                "INSERT INTO usage_records (entry_id, account_id, at, hold_id, operation, model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, credits, cost_micros)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                &[
                    &entry.0,
                    &id,
                    &now,
                    &hold.map(|h| h.0),
                    &u.operation,
                    &u.model,
                    &(u.tokens.input as i64),
                    &(u.tokens.output as i64),
                    &(u.tokens.cache_read as i64),
                    &(u.tokens.cache_write as i64),
                    &(-delta.total()),
                    &u.cost_micros,
                ],
            )
            .await?;
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

async fn remember(tx: &impl GenericClient, cmd: &Command, effect: &Effect, fp: i64, now: DateTime<Utc>) -> Result<(), TxError> {
    if let Some(key) = cmd.key() {
        let outcome = serde_json::to_value(effect).expect("effects serialize");
        tx.execute("INSERT INTO idempotency (key, fingerprint, outcome, at) VALUES ($1, $2, $3, $4)", &[&key.as_str(), &fp, &outcome, &now]).await?;
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

async fn write_account(tx: &impl GenericClient, id: i64, s: &AccountState, now: DateTime<Utc>) -> Result<(), TxError> {
    let c = &s.cost;
    let throttle = c.throttle.as_ref().map(|t| serde_json::to_value(t).expect("throttles serialize"));
    let lifts = c.throttle.as_ref().and_then(crate::cost::Throttle::lifts_at);
    let (pc, pa, pe, anchor) = match s.plan {
        Some(p) => (Some(p.monthly_credits), Some(p.active), Some(p.period_end), Some(p.anchor_day as i32)),
        None => (None, None, None, None),
    };
    let params: [&(dyn ToSql + Sync); 24] = [
        &id,
        &s.monthly,
        &s.rollover_total(),
        &s.purchased,
        &s.held,
        &lots_value(&s.rollover),
        &now,
        &c.day,
        &c.day_cost_micros,
        &c.month,
        &c.month_cost_micros,
        &c.held_cost_micros,
        &throttle,
        &lifts,
        &c.requests_ms,
        &(encode_alerted(&c.alerted) as i32),
        &s.org_member,
        &s.tier,
        &s.next_expiry().map(|l| l.expires_at),
        &pc,
        &pa,
        &pe,
        &anchor,
        &s.kind.as_str(),
    ];
    let n = tx
        .execute(
            "UPDATE accounts SET monthly = $2, rollover = $3, purchased = $4, held = $5, rollover_lots = $6, updated_at = $7,
                cost_day = $8, day_cost_micros = $9, cost_month = $10, month_cost_micros = $11, held_cost_micros = $12, throttle = $13,
                throttle_lifts = $14, requests = $15, alerted = $16, org_member = $17, tier_override = $18, next_expiry = $19,
                plan_credits = $20, plan_active = $21, period_end = $22, plan_anchor_day = $23
             WHERE id = $1 AND kind = $24",
            &params,
        )
        .await?;
    if n != 1 {
        return Err(TxError::Fail(Error::Invariant(format!("account {id} not found to update"))));
    }
    Ok(())
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

async fn load_tiers(c: &impl GenericClient) -> Result<TierTable, TxError> {
    let rows = c
        .query(
            "SELECT name, monthly_revenue_micros, monthly_cost_limit_micros, daily_cost_limit_micros, hourly_request_limit, alert_threshold_pct, throttle_on_exceed
             FROM cost_tiers ORDER BY name",
            &[],
        )
        .await?;
    let tiers = rows.iter().map(|r| TierLimits {
        name: r.get(0),
        monthly_revenue_micros: r.get(1),
        monthly_cost_limit_micros: r.get(2),
        daily_cost_limit_micros: r.get(3),
        hourly_request_limit: r.get::<_, Option<i32>>(4).map(|v| v as u32),
        alert_threshold_pct: r.get::<_, Option<i32>>(5).map(|v| v as u32),
        throttle_on_exceed: r.get(6),
    });
    Ok(TierTable::from_tiers(tiers).map_err(|e| Error::Invariant(format!("cost_tiers: {e}")))?)
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

fn day_start(d: NaiveDate) -> DateTime<Utc> {
    crate::cost::day_start(d)
}

#[async_trait]
impl Store for PgStore {
    async fn execute(&self, cmd: Command) -> Result<Outcome> {
        cmd.validate()?;
        let fp = fingerprint(&cmd);
        let mut last = None;
        for _ in 0..MAX_ATTEMPTS {
            match self.attempt(&cmd, fp).await {
                Ok((outcome, alerts)) => {
                    if let Some(sink) = &self.sink {
                        for (account, alert) in &alerts {
                            sink.alert(account, alert);
                        }
                    }
                    return Ok(outcome);
                }
                Err(TxError::Retry(e)) => last = Some(e),
                Err(TxError::Fail(e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Backend("postgres: gave up".into())))
    }

    async fn balance(&self, account: &AccountId) -> Result<BalanceView> {
        let mut client = self.client().await?;
        let tx = client.build_transaction().read_only(true).isolation_level(tokio_postgres::IsolationLevel::RepeatableRead).start().await?;
        let row = tx
            .query_opt(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE external_id = $1"), &[&account.as_str()])
            .await?
            .ok_or_else(|| Error::UnknownAccount(account.to_string()))?;
        let (id, _, state) = account_from_row(&row)?;
        let holds = load_open_holds(&tx, id).await.map_err(tx_err)?;
        tx.commit().await?;
        let (state, holds) = rules::view_at(&state, &holds, to_millis(self.clock.now()));
        Ok(BalanceView::from_state(account.clone(), &state, holds.len() as u32))
    }

    async fn history(&self, q: &HistoryQuery) -> Result<HistoryPage> {
        q.validate()?;
        let client = self.client().await?;
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

    async fn usage(&self, account: &AccountId, limit: u32) -> Result<Vec<UsageRow>> {
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(Error::invalid("limit", format!("{limit} is outside 1..={MAX_PAGE}")));
        }
        let client = self.client().await?;
        let id: i64 = client
            .query_opt("SELECT id FROM accounts WHERE external_id = $1", &[&account.as_str()])
            .await?
            .map(|r| r.get(0))
            .ok_or_else(|| Error::UnknownAccount(account.to_string()))?;
        let rows = client
            .query(
                "SELECT at, entry_id, hold_id, operation, model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, credits, cost_micros
                 FROM usage_records WHERE account_id = $1 ORDER BY entry_id DESC LIMIT $2",
                &[&id, &i64::from(limit)],
            )
            .await?;
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

    async fn due(&self, due: Due, after: Option<&AccountId>, limit: u32) -> Result<Vec<AccountId>> {
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(Error::invalid("limit", format!("{limit} is outside 1..={MAX_PAGE}")));
        }
        let now = to_millis(self.clock.now());
        let today = now.date_naive();
        let month = crate::cost::month_start(today);
        let after = after.map_or("", |a| a.as_str());
        let limit = i64::from(limit);
        let client = self.client().await?;
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

    async fn verify(&self) -> Result<VerifyReport> {
        let mut client = self.client().await?;
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
        tx.commit().await?;
        Ok(report)
    }

    async fn tiers(&self) -> Result<TierTable> {
        let client = self.client().await?;
        load_tiers(&client).await.map_err(tx_err)
    }

    async fn cost(&self, account: &AccountId) -> Result<CostView> {
        let client = self.client().await?;
        let tiers = load_tiers(&client).await.map_err(tx_err)?;
        let row = client
            .query_opt(&format!("SELECT {COST_COLUMNS} FROM accounts WHERE external_id = $1"), &[&account.as_str()])
            .await?
            .ok_or_else(|| Error::UnknownAccount(account.to_string()))?;
        cost_view_from_row(&row, &tiers, to_millis(self.clock.now()))
    }

    async fn cost_accounts(&self, filter: CostFilter, after: Option<&AccountId>, limit: u32) -> Result<Vec<CostView>> {
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(Error::invalid("limit", format!("{limit} is outside 1..={MAX_PAGE}")));
        }
        let now = to_millis(self.clock.now());
        let mut client = self.client().await?;
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

    async fn summary(&self) -> Result<crate::cost::Summary> {
        let now = to_millis(self.clock.now());
        let mut client = self.client().await?;
        let tx = client.build_transaction().read_only(true).isolation_level(tokio_postgres::IsolationLevel::RepeatableRead).start().await?;
        let tiers = load_tiers(&tx).await.map_err(tx_err)?;
        let rows = tx.query(&format!("SELECT {COST_COLUMNS} FROM accounts"), &[]).await?;
        let users = rows.iter().map(|r| cost_view_from_row(r, &tiers, now).map(|v| v.user_cost())).collect::<Result<Vec<_>>>()?;
        tx.commit().await?;
        crate::cost::summarize(&tiers, &users)
    }

    async fn alerts(&self, q: &AlertQuery) -> Result<Vec<StoredAlert>> {
        if !(1..=MAX_PAGE).contains(&q.limit) {
            return Err(Error::invalid("limit", format!("{} is outside 1..={MAX_PAGE}", q.limit)));
        }
        let client = self.client().await?;
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

    async fn daily_usage(&self, q: &DailyUsageQuery) -> Result<Vec<DailyUsage>> {
        q.validate()?;
        let mut client = self.client().await?;
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
        // The rollups plus the records not rolled up yet, grouped alike.
        let rows = tx
            .query(
                "SELECT day, SUM(runs)::bigint, SUM(credits)::bigint, SUM(i)::bigint, SUM(o)::bigint, SUM(cr)::bigint, SUM(cw)::bigint, SUM(cost)::bigint FROM (
                     SELECT day, runs, credits, input_tokens AS i, output_tokens AS o, cache_read_tokens AS cr, cache_write_tokens AS cw, cost_micros AS cost
                     FROM usage_daily WHERE day >= $1 AND day < $2 AND ($3::bigint IS NULL OR account_id = $3)
                     UNION ALL
                     SELECT (at AT TIME ZONE 'UTC')::date, 1, credits, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_micros
                     FROM usage_records WHERE NOT rolled_up AND at >= $4 AND at < $5 AND ($3::bigint IS NULL OR account_id = $3)
                 ) u GROUP BY day ORDER BY day",
                &[&q.from, &q.until, &account_id, &day_start(q.from), &day_start(q.until)],
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

    async fn refresh_analytics(&self) -> Result<AnalyticsReport> {
        let client = self.client().await?;
        // One statement: the records it marks are the ones it adds; a node running it at the
        // same moment waits on the row locks and then finds them marked.
        let row = client
            .query_one(
                "WITH r AS (
                     UPDATE usage_records SET rolled_up = TRUE WHERE NOT rolled_up
                     RETURNING account_id, (at AT TIME ZONE 'UTC')::date AS day, credits, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_micros
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
                 )
                 SELECT count(*) FROM r",
                &[],
            )
            .await?;
        Ok(AnalyticsReport { usage_records: row.get::<_, i64>(0) as u64 })
    }

    fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    fn config(&self) -> &LedgerConfig {
        &self.ledger
    }
}
