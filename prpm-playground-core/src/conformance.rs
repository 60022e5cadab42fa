//! The behaviour every [`Store`] backend must show, written once as library code and
//! instantiated per backend with [`conformance_suite!`](crate::conformance_suite) (as apache
//! `object_store`'s `integration.rs` does). Each function panics on the first difference.
//!
//! Every function gets a fresh, empty store whose clock is `clock`, opened with
//! [`LedgerConfig::default`] unless its documentation says otherwise.

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use futures_util::future::join_all;

use crate::clock::{Clock, ManualClock};
use crate::cost::ThrottleReason;
use crate::error::Error;
use crate::history::export_csv;
use crate::jobs;
use crate::ledger::rules::add_month;
use crate::ledger::*;
use crate::pricing::TokenUsage;
use crate::purchase::{EventStatus, MAX_EVENT_PAYLOAD_BYTES, Purchase, PurchaseKind, PurchaseStatus, StripeEventRecord};
use crate::session::{
    MAX_TURNS_PER_SESSION, NewSession, NewTurn, Package, Role, RunId, RunOutcome, RunRecord, Session, SessionId, SessionSummary, ShareToken, SharedSession,
    SharedTurn, Turn,
};
use crate::store::{AlertQuery, BalanceView, CostFilter, CostView, DailyUsageQuery, Entry, HistoryQuery, SettleRun, Store};

/// The time every conformance store starts at.
pub fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 15, 12, 0, 0).unwrap()
}

/// A store under test and whatever must live as long as it (a temporary directory, a database).
pub struct TestStore {
    pub store: Arc<dyn Store>,
    pub guard: Box<dyn std::any::Any + Send + Sync>,
}

/// Instantiates every conformance function as a `#[tokio::test]`. `$open` is an async function
/// `(LedgerConfig, Arc<ManualClock>) -> TestStore`; with `skippable $open`, it returns
/// `Option<TestStore>` and `None` skips the test (a backend whose server is not installed; the
/// opener prints why).
#[macro_export]
macro_rules! conformance_suite {
    ($open:path) => {
        $crate::conformance_suite!(@list tests $open);
    };
    (skippable $open:path) => {
        $crate::conformance_suite!(@list skippable $open);
    };
    (@list $mode:ident $open:path) => {
        $crate::conformance_suite!(@ $mode $open; default;
            signup_credits, grants_and_bad_input, spend_order_default, hold_settle_release,
            hold_expiry_and_sweep, idempotent_replays, history_filters_pages_csv,
            refunds_and_clawbacks, monthly_rollover, rollover_expiry, holds_need_credits_that_outlive_them,
            concurrent_spends_never_overspend, concurrent_holds_and_duplicate_keys,
            plan_changes_close_due_periods_first, rollover_runs_with_backed_holds, refunds_never_extend_expiry,
            rollover_lot_limits, times_are_kept_to_the_millisecond, huge_token_counts_are_refused,
            jobs_run_twice_at_once_do_the_work_once,
            rate_limit_is_exact_under_concurrency, cost_limits_hold_under_concurrency, throttles_and_alerts,
            admin_throttles_and_lists, tiers_are_data_and_follow_plans, cost_periods_across_boundaries,
            metering_counts_toward_limits, reference_scenario_summary, cost_jobs_run_twice_at_once_do_the_work_once,
            monthly_limit_outranks_a_daily_throttle, a_clock_that_steps_back_never_restarts_a_period,
            packages_round_trip_and_bad_input, sessions_belong_to_their_owner, sessions_list_newest_first_paginated,
            runs_append_turns_in_order, settle_run_settles_and_records_at_once, sharing_shows_the_conversation_only, concurrent_appends_keep_seq_dense,
            purchases_round_trip_and_cas, purchase_cas_under_concurrency, stripe_events_once_by_id, customers_and_debts,
            keyed_responses_are_stored_once, usage_pages_newest_first,
            stripe_events_about_an_object, log_ids_follow_the_order_of_writes);
        $crate::conformance_suite!(@ $mode $open; rollover_first; rollover_first_spend_order);
    };
    (@skippable $open:path; $cfg:ident; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let clock = ::std::sync::Arc::new($crate::ManualClock::new($crate::conformance::start()));
                let Some(t) = $open($crate::conformance::config(stringify!($cfg)), clock.clone()).await else { return };
                $crate::conformance::$name(&*t.store, &clock).await;
                let report = t.store.verify().await.expect("verify");
                assert!(report.is_clean(), "verify after {}: {:?}", stringify!($name), report.discrepancies);
            }
        )*
    };
    (@tests $open:path; $cfg:ident; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let clock = ::std::sync::Arc::new($crate::ManualClock::new($crate::conformance::start()));
                let t = $open($crate::conformance::config(stringify!($cfg)), clock.clone()).await;
                $crate::conformance::$name(&*t.store, &clock).await;
                let report = t.store.verify().await.expect("verify");
                assert!(report.is_clean(), "verify after {}: {:?}", stringify!($name), report.discrepancies);
            }
        )*
    };
}

/// The ledger configuration a conformance function expects.
pub fn config(name: &str) -> LedgerConfig {
    match name {
        "rollover_first" => LedgerConfig { spend_order: SpendOrder::ROLLOVER_FIRST, ..LedgerConfig::default() },
        _ => LedgerConfig::default(),
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

pub fn acct(s: &str) -> AccountId {
    AccountId::new(s).unwrap()
}

pub fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::new(s).unwrap()
}

/// The effect of an applied command; panics on a rejection or error.
#[track_caller]
pub fn applied(r: crate::Result<Outcome>) -> Effect {
    match r {
        Ok(Ok(c)) => c.effect,
        other => panic!("expected an applied command, got {other:?}"),
    }
}

/// The rejection; panics if the command was applied or failed.
#[track_caller]
pub fn rejected(r: crate::Result<Outcome>) -> Rejection {
    match r {
        Ok(Err(rej)) => rej,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[track_caller]
fn error_code(r: crate::Result<Outcome>) -> &'static str {
    match r {
        Err(e) => e.code(),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A user in the `unlimited` tier, so that cost control (rate limits in particular) stays out
/// of the way of ledger tests.
pub async fn create_user(store: &dyn Store, id: &str) -> AccountId {
    let a = create_free_user(store, id).await;
    applied(store.set_cost_profile(a.clone(), false, Some(crate::cost::UNLIMITED.into()), key(&format!("unlimited:{id}"))).await);
    a
}

/// A user in the tier the spec derives (`free` until a plan starts).
pub async fn create_free_user(store: &dyn Store, id: &str) -> AccountId {
    let a = acct(id);
    applied(store.create_account(a.clone(), AccountKind::User, key(&format!("create:{id}"))).await);
    a
}

pub async fn grant(store: &dyn Store, a: &AccountId, bucket: Bucket, amount: Credits, expires_at: Option<DateTime<Utc>>, k: &str) -> Effect {
    applied(store.grant(Grant { account: a.clone(), bucket, amount, source: GrantSource::Admin, expires_at, reference: "test".into(), key: key(k) }).await)
}

pub fn spend_cmd(a: &AccountId, amount: Credits, k: &str) -> Spend {
    Spend { account: a.clone(), amount, usage: None, reference: format!("run {k}"), key: key(k) }
}

pub fn hold_cmd(a: &AccountId, amount: Credits, ttl_secs: u32, k: &str) -> Hold {
    Hold { account: a.clone(), amount, ttl_secs, cost_micros: 0, reference: format!("run {k}"), key: key(k) }
}

pub fn settle_cmd(hold: HoldId, credits: Credits, k: &str) -> Settle {
    Settle { hold, credits, usage: None, key: key(k) }
}

fn hold_id(e: &Effect) -> HoldId {
    match e {
        Effect::Held { hold, .. } => *hold,
        other => panic!("expected Held, got {other:?}"),
    }
}

fn entry_id(e: &Effect) -> EntryId {
    match e {
        Effect::Spent { entry, .. } | Effect::Granted { entry, .. } | Effect::Settled { entry, .. } | Effect::Refunded { entry, .. } => *entry,
        other => panic!("expected an entry, got {other:?}"),
    }
}

async fn balance(store: &dyn Store, a: &AccountId) -> BalanceView {
    store.balance(a).await.expect("balance")
}

/// (monthly, rollover, purchased, held)
async fn buckets(store: &dyn Store, a: &AccountId) -> (Credits, Credits, Credits, Credits) {
    let b = balance(store, a).await;
    assert_eq!(b.total, b.monthly + b.rollover + b.purchased);
    assert_eq!(b.available, b.total - b.held);
    (b.monthly, b.rollover, b.purchased, b.held)
}

async fn log_len(store: &dyn Store, a: &AccountId) -> usize {
    let mut q = HistoryQuery::new(a.clone());
    q.limit = 1000;
    store.history(&q).await.expect("history").entries.len()
}

fn charged(m: Credits, r: Credits, p: Credits) -> BucketAmounts {
    BucketAmounts { monthly: m, rollover: r, purchased: p }
}

// ---------------------------------------------------------------------------------------------
// The suite

/// Users get 5 credits, verified organisations 200, in the purchased bucket (source bonus).
pub async fn signup_credits(store: &dyn Store, _clock: &ManualClock) {
    let u = acct("user-1");
    let first = store.create_account(u.clone(), AccountKind::User, key("create-u1")).await.unwrap().unwrap();
    assert!(!first.replayed);
    assert!(matches!(first.effect, Effect::AccountCreated { granted: 5, .. }));
    assert_eq!(buckets(store, &u).await, (0, 0, 5, 0));
    let o = acct("org-1");
    applied(store.create_account(o.clone(), AccountKind::Organisation, key("create-o1")).await);
    let b = balance(store, &o).await;
    assert_eq!((b.kind, b.purchased, b.available), (AccountKind::Organisation, 200, 200));

    // A replay returns the first result; a new key for the same account is refused.
    let again = store.create_account(u.clone(), AccountKind::User, key("create-u1")).await.unwrap().unwrap();
    assert!(again.replayed);
    assert_eq!(again.effect, first.effect);
    assert_eq!(rejected(store.create_account(u.clone(), AccountKind::User, key("create-u1-b")).await), Rejection::AccountExists);
    assert_eq!(error_code(store.create_account(u.clone(), AccountKind::Organisation, key("create-u1")).await), "idempotency_conflict");
    assert_eq!(buckets(store, &u).await, (0, 0, 5, 0));

    let page = store.history(&HistoryQuery::new(u.clone())).await.unwrap();
    assert_eq!(page.entries.len(), 1);
    let e = &page.entries[0];
    assert_eq!((e.kind, e.source, e.delta, e.balance_after), (EntryKind::Grant, Some(GrantSource::Bonus), charged(0, 0, 5), 5));
}

/// Grants land in their bucket; bad input is a typed error and writes nothing.
pub async fn grants_and_bad_input(store: &dyn Store, clock: &ManualClock) {
    let now = clock.now();
    let u = create_user(store, "u").await;
    grant(store, &u, Bucket::Monthly, 10, None, "g1").await;
    grant(store, &u, Bucket::Purchased, 7, None, "g2").await;
    grant(store, &u, Bucket::Rollover, 3, None, "g3").await;
    let b = balance(store, &u).await;
    assert_eq!((b.monthly, b.rollover, b.purchased, b.total), (10, 3, 12, 25));
    assert_eq!(b.next_expiry, Some(Lot { amount: 3, expires_at: add_month(now).unwrap() }));

    let entries = log_len(store, &u).await;
    let g = |bucket, amount, expires_at, k: &str| Grant {
        account: u.clone(),
        bucket,
        amount,
        source: GrantSource::Admin,
        expires_at,
        reference: String::new(),
        key: key(k),
    };
    for (cmd, why) in [
        (g(Bucket::Purchased, 0, None, "b1"), "zero amount"),
        (g(Bucket::Purchased, -5, None, "b2"), "negative amount"),
        (g(Bucket::Purchased, MAX_CREDITS_PER_REQUEST + 1, None, "b3"), "huge amount"),
        (g(Bucket::Monthly, 5, Some(now + Duration::days(3)), "b4"), "monthly with expiry"),
        (g(Bucket::Rollover, 5, Some(now + Duration::days(45)), "b5"), "rollover kept over a month"),
        (g(Bucket::Rollover, 5, Some(now - Duration::days(1)), "b6"), "rollover already expired"),
    ] {
        assert_eq!(error_code(store.grant(cmd).await), "invalid_input", "{why}");
    }
    assert_eq!(error_code(store.spend(spend_cmd(&u, 0, "s0")).await), "invalid_input");
    assert_eq!(error_code(store.spend(spend_cmd(&u, -1, "s1")).await), "invalid_input");
    assert_eq!(error_code(store.hold(hold_cmd(&u, 1, 0, "h0")).await), "invalid_input");
    assert_eq!(error_code(store.hold(hold_cmd(&u, 1, MAX_HOLD_TTL_SECS + 1, "h1")).await), "invalid_input");
    let mut long = spend_cmd(&u, 1, "s2");
    long.reference = "x".repeat(10_000);
    assert_eq!(error_code(store.spend(long).await), "invalid_input");
    let mut bad_usage = spend_cmd(&u, 1, "s3");
    bad_usage.usage = Some(Usage { operation: "run".into(), model: "m".into(), tokens: TokenUsage::default(), cost_micros: -1 });
    assert_eq!(error_code(store.spend(bad_usage).await), "invalid_input");
    assert_eq!(error_code(store.spend(spend_cmd(&acct("nobody"), 1, "s4")).await), "unknown_account");
    assert_eq!(error_code(store.hold(hold_cmd(&acct("nobody"), 1, 60, "s5")).await), "unknown_account");
    assert!(matches!(store.balance(&acct("nobody")).await, Err(Error::UnknownAccount(_))));
    assert!(IdempotencyKey::new("").is_err());
    assert!(AccountId::new("a\u{0}b").is_err());
    assert!(AccountId::new("x".repeat(129)).is_err());
    // Nothing was written, not even the lazily due bookkeeping.
    assert_eq!(log_len(store, &u).await, entries);
    assert_eq!(balance(store, &u).await, b);
    // The keys of refused commands are still free.
    grant(store, &u, Bucket::Purchased, 1, None, "b1").await;
}

/// The default order: monthly, then rollover (earliest expiry first), then purchased.
pub async fn spend_order_default(store: &dyn Store, clock: &ManualClock) {
    let now = clock.now();
    let u = create_user(store, "u").await; // 5 purchased
    grant(store, &u, Bucket::Monthly, 4, None, "g1").await;
    grant(store, &u, Bucket::Rollover, 2, Some(now + Duration::days(20)), "g2").await;
    grant(store, &u, Bucket::Rollover, 3, Some(now + Duration::days(10)), "g3").await;
    let e = applied(store.spend(spend_cmd(&u, 6, "s1")).await);
    assert!(matches!(e, Effect::Spent { charged: c, .. } if c == charged(4, 2, 0)), "{e:?}");
    let b = balance(store, &u).await;
    assert_eq!((b.monthly, b.rollover, b.purchased), (0, 3, 5));
    // The lot expiring first was spent first: 1 left of it.
    assert_eq!(b.next_expiry, Some(Lot { amount: 1, expires_at: now + Duration::days(10) }));
    let e = applied(store.spend(spend_cmd(&u, 5, "s2")).await);
    assert!(matches!(e, Effect::Spent { charged: c, .. } if c == charged(0, 3, 2)), "{e:?}");
    assert_eq!(rejected(store.spend(spend_cmd(&u, 4, "s3")).await), Rejection::InsufficientCredits { needed: 4, available: 3 });
    let b = balance(store, &u).await;
    assert_eq!((b.monthly, b.rollover, b.purchased, b.next_expiry), (0, 0, 3, None));
}

/// With `SpendOrder::ROLLOVER_FIRST` (store opened with `config("rollover_first")`).
pub async fn rollover_first_spend_order(store: &dyn Store, clock: &ManualClock) {
    assert_eq!(store.config().spend_order, SpendOrder::ROLLOVER_FIRST);
    let u = create_user(store, "u").await;
    grant(store, &u, Bucket::Monthly, 4, None, "g1").await;
    grant(store, &u, Bucket::Rollover, 3, Some(clock.now() + Duration::days(3)), "g2").await;
    let e = applied(store.spend(spend_cmd(&u, 5, "s1")).await);
    assert!(matches!(e, Effect::Spent { charged: c, .. } if c == charged(2, 3, 0)), "{e:?}");
    let e = applied(store.spend(spend_cmd(&u, 4, "s2")).await);
    assert!(matches!(e, Effect::Spent { charged: c, .. } if c == charged(2, 0, 2)), "{e:?}");
}

/// Two-phase spends: hold reserves, settle charges the actual credits by bucket order and
/// releases the rest, release cancels; closed holds cannot be closed again.
pub async fn hold_settle_release(store: &dyn Store, _clock: &ManualClock) {
    let u = create_user(store, "u").await;
    grant(store, &u, Bucket::Monthly, 2, None, "g1").await;
    grant(store, &u, Bucket::Purchased, 18, None, "g2").await; // 2 monthly + 23 purchased
    let h = hold_id(&applied(store.hold(hold_cmd(&u, 10, 600, "h1")).await));
    let b = balance(store, &u).await;
    assert_eq!((b.total, b.held, b.available, b.open_holds), (25, 10, 15, 1));
    assert_eq!(rejected(store.spend(spend_cmd(&u, 16, "s1")).await), Rejection::InsufficientCredits { needed: 16, available: 15 });

    let usage = Usage {
        operation: "playground_run".into(),
        model: "claude-sonnet-4-5".into(),
        tokens: TokenUsage { input: 9_000, output: 1_000, cache_read: 0, cache_write: 0 },
        cost_micros: 42_000,
    };
    let e = applied(store.settle(Settle { hold: h, credits: 3, usage: Some(usage.clone()), key: key("st1") }).await);
    match e {
        Effect::Settled { hold, charged: c, released, capped, balances, .. } => {
            assert_eq!((hold, c, released, capped), (h, charged(2, 0, 1), 7, false));
            assert_eq!((balances.total(), balances.held, balances.available()), (22, 0, 22));
        }
        other => panic!("{other:?}"),
    }
    let rows = store.usage(&u, 10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].credits, rows[0].hold, &rows[0].usage), (3, Some(h), &usage));

    assert_eq!(rejected(store.settle(settle_cmd(h, 1, "st2")).await), Rejection::AlreadySettled(h));
    assert_eq!(rejected(store.release(h, key("r0")).await), Rejection::AlreadySettled(h));

    let h2 = hold_id(&applied(store.hold(hold_cmd(&u, 5, 600, "h2")).await));
    assert!(matches!(applied(store.release(h2, key("r1")).await), Effect::Released { released: 5, .. }));
    assert_eq!(rejected(store.release(h2, key("r2")).await), Rejection::AlreadyReleased(h2));
    assert_eq!(rejected(store.settle(settle_cmd(h2, 1, "st3")).await), Rejection::AlreadyReleased(h2));
    assert_eq!(rejected(store.settle(settle_cmd(HoldId(987_654), 1, "st4")).await), Rejection::UnknownHold(HoldId(987_654)));
    assert_eq!(rejected(store.release(HoldId(987_654), key("r3")).await), Rejection::UnknownHold(HoldId(987_654)));

    // Actual usage above the hold is charged as the hold, never more.
    let h3 = hold_id(&applied(store.hold(hold_cmd(&u, 4, 600, "h3")).await));
    match applied(store.settle(settle_cmd(h3, 9, "st5")).await) {
        Effect::Settled { charged: c, released: 0, capped: true, .. } => assert_eq!(c.total(), 4),
        other => panic!("{other:?}"),
    }
    assert_eq!(buckets(store, &u).await, (0, 0, 18, 0));
    let mut q = HistoryQuery::new(u.clone());
    q.kinds = vec![EntryKind::Hold];
    assert_eq!(store.history(&q).await.unwrap().entries.len(), 3);
    q.kinds = vec![EntryKind::Settle, EntryKind::Release];
    assert_eq!(store.history(&q).await.unwrap().entries.len(), 3);
}

/// Holds carry a deadline; an abandoned hold stops counting at its deadline and the
/// `expire_holds` job records its return once.
pub async fn hold_expiry_and_sweep(store: &dyn Store, clock: &ManualClock) {
    let u = create_user(store, "u").await;
    let h = hold_id(&applied(store.hold(hold_cmd(&u, 5, 60, "h1")).await));
    assert_eq!(rejected(store.spend(spend_cmd(&u, 1, "s1")).await), Rejection::InsufficientCredits { needed: 1, available: 0 });
    assert_eq!(jobs::expire_holds(store).await.unwrap().examined, 0);
    clock.advance(Duration::seconds(61));
    let b = balance(store, &u).await;
    assert_eq!((b.held, b.available, b.open_holds), (0, 5, 0));
    assert_eq!(rejected(store.settle(settle_cmd(h, 1, "st1")).await), Rejection::HoldExpired(h));
    let r = jobs::expire_holds(store).await.unwrap();
    assert_eq!((r.examined, r.applied), (1, 1));
    assert_eq!(jobs::expire_holds(store).await.unwrap(), jobs::JobReport::default());
    assert_eq!(rejected(store.settle(settle_cmd(h, 1, "st2")).await), Rejection::HoldExpired(h));
    let mut q = HistoryQuery::new(u.clone());
    q.kinds = vec![EntryKind::ExpireHold];
    let page = store.history(&q).await.unwrap();
    assert_eq!(page.entries.len(), 1);
    assert_eq!((page.entries[0].held_delta, page.entries[0].hold), (-5, Some(h)));
    // A hold expired lazily (by another command, before any sweep) is recorded once too.
    let h2 = hold_id(&applied(store.hold(hold_cmd(&u, 3, 30, "h2")).await));
    clock.advance(Duration::seconds(31));
    applied(store.spend(spend_cmd(&u, 5, "s2")).await);
    assert_eq!(store.history(&q).await.unwrap().entries.len(), 2);
    assert_eq!(jobs::expire_holds(store).await.unwrap().examined, 0);
    assert_eq!(rejected(store.release(h2, key("r1")).await), Rejection::HoldExpired(h2));
    assert_eq!(buckets(store, &u).await, (0, 0, 0, 0));
}

/// A repeat with the same key returns the first result and writes nothing; the same key with
/// other parameters is a conflict.
pub async fn idempotent_replays(store: &dyn Store, _clock: &ManualClock) {
    let u = create_user(store, "u").await;
    let g = grant(store, &u, Bucket::Purchased, 10, None, "g1").await;
    let g2 = grant(store, &u, Bucket::Purchased, 10, None, "g1").await;
    assert_eq!(g, g2);
    assert_eq!(buckets(store, &u).await, (0, 0, 15, 0));
    let first = store.spend(spend_cmd(&u, 3, "s1")).await.unwrap().unwrap();
    let len = log_len(store, &u).await;
    for _ in 0..3 {
        let again = store.spend(spend_cmd(&u, 3, "s1")).await.unwrap().unwrap();
        assert!(again.replayed);
        assert_eq!(again.effect, first.effect);
    }
    assert_eq!(log_len(store, &u).await, len);
    assert_eq!(buckets(store, &u).await, (0, 0, 12, 0));
    assert!(matches!(store.spend(spend_cmd(&u, 4, "s1")).await, Err(Error::IdempotencyConflict { .. })));
    // Keys are global: another command kind with a used key conflicts too.
    assert!(matches!(store.hold(hold_cmd(&u, 1, 60, "s1")).await, Err(Error::IdempotencyConflict { .. })));
    let h = applied(store.hold(hold_cmd(&u, 4, 600, "h1")).await);
    assert_eq!(applied(store.hold(hold_cmd(&u, 4, 600, "h1")).await), h);
    assert_eq!(buckets(store, &u).await, (0, 0, 12, 4));
    let s = applied(store.settle(settle_cmd(hold_id(&h), 2, "st1")).await);
    assert_eq!(applied(store.settle(settle_cmd(hold_id(&h), 2, "st1")).await), s);
    assert_eq!(buckets(store, &u).await, (0, 0, 10, 0));
    assert_eq!(log_len(store, &u).await, len + 2);
}

/// History is filtered by type and time, paginated newest first, and exported as CSV.
pub async fn history_filters_pages_csv(store: &dyn Store, clock: &ManualClock) {
    let u = create_user(store, "u").await;
    // Another account's entries interleave with u's; they must never show in u's history.
    let w = create_user(store, "w").await;
    grant(store, &u, Bucket::Purchased, 100, None, "g1").await;
    grant(store, &w, Bucket::Purchased, 100, None, "gw").await;
    let mut times = Vec::new();
    let mut spends = Vec::new();
    for i in 0..25 {
        clock.advance(Duration::minutes(1));
        times.push(clock.now());
        match applied(store.spend(spend_cmd(&u, 1, &format!("s{i}"))).await) {
            Effect::Spent { entry, .. } => spends.push(entry),
            other => panic!("{other:?}"),
        }
        for j in 0..i % 3 {
            applied(store.spend(spend_cmd(&w, 1, &format!("w{i}-{j}"))).await);
        }
    }
    let mut q = HistoryQuery::new(u.clone());
    q.limit = 10;
    let mut seen = Vec::new();
    let mut pages = Vec::new();
    loop {
        let page = store.history(&q).await.unwrap();
        pages.push(page.entries.len());
        seen.extend(page.entries.iter().map(|e| e.id));
        match page.next {
            Some(n) => q.before = Some(n),
            None => break,
        }
    }
    // 25 spends, 2 grants (signup, g1), 1 cost profile.
    assert_eq!(pages, vec![10, 10, 8]);
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "newest first, no repeats");
    let newest_spends: Vec<EntryId> = spends.iter().rev().copied().collect();
    assert_eq!(seen[..25], newest_spends[..], "u's own spends, newest first");

    let mut q = HistoryQuery::new(u.clone());
    q.limit = 1000;
    q.kinds = vec![EntryKind::Spend];
    assert_eq!(store.history(&q).await.unwrap().entries.len(), 25);
    q.kinds = vec![EntryKind::Grant];
    assert_eq!(store.history(&q).await.unwrap().entries.len(), 2);
    q.kinds = vec![EntryKind::Spend];
    q.from = Some(times[10]);
    q.until = Some(times[20]);
    let page = store.history(&q).await.unwrap();
    assert_eq!(page.entries.len(), 10);
    assert!(page.entries.iter().all(|e| e.at >= times[10] && e.at < times[20]));
    assert_eq!(page.entries[0].balance_after, 105 - 20);

    let mut bad = HistoryQuery::new(u.clone());
    bad.limit = 0;
    assert!(matches!(store.history(&bad).await, Err(Error::InvalidInput { .. })));
    bad.limit = 10;
    bad.from = Some(times[5]);
    bad.until = Some(times[1]);
    assert!(matches!(store.history(&bad).await, Err(Error::InvalidInput { .. })));

    let mut csv = Vec::new();
    let rows = export_csv(store, &HistoryQuery::new(u.clone()), &mut csv).await.unwrap();
    assert_eq!(rows, 28);
    let text = String::from_utf8(csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 29);
    assert!(lines[0].starts_with("id,at,account,kind,monthly,rollover,purchased,held,balance_after"));
    let newest: Vec<&str> = lines[1].split(',').collect();
    assert_eq!((newest[3], newest[6], newest[8]), ("spend", "-1", "80"));
    assert!(lines[27].contains(",cost_profile,0,0,0,0,5,0,,"), "{}", lines[27]);
    assert!(lines[28].contains(",grant,0,0,5,0,5,0,bonus,"));
}

/// Refunds give back credits of one charge (last taken, first returned) as new entries;
/// clawbacks take credits back, clamped at zero and never below what open holds need.
pub async fn refunds_and_clawbacks(store: &dyn Store, _clock: &ManualClock) {
    let u = create_user(store, "u").await; // 5 purchased
    let grant_entry = entry_id(&grant(store, &u, Bucket::Monthly, 10, None, "g1").await);
    let spent = applied(store.spend(spend_cmd(&u, 12, "s1")).await);
    assert!(matches!(spent, Effect::Spent { charged: c, .. } if c == charged(10, 0, 2)));
    let e = entry_id(&spent);
    let refund = |amount, k: &str| Refund { account: u.clone(), entry: e, amount, reference: "support".into(), key: key(k) };
    match applied(store.refund(refund(3, "r1")).await) {
        Effect::Refunded { returned, .. } => assert_eq!(returned, charged(1, 0, 2)),
        other => panic!("{other:?}"),
    }
    assert_eq!(buckets(store, &u).await, (1, 0, 5, 0));
    assert_eq!(rejected(store.refund(refund(10, "r2")).await), Rejection::RefundExceedsCharge { requested: 10, refundable: 9 });
    applied(store.refund(refund(9, "r3")).await);
    assert_eq!(rejected(store.refund(refund(1, "r4")).await), Rejection::RefundExceedsCharge { requested: 1, refundable: 0 });
    let not_charge = Refund { account: u.clone(), entry: grant_entry, amount: 1, reference: String::new(), key: key("r5") };
    assert_eq!(rejected(store.refund(not_charge).await), Rejection::NotACharge(grant_entry));
    let other = create_user(store, "other").await;
    let foreign = Refund { account: other.clone(), entry: e, amount: 1, reference: String::new(), key: key("r6") };
    assert_eq!(rejected(store.refund(foreign).await), Rejection::NotACharge(e));
    assert_eq!(buckets(store, &u).await, (10, 0, 5, 0));
    // The original entry is untouched; refunds are entries of their own that point at it.
    let mut q = HistoryQuery::new(u.clone());
    q.kinds = vec![EntryKind::Refund];
    let refunds = store.history(&q).await.unwrap().entries;
    assert_eq!(refunds.len(), 2);
    assert!(refunds.iter().all(|r| r.ref_entry == Some(e)));

    let claw = |bucket, amount, k: &str| Clawback { account: u.clone(), bucket, amount, reference: "refunded purchase".into(), key: key(k) };
    match applied(store.clawback(claw(Bucket::Purchased, 8, "c1")).await) {
        Effect::ClawedBack { taken, shortfall, .. } => assert_eq!((taken, shortfall), (charged(0, 0, 5), 3)),
        other => panic!("{other:?}"),
    }
    // Credits backing an open hold are not taken.
    let h = hold_id(&applied(store.hold(hold_cmd(&u, 8, 600, "h1")).await));
    match applied(store.clawback(claw(Bucket::Monthly, 5, "c2")).await) {
        Effect::ClawedBack { taken, shortfall, .. } => assert_eq!((taken, shortfall), (charged(2, 0, 0), 3)),
        other => panic!("{other:?}"),
    }
    match applied(store.clawback(claw(Bucket::Monthly, 5, "c3")).await) {
        Effect::ClawedBack { entry: None, shortfall: 5, .. } => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(applied(store.settle(settle_cmd(h, 8, "st1")).await), Effect::Settled { charged: c, .. } if c == charged(8, 0, 0)));
    assert_eq!(buckets(store, &u).await, (0, 0, 0, 0));
}

/// The monthly rollover step: unused monthly credits move to rollover (capped at one month's
/// allocation) and expire a month later; a new allocation is granted once per period.
pub async fn monthly_rollover(store: &dyn Store, clock: &ManualClock) {
    let u = create_user(store, "u").await; // 5 purchased
    let pe1 = clock.now() + Duration::days(30);
    let e = applied(store.set_plan(u.clone(), Some(PlanTerms { monthly_credits: 100, period_end: pe1, anchor_day: None }), key("plan1")).await);
    assert!(matches!(e, Effect::PlanSet { granted: 100, .. }));
    // Updating the same plan does not grant again.
    assert!(matches!(
        applied(store.set_plan(u.clone(), Some(PlanTerms { monthly_credits: 100, period_end: pe1, anchor_day: None }), key("plan1b")).await),
        Effect::PlanSet { granted: 0, .. }
    ));
    applied(store.spend(spend_cmd(&u, 30, "s1")).await);
    assert_eq!(jobs::monthly_rollover(store).await.unwrap().examined, 0);

    clock.set(pe1 + Duration::hours(1));
    let r = jobs::monthly_rollover(store).await.unwrap();
    assert_eq!((r.examined, r.applied), (1, 1));
    let pe2 = add_month(pe1).unwrap();
    let b = balance(store, &u).await;
    assert_eq!((b.monthly, b.rollover, b.purchased), (100, 70, 5));
    assert_eq!(b.next_expiry, Some(Lot { amount: 70, expires_at: pe2 }));
    assert_eq!(b.plan.unwrap().period_end, pe2);
    // Twice is once.
    assert_eq!(jobs::monthly_rollover(store).await.unwrap().examined, 0);
    assert_eq!(rejected(store.execute(Command::Rollover { account: u.clone() }).await), Rejection::NothingDue);
    assert_eq!(balance(store, &u).await, b);

    applied(store.spend(spend_cmd(&u, 120, "s2")).await); // 100 monthly + 20 rollover
    clock.set(pe2 + Duration::hours(1));
    // The rollover left (50) expired at the period end, even before the job ran.
    assert_eq!(buckets(store, &u).await, (0, 0, 5, 0));
    let r = jobs::monthly_rollover(store).await.unwrap();
    assert_eq!(r.applied, 1);
    assert_eq!(buckets(store, &u).await, (100, 0, 5, 0));

    // The cap: at most one month's allocation rolls over (the allocation now 40).
    let pe3 = add_month(pe2).unwrap();
    applied(store.set_plan(u.clone(), Some(PlanTerms { monthly_credits: 40, period_end: pe3, anchor_day: None }), key("plan2")).await);
    clock.set(pe3);
    match applied(store.execute(Command::Rollover { account: u.clone() }).await) {
        Effect::RolledOver { periods: 1, moved: 40, expired: 60, granted: 40, .. } => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(buckets(store, &u).await, (40, 40, 5, 0));

    // Ending the plan: the last monthly credits roll over, nothing new is granted.
    applied(store.set_plan(u.clone(), None, key("plan-end")).await);
    let pe4 = add_month(pe3).unwrap();
    clock.set(pe4 + Duration::days(1));
    let r = jobs::monthly_rollover(store).await.unwrap();
    assert_eq!(r.applied, 1);
    let b = balance(store, &u).await;
    assert_eq!((b.monthly, b.rollover, b.purchased, b.plan), (0, 40, 5, None));
    assert_eq!(jobs::monthly_rollover(store).await.unwrap().examined, 0);
    // Expired credits are never spent.
    clock.set(add_month(pe4).unwrap());
    assert_eq!(rejected(store.spend(spend_cmd(&u, 6, "s3")).await), Rejection::InsufficientCredits { needed: 6, available: 5 });
    assert!(matches!(applied(store.spend(spend_cmd(&u, 5, "s4")).await), Effect::Spent { charged: c, .. } if c == charged(0, 0, 5)));

    // Missed periods are all processed, in order, by one step.
    let v = create_user(store, "v").await;
    let start = clock.now();
    applied(store.set_plan(v.clone(), Some(PlanTerms { monthly_credits: 10, period_end: start + Duration::days(1), anchor_day: None }), key("plan-v")).await);
    clock.set(add_month(add_month(start + Duration::days(1)).unwrap()).unwrap() + Duration::hours(1));
    match applied(store.execute(Command::Rollover { account: v.clone() }).await) {
        Effect::RolledOver { periods: 3, moved: 30, expired: 0, granted: 30, .. } => {}
        other => panic!("{other:?}"),
    }
    // Period 3's allocation stands; period 2's rollover expired at period 3's end... and period
    // 3's rollover (10) lives a month.
    assert_eq!(buckets(store, &v).await, (10, 10, 5, 0));
}

/// Rollover credits stop counting at their expiry; the expiry job records it once.
pub async fn rollover_expiry(store: &dyn Store, clock: &ManualClock) {
    let u = create_user(store, "u").await;
    grant(store, &u, Bucket::Rollover, 10, Some(clock.now() + Duration::days(2)), "g1").await;
    assert!(matches!(applied(store.spend(spend_cmd(&u, 3, "s1")).await), Effect::Spent { charged: c, .. } if c == charged(0, 3, 0)));
    assert_eq!(jobs::expire_rollover(store).await.unwrap().examined, 0);
    clock.advance(Duration::days(3));
    assert_eq!(buckets(store, &u).await, (0, 0, 5, 0));
    assert_eq!(rejected(store.spend(spend_cmd(&u, 6, "s2")).await), Rejection::InsufficientCredits { needed: 6, available: 5 });
    let r = jobs::expire_rollover(store).await.unwrap();
    assert_eq!((r.examined, r.applied), (1, 1));
    assert_eq!(jobs::expire_rollover(store).await.unwrap().examined, 0);
    let mut q = HistoryQuery::new(u.clone());
    q.kinds = vec![EntryKind::ExpireCredits];
    let page = store.history(&q).await.unwrap();
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.entries[0].delta, charged(0, -7, 0));
}

/// A hold may only count credits that outlive its deadline, so a settle always finds them.
pub async fn holds_need_credits_that_outlive_them(store: &dyn Store, clock: &ManualClock) {
    let u = create_user(store, "u").await; // 5 purchased
    grant(store, &u, Bucket::Rollover, 10, Some(clock.now() + Duration::minutes(5)), "g1").await;
    assert_eq!(rejected(store.hold(hold_cmd(&u, 12, 600, "h1")).await), Rejection::InsufficientCredits { needed: 12, available: 5 });
    let h = hold_id(&applied(store.hold(hold_cmd(&u, 12, 60, "h2")).await));
    applied(store.settle(settle_cmd(h, 2, "st1")).await); // rollover 8 left
    let h = hold_id(&applied(store.hold(hold_cmd(&u, 5, 600, "h3")).await));
    // While that hold is open, the rollover credits that expire before it cannot be spent in
    // a way that would leave it unbacked; the credits that back it are reserved.
    assert_eq!(rejected(store.spend(spend_cmd(&u, 1, "s1")).await), Rejection::InsufficientCredits { needed: 1, available: 0 });
    clock.advance(Duration::minutes(6));
    assert_eq!(buckets(store, &u).await, (0, 0, 5, 5));
    assert!(matches!(applied(store.settle(settle_cmd(h, 5, "st2")).await), Effect::Settled { charged: c, .. } if c == charged(0, 0, 5)));
}

/// Many concurrent spends on one account: exactly as many succeed as the balance allows.
pub async fn concurrent_spends_never_overspend(store: &dyn Store, _clock: &ManualClock) {
    let u = create_user(store, "hot").await;
    grant(store, &u, Bucket::Purchased, 45, None, "g1").await; // 50
    let outcomes = join_all((0..200).map(|i| store.spend(spend_cmd(&u, 1, &format!("s{i}"))))).await;
    let ok = outcomes.iter().filter(|o| matches!(o, Ok(Ok(_)))).count();
    let short = outcomes.iter().filter(|o| matches!(o, Ok(Err(Rejection::InsufficientCredits { .. })))).count();
    assert_eq!((ok, short), (50, 150));
    assert_eq!(buckets(store, &u).await, (0, 0, 0, 0));
    // Every caller got its own exact outcome: the balances after the successes are 49..=0.
    let mut after: Vec<Credits> = outcomes.iter().filter_map(|o| o.as_ref().ok()?.as_ref().ok()).map(|c| c.effect.balances().total()).collect();
    after.sort();
    assert_eq!(after, (0..50).collect::<Vec<_>>());
    // ... and each outcome is the one the log recorded for that caller's entry.
    let mut q = HistoryQuery::new(u.clone());
    q.limit = 1000;
    q.kinds = vec![EntryKind::Spend];
    let log: std::collections::HashMap<EntryId, Credits> = store.history(&q).await.unwrap().entries.iter().map(|e| (e.id, e.balance_after)).collect();
    assert_eq!(log.len(), 50);
    for o in outcomes.iter().filter_map(|o| o.as_ref().ok()?.as_ref().ok()) {
        assert_eq!(log[&entry_id(&o.effect)], o.effect.balances().total(), "{o:?}");
    }
}

/// Concurrent holds never reserve more than there is; concurrent duplicates apply once.
pub async fn concurrent_holds_and_duplicate_keys(store: &dyn Store, _clock: &ManualClock) {
    let u = create_user(store, "pool").await;
    grant(store, &u, Bucket::Purchased, 15, None, "g1").await; // 20
    let outcomes = join_all((0..100).map(|i| store.hold(hold_cmd(&u, 1, 600, &format!("h{i}"))))).await;
    let holds: Vec<HoldId> = outcomes.iter().filter_map(|o| o.as_ref().ok()?.as_ref().ok()).map(|c| hold_id(&c.effect)).collect();
    assert_eq!(holds.len(), 20);
    assert_eq!(buckets(store, &u).await, (0, 0, 20, 20));
    let settled = join_all(holds.iter().enumerate().map(|(i, h)| store.settle(settle_cmd(*h, 1, &format!("st{i}"))))).await;
    assert!(settled.iter().all(|o| matches!(o, Ok(Ok(_)))));
    assert_eq!(buckets(store, &u).await, (0, 0, 0, 0));

    let v = create_user(store, "dup").await;
    let outcomes = join_all((0..50).map(|_| store.spend(spend_cmd(&v, 2, "same-key")))).await;
    let fresh = outcomes.iter().filter(|o| matches!(o, Ok(Ok(c)) if !c.replayed)).count();
    let replays = outcomes.iter().filter(|o| matches!(o, Ok(Ok(c)) if c.replayed)).count();
    assert_eq!((fresh, replays), (1, 49));
    assert_eq!(buckets(store, &v).await, (0, 0, 3, 0));
}

/// A plan change that arrives after the period ended but before the rollover job (a renewal
/// webhook, say) closes the ended period first: nothing is skipped or granted twice.
pub async fn plan_changes_close_due_periods_first(store: &dyn Store, clock: &ManualClock) {
    let u = create_user(store, "u").await;
    let pe1 = clock.now() + Duration::days(30);
    applied(store.set_plan(u.clone(), Some(PlanTerms { monthly_credits: 100, period_end: pe1, anchor_day: None }), key("p1")).await);
    applied(store.spend(spend_cmd(&u, 40, "s1")).await);
    clock.set(pe1 + Duration::minutes(5));
    let pe2 = add_month(pe1).unwrap();
    match applied(store.set_plan(u.clone(), Some(PlanTerms { monthly_credits: 100, period_end: pe2, anchor_day: None }), key("renewal")).await) {
        Effect::PlanSet { granted: 100, .. } => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(buckets(store, &u).await, (100, 60, 5, 0));
    assert_eq!(jobs::monthly_rollover(store).await.unwrap().examined, 0);
    assert_eq!(balance(store, &u).await.plan.unwrap().period_end, pe2);
}

/// The rollover step does not wait for open holds that stay backed.
pub async fn rollover_runs_with_backed_holds(store: &dyn Store, clock: &ManualClock) {
    let u = create_user(store, "u").await;
    let pe = clock.now() + Duration::days(1);
    applied(store.set_plan(u.clone(), Some(PlanTerms { monthly_credits: 50, period_end: pe, anchor_day: None }), key("p1")).await);
    clock.set(pe - Duration::minutes(1));
    let h = hold_id(&applied(store.hold(hold_cmd(&u, 30, 3_600, "h1")).await));
    clock.set(pe + Duration::minutes(1));
    let r = jobs::monthly_rollover(store).await.unwrap();
    assert_eq!((r.applied, r.deferred), (1, 0));
    assert_eq!(buckets(store, &u).await, (50, 50, 5, 30));
    assert!(matches!(applied(store.settle(settle_cmd(h, 30, "st1")).await), Effect::Settled { charged: c, .. } if c == charged(30, 0, 0)));
}

/// Refunded rollover credits come back with the earliest expiry they were taken from.
pub async fn refunds_never_extend_expiry(store: &dyn Store, clock: &ManualClock) {
    let now = clock.now();
    let u = create_user(store, "u").await;
    grant(store, &u, Bucket::Rollover, 30, Some(now + Duration::days(10)), "g1").await;
    grant(store, &u, Bucket::Rollover, 20, Some(now + Duration::days(20)), "g2").await;
    let e = entry_id(&applied(store.spend(spend_cmd(&u, 50, "s1")).await));
    applied(store.refund(Refund { account: u.clone(), entry: e, amount: 50, reference: String::new(), key: key("r1") }).await);
    let b = balance(store, &u).await;
    assert_eq!((b.rollover, b.next_expiry), (50, Some(Lot { amount: 50, expires_at: now + Duration::days(10) })));
    clock.set(now + Duration::days(11));
    assert_eq!(buckets(store, &u).await, (0, 0, 5, 0));
}

/// Grants may create 8 distinct rollover expiry dates; the rollover step still finds room.
pub async fn rollover_lot_limits(store: &dyn Store, clock: &ManualClock) {
    let now = clock.now();
    let u = create_user(store, "u").await;
    applied(store.set_plan(u.clone(), Some(PlanTerms { monthly_credits: 10, period_end: now + Duration::days(2), anchor_day: None }), key("p1")).await);
    for i in 0..MAX_ROLLOVER_LOTS as i64 {
        grant(store, &u, Bucket::Rollover, 1, Some(now + Duration::days(3 + i)), &format!("g{i}")).await;
    }
    let ninth = Grant {
        account: u.clone(),
        bucket: Bucket::Rollover,
        amount: 1,
        source: GrantSource::Admin,
        expires_at: Some(now + Duration::days(25)),
        reference: String::new(),
        key: key("g-ninth"),
    };
    assert_eq!(error_code(store.grant(ninth).await), "invalid_input");
    // An existing date is fine.
    grant(store, &u, Bucket::Rollover, 1, Some(now + Duration::days(3)), "g-same").await;
    clock.set(now + Duration::days(2));
    let r = jobs::monthly_rollover(store).await.unwrap();
    assert_eq!((r.applied, r.failed), (1, 0));
    assert_eq!(buckets(store, &u).await, (10, 19, 5, 0));
}

/// Times finer than a millisecond are cut to the millisecond the store keeps, so what is
/// decided is what is stored.
pub async fn times_are_kept_to_the_millisecond(store: &dyn Store, clock: &ManualClock) {
    let base = clock.now() + Duration::days(5);
    let u = create_user(store, "u").await;
    grant(store, &u, Bucket::Rollover, 10, Some(base + Duration::microseconds(300)), "g1").await;
    grant(store, &u, Bucket::Rollover, 10, Some(base + Duration::microseconds(700)), "g2").await;
    let b = balance(store, &u).await;
    assert_eq!(b.next_expiry, Some(Lot { amount: 20, expires_at: base }));
    applied(store.spend(spend_cmd(&u, 3, "s1")).await);
    let mut q = HistoryQuery::new(u.clone());
    q.from = Some(clock.now() + Duration::microseconds(1));
    assert!(store.history(&q).await.unwrap().entries.is_empty(), "from rounds up to the next millisecond");
    q.from = Some(clock.now());
    // signup, cost profile, two grants, the spend.
    assert_eq!(store.history(&q).await.unwrap().entries.len(), 5);
}

/// Token counts that would overflow are refused as bad input, not wrapped.
pub async fn huge_token_counts_are_refused(store: &dyn Store, _clock: &ManualClock) {
    let u = create_user(store, "u").await;
    let mut s = spend_cmd(&u, 1, "s1");
    s.usage = Some(Usage {
        operation: "run".into(),
        model: "m".into(),
        tokens: TokenUsage { input: u64::MAX, output: 1, cache_read: 0, cache_write: 0 },
        cost_micros: 0,
    });
    assert_eq!(error_code(store.spend(s).await), "invalid_input");
    assert_eq!(buckets(store, &u).await, (0, 0, 5, 0));
}

/// Two runs of each job at the same moment (two nodes) do the work once between them.
pub async fn jobs_run_twice_at_once_do_the_work_once(store: &dyn Store, clock: &ManualClock) {
    let now = clock.now();
    let mut users = Vec::new();
    for i in 0..30 {
        let u = create_user(store, &format!("u{i:02}")).await;
        applied(
            store
                .set_plan(u.clone(), Some(PlanTerms { monthly_credits: 10, period_end: now + Duration::days(1), anchor_day: None }), key(&format!("p{i}")))
                .await,
        );
        grant(store, &u, Bucket::Rollover, 3, Some(now + Duration::hours(2)), &format!("g{i}")).await;
        applied(store.hold(hold_cmd(&u, 1, 60, &format!("h{i}"))).await);
        users.push(u);
    }
    clock.set(now + Duration::days(1) + Duration::minutes(1));
    let (a, b) = tokio::join!(jobs::expire_holds(store), jobs::expire_holds(store));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.applied + b.applied, 30, "{a:?} {b:?}");
    let (a, b) = tokio::join!(jobs::monthly_rollover(store), jobs::monthly_rollover(store));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.applied + b.applied, a.failed + b.failed), (30, 0), "{a:?} {b:?}");
    let (a, b) = tokio::join!(jobs::expire_rollover(store), jobs::expire_rollover(store));
    assert_eq!(a.unwrap().applied + b.unwrap().applied, 0, "the rollover step already removed what had expired");
    for u in &users {
        // 10 granted at the start, 10 rolled over, 10 granted once for the new period.
        assert_eq!(buckets(store, u).await, (10, 10, 5, 0));
    }
}

// ---------------------------------------------------------------------------------------------
// Cost control

const USD: i64 = 1_000_000;

/// Micro-dollars of this many cents.
pub fn cents(c: i64) -> i64 {
    c * USD / 100
}

/// A metered operation of this provider cost.
pub fn usage_of(cost_micros: i64) -> Usage {
    Usage {
        operation: "playground_run".into(),
        model: "claude-sonnet-4-5".into(),
        tokens: TokenUsage { input: 1_000, output: 500, cache_read: 0, cache_write: 0 },
        cost_micros,
    }
}

pub fn cost_hold(a: &AccountId, amount: Credits, cost_micros: i64, k: &str) -> Hold {
    Hold { account: a.clone(), amount, ttl_secs: 3_600, cost_micros, reference: format!("run {k}"), key: key(k) }
}

pub fn meter_cmd(a: &AccountId, cost_micros: i64, k: &str) -> Meter {
    Meter { account: a.clone(), usage: usage_of(cost_micros), reference: format!("op {k}"), key: key(k) }
}

async fn cost_of(store: &dyn Store, a: &AccountId) -> CostView {
    store.cost(a).await.expect("cost view")
}

fn at(y: i32, m: u32, d: u32, h: u32, min: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, min, s).unwrap()
}

fn date(y: i32, m: u32, d: u32) -> chrono::NaiveDate {
    chrono::NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

/// A user on PRPM+ (individual, or org member), with credits to spare.
pub async fn create_plus_user(store: &dyn Store, clock: &ManualClock, id: &str, org_member: bool) -> AccountId {
    let u = create_free_user(store, id).await;
    let period_end = clock.now() + Duration::days(30);
    applied(store.set_plan(u.clone(), Some(PlanTerms { monthly_credits: 200, period_end, anchor_day: None }), key(&format!("plan:{id}"))).await);
    if org_member {
        applied(store.set_cost_profile(u.clone(), true, None, key(&format!("org:{id}"))).await);
    }
    u
}

async fn kinds_in_log(store: &dyn Store, a: &AccountId, kind: EntryKind) -> Vec<Entry> {
    let mut q = HistoryQuery::new(a.clone());
    q.limit = 1000;
    q.kinds = vec![kind];
    store.history(&q).await.expect("history").entries
}

/// The hourly request limit and the hold are one atomic step: 50 concurrent runs against a
/// limit of 10 admit exactly 10; the others are refused with the time until the next slot,
/// and charge nothing. The window slides: the slot opens exactly one hour after the oldest.
pub async fn rate_limit_is_exact_under_concurrency(store: &dyn Store, clock: &ManualClock) {
    let u = create_free_user(store, "u").await; // free: 10 requests an hour
    grant(store, &u, Bucket::Purchased, 1_000, None, "g").await;
    let t0 = clock.now();
    let outcomes = join_all((0..50).map(|i| store.hold(cost_hold(&u, 2, 100, &format!("h{i}"))))).await;
    let mut held = 0;
    for o in outcomes {
        match o.unwrap() {
            Ok(c) if matches!(c.effect, Effect::Held { .. }) => held += 1,
            Err(Rejection::RateLimited { limit: 10, retry_after_ms }) => assert_eq!(retry_after_ms, 3_600_000),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(held, 10);
    assert_eq!(buckets(store, &u).await.3, 20, "only the admitted runs hold credits");
    assert_eq!(kinds_in_log(store, &u, EntryKind::Hold).await.len(), 10);
    let v = cost_of(store, &u).await;
    assert_eq!((v.requests_last_hour, v.held_cost_micros), (10, 1_000));

    // A second later, the next slot is an hour after the first run, less that second.
    clock.set(t0 + Duration::seconds(1));
    assert_eq!(rejected(store.hold(cost_hold(&u, 1, 0, "late")).await), Rejection::RateLimited { limit: 10, retry_after_ms: 3_599_000 });
    clock.set(t0 + Duration::hours(1) - Duration::milliseconds(1));
    assert_eq!(rejected(store.hold(cost_hold(&u, 1, 0, "late2")).await), Rejection::RateLimited { limit: 10, retry_after_ms: 1 });
    // Exactly an hour later the ten leave the window together; ten more fit, not eleven.
    clock.set(t0 + Duration::hours(1));
    let outcomes = join_all((0..11).map(|i| store.hold(cost_hold(&u, 1, 0, &format!("n{i}"))))).await;
    let admitted = outcomes.iter().filter(|o| matches!(o, Ok(Ok(_)))).count();
    assert_eq!(admitted, 10);
}

/// The worst case of runs in flight counts against the cost limits at admission, so
/// concurrent runs can never pass a limit together; settles count the real cost, releases and
/// expiries give the worst case back.
pub async fn cost_limits_hold_under_concurrency(store: &dyn Store, clock: &ManualClock) {
    let u = create_plus_user(store, clock, "u", false).await; // $1.00 a day, $5.00 a month
    assert_eq!(cost_of(store, &u).await.tier, crate::cost::PRPM_PLUS_INDIVIDUAL);
    let outcomes = join_all((0..50).map(|i| store.hold(cost_hold(&u, 1, cents(30), &format!("c{i}"))))).await;
    let mut holds = Vec::new();
    for o in outcomes {
        match o.unwrap() {
            Ok(c) => holds.push(hold_id(&c.effect)),
            Err(Rejection::DailyCostLimit { limit_micros, spent_micros: 0, held_micros, requested_micros }) => {
                assert_eq!((limit_micros, requested_micros), (USD, cents(30)));
                assert!(held_micros == cents(90), "refused with {held_micros} held");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(holds.len(), 3, "3 × $0.30 fit in $1.00, a fourth does not");
    // The first run costs $0.10: 0.10 spent + 0.60 in flight + 0.30 = 1.00 fits exactly.
    let s = Settle { hold: holds[0], credits: 1, usage: Some(usage_of(cents(10))), key: key("s0") };
    applied(store.settle(s).await);
    let v = cost_of(store, &u).await;
    assert_eq!((v.day_cost_micros, v.month_cost_micros, v.held_cost_micros), (cents(10), cents(10), cents(60)));
    let h3 = hold_id(&applied(store.hold(cost_hold(&u, 1, cents(30), "h3")).await));
    assert!(matches!(rejected(store.hold(cost_hold(&u, 1, 1, "h4")).await), Rejection::DailyCostLimit { .. }));
    // A release gives its worst case back.
    applied(store.release(holds[1], key("r1")).await);
    applied(store.hold(cost_hold(&u, 1, cents(30), "h5")).await);
    // So does an expired hold.
    clock.advance(Duration::seconds(3_601));
    let r = jobs::expire_holds(store).await.unwrap();
    assert_eq!(r.applied, 1);
    let v = cost_of(store, &u).await;
    assert_eq!((v.held_cost_micros, v.day_cost_micros), (0, cents(10)));
    let _ = h3;
    // Settling above the worst case counts the real cost (the provider's bill is the truth).
    let h = hold_id(&applied(store.hold(cost_hold(&u, 1, cents(20), "h6")).await));
    applied(store.settle(Settle { hold: h, credits: 1, usage: Some(usage_of(cents(25))), key: key("s6") }).await);
    assert_eq!(cost_of(store, &u).await.day_cost_micros, cents(35));
}

/// Settles and meters count real cost; reaching a limit throttles with a reason that is in
/// the log; the alert threshold and "at risk" each alert once per user and month.
pub async fn throttles_and_alerts(store: &dyn Store, clock: &ManualClock) {
    let u = create_free_user(store, "u").await; // $0.10 a day, $0.50 a month, alert at 80 %
    grant(store, &u, Bucket::Purchased, 1_000, None, "g").await;
    let mut s = spend_cmd(&u, 1, "s1");
    s.usage = Some(usage_of(cents(6)));
    assert!(matches!(applied(store.spend(s).await), Effect::Spent { cost: crate::cost::CostEvents { throttled: None, .. }, .. }));
    assert!(matches!(rejected(store.hold(cost_hold(&u, 1, cents(5), "h1")).await), Rejection::DailyCostLimit { .. }));
    let h = hold_id(&applied(store.hold(cost_hold(&u, 1, cents(4), "h2")).await));
    let today = clock.now().date_naive();
    match applied(store.settle(Settle { hold: h, credits: 1, usage: Some(usage_of(cents(4))), key: key("s2") }).await) {
        Effect::Settled { cost, .. } => assert_eq!(cost.throttled, Some(ThrottleReason::DailyCostLimit { day: today })),
        other => panic!("{other:?}"),
    }
    assert_eq!(rejected(store.hold(cost_hold(&u, 1, 0, "h3")).await), Rejection::Throttled { reason: ThrottleReason::DailyCostLimit { day: today } });
    let throttles = kinds_in_log(store, &u, EntryKind::Throttle).await;
    assert_eq!(throttles.len(), 1);
    assert_eq!(throttles[0].reference, format!("daily cost limit reached on {today}"));
    assert_eq!(cost_of(store, &u).await.risk, crate::cost::RiskLevel::HighRisk, "throttled is high risk");

    // The next day the cost reset lifts it (once), and says so in the log.
    clock.set(at(2026, 1, 16, 0, 0, 30));
    let r = jobs::cost_reset(store).await.unwrap();
    assert_eq!((r.examined, r.applied), (1, 1));
    assert_eq!(jobs::cost_reset(store).await.unwrap(), jobs::JobReport::default(), "twice is once");
    let v = cost_of(store, &u).await;
    assert_eq!((v.throttle.clone(), v.day_cost_micros, v.month_cost_micros), (None, 0, cents(10)));
    let lifted = kinds_in_log(store, &u, EntryKind::Unthrottle).await;
    assert_eq!(lifted.len(), 1);
    assert!(lifted[0].reference.starts_with("period ended: daily cost limit"), "{}", lifted[0].reference);

    // Month so far $0.10. At risk is above $0.375, the threshold at $0.40: one alert each.
    let mut n = 0;
    let mut meter = |c: i64| {
        n += 1;
        store.meter(meter_cmd(&u, c, &format!("m{n}")))
    };
    let alerts_of = |e: Effect| e.cost_events().cloned().unwrap_or_default().alerts.iter().map(|a| a.kind).collect::<Vec<_>>();
    assert_eq!(alerts_of(applied(meter(cents(9)).await)), vec![]); // 0.19
    clock.set(at(2026, 1, 17, 9, 0, 0));
    assert_eq!(alerts_of(applied(meter(cents(9)).await)), vec![]); // 0.28
    clock.set(at(2026, 1, 18, 9, 0, 0));
    assert_eq!(alerts_of(applied(meter(cents(9)).await)), vec![]); // 0.37
    assert_eq!(alerts_of(applied(meter(cents(1)).await)), vec![crate::cost::AlertKind::AtRisk]); // 0.38
    assert_eq!(alerts_of(applied(meter(cents(1)).await)), vec![]); // 0.39
    assert_eq!(alerts_of(applied(meter(cents(1)).await)), vec![crate::cost::AlertKind::Threshold]); // 0.40
    assert_eq!(alerts_of(applied(meter(cents(1)).await)), vec![]); // 0.41
    let alerts = store.alerts(&AlertQuery { account: Some(u.clone()), after: None, limit: 100 }).await.unwrap();
    let kinds: Vec<_> = alerts.iter().map(|a| (a.alert.kind, a.alert.month, a.alert.cost_micros, a.alert.limit_micros)).collect();
    assert_eq!(
        kinds,
        vec![
            (crate::cost::AlertKind::AtRisk, date(2026, 1, 1), cents(38), cents(50)),
            (crate::cost::AlertKind::Threshold, date(2026, 1, 1), cents(40), cents(50))
        ]
    );
    // Paging: after the first alert.
    let rest = store.alerts(&AlertQuery { account: None, after: Some(alerts[0].id), limit: 10 }).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].account, u);

    // Reaching the monthly limit throttles for the rest of the month.
    clock.set(at(2026, 1, 19, 9, 0, 0));
    applied(meter(cents(9)).await); // 0.50
    let month = date(2026, 1, 1);
    clock.set(at(2026, 1, 25, 9, 0, 0));
    assert_eq!(rejected(store.hold(cost_hold(&u, 1, 0, "h4")).await), Rejection::Throttled { reason: ThrottleReason::MonthlyCostLimit { month } });
    // February: lifted lazily (admission works before the job ran), alerts may fire again.
    clock.set(at(2026, 2, 1, 0, 0, 1));
    applied(store.hold(cost_hold(&u, 1, 0, "h5")).await);
    clock.set(at(2026, 2, 2, 9, 0, 0));
    applied(meter(cents(9)).await);
    clock.set(at(2026, 2, 3, 9, 0, 0));
    applied(meter(cents(9)).await);
    clock.set(at(2026, 2, 4, 9, 0, 0));
    applied(meter(cents(9)).await);
    clock.set(at(2026, 2, 5, 9, 0, 0));
    assert_eq!(alerts_of(applied(meter(cents(9)).await)), vec![]); // 0.36
    clock.set(at(2026, 2, 6, 9, 0, 0));
    assert_eq!(alerts_of(applied(meter(cents(9)).await)), vec![crate::cost::AlertKind::AtRisk, crate::cost::AlertKind::Threshold]);
    let all = store.alerts(&AlertQuery { account: None, after: None, limit: 100 }).await.unwrap();
    assert_eq!(all.len(), 4);
    assert!(all[2..].iter().all(|a| a.alert.month == date(2026, 2, 1)));
}

/// Admins throttle and unthrottle with who and why in the log; unthrottling a user who is not
/// throttled is a clear outcome that changes nothing; the at-risk, throttled and high-risk
/// lists.
pub async fn admin_throttles_and_lists(store: &dyn Store, clock: &ManualClock) {
    let u = create_free_user(store, "u").await;
    let admin = |by: &str, why: &str, k: &str| AdminThrottle { account: u.clone(), by: by.into(), why: why.into(), key: key(k) };
    let before = log_len(store, &u).await;
    assert_eq!(rejected(store.unthrottle(admin("ops", "appeal", "un0")).await), Rejection::NotThrottled);
    assert_eq!(log_len(store, &u).await, before);
    applied(store.throttle(admin("ops", "abuse report #12", "t1")).await);
    assert_eq!(rejected(store.throttle(admin("ops", "again", "t2")).await), Rejection::AlreadyThrottled);
    match rejected(store.hold(cost_hold(&u, 1, 0, "h1")).await) {
        Rejection::Throttled { reason: ThrottleReason::Admin { by, why } } => assert_eq!((by.as_str(), why.as_str()), ("ops", "abuse report #12")),
        other => panic!("{other:?}"),
    }
    // Only an admin lifts an admin's throttle: not the reset job, not a new month.
    clock.set(at(2026, 3, 2, 0, 0, 0));
    jobs::cost_reset(store).await.unwrap();
    assert!(cost_of(store, &u).await.throttle.is_some());
    assert!(matches!(rejected(store.hold(cost_hold(&u, 1, 0, "h1b")).await), Rejection::Throttled { .. }));
    applied(store.unthrottle(admin("lead", "appeal accepted", "un1")).await);
    applied(store.hold(cost_hold(&u, 1, 0, "h2")).await);
    let refs: Vec<String> = kinds_in_log(store, &u, EntryKind::Throttle)
        .await
        .into_iter()
        .chain(kinds_in_log(store, &u, EntryKind::Unthrottle).await)
        .map(|e| e.reference)
        .collect();
    assert_eq!(refs, vec!["admin ops: abuse report #12".to_string(), "admin lead: appeal accepted".to_string()]);
    assert!(matches!(
        store.unthrottle(AdminThrottle { account: u.clone(), by: "".into(), why: "x".into(), key: key("bad") }).await,
        Err(Error::InvalidInput { .. })
    ));

    // A tier without a daily or hourly limit, $1.00 a month, so one meter sets a user's share.
    let tier = crate::cost::TierLimits {
        name: "analyst".into(),
        monthly_revenue_micros: 0,
        monthly_cost_limit_micros: Some(USD),
        daily_cost_limit_micros: None,
        hourly_request_limit: None,
        alert_threshold_pct: None,
        throttle_on_exceed: true,
    };
    applied(store.set_tier(tier, key("tier")).await);
    clock.set(at(2026, 3, 28, 12, 0, 0)); // late in the month: velocity stays below the limit
    for (id, c) in [("a", 76), ("b", 0), ("c", 90), ("d", 10)] {
        let a = create_free_user(store, id).await;
        applied(store.set_cost_profile(a.clone(), false, Some("analyst".into()), key(&format!("p{id}"))).await);
        if c > 0 {
            applied(store.meter(meter_cmd(&a, cents(c), &format!("m{id}"))).await);
        }
    }
    applied(store.throttle(AdminThrottle { account: acct("b"), by: "ops".into(), why: "test".into(), key: key("tb") }).await);
    let ids = |v: Vec<CostView>| v.into_iter().map(|v| v.account.to_string()).collect::<Vec<_>>();
    assert_eq!(ids(store.cost_accounts(CostFilter::AtRisk, None, 100).await.unwrap()), vec!["a", "c"]);
    assert_eq!(ids(store.cost_accounts(CostFilter::Throttled, None, 100).await.unwrap()), vec!["b"]);
    assert_eq!(ids(store.cost_accounts(CostFilter::HighRisk, None, 100).await.unwrap()), vec!["b", "c"]);
    assert_eq!(ids(store.cost_accounts(CostFilter::All, Some(&acct("a")), 2).await.unwrap()), vec!["b", "c"]);
    assert_eq!(cost_of(store, &acct("a")).await.risk, crate::cost::RiskLevel::AtRisk);
    assert_eq!(cost_of(store, &acct("d")).await.risk, crate::cost::RiskLevel::Low);
    assert!(matches!(store.cost_accounts(CostFilter::All, None, 0).await, Err(Error::InvalidInput { .. })));
}

/// Tier limits are data in the store with the spec's defaults; admins change them (bad limits
/// change nothing; odd ones are flagged); the tier of a user follows plan and membership.
pub async fn tiers_are_data_and_follow_plans(store: &dyn Store, clock: &ManualClock) {
    assert_eq!(store.tiers().await.unwrap(), crate::cost::TierTable::default());
    let mut bad = crate::cost::TierTable::default().get(crate::cost::FREE).unwrap().clone();
    bad.daily_cost_limit_micros = Some(-1);
    assert!(matches!(store.set_tier(bad.clone(), key("bad")).await, Err(Error::InvalidInput { .. })));
    bad.daily_cost_limit_micros = Some(cents(10));
    bad.name = "Free!".into();
    assert!(matches!(store.set_tier(bad, key("bad2")).await, Err(Error::InvalidInput { .. })));
    assert_eq!(store.tiers().await.unwrap(), crate::cost::TierTable::default(), "nothing changed");

    // Daily above monthly is allowed, and flagged.
    let mut free = crate::cost::TierTable::default().get(crate::cost::FREE).unwrap().clone();
    free.daily_cost_limit_micros = Some(cents(60));
    free.hourly_request_limit = Some(2);
    let e = applied(store.set_tier(free.clone(), key("free2")).await);
    assert_eq!(e, Effect::TierSet { warnings: vec![crate::cost::LimitWarning::DailyAboveMonthly { daily_micros: cents(60), monthly_micros: cents(50) }] });
    assert!(store.set_tier(free.clone(), key("free2")).await.unwrap().unwrap().replayed);
    assert_eq!(store.tiers().await.unwrap().get(crate::cost::FREE).unwrap(), &free);
    // It takes effect at once.
    let u = create_free_user(store, "u").await;
    applied(store.hold(cost_hold(&u, 1, 0, "h1")).await);
    applied(store.hold(cost_hold(&u, 1, 0, "h2")).await);
    assert!(matches!(rejected(store.hold(cost_hold(&u, 1, 0, "h3")).await), Rejection::RateLimited { limit: 2, .. }));

    // The tier of a user: plan and membership, or an override; organisations are unlimited.
    let tier = |a: AccountId| async move { store.cost(&a).await.unwrap().tier };
    assert_eq!(tier(u.clone()).await, "free");
    let period_end = clock.now() + Duration::days(10);
    applied(store.set_plan(u.clone(), Some(PlanTerms { monthly_credits: 10, period_end, anchor_day: None }), key("plan")).await);
    assert_eq!(tier(u.clone()).await, "prpm_plus_individual");
    applied(store.set_cost_profile(u.clone(), true, None, key("org")).await);
    assert_eq!(tier(u.clone()).await, "prpm_plus_org");
    applied(store.set_plan(u.clone(), None, key("cancel")).await);
    assert_eq!(tier(u.clone()).await, "prpm_plus_org", "a cancelled plan runs to its period end");
    clock.set(period_end + Duration::minutes(1));
    jobs::monthly_rollover(store).await.unwrap();
    assert_eq!(tier(u.clone()).await, "free");
    let before = log_len(store, &u).await;
    assert!(matches!(store.set_cost_profile(u.clone(), false, Some("gold".into()), key("gold")).await, Err(Error::InvalidInput { .. })));
    assert_eq!(log_len(store, &u).await, before, "an unknown tier writes nothing");
    applied(store.set_cost_profile(u.clone(), false, Some("unlimited".into()), key("unl")).await);
    assert_eq!(tier(u.clone()).await, "unlimited");
    let o = acct("org");
    applied(store.create_account(o.clone(), AccountKind::Organisation, key("org-create")).await);
    assert_eq!(tier(o).await, "unlimited");
    assert!(matches!(store.cost(&acct("nobody")).await, Err(Error::UnknownAccount(_))));
}

/// Counters follow UTC days, months (28 to 31 days) and years; the cost reset keeps the stored
/// figures current and does its work once; plan periods anchored on the 31st end on each
/// month's last day and come back to the 31st.
pub async fn cost_periods_across_boundaries(store: &dyn Store, clock: &ManualClock) {
    // A plan whose periods end on the 31st.
    clock.set(at(2026, 1, 10, 8, 0, 0));
    let p = create_free_user(store, "p31").await;
    applied(store.set_plan(p.clone(), Some(PlanTerms { monthly_credits: 50, period_end: at(2026, 1, 31, 0, 0, 0), anchor_day: None }), key("p31")).await);
    let expected = [at(2026, 2, 28, 0, 0, 0), at(2026, 3, 31, 0, 0, 0), at(2026, 4, 30, 0, 0, 0), at(2026, 5, 31, 0, 0, 0)];
    for (i, next) in expected.into_iter().enumerate() {
        let ending = balance(store, &p).await.plan.unwrap().period_end;
        clock.set(ending + Duration::minutes(5));
        let r = jobs::monthly_rollover(store).await.unwrap();
        assert_eq!(r.applied, 1, "period {i}");
        let b = balance(store, &p).await;
        assert_eq!(b.plan.unwrap().period_end, next, "period {i}");
        assert_eq!(b.monthly, 50, "one allocation per period");
        assert_eq!(jobs::monthly_rollover(store).await.unwrap().examined, 0);
    }
    // Through a leap February: anchored on the 31st, and explicitly on the 30th.
    clock.set(at(2027, 12, 20, 0, 0, 0));
    let q = create_free_user(store, "leap").await;
    applied(store.set_plan(q.clone(), Some(PlanTerms { monthly_credits: 5, period_end: at(2028, 1, 31, 12, 0, 0), anchor_day: None }), key("leap")).await);
    let r = create_free_user(store, "anchor").await;
    applied(store.set_plan(r.clone(), Some(PlanTerms { monthly_credits: 5, period_end: at(2028, 1, 30, 0, 0, 0), anchor_day: Some(30) }), key("anchor")).await);
    let period_end = |a: AccountId| async move { store.balance(&a).await.unwrap().plan.unwrap().period_end };
    clock.set(at(2028, 1, 30, 1, 0, 0));
    jobs::monthly_rollover(store).await.unwrap();
    assert_eq!(period_end(r.clone()).await, at(2028, 2, 29, 0, 0, 0));
    clock.set(at(2028, 2, 1, 0, 0, 0));
    jobs::monthly_rollover(store).await.unwrap();
    assert_eq!(period_end(q.clone()).await, at(2028, 2, 29, 12, 0, 0));
    clock.set(at(2028, 2, 29, 1, 0, 0));
    jobs::monthly_rollover(store).await.unwrap();
    assert_eq!(period_end(r.clone()).await, at(2028, 3, 30, 0, 0, 0));
    assert_eq!(period_end(q.clone()).await, at(2028, 2, 29, 12, 0, 0));
    let bad = PlanTerms { monthly_credits: 5, period_end: at(2028, 9, 1, 0, 0, 0), anchor_day: Some(32) };
    assert!(matches!(store.set_plan(r.clone(), Some(bad), key("bad-anchor")).await, Err(Error::InvalidInput { .. })));

    // Cost counters: the last second of months of 31, 30, 31 (a year's end), 28 and 29 days,
    // then the first second of the next.
    let u = create_user(store, "u").await;
    let month_ends =
        [at(2028, 5, 31, 23, 59, 59), at(2028, 6, 30, 23, 59, 59), at(2028, 12, 31, 23, 59, 59), at(2029, 2, 28, 23, 59, 59), at(2032, 2, 29, 23, 59, 59)];
    for (i, end) in month_ends.into_iter().enumerate() {
        clock.set(end);
        applied(store.meter(meter_cmd(&u, cents(30), &format!("m{i}"))).await);
        let v = cost_of(store, &u).await;
        assert_eq!((v.day_cost_micros, v.month_cost_micros), (cents(30), cents(30)), "{end}");
        clock.set(end + Duration::seconds(1));
        let v = cost_of(store, &u).await;
        assert_eq!((v.day_cost_micros, v.month_cost_micros), (0, 0), "a new day and month at {}", end + Duration::seconds(1));
        let r = jobs::cost_reset(store).await.unwrap();
        assert_eq!((r.examined, r.applied), (1, 1), "{end}");
        assert_eq!(jobs::cost_reset(store).await.unwrap().examined, 0);
    }
    // Inside a month, a new day clears only the day.
    clock.set(at(2032, 3, 10, 23, 0, 0));
    applied(store.meter(meter_cmd(&u, cents(20), "d1")).await);
    clock.set(at(2032, 3, 11, 1, 0, 0));
    let r = jobs::cost_reset(store).await.unwrap();
    assert_eq!(r.applied, 1, "yesterday's counter");
    let v = cost_of(store, &u).await;
    assert_eq!((v.day_cost_micros, v.month_cost_micros), (0, cents(20)));
    applied(store.meter(meter_cmd(&u, cents(5), "d2")).await);
    let v = cost_of(store, &u).await;
    assert_eq!((v.day_cost_micros, v.month_cost_micros), (cents(5), cents(25)));
}

/// Any AI operation can be metered (user, operation, model, tokens, cost): it is in the usage
/// log, counts toward the same limits, and shows in the daily rollups, exact before and after
/// the analytics refresh.
pub async fn metering_counts_toward_limits(store: &dyn Store, clock: &ManualClock) {
    let u = create_plus_user(store, clock, "u", false).await; // $1.00 a day
    let mut m = meter_cmd(&u, cents(20), "embed");
    m.usage.operation = "embedding".into();
    m.usage.model = "text-embedding-3-small".into();
    assert!(matches!(applied(store.meter(m).await), Effect::Metered { cost: crate::cost::CostEvents { throttled: None, .. }, .. }));
    let rows = store.usage(&u, 10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].usage.operation.as_str(), rows[0].usage.model.as_str(), rows[0].credits, rows[0].usage.cost_micros),
        ("embedding", "text-embedding-3-small", 0, cents(20))
    );
    assert_eq!(buckets(store, &u).await, (200, 0, 5, 0), "metering takes no credits");
    // It counts: $0.20 metered + $0.85 worst case is over $1.00.
    assert!(matches!(rejected(store.hold(cost_hold(&u, 1, cents(85), "h1")).await), Rejection::DailyCostLimit { spent_micros: 200_000, .. }));
    // And it throttles (a meter itself is never refused: it already happened).
    match applied(store.meter(meter_cmd(&u, cents(85), "big")).await) {
        Effect::Metered { cost, .. } => assert!(matches!(cost.throttled, Some(ThrottleReason::DailyCostLimit { .. }))),
        other => panic!("{other:?}"),
    }
    applied(store.meter(meter_cmd(&u, cents(1), "after")).await);
    assert!(matches!(rejected(store.hold(cost_hold(&u, 1, 0, "h2")).await), Rejection::Throttled { .. }));

    let day = clock.now().date_naive();
    let q = DailyUsageQuery { account: Some(u.clone()), from: day, until: day + Duration::days(1) };
    let before = store.daily_usage(&q).await.unwrap();
    assert_eq!(before.len(), 1);
    assert_eq!((before[0].day, before[0].runs, before[0].credits, before[0].cost_micros), (day, 3, 0, cents(106)));
    assert_eq!(before[0].tokens.input, 3_000);
    // (A backend may already have rolled some up on its own.)
    assert!(jobs::refresh_analytics(store).await.unwrap().usage_records <= 3);
    assert_eq!(jobs::refresh_analytics(store).await.unwrap().usage_records, 0, "twice is once");
    assert_eq!(store.daily_usage(&q).await.unwrap(), before, "the same before and after the refresh");
    // The next day, a settle; all accounts together.
    clock.advance(Duration::days(1));
    let v = create_user(store, "v").await;
    let h = hold_id(&applied(store.hold(cost_hold(&v, 3, cents(2), "hv")).await));
    applied(store.settle(Settle { hold: h, credits: 2, usage: Some(usage_of(cents(2))), key: key("sv") }).await);
    let all = store.daily_usage(&DailyUsageQuery { account: None, from: day - Duration::days(3), until: day + Duration::days(5) }).await.unwrap();
    assert_eq!(
        all.iter().map(|d| (d.day, d.runs, d.credits, d.cost_micros)).collect::<Vec<_>>(),
        vec![(day, 3, 0, cents(106)), (day + Duration::days(1), 1, 2, cents(2))]
    );
    let bad = DailyUsageQuery { account: None, from: day, until: day };
    assert!(matches!(store.daily_usage(&bad).await, Err(Error::InvalidInput { .. })));
    let bad = DailyUsageQuery { account: None, from: day, until: day + Duration::days(401) };
    assert!(matches!(store.daily_usage(&bad).await, Err(Error::InvalidInput { .. })));
    let mut neg = meter_cmd(&u, 0, "neg");
    neg.usage.cost_micros = -1;
    assert!(matches!(store.meter(neg).await, Err(Error::InvalidInput { .. })));
    let mut h = cost_hold(&u, 1, 0, "negh");
    h.cost_micros = -5;
    assert!(matches!(store.hold(h).await, Err(Error::InvalidInput { .. })));
}

/// The seed's reference scenario through the store: 60 Individual, 30 Org and 10 Free users at
/// $0.92 / $0.60 / $0.15 of monthly cost give revenue $450.00, cost $74.70, margin 83.4 %.
pub async fn reference_scenario_summary(store: &dyn Store, clock: &ManualClock) {
    let mut users = Vec::new();
    for i in 0..100 {
        let id = format!("user{i:03}");
        let u = match i {
            0..60 => create_plus_user(store, clock, &id, false).await,
            60..90 => create_plus_user(store, clock, &id, true).await,
            _ => create_free_user(store, &id).await,
        };
        users.push(u);
    }
    // Costs over two days, each day within the tiers' daily limits.
    let day_costs = |i: usize| match i {
        0..60 => [cents(92), 0],
        60..90 => [cents(30), cents(30)],
        _ => [75_000, 75_000],
    };
    for d in 0..2 {
        let metered = join_all(
            users.iter().enumerate().filter(|(i, _)| day_costs(*i)[d] > 0).map(|(i, u)| store.meter(meter_cmd(u, day_costs(i)[d], &format!("d{d}-{i}")))),
        )
        .await;
        for m in metered {
            applied(m);
        }
        clock.advance(Duration::days(1));
    }
    let s = store.summary().await.unwrap();
    assert_eq!(crate::cost::micros_to_usd(s.total_monthly_revenue_micros), rust_decimal::Decimal::new(45000, 2));
    assert_eq!(crate::cost::micros_to_usd(s.total_monthly_cost_micros), rust_decimal::Decimal::new(7470, 2));
    assert_eq!(s.overall_margin_pct, Some(rust_decimal::Decimal::new(834, 1)));
    assert_eq!((s.users, s.active_users, s.throttled_users, s.high_risk_users), (100, 100, 0, 0));
    assert!(!s.margin_below_70 && !s.throttled_over_5pct);
    // Throttle six users (> 5 %): flagged, and they count as high risk.
    for (i, u) in users.iter().take(6).enumerate() {
        applied(store.throttle(AdminThrottle { account: u.clone(), by: "ops".into(), why: "test".into(), key: key(&format!("t{i}")) }).await);
    }
    let s = store.summary().await.unwrap();
    assert_eq!((s.throttled_users, s.high_risk_users, s.throttled_over_5pct), (6, 6, true));
    // The next month starts from zero cost; revenue stays while plans run.
    clock.set(at(2026, 2, 1, 0, 0, 0));
    let s = store.summary().await.unwrap();
    assert_eq!((s.total_monthly_cost_micros, s.overall_margin_pct), (0, Some(rust_decimal::Decimal::new(1000, 1))));
}

/// Two nodes running the cost jobs at the same moment do the work once.
pub async fn cost_jobs_run_twice_at_once_do_the_work_once(store: &dyn Store, clock: &ManualClock) {
    for i in 0..30 {
        let u = create_user(store, &format!("u{i}")).await;
        applied(store.meter(meter_cmd(&u, cents(1), &format!("m{i}"))).await);
    }
    let day = clock.now().date_naive();
    let q = DailyUsageQuery { account: None, from: day, until: day + Duration::days(1) };
    let before = store.daily_usage(&q).await.unwrap();
    let (a, b) = tokio::join!(jobs::refresh_analytics(store), jobs::refresh_analytics(store));
    assert!(a.unwrap().usage_records + b.unwrap().usage_records <= 30, "each record is rolled up once");
    assert_eq!(jobs::refresh_analytics(store).await.unwrap().usage_records, 0);
    assert_eq!(store.daily_usage(&q).await.unwrap(), before);
    assert_eq!((before[0].runs, before[0].cost_micros), (30, cents(30)));
    clock.advance(Duration::days(1));
    let (a, b) = tokio::join!(jobs::cost_reset(store), jobs::cost_reset(store));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.applied + b.applied, 30);
    assert_eq!((a.failed, b.failed), (0, 0));
    assert_eq!(jobs::cost_reset(store).await.unwrap().examined, 0);
}

/// Reaching the monthly limit while a daily throttle is on turns it into a monthly one (the
/// next day does not lift it); an admin's unthrottle of a user still over a limit clears the
/// flag only: admission keeps refusing what would pass the limit, a zero-cost meter does not
/// throttle again, and a tier change lets the user run.
pub async fn monthly_limit_outranks_a_daily_throttle(store: &dyn Store, clock: &ManualClock) {
    let u = create_free_user(store, "u").await; // $0.10 a day, $0.50 a month
    grant(store, &u, Bucket::Purchased, 100, None, "g").await;
    for d in 0..4 {
        clock.set(at(2026, 1, 15 + d, 10, 0, 0));
        applied(store.meter(meter_cmd(&u, 99_000, &format!("m{d}"))).await);
    }
    clock.set(at(2026, 1, 19, 10, 0, 0));
    applied(store.meter(meter_cmd(&u, cents(10), "m4")).await); // month 0.496, day 0.10
    assert_eq!(cost_of(store, &u).await.throttle.unwrap().reason, ThrottleReason::DailyCostLimit { day: date(2026, 1, 19) });
    match applied(store.meter(meter_cmd(&u, cents(1), "m5")).await) {
        Effect::Metered { cost, .. } => assert_eq!(cost.throttled, Some(ThrottleReason::MonthlyCostLimit { month: date(2026, 1, 1) })),
        other => panic!("{other:?}"),
    }
    let throttles = kinds_in_log(store, &u, EntryKind::Throttle).await;
    assert_eq!(throttles.len(), 2);
    assert_eq!(throttles[0].reference, "monthly cost limit reached in 2026-01");
    assert!(kinds_in_log(store, &u, EntryKind::Unthrottle).await.is_empty(), "replaced, not lifted");
    clock.set(at(2026, 1, 20, 0, 30, 0));
    jobs::cost_reset(store).await.unwrap();
    let v = cost_of(store, &u).await;
    assert_eq!(v.throttle.map(|t| t.reason), Some(ThrottleReason::MonthlyCostLimit { month: date(2026, 1, 1) }));
    assert_eq!(store.cost_accounts(CostFilter::Throttled, None, 10).await.unwrap().len(), 1);
    assert_eq!(store.summary().await.unwrap().throttled_users, 1);

    // The admin lifts it; the user is still over the monthly limit.
    applied(store.unthrottle(AdminThrottle { account: u.clone(), by: "ops".into(), why: "goodwill".into(), key: key("un") }).await);
    assert!(matches!(rejected(store.hold(cost_hold(&u, 1, 1, "h1")).await), Rejection::MonthlyCostLimit { .. }));
    applied(store.meter(meter_cmd(&u, 0, "m6")).await);
    assert!(cost_of(store, &u).await.throttle.is_none(), "no new crossing, no new throttle");
    applied(store.set_cost_profile(u.clone(), false, Some(crate::cost::UNLIMITED.into()), key("up")).await);
    applied(store.hold(cost_hold(&u, 1, cents(5), "h2")).await);
}

/// A clock that steps back across a day or month boundary (a correction, a node a little
/// behind) never restarts a period: costs count into the period already started, limits and
/// alerts stay once per period, and nothing fails.
pub async fn a_clock_that_steps_back_never_restarts_a_period(store: &dyn Store, clock: &ManualClock) {
    let u = create_free_user(store, "u").await;
    clock.set(at(2026, 1, 31, 23, 59, 58));
    for i in 0..4 {
        applied(store.meter(meter_cmd(&u, 95_000, &format!("m{i}"))).await); // 0.38: at risk
    }
    clock.set(at(2026, 2, 1, 0, 0, 0) + Duration::milliseconds(500));
    applied(store.meter(meter_cmd(&u, 0, "feb")).await);
    clock.set(at(2026, 1, 31, 23, 59, 59));
    for i in 0..4 {
        applied(store.meter(meter_cmd(&u, 95_000, &format!("back{i}"))).await);
    }
    // Counted into February (the period already started): at risk again, once, for February.
    let v = cost_of(store, &u).await;
    assert_eq!((v.month_cost_micros, v.day_cost_micros), (380_000, 380_000));
    let alerts = store.alerts(&AlertQuery { account: Some(u.clone()), after: None, limit: 10 }).await.unwrap();
    let months: Vec<_> = alerts.iter().map(|a| (a.alert.kind, a.alert.month)).collect();
    assert_eq!(months, vec![(crate::cost::AlertKind::AtRisk, date(2026, 1, 1)), (crate::cost::AlertKind::AtRisk, date(2026, 2, 1))]);
}

// ---------------------------------------------------------------------------------------------
// The playground: packages, sessions, runs, sharing

pub fn package(id: &str, prompt: &str) -> Package {
    Package { id: id.into(), name: format!("@prpm/{id}"), version: "1.0.0".into(), prompt: prompt.into() }
}

pub fn new_session(owner: &AccountId, title: &str) -> NewSession {
    NewSession { id: SessionId::generate(), owner: owner.clone(), package_id: Some("pkg".into()), model: "claude-sonnet-4".into(), title: title.into() }
}

/// A completed run of `account` at `at`, in `session`.
pub fn run_record(account: &AccountId, session: Option<&SessionId>, at: DateTime<Utc>) -> RunRecord {
    RunRecord {
        id: RunId::generate(),
        account: account.clone(),
        session: session.cloned(),
        package_id: Some("pkg".into()),
        model: "claude-sonnet-4".into(),
        with_prompt: true,
        tokens: TokenUsage { input: 1_200, output: 340, cache_read: 0, cache_write: 0 },
        credits: 1,
        cost_micros: 8_700,
        latency_ms: 1_234,
        outcome: RunOutcome::Completed,
        error: None,
        hold: Some(HoldId(7)),
        at,
    }
}

/// A user's question and the model's answer.
pub fn exchange(question: &str, answer: &str) -> Vec<NewTurn> {
    vec![NewTurn { role: Role::User, content: question.into() }, NewTurn { role: Role::Assistant, content: answer.into() }]
}

#[track_caller]
fn invalid_field<T: std::fmt::Debug>(r: crate::Result<T>) -> &'static str {
    match r {
        Err(Error::InvalidInput { field, .. }) => field,
        other => panic!("expected invalid input, got {other:?}"),
    }
}

async fn session_of(store: &dyn Store, owner: &AccountId, id: &SessionId) -> Session {
    store.session(owner, id).await.expect("session").expect("the session exists")
}

/// Packages are stored, replaced and read back exactly; bad ones change nothing.
pub async fn packages_round_trip_and_bad_input(store: &dyn Store, _clock: &ManualClock) {
    let p = package("code-review", "You review code.\nBe precise.\t(tabs and newlines are fine)");
    store.put_package(&p).await.unwrap();
    assert_eq!(store.package("code-review").await.unwrap(), Some(p.clone()));
    let v2 = Package { version: "1.1.0".into(), prompt: "You review code, kindly. ✓".into(), ..p.clone() };
    store.put_package(&v2).await.unwrap();
    assert_eq!(store.package("code-review").await.unwrap(), Some(v2.clone()));
    let empty_prompt = package("empty", "");
    store.put_package(&empty_prompt).await.unwrap();
    assert_eq!(store.package("empty").await.unwrap(), Some(empty_prompt));

    assert_eq!(invalid_field(store.put_package(&Package { id: String::new(), ..p.clone() }).await), "package_id");
    assert_eq!(invalid_field(store.put_package(&Package { prompt: "x".repeat(crate::session::MAX_PROMPT_BYTES + 1), ..p.clone() }).await), "prompt");
    assert_eq!(invalid_field(store.put_package(&Package { name: "a\u{0}b".into(), ..p.clone() }).await), "package_name");
    assert_eq!(store.package("code-review").await.unwrap(), Some(v2), "bad input changed nothing");
    assert_eq!(store.package("").await.unwrap(), None);
    assert_eq!(store.package("unknown").await.unwrap(), None);
    let big = package("big", &"y".repeat(crate::session::MAX_PROMPT_BYTES));
    store.put_package(&big).await.unwrap();
    assert_eq!(store.package("big").await.unwrap(), Some(big));
}

/// A session is its owner's: to anyone else it does not exist, and nothing they do changes it.
pub async fn sessions_belong_to_their_owner(store: &dyn Store, clock: &ManualClock) {
    let (alice, bob) = (acct("alice"), acct("bob"));
    let ns = new_session(&alice, "Refactoring help");
    let summary = store.create_session(&ns).await.unwrap();
    let now = clock.now();
    assert_eq!(
        summary,
        SessionSummary {
            id: ns.id.clone(),
            owner: alice.clone(),
            package_id: Some("pkg".into()),
            model: "claude-sonnet-4".into(),
            title: "Refactoring help".into(),
            turns: 0,
            shared: false,
            created_at: now,
            updated_at: now,
        }
    );
    let s = session_of(store, &alice, &ns.id).await;
    assert_eq!(s, Session { summary: summary.clone(), share_token: None, turns: Vec::new() });

    // A duplicate id (whoever asks) and bad input are refused.
    clock.advance(Duration::seconds(1));
    assert_eq!(invalid_field(store.create_session(&ns).await), "session_id");
    assert_eq!(invalid_field(store.create_session(&NewSession { owner: bob.clone(), ..ns.clone() }).await), "session_id");
    let bad = NewSession { model: String::new(), ..new_session(&alice, "x") };
    assert_eq!(invalid_field(store.create_session(&bad).await), "model");
    assert_eq!(store.session(&alice, &bad.id).await.unwrap(), None, "a refused session is not stored");
    assert_eq!(invalid_field(store.create_session(&NewSession { title: "a\nb".into(), ..new_session(&alice, "") }).await), "title");
    let untitled = NewSession { package_id: None, ..new_session(&alice, "") };
    store.create_session(&untitled).await.unwrap();
    assert_eq!(session_of(store, &alice, &untitled.id).await.summary.package_id, None);

    // Bob sees nothing and changes nothing.
    assert_eq!(store.session(&bob, &ns.id).await.unwrap(), None);
    assert!(!store.delete_session(&bob, &ns.id).await.unwrap());
    assert!(!store.share_session(&bob, &ns.id, &ShareToken::generate()).await.unwrap());
    assert!(!store.revoke_share(&bob, &ns.id).await.unwrap());
    assert!(store.sessions(&bob, None, 10).await.unwrap().sessions.is_empty());
    let run = run_record(&bob, Some(&ns.id), clock.now());
    match store.record_run(&run, &exchange("hi", "hello")).await {
        Err(Error::NotFound { what: "session" }) => {}
        other => panic!("expected the session not found, got {other:?}"),
    }
    match store.record_run(&RunRecord { id: RunId::generate(), ..run.clone() }, &[]).await {
        Err(Error::NotFound { what: "session" }) => {}
        other => panic!("expected the session not found, got {other:?}"),
    }
    assert!(store.runs(&bob, 10).await.unwrap().is_empty(), "a refused run is not stored");
    assert_eq!(session_of(store, &alice, &ns.id).await, s, "unchanged");

    // Alice shares it; Bob cannot revoke it.
    let token = ShareToken::generate();
    assert!(store.share_session(&alice, &ns.id, &token).await.unwrap());
    assert!(!store.revoke_share(&bob, &ns.id).await.unwrap());
    assert_eq!(session_of(store, &alice, &ns.id).await.share_token, Some(token.clone()));
    assert!(store.shared_session(&token).await.unwrap().is_some());

    // Unknown sessions, and deletion by the owner.
    assert_eq!(store.session(&alice, &SessionId::generate()).await.unwrap(), None);
    assert!(!store.delete_session(&alice, &SessionId::generate()).await.unwrap());
    assert!(store.delete_session(&alice, &ns.id).await.unwrap());
    assert_eq!(store.session(&alice, &ns.id).await.unwrap(), None);
    assert!(!store.delete_session(&alice, &ns.id).await.unwrap());
    assert_eq!(store.shared_session(&token).await.unwrap(), None);
    let ids: Vec<_> = store.sessions(&alice, None, 10).await.unwrap().sessions.into_iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![untitled.id]);
}

/// An owner's sessions come newest first (ties by id, descending), in pages that neither skip
/// nor repeat; other owners' sessions never show.
pub async fn sessions_list_newest_first_paginated(store: &dyn Store, clock: &ManualClock) {
    let (alice, bob) = (acct("alice"), acct("bob"));
    let mut expected = Vec::new();
    for i in 0..7 {
        // The last two share a creation time.
        if i != 6 {
            clock.advance(Duration::seconds(1));
        }
        let s = store.create_session(&new_session(&alice, &format!("session {i}"))).await.unwrap();
        expected.push((s.created_at, s.id.clone()));
        if i % 3 == 0 {
            store.create_session(&new_session(&bob, "bob's")).await.unwrap();
        }
    }
    expected.sort_by(|a, b| b.cmp(a));
    let expected: Vec<SessionId> = expected.into_iter().map(|(_, id)| id).collect();

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store.sessions(&alice, cursor.as_deref(), 3).await.unwrap();
        sizes.push(page.sessions.len());
        for s in &page.sessions {
            assert_eq!(s.owner, alice);
        }
        seen.extend(page.sessions.into_iter().map(|s| s.id));
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
        assert!(sizes.len() < 10, "pagination does not end");
    }
    assert_eq!(sizes, vec![3, 3, 1]);
    assert_eq!(seen, expected, "newest first, no duplicates, nothing skipped");
    let all = store.sessions(&alice, None, crate::session::MAX_PAGE).await.unwrap();
    assert_eq!(all.sessions.iter().map(|s| s.id.clone()).collect::<Vec<_>>(), expected);
    assert_eq!(all.next, None);
    // A page that ends exactly at the last session says so.
    let page = store.sessions(&alice, None, 7).await.unwrap();
    assert_eq!((page.sessions.len(), page.next), (7, None));
    assert_eq!(store.sessions(&bob, None, 10).await.unwrap().sessions.len(), 3);
    assert!(store.sessions(&acct("carol"), None, 10).await.unwrap().sessions.is_empty());

    assert_eq!(invalid_field(store.sessions(&alice, None, 0).await), "limit");
    assert_eq!(invalid_field(store.sessions(&alice, None, crate::session::MAX_PAGE + 1).await), "limit");
    for bad in ["", "garbage", "12", "x.0123456789abcdef0123456789abcdef", "1.not-a-session-id", "99999999999999999999.0123456789abcdef0123456789abcdef"] {
        assert_eq!(invalid_field(store.sessions(&alice, Some(bad), 3).await), "cursor", "cursor {bad:?}");
    }
}

/// `settle_run` settles the hold and records the run with the credits charged, creating the
/// session a first run starts; a session gone meanwhile leaves the run recorded outside it; a
/// rejected settle records nothing; a retry records nothing more; bad input writes nothing.
pub async fn settle_run_settles_and_records_at_once(store: &dyn Store, clock: &ManualClock) {
    let alice = create_user(store, "alice").await;
    grant(store, &alice, Bucket::Purchased, 100, None, "g").await;
    let held = |k: &'static str| async move { hold_id(&applied(store.hold(hold_cmd(&acct("alice"), 10, 600, k)).await)) };
    let job = |hold: HoldId, k: &str, run: RunRecord, turns: Vec<NewTurn>, new_session: Option<NewSession>| SettleRun {
        settle: Settle { hold, credits: 4, usage: None, key: key(k) },
        run: RunRecord { hold: Some(hold), credits: 0, ..run },
        turns,
        new_session,
    };

    // A first run: the session is created with the run, the run carries the credits charged.
    let h1 = held("h1").await;
    let ns = new_session(&alice, "first");
    let r1 = run_record(&alice, Some(&ns.id), clock.now());
    assert_eq!(store.session(&alice, &ns.id).await.unwrap(), None, "not created before the run settles");
    let first = job(h1, "s1", r1.clone(), exchange("q1", "a1"), Some(ns.clone()));
    let done = store.settle_run(first.clone()).await.unwrap();
    assert!(matches!(&done.settled, Ok(Committed { effect: Effect::Settled { .. }, replayed: false })), "{done:?}");
    assert_eq!(done.session, Some(ns.id.clone()));
    let s = session_of(store, &alice, &ns.id).await;
    assert_eq!((s.summary.title.as_str(), s.summary.turns), ("first", 2));
    assert_eq!(s.turns.iter().map(|t| t.content.as_str()).collect::<Vec<_>>(), ["q1", "a1"]);
    let b = balance(store, &alice).await;
    assert_eq!((b.total, b.held), (105 - 4, 0));
    assert_eq!(store.runs(&alice, 10).await.unwrap(), vec![RunRecord { credits: 4, hold: Some(h1), ..r1.clone() }]);

    // The same run again (a retry): the first outcome, nothing more written.
    let again = store.settle_run(first).await.unwrap();
    assert!(matches!(&again.settled, Ok(Committed { replayed: true, .. })), "{again:?}");
    assert_eq!(session_of(store, &alice, &ns.id).await.summary.turns, 2);
    assert_eq!(store.runs(&alice, 10).await.unwrap().len(), 1);
    assert_eq!(balance(store, &alice).await.total, 101);

    // A continued session that was deleted meanwhile: charged, recorded outside it.
    clock.advance(Duration::seconds(1));
    let h2 = held("h2").await;
    let gone = store.create_session(&new_session(&alice, "gone")).await.unwrap();
    assert!(store.delete_session(&alice, &gone.id).await.unwrap());
    let r2 = run_record(&alice, Some(&gone.id), clock.now());
    let done = store.settle_run(job(h2, "s2", r2.clone(), exchange("q2", "a2"), None)).await.unwrap();
    assert_eq!(done.session, None);
    assert_eq!(store.runs(&alice, 10).await.unwrap()[0], RunRecord { session: None, credits: 4, hold: Some(h2), ..r2 });
    assert_eq!(store.session(&alice, &gone.id).await.unwrap(), None);
    assert_eq!(balance(store, &alice).await.total, 97);

    // A rejected settle (the hold was released): nothing recorded, no session created.
    let h3 = held("h3").await;
    applied(store.release(h3, key("r3")).await);
    let ns3 = new_session(&alice, "never");
    let r3 = run_record(&alice, Some(&ns3.id), clock.now());
    let done = store.settle_run(job(h3, "s3", r3.clone(), exchange("q3", "a3"), Some(ns3.clone()))).await.unwrap();
    assert!(done.settled.is_err(), "{done:?}");
    assert_eq!(done.session, None);
    assert_eq!(store.session(&alice, &ns3.id).await.unwrap(), None);
    assert!(store.runs(&alice, 10).await.unwrap().iter().all(|r| r.id != r3.id));

    // Bad input writes nothing: a run that names another hold, a new session that is not the
    // run's, a bad turn.
    let h4 = held("h4").await;
    let ns4 = new_session(&alice, "bad");
    let r4 = run_record(&alice, Some(&ns4.id), clock.now());
    let mut other_hold = job(h4, "s4", r4.clone(), vec![], Some(ns4.clone()));
    other_hold.run.hold = Some(h1);
    assert_eq!(invalid_field(store.settle_run(other_hold).await), "run.hold");
    let other_session = job(h4, "s4", r4.clone(), vec![], Some(new_session(&alice, "elsewhere")));
    assert_eq!(invalid_field(store.settle_run(other_session).await), "new_session");
    let bad_turn = job(h4, "s4", r4.clone(), vec![NewTurn { role: Role::User, content: "nul \u{0}".into() }], Some(ns4.clone()));
    assert_eq!(invalid_field(store.settle_run(bad_turn).await), "content");
    let b = balance(store, &alice).await;
    assert_eq!((b.total, b.held), (97, 10), "the hold is still open and nothing was charged");
    assert_eq!(store.session(&alice, &ns4.id).await.unwrap(), None);
    assert_eq!(store.runs(&alice, 10).await.unwrap().len(), 2);
    let done = store.settle_run(job(h4, "s4", r4, exchange("q4", "a4"), Some(ns4.clone()))).await.unwrap();
    assert_eq!(done.session, Some(ns4.id.clone()));
    assert_eq!(balance(store, &alice).await.total, 93);
}

/// Runs append their turns in order, once; every field of a run reads back exactly; a
/// session holds at most [`MAX_TURNS_PER_SESSION`] turns.
pub async fn runs_append_turns_in_order(store: &dyn Store, clock: &ManualClock) {
    let alice = acct("alice");
    let ns = new_session(&alice, "chat");
    let created = store.create_session(&ns).await.unwrap();

    clock.advance(Duration::seconds(5));
    let t1 = clock.now();
    let r1 = run_record(&alice, Some(&ns.id), t1 - Duration::milliseconds(1500));
    assert!(store.record_run(&r1, &exchange("What is a monad?", "A monoid in the category of endofunctors.")).await.unwrap());
    let s = session_of(store, &alice, &ns.id).await;
    assert_eq!((s.summary.turns, s.summary.created_at, s.summary.updated_at), (2, created.created_at, t1));
    assert_eq!(
        s.turns,
        vec![
            Turn { seq: 1, role: Role::User, content: "What is a monad?".into(), run_id: Some(r1.id.clone()), at: t1 },
            Turn { seq: 2, role: Role::Assistant, content: "A monoid in the category of endofunctors.".into(), run_id: Some(r1.id.clone()), at: t1 },
        ]
    );

    clock.advance(Duration::seconds(5));
    let t2 = clock.now();
    let r2 = RunRecord {
        tokens: TokenUsage { input: 99_000_000, output: 12_345_678, cache_read: 1, cache_write: 100_000_000 },
        credits: 9_000_000_000_000,
        cost_micros: 4_000_000_000_000_000,
        latency_ms: 86_400_000,
        outcome: RunOutcome::Interrupted,
        error: Some("stream_interrupted".into()),
        ..run_record(&alice, Some(&ns.id), t2)
    };
    assert!(store.record_run(&r2, &exchange("Explain.\nSlowly.", "")).await.unwrap());
    // The same run again (a retry): nothing more.
    clock.advance(Duration::seconds(5));
    assert!(!store.record_run(&r2, &exchange("Explain.\nSlowly.", "")).await.unwrap());
    assert!(!store.record_run(&r2, &[]).await.unwrap());
    let s = session_of(store, &alice, &ns.id).await;
    assert_eq!((s.summary.turns, s.summary.updated_at), (4, t2));
    let seqs: Vec<_> = s.turns.iter().map(|t| (t.seq, t.role, t.run_id.clone(), t.at)).collect();
    assert_eq!(
        seqs,
        vec![
            (1, Role::User, Some(r1.id.clone()), t1),
            (2, Role::Assistant, Some(r1.id.clone()), t1),
            (3, Role::User, Some(r2.id.clone()), t2),
            (4, Role::Assistant, Some(r2.id.clone()), t2),
        ]
    );
    assert_eq!((s.turns[2].content.as_str(), s.turns[3].content.as_str()), ("Explain.\nSlowly.", ""));

    // Runs without a session (the no-prompt half of a comparison, a failure): stored, their
    // turns (if any) ignored. One shares r2's time: the later id comes first.
    let r3 = RunRecord {
        session: None,
        package_id: None,
        with_prompt: false,
        tokens: TokenUsage::default(),
        credits: 0,
        cost_micros: 0,
        latency_ms: 0,
        outcome: RunOutcome::Failed,
        error: Some("provider_unavailable".into()),
        hold: None,
        ..run_record(&alice, None, t2 + Duration::microseconds(999))
    };
    assert!(store.record_run(&r3, &exchange("ignored", "ignored")).await.unwrap());
    let r4 = run_record(&alice, None, t2 + Duration::seconds(60));
    assert!(store.record_run(&r4, &[]).await.unwrap());
    assert_eq!(session_of(store, &alice, &ns.id).await.summary.turns, 4);
    let mut newest_first = vec![r1.clone(), r2.clone(), RunRecord { at: t2, ..r3.clone() }, r4.clone()];
    newest_first.sort_by(|a, b| (b.at, &b.id).cmp(&(a.at, &a.id)));
    assert_eq!(newest_first[0], r4);
    assert_eq!(store.runs(&alice, 10).await.unwrap(), newest_first, "every field round-trips; at is kept to the millisecond");
    assert_eq!(store.runs(&alice, 2).await.unwrap(), newest_first[..2].to_vec());
    assert!(store.runs(&acct("bob"), 10).await.unwrap().is_empty());
    assert_eq!(invalid_field(store.runs(&alice, 0).await), "limit");
    assert_eq!(invalid_field(store.runs(&alice, crate::session::MAX_PAGE + 1).await), "limit");

    // Bad runs and bad turns write nothing.
    let bad = RunRecord { credits: -1, ..run_record(&alice, Some(&ns.id), t2) };
    assert_eq!(invalid_field(store.record_run(&bad, &exchange("q", "a")).await), "credits");
    let bad = RunRecord { tokens: TokenUsage { input: u64::MAX, ..TokenUsage::default() }, ..run_record(&alice, Some(&ns.id), t2) };
    assert_eq!(invalid_field(store.record_run(&bad, &[]).await), "input_tokens");
    let bad = RunRecord { latency_ms: u64::MAX, ..run_record(&alice, Some(&ns.id), t2) };
    assert_eq!(invalid_field(store.record_run(&bad, &[]).await), "latency_ms");
    let bad_turn = vec![NewTurn { role: Role::User, content: "nul \u{0}".into() }];
    assert_eq!(invalid_field(store.record_run(&run_record(&alice, Some(&ns.id), t2), &bad_turn).await), "content");
    let missing = run_record(&alice, Some(&SessionId::generate()), t2);
    assert!(matches!(store.record_run(&missing, &exchange("q", "a")).await, Err(Error::NotFound { what: "session" })));
    assert_eq!(store.runs(&alice, 100).await.unwrap().len(), 4, "refused runs are not stored");
    assert_eq!(session_of(store, &alice, &ns.id).await.summary.turns, 4);

    // The turn limit: fill a session in big batches, then one more turn is refused whole.
    let full = new_session(&alice, "long");
    store.create_session(&full).await.unwrap();
    let max = MAX_TURNS_PER_SESSION as usize;
    let too_many: Vec<NewTurn> = (0..=max).map(|i| NewTurn { role: Role::User, content: format!("t{i}") }).collect();
    assert_eq!(invalid_field(store.record_run(&run_record(&alice, Some(&full.id), t2), &too_many).await), "turns");
    let batch = max / 4;
    for b in 0..4 {
        let turns: Vec<NewTurn> = (0..batch)
            .map(|i| NewTurn { role: if i % 2 == 0 { Role::User } else { Role::Assistant }, content: format!("turn {}", b * batch + i + 1) })
            .collect();
        assert!(store.record_run(&run_record(&alice, Some(&full.id), t2), &turns).await.unwrap());
    }
    let over = run_record(&alice, Some(&full.id), t2);
    assert_eq!(invalid_field(store.record_run(&over, &exchange("one", "more")).await), "turns");
    assert!(!store.runs(&alice, 100).await.unwrap().iter().any(|r| r.id == over.id), "the refused run is not stored");
    let s = session_of(store, &alice, &full.id).await;
    assert_eq!(s.summary.turns as usize, max);
    assert_eq!(s.turns.len(), max);
    for (i, t) in s.turns.iter().enumerate() {
        assert_eq!((t.seq as usize, t.content.clone()), (i + 1, format!("turn {}", i + 1)));
    }
    // A run without turns still goes into the full session.
    assert!(store.record_run(&run_record(&alice, Some(&full.id), t2), &[]).await.unwrap());
}

/// A share token shows the conversation and nothing else, until it is replaced, revoked or
/// the session deleted.
pub async fn sharing_shows_the_conversation_only(store: &dyn Store, clock: &ManualClock) {
    let alice = acct("alice");
    let ns = new_session(&alice, "Prompt tuning");
    store.create_session(&ns).await.unwrap();
    let run = run_record(&alice, Some(&ns.id), clock.now());
    store.record_run(&run, &exchange("Rewrite this.", "Here it is.")).await.unwrap();
    store.record_run(&run_record(&alice, Some(&ns.id), clock.now()), &exchange("Shorter?", "Sure.")).await.unwrap();
    let expected = SharedSession {
        title: "Prompt tuning".into(),
        package_id: Some("pkg".into()),
        model: "claude-sonnet-4".into(),
        turns: [("Rewrite this.", Role::User), ("Here it is.", Role::Assistant), ("Shorter?", Role::User), ("Sure.", Role::Assistant)]
            .into_iter()
            .map(|(c, role)| SharedTurn { role, content: c.into() })
            .collect(),
    };

    let t1 = ShareToken::generate();
    assert!(store.share_session(&alice, &ns.id, &t1).await.unwrap());
    assert_eq!(store.shared_session(&t1).await.unwrap(), Some(expected.clone()));
    let s = session_of(store, &alice, &ns.id).await;
    assert_eq!((s.summary.shared, s.share_token), (true, Some(t1.clone())));
    let listed = store.sessions(&alice, None, 10).await.unwrap().sessions;
    assert!(listed[0].shared);
    // Sharing again with the same token is a no-op; another session cannot take it.
    assert!(store.share_session(&alice, &ns.id, &t1).await.unwrap());
    let other = new_session(&alice, "other");
    store.create_session(&other).await.unwrap();
    assert_eq!(invalid_field(store.share_session(&alice, &other.id, &t1).await), "share_token");
    assert!(!session_of(store, &alice, &other.id).await.summary.shared);

    // A new token replaces the old one.
    let t2 = ShareToken::generate();
    assert!(store.share_session(&alice, &ns.id, &t2).await.unwrap());
    assert_eq!(store.shared_session(&t1).await.unwrap(), None);
    assert_eq!(store.shared_session(&t2).await.unwrap(), Some(expected.clone()));
    // The shared view follows the conversation.
    store.record_run(&run_record(&alice, Some(&ns.id), clock.now()), &exchange("Thanks", "Welcome")).await.unwrap();
    assert_eq!(store.shared_session(&t2).await.unwrap().unwrap().turns.len(), 6);

    // Revoked: gone; a second revoke finds nothing to do.
    assert!(store.revoke_share(&alice, &ns.id).await.unwrap());
    assert_eq!(store.shared_session(&t2).await.unwrap(), None);
    assert!(!store.revoke_share(&alice, &ns.id).await.unwrap());
    let s = session_of(store, &alice, &ns.id).await;
    assert_eq!((s.summary.shared, s.share_token), (false, None));
    // The old token is free again after a revoke.
    assert!(store.share_session(&alice, &other.id, &t1).await.unwrap());
    assert_eq!(store.shared_session(&t1).await.unwrap().unwrap().title, "other");

    // Deleting the session ends its share; its runs stay.
    let t3 = ShareToken::generate();
    assert!(store.share_session(&alice, &ns.id, &t3).await.unwrap());
    assert!(store.shared_session(&t3).await.unwrap().is_some());
    assert!(store.delete_session(&alice, &ns.id).await.unwrap());
    assert_eq!(store.shared_session(&t3).await.unwrap(), None);
    assert_eq!(store.runs(&alice, 10).await.unwrap().len(), 3, "runs are the billing record");
    assert!(store.runs(&alice, 10).await.unwrap().iter().all(|r| r.session.as_ref() == Some(&ns.id)));

    assert_eq!(store.shared_session(&ShareToken::generate()).await.unwrap(), None);
}

/// Concurrent runs on one session number their turns densely, each run's turns together;
/// concurrent replays append nothing.
pub async fn concurrent_appends_keep_seq_dense(store: &dyn Store, clock: &ManualClock) {
    let alice = acct("alice");
    let ns = new_session(&alice, "busy");
    store.create_session(&ns).await.unwrap();
    let runs: Vec<RunRecord> = (0..20).map(|_| run_record(&alice, Some(&ns.id), clock.now())).collect();
    let turns: Vec<Vec<NewTurn>> = (0..20).map(|i| exchange(&format!("q{i}"), &format!("a{i}"))).collect();
    let results = join_all(runs.iter().zip(&turns).map(|(r, t)| store.record_run(r, t))).await;
    assert!(results.into_iter().all(|r| r.unwrap()), "every run is new");
    // Replays, concurrently and doubled: nothing more.
    let replays = join_all(runs.iter().chain(&runs).zip(turns.iter().chain(&turns)).map(|(r, t)| store.record_run(r, t))).await;
    assert!(replays.into_iter().all(|r| !r.unwrap()), "every replay writes nothing");

    let s = session_of(store, &alice, &ns.id).await;
    assert_eq!(s.summary.turns, 40);
    assert_eq!(s.turns.iter().map(|t| t.seq).collect::<Vec<_>>(), (1..=40).collect::<Vec<u32>>());
    let mut seen = std::collections::HashSet::new();
    for pair in s.turns.chunks(2) {
        let (q, a) = (&pair[0], &pair[1]);
        assert_eq!((q.role, a.role), (Role::User, Role::Assistant));
        assert_eq!(q.run_id, a.run_id, "a run's turns are adjacent");
        let i = runs.iter().position(|r| Some(&r.id) == q.run_id.as_ref()).expect("a run of ours");
        assert_eq!((q.content.clone(), a.content.clone()), (format!("q{i}"), format!("a{i}")));
        assert!(seen.insert(i), "each run appended once");
    }
    assert_eq!(store.runs(&alice, 100).await.unwrap().len(), 20);
}

// ---------------------------------------------------------------------------------------------
// Billing: purchases, Stripe events, customers, credit debts

/// A pending pack purchase of `account` with checkout session `cs_<id>`. Its version and times
/// are nonsense: the store sets them.
pub fn pack_purchase(id: &str, account: &AccountId) -> Purchase {
    Purchase {
        id: id.into(),
        account: account.clone(),
        kind: PurchaseKind::Pack,
        product: "small".into(),
        credits: 500,
        amount_cents: 500,
        currency: "usd".into(),
        status: PurchaseStatus::Pending,
        checkout_session: Some(format!("cs_{id}")),
        payment_intent: None,
        customer: None,
        credited: false,
        refunded_cents: 0,
        credits_reversed: 0,
        reversing_to: None,
        version: 42,
        created_at: DateTime::UNIX_EPOCH,
        updated_at: DateTime::UNIX_EPOCH,
    }
}

/// A Stripe event as received, not processed yet (its time is nonsense: the store sets it).
pub fn stripe_event(id: &str, kind: &str) -> StripeEventRecord {
    StripeEventRecord {
        id: id.into(),
        kind: kind.into(),
        created: 1_768_478_400,
        object_ref: None,
        status: EventStatus::Received,
        account: None,
        payload: format!(r#"{{"id":"{id}","type":"{kind}"}}"#),
        received_at: DateTime::UNIX_EPOCH,
    }
}

async fn purchase_of(store: &dyn Store, id: &str) -> Purchase {
    store.purchase(id).await.expect("purchase").expect("the purchase exists")
}

/// Purchases are created at version 1, found by id and by either Stripe id, and saved only over
/// the version read; immutable fields, duplicates and bad input are refused and write nothing.
pub async fn purchases_round_trip_and_cas(store: &dyn Store, clock: &ManualClock) {
    let (alice, bob) = (acct("alice"), acct("bob"));
    let p = pack_purchase("pur_1", &alice);
    let created = store.create_purchase(&p).await.unwrap();
    let t0 = clock.now();
    assert_eq!(created, Purchase { version: 1, created_at: t0, updated_at: t0, ..p.clone() });
    assert_eq!(store.purchase("pur_1").await.unwrap(), Some(created.clone()));
    assert_eq!(store.purchase_by_stripe_id("cs_pur_1").await.unwrap(), Some(created.clone()));
    assert_eq!(store.purchase_by_stripe_id("pi_1").await.unwrap(), None);
    assert_eq!(store.purchase("pur_unknown").await.unwrap(), None);

    // Paid: every mutable field changes; the caller's times are ignored.
    clock.advance(Duration::seconds(5));
    let paid = Purchase {
        status: PurchaseStatus::Completed,
        payment_intent: Some("pi_1".into()),
        customer: Some("cus_1".into()),
        credited: true,
        created_at: start() + Duration::days(300),
        updated_at: start() - Duration::days(300),
        ..created.clone()
    };
    let saved = store.save_purchase(&paid).await.unwrap().expect("the version read is current");
    let t1 = clock.now();
    assert_eq!(saved, Purchase { version: 2, created_at: t0, updated_at: t1, ..paid.clone() });
    assert_eq!(store.purchase("pur_1").await.unwrap(), Some(saved.clone()));
    assert_eq!(store.purchase_by_stripe_id("pi_1").await.unwrap(), Some(saved.clone()));
    assert_eq!(store.purchase_by_stripe_id("cs_pur_1").await.unwrap(), Some(saved.clone()));

    // A stale version writes nothing.
    clock.advance(Duration::seconds(1));
    let stale = Purchase { status: PurchaseStatus::PartiallyRefunded, refunded_cents: 100, credits_reversed: 100, ..saved.clone() };
    assert_eq!(store.save_purchase(&Purchase { version: 1, ..stale.clone() }).await.unwrap(), None);
    assert_eq!(store.save_purchase(&Purchase { version: 3, ..stale.clone() }).await.unwrap(), None);
    assert_eq!(store.save_purchase(&Purchase { version: i64::MAX, ..stale.clone() }).await.unwrap(), None);
    assert_eq!(purchase_of(store, "pur_1").await, saved, "a stale save changed nothing");

    // Immutable fields, whatever the version.
    let changes: Vec<(&str, Purchase)> = vec![
        ("account", Purchase { account: bob.clone(), ..stale.clone() }),
        ("kind", Purchase { kind: PurchaseKind::Subscription, ..stale.clone() }),
        ("product", Purchase { product: "large".into(), ..stale.clone() }),
        ("credits", Purchase { credits: 501, ..stale.clone() }),
        ("amount_cents", Purchase { amount_cents: 600, ..stale.clone() }),
        ("currency", Purchase { currency: "eur".into(), ..stale.clone() }),
    ];
    for (field, changed) in changes {
        assert_eq!(invalid_field(store.save_purchase(&changed).await), field);
        assert_eq!(invalid_field(store.save_purchase(&Purchase { version: 1, ..changed }).await), field);
    }
    assert_eq!(purchase_of(store, "pur_1").await, saved, "refused changes changed nothing");

    // Duplicates.
    assert_eq!(invalid_field(store.create_purchase(&Purchase { checkout_session: None, ..pack_purchase("pur_1", &bob) }).await), "purchase_id");
    let dup_intent = Purchase { payment_intent: Some("pi_1".into()), ..pack_purchase("pur_2", &bob) };
    assert_eq!(invalid_field(store.create_purchase(&dup_intent).await), "payment_intent");
    let dup_session = Purchase { checkout_session: Some("cs_pur_1".into()), ..pack_purchase("pur_2", &bob) };
    assert_eq!(invalid_field(store.create_purchase(&dup_session).await), "checkout_session");
    assert_eq!(store.purchase("pur_2").await.unwrap(), None, "a refused purchase is not stored");
    let second = store.create_purchase(&Purchase { payment_intent: Some("pi_2".into()), ..pack_purchase("pur_2", &bob) }).await.unwrap();
    assert_eq!(second.version, 1);
    assert_eq!(store.purchase_by_stripe_id("pi_2").await.unwrap(), Some(second.clone()));
    assert_eq!(invalid_field(store.save_purchase(&Purchase { payment_intent: Some("pi_1".into()), ..second.clone() }).await), "payment_intent");
    assert_eq!(invalid_field(store.save_purchase(&Purchase { checkout_session: Some("cs_pur_1".into()), ..second.clone() }).await), "checkout_session");
    assert_eq!(purchase_of(store, "pur_2").await, second, "a refused save changed nothing");

    // Bad input: refused before anything is written.
    let bad: Vec<(&str, Purchase)> = vec![
        ("purchase_id", pack_purchase("", &alice)),
        ("purchase_id", Purchase { checkout_session: None, ..pack_purchase("pur\n3", &alice) }),
        ("refunded_cents", Purchase { refunded_cents: 501, ..pack_purchase("pur_3", &alice) }),
        ("credits_reversed", Purchase { credits_reversed: 501, ..pack_purchase("pur_3", &alice) }),
        ("currency", Purchase { currency: "USD".into(), ..pack_purchase("pur_3", &alice) }),
        ("currency", Purchase { currency: "usdx".into(), ..pack_purchase("pur_3", &alice) }),
        ("credits", Purchase { credits: -1, ..pack_purchase("pur_3", &alice) }),
        ("product", Purchase { product: String::new(), ..pack_purchase("pur_3", &alice) }),
        ("stripe_id", Purchase { checkout_session: Some(String::new()), ..pack_purchase("pur_3", &alice) }),
        ("stripe_id", Purchase { customer: Some("cus\u{0}1".into()), ..pack_purchase("pur_3", &alice) }),
    ];
    for (field, p) in bad {
        assert_eq!(invalid_field(store.create_purchase(&p).await), field, "{p:?}");
    }
    assert_eq!(store.purchase("pur_3").await.unwrap(), None, "a refused purchase is not stored");
    assert_eq!(invalid_field(store.save_purchase(&Purchase { refunded_cents: 501, ..saved.clone() }).await), "refunded_cents");
    assert_eq!(invalid_field(store.save_purchase(&Purchase { credits_reversed: 501, ..saved.clone() }).await), "credits_reversed");
    for to in [0, 500 + 1, -1] {
        assert_eq!(invalid_field(store.save_purchase(&Purchase { reversing_to: Some(to), ..saved.clone() }).await), "reversing_to");
    }
    assert_eq!(invalid_field(store.save_purchase(&Purchase { credits_reversed: 100, reversing_to: Some(100), ..saved.clone() }).await), "reversing_to");
    assert_eq!(invalid_field(store.save_purchase(&Purchase { currency: "Usd".into(), ..saved.clone() }).await), "currency");
    assert_eq!(invalid_field(store.save_purchase(&Purchase { id: String::new(), ..saved.clone() }).await), "purchase_id");
    assert_eq!(purchase_of(store, "pur_1").await, saved, "bad input changed nothing");
    assert_eq!(invalid_field(store.purchase("").await), "purchase_id");
    assert_eq!(invalid_field(store.purchase_by_stripe_id("").await), "stripe_id");
    assert_eq!(invalid_field(store.purchase_by_stripe_id("pi\u{0}").await), "stripe_id");

    // Unknown id.
    match store.save_purchase(&pack_purchase("pur_unknown", &alice)).await {
        Err(Error::NotFound { what: "purchase" }) => {}
        other => panic!("expected the purchase not found, got {other:?}"),
    }
    assert_eq!(store.purchase("pur_unknown").await.unwrap(), None);

    // All purchases by id (byte order), in pages.
    for id in ["pur_10", "Pur_0", "pur_9", "pur_a"] {
        store.create_purchase(&pack_purchase(id, &alice)).await.unwrap();
    }
    let mut expected: Vec<String> = ["pur_1", "pur_2", "pur_10", "Pur_0", "pur_9", "pur_a"].into_iter().map(String::from).collect();
    expected.sort();
    let all: Vec<String> = store.purchases(None, 1000).await.unwrap().into_iter().map(|p| p.id).collect();
    assert_eq!(all, expected);
    let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let page = store.purchases(after.as_deref(), 4).await.unwrap();
        pages += 1;
        assert!(page.len() <= 4 && pages < 10);
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        seen.extend(page.into_iter().map(|p| p.id));
    }
    assert_eq!((seen, pages), (expected.clone(), 3));
    let tail: Vec<String> = store.purchases(Some("pur_2"), 10).await.unwrap().into_iter().map(|p| p.id).collect();
    assert_eq!(tail, expected.iter().filter(|id| id.as_str() > "pur_2").cloned().collect::<Vec<_>>());
    assert!(store.purchases(Some("zzz"), 10).await.unwrap().is_empty());
    assert_eq!(store.purchases(Some("pur_1"), 1).await.unwrap(), vec![purchase_of(store, "pur_10").await]);
    assert_eq!(invalid_field(store.purchases(None, 0).await), "limit");
    assert_eq!(invalid_field(store.purchases(None, 1001).await), "limit");
    assert_eq!(invalid_field(store.purchases(Some(""), 10).await), "purchase_id");
}

/// Concurrent read-modify-write loops over one purchase lose no update: each save succeeds
/// over exactly one version.
pub async fn purchase_cas_under_concurrency(store: &dyn Store, _clock: &ManualClock) {
    let alice = acct("alice");
    let p = Purchase { status: PurchaseStatus::Completed, credited: true, ..pack_purchase("pur_busy", &alice) };
    store.create_purchase(&p).await.unwrap();
    let loops = (0..20).map(|_| async move {
        for _ in 0..1_000 {
            let current = purchase_of(store, "pur_busy").await;
            let next = Purchase { status: PurchaseStatus::PartiallyRefunded, refunded_cents: current.refunded_cents + 1, ..current };
            if let Some(saved) = store.save_purchase(&next).await.unwrap() {
                return saved.version;
            }
        }
        panic!("a save never got through");
    });
    let mut versions = join_all(loops).await;
    versions.sort_unstable();
    assert_eq!(versions, (2..=21).collect::<Vec<i64>>(), "each save moved the version by one");
    let last = purchase_of(store, "pur_busy").await;
    assert_eq!((last.refunded_cents, last.version), (20, 21));
}

/// A Stripe event is kept once, by its id, whoever records it and however often; its status
/// moves; lists come oldest first.
pub async fn stripe_events_once_by_id(store: &dyn Store, clock: &ManualClock) {
    let alice = acct("alice");
    let e1 = stripe_event("evt_1", "checkout.session.completed");
    assert!(store.record_stripe_event(&e1).await.unwrap());
    let t0 = clock.now();
    let stored1 = StripeEventRecord { received_at: t0, ..e1.clone() };
    assert_eq!(store.stripe_event("evt_1").await.unwrap(), Some(stored1.clone()));
    clock.advance(Duration::seconds(1));
    let again =
        StripeEventRecord { kind: "charge.refunded".into(), status: EventStatus::Processed, account: Some(alice.clone()), payload: "{}".into(), ..e1.clone() };
    assert!(!store.record_stripe_event(&again).await.unwrap());
    assert_eq!(store.stripe_event("evt_1").await.unwrap(), Some(stored1.clone()), "the second payload is ignored");

    // Ten deliveries of one event at once: one is new.
    let copies: Vec<StripeEventRecord> =
        (0..10).map(|i| StripeEventRecord { payload: format!(r#"{{"id":"evt_2","copy":{i}}}"#), ..stripe_event("evt_2", "charge.refunded") }).collect();
    let results = join_all(copies.iter().map(|e| store.record_stripe_event(e))).await;
    let new = results.into_iter().map(|r| r.unwrap()).filter(|n| *n).count();
    assert_eq!(new, 1, "exactly one delivery is new");
    let t1 = clock.now();
    let stored2 = store.stripe_event("evt_2").await.unwrap().expect("stored");
    assert!(copies.iter().any(|c| StripeEventRecord { received_at: t1, ..c.clone() } == stored2), "one of the copies, whole: {stored2:?}");
    // Received at the same time as evt_2: ordered by id.
    assert!(store.record_stripe_event(&stripe_event("evt_0", "invoice.paid")).await.unwrap());
    clock.advance(Duration::seconds(1));
    let e3 = StripeEventRecord { status: EventStatus::Unmatched, account: Some(alice.clone()), ..stripe_event("evt_3", "charge.refunded") };
    assert!(store.record_stripe_event(&e3).await.unwrap());
    assert_eq!(store.stripe_event("evt_3").await.unwrap(), Some(StripeEventRecord { received_at: clock.now(), ..e3.clone() }));

    let ids = |events: Vec<StripeEventRecord>| events.into_iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(ids(store.stripe_events(None, 100).await.unwrap()), ["evt_1", "evt_0", "evt_2", "evt_3"]);
    assert_eq!(ids(store.stripe_events(None, 2).await.unwrap()), ["evt_1", "evt_0"]);
    assert_eq!(ids(store.stripe_events(Some(EventStatus::Received), 100).await.unwrap()), ["evt_1", "evt_0", "evt_2"]);
    assert_eq!(ids(store.stripe_events(Some(EventStatus::Unmatched), 100).await.unwrap()), ["evt_3"]);
    assert!(store.stripe_events(Some(EventStatus::Processed), 100).await.unwrap().is_empty());

    // Status updates: the account when given, kept otherwise.
    store.set_stripe_event_status("evt_0", EventStatus::Processed, Some(&alice)).await.unwrap();
    let e0 = store.stripe_event("evt_0").await.unwrap().expect("stored");
    assert_eq!((e0.status, e0.account.clone()), (EventStatus::Processed, Some(alice.clone())));
    store.set_stripe_event_status("evt_0", EventStatus::Ignored, None).await.unwrap();
    assert_eq!(store.stripe_event("evt_0").await.unwrap(), Some(StripeEventRecord { status: EventStatus::Ignored, ..e0 }));
    store.set_stripe_event_status("evt_1", EventStatus::Processed, None).await.unwrap();
    store.set_stripe_event_status("evt_1", EventStatus::Processed, None).await.unwrap();
    assert_eq!(store.stripe_event("evt_1").await.unwrap(), Some(StripeEventRecord { status: EventStatus::Processed, ..stored1 }));
    assert_eq!(ids(store.stripe_events(Some(EventStatus::Received), 100).await.unwrap()), ["evt_2"]);
    assert_eq!(ids(store.stripe_events(Some(EventStatus::Processed), 100).await.unwrap()), ["evt_1"]);
    assert_eq!(ids(store.stripe_events(Some(EventStatus::Ignored), 100).await.unwrap()), ["evt_0"]);
    assert_eq!(ids(store.stripe_events(None, 100).await.unwrap()), ["evt_1", "evt_0", "evt_2", "evt_3"], "order is by receipt, not status");

    // Unknown ids and bad input.
    match store.set_stripe_event_status("evt_unknown", EventStatus::Processed, Some(&alice)).await {
        Err(Error::NotFound { what: "stripe event" }) => {}
        other => panic!("expected the stripe event not found, got {other:?}"),
    }
    assert_eq!(store.stripe_event("evt_unknown").await.unwrap(), None);
    assert_eq!(invalid_field(store.stripe_event("").await), "stripe_id");
    assert_eq!(invalid_field(store.set_stripe_event_status("", EventStatus::Processed, None).await), "stripe_id");
    let oversize = StripeEventRecord { payload: "x".repeat(MAX_EVENT_PAYLOAD_BYTES + 1), ..stripe_event("evt_big", "charge.refunded") };
    assert_eq!(invalid_field(store.record_stripe_event(&oversize).await), "payload");
    let nul = StripeEventRecord { payload: "{\u{0}}".into(), ..stripe_event("evt_big", "charge.refunded") };
    assert_eq!(invalid_field(store.record_stripe_event(&nul).await), "payload");
    assert_eq!(invalid_field(store.record_stripe_event(&stripe_event("", "charge.refunded")).await), "event_id");
    assert_eq!(invalid_field(store.record_stripe_event(&stripe_event("evt_big", "")).await), "event_type");
    assert_eq!(store.stripe_event("evt_big").await.unwrap(), None, "refused events are not stored");
    let largest = StripeEventRecord { payload: "x".repeat(MAX_EVENT_PAYLOAD_BYTES), ..stripe_event("evt_big", "charge.refunded") };
    assert!(store.record_stripe_event(&largest).await.unwrap());
    assert_eq!(store.stripe_event("evt_big").await.unwrap().map(|e| e.payload.len()), Some(MAX_EVENT_PAYLOAD_BYTES));
    assert_eq!(invalid_field(store.stripe_events(None, 0).await), "limit");
    assert_eq!(invalid_field(store.stripe_events(Some(EventStatus::Received), 1001).await), "limit");
}

/// Customers map to accounts (the latest link wins); debts move atomically within their bounds.
pub async fn customers_and_debts(store: &dyn Store, _clock: &ManualClock) {
    let (alice, bob, carol) = (acct("alice"), acct("bob"), acct("carol"));
    assert_eq!(store.customer_account("cus_1").await.unwrap(), None);
    store.link_customer("cus_1", &alice).await.unwrap();
    store.link_customer("cus_1", &alice).await.unwrap();
    assert_eq!(store.customer_account("cus_1").await.unwrap(), Some(alice.clone()));
    store.link_customer("cus_2", &alice).await.unwrap();
    store.link_customer("cus_1", &bob).await.unwrap();
    assert_eq!(store.customer_account("cus_1").await.unwrap(), Some(bob.clone()));
    assert_eq!(store.customer_account("cus_2").await.unwrap(), Some(alice.clone()));
    assert_eq!(store.customer_account("cus_unknown").await.unwrap(), None);
    assert_eq!(invalid_field(store.link_customer("", &alice).await), "stripe_id");
    assert_eq!(invalid_field(store.link_customer("cus\n3", &alice).await), "stripe_id");
    assert_eq!(invalid_field(store.customer_account("").await), "stripe_id");

    // Debts: never below zero; what each change did.
    use crate::store::DebtChange;
    let change = |applied, debt_after| DebtChange { applied, debt_after, replayed: false };
    let replay = |applied, debt_after| DebtChange { applied, debt_after, replayed: true };
    assert_eq!(store.debt(&alice).await.unwrap(), 0);
    assert_eq!(store.add_debt(&alice, 5, "d1").await.unwrap(), change(5, 5));
    assert_eq!(store.debt(&alice).await.unwrap(), 5);
    assert_eq!(store.add_debt(&alice, -8, "d2").await.unwrap(), change(-5, 0), "a repayment takes at most the debt");
    assert_eq!(store.debt(&alice).await.unwrap(), 0);
    assert_eq!(store.add_debt(&alice, 0, "d3").await.unwrap(), change(0, 0));
    assert_eq!(store.add_debt(&bob, -3, "d4").await.unwrap(), change(0, 0), "a repayment without a debt");
    assert_eq!(store.add_debt(&bob, MAX_CREDITS_PER_REQUEST, "d5").await.unwrap(), change(MAX_CREDITS_PER_REQUEST, MAX_CREDITS_PER_REQUEST));
    assert_eq!(store.add_debt(&bob, -MAX_CREDITS_PER_REQUEST + 1, "d6").await.unwrap(), change(-MAX_CREDITS_PER_REQUEST + 1, 1));

    // Once per key: a repeat returns the first result and writes nothing; the key with another
    // amount or account is a conflict.
    assert_eq!(store.add_debt(&alice, 5, "d1").await.unwrap(), replay(5, 5));
    assert_eq!(store.add_debt(&alice, -8, "d2").await.unwrap(), replay(-5, 0));
    assert_eq!(store.debt(&alice).await.unwrap(), 0, "replays changed nothing");
    assert!(matches!(store.add_debt(&alice, 6, "d1").await, Err(Error::IdempotencyConflict { .. })));
    assert!(matches!(store.add_debt(&bob, 5, "d1").await, Err(Error::IdempotencyConflict { .. })));
    assert_eq!((store.debt(&alice).await.unwrap(), store.debt(&bob).await.unwrap()), (0, 1));

    // Concurrent additions all count; concurrent repeats of one key count once.
    let keys: Vec<String> = (0..30).map(|i| format!("c{i}")).collect();
    let mut debts = join_all(keys.iter().map(|k| store.add_debt(&carol, 1, k))).await.into_iter().map(|r| r.unwrap().debt_after).collect::<Vec<_>>();
    debts.sort_unstable();
    assert_eq!(debts, (1..=30).collect::<Vec<i64>>());
    assert_eq!(store.debt(&carol).await.unwrap(), 30);
    let repeats = join_all((0..10).map(|_| store.add_debt(&carol, -4, "repay-once"))).await;
    let fresh = repeats.iter().filter(|r| matches!(r, Ok(DebtChange { replayed: false, .. }))).count();
    // A backend may answer a repeat racing the first with a conflict (the delivery is
    // retried) but never applies it twice.
    assert!(repeats.iter().all(|r| matches!(r, Ok(DebtChange { applied: -4, .. }) | Err(Error::IdempotencyConflict { .. }))), "{repeats:?}");
    assert_eq!(fresh, 1, "{repeats:?}");
    assert_eq!(store.debt(&carol).await.unwrap(), 26);
    // Two repayments at once never take more than the debt: together exactly 26.
    let both = join_all([store.add_debt(&carol, -20, "pack-a"), store.add_debt(&carol, -20, "pack-b")]).await;
    let taken: i64 = both.iter().map(|r| -r.as_ref().unwrap().applied).sum();
    assert_eq!((taken, store.debt(&carol).await.unwrap()), (26, 0));

    // Bad amounts and keys change nothing.
    for bad in [MAX_CREDITS_PER_REQUEST + 1, -MAX_CREDITS_PER_REQUEST - 1, i64::MAX, i64::MIN] {
        assert_eq!(invalid_field(store.add_debt(&carol, bad, "bad").await), "credits");
    }
    assert!(matches!(store.add_debt(&carol, 1, "").await, Err(Error::InvalidInput { .. })));
    assert!(matches!(store.add_debt(&carol, 1, &"k".repeat(300)).await, Err(Error::InvalidInput { .. })));
    assert_eq!(store.debt(&carol).await.unwrap(), 0);
    assert_eq!(store.debt(&bob).await.unwrap(), 1);
}

/// A keyed response is stored once per (account, key): the first writer wins, others read it
/// back; accounts do not see each other's keys; bad input stores nothing.
pub async fn keyed_responses_are_stored_once(store: &dyn Store, clock: &ManualClock) {
    use crate::store::KeyedResponse;
    let (alice, bob) = (acct("alice"), acct("bob"));
    let first = KeyedResponse { account: alice.clone(), key: "k-1".into(), fingerprint: "f1".into(), status: 201, body: "{\"ok\":1}".into(), at: clock.now() };
    assert_eq!(store.keyed_response(&alice, "k-1").await.unwrap(), None);
    assert_eq!(store.remember_response(&first).await.unwrap(), first);
    let second = KeyedResponse { fingerprint: "f2".into(), status: 402, body: "other".into(), ..first.clone() };
    assert_eq!(store.remember_response(&second).await.unwrap(), first, "the first response stays");
    assert_eq!(store.keyed_response(&alice, "k-1").await.unwrap(), Some(first.clone()));
    assert_eq!(store.keyed_response(&bob, "k-1").await.unwrap(), None);
    let bobs = KeyedResponse { account: bob.clone(), ..second.clone() };
    assert_eq!(store.remember_response(&bobs).await.unwrap(), bobs);

    // Racing writers of one key: all read back the same stored response.
    let racers: Vec<KeyedResponse> = (0..8).map(|i| KeyedResponse { key: "race".into(), fingerprint: format!("f{i}"), ..first.clone() }).collect();
    let stored = join_all(racers.iter().map(|r| store.remember_response(r))).await;
    let stored: Vec<KeyedResponse> = stored.into_iter().map(Result::unwrap).collect();
    assert!(stored.iter().all(|r| r == &stored[0]));
    assert_eq!(store.keyed_response(&alice, "race").await.unwrap().as_ref(), Some(&stored[0]));

    for bad in [
        KeyedResponse { key: String::new(), ..first.clone() },
        KeyedResponse { key: "has space".into(), ..first.clone() },
        KeyedResponse { key: "k".repeat(256), ..first.clone() },
    ] {
        assert_eq!(invalid_field(store.remember_response(&bad).await), "idempotency_key");
    }
    assert_eq!(invalid_field(store.remember_response(&KeyedResponse { key: "k-2".into(), status: 99, ..first.clone() }).await), "status");
    let big = KeyedResponse { key: "k-2".into(), body: "x".repeat(crate::store::MAX_KEYED_BODY_BYTES + 1), ..first.clone() };
    assert_eq!(invalid_field(store.remember_response(&big).await), "body");
    assert_eq!(store.keyed_response(&alice, "k-2").await.unwrap(), None, "bad input stored nothing");
    assert_eq!(invalid_field(store.keyed_response(&alice, "").await), "idempotency_key");
}

/// Usage records page newest first through `usage_before`: every record once, none of another
/// account's, bad input refused.
pub async fn usage_pages_newest_first(store: &dyn Store, _clock: &ManualClock) {
    let (u, other) = (create_user(store, "u").await, create_user(store, "other").await);
    for i in 1..=25 {
        applied(store.meter(meter_cmd(&u, i, &format!("m{i}"))).await);
        if i % 5 == 0 {
            applied(store.meter(meter_cmd(&other, 1_000 + i, &format!("o{i}"))).await);
        }
    }
    let mut costs = Vec::new();
    let mut before = None;
    let mut pages = Vec::new();
    loop {
        let page = store.usage_before(&u, before, 10).await.unwrap();
        pages.push(page.len());
        let Some(last) = page.last() else { break };
        assert!(page.windows(2).all(|w| w[0].entry > w[1].entry), "newest first");
        assert!(page.iter().all(|r| r.account == u && before.is_none_or(|b| r.entry < b)));
        before = Some(last.entry);
        costs.extend(page.iter().map(|r| r.usage.cost_micros));
    }
    assert_eq!(pages, [10, 10, 5, 0]);
    assert_eq!(costs, (1..=25).rev().collect::<Vec<i64>>());
    // `usage` is the first page.
    let first: Vec<i64> = store.usage(&u, 10).await.unwrap().iter().map(|r| r.usage.cost_micros).collect();
    assert_eq!(first, (16..=25).rev().collect::<Vec<i64>>());
    assert_eq!(store.usage(&other, 1_000).await.unwrap().len(), 5);
    assert!(store.usage_before(&u, Some(EntryId(1)), 10).await.unwrap().is_empty());
    assert!(matches!(store.usage_before(&u, None, 0).await, Err(Error::InvalidInput { .. })));
    assert!(matches!(store.usage_before(&u, None, 1_001).await, Err(Error::InvalidInput { .. })));
    assert!(matches!(store.usage_before(&acct("nobody"), None, 10).await, Err(Error::UnknownAccount(_))));
}

/// Events about one Stripe object come from its index, by status, newest first (Stripe's
/// `created`, then id); other objects' and other statuses' events never mix in.
pub async fn stripe_events_about_an_object(store: &dyn Store, _clock: &ManualClock) {
    let about = |id: &str, kind: &str, object: Option<&str>, created: i64, status: EventStatus| StripeEventRecord {
        object_ref: object.map(str::to_owned),
        created,
        status,
        ..stripe_event(id, kind)
    };
    let events = [
        about("evt_a", "charge.refunded", Some("pi_1"), 100, EventStatus::Unmatched),
        about("evt_b", "charge.refunded", Some("pi_1"), 300, EventStatus::Unmatched),
        about("evt_c", "charge.refunded", Some("pi_1"), 200, EventStatus::Processed),
        about("evt_d", "charge.refunded", Some("pi_2"), 100, EventStatus::Unmatched),
        about("evt_e", "charge.refunded", None, 100, EventStatus::Unmatched),
        about("evt_f", "customer.subscription.updated", Some("sub_1"), 500, EventStatus::Processed),
        about("evt_g", "customer.subscription.deleted", Some("sub_1"), 500, EventStatus::Processed),
    ];
    for e in &events {
        assert!(store.record_stripe_event(e).await.unwrap());
    }
    let ids = |v: Vec<StripeEventRecord>| v.into_iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(ids(store.stripe_events_about("pi_1", EventStatus::Unmatched, 10).await.unwrap()), ["evt_b", "evt_a"]);
    assert_eq!(ids(store.stripe_events_about("pi_1", EventStatus::Unmatched, 1).await.unwrap()), ["evt_b"]);
    assert_eq!(ids(store.stripe_events_about("pi_1", EventStatus::Processed, 10).await.unwrap()), ["evt_c"]);
    assert_eq!(ids(store.stripe_events_about("pi_2", EventStatus::Unmatched, 10).await.unwrap()), ["evt_d"]);
    assert_eq!(ids(store.stripe_events_about("sub_1", EventStatus::Processed, 10).await.unwrap()), ["evt_g", "evt_f"], "same second: by id");
    assert!(store.stripe_events_about("pi_3", EventStatus::Unmatched, 10).await.unwrap().is_empty());
    // The status moves, and so does the answer; the record keeps its object.
    store.set_stripe_event_status("evt_a", EventStatus::Processed, None).await.unwrap();
    assert_eq!(ids(store.stripe_events_about("pi_1", EventStatus::Unmatched, 10).await.unwrap()), ["evt_b"]);
    assert_eq!(store.stripe_event("evt_a").await.unwrap().unwrap().object_ref.as_deref(), Some("pi_1"));
    // Bad input.
    assert_eq!(invalid_field(store.stripe_events_about("", EventStatus::Unmatched, 10).await), "stripe_id");
    assert_eq!(invalid_field(store.stripe_events_about("pi_1", EventStatus::Unmatched, 0).await), "limit");
    assert_eq!(invalid_field(store.stripe_events_about("pi_1", EventStatus::Unmatched, 1_001).await), "limit");
    let bad = about("evt_bad", "charge.refunded", Some("pi\n1"), 1, EventStatus::Unmatched);
    assert_eq!(invalid_field(store.record_stripe_event(&bad).await), "object_ref");
    assert_eq!(store.stripe_event("evt_bad").await.unwrap(), None);
}

/// Log entry ids follow the order of writes across accounts, not only within one: whatever
/// pages a log or usage export by id (`after` cursors, the Python tables) sees writes in the
/// order they happened. Sequential writes cycle over accounts that a backend may serve from
/// different lanes or connections.
pub async fn log_ids_follow_the_order_of_writes(store: &dyn Store, _clock: &ManualClock) {
    let mut users = Vec::new();
    for i in 0..8 {
        users.push(create_user(store, &format!("order{i}")).await);
    }
    let mut last = 0;
    for round in 0..4 {
        for (i, u) in users.iter().enumerate() {
            let entry = match applied(store.meter(meter_cmd(u, 1 + i as i64, &format!("order {round} {i}"))).await) {
                Effect::Metered { entry, .. } => entry.0,
                other => panic!("expected a metered effect, got {other:?}"),
            };
            assert!(entry > last, "round {round}, account {i}: entry {entry} after entry {last}");
            last = entry;
        }
    }
}
