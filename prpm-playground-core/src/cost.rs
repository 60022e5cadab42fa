//! Cost control rules, as pure functions (no I/O), for both backends: tier limits as data, the
//! tier of a user, admission of a run (throttle, exact sliding-window rate limit, daily and
//! monthly cost limits counting the worst case of runs still in flight), cost accounting at
//! settle with throttling and alerts, risk levels and the admin summary.
//!
//! Money is USD micro-dollars (`_micros`, `i64`) throughout, as in [`crate::pricing`].
//!
//! Periods: the daily cost counter covers a UTC calendar day, the monthly one a UTC calendar
//! month. Both roll over lazily, at the first admission or settle after the boundary, so they
//! are exact whether or not the reset job has run (the job only makes the stored counters
//! match for reporting).

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const MICROS_PER_USD: i64 = 1_000_000;
/// The sliding window of the request limit.
pub const REQUEST_WINDOW_MS: i64 = 3_600_000;
/// Most requests a window may count (bounds the stored request times).
pub const MAX_HOURLY_REQUESTS: u32 = 100_000;
/// Above this share of the monthly limit a user is "at risk".
pub const AT_RISK_PCT: u32 = 75;
/// Above this share a user is high-risk.
pub const HIGH_RISK_PCT: u32 = 90;
const MAX_TIER_NAME: usize = 64;

/// Exact USD → micro-dollars; refuses negatives and fractions of a micro-dollar.
pub fn usd_to_micros(usd: Decimal) -> Result<i64> {
    if usd.is_sign_negative() && !usd.is_zero() {
        return Err(Error::invalid("usd", format!("{usd} is negative")));
    }
    let m = usd * Decimal::from(MICROS_PER_USD);
    if m.fract() != Decimal::ZERO {
        return Err(Error::invalid("usd", format!("{usd} is not a whole number of micro-dollars")));
    }
    i64::try_from(m).map_err(|_| Error::invalid("usd", format!("{usd} is too large")))
}

pub use crate::pricing::micros_to_usd;

/// One tier's limits (`cost_limits_config`). `None` means no limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierLimits {
    pub name: String,
    /// What one user of the tier pays per month (for the margin).
    pub monthly_revenue_micros: i64,
    pub monthly_cost_limit_micros: Option<i64>,
    pub daily_cost_limit_micros: Option<i64>,
    pub hourly_request_limit: Option<u32>,
    /// Percent of the monthly limit at which an alert is recorded.
    pub alert_threshold_pct: Option<u32>,
    /// Whether reaching a cost limit throttles the user.
    pub throttle_on_exceed: bool,
}

/// Something odd about limits that is allowed but worth telling the admin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LimitWarning {
    /// The daily limit is above the monthly one: the daily limit can never bind.
    DailyAboveMonthly { daily_micros: i64, monthly_micros: i64 },
    /// A zero limit refuses every paid run of the tier.
    ZeroLimit { which: String },
}

impl TierLimits {
    /// Checks the limits: a clear error for what cannot work, warnings for what is odd.
    pub fn validate(&self) -> Result<Vec<LimitWarning>> {
        let name_ok =
            !self.name.is_empty() && self.name.len() <= MAX_TIER_NAME && self.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !name_ok {
            return Err(Error::invalid("tier", format!("{:?} must be 1..={MAX_TIER_NAME} of [a-z0-9_]", self.name)));
        }
        if self.monthly_revenue_micros < 0 {
            return Err(Error::invalid("monthly_revenue", "is negative"));
        }
        let mut warnings = Vec::new();
        for (which, v) in [("monthly_cost_limit", self.monthly_cost_limit_micros), ("daily_cost_limit", self.daily_cost_limit_micros)] {
            match v {
                Some(v) if v < 0 => {
                    return Err(Error::invalid(which, format!("{} is negative", micros_to_usd(v))));
                }
                Some(0) => warnings.push(LimitWarning::ZeroLimit { which: which.into() }),
                _ => {}
            }
        }
        match self.hourly_request_limit {
            Some(0) => warnings.push(LimitWarning::ZeroLimit { which: "hourly_request_limit".into() }),
            Some(n) if n > MAX_HOURLY_REQUESTS => {
                return Err(Error::invalid("hourly_request_limit", format!("{n} is above {MAX_HOURLY_REQUESTS}")));
            }
            _ => {}
        }
        if let Some(p) = self.alert_threshold_pct {
            if !(1..=100).contains(&p) {
                return Err(Error::invalid("alert_threshold_pct", format!("{p} is outside 1..=100")));
            }
            if self.monthly_cost_limit_micros.is_none() {
                return Err(Error::invalid("alert_threshold_pct", "needs a monthly cost limit"));
            }
        }
        if let (Some(d), Some(m)) = (self.daily_cost_limit_micros, self.monthly_cost_limit_micros)
            && d > m
        {
            warnings.push(LimitWarning::DailyAboveMonthly { daily_micros: d, monthly_micros: m });
        }
        Ok(warnings)
    }

    /// The alert threshold in micro-dollars (rounded down: the alert fires no later).
    pub fn alert_threshold_micros(&self) -> Option<i64> {
        Some(pct_of(self.monthly_cost_limit_micros?, self.alert_threshold_pct?))
    }
}

fn pct_of(micros: i64, pct: u32) -> i64 {
    (i128::from(micros) * i128::from(pct) / 100) as i64
}

pub const FREE: &str = "free";
pub const PRPM_PLUS_INDIVIDUAL: &str = "prpm_plus_individual";
pub const PRPM_PLUS_ORG: &str = "prpm_plus_org";
pub const UNLIMITED: &str = "unlimited";

/// The tier of a user: an active PRPM+ subscription makes `prpm_plus_org` if the user belongs
/// to an organisation, else `prpm_plus_individual`; anything else is `free`. (`unlimited` is
/// only ever assigned by an admin.)
pub fn tier_of(prpm_plus_active: bool, org_member: bool) -> &'static str {
    match (prpm_plus_active, org_member) {
        (true, true) => PRPM_PLUS_ORG,
        (true, false) => PRPM_PLUS_INDIVIDUAL,
        (false, _) => FREE,
    }
}

/// All tiers, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierTable {
    tiers: BTreeMap<String, TierLimits>,
}

impl Default for TierTable {
    /// The spec's `cost_limits_config`.
    fn default() -> Self {
        let usd = |cents: i64| cents * MICROS_PER_USD / 100;
        let tiers = [
            TierLimits {
                name: FREE.into(),
                monthly_revenue_micros: 0,
                monthly_cost_limit_micros: Some(usd(50)),
                daily_cost_limit_micros: Some(usd(10)),
                hourly_request_limit: Some(10),
                alert_threshold_pct: Some(80),
                throttle_on_exceed: true,
            },
            TierLimits {
                name: PRPM_PLUS_INDIVIDUAL.into(),
                monthly_revenue_micros: usd(600),
                monthly_cost_limit_micros: Some(usd(500)),
                daily_cost_limit_micros: Some(usd(100)),
                hourly_request_limit: Some(100),
                alert_threshold_pct: Some(90),
                throttle_on_exceed: true,
            },
            TierLimits {
                name: PRPM_PLUS_ORG.into(),
                monthly_revenue_micros: usd(300),
                monthly_cost_limit_micros: Some(usd(250)),
                daily_cost_limit_micros: Some(usd(50)),
                hourly_request_limit: Some(100),
                alert_threshold_pct: Some(90),
                throttle_on_exceed: true,
            },
            TierLimits {
                name: UNLIMITED.into(),
                monthly_revenue_micros: 0,
                monthly_cost_limit_micros: Some(usd(99_999_999)),
                daily_cost_limit_micros: None,
                hourly_request_limit: None,
                alert_threshold_pct: None,
                throttle_on_exceed: false,
            },
        ];
        TierTable { tiers: tiers.into_iter().map(|t| (t.name.clone(), t)).collect() }
    }
}

impl TierTable {
    pub fn get(&self, name: &str) -> Result<&TierLimits> {
        self.tiers.get(name).ok_or_else(|| Error::invalid("tier", format!("unknown tier {name:?}")))
    }

    pub fn tiers(&self) -> impl Iterator<Item = &TierLimits> {
        self.tiers.values()
    }

    /// A table of these tiers (each validated; a name given twice is an error).
    pub fn from_tiers(tiers: impl IntoIterator<Item = TierLimits>) -> Result<TierTable> {
        let mut table = TierTable { tiers: BTreeMap::new() };
        for t in tiers {
            t.validate()?;
            if table.tiers.insert(t.name.clone(), t).is_some() {
                return Err(Error::invalid("tier_table", "a tier appears twice"));
            }
        }
        Ok(table)
    }

    /// Adds or replaces a tier. Invalid limits change nothing.
    pub fn set(&mut self, limits: TierLimits) -> Result<Vec<LimitWarning>> {
        let warnings = limits.validate()?;
        self.tiers.insert(limits.name.clone(), limits);
        Ok(warnings)
    }
}

/// A tier as written in a file: USD amounts as decimal strings (`"0.50"`), absent = no limit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierFileEntry {
    name: String,
    monthly_revenue: Decimal,
    monthly_cost_limit: Option<Decimal>,
    daily_cost_limit: Option<Decimal>,
    hourly_request_limit: Option<u32>,
    alert_threshold_pct: Option<u32>,
    throttle_on_exceed: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierFile {
    tier: Vec<TierFileEntry>,
}

/// Most tiers a table may hold.
pub const MAX_TIERS: usize = 256;

impl TierTable {
    /// Parses a TOML table of `[[tier]]` entries:
    ///
    /// ```toml
    /// [[tier]]
    /// name = "free"
    /// monthly_revenue = "0"
    /// monthly_cost_limit = "0.50"
    /// daily_cost_limit = "0.10"
    /// hourly_request_limit = 10
    /// alert_threshold_pct = 80
    /// throttle_on_exceed = true
    /// ```
    ///
    /// Every tier is validated; a bad one (or a name given twice) fails the whole table.
    /// Returns the table and the warnings of each tier.
    pub fn from_toml_str(text: &str) -> Result<(TierTable, Vec<(String, LimitWarning)>)> {
        let file: TierFile = toml::from_str(text).map_err(|e| Error::invalid("tier_table", e.to_string()))?;
        if file.tier.is_empty() || file.tier.len() > MAX_TIERS {
            return Err(Error::invalid("tier_table", format!("needs 1..={MAX_TIERS} tiers, has {}", file.tier.len())));
        }
        let mut table = TierTable { tiers: BTreeMap::new() };
        let mut warnings = Vec::new();
        for t in file.tier {
            let usd = |v: Option<Decimal>| v.map(usd_to_micros).transpose();
            let limits = TierLimits {
                monthly_revenue_micros: usd_to_micros(t.monthly_revenue)?,
                monthly_cost_limit_micros: usd(t.monthly_cost_limit)?,
                daily_cost_limit_micros: usd(t.daily_cost_limit)?,
                hourly_request_limit: t.hourly_request_limit,
                alert_threshold_pct: t.alert_threshold_pct,
                throttle_on_exceed: t.throttle_on_exceed,
                name: t.name,
            };
            if table.tiers.contains_key(&limits.name) {
                return Err(Error::invalid("tier_table", format!("tier {:?} appears twice", limits.name)));
            }
            warnings.extend(limits.validate()?.into_iter().map(|w| (limits.name.clone(), w)));
            table.tiers.insert(limits.name.clone(), limits);
        }
        Ok((table, warnings))
    }

    /// Reads a TOML tier table from a file.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<(TierTable, Vec<(String, LimitWarning)>)> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::invalid("tier_table", format!("{}: {e}", path.display())))?;
        TierTable::from_toml_str(&text)
    }
}

// ---------------------------------------------------------------------------------------------
// Per-user cost state

/// Why a user is throttled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ThrottleReason {
    /// The daily cost limit was reached on this UTC day; lifts the next day.
    DailyCostLimit { day: NaiveDate },
    /// The monthly cost limit was reached in the month starting on this day; lifts the next
    /// month.
    MonthlyCostLimit { month: NaiveDate },
    /// An admin throttled the user; lifts only when an admin unthrottles.
    Admin { by: String, why: String },
}

impl ThrottleReason {
    /// A stable code: `daily_cost_limit`, `monthly_cost_limit` or `admin`.
    pub fn code(&self) -> &'static str {
        match self {
            ThrottleReason::DailyCostLimit { .. } => "daily_cost_limit",
            ThrottleReason::MonthlyCostLimit { .. } => "monthly_cost_limit",
            ThrottleReason::Admin { .. } => "admin",
        }
    }
}

/// For people: `daily cost limit reached on 2026-11-22`, `monthly cost limit reached in
/// 2026-11`, `admin ops@example.com: abuse report 17` (the log's reference for it).
impl std::fmt::Display for ThrottleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ThrottleReason::DailyCostLimit { day } => write!(f, "daily cost limit reached on {day}"),
            ThrottleReason::MonthlyCostLimit { month } => write!(f, "monthly cost limit reached in {}", month.format("%Y-%m")),
            ThrottleReason::Admin { by, why } => write!(f, "admin {by}: {why}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttle {
    pub reason: ThrottleReason,
    pub since: DateTime<Utc>,
}

/// Which alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AlertKind {
    /// Monthly cost above 75 % of the limit.
    AtRisk,
    /// Monthly cost reached the tier's alert threshold.
    Threshold,
}

/// An alert, recorded once per user, kind and month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub kind: AlertKind,
    /// The first day of the month it belongs to.
    pub month: NaiveDate,
    pub cost_micros: i64,
    pub limit_micros: i64,
    pub at: DateTime<Utc>,
}

/// A user's cost counters, throttle and recent requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CostState {
    /// The UTC day `day_cost_micros` counts.
    pub day: Option<NaiveDate>,
    pub day_cost_micros: i64,
    /// The first day of the UTC month `month_cost_micros` counts.
    pub month: Option<NaiveDate>,
    pub month_cost_micros: i64,
    /// Worst-case cost of admitted runs not settled yet; counts against both limits.
    pub held_cost_micros: i64,
    pub throttle: Option<Throttle>,
    /// Times (ms) of admitted requests inside the last window, oldest first, at most the
    /// tier's hourly limit of them.
    pub requests_ms: Vec<i64>,
    /// Alerts already recorded this month.
    pub alerted: Vec<AlertKind>,
}

/// Why a run was not admitted. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("throttled: {0:?}")]
    Throttled(ThrottleReason),
    #[error("hourly request limit of {limit} reached; next slot in {retry_after_ms} ms")]
    RateLimited { limit: u32, retry_after_ms: i64 },
    #[error("daily cost limit: {spent_micros} spent + {held_micros} in flight + {requested_micros} requested > {limit_micros}")]
    DailyCostLimit { limit_micros: i64, spent_micros: i64, held_micros: i64, requested_micros: i64 },
    #[error("monthly cost limit: {spent_micros} spent + {held_micros} in flight + {requested_micros} requested > {limit_micros}")]
    MonthlyCostLimit { limit_micros: i64, spent_micros: i64, held_micros: i64, requested_micros: i64 },
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Throttled(_) => "throttled",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::DailyCostLimit { .. } => "daily_cost_limit",
            Refusal::MonthlyCostLimit { .. } => "monthly_cost_limit",
        }
    }
}

impl From<Refusal> for crate::ledger::Rejection {
    fn from(r: Refusal) -> Self {
        use crate::ledger::Rejection;
        match r {
            Refusal::Throttled(reason) => Rejection::Throttled { reason },
            Refusal::RateLimited { limit, retry_after_ms } => Rejection::RateLimited { limit, retry_after_ms },
            Refusal::DailyCostLimit { limit_micros, spent_micros, held_micros, requested_micros } => {
                Rejection::DailyCostLimit { limit_micros, spent_micros, held_micros, requested_micros }
            }
            Refusal::MonthlyCostLimit { limit_micros, spent_micros, held_micros, requested_micros } => {
                Rejection::MonthlyCostLimit { limit_micros, spent_micros, held_micros, requested_micros }
            }
        }
    }
}

/// Where alerts go besides the store (a mail sender, a chat hook, a metrics counter). Called
/// after the alert's transaction committed, once per alert, on the store's writer: keep it
/// quick (queue the work). The store's own alert table is the record; a sink that missed
/// alerts (a crash between commit and the call) catches up from [`crate::Store::alerts`].
pub trait AlertSink: Send + Sync {
    fn alert(&self, account: &crate::ledger::AccountId, alert: &Alert);
}

/// What settling (or metering) a cost did besides counting it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CostEvents {
    pub alerts: Vec<Alert>,
    pub throttled: Option<ThrottleReason>,
}

pub fn month_start(d: NaiveDate) -> NaiveDate {
    d.with_day(1).expect("day 1 exists")
}

/// The end (exclusive) of the UTC month starting on `month`.
pub fn month_end(month: NaiveDate) -> DateTime<Utc> {
    let next = if month.month() == 12 { NaiveDate::from_ymd_opt(month.year() + 1, 1, 1) } else { NaiveDate::from_ymd_opt(month.year(), month.month() + 1, 1) };
    Utc.from_utc_datetime(&next.expect("valid month").and_hms_opt(0, 0, 0).expect("midnight"))
}

pub fn day_start(d: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight"))
}

impl Throttle {
    /// When a cost throttle lifts by itself (the end of its day or month); `None` for an
    /// admin's throttle.
    pub fn lifts_at(&self) -> Option<DateTime<Utc>> {
        match &self.reason {
            ThrottleReason::DailyCostLimit { day } => Some(day_start(day.succ_opt()?)),
            ThrottleReason::MonthlyCostLimit { month } => Some(month_end(*month)),
            ThrottleReason::Admin { .. } => None,
        }
    }
}

impl CostState {
    /// Whether the cost reset has anything to do at `now`: a month counter of an earlier month,
    /// a non-zero day counter of an earlier day, or a cost throttle whose period ended. (The
    /// stores find these accounts with the same three conditions.)
    pub fn reset_due(&self, now: DateTime<Utc>) -> bool {
        let today = now.date_naive();
        self.month.is_some_and(|m| m < month_start(today))
            || (self.day.is_some_and(|d| d < today) && self.day_cost_micros > 0)
            || self.throttle.as_ref().and_then(Throttle::lifts_at).is_some_and(|t| t <= now)
    }

    /// Moves the counters to `now`'s day and month: a new day or month starts from zero,
    /// lifts the cost throttles of the period that ended, and forgets last month's alerts.
    /// Returns whether anything changed.
    pub fn roll(&mut self, now: DateTime<Utc>) -> bool {
        let today = now.date_naive();
        let this_month = month_start(today);
        let mut changed = false;
        // Only forward: a clock that steps back (a correction, another node a little behind)
        // keeps counting into the period already started, never restarts one.
        if self.day.is_none_or(|d| d < today) {
            self.day = Some(today);
            self.day_cost_micros = 0;
            changed = true;
        }
        if self.month.is_none_or(|m| m < this_month) {
            self.month = Some(this_month);
            self.month_cost_micros = 0;
            self.alerted.clear();
            changed = true;
        }
        let lifted = match &self.throttle {
            Some(Throttle { reason: ThrottleReason::DailyCostLimit { day }, .. }) => *day < today,
            Some(Throttle { reason: ThrottleReason::MonthlyCostLimit { month }, .. }) => *month < this_month,
            _ => false,
        };
        if lifted {
            self.throttle = None;
            changed = true;
        }
        let cutoff = now.timestamp_millis() - REQUEST_WINDOW_MS;
        let before = self.requests_ms.len();
        self.requests_ms.retain(|&t| t > cutoff);
        changed | (self.requests_ms.len() != before)
    }

    /// Admits a run whose worst case costs `worst_micros`, or says why not (changing nothing).
    /// Admitting records the request in the window and holds the worst case against the
    /// limits until [`CostState::settle`] or [`CostState::release`].
    pub fn admit(&mut self, limits: &TierLimits, worst_micros: i64, now: DateTime<Utc>) -> Result<Result<(), Refusal>> {
        if worst_micros < 0 {
            return Err(Error::invalid("worst_cost", "is negative"));
        }
        let mut next = self.clone();
        next.roll(now);
        if let Some(t) = &next.throttle {
            return Ok(Err(Refusal::Throttled(t.reason.clone())));
        }
        let now_ms = now.timestamp_millis();
        if let Some(limit) = limits.hourly_request_limit
            && next.requests_ms.len() >= limit as usize
        {
            // The window holds `limit` times, oldest first; the oldest that must leave for a
            // slot to open is the one `limit` places from the end.
            let retry_after_ms = match limit {
                // A zero limit never opens a slot; say "a window from now".
                0 => REQUEST_WINDOW_MS,
                _ => next.requests_ms[next.requests_ms.len() - limit as usize] + REQUEST_WINDOW_MS - now_ms,
            };
            return Ok(Err(Refusal::RateLimited { limit, retry_after_ms: retry_after_ms.max(1) }));
        }
        let over = |limit: i64, spent: i64| spent.saturating_add(next.held_cost_micros).saturating_add(worst_micros) > limit;
        if let Some(limit) = limits.daily_cost_limit_micros.filter(|&l| over(l, next.day_cost_micros)) {
            return Ok(Err(Refusal::DailyCostLimit {
                limit_micros: limit,
                spent_micros: next.day_cost_micros,
                held_micros: next.held_cost_micros,
                requested_micros: worst_micros,
            }));
        }
        if let Some(limit) = limits.monthly_cost_limit_micros.filter(|&l| over(l, next.month_cost_micros)) {
            return Ok(Err(Refusal::MonthlyCostLimit {
                limit_micros: limit,
                spent_micros: next.month_cost_micros,
                held_micros: next.held_cost_micros,
                requested_micros: worst_micros,
            }));
        }
        if limits.hourly_request_limit.is_some() {
            next.requests_ms.push(now_ms);
        }
        next.held_cost_micros += worst_micros;
        *self = next;
        Ok(Ok(()))
    }

    /// Gives back the worst case held by an admitted run that did not happen.
    pub fn release(&mut self, held_micros: i64) -> Result<()> {
        if !(0..=self.held_cost_micros).contains(&held_micros) {
            return Err(Error::Invariant(format!("release of {held_micros} with {} held", self.held_cost_micros)));
        }
        self.held_cost_micros -= held_micros;
        Ok(())
    }

    /// Counts a run's actual cost (releasing the worst case it held) and applies the
    /// consequences: a throttle when a limit is reached (if the tier throttles), an alert the
    /// first time in the month the cost reaches the tier's threshold or 75 % of the limit.
    /// Metering an operation that was never admitted is a settle with nothing held.
    pub fn settle(&mut self, limits: &TierLimits, held_micros: i64, cost_micros: i64, now: DateTime<Utc>) -> Result<CostEvents> {
        if cost_micros < 0 {
            return Err(Error::invalid("cost", "is negative"));
        }
        if !(0..=self.held_cost_micros).contains(&held_micros) {
            return Err(Error::Invariant(format!("settle of {held_micros} held with {} held", self.held_cost_micros)));
        }
        let mut next = self.clone();
        next.roll(now);
        // The periods the counters are in (a clock behind them counts into them).
        let (day, month) = (next.day.expect("rolled"), next.month.expect("rolled"));
        let (day_before, month_before) = (next.day_cost_micros, next.month_cost_micros);
        next.held_cost_micros -= held_micros;
        next.day_cost_micros = next.day_cost_micros.saturating_add(cost_micros);
        next.month_cost_micros = next.month_cost_micros.saturating_add(cost_micros);
        let mut events = CostEvents::default();
        if limits.throttle_on_exceed {
            // Crossing a limit throttles; the monthly limit replaces a daily throttle (it lasts
            // longer); an admin's throttle stays as it is. A user an admin unthrottled while
            // over a limit is not throttled again until a limit is crossed anew (admission
            // still refuses what would pass a limit).
            let crossed = |limit: Option<i64>, before: i64, after: i64| limit.is_some_and(|l| before < l && after >= l);
            let reason = match &next.throttle {
                None | Some(Throttle { reason: ThrottleReason::DailyCostLimit { .. }, .. })
                    if crossed(limits.monthly_cost_limit_micros, month_before, next.month_cost_micros) =>
                {
                    Some(ThrottleReason::MonthlyCostLimit { month })
                }
                None if crossed(limits.daily_cost_limit_micros, day_before, next.day_cost_micros) => Some(ThrottleReason::DailyCostLimit { day }),
                _ => None,
            };
            if let Some(reason) = reason {
                next.throttle = Some(Throttle { reason: reason.clone(), since: now });
                events.throttled = Some(reason);
            }
        }
        if let Some(limit) = limits.monthly_cost_limit_micros {
            let thresholds = [(AlertKind::AtRisk, Some(pct_of(limit, AT_RISK_PCT))), (AlertKind::Threshold, limits.alert_threshold_micros())];
            for (kind, threshold) in thresholds {
                let crossed = threshold.is_some_and(|t| next.month_cost_micros > t || (kind == AlertKind::Threshold && next.month_cost_micros >= t));
                if crossed && !next.alerted.contains(&kind) {
                    next.alerted.push(kind);
                    events.alerts.push(Alert { kind, month, cost_micros: next.month_cost_micros, limit_micros: limit, at: now });
                }
            }
        }
        *self = next;
        Ok(events)
    }

    /// An admin lifts the throttle. `false`: the user was not throttled (nothing changed but
    /// rolling the counters to `now`).
    pub fn unthrottle(&mut self, now: DateTime<Utc>) -> bool {
        self.roll(now);
        self.throttle.take().is_some()
    }
}

// ---------------------------------------------------------------------------------------------
// Risk and the summary

/// A user's risk level this month, defined as follows (first match wins):
///
/// * `HighRisk` if any of: the user is throttled; a paying tier's cost exceeds what the user
///   pays (the user costs more than they bring); the cost is at or above 90 % of the monthly
///   limit; or the spend velocity projects past the limit: cost so far, extrapolated linearly
///   over the whole month from at least one day of it, exceeds the monthly limit.
/// * `AtRisk` if the cost is above 75 % of the monthly limit.
/// * `Low` otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RiskLevel {
    Low,
    AtRisk,
    HighRisk,
}

impl RiskLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            RiskLevel::Low => "low",
            RiskLevel::AtRisk => "at_risk",
            RiskLevel::HighRisk => "high_risk",
        }
    }
}

/// The risk level of a user with `state` (rolled to `now`) in tier `limits`.
pub fn risk_level(limits: &TierLimits, state: &CostState, now: DateTime<Utc>) -> RiskLevel {
    let mut s = state.clone();
    s.roll(now);
    let cost = s.month_cost_micros;
    if s.throttle.is_some() || (limits.monthly_revenue_micros > 0 && cost > limits.monthly_revenue_micros) {
        return RiskLevel::HighRisk;
    }
    let Some(limit) = limits.monthly_cost_limit_micros else {
        return RiskLevel::Low;
    };
    if cost >= pct_of(limit, HIGH_RISK_PCT) {
        return RiskLevel::HighRisk;
    }
    let month = s.month.expect("rolled");
    let elapsed_ms = (now - day_start(month)).num_milliseconds();
    let month_ms = (month_end(month) - day_start(month)).num_milliseconds();
    if elapsed_ms >= Duration::days(1).num_milliseconds() {
        let projected = i128::from(cost) * i128::from(month_ms) / i128::from(elapsed_ms);
        if projected > i128::from(limit) {
            return RiskLevel::HighRisk;
        }
    }
    if cost > pct_of(limit, AT_RISK_PCT) { RiskLevel::AtRisk } else { RiskLevel::Low }
}

/// One user as the summary sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCost {
    pub tier: String,
    /// Whether the user pays for a plan this month (revenue counts only then).
    pub plan_active: bool,
    pub month_cost_micros: i64,
    pub throttled: bool,
    pub risk: RiskLevel,
}

/// The admin summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub total_monthly_revenue_micros: i64,
    pub total_monthly_cost_micros: i64,
    /// (revenue − cost) / revenue in percent, rounded half away from zero to one decimal;
    /// `None` without revenue.
    pub overall_margin_pct: Option<Decimal>,
    /// Users with a plan or any cost this month.
    pub active_users: u64,
    pub throttled_users: u64,
    pub high_risk_users: u64,
    pub users: u64,
    /// The margin is below 70 %.
    pub margin_below_70: bool,
    /// More than 5 % of users are throttled.
    pub throttled_over_5pct: bool,
}

pub const MARGIN_ALERT_PCT: i64 = 70;
pub const THROTTLED_ALERT_PCT: u64 = 5;

/// Sums users into the summary. Unknown tiers are an error.
pub fn summarize<'a>(tiers: &TierTable, users: impl IntoIterator<Item = &'a UserCost>) -> Result<Summary> {
    let mut s = Summary {
        total_monthly_revenue_micros: 0,
        total_monthly_cost_micros: 0,
        overall_margin_pct: None,
        active_users: 0,
        throttled_users: 0,
        high_risk_users: 0,
        users: 0,
        margin_below_70: false,
        throttled_over_5pct: false,
    };
    for u in users {
        let t = tiers.get(&u.tier)?;
        if u.month_cost_micros < 0 {
            return Err(Error::invalid("month_cost", "is negative"));
        }
        s.users += 1;
        if u.plan_active {
            s.total_monthly_revenue_micros += t.monthly_revenue_micros;
        }
        s.total_monthly_cost_micros += u.month_cost_micros;
        s.active_users += u64::from(u.plan_active || u.month_cost_micros > 0);
        s.throttled_users += u64::from(u.throttled);
        s.high_risk_users += u64::from(u.risk == RiskLevel::HighRisk);
    }
    if s.total_monthly_revenue_micros > 0 {
        let rev = Decimal::from(s.total_monthly_revenue_micros);
        let margin = (rev - Decimal::from(s.total_monthly_cost_micros)) * Decimal::from(100) / rev;
        let margin = margin.round_dp_with_strategy(1, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
        s.margin_below_70 = margin < Decimal::from(MARGIN_ALERT_PCT);
        s.overall_margin_pct = Some(margin);
    }
    s.throttled_over_5pct = s.throttled_users * 100 > s.users * THROTTLED_ALERT_PCT;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::dec;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn tier(name: &str) -> TierLimits {
        TierTable::default().get(name).unwrap().clone()
    }

    #[test]
    fn defaults_are_the_spec_table() {
        let tiers = TierTable::default();
        let row = |n: &str| {
            let l = tiers.get(n).unwrap();
            (
                l.monthly_cost_limit_micros.map(micros_to_usd),
                l.daily_cost_limit_micros.map(micros_to_usd),
                l.hourly_request_limit,
                l.alert_threshold_micros().map(micros_to_usd),
            )
        };
        assert_eq!(row(FREE), (Some(dec!(0.5)), Some(dec!(0.1)), Some(10), Some(dec!(0.4))));
        assert_eq!(row(PRPM_PLUS_INDIVIDUAL), (Some(dec!(5)), Some(dec!(1)), Some(100), Some(dec!(4.5))));
        assert_eq!(row(PRPM_PLUS_ORG), (Some(dec!(2.5)), Some(dec!(0.5)), Some(100), Some(dec!(2.25))));
        assert_eq!(row(UNLIMITED), (Some(dec!(999999.99)), None, None, None));
        for l in tiers.tiers() {
            assert!(l.validate().unwrap().is_empty(), "{l:?}");
        }
        assert_eq!(tiers.get("gold").unwrap_err().code(), "invalid_input");
    }

    #[test]
    fn tier_of_a_user() {
        assert_eq!(tier_of(true, true), PRPM_PLUS_ORG);
        assert_eq!(tier_of(true, false), PRPM_PLUS_INDIVIDUAL);
        assert_eq!(tier_of(false, true), FREE);
        assert_eq!(tier_of(false, false), FREE);
    }

    #[test]
    fn bad_limits_are_refused_and_odd_ones_flagged() {
        let mut tiers = TierTable::default();
        let before = tiers.clone();
        let mut bad = tier(FREE);
        bad.daily_cost_limit_micros = Some(-1);
        assert_eq!(tiers.set(bad).unwrap_err().code(), "invalid_input");
        let mut bad = tier(FREE);
        bad.alert_threshold_pct = Some(0);
        assert!(tiers.set(bad).is_err());
        let mut bad = tier(FREE);
        bad.name = "Free Tier".into();
        assert!(tiers.set(bad).is_err());
        assert_eq!(tiers, before, "refused limits change nothing");

        let mut odd = tier(FREE);
        odd.daily_cost_limit_micros = Some(600_000);
        assert_eq!(tiers.set(odd).unwrap(), vec![LimitWarning::DailyAboveMonthly { daily_micros: 600_000, monthly_micros: 500_000 }]);
        assert_eq!(tiers.get(FREE).unwrap().daily_cost_limit_micros, Some(600_000), "flagged limits are stored");
        let mut zero = tier(PRPM_PLUS_ORG);
        zero.monthly_cost_limit_micros = Some(0);
        assert_eq!(
            tiers.set(zero).unwrap(),
            vec![LimitWarning::ZeroLimit { which: "monthly_cost_limit".into() }, LimitWarning::DailyAboveMonthly { daily_micros: 500_000, monthly_micros: 0 }]
        );
        let mut closed = tier(FREE);
        closed.hourly_request_limit = Some(0);
        assert_eq!(tiers.set(closed.clone()).unwrap(), vec![LimitWarning::ZeroLimit { which: "hourly_request_limit".into() }]);
        let mut s = CostState::default();
        let now = t("2026-01-01T00:00:00Z");
        assert_eq!(s.admit(&closed, 0, now).unwrap(), Err(Refusal::RateLimited { limit: 0, retry_after_ms: REQUEST_WINDOW_MS }));
    }

    #[test]
    fn tier_tables_load_from_toml() {
        let text = r#"
            [[tier]]
            name = "free"
            monthly_revenue = "0"
            monthly_cost_limit = "0.50"
            daily_cost_limit = "0.10"
            hourly_request_limit = 10
            alert_threshold_pct = 80
            throttle_on_exceed = true

            [[tier]]
            name = "prpm_plus_individual"
            monthly_revenue = "6"
            monthly_cost_limit = "5.00"
            daily_cost_limit = "1.00"
            hourly_request_limit = 100
            alert_threshold_pct = 90
            throttle_on_exceed = true

            [[tier]]
            name = "prpm_plus_org"
            monthly_revenue = "3"
            monthly_cost_limit = "2.50"
            daily_cost_limit = "0.50"
            hourly_request_limit = 100
            alert_threshold_pct = 90
            throttle_on_exceed = true

            [[tier]]
            name = "unlimited"
            monthly_revenue = "0"
            monthly_cost_limit = "999999.99"
            throttle_on_exceed = false
        "#;
        let (table, warnings) = TierTable::from_toml_str(text).unwrap();
        assert_eq!(table, TierTable::default(), "the file form of the defaults");
        assert!(warnings.is_empty());

        let odd = text.replace(r#"daily_cost_limit = "0.10""#, r#"daily_cost_limit = "0.60""#);
        let (_, warnings) = TierTable::from_toml_str(&odd).unwrap();
        assert_eq!(warnings, vec![("free".to_string(), LimitWarning::DailyAboveMonthly { daily_micros: 600_000, monthly_micros: 500_000 })]);
        for bad in [
            text.replace(r#"daily_cost_limit = "0.10""#, r#"daily_cost_limit = "-0.10""#),
            text.replace(r#"name = "prpm_plus_org""#, r#"name = "free""#),
            text.replace("alert_threshold_pct = 80", "alert_threshold_pct = 101"),
            text.replace("hourly_request_limit = 10\n", "hourly_request_limit = -1\n"),
            text.replace(r#"monthly_revenue = "6""#, r#"monthly_revenue = "6.0000001""#),
            text.replace("throttle_on_exceed = false", "throttle_on_exceed = false\nsurprise = 1"),
            "tier = []".to_string(),
            "not toml at all [".to_string(),
        ] {
            let err = TierTable::from_toml_str(&bad).unwrap_err();
            assert_eq!(err.code(), "invalid_input", "{bad}: {err}");
        }
    }

    #[test]
    fn usd_conversions_are_exact() {
        assert_eq!(usd_to_micros(dec!(0.92)).unwrap(), 920_000);
        assert_eq!(usd_to_micros(dec!(999999.99)).unwrap(), 999_999_990_000);
        assert!(usd_to_micros(dec!(0.0000001)).is_err());
        assert!(usd_to_micros(dec!(-1)).is_err());
        assert_eq!(micros_to_usd(74_700_000), dec!(74.7));
    }

    #[test]
    fn sliding_window_is_exact_at_the_boundary() {
        let l = tier(FREE); // 10 per hour, $0.10 a day
        let mut s = CostState::default();
        let start = t("2026-03-01T10:00:00Z");
        // 10 requests spread over the first 50 minutes.
        for i in 0..10 {
            assert_eq!(s.admit(&l, 0, start + Duration::minutes(5 * i)).unwrap(), Ok(()));
        }
        // A fixed window would reset at 11:00 and let 10 more through at once; the sliding
        // one opens one slot when 10:00 leaves the window, at 11:00.
        let at = t("2026-03-01T10:59:00Z");
        assert_eq!(s.admit(&l, 0, at).unwrap(), Err(Refusal::RateLimited { limit: 10, retry_after_ms: 60_000 }));
        let at = t("2026-03-01T10:59:59.999Z");
        assert_eq!(s.admit(&l, 0, at).unwrap(), Err(Refusal::RateLimited { limit: 10, retry_after_ms: 1 }));
        assert_eq!(s.admit(&l, 0, t("2026-03-01T11:00:00Z")).unwrap(), Ok(()));
        // The next slot: when 10:05 leaves.
        assert_eq!(s.admit(&l, 0, t("2026-03-01T11:00:00.001Z")).unwrap(), Err(Refusal::RateLimited { limit: 10, retry_after_ms: 5 * 60_000 - 1 }));
        assert_eq!(s.requests_ms.len(), 10);
    }

    #[test]
    fn admission_counts_runs_in_flight_and_refusals_change_nothing() {
        let l = tier(PRPM_PLUS_INDIVIDUAL); // $1/day, $5/month
        let mut s = CostState::default();
        let now = t("2026-03-10T12:00:00Z");
        assert_eq!(s.admit(&l, 600_000, now).unwrap(), Ok(()));
        let before = s.clone();
        assert_eq!(
            s.admit(&l, 400_001, now).unwrap(),
            Err(Refusal::DailyCostLimit { limit_micros: 1_000_000, spent_micros: 0, held_micros: 600_000, requested_micros: 400_001 })
        );
        assert_eq!(s, before);
        assert_eq!(s.admit(&l, 400_000, now).unwrap(), Ok(()), "exactly up to the limit");
        // Settling below the worst case frees the difference.
        s.settle(&l, 600_000, 100_000, now).unwrap();
        s.settle(&l, 400_000, 100_000, now).unwrap();
        assert_eq!((s.day_cost_micros, s.held_cost_micros), (200_000, 0));
        assert_eq!(s.admit(&l, 800_000, now).unwrap(), Ok(()));
        s.release(800_000).unwrap();
        assert!(s.release(1).is_err());
        assert!(s.admit(&l, -1, now).is_err());
    }

    #[test]
    fn reaching_a_limit_throttles_until_the_period_ends() {
        let l = tier(FREE); // $0.10/day, $0.50/month
        let mut s = CostState::default();
        let day1 = t("2026-01-31T23:00:00Z");
        s.admit(&l, 50_000, day1).unwrap().unwrap();
        let ev = s.settle(&l, 50_000, 100_000, day1).unwrap();
        assert_eq!(ev.throttled, Some(ThrottleReason::DailyCostLimit { day: day1.date_naive() }));
        assert!(matches!(s.admit(&l, 0, day1).unwrap(), Err(Refusal::Throttled(ThrottleReason::DailyCostLimit { .. }))));
        // Next day (and a new month): lifted, counters from zero.
        let day2 = t("2026-02-01T00:00:00Z");
        assert_eq!(s.admit(&l, 0, day2).unwrap(), Ok(()));
        assert_eq!((s.day_cost_micros, s.month_cost_micros), (0, 0));
        s.settle(&l, 0, 0, day2).unwrap();
        // The monthly limit, over five days.
        for d in 0..5 {
            let now = day2 + Duration::days(d);
            s.admit(&l, 0, now).unwrap().unwrap();
            let ev = s.settle(&l, 0, 99_999, now).unwrap();
            assert_eq!(ev.throttled, None, "day {d}");
        }
        let now = day2 + Duration::days(5);
        s.admit(&l, 0, now).unwrap().unwrap();
        let ev = s.settle(&l, 0, 5, now).unwrap();
        assert_eq!(ev.throttled, Some(ThrottleReason::MonthlyCostLimit { month: NaiveDate::from_ymd_opt(2026, 2, 1).unwrap() }));
        assert!(matches!(s.admit(&l, 0, day2 + Duration::days(6)).unwrap(), Err(Refusal::Throttled(_))), "not lifted by a new day");
        assert_eq!(s.admit(&l, 0, t("2026-03-01T00:00:00Z")).unwrap(), Ok(()), "lifted by the new month");
    }

    #[test]
    fn unthrottle_and_tiers_that_do_not_throttle() {
        let l = tier(FREE);
        let mut s = CostState::default();
        let now = t("2026-05-05T05:00:00Z");
        s.settle(&l, 0, 200_000, now).unwrap();
        assert!(s.throttle.is_some());
        assert!(s.unthrottle(now));
        assert!(!s.unthrottle(now), "not throttled: says so, changes nothing");
        let mut u = tier(UNLIMITED);
        u.monthly_cost_limit_micros = Some(1);
        let mut s = CostState::default();
        assert_eq!(s.settle(&u, 0, 5_000_000, now).unwrap().throttled, None);
    }

    #[test]
    fn alerts_once_per_user_kind_and_month() {
        let l = tier(PRPM_PLUS_INDIVIDUAL); // alert at $4.50, at risk above $3.75
        let mut s = CostState::default();
        let now = t("2026-07-20T00:00:00Z");
        let mut kinds = Vec::new();
        for cost in [3_000_000, 750_000, 1, 749_999, 100_000, 100_000] {
            kinds.extend(s.settle(&l, 0, cost, now).unwrap().alerts.into_iter().map(|a| (a.kind, a.cost_micros)));
        }
        assert_eq!(kinds, vec![(AlertKind::AtRisk, 3_750_001), (AlertKind::Threshold, 4_500_000)]);
        let next = s.settle(&l, 0, 3_800_000, t("2026-08-02T00:00:00Z")).unwrap();
        assert_eq!(next.alerts.iter().map(|a| a.kind).collect::<Vec<_>>(), vec![AlertKind::AtRisk], "a new month alerts again");
    }

    #[test]
    fn risk_levels() {
        let ind = tier(PRPM_PLUS_INDIVIDUAL); // $6 revenue, $5 limit
        let org = tier(PRPM_PLUS_ORG); // $3 revenue, $2.50 limit
        let at = |cost: i64, now: DateTime<Utc>| CostState {
            day: Some(now.date_naive()),
            month: Some(now.date_naive().with_day(1).unwrap()),
            month_cost_micros: cost,
            ..CostState::default()
        };
        let late = t("2026-04-29T00:00:00Z"); // 28 of 30 days gone
        assert_eq!(risk_level(&ind, &at(3_000_000, late), late), RiskLevel::Low);
        assert_eq!(risk_level(&ind, &at(3_750_001, late), late), RiskLevel::AtRisk);
        assert_eq!(risk_level(&ind, &at(4_500_000, late), late), RiskLevel::HighRisk);
        // Velocity: $1 after 3 days of April projects to $10 > $5.
        let early = t("2026-04-04T00:00:00Z");
        assert_eq!(risk_level(&ind, &at(1_000_000, early), early), RiskLevel::HighRisk);
        assert_eq!(risk_level(&ind, &at(400_000, early), early), RiskLevel::Low);
        // Less than a day in: no projection.
        let first = t("2026-04-01T06:00:00Z");
        assert_eq!(risk_level(&ind, &at(1_000_000, first), first), RiskLevel::Low);
        // An org member costing more than the $3 they pay is high-risk only when the limit
        // allows it; the limit ($2.50) is below it, so via the 90 % rule instead.
        assert_eq!(risk_level(&org, &at(2_250_000, late), late), RiskLevel::HighRisk);
        let mut generous = org.clone();
        generous.monthly_cost_limit_micros = Some(10_000_000);
        assert_eq!(risk_level(&generous, &at(3_000_001, late), late), RiskLevel::HighRisk, "costs more than it pays");
        let mut s = at(0, late);
        s.throttle = Some(Throttle { reason: ThrottleReason::Admin { by: "a".into(), why: "b".into() }, since: late });
        assert_eq!(risk_level(&ind, &s, late), RiskLevel::HighRisk);
    }

    #[test]
    fn the_reference_scenario() {
        let tiers = TierTable::default();
        let user = |tier: &str, plan: bool, cost: i64| UserCost {
            tier: tier.into(),
            plan_active: plan,
            month_cost_micros: cost,
            throttled: false,
            risk: RiskLevel::Low,
        };
        let mut users = Vec::new();
        users.extend((0..60).map(|_| user(PRPM_PLUS_INDIVIDUAL, true, 920_000)));
        users.extend((0..30).map(|_| user(PRPM_PLUS_ORG, true, 600_000)));
        users.extend((0..10).map(|_| user(FREE, false, 150_000)));
        let s = summarize(&tiers, &users).unwrap();
        assert_eq!(micros_to_usd(s.total_monthly_revenue_micros), dec!(450));
        assert_eq!(micros_to_usd(s.total_monthly_cost_micros), dec!(74.7));
        assert_eq!(s.overall_margin_pct, Some(dec!(83.4)));
        assert_eq!((s.active_users, s.users, s.margin_below_70, s.throttled_over_5pct), (100, 100, false, false));

        // Six of them throttled (> 5 %) and costs that sink the margin below 70 %.
        for u in users.iter_mut().take(6) {
            u.throttled = true;
            u.month_cost_micros = 15_000_000;
        }
        let s = summarize(&tiers, &users).unwrap();
        assert!(s.throttled_over_5pct && s.margin_below_70, "{s:?}");
        users.push(user("gold", true, 0));
        assert!(summarize(&tiers, &users).is_err());
    }
}
