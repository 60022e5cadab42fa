//! What-if pricing: replays a period's real usage under other tier limits, prices, model
//! multipliers, credit sizes or request caps, and projects revenue, cost, margin and the users
//! who would have been throttled: the documents' "adjustment recommendations" made computable.
//!
//! Pure functions, no I/O; money is integer micro-dollars, margins are [`Decimal`]. The replay
//! applies the store's own cost-control rules ([`CostState::admit`] and [`CostState::settle`])
//! request by request, in time order, so a projection refuses exactly what the store would
//! have refused under those limits.
//!
//! How one usage record is replayed:
//!
//! 1. Its cost: re-priced from its tokens with the scenario's price of its model
//!    ([`cost_usd`], rounded up to the micro-dollar like every charge), or the cost recorded
//!    when the scenario does not re-price that model.
//! 2. Refused when its input (input + cache-read + cache-write tokens) is over the scenario's
//!    request cap.
//! 3. Admitted or refused by the user's tier limits (the scenario's version of the tier) with
//!    its cost as the worst case: throttled, hourly request limit, daily or monthly cost limit.
//! 4. Once admitted, settled at that cost: the counters move, and crossing a limit throttles
//!    the user (tiers with `throttle_on_exceed`) until the period ends, as in the store.
//! 5. Its credits: [`credits_for`] of its tokens at the scenario's credit size and the model's
//!    multiplier (the scenario's, else the price table's, else 1).
//!
//! Revenue is what the paying users' tiers charge (the scenario's `monthly_revenue`) for each
//! calendar month the period touches; margin is (revenue − cost) / revenue, rounded half away
//! from zero to one decimal, as in the admin summary.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Datelike, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::cost::{CostState, TierLimits, TierTable};
use crate::error::{Error, Result};
use crate::ledger::{AccountId, Credits};
use crate::pricing::{ModelPrice, PriceTable, TOKENS_PER_CREDIT, TokenUsage, cost_usd, usd_to_micros_ceil};

/// A user as the replay sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimUser {
    pub account: AccountId,
    /// The tier whose limits (and revenue) apply.
    pub tier: String,
    /// Whether the user pays the tier's monthly revenue.
    pub paying: bool,
}

/// One usage record to replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimUsage {
    pub account: AccountId,
    pub at: DateTime<Utc>,
    pub model: String,
    pub tokens: TokenUsage,
    /// The cost recorded (kept unless the scenario re-prices the model).
    pub cost_micros: i64,
}

/// What changes. Empty: today's tiers, prices, multipliers and credit size, no request cap.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scenario {
    /// Tiers replaced (by name): limits, revenue, throttling. Others keep the base table's.
    pub tiers: Vec<TierLimits>,
    /// Models re-priced (by id). Others keep the cost each record has.
    pub prices: Vec<ModelPrice>,
    /// Credit multipliers by model id.
    pub multipliers: BTreeMap<String, u32>,
    /// Tokens per credit (default [`TOKENS_PER_CREDIT`]).
    pub tokens_per_credit: Option<u64>,
    /// Largest input of one request, in tokens; larger requests are refused.
    pub request_cap_tokens: Option<u64>,
}

/// Why the replay refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refused {
    RequestTooLarge,
    Throttled,
    RateLimited,
    DailyCostLimit,
    MonthlyCostLimit,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::RequestTooLarge => "request_too_large",
            Refused::Throttled => "throttled",
            Refused::RateLimited => "rate_limited",
            Refused::DailyCostLimit => "daily_cost_limit",
            Refused::MonthlyCostLimit => "monthly_cost_limit",
        }
    }
}

/// Totals of a group of users (all of them, a tier, or one user).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub users: u64,
    pub paying_users: u64,
    pub revenue_micros: i64,
    /// Cost of the admitted requests.
    pub cost_micros: i64,
    /// (revenue − cost) / revenue in percent, one decimal; `None` without revenue.
    pub margin_pct: Option<Decimal>,
    pub credits: Credits,
    pub admitted: u64,
    pub refused: u64,
    /// Cost the refused requests would have had.
    pub refused_cost_micros: i64,
    /// Users throttled at some point of the replay.
    pub throttled_users: u64,
}

/// One user's projection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserProjection {
    pub account: AccountId,
    pub tier: String,
    pub totals: Totals,
    /// When the replay first throttled the user, and why (`daily_cost_limit`, ...).
    pub throttled_at: Option<DateTime<Utc>>,
    pub throttle_reason: Option<String>,
}

/// The projection of a scenario.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Projection {
    /// Calendar months the period touches (revenue counts each).
    pub months: u32,
    pub totals: Totals,
    /// Refused requests by reason.
    pub refused_by: BTreeMap<Refused, u64>,
    /// By tier name.
    pub tiers: BTreeMap<String, Totals>,
    /// By account, ascending.
    pub users: Vec<UserProjection>,
    /// Users throttled at some point, ascending.
    pub throttled: Vec<AccountId>,
}

/// Credits for `total_tokens` at `tokens_per_credit` and `multiplier`: ceil(tokens / size), at
/// least 1, times the multiplier ([`crate::pricing::credits_for_tokens`] with another size).
pub fn credits_for(total_tokens: u64, tokens_per_credit: u64, multiplier: u32) -> u64 {
    total_tokens.div_ceil(tokens_per_credit.max(1)).max(1) * u64::from(multiplier)
}

/// Calendar months (UTC) that `[from, until)` touches; at least 1.
pub fn months_in(from: DateTime<Utc>, until: DateTime<Utc>) -> u32 {
    let last = if until > from { until - chrono::Duration::milliseconds(1) } else { from };
    let index = |t: DateTime<Utc>| i64::from(t.year()) * 12 + i64::from(t.month0());
    u32::try_from((index(last) - index(from) + 1).max(1)).unwrap_or(u32::MAX)
}

/// (revenue − cost) / revenue in percent, rounded half away from zero to one decimal, as the
/// admin summary rounds it; `None` without revenue.
pub fn margin_pct(revenue_micros: i64, cost_micros: i64) -> Option<Decimal> {
    if revenue_micros <= 0 {
        return None;
    }
    let rev = Decimal::from(revenue_micros);
    let m = (rev - Decimal::from(cost_micros)) * Decimal::from(100) / rev;
    Some(m.round_dp_with_strategy(1, rust_decimal::RoundingStrategy::MidpointAwayFromZero))
}

/// The tier table with the scenario's tiers in place (each validated).
pub fn scenario_tiers(base: &TierTable, scenario: &Scenario) -> Result<TierTable> {
    let mut tiers = base.clone();
    for t in &scenario.tiers {
        tiers.set(t.clone())?;
    }
    Ok(tiers)
}

/// Replays `usage` (of `users`, over `months` calendar months) under `scenario`, on top of the
/// base `tiers` and `prices`. Usage of an account not among `users`, a user in an unknown tier,
/// or a bad scenario value is [`Error::InvalidInput`].
pub fn simulate(tiers: &TierTable, prices: &PriceTable, scenario: &Scenario, users: &[SimUser], usage: &[SimUsage], months: u32) -> Result<Projection> {
    if months == 0 {
        return Err(Error::InvalidInput { field: "months", reason: "must be at least 1".into() });
    }
    let tiers = scenario_tiers(tiers, scenario)?;
    let tokens_per_credit = scenario.tokens_per_credit.unwrap_or(TOKENS_PER_CREDIT);
    if tokens_per_credit == 0 || tokens_per_credit > crate::pricing::MAX_TOKENS {
        return Err(Error::InvalidInput { field: "tokens_per_credit", reason: format!("{tokens_per_credit} is outside 1..={}", crate::pricing::MAX_TOKENS) });
    }
    for (model, m) in &scenario.multipliers {
        if !(1..=100).contains(m) {
            return Err(Error::InvalidInput { field: "multiplier", reason: format!("{model}: {m} is outside 1..=100") });
        }
    }
    // The scenario's prices, validated as a table (ids and aliases as given).
    let repriced: HashMap<&str, &ModelPrice> = if scenario.prices.is_empty() {
        HashMap::new()
    } else {
        PriceTable::new(scenario.prices.clone())?;
        scenario.prices.iter().map(|p| (p.id.as_str(), p)).collect()
    };
    let multiplier = |model: &str| -> u32 { scenario.multipliers.get(model).copied().or_else(|| prices.get(model).ok().map(|p| p.multiplier)).unwrap_or(1) };

    struct State<'a> {
        user: &'a SimUser,
        limits: &'a TierLimits,
        cost: CostState,
        totals: Totals,
        throttled_at: Option<DateTime<Utc>>,
        throttle_reason: Option<String>,
    }
    let mut states: BTreeMap<&AccountId, State<'_>> = BTreeMap::new();
    for u in users {
        let limits = tiers.get(&u.tier)?;
        let totals = Totals {
            users: 1,
            paying_users: u64::from(u.paying),
            revenue_micros: if u.paying { limits.monthly_revenue_micros * i64::from(months) } else { 0 },
            ..Totals::default()
        };
        let state = State { user: u, limits, cost: CostState::default(), totals, throttled_at: None, throttle_reason: None };
        if states.insert(&u.account, state).is_some() {
            return Err(Error::InvalidInput { field: "users", reason: format!("{} appears twice", u.account) });
        }
    }

    let mut order: Vec<usize> = (0..usage.len()).collect();
    order.sort_by(|&a, &b| (usage[a].at, &usage[a].account, a).cmp(&(usage[b].at, &usage[b].account, b)));
    let mut refused_by: BTreeMap<Refused, u64> = BTreeMap::new();
    for i in order {
        let r = &usage[i];
        let Some(s) = states.get_mut(&r.account) else {
            return Err(Error::InvalidInput { field: "usage", reason: format!("account {} is not among the users", r.account) });
        };
        if r.cost_micros < 0 {
            return Err(Error::InvalidInput { field: "cost_micros", reason: format!("{} is negative", r.cost_micros) });
        }
        let cost = match repriced.get(r.model.as_str()) {
            Some(p) => usd_to_micros_ceil(cost_usd(p, &r.tokens)),
            None => r.cost_micros,
        };
        let input = r.tokens.input + r.tokens.cache_read + r.tokens.cache_write;
        let refusal = if scenario.request_cap_tokens.is_some_and(|cap| input > cap) {
            Some(Refused::RequestTooLarge)
        } else {
            match s.cost.admit(s.limits, cost, r.at)? {
                Ok(()) => None,
                Err(refusal) => Some(match refusal {
                    crate::cost::Refusal::Throttled(_) => Refused::Throttled,
                    crate::cost::Refusal::RateLimited { .. } => Refused::RateLimited,
                    crate::cost::Refusal::DailyCostLimit { .. } => Refused::DailyCostLimit,
                    crate::cost::Refusal::MonthlyCostLimit { .. } => Refused::MonthlyCostLimit,
                }),
            }
        };
        if let Some(why) = refusal {
            *refused_by.entry(why).or_default() += 1;
            s.totals.refused += 1;
            s.totals.refused_cost_micros += cost;
            continue;
        }
        let events = s.cost.settle(s.limits, cost, cost, r.at)?;
        if let Some(reason) = events.throttled
            && s.throttled_at.is_none()
        {
            s.throttled_at = Some(r.at);
            s.throttle_reason = Some(reason.code().to_owned());
        }
        s.totals.admitted += 1;
        s.totals.cost_micros += cost;
        let credits = credits_for(r.tokens.total(), tokens_per_credit, multiplier(&r.model));
        s.totals.credits += Credits::try_from(credits).map_err(|_| Error::InvalidInput { field: "tokens", reason: "too many credits".into() })?;
    }

    let mut all = Totals::default();
    let mut by_tier: BTreeMap<String, Totals> = BTreeMap::new();
    let mut projections = Vec::with_capacity(states.len());
    let mut throttled = Vec::new();
    for (account, mut s) in states {
        s.totals.throttled_users = u64::from(s.throttled_at.is_some());
        s.totals.margin_pct = margin_pct(s.totals.revenue_micros, s.totals.cost_micros);
        add(&mut all, &s.totals);
        add(by_tier.entry(s.user.tier.clone()).or_default(), &s.totals);
        if s.throttled_at.is_some() {
            throttled.push(account.clone());
        }
        projections.push(UserProjection {
            account: account.clone(),
            tier: s.user.tier.clone(),
            totals: s.totals,
            throttled_at: s.throttled_at,
            throttle_reason: s.throttle_reason,
        });
    }
    all.margin_pct = margin_pct(all.revenue_micros, all.cost_micros);
    for t in by_tier.values_mut() {
        t.margin_pct = margin_pct(t.revenue_micros, t.cost_micros);
    }
    Ok(Projection { months, totals: all, refused_by, tiers: by_tier, users: projections, throttled })
}

fn add(sum: &mut Totals, t: &Totals) {
    sum.users += t.users;
    sum.paying_users += t.paying_users;
    sum.revenue_micros += t.revenue_micros;
    sum.cost_micros += t.cost_micros;
    sum.credits += t.credits;
    sum.admitted += t.admitted;
    sum.refused += t.refused;
    sum.refused_cost_micros += t.refused_cost_micros;
    sum.throttled_users += t.throttled_users;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{FREE, PRPM_PLUS_INDIVIDUAL, PRPM_PLUS_ORG};
    use chrono::TimeZone;
    use rust_decimal::dec;

    fn acct(s: &str) -> AccountId {
        AccountId::new(s).unwrap()
    }

    fn user(id: &str, tier: &str, paying: bool) -> SimUser {
        SimUser { account: acct(id), tier: tier.into(), paying }
    }

    fn at(d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, d, h, 0, 0).unwrap()
    }

    fn run(id: &str, when: DateTime<Utc>, model: &str, input: u64, output: u64, cost_micros: i64) -> SimUsage {
        SimUsage { account: acct(id), at: when, model: model.into(), tokens: TokenUsage { input, output, cache_read: 0, cache_write: 0 }, cost_micros }
    }

    fn tier(name: &str) -> TierLimits {
        TierTable::default().get(name).unwrap().clone()
    }

    const SONNET: &str = "claude-sonnet-4-5";
    const OPUS: &str = "claude-opus-4-5";

    /// The data of the hand-checked cases: three users over March 2026.
    ///
    /// * `ind` (PRPM+ Individual, pays $6; $1.00 a day, $5.00 a month): three Sonnet runs of
    ///   $0.40 on the 2nd, one of 16,000 input tokens ($0.10) on the 3rd, one Opus run of $0.50
    ///   on the 4th.
    /// * `org` (PRPM+ Org, pays $3; $0.50 a day, $2.50 a month): $0.45 a day on the 1st to 6th.
    /// * `free` (free; $0.10 a day, 10 requests an hour): three runs of $0.05 on the 2nd.
    fn data() -> (Vec<SimUser>, Vec<SimUsage>) {
        let users = vec![user("ind", PRPM_PLUS_INDIVIDUAL, true), user("org", PRPM_PLUS_ORG, true), user("free", FREE, false)];
        let mut usage = vec![
            run("ind", at(2, 9), SONNET, 4_000, 1_000, 400_000),
            run("ind", at(2, 10), SONNET, 4_000, 1_000, 400_000),
            run("ind", at(2, 11), SONNET, 4_000, 1_000, 400_000),
            run("ind", at(3, 9), SONNET, 16_000, 0, 100_000),
            run("ind", at(4, 9), OPUS, 6_000, 4_000, 500_000),
        ];
        usage.extend((1..=6).map(|d| run("org", at(d, 12), SONNET, 1_000, 1_000, 450_000)));
        usage.extend((0..3).map(|h| run("free", at(2, 13 + h), SONNET, 500, 500, 50_000)));
        (users, usage)
    }

    #[test]
    fn todays_rules_by_hand() {
        let (users, usage) = data();
        let p = simulate(&TierTable::default(), &PriceTable::default(), &Scenario::default(), &users, &usage, 1).unwrap();
        // ind: $0.40 + $0.40 admitted; the third $0.40 would make $1.20 > $1.00 a day: refused
        // (daily). 16,000 input tokens: no cap today, admitted ($0.10, on a new day). Opus $0.50:
        // admitted. Cost $1.40.
        let ind = &p.users.iter().find(|u| u.account.as_str() == "ind").unwrap().totals;
        assert_eq!((ind.cost_micros, ind.admitted, ind.refused, ind.refused_cost_micros), (1_400_000, 4, 1, 400_000));
        // Credits: Sonnet 5,000 tokens = 1 credit (twice), 16,000 tokens = 4 credits, Opus
        // 10,000 tokens = 2 × 5 = 10 credits: 16.
        assert_eq!(ind.credits, 16);
        // org: $0.45 a day on the 1st..5th = $2.25; the 6th would make $2.70 > $2.50: refused
        // (monthly).
        let org = &p.users.iter().find(|u| u.account.as_str() == "org").unwrap().totals;
        assert_eq!((org.cost_micros, org.admitted, org.refused), (2_250_000, 5, 1));
        // free: $0.05 + $0.05 reaches the $0.10 daily limit: throttled at 14:00; the third is
        // refused as throttled.
        let free = p.users.iter().find(|u| u.account.as_str() == "free").unwrap();
        assert_eq!((free.totals.cost_micros, free.totals.admitted, free.totals.refused), (100_000, 2, 1));
        assert_eq!((free.throttled_at, free.throttle_reason.as_deref()), (Some(at(2, 14)), Some("daily_cost_limit")));
        assert_eq!(p.throttled, vec![acct("free")]);
        assert_eq!(p.refused_by, BTreeMap::from([(Refused::Throttled, 1), (Refused::DailyCostLimit, 1), (Refused::MonthlyCostLimit, 1)]));
        // Revenue $6 + $3 = $9; cost $1.40 + $2.25 + $0.10 = $3.75; margin 5.25 / 9 = 58.33 %.
        assert_eq!((p.totals.revenue_micros, p.totals.cost_micros), (9_000_000, 3_750_000));
        assert_eq!(p.totals.margin_pct, Some(dec!(58.3)));
        assert_eq!((p.totals.users, p.totals.paying_users, p.totals.throttled_users), (3, 2, 1));
        // By tier: the org tier alone, $3 against $2.25: 25 %.
        assert_eq!(p.tiers[PRPM_PLUS_ORG].margin_pct, Some(dec!(25.0)));
        assert_eq!(p.tiers[FREE].margin_pct, None);
    }

    #[test]
    fn the_documents_adjustments_by_hand() {
        // Org limit $2.00, individual price $7, request cap 15,000 tokens.
        let (users, usage) = data();
        let mut org = tier(PRPM_PLUS_ORG);
        org.monthly_cost_limit_micros = Some(2_000_000);
        let mut ind = tier(PRPM_PLUS_INDIVIDUAL);
        ind.monthly_revenue_micros = 7_000_000;
        let scenario = Scenario { tiers: vec![org, ind], request_cap_tokens: Some(15_000), ..Scenario::default() };
        let p = simulate(&TierTable::default(), &PriceTable::default(), &scenario, &users, &usage, 1).unwrap();
        // ind loses the 16,000-token request: $1.30. org: 4 × $0.45 = $1.80; the 5th would make
        // $2.25 > $2.00: refused, and the 6th too. free unchanged: $0.10.
        let cost = |id: &str| p.users.iter().find(|u| u.account.as_str() == id).unwrap().totals.cost_micros;
        assert_eq!((cost("ind"), cost("org"), cost("free")), (1_300_000, 1_800_000, 100_000));
        assert_eq!(p.refused_by[&Refused::RequestTooLarge], 1);
        assert_eq!(p.refused_by[&Refused::MonthlyCostLimit], 2);
        // Revenue $7 + $3 = $10, cost $3.20, margin 68 %.
        assert_eq!((p.totals.revenue_micros, p.totals.cost_micros, p.totals.margin_pct), (10_000_000, 3_200_000, Some(dec!(68.0))));
        // Over two months the revenue doubles; the cost is what was replayed.
        let p2 = simulate(&TierTable::default(), &PriceTable::default(), &scenario, &users, &usage, 2).unwrap();
        assert_eq!((p2.totals.revenue_micros, p2.totals.cost_micros, p2.totals.margin_pct), (20_000_000, 3_200_000, Some(dec!(84.0))));
    }

    #[test]
    fn prices_multipliers_and_credit_sizes_by_hand() {
        let (users, usage) = data();
        // Sonnet at $1 / $5 per million tokens; Opus credits at 3×; 10,000 tokens a credit.
        let mut sonnet = PriceTable::default().get(SONNET).unwrap().clone();
        sonnet.input_usd_per_mtok = dec!(1);
        sonnet.output_usd_per_mtok = dec!(5);
        let scenario =
            Scenario { prices: vec![sonnet], multipliers: BTreeMap::from([(OPUS.to_string(), 3)]), tokens_per_credit: Some(10_000), ..Scenario::default() };
        let p = simulate(&TierTable::default(), &PriceTable::default(), &scenario, &users, &usage, 1).unwrap();
        // ind: Sonnet 4,000 in + 1,000 out = $0.004 + $0.005 = $0.009, three times (all fit now);
        // 16,000 in = $0.016; Opus keeps its recorded $0.50. Cost $0.543.
        // Credits at 10,000 tokens: 1 + 1 + 1 + 2 + (10,000 tokens: 1 × 3) = 8.
        let ind = &p.users.iter().find(|u| u.account.as_str() == "ind").unwrap().totals;
        assert_eq!((ind.cost_micros, ind.admitted, ind.credits), (543_000, 5, 8));
        // org: 1,000 + 1,000 tokens = $0.001 + $0.005 = $0.006 a day, six days: $0.036.
        // free: 500 + 500 = $0.0005 + $0.0025 = $0.003, three times: $0.009.
        let cost = |id: &str| p.users.iter().find(|u| u.account.as_str() == id).unwrap().totals.cost_micros;
        assert_eq!((cost("org"), cost("free")), (36_000, 9_000));
        assert!(p.throttled.is_empty());
        assert_eq!(p.totals.refused, 0);
        // Revenue $9, cost $0.588: margin 93.4666... -> 93.5 %.
        assert_eq!((p.totals.cost_micros, p.totals.margin_pct), (588_000, Some(dec!(93.5))));
    }

    #[test]
    fn hourly_request_limits_replay_exactly() {
        // Eleven free requests in one hour: the sliding window admits ten; the eleventh an hour
        // after the first is admitted again.
        let users = vec![user("f", FREE, false)];
        let mut usage: Vec<SimUsage> = (0..11).map(|m| run("f", at(5, 10) + chrono::Duration::minutes(m), SONNET, 10, 10, 0)).collect();
        usage.push(run("f", at(5, 11), SONNET, 10, 10, 0));
        let p = simulate(&TierTable::default(), &PriceTable::default(), &Scenario::default(), &users, &usage, 1).unwrap();
        assert_eq!((p.totals.admitted, p.totals.refused), (11, 1));
        assert_eq!(p.refused_by, BTreeMap::from([(Refused::RateLimited, 1)]));
        // Raising the free tier's limit to 20 admits all twelve.
        let mut free = tier(FREE);
        free.hourly_request_limit = Some(20);
        let p = simulate(&TierTable::default(), &PriceTable::default(), &Scenario { tiers: vec![free], ..Scenario::default() }, &users, &usage, 1).unwrap();
        assert_eq!((p.totals.admitted, p.totals.refused), (12, 0));
    }

    #[test]
    fn the_reference_scenario_projects_the_summary() {
        // 60 Individual + 30 Org + 10 Free at $0.92 / $0.60 / $0.15: revenue $450.00, cost
        // $74.70, margin 83.4 % (the admin summary's figures), and $7 for Individual adds $60.
        let mut users = Vec::new();
        let mut usage = Vec::new();
        for i in 0..100 {
            let (tier, paying, costs): (&str, bool, &[i64]) = match i {
                0..60 => (PRPM_PLUS_INDIVIDUAL, true, &[920_000]),
                60..90 => (PRPM_PLUS_ORG, true, &[300_000, 300_000]),
                _ => (FREE, false, &[75_000, 75_000]),
            };
            let id = format!("u{i:03}");
            users.push(user(&id, tier, paying));
            usage.extend(costs.iter().enumerate().map(|(d, c)| run(&id, at(10 + d as u32, 8), SONNET, 100, 100, *c)));
        }
        let p = simulate(&TierTable::default(), &PriceTable::default(), &Scenario::default(), &users, &usage, 1).unwrap();
        assert_eq!((p.totals.revenue_micros, p.totals.cost_micros, p.totals.margin_pct), (450_000_000, 74_700_000, Some(dec!(83.4))));
        let mut ind = tier(PRPM_PLUS_INDIVIDUAL);
        ind.monthly_revenue_micros = 7_000_000;
        let p = simulate(&TierTable::default(), &PriceTable::default(), &Scenario { tiers: vec![ind], ..Scenario::default() }, &users, &usage, 1).unwrap();
        // (510 − 74.70) / 510 = 85.35... -> 85.4 %.
        assert_eq!((p.totals.revenue_micros, p.totals.margin_pct), (510_000_000, Some(dec!(85.4))));
    }

    #[test]
    fn bad_input_is_refused() {
        let (users, usage) = data();
        let none = Scenario::default();
        let t = TierTable::default();
        let pt = PriceTable::default();
        assert!(simulate(&t, &pt, &none, &users, &usage, 0).is_err());
        assert!(simulate(&t, &pt, &none, &users[..2], &usage, 1).is_err(), "usage of an unknown user");
        assert!(simulate(&t, &pt, &none, &[user("x", "gold", true)], &[], 1).is_err(), "unknown tier");
        let twice = vec![user("x", FREE, false), user("x", FREE, false)];
        assert!(simulate(&t, &pt, &none, &twice, &[], 1).is_err());
        for bad in [
            Scenario { tokens_per_credit: Some(0), ..Scenario::default() },
            Scenario { multipliers: BTreeMap::from([(OPUS.to_string(), 0)]), ..Scenario::default() },
            Scenario { tiers: vec![TierLimits { daily_cost_limit_micros: Some(-1), ..tier(FREE) }], ..Scenario::default() },
        ] {
            assert_eq!(simulate(&t, &pt, &bad, &users, &usage, 1).unwrap_err().code(), "invalid_input", "{bad:?}");
        }
    }

    #[test]
    fn helpers() {
        for tokens in [0, 1, 4_999, 5_000, 5_001, 20_000, 123_456] {
            for m in [1, 5] {
                assert_eq!(credits_for(tokens, TOKENS_PER_CREDIT, m), crate::pricing::credits_for_tokens(tokens, m));
            }
        }
        assert_eq!(credits_for(10_001, 10_000, 3), 6);
        assert_eq!(months_in(at(1, 0), Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap()), 1);
        assert_eq!(months_in(at(1, 0), Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 1).unwrap()), 2);
        assert_eq!(months_in(Utc.with_ymd_and_hms(2025, 12, 31, 0, 0, 0).unwrap(), at(1, 0)), 3);
        assert_eq!(months_in(at(5, 0), at(5, 0)), 1);
        assert_eq!(margin_pct(450_000_000, 74_700_000), Some(dec!(83.4)));
        assert_eq!(margin_pct(0, 5), None);
        assert_eq!(margin_pct(1_000, 2_000), Some(dec!(-100.0)));
    }
}
