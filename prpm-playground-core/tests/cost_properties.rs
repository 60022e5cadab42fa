//! Properties of the cost-control rules over random sequences of requests and settles.

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use prpm_playground_core::cost::*;

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 30, 22, 0, 0).unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    /// Advance the clock by this many ms, then try to admit a run with this worst case.
    Admit {
        gap_ms: i64,
        worst_micros: i64,
    },
    /// Settle the oldest admitted run at this share (percent, up to 150) of its worst case.
    Settle {
        pct: i64,
    },
    Release,
    Meter {
        cost_micros: i64,
    },
}

/// Gaps that often add up to exactly an hour, or an hour give or take a millisecond.
fn gap() -> impl Strategy<Value = i64> {
    prop_oneof![
        1 => 0i64..900_000,
        2 => prop::sample::select(vec![0, 1, 299_999, 300_000, 300_001, 3_599_999, 3_600_000]),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (gap(), prop_oneof![1 => 0i64..60_000, 3 => Just(0i64)]).prop_map(|(gap_ms, worst_micros)| Op::Admit { gap_ms, worst_micros }),
        2 => (0i64..150).prop_map(|pct| Op::Settle { pct }),
        1 => Just(Op::Release),
        1 => (0i64..20_000).prop_map(|cost_micros| Op::Meter { cost_micros }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The window is exact: in no hour (a half-open interval ending at an admission) are more
    /// than `limit` runs admitted, and a run refused for the rate had exactly `limit` admitted
    /// in the hour before it, the oldest of which leaves when the refusal says.
    /// Cost: admitted worst cases plus spent never pass a limit at admission, held is never
    /// negative, and each alert kind fires at most once per month.
    #[test]
    fn limits_hold(ops in prop::collection::vec(op(), 1..200), tier in prop::sample::select(vec![FREE, PRPM_PLUS_INDIVIDUAL, PRPM_PLUS_ORG])) {
        let limits = TierTable::default().get(tier).unwrap().clone();
        let limit = limits.hourly_request_limit.unwrap() as usize;
        let mut s = CostState::default();
        let mut now = start();
        let mut admitted_at: Vec<i64> = Vec::new();
        let mut open: std::collections::VecDeque<i64> = Default::default();
        let mut alerts: Vec<(AlertKind, chrono::NaiveDate)> = Vec::new();
        for op in ops {
            match op {
                Op::Admit { gap_ms, worst_micros } => {
                    now += Duration::milliseconds(gap_ms);
                    let t = now.timestamp_millis();
                    let in_hour = admitted_at.iter().filter(|&&a| a > t - REQUEST_WINDOW_MS).count();
                    let before = s.clone();
                    match s.admit(&limits, worst_micros, now).unwrap() {
                        Ok(()) => {
                            prop_assert!(in_hour < limit, "admitted with {in_hour} in the hour");
                            admitted_at.push(t);
                            open.push_back(worst_micros);
                            prop_assert!(s.day_cost_micros + s.held_cost_micros <= limits.daily_cost_limit_micros.unwrap());
                            prop_assert!(s.month_cost_micros + s.held_cost_micros <= limits.monthly_cost_limit_micros.unwrap());
                        }
                        Err(r) => {
                            prop_assert_eq!(&s, &before, "a refusal changes nothing");
                            if let Refusal::RateLimited { retry_after_ms, .. } = r {
                                prop_assert_eq!(in_hour, limit);
                                let oldest = admitted_at.iter().copied().filter(|&a| a > t - REQUEST_WINDOW_MS).min().unwrap();
                                prop_assert_eq!(retry_after_ms, oldest + REQUEST_WINDOW_MS - t);
                            } else {
                                prop_assert!(in_hour < limit || matches!(r, Refusal::Throttled(_)), "{r:?} while the window was full");
                            }
                        }
                    }
                }
                Op::Settle { pct } => {
                    if let Some(worst) = open.pop_front() {
                        let ev = s.settle(&limits, worst, worst * pct / 100, now).unwrap();
                        alerts.extend(ev.alerts.iter().map(|a| (a.kind, a.month)));
                    }
                }
                Op::Release => {
                    if let Some(worst) = open.pop_front() {
                        s.release(worst).unwrap();
                    }
                }
                Op::Meter { cost_micros } => {
                    let ev = s.settle(&limits, 0, cost_micros, now).unwrap();
                    alerts.extend(ev.alerts.iter().map(|a| (a.kind, a.month)));
                }
            }
            prop_assert_eq!(s.held_cost_micros, open.iter().sum::<i64>());
            prop_assert!(s.requests_ms.len() <= limit);
        }
        let mut unique = alerts.clone();
        unique.sort();
        unique.dedup();
        prop_assert_eq!(unique.len(), alerts.len(), "an alert fired twice: {:?}", alerts);
    }
}
