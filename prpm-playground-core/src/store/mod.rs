//! The storage trait both backends implement, and the read-side types.
//!
//! Every mutation goes through [`Store::execute`], one [`Command`] at a time from the caller's
//! point of view. A backend is free to commit many concurrent commands in one transaction
//! (group commit: one fsync for many callers); each caller still gets its own exact outcome,
//! because each command is applied on its own (in its own savepoint) against the state the
//! previous commands of the batch left.

pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::ledger::*;

/// Largest page of history.
pub const MAX_PAGE: u32 = 1_000;

/// The balance view of one account at the store's current time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceView {
    pub account: AccountId,
    pub kind: AccountKind,
    pub monthly: Credits,
    pub rollover: Credits,
    pub purchased: Credits,
    /// monthly + rollover + purchased.
    pub total: Credits,
    /// Reserved by open holds.
    pub held: Credits,
    /// total - held.
    pub available: Credits,
    /// The next rollover credits to expire.
    pub next_expiry: Option<Lot>,
    pub open_holds: u32,
    pub plan: Option<PlanState>,
}

impl BalanceView {
    pub fn from_state(account: AccountId, state: &AccountState, open_holds: u32) -> Self {
        let b = state.balances();
        BalanceView {
            account,
            kind: state.kind,
            monthly: b.monthly,
            rollover: b.rollover,
            purchased: b.purchased,
            total: b.total(),
            held: b.held,
            available: b.available(),
            next_expiry: state.next_expiry(),
            open_holds,
            plan: state.plan,
        }
    }
}

/// One row of the append-only transaction log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub id: EntryId,
    pub account: AccountId,
    pub at: DateTime<Utc>,
    pub kind: EntryKind,
    pub delta: BucketAmounts,
    pub held_delta: Credits,
    pub balance_after: Credits,
    pub held_after: Credits,
    pub source: Option<GrantSource>,
    pub hold: Option<HoldId>,
    pub ref_entry: Option<EntryId>,
    pub reference: String,
    pub rollover_expires_at: Option<DateTime<Utc>>,
}

/// A history query: newest first, keyset-paginated by entry id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    pub account: AccountId,
    /// Only these kinds (empty: all).
    pub kinds: Vec<EntryKind>,
    /// Entries at or after this time.
    pub from: Option<DateTime<Utc>>,
    /// Entries before this time.
    pub until: Option<DateTime<Utc>>,
    /// Entries older than this id (the previous page's `next`).
    pub before: Option<EntryId>,
    /// 1..=1000.
    pub limit: u32,
}

impl HistoryQuery {
    pub fn new(account: AccountId) -> Self {
        HistoryQuery { account, kinds: Vec::new(), from: None, until: None, before: None, limit: 100 }
    }
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_PAGE).contains(&self.limit) {
            return Err(Error::invalid("limit", format!("{} is outside 1..={MAX_PAGE}", self.limit)));
        }
        if let (Some(f), Some(u)) = (self.from, self.until)
            && f > u
        {
            return Err(Error::invalid("from", "is after until"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryPage {
    pub entries: Vec<Entry>,
    /// Pass as `before` for the next page; `None` on the last page.
    pub next: Option<EntryId>,
}

/// What a maintenance job looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Accounts whose plan period has ended.
    Rollover,
    /// Accounts with a hold past its deadline.
    ExpiredHolds,
    /// Accounts with rollover credits past their expiry.
    ExpiredCredits,
}

/// One difference found by [`Store::verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discrepancy {
    pub account: AccountId,
    pub what: String,
    pub stored: i64,
    pub from_log: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub accounts: u64,
    pub entries: u64,
    pub discrepancies: Vec<Discrepancy>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.discrepancies.is_empty()
    }
}

/// A usage record as stored (what settle and spend write).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    pub account: AccountId,
    pub at: DateTime<Utc>,
    pub entry: EntryId,
    pub hold: Option<HoldId>,
    pub credits: Credits,
    pub usage: Usage,
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Applies one command atomically. A command with a key that was used before returns the
    /// first result (`replayed: true`) and writes nothing; the same key with a different
    /// command is [`Error::IdempotencyConflict`]. Rejections write nothing.
    async fn execute(&self, cmd: Command) -> Result<Outcome>;

    /// The account's balances at the store's current time.
    async fn balance(&self, account: &AccountId) -> Result<BalanceView>;

    /// One page of the account's transaction log, newest first.
    async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage>;

    /// Usage records of an account, newest first (at most `limit`, 1..=1000).
    async fn usage(&self, account: &AccountId, limit: u32) -> Result<Vec<UsageRow>>;

    /// Accounts (by id, ascending, after `after`) that a job has work for at the store's time.
    async fn due(&self, due: Due, after: Option<&AccountId>, limit: u32) -> Result<Vec<AccountId>>;

    /// Recomputes every balance (and held amount) from the log and reports each difference.
    async fn verify(&self) -> Result<VerifyReport>;

    /// The store's clock.
    fn clock(&self) -> Arc<dyn Clock>;

    /// The ledger rules the store applies.
    fn config(&self) -> &LedgerConfig;
}

/// Typed shortcuts over [`Store::execute`].
impl dyn Store + '_ {
    pub async fn create_account(&self, account: AccountId, kind: AccountKind, key: IdempotencyKey) -> Result<Outcome> {
        self.execute(Command::CreateAccount(CreateAccount { account, kind, key })).await
    }
    pub async fn grant(&self, g: Grant) -> Result<Outcome> {
        self.execute(Command::Grant(g)).await
    }
    pub async fn hold(&self, h: Hold) -> Result<Outcome> {
        self.execute(Command::Hold(h)).await
    }
    pub async fn settle(&self, s: Settle) -> Result<Outcome> {
        self.execute(Command::Settle(s)).await
    }
    pub async fn release(&self, hold: HoldId, key: IdempotencyKey) -> Result<Outcome> {
        self.execute(Command::Release(Release { hold, key })).await
    }
    pub async fn spend(&self, s: Spend) -> Result<Outcome> {
        self.execute(Command::Spend(s)).await
    }
    pub async fn refund(&self, r: Refund) -> Result<Outcome> {
        self.execute(Command::Refund(r)).await
    }
    pub async fn clawback(&self, c: Clawback) -> Result<Outcome> {
        self.execute(Command::Clawback(c)).await
    }
    pub async fn set_plan(&self, account: AccountId, plan: Option<PlanTerms>, key: IdempotencyKey) -> Result<Outcome> {
        self.execute(Command::SetPlan(SetPlan { account, plan, key })).await
    }
}
