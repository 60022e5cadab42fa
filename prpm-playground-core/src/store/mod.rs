//! The storage trait both backends implement, and the read-side types.
//!
//! Every mutation goes through [`Store::execute`], one [`Command`] at a time from the caller's
//! point of view. A backend is free to commit many concurrent commands in one transaction
//! (group commit: one fsync for many callers); each caller still gets its own exact outcome,
//! because each command is applied on its own (in its own savepoint) against the state the
//! previous commands of the batch left.

mod outcome;
pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::cost::{Alert, CostState, RiskLevel, Summary, Throttle, TierLimits, TierTable};
use crate::error::{Error, Result};
use crate::ledger::*;
use crate::pricing::TokenUsage;
use crate::purchase::{EventStatus, Purchase, StripeEventRecord, check_stripe_id};
use crate::session::{
    MAX_TURNS_PER_SESSION, NewSession, NewTurn, Package, RunRecord, Session, SessionId, SessionPage, SessionSummary, ShareToken, SharedSession,
};

/// Largest page of history.
pub const MAX_PAGE: u32 = 1_000;

/// A stored response to a request that carried an idempotency key (see
/// [`Store::remember_response`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyedResponse {
    pub account: AccountId,
    /// 1..=255 printable ASCII characters.
    pub key: String,
    /// What identifies the request (a hash of its method, path and body): the same key with
    /// another fingerprint is a different request.
    pub fingerprint: String,
    /// An HTTP status, 100..=599.
    pub status: u16,
    /// At most [`MAX_KEYED_BODY_BYTES`].
    pub body: String,
    pub at: DateTime<Utc>,
}

/// Largest response body stored for an idempotency key.
pub const MAX_KEYED_BODY_BYTES: usize = 1 << 20;

impl KeyedResponse {
    pub(crate) fn validate(&self) -> Result<()> {
        check_request_key(&self.key)?;
        if self.fingerprint.is_empty() || self.fingerprint.len() > 128 {
            return Err(Error::invalid("fingerprint", "must be 1..=128 bytes"));
        }
        if !(100..=599).contains(&self.status) {
            return Err(Error::invalid("status", format!("{} is not an HTTP status", self.status)));
        }
        if self.body.len() > MAX_KEYED_BODY_BYTES {
            return Err(Error::invalid("body", format!("more than {MAX_KEYED_BODY_BYTES} bytes")));
        }
        Ok(())
    }
}

/// An idempotency key as a client sends it: 1..=255 printable ASCII characters.
pub fn check_request_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid("idempotency_key", "must be 1 to 255 printable ASCII characters"));
    }
    Ok(())
}

/// Which backend a database URL names: PostgreSQL for what [`postgres::is_postgres_url`]
/// accepts (a `postgres://` / `postgresql://` URL or `key=value` pairs with a `dbname`), else a
/// SQLite file (`sqlite://path`, `sqlite:path` or a plain path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl DatabaseUrl {
    pub fn parse(url: &str) -> Result<Self> {
        let url = url.trim();
        if postgres::is_postgres_url(url) {
            return Ok(DatabaseUrl::Postgres(url.to_owned()));
        }
        let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
        if path.is_empty() {
            return Err(Error::invalid("database_url", "names no database"));
        }
        if path == ":memory:" {
            return Err(Error::invalid("database_url", "an in-memory database cannot be shared; name a file"));
        }
        Ok(DatabaseUrl::Sqlite(path.into()))
    }
}

/// Opens the store a database URL names (see [`DatabaseUrl`]) with the given clock and ledger
/// rules, applying pending migrations.
pub async fn open_url(url: &str, clock: Arc<dyn Clock>, ledger: LedgerConfig) -> Result<Arc<dyn Store>> {
    Ok(match DatabaseUrl::parse(url)? {
        DatabaseUrl::Sqlite(path) => Arc::new(sqlite::SqliteStore::open_with(sqlite::SqliteOptions::file(path).clock(clock).ledger(ledger))?),
        DatabaseUrl::Postgres(url) => Arc::new(postgres::PgStore::open(postgres::PgOptions::new(url).clock(clock).ledger(ledger)).await?),
    })
}

/// A run to settle and record in one step (see [`Store::settle_run`]).
#[derive(Debug, Clone)]
pub struct SettleRun {
    pub settle: Settle,
    /// The run to record once its hold is settled; the store sets its `credits` from the
    /// settlement.
    pub run: RunRecord,
    /// Appended to `run.session` (see [`Store::record_run`]).
    pub turns: Vec<NewTurn>,
    /// The session the run starts, created when the run is recorded: its id must be
    /// `run.session` and its owner `run.account`. A run that fails never creates it.
    pub new_session: Option<NewSession>,
}

impl SettleRun {
    pub(crate) fn validate(&self) -> Result<()> {
        Command::Settle(self.settle.clone()).validate()?;
        check_run(&self.run, &self.turns)?;
        if self.run.hold != Some(self.settle.hold) {
            return Err(Error::invalid("run.hold", "must be the hold that is settled"));
        }
        if let Some(ns) = &self.new_session {
            ns.validate()?;
            if self.run.session.as_ref() != Some(&ns.id) || ns.owner != self.run.account {
                return Err(Error::invalid("new_session", "must be the run's session, owned by the run's account"));
            }
        }
        Ok(())
    }
}

/// What [`Store::settle_run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledRun {
    /// The settlement's outcome. A rejection (unknown hold, expired, already released)
    /// recorded nothing.
    pub settled: Outcome,
    /// Where the run's turns went: `run.session`, or `None` when the run was recorded outside
    /// it (the session was deleted meanwhile or is full) or not recorded (a rejection).
    pub session: Option<SessionId>,
}

/// Records a run whose credits are settled, step by step: creates `new_session` (already there
/// on a retry: the record below tells), records the run with its turns in its session, and
/// outside it if that fails (the session is gone or full). Returns where the turns went.
pub(crate) async fn record_settled_run<S: Store + ?Sized>(
    store: &S,
    run: RunRecord,
    turns: &[NewTurn],
    new_session: Option<&NewSession>,
) -> Result<Option<SessionId>> {
    if let Some(ns) = new_session {
        let _ = store.create_session(ns).await;
    }
    if run.session.is_some() && store.record_run(&run, turns).await.is_ok() {
        return Ok(run.session);
    }
    store.record_run(&RunRecord { session: None, ..run }, &[]).await?;
    Ok(None)
}

/// The credits a settlement charged, if it is one.
pub(crate) fn settled_credits(outcome: &Outcome) -> Result<Option<Credits>> {
    match outcome {
        Ok(Committed { effect: Effect::Settled { charged, .. }, .. }) => Ok(Some(charged.total())),
        Ok(other) => Err(Error::Invariant(format!("a settle that gave {other:?}"))),
        Err(_) => Ok(None),
    }
}

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
        check_page(self.limit, MAX_PAGE)?;
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
    /// Accounts with cost counters of an earlier period or a cost throttle whose period ended
    /// (see [`CostState::reset_due`]).
    CostReset,
}

/// One account's cost control at the store's current time (counters rolled to it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CostView {
    pub account: AccountId,
    pub kind: AccountKind,
    pub tier: String,
    pub limits: TierLimits,
    /// A plan is running (it counts until its period ends, even once cancelled).
    pub plan_active: bool,
    pub org_member: bool,
    pub day_cost_micros: i64,
    pub month_cost_micros: i64,
    /// Worst-case cost of runs in flight.
    pub held_cost_micros: i64,
    pub throttle: Option<Throttle>,
    /// Admitted requests in the last hour (counted for tiers with an hourly limit).
    pub requests_last_hour: u32,
    pub risk: RiskLevel,
}

impl CostView {
    /// The view of an account with this state at `now`. An unknown tier is an error.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        account: AccountId,
        kind: AccountKind,
        plan_active: bool,
        org_member: bool,
        tier_override: Option<&str>,
        cost: &CostState,
        tiers: &TierTable,
        now: DateTime<Utc>,
    ) -> Result<CostView> {
        let tier = crate::ledger::rules::account_tier(kind, plan_active, org_member, tier_override);
        let limits = tiers.get(tier)?.clone();
        let mut c = cost.clone();
        c.roll(now);
        let risk = crate::cost::risk_level(&limits, &c, now);
        Ok(CostView {
            account,
            kind,
            tier: tier.to_owned(),
            limits,
            plan_active,
            org_member,
            day_cost_micros: c.day_cost_micros,
            month_cost_micros: c.month_cost_micros,
            held_cost_micros: c.held_cost_micros,
            throttle: c.throttle,
            requests_last_hour: c.requests_ms.len() as u32,
            risk,
        })
    }

    pub fn user_cost(&self) -> crate::cost::UserCost {
        crate::cost::UserCost {
            tier: self.tier.clone(),
            plan_active: self.plan_active,
            month_cost_micros: self.month_cost_micros,
            throttled: self.throttle.is_some(),
            risk: self.risk,
        }
    }
}

/// Which accounts an admin list shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CostFilter {
    All,
    /// Monthly cost above 75 % of the limit.
    AtRisk,
    Throttled,
    /// [`RiskLevel::HighRisk`].
    HighRisk,
}

impl CostFilter {
    pub fn matches(self, v: &CostView) -> bool {
        match self {
            CostFilter::All => true,
            CostFilter::AtRisk => {
                v.limits.monthly_cost_limit_micros.is_some_and(|l| i128::from(v.month_cost_micros) * 100 > i128::from(l) * i128::from(crate::cost::AT_RISK_PCT))
            }
            CostFilter::Throttled => v.throttle.is_some(),
            CostFilter::HighRisk => v.risk == RiskLevel::HighRisk,
        }
    }
}

/// A recorded alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAlert {
    pub id: i64,
    pub account: AccountId,
    pub alert: Alert,
}

/// Alerts in recording order, after `after` (an alert id), at most `limit` (1..=1000).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertQuery {
    pub account: Option<AccountId>,
    pub after: Option<i64>,
    pub limit: u32,
}

/// Usage per UTC day in `from..until` (at most [`MAX_DAYS`] days): of one account, or summed
/// over all accounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyUsageQuery {
    pub account: Option<AccountId>,
    pub from: chrono::NaiveDate,
    pub until: chrono::NaiveDate,
}

/// Longest range of a [`DailyUsageQuery`].
pub const MAX_DAYS: i64 = 400;

impl DailyUsageQuery {
    pub fn validate(&self) -> Result<()> {
        let days = (self.until - self.from).num_days();
        if !(1..=MAX_DAYS).contains(&days) {
            return Err(Error::invalid("until", format!("the range is {days} days; it must be 1..={MAX_DAYS}")));
        }
        Ok(())
    }
}

/// Usage of one UTC day (days without usage are left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DailyUsage {
    pub day: chrono::NaiveDate,
    /// Operations metered (settles, spends with usage, meters).
    pub runs: u64,
    pub credits: Credits,
    pub tokens: TokenUsage,
    pub cost_micros: i64,
}

/// What the analytics refresh did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnalyticsReport {
    /// Usage records rolled up into daily rows.
    pub usage_records: u64,
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

/// 64-bit FNV-1a of the command's canonical form (what a reused key is compared by).
pub(crate) fn fingerprint(cmd: &Command) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in cmd.fingerprint().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

const ALERT_BITS: [(crate::cost::AlertKind, i64); 2] = [(crate::cost::AlertKind::AtRisk, 1), (crate::cost::AlertKind::Threshold, 2)];

/// The alerts of the month as stored: bit 0 at risk, bit 1 threshold.
pub(crate) fn decode_alerted(bits: i64) -> Vec<crate::cost::AlertKind> {
    ALERT_BITS.iter().filter(|(_, b)| bits & b != 0).map(|(k, _)| *k).collect()
}

pub(crate) fn encode_alerted(v: &[crate::cost::AlertKind]) -> i64 {
    ALERT_BITS.iter().filter(|(k, _)| v.contains(k)).map(|(_, b)| b).sum()
}

pub(crate) fn alert_kind_str(k: crate::cost::AlertKind) -> &'static str {
    match k {
        crate::cost::AlertKind::AtRisk => "at_risk",
        crate::cost::AlertKind::Threshold => "threshold",
    }
}

pub(crate) fn parse_alert_kind(s: &str) -> Result<crate::cost::AlertKind> {
    match s {
        "at_risk" => Ok(crate::cost::AlertKind::AtRisk),
        "threshold" => Ok(crate::cost::AlertKind::Threshold),
        k => Err(Error::Invariant(format!("unknown alert kind {k:?}"))),
    }
}

pub(crate) fn parse_source(s: &str) -> Result<GrantSource> {
    Ok(match s {
        "plan" => GrantSource::Plan,
        "purchase" => GrantSource::Purchase,
        "bonus" => GrantSource::Bonus,
        "admin" => GrantSource::Admin,
        _ => return Err(Error::Invariant(format!("unknown grant source {s:?}"))),
    })
}

pub(crate) fn parse_kind(s: &str) -> Result<AccountKind> {
    match s {
        "user" => Ok(AccountKind::User),
        "organisation" => Ok(AccountKind::Organisation),
        k => Err(Error::Invariant(format!("unknown account kind {k:?}"))),
    }
}

/// Checks a page size: 1..=`max`.
pub(crate) fn check_page(limit: u32, max: u32) -> Result<()> {
    if !(1..=max).contains(&limit) {
        return Err(Error::invalid("limit", format!("{limit} is outside 1..={max}")));
    }
    Ok(())
}

/// Checks a page size of sessions or runs.
pub(crate) fn check_session_page(limit: u32) -> Result<()> {
    check_page(limit, crate::session::MAX_PAGE)
}

/// The cursor that follows a session in its owner's list: `<created ms>.<id>`.
pub(crate) fn session_cursor(s: &SessionSummary) -> String {
    format!("{}.{}", s.created_at.timestamp_millis(), s.id)
}

/// Reads a [`session_cursor`]: the created time and id the next page starts below.
pub(crate) fn parse_session_cursor(cursor: &str) -> Result<(DateTime<Utc>, SessionId)> {
    let bad = || Error::invalid("cursor", "not a cursor of this list");
    let (ms, id) = cursor.split_once('.').ok_or_else(bad)?;
    let ms: i64 = ms.parse().map_err(|_| bad())?;
    let created = DateTime::from_timestamp_millis(ms).ok_or_else(bad)?;
    Ok((created, SessionId::parse(id).map_err(|_| bad())?))
}

/// Validates a run and the turns it would append (the turns only when there is a session to
/// append them to).
pub(crate) fn check_run(run: &RunRecord, turns: &[NewTurn]) -> Result<()> {
    run.validate()?;
    if i64::try_from(run.latency_ms).is_err() {
        return Err(Error::invalid("latency_ms", format!("{} is too large", run.latency_ms)));
    }
    if run.session.is_some() {
        if turns.len() > MAX_TURNS_PER_SESSION as usize {
            return Err(Error::invalid("turns", format!("{} turns; a session holds at most {MAX_TURNS_PER_SESSION}", turns.len())));
        }
        for t in turns {
            t.validate()?;
        }
    }
    Ok(())
}

/// The error of an append that would take a session past [`MAX_TURNS_PER_SESSION`], if it does.
pub(crate) fn check_turn_limit(stored: u32, appending: usize) -> Result<()> {
    if stored as usize + appending > MAX_TURNS_PER_SESSION as usize {
        return Err(Error::invalid("turns", format!("the session has {stored} turns; {appending} more would pass {MAX_TURNS_PER_SESSION}")));
    }
    Ok(())
}

/// A stored id that does not parse: a broken row, not bad input.
pub(crate) fn stored<T>(what: &str, r: Result<T>) -> Result<T> {
    r.map_err(|e| Error::Invariant(format!("stored {what}: {e}")))
}

/// Checks a page size of purchases or Stripe events (1..=[`MAX_PAGE`]).
pub(crate) fn check_billing_page(limit: u32) -> Result<()> {
    check_page(limit, MAX_PAGE)
}

/// Checks a purchase id before it is looked up (the rule [`Purchase::validate`] applies).
pub(crate) fn check_purchase_id(id: &str) -> Result<()> {
    check_stripe_id(id).map_err(|e| match e {
        Error::InvalidInput { reason, .. } => Error::invalid("purchase_id", reason),
        e => e,
    })
}

/// Validates a Stripe event before it is stored. A NUL character is refused here too (the
/// payload is otherwise free text): PostgreSQL's text cannot hold one, and both stores answer
/// alike.
pub(crate) fn check_stripe_event(e: &StripeEventRecord) -> Result<()> {
    e.validate()?;
    if e.payload.contains('\0') {
        return Err(Error::invalid("payload", "contains a NUL character"));
    }
    Ok(())
}

/// Checks the credits [`Store::add_debt`] adds (either sign, at most
/// [`MAX_CREDITS_PER_REQUEST`] either way) and its key.
pub(crate) fn check_debt_change(credits: i64, key: &str) -> Result<()> {
    if credits.unsigned_abs() > MAX_CREDITS_PER_REQUEST.unsigned_abs() {
        return Err(Error::invalid("credits", format!("{credits} is outside -{MAX_CREDITS_PER_REQUEST}..={MAX_CREDITS_PER_REQUEST}")));
    }
    IdempotencyKey::new(key)?;
    Ok(())
}

/// What [`Store::add_debt`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebtChange {
    /// The change made after the clamps (a repayment larger than the debt applies the debt).
    pub applied: i64,
    /// The debt right after this change.
    pub debt_after: i64,
    /// The key was used before: nothing was written, this is what the first call did.
    pub replayed: bool,
}

/// A stored debt change under `key`, replayed: the first call's result if it asked for the
/// same change to the same account, else [`Error::IdempotencyConflict`].
pub(crate) fn replay_debt_change(key: &str, account: &AccountId, credits: i64, stored: (String, i64, i64, i64)) -> Result<DebtChange> {
    let (stored_account, requested, applied, debt_after) = stored;
    if stored_account != account.as_str() || requested != credits {
        return Err(Error::IdempotencyConflict { key: key.to_owned() });
    }
    Ok(DebtChange { applied, debt_after, replayed: true })
}

/// [`Error::InvalidInput`] on the first immutable field of `p` that differs from the stored
/// purchase's.
pub(crate) fn check_immutable(stored: &Purchase, p: &Purchase) -> Result<()> {
    let changed = [
        ("account", stored.account != p.account),
        ("kind", stored.kind != p.kind),
        ("product", stored.product != p.product),
        ("credits", stored.credits != p.credits),
        ("amount_cents", stored.amount_cents != p.amount_cents),
        ("currency", stored.currency != p.currency),
    ];
    match changed.into_iter().find(|(_, c)| *c) {
        Some((field, _)) => Err(Error::invalid(field, "cannot change once the purchase is created")),
        None => Ok(()),
    }
}

/// The error of a purchase write that broke a unique index, from the index or constraint the
/// backend names: another purchase has this id, checkout session or payment intent.
pub(crate) fn purchase_conflict(what: &str) -> Error {
    if what.contains("checkout_session") {
        Error::invalid("checkout_session", "another purchase has this checkout session")
    } else if what.contains("payment_intent") {
        Error::invalid("payment_intent", "another purchase has this payment intent")
    } else {
        Error::invalid("purchase_id", "a purchase with this id exists")
    }
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
    async fn usage(&self, account: &AccountId, limit: u32) -> Result<Vec<UsageRow>> {
        self.usage_before(account, None, limit).await
    }

    /// Usage records of an account older than the log entry `before` (all when `None`), newest
    /// first, at most `limit` (1..=1000): pass the last row's `entry` to read the next page.
    async fn usage_before(&self, account: &AccountId, before: Option<EntryId>, limit: u32) -> Result<Vec<UsageRow>>;

    /// Accounts (by id, ascending, after `after`) that a job has work for at the store's time.
    async fn due(&self, due: Due, after: Option<&AccountId>, limit: u32) -> Result<Vec<AccountId>>;

    /// Recomputes every balance (and held amount) from the log and reports each difference.
    async fn verify(&self) -> Result<VerifyReport>;

    /// The tier table (`cost_limits_config`); change it with [`Command::SetTier`].
    async fn tiers(&self) -> Result<TierTable>;

    /// One account's cost control at the store's time.
    async fn cost(&self, account: &AccountId) -> Result<CostView>;

    /// Accounts (by id, ascending, after `after`) that match `filter`, at most `limit`
    /// (1..=1000). Scans the accounts table.
    async fn cost_accounts(&self, filter: CostFilter, after: Option<&AccountId>, limit: u32) -> Result<Vec<CostView>>;

    /// The admin summary of the current month (see [`crate::cost::summarize`]), from the
    /// per-account counters: it never reads the usage log.
    async fn summary(&self) -> Result<Summary>;

    /// Recorded alerts, oldest first.
    async fn alerts(&self, query: &AlertQuery) -> Result<Vec<StoredAlert>>;

    /// Usage per day, from the daily rollups plus the records not rolled up yet (exact).
    async fn daily_usage(&self, query: &DailyUsageQuery) -> Result<Vec<DailyUsage>>;

    /// Rolls every usage record not rolled up yet into the daily rollups.
    async fn refresh_analytics(&self) -> Result<AnalyticsReport>;

    /// Adds or replaces a package (validated first; bad input changes nothing).
    async fn put_package(&self, p: &Package) -> Result<()>;

    async fn package(&self, id: &str) -> Result<Option<Package>>;

    /// Creates a session (validated) with no turns, not shared, created and updated at the
    /// store's time. A duplicate id is [`Error::InvalidInput`] on `session_id`.
    async fn create_session(&self, s: &NewSession) -> Result<SessionSummary>;

    /// The session with its turns (ordered by seq) if it exists and belongs to `owner`;
    /// otherwise `None`.
    async fn session(&self, owner: &AccountId, id: &SessionId) -> Result<Option<Session>>;

    /// The owner's sessions, newest first (created_at desc, then id desc), `limit` in
    /// 1..=[`crate::session::MAX_PAGE`]; `cursor` is the `next` of the previous page (opaque; a
    /// malformed one is [`Error::InvalidInput`]).
    async fn sessions(&self, owner: &AccountId, cursor: Option<&str>, limit: u32) -> Result<SessionPage>;

    /// Deletes the session and its turns (its runs stay: they are the billing record). `false`
    /// if there is no such session of `owner`.
    async fn delete_session(&self, owner: &AccountId, id: &SessionId) -> Result<bool>;

    /// Records a run (validated) and, in the same transaction, appends `turns` to `run.session`
    /// (when it is `Some` and `turns` is not empty; without a session the turns are ignored):
    /// seq continues from the session's last turn, each appended turn has `run_id =
    /// Some(run.id)` and the store's time, and the session's `updated_at` and turn count move.
    ///
    /// A session that does not exist or does not belong to `run.account` is
    /// [`Error::NotFound`] (`"session"`); appending past [`MAX_TURNS_PER_SESSION`] is
    /// [`Error::InvalidInput`]; both write nothing. Idempotent by run id: a run whose id is
    /// stored already writes nothing and returns `Ok(false)` (whatever its session has become);
    /// a new run returns `Ok(true)`. `run.at` is kept to the millisecond.
    async fn record_run(&self, run: &RunRecord, turns: &[NewTurn]) -> Result<bool>;

    /// Settles the run's hold and, once settled (or replayed), records the run with the
    /// credits charged: creates `new_session`, then records as [`Store::record_run`] does; if
    /// the session is gone or full, the run is recorded outside it (the credits are charged
    /// whatever happened to the session). A backend may do all of it in one transaction (the
    /// SQLite store does: one commit per run); this default does it step by step, each step
    /// idempotent (the settle by its key, the run by its id), so a retry completes it.
    async fn settle_run(&self, r: SettleRun) -> Result<SettledRun> {
        r.validate()?;
        let settled = self.execute(Command::Settle(r.settle)).await?;
        let Some(credits) = settled_credits(&settled)? else {
            return Ok(SettledRun { settled, session: None });
        };
        let session = record_settled_run(self, RunRecord { credits, ..r.run }, &r.turns, r.new_session.as_ref()).await?;
        Ok(SettledRun { settled, session })
    }

    /// The account's runs, newest first (at desc, then id desc), `limit` in
    /// 1..=[`crate::session::MAX_PAGE`].
    async fn runs(&self, account: &AccountId, limit: u32) -> Result<Vec<RunRecord>>;

    /// Sets the session's share token, replacing any earlier one (which then reads nothing).
    /// `false` if there is no such session of `owner`. A token another session has is
    /// [`Error::InvalidInput`] on `share_token`.
    async fn share_session(&self, owner: &AccountId, id: &SessionId, token: &ShareToken) -> Result<bool>;

    /// Removes the share token. `false` if there is no such session of `owner`, or it is not
    /// shared.
    async fn revoke_share(&self, owner: &AccountId, id: &SessionId) -> Result<bool>;

    /// The shared view (the conversation only) of the session with this token; `None` if no
    /// session has it.
    async fn shared_session(&self, token: &ShareToken) -> Result<Option<SharedSession>>;

    /// Inserts a new purchase (validated) with version 1, created and updated at the store's
    /// time (to the millisecond; the caller's `version` and times are ignored). A duplicate id,
    /// or a checkout_session / payment_intent already used by another purchase, is
    /// [`Error::InvalidInput`] (on `purchase_id`, `checkout_session` or `payment_intent`) and
    /// writes nothing.
    async fn create_purchase(&self, p: &Purchase) -> Result<Purchase>;

    /// The purchase with this id. An id no purchase can have (see [`Purchase::validate`]) is
    /// [`Error::InvalidInput`].
    async fn purchase(&self, id: &str) -> Result<Option<Purchase>>;

    /// The purchase whose checkout_session OR payment_intent is `stripe_id` (index lookups; if
    /// one purchase has it as its checkout session and another as its payment intent, the one
    /// with the checkout session). `stripe_id` is checked with [`check_stripe_id`].
    async fn purchase_by_stripe_id(&self, stripe_id: &str) -> Result<Option<Purchase>>;

    /// Compare-and-set: if the stored version equals `p.version`, writes every mutable field of
    /// `p` (status, checkout_session, payment_intent, customer, credited, refunded_cents,
    /// credits_reversed) with version = p.version + 1 and updated_at = now, and returns
    /// `Ok(Some(saved))` (created_at as stored); if the stored version differs returns
    /// `Ok(None)` and writes nothing.
    ///
    /// id, account, kind, product, credits, amount_cents, currency are immutable (a change is
    /// [`Error::InvalidInput`] on that field, whatever the version). Unknown id is
    /// [`Error::NotFound`] (`"purchase"`). Validated first; a checkout session or payment
    /// intent another purchase has is [`Error::InvalidInput`] as in [`Store::create_purchase`].
    async fn save_purchase(&self, p: &Purchase) -> Result<Option<Purchase>>;

    /// All purchases ordered by id (byte order), after `after` (exclusive), `limit` in
    /// 1..=[`MAX_PAGE`] (else [`Error::InvalidInput`]).
    async fn purchases(&self, after: Option<&str>, limit: u32) -> Result<Vec<Purchase>>;

    /// Inserts the event (validated; received at the store's time, to the millisecond, with the
    /// caller's status and account) if its id is new and returns `true`; an id already stored
    /// returns `false` and changes nothing.
    async fn record_stripe_event(&self, e: &StripeEventRecord) -> Result<bool>;

    /// Sets an event's status (and account when `Some`; `None` keeps the stored one). Unknown
    /// id: [`Error::NotFound`] (`"stripe event"`).
    async fn set_stripe_event_status(&self, id: &str, status: EventStatus, account: Option<&AccountId>) -> Result<()>;

    async fn stripe_event(&self, id: &str) -> Result<Option<StripeEventRecord>>;

    /// Events with that status (all when `None`), oldest first (received_at, then id), `limit`
    /// in 1..=[`MAX_PAGE`].
    async fn stripe_events(&self, status: Option<EventStatus>, limit: u32) -> Result<Vec<StripeEventRecord>>;

    /// Events about one Stripe object (their `object_ref`) with that status, newest first
    /// (Stripe's `created`, then id, descending), `limit` in 1..=[`MAX_PAGE`]. An index lookup:
    /// never a scan of the other events.
    async fn stripe_events_about(&self, object_ref: &str, status: EventStatus, limit: u32) -> Result<Vec<StripeEventRecord>>;

    /// Maps a Stripe customer id to an account (insert or replace).
    async fn link_customer(&self, customer: &str, account: &AccountId) -> Result<()>;

    async fn customer_account(&self, customer: &str) -> Result<Option<AccountId>>;

    /// Atomically adds `credits` (may be negative, to repay) to the account's credit debt,
    /// never below 0 nor above [`MAX_BUCKET_CREDITS`], once per `key` (an idempotency key's
    /// syntax): a repeat of the key writes nothing and returns the first call's result; the
    /// same key with another account or amount is [`Error::IdempotencyConflict`].
    /// |credits| > [`MAX_CREDITS_PER_REQUEST`] is [`Error::InvalidInput`].
    async fn add_debt(&self, account: &AccountId, credits: i64, key: &str) -> Result<DebtChange>;

    /// The account's credit debt (0 if it never had one).
    async fn debt(&self, account: &AccountId) -> Result<i64>;

    /// The response stored for `account`'s idempotency key, if any.
    async fn keyed_response(&self, account: &AccountId, key: &str) -> Result<Option<KeyedResponse>>;

    /// Stores `r` (validated) unless a response is stored for its account and key already;
    /// returns the one stored (the first writer's when two race).
    async fn remember_response(&self, r: &KeyedResponse) -> Result<KeyedResponse>;

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
    pub async fn meter(&self, m: Meter) -> Result<Outcome> {
        self.execute(Command::Meter(m)).await
    }
    pub async fn set_cost_profile(&self, account: AccountId, org_member: bool, tier: Option<String>, key: IdempotencyKey) -> Result<Outcome> {
        self.execute(Command::SetCostProfile(SetCostProfile { account, org_member, tier, key })).await
    }
    pub async fn throttle(&self, t: AdminThrottle) -> Result<Outcome> {
        self.execute(Command::Throttle(t)).await
    }
    pub async fn unthrottle(&self, t: AdminThrottle) -> Result<Outcome> {
        self.execute(Command::Unthrottle(t)).await
    }
    pub async fn set_tier(&self, limits: TierLimits, key: IdempotencyKey) -> Result<Outcome> {
        self.execute(Command::SetTier(SetTier { limits, key })).await
    }
}

#[cfg(test)]
mod url_tests {
    use super::DatabaseUrl;

    #[test]
    fn database_urls_name_their_backend() {
        assert_eq!(DatabaseUrl::parse("postgres://u@h/db").unwrap(), DatabaseUrl::Postgres("postgres://u@h/db".into()));
        assert_eq!(DatabaseUrl::parse("postgresql://h/db").unwrap(), DatabaseUrl::Postgres("postgresql://h/db".into()));
        assert_eq!(DatabaseUrl::parse("host=/tmp dbname=db").unwrap(), DatabaseUrl::Postgres("host=/tmp dbname=db".into()));
        for (url, path) in [("sqlite:///tmp/a.db", "/tmp/a.db"), ("sqlite:a.db", "a.db"), ("data/prpm.db", "data/prpm.db")] {
            assert_eq!(DatabaseUrl::parse(url).unwrap(), DatabaseUrl::Sqlite(path.into()));
        }
        for bad in ["", "sqlite:", "sqlite://", ":memory:"] {
            assert!(DatabaseUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
