//! [`Analysis`] over PostgreSQL, on a small pool of its own whose sessions are read-only
//! (`default_transaction_read_only`): it can never write, whatever it runs.

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;

use super::*;
use crate::ledger::BucketAmounts;
use crate::session::{RunOutcome, SessionId};
use crate::store::{parse_kind, parse_source, stored};

/// Reads a prpm-playground PostgreSQL database for analysis. Cheap to share.
pub struct PgReader {
    pool: Pool,
}

impl std::fmt::Debug for PgReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("PgReader").finish_non_exhaustive()
    }
}

impl PgReader {
    /// Connects (`url` as [`crate::store::postgres::PgOptions::url`]) with `pool_size`
    /// read-only connections, and checks the database has our schema.
    pub async fn connect(url: &str, pool_size: usize) -> Result<PgReader> {
        let mut pg: tokio_postgres::Config = url.parse().map_err(|e| Error::InvalidInput { field: "url", reason: format!("{e}") })?;
        let options = format!("{} -c default_transaction_read_only=on", pg.get_options().unwrap_or_default());
        pg.options(options.trim());
        let mgr = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(mgr).max_size(pool_size.max(1)).build().map_err(|e| Error::Backend(format!("pool: {e}")))?;
        let reader = PgReader { pool };
        let client = reader.client().await?;
        let ours = client.query_one("SELECT to_regclass('ledger_entries') IS NOT NULL AND to_regclass('usage_records') IS NOT NULL", &[]).await?;
        if !ours.get::<_, bool>(0) {
            return Err(Error::NotOurDatabase("the database has no prpm-playground schema".into()));
        }
        Ok(reader)
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

    /// Runs a query, once more if the connection was lost on the way.
    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<tokio_postgres::Row>> {
        let mut tries = 0;
        loop {
            tries += 1;
            let r: Result<Vec<tokio_postgres::Row>> = async {
                let client = self.client().await?;
                let stmt = client.prepare_cached(sql).await?;
                Ok(client.query(&stmt, params).await?)
            }
            .await;
            match r {
                Err(Error::ConnectionLost(_)) if tries < 3 => continue,
                r => return r,
            }
        }
    }
}

fn tokens(r: &tokio_postgres::Row, first: usize) -> Result<TokenUsage> {
    let n = |i: usize| -> Result<u64> { count("tokens", r.get(first + i)) };
    Ok(TokenUsage { input: n(0)?, output: n(1)?, cache_read: n(2)?, cache_write: n(3)? })
}

fn account(filter: &Filter) -> Option<&str> {
    filter.account.as_ref().map(AccountId::as_str)
}

#[async_trait]
impl Analysis for PgReader {
    async fn usage_records(&self, filter: &Filter, after: Option<EntryId>, limit: u32) -> Result<Vec<UsageRecord>> {
        check_list(filter, limit)?;
        let rows = self
            .query(
                "SELECT u.entry_id, a.external_id, u.at, u.hold_id, u.operation, u.model,
                        u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens, u.credits, u.cost_micros
                 FROM usage_records u JOIN accounts a ON a.id = u.account_id
                 WHERE u.entry_id > $1 AND ($2::timestamptz IS NULL OR u.at >= $2) AND ($3::timestamptz IS NULL OR u.at < $3)
                   AND ($4::text IS NULL OR a.external_id = $4) AND ($5::text IS NULL OR u.model = $5)
                 ORDER BY u.entry_id LIMIT $6",
                &[&after.map_or(i64::MIN, |e| e.0), &filter.from, &filter.until, &account(filter), &filter.model, &i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(UsageRecord {
                    entry: EntryId(r.get(0)),
                    account: stored("account", AccountId::new(r.get::<_, String>(1)))?,
                    at: r.get(2),
                    hold: r.get::<_, Option<i64>>(3).map(HoldId),
                    operation: r.get(4),
                    model: r.get(5),
                    tokens: tokens(r, 6)?,
                    credits: r.get(10),
                    cost_micros: r.get(11),
                })
            })
            .collect()
    }

    async fn runs(&self, filter: &Filter, after: Option<&RunCursor>, limit: u32) -> Result<Vec<RunRecord>> {
        check_list(filter, limit)?;
        let (after_at, after_id) = after.map_or((None, ""), |(t, id)| (Some(*t), id.as_str()));
        let rows = self
            .query(
                "SELECT id, account, session_id, package_id, model, with_prompt, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                        credits, cost_micros, latency_ms, outcome, error, hold_id, at
                 FROM runs
                 WHERE ($1::timestamptz IS NULL OR at > $1 OR (at = $1 AND id COLLATE \"C\" > $2))
                   AND ($3::timestamptz IS NULL OR at >= $3) AND ($4::timestamptz IS NULL OR at < $4)
                   AND ($5::text IS NULL OR account = $5) AND ($6::text IS NULL OR model = $6)
                 ORDER BY at, id COLLATE \"C\" LIMIT $7",
                &[&after_at, &after_id, &filter.from, &filter.until, &account(filter), &filter.model, &i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(RunRecord {
                    id: stored("run id", RunId::parse(r.get::<_, &str>(0)))?,
                    account: stored("account", AccountId::new(r.get::<_, String>(1)))?,
                    session: r.get::<_, Option<&str>>(2).map(|id| stored("session id", SessionId::parse(id))).transpose()?,
                    package_id: r.get(3),
                    model: r.get(4),
                    with_prompt: r.get(5),
                    tokens: tokens(r, 6)?,
                    credits: r.get(10),
                    cost_micros: r.get(11),
                    latency_ms: count("latency_ms", r.get(12))?,
                    outcome: RunOutcome::parse(r.get::<_, &str>(13))?,
                    error: r.get(14),
                    hold: r.get::<_, Option<i64>>(15).map(HoldId),
                    at: r.get(16),
                })
            })
            .collect()
    }

    async fn entries(&self, filter: &Filter, kinds: &[EntryKind], after: Option<EntryId>, limit: u32) -> Result<Vec<Entry>> {
        check_entries(filter, limit)?;
        let kind_filter = if kinds.is_empty() { String::new() } else { format!("AND e.kind IN ({})", kinds_sql(kinds)) };
        let rows = self
            .query(
                &format!(
                    "SELECT e.id, a.external_id, e.at, e.kind, e.d_monthly, e.d_rollover, e.d_purchased, e.d_held, e.balance_after, e.held_after,
                            e.source, e.hold_id, e.ref_entry, e.reference, e.rollover_expires_at
                     FROM ledger_entries e JOIN accounts a ON a.id = e.account_id
                     WHERE e.id > $1 AND ($2::timestamptz IS NULL OR e.at >= $2) AND ($3::timestamptz IS NULL OR e.at < $3)
                       AND ($4::text IS NULL OR a.external_id = $4) {kind_filter}
                     ORDER BY e.id LIMIT $5"
                ),
                &[&after.map_or(i64::MIN, |e| e.0), &filter.from, &filter.until, &account(filter), &i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Entry {
                    id: EntryId(r.get(0)),
                    account: stored("account", AccountId::new(r.get::<_, String>(1)))?,
                    at: r.get(2),
                    kind: stored("entry kind", EntryKind::parse(r.get::<_, &str>(3)))?,
                    delta: BucketAmounts { monthly: r.get(4), rollover: r.get(5), purchased: r.get(6) },
                    held_delta: r.get(7),
                    balance_after: r.get(8),
                    held_after: r.get(9),
                    source: r.get::<_, Option<&str>>(10).map(parse_source).transpose()?,
                    hold: r.get::<_, Option<i64>>(11).map(HoldId),
                    ref_entry: r.get::<_, Option<i64>>(12).map(EntryId),
                    reference: r.get(13),
                    rollover_expires_at: r.get::<_, Option<DateTime<Utc>>>(14),
                })
            })
            .collect()
    }

    async fn daily_by_account(&self, filter: &Filter) -> Result<Vec<AccountDay>> {
        check_daily(filter)?;
        let rows = self
            .query(
                "SELECT (u.at AT TIME ZONE 'UTC')::date AS day, a.external_id, count(*)::bigint, sum(u.credits)::bigint, sum(u.input_tokens)::bigint,
                        sum(u.output_tokens)::bigint, sum(u.cache_read_tokens)::bigint, sum(u.cache_write_tokens)::bigint, sum(u.cost_micros)::bigint
                 FROM usage_records u JOIN accounts a ON a.id = u.account_id
                 WHERE u.at >= $1 AND u.at < $2 AND ($3::text IS NULL OR a.external_id = $3) AND ($4::text IS NULL OR u.model = $4)
                 GROUP BY day, a.external_id ORDER BY day, a.external_id COLLATE \"C\"",
                &[&filter.from, &filter.until, &account(filter), &filter.model],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AccountDay {
                    day: r.get::<_, NaiveDate>(0),
                    account: stored("account", AccountId::new(r.get::<_, String>(1)))?,
                    runs: count("runs", r.get(2))?,
                    credits: r.get(3),
                    tokens: tokens(r, 4)?,
                    cost_micros: r.get(8),
                })
            })
            .collect()
    }

    async fn accounts(&self, account: Option<&AccountId>, after: Option<&AccountId>, limit: u32) -> Result<Vec<AccountRow>> {
        check_limit(limit)?;
        let rows = self
            .query(
                "SELECT external_id, kind, monthly, rollover, purchased, held, plan_credits, plan_active, period_end, created_at
                 FROM accounts WHERE external_id COLLATE \"C\" > $1 AND ($2::text IS NULL OR external_id = $2)
                 ORDER BY external_id COLLATE \"C\" LIMIT $3",
                &[&after.map_or("", AccountId::as_str), &account.map(AccountId::as_str), &i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AccountRow {
                    account: stored("account", AccountId::new(r.get::<_, String>(0)))?,
                    kind: parse_kind(r.get::<_, &str>(1))?,
                    monthly: r.get(2),
                    rollover: r.get(3),
                    purchased: r.get(4),
                    held: r.get(5),
                    plan_credits: r.get(6),
                    plan_active: r.get(7),
                    period_end: r.get(8),
                    created_at: r.get(9),
                })
            })
            .collect()
    }
}
