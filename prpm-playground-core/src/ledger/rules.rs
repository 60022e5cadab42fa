//! The ledger's rules as one pure function: `apply(config, snapshot, command, now)` returns the
//! new account state and the log entries to append, or a rejection. No I/O: both backends call
//! it inside their own transactions, so the rules cannot differ between them.
//!
//! Rules (see README "Bucket rules"):
//! * Buckets are spent in the configured order; inside the rollover bucket the lot that expires
//!   first is spent first.
//! * Expired holds and expired credits are removed lazily by every command on the account (as
//!   `expire_hold` / `expire_credits` entries) and by the sweep job, so expired credits are
//!   never spent even if the job is late.
//! * A hold reserves credits without taking them from a bucket; `available = total - held`.
//!   A hold (and a spend while holds are open) may only count credits that outlive every open
//!   hold's deadline, which guarantees that a settle always finds the credits it reserved.

use chrono::{DateTime, Datelike, Months, Utc};
use serde::{Deserialize, Serialize};

use super::types::*;
use crate::clock::to_millis;
use crate::cost::{self, Alert, CostEvents, CostState, Throttle, ThrottleReason, TierLimits, TierTable};
use crate::error::{Error, Result};

/// Placeholder for the id of a hold created by the same transition.
pub const NEW_HOLD: HoldId = HoldId(0);
/// At most this many missed periods are processed by one rollover step.
const MAX_PERIODS_PER_STEP: u32 = 36;

/// Ledger settings shared by both backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerConfig {
    pub spend_order: SpendOrder,
    /// Credits a new user gets (purchased bucket, source bonus).
    pub signup_credits_user: Credits,
    /// Credits a verified organisation gets.
    pub signup_credits_org: Credits,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig { spend_order: SpendOrder::DEFAULT, signup_credits_user: 5, signup_credits_org: 200 }
    }
}

/// Credits in the rollover bucket that share one expiry date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lot {
    pub amount: Credits,
    pub expires_at: DateTime<Utc>,
}

/// A subscription plan as the ledger tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanState {
    pub monthly_credits: Credits,
    /// False once the plan was ended: no allocation at the next period end.
    pub active: bool,
    pub period_end: DateTime<Utc>,
    /// The day of the month periods end on (1..=31; the month's last day in shorter months).
    pub anchor_day: u32,
}

/// An account's stored state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountState {
    pub kind: AccountKind,
    pub monthly: Credits,
    pub purchased: Credits,
    /// Sorted by expiry, every amount positive, at most [`MAX_ROLLOVER_LOTS`].
    pub rollover: Vec<Lot>,
    pub held: Credits,
    pub plan: Option<PlanState>,
    /// Cost counters, throttle and recent requests.
    pub cost: CostState,
    /// Member of an organisation (decides the tier with an active plan).
    pub org_member: bool,
    /// An admin's tier override.
    pub tier: Option<String>,
}

impl AccountState {
    pub fn new(kind: AccountKind) -> Self {
        AccountState { kind, monthly: 0, purchased: 0, rollover: Vec::new(), held: 0, plan: None, cost: CostState::default(), org_member: false, tier: None }
    }

    /// The account's cost tier: an admin's override; otherwise organisations (credit pools)
    /// are `unlimited` and users follow [`cost::tier_of`] (a plan counts until its period ends,
    /// even once cancelled: it is paid for).
    pub fn tier(&self) -> &str {
        account_tier(self.kind, self.plan.is_some(), self.org_member, self.tier.as_deref())
    }
    pub fn rollover_total(&self) -> Credits {
        self.rollover.iter().map(|l| l.amount).sum()
    }
    pub fn balances(&self) -> Balances {
        Balances { monthly: self.monthly, rollover: self.rollover_total(), purchased: self.purchased, held: self.held }
    }
    /// The earliest rollover expiry.
    pub fn next_expiry(&self) -> Option<Lot> {
        self.rollover.first().copied()
    }
}

/// See [`AccountState::tier`].
pub fn account_tier(kind: AccountKind, plan: bool, org_member: bool, tier_override: Option<&str>) -> &str {
    if let Some(t) = tier_override {
        return t;
    }
    match kind {
        AccountKind::Organisation => cost::UNLIMITED,
        AccountKind::User => cost::tier_of(plan, org_member),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenHold {
    pub id: HoldId,
    pub amount: Credits,
    pub deadline: DateTime<Utc>,
    /// The worst-case cost admitted with the hold (micro-dollars).
    pub cost_micros: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldStatus {
    Open,
    Settled,
    Released,
    Expired,
}

impl HoldStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldStatus::Open => "open",
            HoldStatus::Settled => "settled",
            HoldStatus::Released => "released",
            HoldStatus::Expired => "expired",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "open" => HoldStatus::Open,
            "settled" => HoldStatus::Settled,
            "released" => HoldStatus::Released,
            "expired" => HoldStatus::Expired,
            _ => return Err(Error::Invariant(format!("unknown hold status {s:?}"))),
        })
    }
}

/// The hold a settle or release names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldRecord {
    pub id: HoldId,
    pub amount: Credits,
    pub deadline: DateTime<Utc>,
    pub status: HoldStatus,
}

/// The charge a refund names, with what was refunded of it so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChargeRecord {
    pub id: EntryId,
    pub kind: EntryKind,
    /// Credits taken per bucket (positive).
    pub charged: BucketAmounts,
    /// The earliest rollover expiry the charge consumed.
    pub rollover_expires_at: Option<DateTime<Utc>>,
    /// Credits given back so far per bucket (positive).
    pub refunded: BucketAmounts,
}

/// What the backend loads for one command.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The account (for settle/release: the hold's account); `None` if it does not exist.
    pub state: Option<AccountState>,
    /// The account's open holds (including ones past their deadline, not yet swept).
    pub open_holds: Vec<OpenHold>,
    /// For settle and release.
    pub hold: Option<HoldRecord>,
    /// For refunds: the named entry if it is a charge of this account.
    pub charge: Option<ChargeRecord>,
}

/// A log entry to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    pub kind: EntryKind,
    pub delta: BucketAmounts,
    pub held_delta: Credits,
    /// Total credits (all buckets) after this entry.
    pub balance_after: Credits,
    pub held_after: Credits,
    pub source: Option<GrantSource>,
    /// [`NEW_HOLD`] stands for the hold this transition creates.
    pub hold: Option<HoldId>,
    pub ref_entry: Option<EntryId>,
    pub reference: String,
    /// For rollover credits entering (grant, rollover, refund) or leaving (spend, settle):
    /// the expiry of the lot (the earliest one touched, for charges).
    pub rollover_expires_at: Option<DateTime<Utc>>,
    /// The command's main entry (its id goes into the effect).
    pub main: bool,
}

impl NewEntry {
    fn new(kind: EntryKind) -> Self {
        NewEntry {
            kind,
            delta: BucketAmounts::default(),
            held_delta: 0,
            balance_after: 0,
            held_after: 0,
            source: None,
            hold: None,
            ref_entry: None,
            reference: String::new(),
            rollover_expires_at: None,
            main: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewHold {
    pub amount: Credits,
    pub deadline: DateTime<Utc>,
    pub cost_micros: i64,
    pub reference: String,
}

/// What the backend must write for an applied command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub state: AccountState,
    pub entries: Vec<NewEntry>,
    pub new_hold: Option<NewHold>,
    pub closed_holds: Vec<(HoldId, HoldStatus)>,
    pub usage: Option<Usage>,
    /// Alerts to record (one per account, kind and month).
    pub alerts: Vec<Alert>,
    pub effect: Effect,
}

/// Applies `cmd` to `snap` at `now`. `Err` is a bad request or a broken invariant;
/// `Ok(Err(_))` an expected refusal; `Ok(Ok(_))` what to write.
pub fn apply(cfg: &LedgerConfig, tiers: &TierTable, snap: &Snapshot, cmd: &Command, now: DateTime<Utc>) -> Result<Result<Transition, Rejection>> {
    cmd.validate()?;
    // Stores keep milliseconds: decide on exactly what will be stored.
    let now = to_millis(now);
    if let Command::SetTier(_) = cmd {
        return Err(Error::Invariant("a tier is not an account command: the store applies it".into()));
    }
    if let Command::CreateAccount(c) = cmd {
        if snap.state.is_some() {
            return Ok(Err(Rejection::AccountExists));
        }
        let mut tx = Tx::new(cfg, tiers, AccountState::new(c.kind), Vec::new(), now);
        let granted = match c.kind {
            AccountKind::User => cfg.signup_credits_user,
            AccountKind::Organisation => cfg.signup_credits_org,
        };
        if granted > 0 {
            tx.grant(Bucket::Purchased, granted, GrantSource::Bonus, None, "signup".into())?;
        }
        let effect = Effect::AccountCreated { granted, balances: tx.s.balances() };
        return tx.finish(effect);
    }
    // Settle and release name a hold: an unknown hold is a rejection, not an unknown account.
    if let Some(hold_id) = cmd.hold() {
        let Some(hold) = snap.hold else {
            return Ok(Err(Rejection::UnknownHold(hold_id)));
        };
        match hold.status {
            HoldStatus::Open if hold.deadline > now => {}
            HoldStatus::Open | HoldStatus::Expired => {
                return Ok(Err(Rejection::HoldExpired(hold_id)));
            }
            HoldStatus::Settled => return Ok(Err(Rejection::AlreadySettled(hold_id))),
            HoldStatus::Released => return Ok(Err(Rejection::AlreadyReleased(hold_id))),
        }
    }
    let state = match (&snap.state, cmd.account()) {
        (Some(s), _) => s.clone(),
        (None, Some(a)) => return Err(Error::UnknownAccount(a.to_string())),
        (None, None) => return Err(Error::Invariant("hold without an account".into())),
    };
    let mut tx = Tx::new(cfg, tiers, state, snap.open_holds.clone(), now);
    tx.normalize()?;

    let effect = match cmd {
        Command::CreateAccount(_) | Command::SetTier(_) => unreachable!("handled above"),
        Command::Grant(c) => {
            let expires_at = match c.bucket {
                Bucket::Rollover => {
                    let max = add_month(now)?;
                    let at = c.expires_at.map(to_millis).unwrap_or(max);
                    if at <= now || at > max {
                        return Err(Error::invalid("expires_at", "rollover credits must expire within one month from now"));
                    }
                    Some(at)
                }
                _ => None,
            };
            if let Some(at) = expires_at
                && tx.s.rollover.len() >= MAX_ROLLOVER_LOTS
                && !tx.s.rollover.iter().any(|l| l.expires_at == at)
            {
                return Err(Error::invalid("expires_at", format!("at most {MAX_ROLLOVER_LOTS} distinct rollover expiry dates")));
            }
            tx.grant(c.bucket, c.amount, c.source, expires_at, c.reference.clone())?;
            Effect::Granted { entry: EntryId(0), balances: tx.s.balances() }
        }
        Command::Hold(c) => {
            // Cost control first: a throttled or rate-limited account is told so, whatever
            // its credits.
            if let Err(r) = tx.admit(c.cost_micros)? {
                return Ok(Err(r));
            }
            let deadline = now + chrono::Duration::seconds(c.ttl_secs.into());
            let horizon = tx.horizon().max(deadline);
            let available = tx.usable(horizon) - tx.s.held;
            if c.amount > available {
                return Ok(Err(Rejection::InsufficientCredits { needed: c.amount, available: available.max(0) }));
            }
            tx.s.held += c.amount;
            tx.holds.push(OpenHold { id: NEW_HOLD, amount: c.amount, deadline, cost_micros: c.cost_micros });
            tx.new_hold = Some(NewHold { amount: c.amount, deadline, cost_micros: c.cost_micros, reference: c.reference.clone() });
            let mut e = NewEntry::new(EntryKind::Hold);
            e.held_delta = c.amount;
            e.hold = Some(NEW_HOLD);
            e.reference = c.reference.clone();
            e.main = true;
            tx.push(e);
            Effect::Held { hold: NEW_HOLD, amount: c.amount, deadline, balances: tx.s.balances() }
        }
        Command::Settle(c) => {
            let hold = tx.close_hold(c.hold, HoldStatus::Settled)?;
            let charge = c.credits.min(hold.amount);
            let (charged, expiry) = tx.take(charge)?;
            let mut e = NewEntry::new(EntryKind::Settle);
            e.delta = charged.neg();
            e.held_delta = -hold.amount;
            e.hold = Some(c.hold);
            e.rollover_expires_at = expiry;
            e.main = true;
            tx.push(e);
            tx.usage = c.usage.clone();
            let cost = tx.count_cost(hold.cost_micros, c.usage.as_ref().map_or(0, |u| u.cost_micros))?;
            Effect::Settled {
                hold: c.hold,
                entry: EntryId(0),
                charged,
                released: hold.amount - charge,
                capped: c.credits > hold.amount,
                balances: tx.s.balances(),
                cost,
            }
        }
        Command::Release(c) => {
            let hold = tx.close_hold(c.hold, HoldStatus::Released)?;
            tx.s.cost.release(hold.cost_micros)?;
            let mut e = NewEntry::new(EntryKind::Release);
            e.held_delta = -hold.amount;
            e.hold = Some(c.hold);
            e.main = true;
            tx.push(e);
            Effect::Released { hold: c.hold, released: hold.amount, balances: tx.s.balances() }
        }
        Command::Spend(c) => {
            let cost_micros = c.usage.as_ref().map_or(0, |u| u.cost_micros);
            if let Err(r) = tx.admit(cost_micros)? {
                return Ok(Err(r));
            }
            let available = tx.usable(tx.horizon()) - tx.s.held;
            if c.amount > available {
                return Ok(Err(Rejection::InsufficientCredits { needed: c.amount, available: available.max(0) }));
            }
            let (charged, expiry) = tx.take(c.amount)?;
            let mut e = NewEntry::new(EntryKind::Spend);
            e.delta = charged.neg();
            e.reference = c.reference.clone();
            e.rollover_expires_at = expiry;
            e.main = true;
            tx.push(e);
            tx.usage = c.usage.clone();
            let cost = tx.count_cost(cost_micros, cost_micros)?;
            Effect::Spent { entry: EntryId(0), charged, balances: tx.s.balances(), cost }
        }
        Command::Refund(c) => {
            let Some(charge) = snap.charge.filter(|ch| ch.id == c.entry && matches!(ch.kind, EntryKind::Spend | EntryKind::Settle)) else {
                return Ok(Err(Rejection::NotACharge(c.entry)));
            };
            let refundable = charge.charged.total() - charge.refunded.total();
            if c.amount > refundable {
                return Ok(Err(Rejection::RefundExceedsCharge { requested: c.amount, refundable }));
            }
            // Last taken, first returned: walk the spend order backwards.
            let mut returned = BucketAmounts::default();
            let mut left = c.amount;
            for b in cfg.spend_order.buckets().into_iter().rev() {
                let n = left.min(charge.charged.get(b) - charge.refunded.get(b));
                *returned.get_mut(b) = n;
                left -= n;
            }
            debug_assert_eq!(left, 0);
            let rollover_expiry = charge.rollover_expires_at;
            if returned.rollover > 0 && rollover_expiry.is_none() {
                return Err(Error::Invariant(format!("charge {:?} took rollover credits without an expiry", charge.id)));
            }
            tx.add(Bucket::Monthly, returned.monthly)?;
            tx.add(Bucket::Purchased, returned.purchased)?;
            if returned.rollover > 0 {
                tx.add_lot(returned.rollover, rollover_expiry.expect("checked"))?;
            }
            let mut e = NewEntry::new(EntryKind::Refund);
            e.delta = returned;
            e.ref_entry = Some(c.entry);
            e.reference = c.reference.clone();
            e.rollover_expires_at = rollover_expiry.filter(|_| returned.rollover > 0);
            e.main = true;
            tx.push(e);
            // Rollover credits whose lot has expired meanwhile expire again at once.
            tx.expire_lots()?;
            Effect::Refunded { entry: EntryId(0), returned, balances: tx.s.balances() }
        }
        Command::Clawback(c) => {
            // Never take credits that back an open hold: clamp at what is free.
            let horizon = tx.horizon();
            let slack = (tx.usable(horizon) - tx.s.held).max(0);
            let (in_bucket, not_backing) = match c.bucket {
                Bucket::Monthly => (tx.s.monthly, 0),
                Bucket::Purchased => (tx.s.purchased, 0),
                Bucket::Rollover => {
                    let short: Credits = tx.s.rollover.iter().filter(|l| l.expires_at <= horizon).map(|l| l.amount).sum();
                    (tx.s.rollover_total(), short)
                }
            };
            let n = c.amount.min(in_bucket).min(not_backing + slack);
            let mut taken = BucketAmounts::default();
            let mut entry = None;
            if n > 0 {
                match c.bucket {
                    Bucket::Rollover => {
                        tx.take_rollover(n);
                    }
                    b => tx.add(b, -n)?,
                }
                taken = BucketAmounts::only(c.bucket, n);
                let mut e = NewEntry::new(EntryKind::Clawback);
                e.delta = taken.neg();
                e.reference = c.reference.clone();
                e.main = true;
                tx.push(e);
                entry = Some(EntryId(0));
            }
            Effect::ClawedBack { entry, taken, shortfall: c.amount - n, balances: tx.s.balances() }
        }
        Command::SetPlan(c) => {
            // A period that has ended is closed first (rollover, allocation), so a plan change
            // that arrives before the rollover job never skips one.
            let rolled = tx.roll_due_periods()?;
            if !tx.holds_backed() {
                return Ok(Err(Rejection::HoldsOpen));
            }
            let mut granted = rolled.granted;
            match (c.plan, tx.s.plan) {
                (Some(terms), current) => {
                    let period_end = to_millis(terms.period_end);
                    if period_end <= now {
                        return Err(Error::invalid("period_end", "must be in the future"));
                    }
                    let anchor_day = terms.anchor_day.unwrap_or_else(|| period_end.day());
                    tx.s.plan = Some(PlanState { monthly_credits: terms.monthly_credits, active: true, period_end, anchor_day });
                    if current.is_none() && terms.monthly_credits > 0 {
                        tx.grant(Bucket::Monthly, terms.monthly_credits, GrantSource::Plan, None, format!("period:{}", period_end.to_rfc3339()))?;
                        granted += terms.monthly_credits;
                    }
                }
                (None, Some(mut p)) => {
                    p.active = false;
                    tx.s.plan = Some(p);
                }
                (None, None) => {}
            }
            Effect::PlanSet { granted, balances: tx.s.balances() }
        }
        Command::Rollover { .. } => {
            if tx.s.plan.is_none_or(|p| p.period_end > now) {
                return Ok(Err(Rejection::NothingDue));
            }
            let r = tx.roll_due_periods()?;
            // Open holds wait only if the step would leave one of them unbacked.
            if !tx.holds_backed() {
                return Ok(Err(Rejection::HoldsOpen));
            }
            Effect::RolledOver { periods: r.periods, moved: r.moved, expired: r.expired, granted: r.granted, balances: tx.s.balances() }
        }
        Command::Sweep { .. } => {
            if tx.entries.is_empty() {
                return Ok(Err(Rejection::NothingDue));
            }
            Effect::Swept { holds_expired: tx.holds_expired, credits_expired: tx.expired_credits, balances: tx.s.balances() }
        }
        Command::Meter(c) => {
            let mut e = NewEntry::new(EntryKind::Meter);
            e.reference = c.reference.clone();
            e.main = true;
            tx.push(e);
            tx.usage = Some(c.usage.clone());
            let cost = tx.count_cost(0, c.usage.cost_micros)?;
            Effect::Metered { entry: EntryId(0), cost, balances: tx.s.balances() }
        }
        Command::SetCostProfile(c) => {
            if let Some(t) = &c.tier {
                tiers.get(t)?;
            }
            tx.s.org_member = c.org_member;
            tx.s.tier = c.tier.clone();
            let mut e = NewEntry::new(EntryKind::CostProfile);
            e.reference = format!("org_member={} tier={}", c.org_member, c.tier.as_deref().unwrap_or("(derived)"));
            e.main = true;
            tx.push(e);
            Effect::CostProfileSet { tier: tx.s.tier().to_owned(), balances: tx.s.balances() }
        }
        Command::Throttle(c) => {
            let before = tx.s.cost.throttle.clone();
            tx.s.cost.roll(now);
            tx.log_throttle_change(before);
            if tx.s.cost.throttle.is_some() {
                return Ok(Err(Rejection::AlreadyThrottled));
            }
            tx.s.cost.throttle = Some(Throttle { reason: ThrottleReason::Admin { by: c.by.clone(), why: c.why.clone() }, since: now });
            let mut e = NewEntry::new(EntryKind::Throttle);
            e.reference = format!("admin {}: {}", c.by, c.why);
            e.main = true;
            tx.push(e);
            Effect::Throttled { balances: tx.s.balances() }
        }
        Command::Unthrottle(c) => {
            if !tx.s.cost.unthrottle(now) {
                return Ok(Err(Rejection::NotThrottled));
            }
            let mut e = NewEntry::new(EntryKind::Unthrottle);
            e.reference = format!("admin {}: {}", c.by, c.why);
            e.main = true;
            tx.push(e);
            Effect::Unthrottled { balances: tx.s.balances() }
        }
        Command::CostReset { .. } => {
            if !tx.s.cost.reset_due(now) {
                return Ok(Err(Rejection::NothingDue));
            }
            let before = tx.s.cost.throttle.clone();
            tx.s.cost.roll(now);
            let throttle_lifted = before.is_some() && tx.s.cost.throttle.is_none();
            tx.log_throttle_change(before);
            Effect::CostReset { throttle_lifted, balances: tx.s.balances() }
        }
    };
    tx.finish(effect)
}

/// Adds one calendar month (clamped to the month's last day).
pub fn add_month(t: DateTime<Utc>) -> Result<DateTime<Utc>> {
    t.checked_add_months(Months::new(1)).ok_or_else(|| Error::invalid("time", "out of range"))
}

/// The day `t`'s period after it ends: the next month, on `anchor_day` or the month's last day
/// if it is shorter, at `t`'s time of day.
pub fn next_period_end(t: DateTime<Utc>, anchor_day: u32) -> Result<DateTime<Utc>> {
    let out_of_range = || Error::invalid("time", "out of range");
    let first = t.date_naive().with_day(1).ok_or_else(out_of_range)?.checked_add_months(Months::new(1)).ok_or_else(out_of_range)?;
    let last_day = first.checked_add_months(Months::new(1)).ok_or_else(out_of_range)?.pred_opt().ok_or_else(out_of_range)?.day();
    let day = first.with_day(anchor_day.clamp(1, last_day)).ok_or_else(out_of_range)?;
    Ok(day.and_time(t.time()).and_utc())
}

/// The account as it stands at `now` (expired holds and credits removed), without writing.
pub fn view_at(state: &AccountState, open_holds: &[OpenHold], now: DateTime<Utc>) -> (AccountState, Vec<OpenHold>) {
    let cfg = LedgerConfig::default();
    let tiers = TierTable::default();
    let mut tx = Tx::new(&cfg, &tiers, state.clone(), open_holds.to_vec(), now);
    // normalize only removes; it cannot fail on a valid state.
    if tx.normalize().is_err() {
        return (state.clone(), open_holds.to_vec());
    }
    (tx.s, tx.holds)
}

/// The credits that may back a hold living until `horizon`: buckets that do not expire plus
/// rollover lots that outlive it.
pub fn usable_at(state: &AccountState, horizon: DateTime<Utc>) -> Credits {
    state.monthly + state.purchased + state.rollover.iter().filter(|l| l.expires_at > horizon).map(|l| l.amount).sum::<Credits>()
}

/// Checks a stored state's own invariants (used by verify and debug assertions).
pub fn check_state(state: &AccountState, open_holds: &[OpenHold]) -> std::result::Result<(), String> {
    if state.monthly < 0 || state.purchased < 0 || state.held < 0 {
        return Err(format!("negative bucket or held: {:?}", state.balances()));
    }
    if state.rollover.iter().any(|l| l.amount <= 0) {
        return Err("empty or negative rollover lot".into());
    }
    if state.rollover.windows(2).any(|w| w[0].expires_at >= w[1].expires_at) {
        return Err("rollover lots not sorted by expiry".into());
    }
    if state.rollover.len() > MAX_ROLLOVER_LOTS_HARD {
        return Err("too many rollover lots".into());
    }
    let held: Credits = open_holds.iter().map(|h| h.amount).sum();
    if held != state.held {
        return Err(format!("held {} but open holds sum to {held}", state.held));
    }
    let held_cost: i64 = open_holds.iter().map(|h| h.cost_micros).sum();
    if held_cost != state.cost.held_cost_micros {
        return Err(format!("held cost {} but open holds' costs sum to {held_cost}", state.cost.held_cost_micros));
    }
    Ok(())
}

#[derive(Default)]
struct Rolled {
    periods: u32,
    moved: Credits,
    expired: Credits,
    granted: Credits,
}

struct Tx<'c> {
    cfg: &'c LedgerConfig,
    tiers: &'c TierTable,
    alerts: Vec<Alert>,
    s: AccountState,
    holds: Vec<OpenHold>,
    entries: Vec<NewEntry>,
    closed: Vec<(HoldId, HoldStatus)>,
    new_hold: Option<NewHold>,
    usage: Option<Usage>,
    now: DateTime<Utc>,
    holds_expired: u32,
    expired_credits: Credits,
}

impl<'c> Tx<'c> {
    fn new(cfg: &'c LedgerConfig, tiers: &'c TierTable, s: AccountState, holds: Vec<OpenHold>, now: DateTime<Utc>) -> Self {
        Tx {
            cfg,
            tiers,
            alerts: Vec::new(),
            s,
            holds,
            entries: Vec::new(),
            closed: Vec::new(),
            new_hold: None,
            usage: None,
            now,
            holds_expired: 0,
            expired_credits: 0,
        }
    }

    /// The limits of the account's tier.
    fn limits(&self) -> Result<&'c TierLimits> {
        let name = self.s.tier();
        self.tiers.get(name).map_err(|_| Error::Invariant(format!("the account's tier {name:?} is not in the tier table")))
    }

    /// Admits a run with this worst-case cost (see [`CostState::admit`]).
    fn admit(&mut self, worst_micros: i64) -> Result<Result<(), Rejection>> {
        let limits = self.limits()?;
        let before = self.s.cost.throttle.clone();
        if let Err(r) = self.s.cost.admit(limits, worst_micros, self.now)? {
            return Ok(Err(r.into()));
        }
        self.log_throttle_change(before);
        Ok(Ok(()))
    }

    /// Counts a cost (releasing what its admission held): throttles and alerts.
    fn count_cost(&mut self, held_micros: i64, cost_micros: i64) -> Result<CostEvents> {
        let limits = self.limits()?;
        let before = self.s.cost.throttle.clone();
        let events = self.s.cost.settle(limits, held_micros, cost_micros, self.now)?;
        self.log_throttle_change(before);
        self.alerts.extend(events.alerts.iter().cloned());
        Ok(events)
    }

    /// Logs a throttle that was lifted (its period ended) or set (a limit was reached).
    fn log_throttle_change(&mut self, before: Option<Throttle>) {
        let after = self.s.cost.throttle.clone();
        if before == after {
            return;
        }
        // A throttle replaced by another (daily by monthly) is one `throttle` entry.
        if let (Some(b), None) = (&before, &after) {
            let mut e = NewEntry::new(EntryKind::Unthrottle);
            e.reference = format!("period ended: {}", b.reason);
            self.push(e);
        }
        if let Some(a) = after {
            let mut e = NewEntry::new(EntryKind::Throttle);
            e.reference = a.reason.to_string();
            self.push(e);
        }
    }

    /// Appends an entry, stamping the balances after it.
    fn push(&mut self, mut e: NewEntry) {
        e.balance_after = self.s.monthly + self.s.rollover_total() + self.s.purchased;
        e.held_after = self.s.held;
        self.entries.push(e);
    }

    fn total(&self) -> Credits {
        self.s.monthly + self.s.rollover_total() + self.s.purchased
    }

    /// The latest deadline of the open holds (at least now).
    fn horizon(&self) -> DateTime<Utc> {
        self.holds.iter().map(|h| h.deadline).max().unwrap_or(self.now).max(self.now)
    }

    fn usable(&self, horizon: DateTime<Utc>) -> Credits {
        usable_at(&self.s, horizon)
    }

    /// Every open hold is still backed by credits that outlive it.
    fn holds_backed(&self) -> bool {
        self.usable(self.horizon()) >= self.s.held
    }

    /// The monthly rollover step for every period of the plan that ended by now (at most
    /// [`MAX_PERIODS_PER_STEP`]): the previous rollover expires, unused monthly credits move to
    /// rollover (capped at the allocation, the rest expires), the next allocation is granted.
    fn roll_due_periods(&mut self) -> Result<Rolled> {
        let mut r = Rolled::default();
        let mut plan = self.s.plan;
        while let Some(p) = plan.filter(|p| p.period_end <= self.now && r.periods < MAX_PERIODS_PER_STEP) {
            let t = p.period_end;
            let next = next_period_end(t, p.anchor_day)?;
            self.expire_lots_at(t)?;
            let keep = self.s.monthly.min(p.monthly_credits);
            let excess = self.s.monthly - keep;
            if keep > 0 {
                self.s.monthly -= keep;
                self.add_lot(keep, next)?;
                let mut e = NewEntry::new(EntryKind::Rollover);
                e.delta = BucketAmounts { monthly: -keep, rollover: keep, purchased: 0 };
                e.reference = format!("period:{}", t.to_rfc3339());
                e.rollover_expires_at = Some(next);
                self.push(e);
            }
            if excess > 0 {
                self.s.monthly -= excess;
                let mut e = NewEntry::new(EntryKind::ExpireCredits);
                e.delta = BucketAmounts::only(Bucket::Monthly, -excess);
                e.reference = format!("rollover cap, period:{}", t.to_rfc3339());
                self.push(e);
            }
            if p.active {
                if p.monthly_credits > 0 {
                    self.grant(Bucket::Monthly, p.monthly_credits, GrantSource::Plan, None, format!("period:{}", next.to_rfc3339()))?;
                }
                r.granted += p.monthly_credits;
                plan = Some(PlanState { period_end: next, ..p });
            } else {
                plan = None;
            }
            r.moved += keep;
            r.expired += excess;
            r.periods += 1;
        }
        self.s.plan = plan;
        self.expire_lots()?;
        Ok(r)
    }

    /// Returns holds past their deadline and removes credits past their expiry.
    fn normalize(&mut self) -> Result<()> {
        let now = self.now;
        let (expired, open): (Vec<_>, Vec<_>) = self.holds.iter().partition(|h| h.deadline <= now);
        self.holds = open;
        for h in expired {
            self.s.held -= h.amount;
            self.s.cost.release(h.cost_micros)?;
            self.closed.push((h.id, HoldStatus::Expired));
            self.holds_expired += 1;
            let mut e = NewEntry::new(EntryKind::ExpireHold);
            e.held_delta = -h.amount;
            e.hold = Some(h.id);
            self.push(e);
        }
        self.expire_lots()
    }

    fn expire_lots(&mut self) -> Result<()> {
        self.expire_lots_at(self.now)
    }

    fn expire_lots_at(&mut self, t: DateTime<Utc>) -> Result<()> {
        while let Some(lot) = self.s.rollover.first().copied().filter(|l| l.expires_at <= t) {
            self.s.rollover.remove(0);
            self.expired_credits += lot.amount;
            let mut e = NewEntry::new(EntryKind::ExpireCredits);
            e.delta = BucketAmounts::only(Bucket::Rollover, -lot.amount);
            e.rollover_expires_at = Some(lot.expires_at);
            self.push(e);
        }
        Ok(())
    }

    /// Adds `n` (possibly negative) to a bucket without an expiry.
    fn add(&mut self, b: Bucket, n: Credits) -> Result<()> {
        let slot = match b {
            Bucket::Monthly => &mut self.s.monthly,
            Bucket::Purchased => &mut self.s.purchased,
            Bucket::Rollover => return Err(Error::Invariant("rollover credits need a lot".into())),
        };
        let v = *slot + n;
        if v > MAX_BUCKET_CREDITS {
            return Err(Error::invalid("amount", format!("the {} bucket would exceed {MAX_BUCKET_CREDITS}", b.as_str())));
        }
        if v < 0 {
            return Err(Error::Invariant(format!("the {} bucket would go negative", b.as_str())));
        }
        *slot = v;
        Ok(())
    }

    /// Adds rollover credits expiring at `expires_at`. Grants are held to
    /// [`MAX_ROLLOVER_LOTS`] distinct dates before they get here; the ledger's own steps may go
    /// up to [`MAX_ROLLOVER_LOTS_HARD`], past which the credits join the lot expiring next
    /// before theirs (they never live longer than promised).
    fn add_lot(&mut self, n: Credits, expires_at: DateTime<Utc>) -> Result<()> {
        if self.s.rollover_total() + n > MAX_BUCKET_CREDITS {
            return Err(Error::invalid("amount", format!("the rollover bucket would exceed {MAX_BUCKET_CREDITS}")));
        }
        match self.s.rollover.binary_search_by_key(&expires_at, |l| l.expires_at) {
            Ok(i) => self.s.rollover[i].amount += n,
            Err(i) if self.s.rollover.len() < MAX_ROLLOVER_LOTS_HARD => self.s.rollover.insert(i, Lot { amount: n, expires_at }),
            // Full: join the lot just before, or pull the first lot's expiry in to ours.
            Err(0) => {
                self.s.rollover[0].amount += n;
                self.s.rollover[0].expires_at = expires_at;
            }
            Err(i) => self.s.rollover[i - 1].amount += n,
        }
        Ok(())
    }

    fn grant(&mut self, b: Bucket, n: Credits, source: GrantSource, expires_at: Option<DateTime<Utc>>, reference: String) -> Result<()> {
        match (b, expires_at) {
            (Bucket::Rollover, Some(at)) => self.add_lot(n, at)?,
            (Bucket::Rollover, None) => {
                return Err(Error::Invariant("rollover grant without expiry".into()));
            }
            (b, _) => self.add(b, n)?,
        }
        let mut e = NewEntry::new(EntryKind::Grant);
        e.delta = BucketAmounts::only(b, n);
        e.source = Some(source);
        e.reference = reference;
        e.rollover_expires_at = expires_at;
        e.main = true;
        self.push(e);
        Ok(())
    }

    /// Takes up to `n` from the rollover lots, earliest expiry first; returns the amount taken
    /// and the earliest expiry touched (refunds give rollover credits back with it, so refunded
    /// credits never outlive the ones taken).
    fn take_rollover(&mut self, n: Credits) -> (Credits, Option<DateTime<Utc>>) {
        let mut left = n;
        let earliest = self.s.rollover.first().map(|l| l.expires_at).filter(|_| n > 0);
        while left > 0 {
            let Some(lot) = self.s.rollover.first_mut() else {
                break;
            };
            let k = left.min(lot.amount);
            lot.amount -= k;
            left -= k;
            if lot.amount == 0 {
                self.s.rollover.remove(0);
            }
        }
        (n - left, earliest)
    }

    /// Takes `n` credits in spend order. The caller has checked there are enough.
    fn take(&mut self, n: Credits) -> Result<(BucketAmounts, Option<DateTime<Utc>>)> {
        if n > self.total() {
            return Err(Error::Invariant(format!("charge of {n} exceeds the {} credits left", self.total())));
        }
        let mut taken = BucketAmounts::default();
        let mut expiry = None;
        let mut left = n;
        for b in self.cfg.spend_order.buckets() {
            if left == 0 {
                break;
            }
            let k = match b {
                Bucket::Rollover => {
                    let (k, at) = self.take_rollover(left);
                    expiry = at.filter(|_| k > 0);
                    k
                }
                Bucket::Monthly => {
                    let k = left.min(self.s.monthly);
                    self.s.monthly -= k;
                    k
                }
                Bucket::Purchased => {
                    let k = left.min(self.s.purchased);
                    self.s.purchased -= k;
                    k
                }
            };
            *taken.get_mut(b) = k;
            left -= k;
        }
        debug_assert_eq!(left, 0);
        Ok((taken, expiry))
    }

    fn close_hold(&mut self, id: HoldId, status: HoldStatus) -> Result<OpenHold> {
        let i = self
            .holds
            .iter()
            .position(|h| h.id == id)
            .ok_or_else(|| Error::Invariant(format!("hold {id:?} is open but not among the account's open holds")))?;
        let hold = self.holds.remove(i);
        self.s.held -= hold.amount;
        self.closed.push((id, status));
        Ok(hold)
    }

    fn finish(self, effect: Effect) -> Result<Result<Transition, Rejection>> {
        // Every transition keeps the invariants; a failure here is a bug, never a partial write.
        check_state(&self.s, &self.holds).map_err(Error::Invariant)?;
        if self.usable(self.horizon()) < self.s.held {
            return Err(Error::Invariant("open holds are no longer backed by credits".into()));
        }
        // Every effect is built after the command's last change, so it reports final balances.
        debug_assert_eq!(effect.balances(), self.s.balances());
        Ok(Ok(Transition {
            state: self.s,
            entries: self.entries,
            new_hold: self.new_hold,
            closed_holds: self.closed,
            usage: self.usage,
            alerts: self.alerts,
            effect,
        }))
    }
}
