//! [`Analysis`] over a SQLite file, on a connection of its own opened read-only
//! (`SQLITE_OPEN_READ_ONLY`): it can never write, whatever it runs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, params};

use super::*;
use crate::ledger::BucketAmounts;
use crate::session::{RunOutcome, SessionId};
use crate::store::sqlite::APPLICATION_ID;
use crate::store::{parse_kind, parse_source, stored};

const DAY_MS: i64 = 86_400_000;

/// Reads a prpm-playground SQLite file for analysis. Cheap to share; queries run one at a time
/// on a blocking thread.
pub struct SqliteReader {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteReader").field("path", &self.path).finish()
    }
}

impl SqliteReader {
    /// Opens an existing database file read-only. A missing file is [`Error::NotFound`]; a file
    /// that is not a prpm-playground database is [`Error::NotOurDatabase`].
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteReader> {
        let path = path.as_ref().to_path_buf();
        if !path.is_file() {
            return Err(Error::NotFound { what: "database file" });
        }
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let app: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(|e| Error::NotOurDatabase(format!("{}: {e}", path.display())))?;
        if app != APPLICATION_ID {
            return Err(Error::NotOurDatabase(format!("{}: application_id is {app:#x}", path.display())));
        }
        Ok(SqliteReader { conn: Arc::new(Mutex::new(conn)), path })
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&conn)
        })
        .await
        .map_err(|e| Error::Backend(format!("read task failed: {e}")))?
    }
}

fn at(ms: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| Error::Invariant(format!("time {ms} ms is out of range")))
}

fn tokens(r: &rusqlite::Row<'_>, first: usize) -> Result<TokenUsage> {
    let n = |i: usize| -> Result<u64> { count("tokens", r.get(first + i)?) };
    Ok(TokenUsage { input: n(0)?, output: n(1)?, cache_read: n(2)?, cache_write: n(3)? })
}

fn model(filter: &Filter) -> Option<&str> {
    filter.model.as_deref()
}

fn account(filter: &Filter) -> Option<&str> {
    filter.account.as_ref().map(AccountId::as_str)
}

#[async_trait]
impl Analysis for SqliteReader {
    async fn usage_records(&self, filter: &Filter, after: Option<EntryId>, limit: u32) -> Result<Vec<UsageRecord>> {
        check_list(filter, limit)?;
        let filter = filter.clone();
        self.read(move |conn| {
            let (from, until) = filter.ms_range();
            let mut stmt = conn.prepare_cached(
                "SELECT u.entry_id, a.external_id, u.at_ms, u.hold_id, u.operation, u.model,
                        u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens, u.credits, u.cost_micros
                 FROM usage_records u JOIN accounts a ON a.id = u.account_id
                 WHERE u.entry_id > ?1 AND u.at_ms >= ?2 AND u.at_ms < ?3 AND (?4 IS NULL OR a.external_id = ?4) AND (?5 IS NULL OR u.model = ?5)
                 ORDER BY u.entry_id LIMIT ?6",
            )?;
            let mut rows = stmt.query(params![after.map_or(i64::MIN, |e| e.0), from, until, account(&filter), model(&filter), limit])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push(UsageRecord {
                    entry: EntryId(r.get(0)?),
                    account: stored("account", AccountId::new(r.get::<_, String>(1)?))?,
                    at: at(r.get(2)?)?,
                    hold: r.get::<_, Option<i64>>(3)?.map(HoldId),
                    operation: r.get(4)?,
                    model: r.get(5)?,
                    tokens: tokens(r, 6)?,
                    credits: r.get(10)?,
                    cost_micros: r.get(11)?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn runs(&self, filter: &Filter, after: Option<&RunCursor>, limit: u32) -> Result<Vec<RunRecord>> {
        check_list(filter, limit)?;
        let filter = filter.clone();
        let (after_ms, after_id) = after.map_or((i64::MIN, String::new()), |(t, id)| (t.timestamp_millis(), id.as_str().to_owned()));
        self.read(move |conn| {
            let (from, until) = filter.ms_range();
            let mut stmt = conn.prepare_cached(
                "SELECT id, account, session_id, package_id, model, with_prompt, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                        credits, cost_micros, latency_ms, outcome, error, hold_id, at_ms
                 FROM runs
                 WHERE (at_ms > ?1 OR (at_ms = ?1 AND id > ?2)) AND at_ms >= ?3 AND at_ms < ?4
                   AND (?5 IS NULL OR account = ?5) AND (?6 IS NULL OR model = ?6)
                 ORDER BY at_ms, id LIMIT ?7",
            )?;
            let mut rows = stmt.query(params![after_ms, after_id, from, until, account(&filter), model(&filter), limit])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push(RunRecord {
                    id: stored("run id", RunId::parse(&r.get::<_, String>(0)?))?,
                    account: stored("account", AccountId::new(r.get::<_, String>(1)?))?,
                    session: r.get::<_, Option<String>>(2)?.map(|id| stored("session id", SessionId::parse(&id))).transpose()?,
                    package_id: r.get(3)?,
                    model: r.get(4)?,
                    with_prompt: r.get(5)?,
                    tokens: tokens(r, 6)?,
                    credits: r.get(10)?,
                    cost_micros: r.get(11)?,
                    latency_ms: count("latency_ms", r.get(12)?)?,
                    outcome: RunOutcome::parse(&r.get::<_, String>(13)?)?,
                    error: r.get(14)?,
                    hold: r.get::<_, Option<i64>>(15)?.map(HoldId),
                    at: at(r.get(16)?)?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn entries(&self, filter: &Filter, kinds: &[EntryKind], after: Option<EntryId>, limit: u32) -> Result<Vec<Entry>> {
        check_entries(filter, limit)?;
        let filter = filter.clone();
        let kind_filter = if kinds.is_empty() { String::new() } else { format!("AND e.kind IN ({})", kinds_sql(kinds)) };
        self.read(move |conn| {
            let (from, until) = filter.ms_range();
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT e.id, a.external_id, e.at_ms, e.kind, e.d_monthly, e.d_rollover, e.d_purchased, e.d_held, e.balance_after, e.held_after,
                        e.source, e.hold_id, e.ref_entry, e.reference, e.rollover_expires_ms
                 FROM ledger_entries e JOIN accounts a ON a.id = e.account_id
                 WHERE e.id > ?1 AND e.at_ms >= ?2 AND e.at_ms < ?3 AND (?4 IS NULL OR a.external_id = ?4) {kind_filter}
                 ORDER BY e.id LIMIT ?5"
            ))?;
            let mut rows = stmt.query(params![after.map_or(i64::MIN, |e| e.0), from, until, account(&filter), limit])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push(Entry {
                    id: EntryId(r.get(0)?),
                    account: stored("account", AccountId::new(r.get::<_, String>(1)?))?,
                    at: at(r.get(2)?)?,
                    kind: stored("entry kind", EntryKind::parse(&r.get::<_, String>(3)?))?,
                    delta: BucketAmounts { monthly: r.get(4)?, rollover: r.get(5)?, purchased: r.get(6)? },
                    held_delta: r.get(7)?,
                    balance_after: r.get(8)?,
                    held_after: r.get(9)?,
                    source: r.get::<_, Option<String>>(10)?.as_deref().map(parse_source).transpose()?,
                    hold: r.get::<_, Option<i64>>(11)?.map(HoldId),
                    ref_entry: r.get::<_, Option<i64>>(12)?.map(EntryId),
                    reference: r.get(13)?,
                    rollover_expires_at: r.get::<_, Option<i64>>(14)?.map(at).transpose()?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn daily_by_account(&self, filter: &Filter) -> Result<Vec<AccountDay>> {
        check_daily(filter)?;
        let filter = filter.clone();
        self.read(move |conn| {
            let (from, until) = filter.ms_range();
            let mut stmt = conn.prepare_cached(
                "SELECT (u.at_ms / ?1) * ?1 AS day, a.external_id, count(*), sum(u.credits), sum(u.input_tokens), sum(u.output_tokens),
                        sum(u.cache_read_tokens), sum(u.cache_write_tokens), sum(u.cost_micros)
                 FROM usage_records u JOIN accounts a ON a.id = u.account_id
                 WHERE u.at_ms >= ?2 AND u.at_ms < ?3 AND (?4 IS NULL OR a.external_id = ?4) AND (?5 IS NULL OR u.model = ?5)
                 GROUP BY day, a.external_id ORDER BY day, a.external_id",
            )?;
            let mut rows = stmt.query(params![DAY_MS, from, until, account(&filter), model(&filter)])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push(AccountDay {
                    day: at(r.get(0)?)?.date_naive(),
                    account: stored("account", AccountId::new(r.get::<_, String>(1)?))?,
                    runs: count("runs", r.get(2)?)?,
                    credits: r.get(3)?,
                    tokens: tokens(r, 4)?,
                    cost_micros: r.get(8)?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn accounts(&self, account: Option<&AccountId>, after: Option<&AccountId>, limit: u32) -> Result<Vec<AccountRow>> {
        check_limit(limit)?;
        let account = account.map(|a| a.as_str().to_owned());
        let after = after.map_or(String::new(), |a| a.as_str().to_owned());
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT external_id, kind, monthly, rollover, purchased, held, plan_credits, plan_active, period_end_ms, created_ms
                 FROM accounts WHERE external_id > ?1 AND (?2 IS NULL OR external_id = ?2) ORDER BY external_id LIMIT ?3",
            )?;
            let mut rows = stmt.query(params![after, account, limit])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push(AccountRow {
                    account: stored("account", AccountId::new(r.get::<_, String>(0)?))?,
                    kind: parse_kind(&r.get::<_, String>(1)?)?,
                    monthly: r.get(2)?,
                    rollover: r.get(3)?,
                    purchased: r.get(4)?,
                    held: r.get(5)?,
                    plan_credits: r.get(6)?,
                    plan_active: r.get(7)?,
                    period_end: r.get::<_, Option<i64>>(8)?.map(at).transpose()?,
                    created_at: at(r.get(9)?)?,
                });
            }
            Ok(out)
        })
        .await
    }
}
