//! Property tests of the ledger invariants over random sequences of operations and clock
//! jumps: no bucket ever negative, available = total - held, balance = sum of the log
//! (`verify`), the spend order respected, expired credits never spent, open holds always
//! settle, rejections and idempotent replays change nothing.

use std::sync::Arc;

use chrono::Duration;
use proptest::prelude::*;
use prpm_playground_core::conformance::{acct, key, start};
use prpm_playground_core::store::HistoryQuery;
use prpm_playground_core::*;

#[derive(Debug, Clone)]
enum Op {
    Grant { bucket: Bucket, amount: i64, expiry_secs: i64 },
    Spend { amount: i64 },
    Hold { amount: i64, ttl_secs: u32 },
    Settle { pick: usize, credits: i64 },
    Release { pick: usize },
    Refund { pick: usize, amount: i64 },
    Clawback { bucket: Bucket, amount: i64 },
    StartPlan { credits: i64, days: i64 },
    EndPlan,
    Jobs,
    Advance { secs: i64 },
    Replay { pick: usize },
}

fn bucket() -> impl Strategy<Value = Bucket> {
    prop_oneof![Just(Bucket::Monthly), Just(Bucket::Rollover), Just(Bucket::Purchased)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (bucket(), 1..60i64, prop_oneof![60..7_200i64, 86_400..2_678_400i64]).prop_map(|(bucket, amount, expiry_secs)| Op::Grant { bucket, amount, expiry_secs }),
        4 => (1..40i64).prop_map(|amount| Op::Spend { amount }),
        4 => (1..40i64, prop_oneof![1..120u32, 1..86_400u32]).prop_map(|(amount, ttl_secs)| Op::Hold { amount, ttl_secs }),
        3 => (any::<usize>(), 0..50i64).prop_map(|(pick, credits)| Op::Settle { pick, credits }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => (any::<usize>(), 1..15i64).prop_map(|(pick, amount)| Op::Refund { pick, amount }),
        1 => (bucket(), 1..30i64).prop_map(|(bucket, amount)| Op::Clawback { bucket, amount }),
        1 => (0..120i64, 1..40i64).prop_map(|(credits, days)| Op::StartPlan { credits, days }),
        1 => Just(Op::EndPlan),
        1 => Just(Op::Jobs),
        3 => prop_oneof![0..600i64, 0..259_200i64, 1_000_000..5_000_000i64].prop_map(|secs| Op::Advance { secs }),
        2 => any::<usize>().prop_map(|pick| Op::Replay { pick }),
    ]
}

fn order_strategy() -> impl Strategy<Value = SpendOrder> {
    prop_oneof![
        Just(SpendOrder::DEFAULT),
        Just(SpendOrder::ROLLOVER_FIRST),
        Just(SpendOrder::new([Bucket::Purchased, Bucket::Rollover, Bucket::Monthly]).unwrap())
    ]
}

struct World {
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    order: SpendOrder,
    /// Holds this test opened: (id, deadline, closed).
    holds: Vec<(HoldId, chrono::DateTime<chrono::Utc>, bool)>,
    charges: Vec<EntryId>,
    applied: Vec<(Command, Effect)>,
    n: usize,
}

impl World {
    fn key(&mut self) -> IdempotencyKey {
        self.n += 1;
        key(&format!("k{}", self.n))
    }
}

async fn snapshot(store: &dyn Store) -> (BalanceView, usize) {
    let a = acct("u");
    let b = store.balance(&a).await.unwrap();
    let mut q = HistoryQuery::new(a);
    q.limit = 1000;
    let mut n = 0;
    loop {
        let page = store.history(&q).await.unwrap();
        n += page.entries.len();
        match page.next {
            Some(next) => q.before = Some(next),
            None => break,
        }
    }
    (b, n)
}

fn check_view(b: &BalanceView, now: chrono::DateTime<chrono::Utc>) {
    // Expired credits never count (and so are never spent).
    assert!(b.next_expiry.is_none_or(|l| l.expires_at > now && l.amount > 0), "expired credits still counted at {now}: {b:?}");
    assert_eq!(b.rollover > 0, b.next_expiry.is_some());
    assert!(b.monthly >= 0 && b.rollover >= 0 && b.purchased >= 0 && b.held >= 0, "negative: {b:?}");
    assert_eq!(b.total, b.monthly + b.rollover + b.purchased);
    assert_eq!(b.available, b.total - b.held);
}

/// The charge the spend order prescribes for `amount` given the balances before.
fn expected_charge(order: SpendOrder, before: &BalanceView, amount: i64) -> BucketAmounts {
    let mut left = amount;
    let mut c = BucketAmounts::default();
    for bucket in order.buckets() {
        let have = match bucket {
            Bucket::Monthly => before.monthly,
            Bucket::Rollover => before.rollover,
            Bucket::Purchased => before.purchased,
        };
        let k = left.min(have);
        *c.get_mut(bucket) = k;
        left -= k;
    }
    c
}

async fn step(w: &mut World, op: &Op) {
    let a = acct("u");
    let now = w.clock.now();
    let (before, log_before) = snapshot(&*w.store).await;
    let cmd = match op {
        Op::Grant { bucket, amount, expiry_secs } => Command::Grant(Grant {
            account: a.clone(),
            bucket: *bucket,
            amount: *amount,
            source: GrantSource::Admin,
            expires_at: (*bucket == Bucket::Rollover).then(|| now + Duration::seconds(*expiry_secs)),
            reference: String::new(),
            key: w.key(),
        }),
        Op::Spend { amount } => Command::Spend(Spend { account: a.clone(), amount: *amount, usage: None, reference: String::new(), key: w.key() }),
        Op::Hold { amount, ttl_secs } => {
            Command::Hold(Hold { account: a.clone(), amount: *amount, ttl_secs: *ttl_secs, cost_micros: 0, reference: String::new(), key: w.key() })
        }
        Op::Settle { pick, credits } if !w.holds.is_empty() => {
            let (hold, _, _) = w.holds[pick % w.holds.len()];
            Command::Settle(Settle { hold, credits: *credits, usage: None, key: w.key() })
        }
        Op::Release { pick } if !w.holds.is_empty() => {
            let (hold, _, _) = w.holds[pick % w.holds.len()];
            Command::Release(Release { hold, key: w.key() })
        }
        Op::Refund { pick, amount } if !w.charges.is_empty() => {
            let entry = w.charges[pick % w.charges.len()];
            Command::Refund(Refund { account: a.clone(), entry, amount: *amount, reference: String::new(), key: w.key() })
        }
        Op::Clawback { bucket, amount } => {
            Command::Clawback(Clawback { account: a.clone(), bucket: *bucket, amount: *amount, reference: String::new(), key: w.key() })
        }
        Op::StartPlan { credits, days } => Command::SetPlan(SetPlan {
            account: a.clone(),
            plan: Some(PlanTerms { monthly_credits: *credits, period_end: now + Duration::days(*days), anchor_day: None }),
            key: w.key(),
        }),
        Op::EndPlan => Command::SetPlan(SetPlan { account: a.clone(), plan: None, key: w.key() }),
        Op::Jobs => {
            jobs::expire_holds(&*w.store).await.unwrap();
            jobs::expire_rollover(&*w.store).await.unwrap();
            jobs::monthly_rollover(&*w.store).await.unwrap();
            let (after, _) = snapshot(&*w.store).await;
            check_view(&after, now);
            // Jobs only remove what had already stopped counting, and roll over what was due.
            if before.plan.is_none_or(|p| p.period_end > now) {
                assert_eq!((after.total, after.held), (before.total, before.held), "jobs changed live balances");
            }
            return;
        }
        Op::Advance { secs } => {
            w.clock.advance(Duration::seconds(*secs));
            check_view(&snapshot(&*w.store).await.0, w.clock.now());
            return;
        }
        Op::Replay { pick } if !w.applied.is_empty() => {
            let (cmd, effect) = w.applied[pick % w.applied.len()].clone();
            let c = w.store.execute(cmd).await.unwrap().expect("a replay is never rejected");
            assert!(c.replayed);
            assert_eq!(c.effect, effect);
            assert_eq!(snapshot(&*w.store).await, (before, log_before), "a replay changed something");
            return;
        }
        _ => return,
    };
    let outcome = w.store.execute(cmd.clone()).await;
    let (after, log_after) = snapshot(&*w.store).await;
    check_view(&after, now);
    match outcome {
        Ok(Ok(c)) => {
            assert!(!c.replayed);
            let e = c.effect.clone();
            let b = e.balances();
            assert_eq!((b.monthly, b.rollover, b.purchased, b.held), (after.monthly, after.rollover, after.purchased, after.held));
            match (&cmd, &e) {
                (Command::Spend(s), Effect::Spent { charged, entry, .. }) => {
                    assert_eq!(*charged, expected_charge(w.order, &before, s.amount), "spend order");
                    w.charges.push(*entry);
                }
                (Command::Settle(s), Effect::Settled { charged, entry, released, .. }) => {
                    let i = w.holds.iter().position(|h| h.0 == s.hold).unwrap();
                    w.holds[i].2 = true;
                    assert_eq!(*charged, expected_charge(w.order, &before, charged.total()), "settle order");
                    assert_eq!(charged.total() + released, before.held - after.held);
                    assert_eq!(charged.total(), s.credits.min(charged.total() + released));
                    w.charges.push(*entry);
                }
                (Command::Hold(h), Effect::Held { hold, deadline, amount, .. }) => {
                    assert_eq!(*amount, h.amount);
                    assert!(h.amount <= before.available, "hold over available");
                    w.holds.push((*hold, *deadline, false));
                }
                (Command::Release(r), Effect::Released { .. }) => {
                    let i = w.holds.iter().position(|h| h.0 == r.hold).unwrap();
                    w.holds[i].2 = true;
                }
                _ => {}
            }
            w.applied.push((cmd, e));
        }
        Ok(Err(rejection)) => {
            // An open hold before its deadline always settles (never short of credits).
            if let Command::Settle(s) = &cmd {
                let h = w.holds.iter().find(|h| h.0 == s.hold).unwrap();
                assert!(h.2 || h.1 <= now, "open hold refused: {rejection:?}");
            }
            if let Command::Spend(s) = &cmd {
                assert!(matches!(rejection, Rejection::InsufficientCredits { needed, .. } if needed == s.amount));
                assert!(s.amount > before.available || before.held > 0, "spend within available refused without holds");
            }
            assert_eq!((after, log_after), (before, log_before), "a rejection changed something");
        }
        Err(e) => {
            assert_eq!(e.code(), "invalid_input", "{e}");
            assert_eq!((after, log_after), (before, log_before), "an error changed something");
        }
    }
}

async fn run(store: Arc<dyn Store>, clock: Arc<ManualClock>, order: SpendOrder, ops: &[Op]) {
    store.create_account(acct("u"), AccountKind::User, key("create")).await.unwrap().unwrap();
    // Unlimited: the ledger's rules are under test here, not the request limit.
    store.set_cost_profile(acct("u"), false, Some("unlimited".into()), key("unlimited")).await.unwrap().unwrap();
    let mut w = World { store, clock, order, holds: Vec::new(), charges: Vec::new(), applied: Vec::new(), n: 0 };
    for op in ops {
        step(&mut w, op).await;
    }
    let report = w.store.verify().await.unwrap();
    assert!(report.is_clean(), "{:?}", report.discrepancies);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn ledger_invariants_hold(order in order_strategy(), ops in prop::collection::vec(op(), 1..70), index_batch in 1u32..12) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let clock = Arc::new(ManualClock::new(start()));
            let ledger = LedgerConfig { spend_order: order, ..LedgerConfig::default() };
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open_with(SqliteOptions::memory().clock(clock.clone()).ledger(ledger).history_index_batch(index_batch)).unwrap());
            run(store, clock, order, &ops).await;
        });
    }
}

proptest! {
    // Each case is a fresh database on the test binary's PostgreSQL cluster.
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn ledger_invariants_hold_on_postgres(order in order_strategy(), ops in prop::collection::vec(op(), 1..70)) {
        let cluster = match prpm_playground_core::pg_cluster::PgCluster::shared() {
            Ok(Some(c)) => c,
            Ok(None) => {
                eprintln!("SKIPPED: PostgreSQL is not installed here (CI installs it and sets PRPM_REQUIRE_POSTGRES=1)");
                return Ok(());
            }
            Err(e) => panic!("cannot start a PostgreSQL cluster: {e}"),
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let clock = Arc::new(ManualClock::new(start()));
            let ledger = LedgerConfig { spend_order: order, ..LedgerConfig::default() };
            let url = cluster.create_database().await.unwrap();
            let opts = prpm_playground_core::store::postgres::PgOptions::new(url).clock(clock.clone()).ledger(ledger).pool_size(2);
            let store: Arc<dyn Store> = Arc::new(prpm_playground_core::store::postgres::PgStore::open(opts).await.unwrap());
            run(store, clock, order, &ops).await;
        });
    }
}
