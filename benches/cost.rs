//! The admin summary on SQLite with 100,000 users and 10 million usage rows, against the
//! baseline of computing it from the usage log (what a store without per-user counters must
//! do: sum the month's usage per user, then join the users), measured in the same run.
//!
//! `cargo bench --bench cost` prints criterion's figures and then a line with both medians and
//! their ratio. The database is built once through the library (accounts, plans, memberships,
//! one metered operation per user) plus the usage rows in bulk, and kept in
//! `target/bench-data/` for the month it was built in. Under `cargo test --all-targets` the
//! bench runs once on 1,000 users and 10,000 rows (`PRPM_BENCH_USERS` and
//! `PRPM_BENCH_USAGE_ROWS` override both).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{Datelike, Utc};
use criterion::Criterion;
use futures_util::future::join_all;
use prpm_playground_core::conformance::{acct, key, meter_cmd};
use prpm_playground_core::*;
use rusqlite::{Connection, params};

fn user(i: u64) -> AccountId {
    acct(&format!("user-{i:07}"))
}

/// 60 % individual, 30 % org members, 10 % free, as in the seed's scenario; a spread of costs
/// (a few cents to a few dollars, so every risk level occurs).
async fn build(path: &Path, users: u64, usage_rows: u64) {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_with(SqliteOptions::file(path).synchronous(Synchronous::Normal)).unwrap());
    let t0 = Instant::now();
    let period_end = Utc::now() + chrono::Duration::days(20);
    for chunk in (0..users).collect::<Vec<_>>().chunks(2_000) {
        let ops = chunk.iter().map(|&i| {
            let store = store.clone();
            async move {
                let u = user(i);
                store.create_account(u.clone(), AccountKind::User, key(&format!("c{i}"))).await.unwrap().unwrap();
                if i % 10 < 9 {
                    let plan = PlanTerms { monthly_credits: 100, period_end, anchor_day: None };
                    store.set_plan(u.clone(), Some(plan), key(&format!("p{i}"))).await.unwrap().unwrap();
                }
                if (6..9).contains(&(i % 10)) {
                    store.set_cost_profile(u.clone(), true, None, key(&format!("o{i}"))).await.unwrap().unwrap();
                }
                // Up to $0.99: under every tier's daily limit but the free tier's, which a
                // meter may pass (it is never refused) and get the user throttled.
                let cost = 10_000 * (1 + (i * 7_919) % 99) as i64;
                store.meter(meter_cmd(&u, cost, &format!("m{i}"))).await.unwrap().unwrap();
            }
        });
        join_all(ops).await;
    }
    eprintln!("{users} users through the library in {:.1?}", t0.elapsed());
    drop(store);
    let t0 = Instant::now();
    let conn = Connection::open(path).unwrap();
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -1000000;").unwrap();
    let month_start_ms = Utc::now().with_day(1).unwrap().date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_millis();
    let now_ms = Utc::now().timestamp_millis();
    let have: i64 = conn.query_row("SELECT count(*) FROM usage_records", [], |r| r.get(0)).unwrap();
    let n = usage_rows.saturating_sub(have as u64) as i64;
    // Usage rows of this month, each user's costs summing to what its counter holds is not
    // needed: the summary must not read them at all.
    conn.execute(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?1)
         INSERT INTO usage_records (entry_id, account_id, at_ms, operation, model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, credits, cost_micros)
         SELECT 1000000000 + x, 1 + (x % ?2), ?3 + (x % (?4 - ?3 + 1)), 'playground_run', 'claude-sonnet-4-5', 1200, 400, 0, 0, 1, 9600 FROM c",
        params![n, users as i64, month_start_ms, now_ms],
    )
    .unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
    drop(conn);
    std::fs::File::open(path).unwrap().sync_all().unwrap();
    eprintln!("{n} usage rows in bulk in {:.1?}", t0.elapsed());
}

/// The baseline: the summary from the usage log, as the seed's original computes it.
fn summary_from_usage_log(conn: &Connection, tiers: &cost::TierTable) -> cost::Summary {
    let month_start_ms = Utc::now().with_day(1).unwrap().date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_millis();
    let mut stmt = conn
        .prepare_cached(
            "SELECT a.kind, a.plan_credits IS NOT NULL, a.org_member, a.tier_override, a.throttle IS NOT NULL, COALESCE(u.cost, 0)
             FROM accounts a LEFT JOIN (SELECT account_id, sum(cost_micros) AS cost FROM usage_records WHERE at_ms >= ?1 GROUP BY account_id) u
               ON u.account_id = a.id",
        )
        .unwrap();
    let mut rows = stmt.query([month_start_ms]).unwrap();
    let mut users = Vec::new();
    while let Some(r) = rows.next().unwrap() {
        let kind = if r.get::<_, String>(0).unwrap() == "user" { AccountKind::User } else { AccountKind::Organisation };
        let plan: bool = r.get(1).unwrap();
        let tier_override: Option<String> = r.get(3).unwrap();
        let tier = ledger::rules::account_tier(kind, plan, r.get(2).unwrap(), tier_override.as_deref()).to_owned();
        let throttled: bool = r.get(4).unwrap();
        let month_cost_micros: i64 = r.get(5).unwrap();
        let limits = tiers.get(&tier).unwrap();
        let risk = if throttled || limits.monthly_cost_limit_micros.is_some_and(|l| month_cost_micros * 10 >= l * 9) {
            cost::RiskLevel::HighRisk
        } else {
            cost::RiskLevel::Low
        };
        users.push(cost::UserCost { tier, plan_active: plan, month_cost_micros, throttled, risk });
    }
    cost::summarize(tiers, &users).unwrap()
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let env = |name: &str, full: u64, small: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(if bench_mode { full } else { small });
    let users = env("PRPM_BENCH_USERS", 100_000, 1_000);
    let usage_rows = env("PRPM_BENCH_USAGE_ROWS", 10_000_000, 10_000);
    let data_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("bench-data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let month = Utc::now().format("%Y%m");
    let path = data_dir.join(format!("cost-{month}-{users}-{usage_rows}.db"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if !path.exists() {
        let tmp = path.with_extension("building");
        let _ = std::fs::remove_file(&tmp);
        rt.block_on(build(&tmp, users, usage_rows));
        std::fs::rename(&tmp, &path).unwrap();
    }
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    let tiers = rt.block_on(store.tiers()).unwrap();

    let ours = rt.block_on(store.summary()).unwrap();
    let naive = summary_from_usage_log(&conn, &tiers);
    assert_eq!(ours.users, users);
    assert_eq!((naive.users, naive.total_monthly_revenue_micros), (ours.users, ours.total_monthly_revenue_micros));
    eprintln!(
        "summary: {} users, {} active, {} throttled, {} high risk, revenue ${}, cost ${}, margin {:?} %",
        ours.users,
        ours.active_users,
        ours.throttled_users,
        ours.high_risk_users,
        cost::micros_to_usd(ours.total_monthly_revenue_micros).round_dp(2),
        cost::micros_to_usd(ours.total_monthly_cost_micros).round_dp(2),
        ours.overall_margin_pct
    );

    let mut c = Criterion::default().configure_from_args().sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    let mut g = c.benchmark_group("sqlite_summary");
    g.bench_function(format!("summary_{users}_users"), |b| b.iter(|| rt.block_on(store.summary()).unwrap()));
    g.bench_function(format!("baseline_from_{usage_rows}_usage_rows"), |b| b.iter(|| summary_from_usage_log(&conn, &tiers)));
    g.finish();
    c.final_summary();

    if bench_mode {
        // Medians of a few plain runs of each, for the ratio line.
        let median = |f: &dyn Fn()| {
            let mut t: Vec<Duration> = (0..7)
                .map(|_| {
                    let t0 = Instant::now();
                    f();
                    t0.elapsed()
                })
                .collect();
            t.sort();
            t[3]
        };
        let ours_t = median(&|| {
            rt.block_on(store.summary()).unwrap();
        });
        let base_t = median(&|| {
            summary_from_usage_log(&conn, &tiers);
        });
        println!(
            "summary over {users} users: {:.1} ms; baseline from {usage_rows} usage rows: {:.1} ms; ratio {:.1}x faster (target: under 200 ms)",
            ours_t.as_secs_f64() * 1e3,
            base_t.as_secs_f64() * 1e3,
            base_t.as_secs_f64() / ours_t.as_secs_f64()
        );
    }
}
