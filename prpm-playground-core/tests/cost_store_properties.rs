//! Cost control through the store, over random sequences of holds (with worst-case costs),
//! settles, releases, meters, admin throttles and clock jumps across days and months, checked
//! against a model kept by the test: the counters equal the sums of what was settled and
//! metered per UTC day and month, the held cost equals the open holds' worst cases, no hour
//! admits more than the limit, no admission passes a cost limit, refusals change nothing, and
//! `verify()` is clean.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use proptest::prelude::*;
use prpm_playground_core::conformance::{create_free_user, key, usage_of};
use prpm_playground_core::store::HistoryQuery;
use prpm_playground_core::*;

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 30, 21, 0, 0).unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    Hold { gap_ms: i64, worst_micros: i64, ttl_secs: u32 },
    Settle { pick: usize, pct: i64 },
    Release { pick: usize },
    Meter { cost_micros: i64 },
    Throttle,
    Unthrottle,
    CostReset,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (prop_oneof![2 => 0i64..600_000, 1 => prop::sample::select(vec![1i64, 3_600_000, 3_599_999, 86_400_000, 2_678_400_000])],
              prop_oneof![1 => Just(0i64), 3 => 0i64..80_000], prop_oneof![3 => Just(7_200u32), 1 => 1u32..600])
            .prop_map(|(gap_ms, worst_micros, ttl_secs)| Op::Hold { gap_ms, worst_micros, ttl_secs }),
        3 => (any::<usize>(), 0i64..150).prop_map(|(pick, pct)| Op::Settle { pick, pct }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        2 => (0i64..40_000).prop_map(|cost_micros| Op::Meter { cost_micros }),
        1 => Just(Op::Throttle),
        1 => Just(Op::Unthrottle),
        1 => Just(Op::CostReset),
    ]
}

/// What the test knows independently of the store.
#[derive(Default)]
struct Model {
    cost_by_day: BTreeMap<NaiveDate, i64>,
    /// Open holds: (id, worst cost, deadline).
    open: Vec<(HoldId, i64, DateTime<Utc>)>,
    admitted_ms: Vec<i64>,
}

impl Model {
    fn day(&self, d: NaiveDate) -> i64 {
        self.cost_by_day.get(&d).copied().unwrap_or(0)
    }
    fn month(&self, d: NaiveDate) -> i64 {
        self.cost_by_day.iter().filter(|(k, _)| k.year() == d.year() && k.month() == d.month()).map(|(_, v)| v).sum()
    }
    fn count(&mut self, now: DateTime<Utc>, cost: i64) {
        *self.cost_by_day.entry(now.date_naive()).or_default() += cost;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn cost_control_matches_the_model(ops in prop::collection::vec(op(), 1..80), tier in prop::sample::select(vec!["free", "prpm_plus_org"]), postgres in prop::sample::select(vec![false, false, true])) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let clock = Arc::new(ManualClock::new(start()));
            // A third of the cases on PostgreSQL (a fresh database each), the rest on SQLite.
            let store: Arc<dyn Store> = match (postgres, prpm_playground_core::pg_cluster::PgCluster::shared()) {
                (true, Ok(Some(cluster))) => {
                    let url = cluster.create_database().await.unwrap();
                    let opts = prpm_playground_core::store::postgres::PgOptions::new(url).clock(clock.clone()).pool_size(2);
                    Arc::new(prpm_playground_core::store::postgres::PgStore::open(opts).await.unwrap())
                }
                (true, Err(e)) => panic!("cannot start a PostgreSQL cluster: {e}"),
                // Without PostgreSQL installed (and not required), SQLite stands in.
                _ => Arc::new(SqliteStore::open_with(SqliteOptions::memory().clock(clock.clone())).unwrap()),
            };
            let u = create_free_user(&*store, "u").await;
            applied(store.grant(Grant { account: u.clone(), bucket: Bucket::Purchased, amount: 100_000, source: GrantSource::Admin, expires_at: None, reference: String::new(), key: key("g") }).await);
            if tier != "free" {
                applied(store.set_cost_profile(u.clone(), false, Some(tier.into()), key("tier")).await);
            }
            let limits = store.tiers().await.unwrap().get(tier).unwrap().clone();
            let (daily, monthly, hourly) = (limits.daily_cost_limit_micros.unwrap(), limits.monthly_cost_limit_micros.unwrap(), limits.hourly_request_limit.unwrap() as usize);
            let mut m = Model::default();
            for (n, op) in ops.iter().enumerate() {
                let k = |s: &str| key(&format!("{s}{n}"));
                let before = (store.cost(&u).await.unwrap(), log_len(&*store, &u).await);
                let now = clock.now();
                // Holds past their deadline are returned by any command on the account.
                let result = match op {
                    Op::Hold { gap_ms, worst_micros, ttl_secs } => {
                        clock.advance(Duration::milliseconds(*gap_ms));
                        let now = clock.now();
                        m.open.retain(|h| h.2 > now);
                        let before = store.cost(&u).await.unwrap();
                        let h = Hold { account: u.clone(), amount: 1, ttl_secs: *ttl_secs, cost_micros: *worst_micros, reference: String::new(), key: k("h") };
                        let r = store.hold(h).await.unwrap();
                        let in_hour = m.admitted_ms.iter().filter(|&&t| t > now.timestamp_millis() - 3_600_000).count();
                        match &r {
                            Ok(c) => {
                                let Effect::Held { hold, deadline, .. } = c.effect else { panic!("{c:?}") };
                                prop_assert!(in_hour < hourly, "admitted with {in_hour} in the hour");
                                prop_assert!(before.throttle.is_none() || before.throttle.as_ref().and_then(|t| t.lifts_at()).is_some_and(|t| t <= now));
                                let (day, month) = (m.day(now.date_naive()), m.month(now.date_naive()));
                                let held: i64 = m.open.iter().map(|h| h.1).sum();
                                prop_assert!(day + held + worst_micros <= daily && month + held + worst_micros <= monthly, "a limit passed at admission");
                                m.open.push((hold, *worst_micros, deadline));
                                m.admitted_ms.push(now.timestamp_millis());
                            }
                            Err(Rejection::RateLimited { limit, retry_after_ms }) => {
                                prop_assert_eq!(*limit as usize, hourly);
                                prop_assert_eq!(in_hour, hourly, "rate-limited without a full window");
                                let oldest = m.admitted_ms[m.admitted_ms.len() - hourly];
                                prop_assert_eq!(*retry_after_ms, oldest + 3_600_000 - now.timestamp_millis());
                            }
                            Err(Rejection::Throttled { .. } | Rejection::DailyCostLimit { .. } | Rejection::MonthlyCostLimit { .. }) => {}
                            Err(other) => prop_assert!(false, "{other:?}"),
                        }
                        if r.is_err() {
                            prop_assert_eq!(&store.cost(&u).await.unwrap(), &before, "a refused hold changed the cost state");
                        }
                        r.map(|_| ())
                    }
                    Op::Settle { pick, pct } => {
                        m.open.retain(|h| h.2 > now);
                        if m.open.is_empty() {
                            continue;
                        }
                        let (hold, worst, _) = m.open.remove(pick % m.open.len());
                        let cost = worst * pct / 100;
                        let r = store.settle(Settle { hold, credits: 1, usage: Some(usage_of(cost)), key: k("s") }).await.unwrap();
                        prop_assert!(r.is_ok(), "an open hold settles: {r:?}");
                        m.count(now, cost);
                        r.map(|_| ())
                    }
                    Op::Release { pick } => {
                        m.open.retain(|h| h.2 > now);
                        if m.open.is_empty() {
                            continue;
                        }
                        let (hold, _, _) = m.open.remove(pick % m.open.len());
                        let r = store.release(hold, k("r")).await.unwrap();
                        prop_assert!(r.is_ok());
                        r.map(|_| ())
                    }
                    Op::Meter { cost_micros } => {
                        m.open.retain(|h| h.2 > now);
                        let r = store.meter(Meter { account: u.clone(), usage: usage_of(*cost_micros), reference: String::new(), key: k("m") }).await.unwrap();
                        prop_assert!(r.is_ok(), "a meter is never refused");
                        m.count(now, *cost_micros);
                        r.map(|_| ())
                    }
                    Op::Throttle | Op::Unthrottle => {
                        m.open.retain(|h| h.2 > now);
                        let t = AdminThrottle { account: u.clone(), by: "prop".into(), why: "test".into(), key: k("t") };
                        let r = if matches!(op, Op::Throttle) { store.throttle(t).await } else { store.unthrottle(t).await }.unwrap();
                        match &r {
                            Ok(_) => {}
                            Err(Rejection::AlreadyThrottled | Rejection::NotThrottled) => {}
                            Err(other) => prop_assert!(false, "{other:?}"),
                        }
                        r.map(|_| ())
                    }
                    Op::CostReset => {
                        m.open.retain(|h| h.2 > now);
                        jobs::cost_reset(&*store).await.unwrap();
                        Ok(())
                    }
                };
                let after = (store.cost(&u).await.unwrap(), log_len(&*store, &u).await);
                if result.is_err() && !matches!(op, Op::Hold { .. }) {
                    prop_assert_eq!(&after, &before, "a rejection changed something");
                }
                let now = clock.now();
                let open_cost: i64 = m.open.iter().filter(|h| h.2 > now).map(|h| h.1).sum();
                let v = &after.0;
                prop_assert_eq!((v.day_cost_micros, v.month_cost_micros), (m.day(now.date_naive()), m.month(now.date_naive())));
                // Expired holds are returned lazily; the view counts them until a command runs.
                prop_assert!(v.held_cost_micros >= open_cost);
            }
            let report = store.verify().await.unwrap();
            prop_assert!(report.is_clean(), "{:?}", report.discrepancies);
            Ok(())
        })?;
    }
}

fn applied(r: Result<Outcome>) -> Effect {
    r.unwrap().unwrap().effect
}

async fn log_len(store: &dyn Store, a: &AccountId) -> usize {
    let mut q = HistoryQuery::new(a.clone());
    q.limit = 1000;
    store.history(&q).await.unwrap().entries.len()
}
