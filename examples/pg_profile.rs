//! Where a PostgreSQL spend's time goes: starts a throw-away cluster with `pg_stat_statements`
//! loaded, seeds 1,000 accounts and a hot one, then runs three shapes (one caller; 32 callers
//! over the 1,000 accounts; 32 callers on the hot account) and prints, for each, the spends per
//! second, the batches, the CPU time per spend of this process and of the server's processes,
//! and the server's execution time per statement.
//!
//! ```text
//! cargo run --release --example pg_profile
//! PRPM_PG_LANES=4 cargo run --release --example pg_profile   # another lane count
//! PRPM_PROFILE_SHAPE=one cargo run --release --example pg_profile   # one shape (`one`, `spread`, `hot`)
//! PRPM_PROFILE_SPENDS=2400 cargo run --release --example pg_profile   # runs as short as the bench's rounds
//! PRPM_PROFILE_SLOW_US=5000 cargo run --release --example pg_profile   # print each spend that took 5 ms or more
//! ```

use std::sync::Arc;
use std::time::Instant;

use prpm_playground_core::conformance::{acct, key, usage_of};
use prpm_playground_core::pg_cluster::PgCluster;
use prpm_playground_core::store::postgres::{PgOptions, PgStore};
use prpm_playground_core::*;

const ACCOUNTS: usize = 1_000;

/// CPU time (user + system, in clock ticks of 10 ms) of the processes `stat` files describe.
fn cpu_ticks(stat: &str) -> u64 {
    // After the command name in parentheses: state is field 0, utime 11, stime 12.
    let f: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0) + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

fn server_ticks() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "postgres"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .map(|s| cpu_ticks(&s))
        .sum()
}

/// The machine's (busy, all) CPU ticks since boot, from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let all: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (all - idle, all)
}

fn main() {
    // Set before any thread exists (the runtime is built below).
    let opts = std::env::var("PRPM_PG_SERVER_OPTS").unwrap_or_default();
    unsafe { std::env::set_var("PRPM_PG_SERVER_OPTS", format!("{opts} -c shared_preload_libraries=pg_stat_statements")) };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run());
}

async fn run() {
    let cluster = PgCluster::start().expect("a PostgreSQL cluster").expect("PostgreSQL installed");
    let url = cluster.create_database().await.unwrap();
    let mut opts = PgOptions::new(url.clone()).pool_size(32);
    // `PRPM_PG_LANES=n` to compare lane counts.
    if let Some(lanes) = std::env::var("PRPM_PG_LANES").ok().and_then(|v| v.parse().ok()) {
        opts.lanes = lanes;
    }
    let pg = Arc::new(PgStore::open(opts).await.unwrap());
    let store: Arc<dyn Store> = pg.clone();
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    db.batch_execute("CREATE EXTENSION pg_stat_statements").await.unwrap();
    let name = |i: usize| if i == ACCOUNTS { acct("hot") } else { acct(&format!("acct-{i:05}")) };
    for i in 0..=ACCOUNTS {
        store.create_account(name(i), AccountKind::User, key(&format!("create-{i}"))).await.unwrap().unwrap();
        store.set_cost_profile(name(i), false, Some("unlimited".into()), key(&format!("unlimited-{i}"))).await.unwrap().unwrap();
        let g = Grant {
            account: name(i),
            bucket: Bucket::Purchased,
            amount: 1_000_000_000,
            source: GrantSource::Admin,
            expires_at: None,
            reference: "profile".into(),
            key: key(&format!("grant-{i}")),
        };
        store.grant(g).await.unwrap().unwrap();
    }
    eprintln!("seeded {} accounts", ACCOUNTS + 1);
    // `PRPM_PROFILE_REPEAT=n` runs each shape n times (the machine's speed drifts).
    let repeat = std::env::var("PRPM_PROFILE_REPEAT").ok().and_then(|v| v.parse().ok()).unwrap_or(1usize);
    // `PRPM_PROFILE_CALLERS=n`: another number of callers over the 1,000 accounts.
    let spread_callers = std::env::var("PRPM_PROFILE_CALLERS").ok().and_then(|v| v.parse().ok()).unwrap_or(32usize);
    // `PRPM_PROFILE_SPENDS=n`: n spends per run of the spread and hot shapes (the bench's
    // interleaved rounds make 2,400).
    let many = std::env::var("PRPM_PROFILE_SPENDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000usize);
    // `PRPM_PROFILE_SLOW_US=n`: print each spend that took n µs or more (when, and whose).
    let slow_us: Option<u64> = std::env::var("PRPM_PROFILE_SLOW_US").ok().and_then(|v| v.parse().ok());
    let shapes = [
        ("one", "one caller", 1usize, 2_000usize, false),
        ("spread", "32 callers, 1,000 accounts", spread_callers, many, false),
        ("hot", "32 callers, one hot account", 32, many, true),
        ("baseline", "the bench's baseline, one caller", 1, 2_000, false),
    ];
    for (short, shape, callers, spends, hot) in shapes.into_iter().flat_map(|s| std::iter::repeat_n(s, if s.0 == "baseline" { 1 } else { repeat })) {
        // `PRPM_PROFILE_SHAPE=one` (or `spread`, `hot`) runs that shape alone.
        if std::env::var("PRPM_PROFILE_SHAPE").is_ok_and(|only| only != short) {
            continue;
        }
        db.batch_execute("SELECT pg_stat_statements_reset()").await.unwrap();
        let stats0 = pg.batch_stats();
        let (own0, server0, machine0) = (cpu_ticks(&std::fs::read_to_string("/proc/self/stat").unwrap()), server_ticks(), machine_ticks());
        let lsn0: String = db.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
        let t0 = Instant::now();
        let per = spends / callers;
        if short == "baseline" {
            baseline(&db, per).await;
        }
        let tasks: Vec<_> = (0..callers)
            .filter(|_| short != "baseline")
            .map(|c| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut latencies_us = Vec::with_capacity(per);
                    for i in 0..per {
                        let account = if hot { name(ACCOUNTS) } else { name((c * 7919 + i * 104_729) % ACCOUNTS) };
                        let s = Spend { account, amount: 1, usage: Some(usage_of(9_600)), reference: "profile".into(), key: IdempotencyKey::generate() };
                        let started = Instant::now();
                        store.spend(s).await.unwrap().unwrap();
                        let took_us = started.elapsed().as_micros() as u64;
                        if slow_us.is_some_and(|slow| took_us >= slow) {
                            eprintln!("   slow: caller {c}, spend {i}, sent {} us into the run, took {took_us} us", (started - t0).as_micros());
                        }
                        latencies_us.push(took_us);
                    }
                    (t0.elapsed(), latencies_us)
                })
            })
            .collect();
        let (mut finished, mut latencies_us) = (Vec::new(), Vec::new());
        for t in tasks {
            let (done, l) = t.await.unwrap();
            finished.push(done);
            latencies_us.extend(l);
        }
        let wall = t0.elapsed();
        finished.sort();
        latencies_us.sort_unstable();
        let (own1, server1, machine1) = (cpu_ticks(&std::fs::read_to_string("/proc/self/stat").unwrap()), server_ticks(), machine_ticks());
        let lsn1: String = db.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
        let wal_bytes: f64 = db.query_one("SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)::float8", &[&lsn1, &lsn0]).await.unwrap().get(0);
        let batches = (pg.batch_stats().batches - stats0.batches).max(1);
        let n = (per * callers) as f64;
        let st = pg.batch_stats();
        println!(
            "\n== {shape}: {:.0} spends/s, {batches} batches ({:.1} spends each; {} unlocked, {} stale, {} with ids from the block)",
            n / wall.as_secs_f64(),
            n / batches as f64,
            st.unlocked_batches - stats0.unlocked_batches,
            st.stale_batches - stats0.stale_batches,
            st.block_batches - stats0.block_batches
        );
        if let (Some(first), Some(half)) = (finished.first(), finished.get(finished.len() / 2)) {
            // How long the last callers ran without the others (a round's tail).
            println!(
                "   callers finished: first at {:.1} ms, half at {:.1} ms, last at {:.1} ms",
                first.as_secs_f64() * 1e3,
                half.as_secs_f64() * 1e3,
                wall.as_secs_f64() * 1e3
            );
        }
        if let Some(max) = latencies_us.last() {
            let q = |p: usize| latencies_us[(latencies_us.len() - 1) * p / 100];
            println!("   a spend's latency: p50 {} us, p90 {} us, p99 {} us, max {max} us", q(50), q(90), q(99));
        }
        println!("   WAL per spend: {:.0} bytes (from {lsn0} to {lsn1})", wal_bytes / n);
        if std::env::var("PRPM_PROFILE_WAL").is_ok() {
            db.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect").await.unwrap();
            let rows = db
                .query(
                    "SELECT \"resource_manager/record_type\", count, record_size::float8, fpi_size::float8 FROM pg_get_wal_stats($1::text::pg_lsn, $2::text::pg_lsn, true)
                     WHERE count > 0 ORDER BY record_size + fpi_size DESC LIMIT 14",
                    &[&lsn0, &lsn1],
                )
                .await
                .unwrap();
            for r in rows {
                let (t, c, rs, fs): (String, i64, f64, f64) = (r.get(0), r.get(1), r.get(2), r.get(3));
                println!("     {t:<28} {:>6.2} per spend, {:>6.0} record + {:>6.0} page-image bytes per spend", c as f64 / n, rs / n, fs / n);
            }
        }
        if let Some(why) = &st.last_failure {
            println!("   last failed or stale batch: {why}");
        }
        println!(
            "   CPU per spend: this process {:.0} us, the server's processes {:.0} us, the whole machine {:.0} us ({:.0}% busy)",
            (own1 - own0) as f64 * 10_000.0 / n,
            server1.saturating_sub(server0) as f64 * 10_000.0 / n,
            (machine1.0 - machine0.0) as f64 * 10_000.0 / n,
            (machine1.0 - machine0.0) as f64 * 100.0 / (machine1.1 - machine0.1).max(1) as f64
        );
        let rows = db
            .query(
                "SELECT calls, total_exec_time, left(regexp_replace(query, '\\s+', ' ', 'g'), 80), plans, total_plan_time FROM pg_stat_statements
                 WHERE query NOT LIKE '%pg_stat_statements%' ORDER BY total_exec_time DESC LIMIT 14",
                &[],
            )
            .await
            .unwrap();
        let mut total_ms = 0.0;
        for r in &rows {
            let (calls, ms, q, plans, plan_ms): (i64, f64, String, i64, f64) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            total_ms += ms;
            println!("   {calls:>6} calls {:>7.1} us per spend  {q}", ms * 1000.0 / n);
            if plans > 0 {
                // With `-c pg_stat_statements.track_planning=on` in PRPM_PG_SERVER_OPTS.
                println!("          {plans} plans, {:.1} us per spend planning", plan_ms * 1000.0 / n);
            }
        }
        println!("   statement execution: {:.1} us per spend", total_ms * 1000.0 / n);
        // Whether account updates stay on their page (HOT: no new index entries). The counts
        // are cumulative and reach the statistics within a second or so.
        tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
        let r = db.query_one("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'accounts'", &[]).await.unwrap();
        println!("   account updates so far: {}, of them HOT {}", r.get::<_, i64>(0), r.get::<_, i64>(1));
    }
    // An account's usage page on the grown tables: its log walked newest first by index, each
    // entry's record found by its key (see migration V9).
    let plan = db.query(&format!("EXPLAIN {}", prpm_playground_core::store::postgres::USAGE_PAGE_SQL), &[&5i64, &50i64, &i64::MAX]).await.unwrap();
    println!("\nan account's usage page:");
    for r in plan {
        println!("   {}", r.get::<_, String>(0));
    }
    let report = store.verify().await.unwrap();
    assert!(report.is_clean(), "{:?}", report.discrepancies);
}

/// `n` spends the way `benches/postgres.rs`'s baseline makes them (one transaction of a locked
/// read, an update and two inserts, prepared statements, one round trip each), on one account.
async fn baseline(db: &tokio_postgres::Client, n: usize) {
    db.batch_execute(
        "CREATE TABLE b_credits (account_id TEXT PRIMARY KEY, monthly BIGINT NOT NULL, rollover BIGINT NOT NULL, purchased BIGINT NOT NULL);
         CREATE TABLE b_transactions (id BIGSERIAL PRIMARY KEY, account_id TEXT NOT NULL, at TIMESTAMPTZ NOT NULL, kind TEXT NOT NULL,
             d_monthly BIGINT NOT NULL, d_rollover BIGINT NOT NULL, d_purchased BIGINT NOT NULL, balance_after BIGINT NOT NULL, reference TEXT NOT NULL);
         CREATE INDEX b_transactions_by_account ON b_transactions (account_id, id);
         CREATE TABLE b_usage (id BIGSERIAL PRIMARY KEY, account_id TEXT NOT NULL, at TIMESTAMPTZ NOT NULL, model TEXT NOT NULL,
             input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL, credits BIGINT NOT NULL, cost_micros BIGINT NOT NULL);
         CREATE INDEX b_usage_by_account ON b_usage (account_id, id);
         INSERT INTO b_credits VALUES ('b', 0, 0, 1000000000);",
    )
    .await
    .unwrap();
    let select = db.prepare("SELECT monthly, rollover, purchased FROM b_credits WHERE account_id = $1 FOR UPDATE").await.unwrap();
    let update = db.prepare("UPDATE b_credits SET monthly = $2, rollover = $3, purchased = $4 WHERE account_id = $1").await.unwrap();
    let log = db
        .prepare(
            "INSERT INTO b_transactions (account_id, at, kind, d_monthly, d_rollover, d_purchased, balance_after, reference) VALUES ($1, $2, 'spend', $3, $4, $5, $6, 'bench')",
        )
        .await
        .unwrap();
    let use_row = db
        .prepare("INSERT INTO b_usage (account_id, at, model, input_tokens, output_tokens, credits, cost_micros) VALUES ($1, $2, $3, $4, $5, $6, $7)")
        .await
        .unwrap();
    let a = "b";
    for _ in 0..n {
        db.batch_execute("BEGIN").await.unwrap();
        let r = db.query_one(&select, &[&a]).await.unwrap();
        let (m, ro, p): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
        db.execute(&update, &[&a, &m, &ro, &(p - 1)]).await.unwrap();
        let now = chrono::Utc::now();
        db.execute(&log, &[&a, &now, &0i64, &0i64, &-1i64, &(m + ro + p - 1)]).await.unwrap();
        db.execute(&use_row, &[&a, &now, &"claude-sonnet-4-5", &1_200i64, &400i64, &1i64, &9_600i64]).await.unwrap();
        db.batch_execute("COMMIT").await.unwrap();
    }
}
