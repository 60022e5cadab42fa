//! Read-only queries across accounts, for cost analysis (the Python bindings' tables).
//!
//! [`Store`](crate::Store) answers per account (a balance, a history page, the admin lists);
//! an analyst wants the usage log, the runs, the transaction log and the daily usage of every
//! account at once, filtered by time, account and model. [`Analysis`] is that read side, with a
//! reader of its own per backend that never writes: [`sqlite::SqliteReader`] opens the file
//! read-only, [`postgres::PgReader`] runs every transaction read-only. Lists are keyset
//! paginated (in pages of at most [`MAX_PAGE`] rows), so a table of millions of rows is read
//! in pages of bounded size.
//!
//! Money is integer micro-dollars (`_micros`) and credits are integers, as everywhere else.

pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ledger::{AccountId, AccountKind, Credits, EntryId, EntryKind, HoldId};
use crate::pricing::TokenUsage;
use crate::session::{RunId, RunRecord};
use crate::store::Entry;

/// Largest page of an [`Analysis`] list.
pub const MAX_PAGE: u32 = 100_000;
/// Longest time range of [`Analysis::daily_by_account`], in days.
pub const MAX_DAYS: i64 = 400;

/// Which rows a list returns. Times: `from` inclusive, `until` exclusive; `None` is open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub from: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only this account.
    pub account: Option<AccountId>,
    /// Only this model (usage records, runs, daily usage; the transaction log has no model).
    pub model: Option<String>,
}

impl Filter {
    pub fn validate(&self) -> Result<()> {
        if let (Some(f), Some(u)) = (self.from, self.until)
            && f > u
        {
            return Err(Error::InvalidInput { field: "from", reason: "is after until".into() });
        }
        if let Some(m) = &self.model
            && (m.is_empty() || m.len() > 128)
        {
            return Err(Error::InvalidInput { field: "model", reason: "must be 1..=128 bytes".into() });
        }
        Ok(())
    }

    /// The bounds in Unix milliseconds (open ends as the extremes).
    pub(crate) fn ms_range(&self) -> (i64, i64) {
        (self.from.map_or(i64::MIN, |t| t.timestamp_millis()), self.until.map_or(i64::MAX, |t| t.timestamp_millis()))
    }
}

fn check_limit(limit: u32) -> Result<()> {
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Error::InvalidInput { field: "limit", reason: format!("{limit} is outside 1..={MAX_PAGE}") });
    }
    Ok(())
}

/// One metered operation (what a settle, a spend with usage or a meter wrote).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// The log entry that charged (or metered) it; ids grow with time.
    pub entry: EntryId,
    pub account: AccountId,
    pub at: DateTime<Utc>,
    pub hold: Option<HoldId>,
    pub operation: String,
    pub model: String,
    pub tokens: TokenUsage,
    /// Credits charged (0 for a meter).
    pub credits: Credits,
    /// Provider cost in micro-dollars.
    pub cost_micros: i64,
}

/// Usage of one account on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountDay {
    pub day: NaiveDate,
    pub account: AccountId,
    /// Operations metered.
    pub runs: u64,
    pub credits: Credits,
    pub tokens: TokenUsage,
    pub cost_micros: i64,
}

/// An account's balances and plan as stored (the cost side is [`crate::store::CostView`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRow {
    pub account: AccountId,
    pub kind: AccountKind,
    pub monthly: Credits,
    pub rollover: Credits,
    pub purchased: Credits,
    pub held: Credits,
    /// The plan's monthly allocation, while the account has a plan.
    pub plan_credits: Option<Credits>,
    /// False once the plan was ended (it still runs to the end of its period).
    pub plan_active: Option<bool>,
    pub period_end: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// Where a page of runs starts: after this run (in `(at, id)` order).
pub type RunCursor = (DateTime<Utc>, RunId);

/// The read side for analysis. Every list is in a stable order and keyset paginated: pass the
/// last row's key as `after` for the next page; a page shorter than `limit` is the last.
#[async_trait]
pub trait Analysis: Send + Sync {
    /// Usage records matching `filter`, by entry id ascending, after `after`, at most `limit`
    /// (1..=[`MAX_PAGE`]).
    async fn usage_records(&self, filter: &Filter, after: Option<EntryId>, limit: u32) -> Result<Vec<UsageRecord>>;

    /// Playground runs matching `filter`, by `(at, id)` ascending, after `after`.
    async fn runs(&self, filter: &Filter, after: Option<&RunCursor>, limit: u32) -> Result<Vec<RunRecord>>;

    /// Transaction log entries matching `filter` (its model must be `None`) and of one of
    /// `kinds` (empty: all), by entry id ascending, after `after`.
    async fn entries(&self, filter: &Filter, kinds: &[EntryKind], after: Option<EntryId>, limit: u32) -> Result<Vec<Entry>>;

    /// Usage per account and UTC day in `filter`'s range (both ends required, at most
    /// [`MAX_DAYS`] apart), summed exactly from the usage log; by day, then account. Days
    /// without usage are left out.
    async fn daily_by_account(&self, filter: &Filter) -> Result<Vec<AccountDay>>;

    /// Accounts by id ascending, after `after` (only `account` when given).
    async fn accounts(&self, account: Option<&AccountId>, after: Option<&AccountId>, limit: u32) -> Result<Vec<AccountRow>>;
}

/// Checks what [`Analysis::daily_by_account`] needs of a filter.
pub(crate) fn check_daily(filter: &Filter) -> Result<()> {
    filter.validate()?;
    let (Some(from), Some(until)) = (filter.from, filter.until) else {
        return Err(Error::InvalidInput { field: "from", reason: "daily usage needs both ends of the range".into() });
    };
    let ms = (until - from).num_milliseconds();
    let days = ms / 86_400_000 + i64::from(ms % 86_400_000 > 0);
    if days > MAX_DAYS {
        return Err(Error::InvalidInput { field: "until", reason: format!("the range is {days} days; at most {MAX_DAYS}") });
    }
    Ok(())
}

/// Checks a list's filter and page size.
pub(crate) fn check_list(filter: &Filter, limit: u32) -> Result<()> {
    filter.validate()?;
    check_limit(limit)
}

/// Checks an entry list (no model filter: the log has none).
pub(crate) fn check_entries(filter: &Filter, limit: u32) -> Result<()> {
    check_list(filter, limit)?;
    if filter.model.is_some() {
        return Err(Error::InvalidInput { field: "model", reason: "the transaction log has no model".into() });
    }
    Ok(())
}

/// A count read from the database that must not be negative.
pub(crate) fn count(what: &str, v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::Invariant(format!("{what}: negative count {v}")))
}

/// The `IN (...)` list of entry kinds (their names are fixed identifiers, never user text).
pub(crate) fn kinds_sql(kinds: &[EntryKind]) -> String {
    kinds.iter().map(|k| format!("'{}'", k.as_str())).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests;
