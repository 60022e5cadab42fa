//! Ledger vocabulary: ids, buckets, requests (commands), results (effects) and rejections.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::cost::{CostEvents, LimitWarning, ThrottleReason};
use crate::error::{Error, Result};
use crate::pricing::{MAX_TOKENS, TokenUsage};

/// Credits are whole numbers.
pub type Credits = i64;

/// Largest amount one request may move, and largest balance a bucket may hold.
pub const MAX_CREDITS_PER_REQUEST: Credits = 1_000_000_000;
pub const MAX_BUCKET_CREDITS: Credits = 1_000_000_000_000;
/// Grants may create at most this many rollover lots (distinct expiry dates) per account.
pub const MAX_ROLLOVER_LOTS: usize = 8;
/// The rollover step and refunds may go up to this many; past it, lots merge (see rules).
pub const MAX_ROLLOVER_LOTS_HARD: usize = 16;
/// Longest hold, in seconds (a day).
pub const MAX_HOLD_TTL_SECS: u32 = 86_400;
/// Largest USD cost of one usage record, in micro-dollars ($1,000,000).
pub const MAX_COST_MICROS: i64 = 1_000_000_000_000;
const MAX_ID_LEN: usize = 128;
const MAX_KEY_LEN: usize = 255;
const MAX_REFERENCE_LEN: usize = 256;

fn check_name(field: &'static str, s: &str, max: usize, allow_empty: bool) -> Result<()> {
    if s.is_empty() && !allow_empty {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if s.len() > max {
        return Err(Error::invalid(field, format!("longer than {max} bytes")));
    }
    if s.chars().any(char::is_control) {
        return Err(Error::invalid(field, "contains control characters"));
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$m:meta])* $name:ident, $field:literal, $max:expr) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Result<Self> {
                let s = s.into();
                check_name($field, &s, $max, false)?;
                Ok($name(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self> {
                $name::new(s)
            }
        }
        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(s: &str) -> Result<Self> {
                $name::new(s)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// The embedding application's id of a user or organisation (1..=128 bytes).
    AccountId, "account", MAX_ID_LEN
);
string_id!(
    /// A caller-chosen key that makes a mutation safe to retry (1..=255 bytes, unique per
    /// store: use a run id, purchase id or event id).
    IdempotencyKey, "key", MAX_KEY_LEN
);

impl IdempotencyKey {
    /// A new key that sorts after every key this process generated before: 48 bits of Unix
    /// milliseconds then 80 random bits, as 26 Crockford base-32 characters (the ULID layout),
    /// incremented rather than redrawn within one millisecond.
    ///
    /// Stores index keys in a B-tree; keys that arrive in order are appended at its right edge,
    /// while random keys (UUIDv4) land on a different page each, which costs a page write per
    /// key. Prefer these for ids the application creates (run ids); keys from elsewhere (Stripe
    /// event ids) work the same, only slower to insert.
    pub fn generate() -> Self {
        IdempotencyKey(ulid_now())
    }
}

fn ulid_now() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::Mutex;
    static LAST: Mutex<(u64, u128)> = Mutex::new((0, 0));
    const MASK80: u128 = (1 << 80) - 1;
    let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0) & ((1 << 48) - 1);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let random = || {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(now_ms);
        h.finish()
    };
    // Fresh random bits (top bit clear, so increments have room) on a new millisecond;
    // otherwise the last value plus one, moving to the next millisecond if it would overflow.
    let fresh = || ((u128::from(random()) << 64) | u128::from(random())) & (MASK80 >> 1);
    let (ms, rand) = if now_ms > last.0 {
        (now_ms, fresh())
    } else if last.1 < MASK80 {
        (last.0, last.1 + 1)
    } else {
        (last.0 + 1, fresh())
    };
    *last = (ms, rand);
    drop(last);
    let value = (u128::from(ms) << 80) | rand;
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    (0..26).map(|i| ALPHABET[((value >> (5 * (25 - i))) & 31) as usize] as char).collect()
}

/// A hold (reservation) id, assigned by the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HoldId(pub i64);

/// A transaction log entry id, assigned by the store; ids grow with time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntryId(pub i64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bucket {
    /// The subscription's allocation for the current period.
    Monthly,
    /// Unused monthly credits carried into the next period; expire after one month.
    Rollover,
    /// Bought (or given) credits; never expire.
    Purchased,
}

impl Bucket {
    pub const ALL: [Bucket; 3] = [Bucket::Monthly, Bucket::Rollover, Bucket::Purchased];
    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Monthly => "monthly",
            Bucket::Rollover => "rollover",
            Bucket::Purchased => "purchased",
        }
    }
}

/// The order buckets are spent in: a permutation of the three buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "[Bucket; 3]")]
pub struct SpendOrder([Bucket; 3]);

impl SpendOrder {
    /// The documents' default: monthly, then rollover, then purchased.
    pub const DEFAULT: SpendOrder = SpendOrder([Bucket::Monthly, Bucket::Rollover, Bucket::Purchased]);
    /// Rollover first wastes fewer credits (they expire soonest).
    pub const ROLLOVER_FIRST: SpendOrder = SpendOrder([Bucket::Rollover, Bucket::Monthly, Bucket::Purchased]);

    pub fn new(order: [Bucket; 3]) -> Result<Self> {
        let mut seen = [false; 3];
        for b in order {
            seen[b as usize] = true;
        }
        if seen != [true; 3] {
            return Err(Error::invalid("spend_order", "must name each bucket exactly once"));
        }
        Ok(SpendOrder(order))
    }
    pub fn buckets(&self) -> [Bucket; 3] {
        self.0
    }
}

impl TryFrom<[Bucket; 3]> for SpendOrder {
    type Error = Error;
    fn try_from(v: [Bucket; 3]) -> Result<Self> {
        SpendOrder::new(v)
    }
}

impl Default for SpendOrder {
    fn default() -> Self {
        SpendOrder::DEFAULT
    }
}

/// Signed credit amounts per bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketAmounts {
    pub monthly: Credits,
    pub rollover: Credits,
    pub purchased: Credits,
}

impl BucketAmounts {
    pub fn total(&self) -> Credits {
        self.monthly + self.rollover + self.purchased
    }
    pub fn get(&self, b: Bucket) -> Credits {
        match b {
            Bucket::Monthly => self.monthly,
            Bucket::Rollover => self.rollover,
            Bucket::Purchased => self.purchased,
        }
    }
    pub fn get_mut(&mut self, b: Bucket) -> &mut Credits {
        match b {
            Bucket::Monthly => &mut self.monthly,
            Bucket::Rollover => &mut self.rollover,
            Bucket::Purchased => &mut self.purchased,
        }
    }
    pub fn only(b: Bucket, n: Credits) -> Self {
        let mut a = BucketAmounts::default();
        *a.get_mut(b) = n;
        a
    }
    pub fn neg(&self) -> Self {
        BucketAmounts { monthly: -self.monthly, rollover: -self.rollover, purchased: -self.purchased }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    User,
    /// A verified organisation (its credits are a pool its members spend from).
    Organisation,
}

impl AccountKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::User => "user",
            AccountKind::Organisation => "organisation",
        }
    }
}

/// Where granted credits come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantSource {
    Plan,
    Purchase,
    Bonus,
    Admin,
}

impl GrantSource {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantSource::Plan => "plan",
            GrantSource::Purchase => "purchase",
            GrantSource::Bonus => "bonus",
            GrantSource::Admin => "admin",
        }
    }
}

/// The type of a transaction log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// Credits added to a bucket.
    Grant,
    /// Credits reserved for a run (held grows; buckets unchanged).
    Hold,
    /// A hold cancelled.
    Release,
    /// A hold closed: the actual credits charged from the buckets, the rest released.
    Settle,
    /// A one-step charge.
    Spend,
    /// Credits of an earlier charge given back.
    Refund,
    /// Credits taken back (e.g. a refunded purchase).
    Clawback,
    /// A hold passed its deadline and was returned.
    ExpireHold,
    /// Credits passed their expiry (or exceeded the rollover cap) and were removed.
    ExpireCredits,
    /// Unused monthly credits moved to the rollover bucket at the end of a period.
    Rollover,
    /// An AI operation metered without credits (see [`Meter`]).
    Meter,
    /// The account was throttled (reference: by whom or which limit, and why).
    Throttle,
    /// A throttle was lifted (reference: by whom and why, or the period that ended).
    Unthrottle,
    /// The account's cost profile (organisation membership, tier override) changed.
    CostProfile,
}

impl EntryKind {
    pub const ALL: [EntryKind; 14] = [
        EntryKind::Grant,
        EntryKind::Hold,
        EntryKind::Release,
        EntryKind::Settle,
        EntryKind::Spend,
        EntryKind::Refund,
        EntryKind::Clawback,
        EntryKind::ExpireHold,
        EntryKind::ExpireCredits,
        EntryKind::Rollover,
        EntryKind::Meter,
        EntryKind::Throttle,
        EntryKind::Unthrottle,
        EntryKind::CostProfile,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Grant => "grant",
            EntryKind::Hold => "hold",
            EntryKind::Release => "release",
            EntryKind::Settle => "settle",
            EntryKind::Spend => "spend",
            EntryKind::Refund => "refund",
            EntryKind::Clawback => "clawback",
            EntryKind::ExpireHold => "expire_hold",
            EntryKind::ExpireCredits => "expire_credits",
            EntryKind::Rollover => "rollover",
            EntryKind::Meter => "meter",
            EntryKind::Throttle => "throttle",
            EntryKind::Unthrottle => "unthrottle",
            EntryKind::CostProfile => "cost_profile",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        EntryKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| Error::invalid("kind", format!("unknown entry kind {s:?}")))
    }
}

/// A metered AI operation: what a settle or spend writes to the usage log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// What was metered (e.g. `"playground_run"`).
    pub operation: String,
    pub model: String,
    pub tokens: TokenUsage,
    /// Provider cost in micro-dollars.
    pub cost_micros: i64,
}

impl Usage {
    pub fn validate(&self) -> Result<()> {
        check_name("operation", &self.operation, 64, false)?;
        check_name("model", &self.model, MAX_ID_LEN, false)?;
        self.tokens.validate()?;
        if self.tokens.total() > MAX_TOKENS {
            return Err(Error::invalid("tokens", format!("more than {MAX_TOKENS} tokens")));
        }
        if !(0..=MAX_COST_MICROS).contains(&self.cost_micros) {
            return Err(Error::invalid("cost_micros", format!("outside 0..={MAX_COST_MICROS}")));
        }
        Ok(())
    }
}

/// A subscription plan's terms, as far as the ledger cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanTerms {
    /// Credits granted to the monthly bucket each period.
    pub monthly_credits: Credits,
    /// When the current period ends (the monthly rollover step runs then).
    pub period_end: DateTime<Utc>,
    /// The day of the month periods end on (the billing cycle anchor, 1..=31); in shorter
    /// months the period ends on the month's last day, and the next on the anchor day again.
    /// `None`: the day of `period_end`.
    /// (Left out of the canonical form when `None`, so keys stored before it existed match.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_day: Option<u32>,
}

// ---------------------------------------------------------------------------------------------
// Requests

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateAccount {
    pub account: AccountId,
    pub kind: AccountKind,
    pub key: IdempotencyKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub account: AccountId,
    pub bucket: Bucket,
    pub amount: Credits,
    pub source: GrantSource,
    /// Only for the rollover bucket: when the credits expire (default and maximum: one month
    /// from now).
    pub expires_at: Option<DateTime<Utc>>,
    pub reference: String,
    pub key: IdempotencyKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub account: AccountId,
    /// Worst-case credits of the run.
    pub amount: Credits,
    /// How long the hold lives before `expire_holds` returns it (1..=86,400 s).
    pub ttl_secs: u32,
    /// Worst-case provider cost of the run in micro-dollars: admission checks it against the
    /// account's daily and monthly cost limits, and it counts against them until the settle.
    /// (Left out of the canonical form when zero, so keys stored before it existed match.)
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cost_micros: i64,
    pub reference: String,
    pub key: IdempotencyKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settle {
    pub hold: HoldId,
    /// Actual credits; more than the hold is charged as the hold (never more).
    pub credits: Credits,
    pub usage: Option<Usage>,
    pub key: IdempotencyKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub hold: HoldId,
    pub key: IdempotencyKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spend {
    pub account: AccountId,
    pub amount: Credits,
    pub usage: Option<Usage>,
    pub reference: String,
    pub key: IdempotencyKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub account: AccountId,
    /// The spend or settle entry whose credits are given back.
    pub entry: EntryId,
    pub amount: Credits,
    pub reference: String,
    pub key: IdempotencyKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clawback {
    pub account: AccountId,
    pub bucket: Bucket,
    /// Credits to take back; clamped at what the bucket can give (the shortfall is reported).
    pub amount: Credits,
    pub reference: String,
    pub key: IdempotencyKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetPlan {
    pub account: AccountId,
    /// `Some` starts or updates a plan (starting one grants the first allocation); `None`
    /// ends it at the end of the current period.
    pub plan: Option<PlanTerms>,
    pub key: IdempotencyKey,
}

/// Records an AI operation that was not paid with credits (or was paid elsewhere): its usage
/// goes to the usage log and its cost counts toward the account's cost limits (it can throttle
/// the account and raise alerts), but it is never refused: it already happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meter {
    pub account: AccountId,
    pub usage: Usage,
    pub reference: String,
    pub key: IdempotencyKey,
}

/// What decides an account's cost tier: organisation membership (with an active plan a member
/// is `prpm_plus_org`), and an admin's override (e.g. `unlimited`), `None` for the derived tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetCostProfile {
    pub account: AccountId,
    pub org_member: bool,
    pub tier: Option<String>,
    pub key: IdempotencyKey,
}

/// An admin throttles or unthrottles an account; who and why go to the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminThrottle {
    pub account: AccountId,
    pub by: String,
    pub why: String,
    pub key: IdempotencyKey,
}

/// Adds or replaces a tier's limits (tiers are never removed: accounts may name them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetTier {
    pub limits: crate::cost::TierLimits,
    pub key: IdempotencyKey,
}

/// Every mutation. All but the two maintenance steps carry an idempotency key; the
/// maintenance steps are idempotent by state (a second run finds nothing due).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    CreateAccount(CreateAccount),
    Grant(Grant),
    Hold(Hold),
    Settle(Settle),
    Release(Release),
    Spend(Spend),
    Refund(Refund),
    Clawback(Clawback),
    SetPlan(SetPlan),
    Meter(Meter),
    SetCostProfile(SetCostProfile),
    Throttle(AdminThrottle),
    Unthrottle(AdminThrottle),
    SetTier(SetTier),
    /// The monthly rollover step for one account whose period ended.
    Rollover {
        account: AccountId,
    },
    /// Returns expired holds and removes expired credits of one account.
    Sweep {
        account: AccountId,
    },
    /// Clears the cost counters and cost throttles of periods that ended.
    CostReset {
        account: AccountId,
    },
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn check_amount(field: &'static str, n: Credits, allow_zero: bool) -> Result<()> {
    let min = if allow_zero { 0 } else { 1 };
    if !(min..=MAX_CREDITS_PER_REQUEST).contains(&n) {
        return Err(Error::invalid(field, format!("{n} is outside {min}..={MAX_CREDITS_PER_REQUEST}")));
    }
    Ok(())
}

impl Command {
    /// The idempotency key, if the command has one.
    pub fn key(&self) -> Option<&IdempotencyKey> {
        match self {
            Command::CreateAccount(c) => Some(&c.key),
            Command::Grant(c) => Some(&c.key),
            Command::Hold(c) => Some(&c.key),
            Command::Settle(c) => Some(&c.key),
            Command::Release(c) => Some(&c.key),
            Command::Spend(c) => Some(&c.key),
            Command::Refund(c) => Some(&c.key),
            Command::Clawback(c) => Some(&c.key),
            Command::SetPlan(c) => Some(&c.key),
            Command::Meter(c) => Some(&c.key),
            Command::SetCostProfile(c) => Some(&c.key),
            Command::Throttle(c) | Command::Unthrottle(c) => Some(&c.key),
            Command::SetTier(c) => Some(&c.key),
            Command::Rollover { .. } | Command::Sweep { .. } | Command::CostReset { .. } => None,
        }
    }

    /// The account the command names (settle and release name a hold instead).
    pub fn account(&self) -> Option<&AccountId> {
        match self {
            Command::CreateAccount(c) => Some(&c.account),
            Command::Grant(c) => Some(&c.account),
            Command::Hold(c) => Some(&c.account),
            Command::Spend(c) => Some(&c.account),
            Command::Refund(c) => Some(&c.account),
            Command::Clawback(c) => Some(&c.account),
            Command::SetPlan(c) => Some(&c.account),
            Command::Meter(c) => Some(&c.account),
            Command::SetCostProfile(c) => Some(&c.account),
            Command::Throttle(c) | Command::Unthrottle(c) => Some(&c.account),
            Command::Rollover { account } | Command::Sweep { account } | Command::CostReset { account } => Some(account),
            Command::Settle(_) | Command::Release(_) | Command::SetTier(_) => None,
        }
    }

    /// The hold the command names.
    pub fn hold(&self) -> Option<HoldId> {
        match self {
            Command::Settle(c) => Some(c.hold),
            Command::Release(c) => Some(c.hold),
            _ => None,
        }
    }

    /// Checks everything that does not need the account's state. Ids and keys are checked
    /// when they are constructed (and deserialized).
    pub fn validate(&self) -> Result<()> {
        match self {
            Command::CreateAccount(_) | Command::Release(_) => Ok(()),
            Command::Grant(c) => {
                check_amount("amount", c.amount, false)?;
                check_name("reference", &c.reference, MAX_REFERENCE_LEN, true)?;
                if c.expires_at.is_some() && c.bucket != Bucket::Rollover {
                    return Err(Error::invalid("expires_at", format!("the {} bucket does not expire", c.bucket.as_str())));
                }
                Ok(())
            }
            Command::Hold(c) => {
                check_amount("amount", c.amount, false)?;
                check_name("reference", &c.reference, MAX_REFERENCE_LEN, true)?;
                if !(1..=MAX_HOLD_TTL_SECS).contains(&c.ttl_secs) {
                    return Err(Error::invalid("ttl_secs", format!("{} is outside 1..={MAX_HOLD_TTL_SECS}", c.ttl_secs)));
                }
                if !(0..=MAX_COST_MICROS).contains(&c.cost_micros) {
                    return Err(Error::invalid("cost_micros", format!("outside 0..={MAX_COST_MICROS}")));
                }
                Ok(())
            }
            Command::Settle(c) => {
                check_amount("credits", c.credits, true)?;
                c.usage.as_ref().map_or(Ok(()), Usage::validate)
            }
            Command::Spend(c) => {
                check_amount("amount", c.amount, false)?;
                check_name("reference", &c.reference, MAX_REFERENCE_LEN, true)?;
                c.usage.as_ref().map_or(Ok(()), Usage::validate)
            }
            Command::Refund(c) => {
                check_amount("amount", c.amount, false)?;
                check_name("reference", &c.reference, MAX_REFERENCE_LEN, true)
            }
            Command::Clawback(c) => {
                check_amount("amount", c.amount, false)?;
                check_name("reference", &c.reference, MAX_REFERENCE_LEN, true)
            }
            Command::SetPlan(c) => match &c.plan {
                Some(p) => {
                    if p.anchor_day.is_some_and(|d| !(1..=31).contains(&d)) {
                        return Err(Error::invalid("anchor_day", "must be 1..=31"));
                    }
                    check_amount("monthly_credits", p.monthly_credits, true)
                }
                None => Ok(()),
            },
            Command::Meter(c) => {
                check_name("reference", &c.reference, MAX_REFERENCE_LEN, true)?;
                c.usage.validate()
            }
            Command::SetCostProfile(c) => match &c.tier {
                Some(t) => check_name("tier", t, 64, false),
                None => Ok(()),
            },
            Command::Throttle(c) | Command::Unthrottle(c) => {
                check_name("by", &c.by, MAX_ID_LEN, false)?;
                check_name("why", &c.why, MAX_REFERENCE_LEN, false)
            }
            Command::SetTier(c) => c.limits.validate().map(|_| ()),
            Command::Rollover { .. } | Command::Sweep { .. } | Command::CostReset { .. } => Ok(()),
        }
    }

    /// The canonical form compared when a key is reused.
    pub fn fingerprint(&self) -> String {
        serde_json::to_string(self).expect("commands serialize")
    }
}

// ---------------------------------------------------------------------------------------------
// Results

/// An account's credits after an operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balances {
    pub monthly: Credits,
    pub rollover: Credits,
    pub purchased: Credits,
    pub held: Credits,
}

impl Balances {
    pub fn total(&self) -> Credits {
        self.monthly + self.rollover + self.purchased
    }
    /// Total minus held.
    pub fn available(&self) -> Credits {
        self.total() - self.held
    }
}

/// What an applied command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    AccountCreated {
        granted: Credits,
        balances: Balances,
    },
    Granted {
        entry: EntryId,
        balances: Balances,
    },
    Held {
        hold: HoldId,
        amount: Credits,
        deadline: DateTime<Utc>,
        balances: Balances,
    },
    Settled {
        hold: HoldId,
        entry: EntryId,
        charged: BucketAmounts,
        released: Credits,
        capped: bool,
        balances: Balances,
        #[serde(default)]
        cost: CostEvents,
    },
    Released {
        hold: HoldId,
        released: Credits,
        balances: Balances,
    },
    Spent {
        entry: EntryId,
        charged: BucketAmounts,
        balances: Balances,
        #[serde(default)]
        cost: CostEvents,
    },
    Refunded {
        entry: EntryId,
        returned: BucketAmounts,
        balances: Balances,
    },
    ClawedBack {
        entry: Option<EntryId>,
        taken: BucketAmounts,
        shortfall: Credits,
        balances: Balances,
    },
    PlanSet {
        granted: Credits,
        balances: Balances,
    },
    RolledOver {
        periods: u32,
        moved: Credits,
        expired: Credits,
        granted: Credits,
        balances: Balances,
    },
    Swept {
        holds_expired: u32,
        credits_expired: Credits,
        balances: Balances,
    },
    Metered {
        entry: EntryId,
        cost: CostEvents,
        balances: Balances,
    },
    CostProfileSet {
        tier: String,
        balances: Balances,
    },
    Throttled {
        balances: Balances,
    },
    Unthrottled {
        balances: Balances,
    },
    /// The tier's limits were stored; `warnings` lists what is odd about them.
    TierSet {
        warnings: Vec<LimitWarning>,
    },
    CostReset {
        throttle_lifted: bool,
        balances: Balances,
    },
}

impl Effect {
    /// The account's balances after the command (zero for commands without an account).
    pub fn balances(&self) -> Balances {
        match self {
            Effect::TierSet { .. } => Balances::default(),
            Effect::AccountCreated { balances, .. }
            | Effect::Granted { balances, .. }
            | Effect::Held { balances, .. }
            | Effect::Settled { balances, .. }
            | Effect::Released { balances, .. }
            | Effect::Spent { balances, .. }
            | Effect::Refunded { balances, .. }
            | Effect::ClawedBack { balances, .. }
            | Effect::PlanSet { balances, .. }
            | Effect::RolledOver { balances, .. }
            | Effect::Swept { balances, .. }
            | Effect::Metered { balances, .. }
            | Effect::CostProfileSet { balances, .. }
            | Effect::Throttled { balances }
            | Effect::Unthrottled { balances }
            | Effect::CostReset { balances, .. } => *balances,
        }
    }

    /// Fills in the id of the command's main log entry once the store has assigned it.
    pub fn set_entry(&mut self, id: EntryId) {
        match self {
            Effect::Granted { entry, .. }
            | Effect::Settled { entry, .. }
            | Effect::Spent { entry, .. }
            | Effect::Refunded { entry, .. }
            | Effect::Metered { entry, .. } => *entry = id,
            Effect::ClawedBack { entry, .. } => *entry = Some(id),
            _ => {}
        }
    }

    /// What the command did to the account's cost control (alerts raised, a throttle).
    pub fn cost_events(&self) -> Option<&CostEvents> {
        match self {
            Effect::Settled { cost, .. } | Effect::Spent { cost, .. } | Effect::Metered { cost, .. } => Some(cost),
            _ => None,
        }
    }

    /// Fills in the id of a new hold once the store has assigned it.
    pub fn set_hold(&mut self, id: HoldId) {
        if let Effect::Held { hold, .. } = self {
            *hold = id;
        }
    }
}

/// An applied command and whether this call was a replay of an earlier one with the same key
/// (a replay returns the first result and writes nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    pub effect: Effect,
    pub replayed: bool,
}

/// Expected outcomes that refuse a command. A rejected command writes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "rejection", rename_all = "snake_case")]
pub enum Rejection {
    #[error("insufficient credits: {needed} needed, {available} available")]
    InsufficientCredits { needed: Credits, available: Credits },
    #[error("account already exists")]
    AccountExists,
    #[error("unknown hold {0:?}")]
    UnknownHold(HoldId),
    #[error("hold already settled")]
    AlreadySettled(HoldId),
    #[error("hold already released")]
    AlreadyReleased(HoldId),
    #[error("hold expired before it was settled")]
    HoldExpired(HoldId),
    #[error("entry {0:?} is not a charge of this account")]
    NotACharge(EntryId),
    #[error("refund of {requested} exceeds the {refundable} credits still refundable")]
    RefundExceedsCharge { requested: Credits, refundable: Credits },
    #[error("the step would leave an open hold unbacked; it waits for the holds to close")]
    HoldsOpen,
    #[error("nothing is due")]
    NothingDue,
    #[error("throttled: {reason:?}")]
    Throttled { reason: ThrottleReason },
    #[error("hourly request limit of {limit} reached; next slot in {retry_after_ms} ms")]
    RateLimited { limit: u32, retry_after_ms: i64 },
    #[error("daily cost limit: {spent_micros} spent + {held_micros} in flight + {requested_micros} requested > {limit_micros} micro-USD")]
    DailyCostLimit { limit_micros: i64, spent_micros: i64, held_micros: i64, requested_micros: i64 },
    #[error("monthly cost limit: {spent_micros} spent + {held_micros} in flight + {requested_micros} requested > {limit_micros} micro-USD")]
    MonthlyCostLimit { limit_micros: i64, spent_micros: i64, held_micros: i64, requested_micros: i64 },
    #[error("the account is not throttled")]
    NotThrottled,
    #[error("the account is already throttled")]
    AlreadyThrottled,
    /// Refunded credits that had been spent are owed (the `debt` refund policy): runs wait
    /// until a purchase repays them.
    #[error("{credits} credits are owed from a refund")]
    InDebt { credits: Credits },
}

impl Rejection {
    /// A stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::InsufficientCredits { .. } => "insufficient_credits",
            Rejection::AccountExists => "account_exists",
            Rejection::UnknownHold(_) => "unknown_hold",
            Rejection::AlreadySettled(_) => "already_settled",
            Rejection::AlreadyReleased(_) => "already_released",
            Rejection::HoldExpired(_) => "hold_expired",
            Rejection::NotACharge(_) => "not_a_charge",
            Rejection::RefundExceedsCharge { .. } => "refund_exceeds_charge",
            Rejection::HoldsOpen => "holds_open",
            Rejection::NothingDue => "nothing_due",
            Rejection::Throttled { .. } => "throttled",
            Rejection::RateLimited { .. } => "rate_limited",
            Rejection::DailyCostLimit { .. } => "daily_cost_limit",
            Rejection::MonthlyCostLimit { .. } => "monthly_cost_limit",
            Rejection::NotThrottled => "not_throttled",
            Rejection::AlreadyThrottled => "already_throttled",
            Rejection::InDebt { .. } => "in_debt",
        }
    }
}

/// The result of [`crate::Store::execute`]: an applied command or a rejection.
pub type Outcome = std::result::Result<Committed, Rejection>;

#[cfg(test)]
mod key_tests {
    use super::*;

    /// Keys stored before cost control (and plan anchors) existed must still match their
    /// commands: the canonical form of a command without the new fields is unchanged.
    #[test]
    fn fingerprints_of_older_commands_are_unchanged() {
        let hold = Command::Hold(Hold {
            account: AccountId::new("u").unwrap(),
            amount: 3,
            ttl_secs: 60,
            cost_micros: 0,
            reference: "r".into(),
            key: IdempotencyKey::new("k").unwrap(),
        });
        assert_eq!(hold.fingerprint(), r#"{"op":"hold","account":"u","amount":3,"ttl_secs":60,"reference":"r","key":"k"}"#);
        let t = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let plan = Command::SetPlan(SetPlan {
            account: AccountId::new("u").unwrap(),
            plan: Some(PlanTerms { monthly_credits: 5, period_end: t, anchor_day: None }),
            key: IdempotencyKey::new("k").unwrap(),
        });
        assert_eq!(plan.fingerprint(), r#"{"op":"set_plan","account":"u","plan":{"monthly_credits":5,"period_end":"2027-01-15T08:00:00Z"},"key":"k"}"#);
    }

    #[test]
    fn generated_keys_are_valid_unique_and_ordered() {
        let keys: Vec<IdempotencyKey> = (0..10_000).map(|_| IdempotencyKey::generate()).collect();
        for k in &keys {
            assert_eq!(k.as_str().len(), 26);
            IdempotencyKey::new(k.as_str()).unwrap();
        }
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "generated keys must strictly increase");
        // The leading ten characters are the millisecond timestamp.
        let decode = |s: &str| s.bytes().take(10).fold(0u64, |v, c| v * 32 + b"0123456789ABCDEFGHJKMNPQRSTVWXYZ".iter().position(|&a| a == c).unwrap() as u64);
        let now = chrono::Utc::now().timestamp_millis() as u64;
        let first = decode(keys[0].as_str());
        assert!(first <= now && now - first < 60_000, "timestamp {first} vs now {now}");
    }

    #[test]
    fn generated_keys_from_many_threads_never_collide() {
        let handles: Vec<_> = (0..4).map(|_| std::thread::spawn(|| (0..5_000).map(|_| IdempotencyKey::generate()).collect::<Vec<_>>())).collect();
        let mut all: Vec<IdempotencyKey> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
