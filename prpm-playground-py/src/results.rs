//! What the functions return: small frozen objects. Money is `decimal.Decimal` (USD, exact),
//! credits are ints, times are aware `datetime`s in UTC.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use prpm_playground_core::cost::Summary as CoreSummary;
use prpm_playground_core::ledger::{Committed, Effect};
use prpm_playground_core::pricing::{Estimate as CoreEstimate, Quote as CoreQuote, micros_to_usd};
use prpm_playground_core::simulate::{Projection, Totals};
use prpm_playground_core::store::{BalanceView, VerifyReport as CoreVerify};
use pyo3::prelude::*;
use rust_decimal::Decimal;

use crate::tables::{Columns, Table};

/// `True` / `False`, as Python prints them.
pub fn py_bool(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// The value, or `None`, as Python prints them.
fn py_opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "None".to_owned(), |v| v.to_string())
}

/// Credits and cost of one run.
#[pyclass(module = "prpm_playground._native", frozen, get_all)]
#[derive(Clone)]
pub struct Quote {
    pub tokens: u64,
    pub credits: u64,
    pub cost_usd: Decimal,
}

impl From<CoreQuote> for Quote {
    fn from(q: CoreQuote) -> Self {
        Quote { tokens: q.tokens, credits: q.credits, cost_usd: micros_to_usd(q.cost_micros) }
    }
}

#[pymethods]
impl Quote {
    fn __repr__(&self) -> String {
        format!("Quote(tokens={}, credits={}, cost_usd=Decimal('{}'))", self.tokens, self.credits, self.cost_usd)
    }
}

/// A pre-run estimate: "this will cost ~N credits".
#[pyclass(module = "prpm_playground._native", frozen, get_all)]
pub struct Estimate {
    pub model: String,
    /// Input + max output: what a hold reserves.
    pub worst_case: Quote,
    /// Input + expected output.
    pub expected: Quote,
    /// The worst case is at least the expensive threshold (5 credits).
    pub expensive: bool,
}

impl From<CoreEstimate> for Estimate {
    fn from(e: CoreEstimate) -> Self {
        Estimate { model: e.model, worst_case: e.worst_case.into(), expected: e.expected.into(), expensive: e.expensive }
    }
}

#[pymethods]
impl Estimate {
    fn __repr__(&self) -> String {
        format!(
            "Estimate(model={:?}, worst_case={}, expected={}, expensive={})",
            self.model,
            self.worst_case.__repr__(),
            self.expected.__repr__(),
            py_bool(self.expensive)
        )
    }
}

/// An account's balances.
#[pyclass(module = "prpm_playground._native", frozen, get_all)]
pub struct Balance {
    pub account: String,
    pub kind: &'static str,
    pub monthly: i64,
    pub rollover: i64,
    pub purchased: i64,
    pub total: i64,
    pub held: i64,
    pub available: i64,
    pub open_holds: u32,
    pub plan_monthly_credits: Option<i64>,
    pub plan_active: Option<bool>,
    pub period_end: Option<DateTime<Utc>>,
    /// The next rollover credits to expire, and when.
    pub next_expiry: Option<(i64, DateTime<Utc>)>,
}

impl From<BalanceView> for Balance {
    fn from(b: BalanceView) -> Self {
        Balance {
            account: b.account.to_string(),
            kind: b.kind.as_str(),
            monthly: b.monthly,
            rollover: b.rollover,
            purchased: b.purchased,
            total: b.total,
            held: b.held,
            available: b.available,
            open_holds: b.open_holds,
            plan_monthly_credits: b.plan.map(|p| p.monthly_credits),
            plan_active: b.plan.map(|p| p.active),
            period_end: b.plan.map(|p| p.period_end),
            next_expiry: b.next_expiry.map(|l| (l.amount, l.expires_at)),
        }
    }
}

#[pymethods]
impl Balance {
    fn __repr__(&self) -> String {
        format!(
            "Balance(account={:?}, monthly={}, rollover={}, purchased={}, held={}, available={})",
            self.account, self.monthly, self.rollover, self.purchased, self.held, self.available
        )
    }
}

/// The admin summary of the current month.
#[pyclass(module = "prpm_playground._native", frozen, get_all)]
pub struct Summary {
    pub total_monthly_revenue_usd: Decimal,
    pub total_monthly_cost_usd: Decimal,
    /// One decimal, rounded half away from zero; `None` without revenue.
    pub overall_margin_pct: Option<Decimal>,
    pub active_users: u64,
    pub throttled_users: u64,
    pub high_risk_users: u64,
    pub users: u64,
    pub margin_below_70: bool,
    pub throttled_over_5pct: bool,
}

impl From<CoreSummary> for Summary {
    fn from(s: CoreSummary) -> Self {
        Summary {
            total_monthly_revenue_usd: micros_to_usd(s.total_monthly_revenue_micros),
            total_monthly_cost_usd: micros_to_usd(s.total_monthly_cost_micros),
            overall_margin_pct: s.overall_margin_pct,
            active_users: s.active_users,
            throttled_users: s.throttled_users,
            high_risk_users: s.high_risk_users,
            users: s.users,
            margin_below_70: s.margin_below_70,
            throttled_over_5pct: s.throttled_over_5pct,
        }
    }
}

#[pymethods]
impl Summary {
    fn __repr__(&self) -> String {
        format!(
            "Summary(revenue_usd={}, cost_usd={}, margin_pct={}, users={}, active={}, throttled={}, high_risk={})",
            self.total_monthly_revenue_usd,
            self.total_monthly_cost_usd,
            py_opt(self.overall_margin_pct),
            self.users,
            self.active_users,
            self.throttled_users,
            self.high_risk_users
        )
    }
}

/// What `verify()` found: `clean` when every balance matches its log.
#[pyclass(module = "prpm_playground._native", frozen, get_all)]
pub struct VerifyReport {
    pub accounts: u64,
    pub entries: u64,
    /// `(account, what, stored, from_log)` for each difference.
    pub discrepancies: Vec<(String, String, i64, i64)>,
    pub clean: bool,
}

impl From<CoreVerify> for VerifyReport {
    fn from(r: CoreVerify) -> Self {
        VerifyReport {
            accounts: r.accounts,
            entries: r.entries,
            clean: r.is_clean(),
            discrepancies: r.discrepancies.into_iter().map(|d| (d.account.to_string(), d.what, d.stored, d.from_log)).collect(),
        }
    }
}

#[pymethods]
impl VerifyReport {
    fn __bool__(&self) -> bool {
        self.clean
    }
    fn __repr__(&self) -> String {
        format!("VerifyReport(accounts={}, entries={}, discrepancies={})", self.accounts, self.entries, self.discrepancies.len())
    }
}

/// What a write did. `effect` names it (`granted`, `held`, `settled`, `spent`, `metered`,
/// ...); `replayed` is true when the key was used before for the same request (nothing was
/// written again). Balances are the account's after the write.
#[pyclass(module = "prpm_playground._native", frozen, get_all)]
pub struct Receipt {
    pub effect: String,
    pub replayed: bool,
    /// The log entry written (grants, settles, spends, refunds, meters).
    pub entry: Option<i64>,
    /// The hold (holds, settles, releases).
    pub hold: Option<i64>,
    /// When an unsettled hold expires.
    pub deadline: Option<DateTime<Utc>>,
    /// Credits charged (settles, spends).
    pub charged: i64,
    /// A cost limit crossed by this write throttled the account (settles, spends, meters).
    pub throttled: bool,
    pub monthly: i64,
    pub rollover: i64,
    pub purchased: i64,
    pub held: i64,
    pub available: i64,
}

impl From<Committed> for Receipt {
    fn from(c: Committed) -> Self {
        let b = c.effect.balances();
        let name = serde_name(&c.effect);
        let (entry, hold, deadline, charged) = match &c.effect {
            Effect::Granted { entry, .. } | Effect::Refunded { entry, .. } | Effect::Metered { entry, .. } => (Some(entry.0), None, None, 0),
            Effect::Held { hold, deadline, .. } => (None, Some(hold.0), Some(*deadline), 0),
            Effect::Settled { hold, entry, charged, .. } => (Some(entry.0), Some(hold.0), None, charged.total()),
            Effect::Released { hold, .. } => (None, Some(hold.0), None, 0),
            Effect::Spent { entry, charged, .. } => (Some(entry.0), None, None, charged.total()),
            Effect::ClawedBack { entry, .. } => (entry.map(|e| e.0), None, None, 0),
            _ => (None, None, None, 0),
        };
        let throttled = c.effect.cost_events().is_some_and(|e| e.throttled.is_some());
        Receipt {
            effect: name,
            replayed: c.replayed,
            entry,
            hold,
            deadline,
            charged,
            throttled,
            monthly: b.monthly,
            rollover: b.rollover,
            purchased: b.purchased,
            held: b.held,
            available: b.available(),
        }
    }
}

/// The effect's name, as the library serializes it.
fn serde_name(e: &Effect) -> String {
    match e {
        Effect::AccountCreated { .. } => "account_created",
        Effect::Granted { .. } => "granted",
        Effect::Held { .. } => "held",
        Effect::Settled { .. } => "settled",
        Effect::Released { .. } => "released",
        Effect::Spent { .. } => "spent",
        Effect::Refunded { .. } => "refunded",
        Effect::ClawedBack { .. } => "clawed_back",
        Effect::PlanSet { .. } => "plan_set",
        Effect::RolledOver { .. } => "rolled_over",
        Effect::Swept { .. } => "swept",
        Effect::Metered { .. } => "metered",
        Effect::CostProfileSet { .. } => "cost_profile_set",
        Effect::Throttled { .. } => "throttled",
        Effect::Unthrottled { .. } => "unthrottled",
        Effect::TierSet { .. } => "tier_set",
        Effect::CostReset { .. } => "cost_reset",
    }
    .to_owned()
}

#[pymethods]
impl Receipt {
    fn __repr__(&self) -> String {
        format!(
            "Receipt(effect={:?}, replayed={}, entry={}, hold={}, charged={}, available={})",
            self.effect,
            py_bool(self.replayed),
            py_opt(self.entry),
            py_opt(self.hold),
            self.charged,
            self.available
        )
    }
}

/// A what-if projection: totals, refusals by reason, the users it throttled, and tables by
/// tier and by user.
#[pyclass(module = "prpm_playground._native", frozen)]
pub struct Simulation {
    p: Projection,
}

impl Simulation {
    pub fn new(p: Projection) -> Self {
        Simulation { p }
    }
}

fn totals_columns<'a, T>(c: Columns<'a, T>, t: fn(&T) -> &Totals) -> Columns<'a, T> {
    c.int("users", move |r| t(r).users as i64)
        .int("paying_users", move |r| t(r).paying_users as i64)
        .usd("revenue_usd", move |r| t(r).revenue_micros)
        .usd("cost_usd", move |r| t(r).cost_micros)
        .opt_decimal("margin_pct", 1, move |r| t(r).margin_pct)
        .int("credits", move |r| t(r).credits)
        .int("admitted", move |r| t(r).admitted as i64)
        .int("refused", move |r| t(r).refused as i64)
        .usd("refused_cost_usd", move |r| t(r).refused_cost_micros)
        .int("throttled_users", move |r| t(r).throttled_users as i64)
}

#[pymethods]
impl Simulation {
    /// Calendar months the period touches (revenue counts each).
    #[getter]
    fn months(&self) -> u32 {
        self.p.months
    }
    #[getter]
    fn revenue_usd(&self) -> Decimal {
        micros_to_usd(self.p.totals.revenue_micros)
    }
    #[getter]
    fn cost_usd(&self) -> Decimal {
        micros_to_usd(self.p.totals.cost_micros)
    }
    /// (revenue − cost) / revenue in percent, one decimal; `None` without revenue.
    #[getter]
    fn margin_pct(&self) -> Option<Decimal> {
        self.p.totals.margin_pct
    }
    #[getter]
    fn users(&self) -> u64 {
        self.p.totals.users
    }
    #[getter]
    fn paying_users(&self) -> u64 {
        self.p.totals.paying_users
    }
    #[getter]
    fn credits(&self) -> i64 {
        self.p.totals.credits
    }
    #[getter]
    fn admitted(&self) -> u64 {
        self.p.totals.admitted
    }
    #[getter]
    fn refused(&self) -> u64 {
        self.p.totals.refused
    }
    #[getter]
    fn refused_cost_usd(&self) -> Decimal {
        micros_to_usd(self.p.totals.refused_cost_micros)
    }
    /// Refused requests by reason (`request_too_large`, `throttled`, `rate_limited`,
    /// `daily_cost_limit`, `monthly_cost_limit`).
    #[getter]
    fn refused_by(&self) -> BTreeMap<&'static str, u64> {
        self.p.refused_by.iter().map(|(k, v)| (k.as_str(), *v)).collect()
    }
    /// Accounts the replay throttled at some point.
    #[getter]
    fn throttled_users(&self) -> Vec<String> {
        self.p.throttled.iter().map(ToString::to_string).collect()
    }
    /// Totals by tier.
    fn by_tier(&self) -> Table {
        let rows: Vec<(&String, &Totals)> = self.p.tiers.iter().collect();
        Table::new(vec![totals_columns(Columns::new(&rows).str("tier", |r| r.0.as_str()), |r| r.1).batch()])
    }
    /// Totals by user, with when and why the replay throttled them.
    fn by_user(&self) -> Table {
        let rows = &self.p.users;
        let c = Columns::new(rows).str("account", |u| u.account.as_str()).str("tier", |u| &u.tier);
        let c = totals_columns(c, |u| &u.totals);
        Table::new(vec![c.opt_time("throttled_at", |u| u.throttled_at).opt_str("throttle_reason", |u| u.throttle_reason.as_deref()).batch()])
    }
    fn __repr__(&self) -> String {
        format!(
            "Simulation(revenue_usd={}, cost_usd={}, margin_pct={}, admitted={}, refused={}, throttled_users={})",
            self.revenue_usd(),
            self.cost_usd(),
            py_opt(self.p.totals.margin_pct),
            self.p.totals.admitted,
            self.p.totals.refused,
            self.p.throttled.len()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Quote>()?;
    m.add_class::<Estimate>()?;
    m.add_class::<Balance>()?;
    m.add_class::<Summary>()?;
    m.add_class::<VerifyReport>()?;
    m.add_class::<Receipt>()?;
    m.add_class::<Simulation>()?;
    Ok(())
}
