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
use crate::error::Error;
use crate::history::export_csv;
use crate::jobs;
use crate::ledger::rules::add_month;
use crate::ledger::*;
use crate::pricing::TokenUsage;
use crate::store::{BalanceView, HistoryQuery, Store};

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
/// `(LedgerConfig, Arc<ManualClock>) -> TestStore`.
#[macro_export]
macro_rules! conformance_suite {
    ($open:path) => {
        $crate::conformance_suite!(@tests $open; default;
            signup_credits, grants_and_bad_input, spend_order_default, hold_settle_release,
            hold_expiry_and_sweep, idempotent_replays, history_filters_pages_csv,
            refunds_and_clawbacks, monthly_rollover, rollover_expiry, holds_need_credits_that_outlive_them,
            concurrent_spends_never_overspend, concurrent_holds_and_duplicate_keys,
            plan_changes_close_due_periods_first, rollover_runs_with_backed_holds, refunds_never_extend_expiry,
            rollover_lot_limits, times_are_kept_to_the_millisecond, huge_token_counts_are_refused,
            jobs_run_twice_at_once_do_the_work_once);
        $crate::conformance_suite!(@tests $open; rollover_first; rollover_first_spend_order);
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
    applied(
        store
            .grant(Grant { account: a.clone(), bucket, amount, source: GrantSource::Admin, expires_at, reference: "test".into(), key: key(k) })
            .await,
    )
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
    assert!(matches!(applied(store.set_plan(u.clone(), Some(PlanTerms { monthly_credits: 100, period_end: pe1, anchor_day: None }), key("plan1b")).await), Effect::PlanSet { granted: 0, .. }));
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
        applied(store.set_plan(u.clone(), Some(PlanTerms { monthly_credits: 10, period_end: now + Duration::days(1), anchor_day: None }), key(&format!("p{i}"))).await);
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
