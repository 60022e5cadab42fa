//! The PostgreSQL schema on a real, throw-away cluster (see `pg_cluster`): migrations applied
//! once under an advisory lock by nodes starting together, the seeded tiers, the append-only
//! log, and refusing a newer schema. Skips with one line when PostgreSQL is not installed,
//! unless `PRPM_REQUIRE_POSTGRES=1` (CI), where a missing PostgreSQL fails.

use prpm_playground_core::cost::TierTable;
use prpm_playground_core::pg_cluster::PgCluster;
use prpm_playground_core::store::postgres;

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

#[test]
fn postgres_schema() {
    let Some(cluster) = shared_cluster() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        // Four nodes start at once on a fresh database: one migrates, the others find it done.
        let url = cluster.create_database().await.unwrap();
        let nodes = (0..4).map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut c = connect(&url).await;
                postgres::migrate(&mut c).await.unwrap()
            })
        });
        let applied: Vec<Vec<i64>> = futures_util::future::join_all(nodes).await.into_iter().map(|r| r.unwrap()).collect();
        let mut applied_by: Vec<_> = applied.iter().filter(|a| !a.is_empty()).collect();
        assert_eq!(applied_by.len(), 1, "exactly one node migrates: {applied:?}");
        assert_eq!(applied_by.pop().unwrap().last(), Some(&postgres::supported_version()));

        let mut c = connect(&url).await;
        assert!(postgres::migrate(&mut c).await.unwrap().is_empty(), "a second run applies nothing");

        // The tiers are the spec's (read through the store, as every node reads them).
        let tiers = PgStore::open(PgOptions::new(url.clone())).await.unwrap().tiers().await.unwrap();
        assert_eq!(tiers, TierTable::default());

        // The log is append-only.
        c.batch_execute(
            "INSERT INTO accounts (external_id, kind, monthly, rollover, purchased, held, created_at, updated_at) VALUES ('u', 'user', 0, 0, 5, 0, now(), now());
             INSERT INTO ledger_entries (account_id, at, kind, d_monthly, d_rollover, d_purchased, d_held, balance_after, held_after, reference)
                 SELECT id, now(), 'grant', 0, 0, 5, 0, 5, 0, 'signup' FROM accounts;",
        )
        .await
        .unwrap();
        for sql in ["UPDATE ledger_entries SET d_purchased = 500", "DELETE FROM ledger_entries"] {
            let e = c.batch_execute(sql).await.unwrap_err();
            let message = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
            assert!(message.contains("append-only"), "{sql}: {e:?}");
        }

        // A database migrated by a newer version is refused, untouched.
        c.batch_execute("INSERT INTO refinery_schema_history (version, name, applied_on, checksum) VALUES (99, 'from_the_future', '2030-01-01T00:00:00Z', '1')")
            .await
            .unwrap();
        match postgres::migrate(&mut c).await {
            Err(Error::SchemaTooNew { found: 99, supported }) => assert_eq!(supported, postgres::supported_version()),
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Many nodes: processes, jobs, faults

use std::sync::Arc;

use prpm_playground_core::conformance::{acct, cost_hold, create_free_user, create_user, grant, meter_cmd, spend_cmd};
use prpm_playground_core::store::postgres::{PgOptions, PgStore};
use prpm_playground_core::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Skips (one line) without PostgreSQL, unless CI requires it.
fn shared_cluster() -> Option<&'static PgCluster> {
    match PgCluster::shared() {
        Ok(Some(c)) => Some(c),
        Ok(None) => {
            eprintln!("SKIPPED: PostgreSQL is not installed here (CI installs it and sets PRPM_REQUIRE_POSTGRES=1)");
            None
        }
        Err(e) => panic!("cannot start a PostgreSQL cluster: {e}"),
    }
}

/// Two nodes (two stores, two pools) running the same jobs at the same moment do the work once.
#[test]
fn two_nodes_run_each_job_once() {
    let Some(cluster) = shared_cluster() else { return };
    let rt = rt();
    rt.block_on(async {
        let url = cluster.create_database().await.unwrap();
        let clock = Arc::new(ManualClock::new(conformance::start()));
        let a: Arc<dyn Store> = Arc::new(PgStore::open(PgOptions::new(url.clone()).clock(clock.clone())).await.unwrap());
        let b: Arc<dyn Store> = Arc::new(PgStore::open(PgOptions::new(url).clock(clock.clone())).await.unwrap());
        for i in 0..40 {
            let u = create_user(&*a, &format!("u{i}")).await;
            let plan = PlanTerms { monthly_credits: 10, period_end: clock.now() + chrono::Duration::days(1), anchor_day: None };
            a.set_plan(u.clone(), Some(plan), conformance::key(&format!("p{i}"))).await.unwrap().unwrap();
            b.hold(cost_hold(&u, 1, 10, &format!("h{i}"))).await.unwrap().unwrap();
            b.meter(meter_cmd(&u, 1_000, &format!("m{i}"))).await.unwrap().unwrap();
        }
        clock.advance(chrono::Duration::days(2));
        let (x, y) = tokio::join!(jobs::expire_holds(&*a), jobs::expire_holds(&*b));
        assert_eq!(x.unwrap().applied + y.unwrap().applied, 40);
        let (x, y) = tokio::join!(jobs::monthly_rollover(&*a), jobs::monthly_rollover(&*b));
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_eq!(x.applied + y.applied, 40);
        assert_eq!((x.failed, y.failed), (0, 0));
        let (x, y) = tokio::join!(jobs::cost_reset(&*a), jobs::cost_reset(&*b));
        assert_eq!(x.unwrap().applied + y.unwrap().applied, 40);
        let (x, y) = tokio::join!(jobs::refresh_analytics(&*a), jobs::refresh_analytics(&*b));
        assert_eq!(x.unwrap().usage_records + y.unwrap().usage_records, 40);
        for i in 0..40 {
            let bal = a.balance(&acct(&format!("u{i}"))).await.unwrap();
            assert_eq!((bal.monthly, bal.held), (10, 0), "one allocation, hold returned once");
        }
        let report = a.verify().await.unwrap();
        assert!(report.is_clean(), "{:?}", report.discrepancies);
    });
}

/// Faults: an unreachable database is a clear error at start; a connection killed in the middle
/// of work fails those operations cleanly (or they completed), never half-applied; a database
/// of a newer schema refuses to start.
#[test]
fn faults_fail_cleanly() {
    let Some(cluster) = shared_cluster() else { return };
    let rt = rt();
    rt.block_on(async {
        // Nothing listens on this port.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("host=127.0.0.1 port={free} user=postgres dbname=postgres connect_timeout=2");
        match PgStore::open(PgOptions::new(url)).await {
            Err(e) => assert_eq!(e.code(), "backend", "{e}"),
            Ok(_) => panic!("opened a database that is not there"),
        }
        assert!(matches!(PgStore::open(PgOptions::new("not a url ===")).await, Err(Error::InvalidInput { .. })));

        // Kill every connection of the store while 200 spends are in flight.
        let url = cluster.create_database().await.unwrap();
        let store: Arc<dyn Store> = Arc::new(PgStore::open(PgOptions::new(url.clone()).pool_size(8)).await.unwrap());
        let u = create_user(&*store, "u").await;
        grant(&*store, &u, Bucket::Purchased, 995, None, "g").await;
        let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let spends = (0..200).map(|i| {
            let store = store.clone();
            let u = u.clone();
            tokio::spawn(async move { store.spend(spend_cmd(&u, 1, &format!("s{i}"))).await })
        });
        let killer = async {
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            admin
                .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()", &[])
                .await
                .unwrap()
        };
        let (results, killed) = tokio::join!(futures_util::future::join_all(spends), killer);
        assert!(killed > 0, "no connection was terminated");
        let (mut ok, mut failed) = (0i64, 0);
        for r in results {
            match r.unwrap() {
                Ok(Ok(_)) => ok += 1,
                Err(e) => {
                    assert_eq!(e.code(), "backend", "{e}");
                    failed += 1;
                }
                Ok(Err(other)) => panic!("{other:?}"),
            }
        }
        eprintln!("connections killed: {killed}; spends applied {ok}, failed {failed}");
        // Every spend that said so was applied; one whose connection died may have committed
        // or not (the client cannot know), never half: retries with the same keys then apply
        // each exactly once.
        let applied = 1_000 - store.balance(&u).await.unwrap().total;
        assert!((ok..=ok + failed).contains(&applied), "{applied} applied, {ok} said so, {failed} failed");
        for i in 0..200 {
            store.spend(spend_cmd(&u, 1, &format!("s{i}"))).await.unwrap().unwrap();
        }
        assert_eq!(store.balance(&u).await.unwrap().total, 800);
        let report = store.verify().await.unwrap();
        assert!(report.is_clean(), "{:?}", report.discrepancies);

        // A newer schema: refused at open.
        admin
            .batch_execute(
                "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) VALUES (99, 'from_the_future', '2030-01-01T00:00:00Z', '1')",
            )
            .await
            .unwrap();
        assert!(matches!(PgStore::open(PgOptions::new(url)).await, Err(Error::SchemaTooNew { found: 99, .. })));
    });
}

/// Alerts reach the pluggable sink once each, after they committed, as well as the table.
#[test]
fn alerts_reach_the_sink_once() {
    use prpm_playground_core::cost::{Alert, AlertKind, AlertSink};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, AlertKind, i64)>>);
    impl AlertSink for Recorder {
        fn alert(&self, account: &AccountId, alert: &Alert) {
            self.0.lock().unwrap().push((account.to_string(), alert.kind, alert.cost_micros));
        }
    }
    let Some(cluster) = shared_cluster() else { return };
    rt().block_on(async {
        let url = cluster.create_database().await.unwrap();
        let sink = Arc::new(Recorder::default());
        let clock = Arc::new(ManualClock::new(conformance::start()));
        let s: Arc<dyn Store> = Arc::new(PgStore::open(PgOptions::new(url).clock(clock.clone()).alert_sink(sink.clone())).await.unwrap());
        let u = create_free_user(&*s, "u").await;
        for d in 0..6 {
            let m = meter_cmd(&u, 90_000, &format!("m{d}"));
            s.meter(m.clone()).await.unwrap().unwrap();
            assert!(s.meter(m).await.unwrap().unwrap().replayed);
            clock.advance(chrono::Duration::days(1));
        }
        let got = sink.0.lock().unwrap().clone();
        assert_eq!(got, vec![("u".to_string(), AlertKind::AtRisk, 450_000), ("u".to_string(), AlertKind::Threshold, 450_000)]);
        assert_eq!(s.alerts(&store::AlertQuery { account: None, after: None, limit: 10 }).await.unwrap().len(), 2);
    });
}

/// Concurrent commands on one node commit in groups: 64 callers on one hot account and on
/// many accounts, every caller with its own exact outcome, no group failing.
#[test]
fn concurrent_commands_commit_in_groups() {
    let Some(cluster) = shared_cluster() else { return };
    rt().block_on(async {
        let url = cluster.create_database().await.unwrap();
        let store = Arc::new(PgStore::open(PgOptions::new(url).pool_size(8)).await.unwrap());
        let s: Arc<dyn Store> = store.clone();
        let hot = create_user(&*s, "hot").await;
        grant(&*s, &hot, Bucket::Purchased, 995, None, "g").await; // 1,000
        for i in 0..20 {
            let a = create_user(&*s, &format!("a{i}")).await;
            grant(&*s, &a, Bucket::Purchased, 95, None, &format!("g{i}")).await;
        }
        // 1,200 spends of 1 against 1,000 credits on the hot account, plus holds and settles
        // on the others, all at once.
        let spends = (0..1_200).map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.spend(spend_cmd(&acct("hot"), 1, &format!("s{i}"))).await.unwrap() })
        });
        let pairs = (0..200).map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let a = acct(&format!("a{}", i % 20));
                let h = match s.hold(cost_hold(&a, 2, 100, &format!("h{i}"))).await.unwrap().unwrap().effect {
                    Effect::Held { hold, .. } => hold,
                    other => panic!("{other:?}"),
                };
                s.settle(Settle { hold: h, credits: 1, usage: None, key: conformance::key(&format!("st{i}")) }).await.unwrap().unwrap()
            })
        });
        let (spent, _) = tokio::join!(futures_util::future::join_all(spends), futures_util::future::join_all(pairs));
        let ok = spent.iter().filter(|r| r.as_ref().unwrap().is_ok()).count();
        assert_eq!(ok, 1_000, "exactly the balance");
        for r in &spent {
            if let Err(rej) = r.as_ref().unwrap() {
                assert!(matches!(rej, Rejection::InsufficientCredits { available: 0, .. }), "{rej:?}");
            }
        }
        for i in 0..20 {
            let b = s.balance(&acct(&format!("a{i}"))).await.unwrap();
            assert_eq!((b.total, b.held), (90, 0));
        }
        let stats = store.batch_stats();
        eprintln!("{stats:?}");
        assert!(stats.batches > 0 && stats.batched_commands > stats.batches, "{stats:?}");
        assert_eq!(stats.failed_batches, 0, "{stats:?}");
        let report = s.verify().await.unwrap();
        assert!(report.is_clean(), "{:?}", report.discrepancies);
    });
}

/// `verify()` finds every figure edited behind the ledger's back and every forged log or usage
/// row.
#[test]
fn verify_reports_every_difference() {
    let Some(cluster) = shared_cluster() else { return };
    rt().block_on(async {
        let url = cluster.create_database().await.unwrap();
        let s: Arc<dyn Store> = Arc::new(PgStore::open(PgOptions::new(url.clone())).await.unwrap());
        let u = create_user(&*s, "u").await;
        create_user(&*s, "w").await;
        grant(&*s, &u, Bucket::Monthly, 10, None, "g").await;
        assert!(s.verify().await.unwrap().is_clean());
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.batch_execute(
            "UPDATE accounts SET purchased = purchased + 7 WHERE external_id = 'u';
             UPDATE accounts SET held = 3 WHERE external_id = 'w';
             UPDATE accounts SET held_cost_micros = 40 WHERE external_id = 'u';
             INSERT INTO ledger_entries (account_id, at, kind, d_monthly, d_rollover, d_purchased, d_held, balance_after, held_after, reference)
                 SELECT id, now(), 'grant', 1, 0, 0, 0, 999, 0, 'forged' FROM accounts WHERE external_id = 'w';
             INSERT INTO ledger_entries (id, account_id, at, kind, d_monthly, d_rollover, d_purchased, d_held, balance_after, held_after, reference,
                                         operation, model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_micros)
                 VALUES (424242, 999, now(), 'spend', -1, 0, 0, 0, 0, 0, 'forged', 'run', 'm', 1, 1, 0, 0, 1);",
        )
        .await
        .unwrap();
        let r = s.verify().await.unwrap();
        let mut found: Vec<(String, String, i64, i64)> =
            r.discrepancies.iter().map(|d| (d.account.to_string(), d.what.clone(), d.stored, d.from_log)).collect();
        found.sort();
        assert_eq!(
            found,
            vec![
                ("(no account with internal id 999)".into(), "log entries".into(), 1, 0),
                ("u".into(), "held cost (micro-USD) of open holds".into(), 40, 0),
                ("u".into(), "purchased".into(), 12, 5),
                ("w".into(), "entry balance_after".into(), 999, 6),
                ("w".into(), "held".into(), 3, 0),
                ("w".into(), "monthly".into(), 0, 1),
                ("w".into(), "open holds".into(), 3, 0),
            ]
        );
        assert_eq!(r.accounts, 2);
    });
}

/// A keyed command retried on another node while the first try waits on the account's row
/// lock: once the first commits, the retry replays its result, it is not decided again on the
/// state the first left (which would refuse a spend that succeeded). Both paths: a spend (the
/// batchers) and a refund (the single path).
#[test]
fn a_retry_on_another_node_replays_after_the_lock() {
    let Some(cluster) = shared_cluster() else { return };
    rt().block_on(async {
        let url = cluster.create_database().await.unwrap();
        let a: Arc<dyn Store> = Arc::new(PgStore::open(PgOptions::new(url.clone())).await.unwrap());
        let b: Arc<dyn Store> = Arc::new(PgStore::open(PgOptions::new(url.clone())).await.unwrap());
        let u = create_user(&*a, "u").await;
        grant(&*a, &u, Bucket::Purchased, 5, None, "g").await; // 10 credits
        let charge = match a.spend(spend_cmd(&u, 4, "first")).await.unwrap().unwrap().effect {
            Effect::Spent { entry, .. } => entry,
            other => panic!("{other:?}"),
        };
        let (mut blocker, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        for cmd in [
            Command::Spend(spend_cmd(&u, 6, "all-of-it")),
            Command::Refund(Refund { account: u.clone(), entry: charge, amount: 4, reference: "r".into(), key: conformance::key("refund") }),
        ] {
            let tx = blocker.transaction().await.unwrap();
            tx.execute("SELECT 1 FROM accounts WHERE external_id = 'u' FOR UPDATE", &[]).await.unwrap();
            let first = tokio::spawn({
                let (a, cmd) = (a.clone(), cmd.clone());
                async move { a.execute(cmd).await.unwrap() }
            });
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let retry = tokio::spawn({
                let (b, cmd) = (b.clone(), cmd.clone());
                async move { b.execute(cmd).await.unwrap() }
            });
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            tx.rollback().await.unwrap();
            let (first, retry) = (first.await.unwrap().unwrap(), retry.await.unwrap().unwrap());
            assert_eq!(first.effect, retry.effect, "{cmd:?}");
            assert!(first.replayed != retry.replayed, "one applied, one replayed: {first:?} {retry:?}");
        }
        assert_eq!(a.balance(&u).await.unwrap().total, 4, "10 - 4 - 6 + 4");
        let report = a.verify().await.unwrap();
        assert!(report.is_clean(), "{:?}", report.discrepancies);
    });
}

/// Each of `tables` (in name order) with its whole-table and index scans since the database
/// was created, after `store` is closed. A backend reports its counters when it ends (or after
/// ten idle seconds): this waits (at most ten seconds) until the store's connections have gone
/// and `reported` holds for the counts.
async fn scans_after_close(
    db: &tokio_postgres::Client,
    store: PgStore,
    tables: &[&str],
    reported: impl Fn(&[(String, i64, i64)]) -> bool,
) -> Vec<(String, i64, i64)> {
    drop(store);
    let mut seen = Vec::new();
    for _ in 0..100 {
        let left: i64 =
            db.query_one("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()", &[]).await.unwrap().get(0);
        db.batch_execute("SELECT pg_stat_clear_snapshot()").await.unwrap();
        seen = db
            .query("SELECT relname::text, seq_scan, COALESCE(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = ANY($1) ORDER BY relname", &[&tables])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)))
            .collect();
        if left == 0 && reported(&seen) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen.len(), tables.len(), "{seen:?}");
    seen
}

/// Batches find their rows by index however the tables grew after their statements were first
/// planned. (A generic plan is made once per connection, at a statement's first execution; made
/// on a fresh database's near-empty tables, it scanned the whole accounts table, and the holds
/// table, on every batch from then on.)
#[test]
fn batches_use_indexes_on_tables_that_grew() {
    let Some(cluster) = shared_cluster() else { return };
    rt().block_on(async {
        let url = cluster.create_database().await.unwrap();
        let db = connect(&url).await;
        // One connection: the statements are planned on it while the tables hold one account.
        let store = PgStore::open(PgOptions::new(url.clone()).pool_size(1)).await.unwrap();
        let s: &dyn Store = &store;
        let warm = create_user(s, "warm").await;
        grant(s, &warm, Bucket::Purchased, 1_000, None, "g").await;
        let pair = |i: usize| async move {
            let h = match s.hold(cost_hold(&acct("warm"), 2, 100, &format!("h{i}"))).await.unwrap().unwrap().effect {
                Effect::Held { hold, .. } => hold,
                other => panic!("{other:?}"),
            };
            s.settle(Settle { hold: h, credits: 1, usage: None, key: conformance::key(&format!("st{i}")) }).await.unwrap().unwrap();
        };
        s.spend(spend_cmd(&warm, 1, "first")).await.unwrap().unwrap();
        pair(0).await;
        // The tables grow behind the store's back (no ANALYZE: the plans stay as they were made).
        db.batch_execute(
            "INSERT INTO accounts (external_id, kind, monthly, rollover, purchased, held, created_at, updated_at)
             SELECT 'bulk-' || g, 'user', 0, 0, 0, 0, now(), now() FROM generate_series(1, 20000) g;
             INSERT INTO holds (account_id, amount, cost_micros, deadline, status, reference, created_at, closed_at)
             SELECT (SELECT id FROM accounts WHERE external_id = 'warm'), 1, 0, now(), 'released', 'bulk', now(), now() FROM generate_series(1, 20000) g;",
        )
        .await
        .unwrap();
        // 80 batches, one command each.
        for i in 1..=40 {
            s.spend(spend_cmd(&warm, 1, &format!("s{i}"))).await.unwrap().unwrap();
        }
        for i in 1..=20 {
            pair(i).await;
        }
        assert_eq!(s.balance(&warm).await.unwrap().total, 1_005 - 1 - 1 - 40 - 20);
        let seen = scans_after_close(&db, store, &["accounts", "holds"], |seen| seen.iter().all(|(_, seq, idx)| seq + idx >= 80)).await;
        // Counted since the database was created: the setup (migrations, the first account)
        // scans a few times; a batch planned with scans scans at least once, 80 times here.
        for (table, seq, idx) in &seen {
            assert!(seq + idx >= 80, "{table}: the batches' scans were reported ({seen:?})");
            assert!(*seq < 20, "{table}: {seq} scans of the whole table; the batches must find their rows by index ({seen:?})");
        }
    });
}

/// The same for batches of many accounts, on every table a spend writes: the statement that
/// updates several accounts from arrays is planned (once per connection, generic) while the
/// tables are near empty, then runs on grown ones. Without the planner settings a batch's
/// transaction begins with (`PLAN_SQL`), these plans scan whole tables.
#[test]
fn batches_of_many_accounts_use_indexes_on_tables_that_grew() {
    let Some(cluster) = shared_cluster() else { return };
    rt().block_on(async {
        let url = cluster.create_database().await.unwrap();
        let db = connect(&url).await;
        let store = PgStore::open(PgOptions::new(url.clone()).pool_size(1)).await.unwrap();
        let s: &dyn Store = &store;
        const USERS: usize = 8;
        let mut users = Vec::new();
        for i in 0..USERS {
            let u = create_user(s, &format!("u{i}")).await;
            grant(s, &u, Bucket::Purchased, 1_000, None, &format!("g{i}")).await;
            users.push(u);
        }
        let round = |r: usize| {
            let users = &users;
            async move {
                let spends = users.iter().enumerate().map(|(i, u)| {
                    let cmd = Spend { usage: Some(conformance::usage_of(100)), ..spend_cmd(u, 1, &format!("r{r}-{i}")) };
                    async move { s.spend(cmd).await.unwrap().unwrap() }
                });
                futures_util::future::join_all(spends).await;
            }
        };
        round(0).await;
        let before = store.batch_stats();
        let mut totals = Vec::new();
        for u in &users {
            totals.push(s.balance(u).await.unwrap().total);
        }
        // The tables grow behind the store's back (no ANALYZE: the plans stay as they were
        // made). The log's rows (with usage) take ids below every id the store uses.
        db.batch_execute(
            "INSERT INTO accounts (external_id, kind, monthly, rollover, purchased, held, created_at, updated_at)
             SELECT 'bulk-' || g, 'user', 0, 0, 0, 0, now(), now() FROM generate_series(1, 20000) g;
             INSERT INTO ledger_entries (id, account_id, at, kind, d_monthly, d_rollover, d_purchased, d_held, balance_after, held_after, reference,
                                         operation, model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_micros)
             SELECT -g, (SELECT min(id) FROM accounts WHERE external_id LIKE 'bulk-%'), now(), 'spend', 0, 0, -1, 0, 1, 0, 'bulk', 'run', 'm', 1, 1, 0, 0, 1
             FROM generate_series(1, 20000) g;
             INSERT INTO idempotency (key, fingerprint, outcome, at) SELECT 'bulk-' || g, 0, '\\x00', now() FROM generate_series(1, 20000) g;",
        )
        .await
        .unwrap();
        const ROUNDS: usize = 30;
        for r in 1..=ROUNDS {
            round(r).await;
        }
        let after = store.batch_stats();
        let batches = after.batches - before.batches;
        assert!(
            after.batched_commands - before.batched_commands > batches,
            "the spends of a round share batches ({batches} batches for {} spends)",
            after.batched_commands - before.batched_commands
        );
        for (u, total) in users.iter().zip(totals) {
            assert_eq!(s.balance(u).await.unwrap().total, total - ROUNDS as i64, "{u}");
        }
        let tables = ["accounts", "idempotency", "ledger_entries"];
        let seen =
            scans_after_close(&db, store, &tables, |seen| seen.iter().filter(|(t, ..)| t == "accounts").all(|(_, seq, idx)| seq + idx >= batches as i64)).await;
        // Counted since the database was created: the setup scans a few times; a batch
        // planned with scans scans at least once per batch, {batches} times here.
        for (table, seq, _) in &seen {
            assert!(
                *seq < 20 && (*seq as u64) < batches,
                "{table}: {seq} scans of the whole table in {batches} batches; they must find their rows by index ({seen:?})"
            );
        }
    });
}

/// An account's usage page is read through its log (migration V9): by index, whatever other
/// accounts wrote, and with exactly the account's records, newest first.
#[test]
fn an_accounts_usage_is_found_through_its_log_by_index() {
    let Some(cluster) = shared_cluster() else { return };
    rt().block_on(async {
        let url = cluster.create_database().await.unwrap();
        let db = connect(&url).await;
        let store = PgStore::open(PgOptions::new(url.clone())).await.unwrap();
        let s: &dyn Store = &store;
        let a = create_user(s, "a").await;
        let b = create_user(s, "b").await;
        grant(s, &a, Bucket::Purchased, 1_000, None, "ga").await;
        grant(s, &b, Bucket::Purchased, 1_000, None, "gb").await;
        let used = |who: &AccountId, k: &str, credits: i64| Spend { usage: Some(conformance::usage_of(credits * 100)), ..spend_cmd(who, credits, k) };
        for i in 1..=5 {
            s.spend(used(&a, &format!("a{i}"), i)).await.unwrap().unwrap();
            s.spend(used(&b, &format!("b{i}"), 10 + i)).await.unwrap().unwrap();
            // A spend without usage: a log entry without usage, skipped.
            s.spend(spend_cmd(&a, 1, &format!("plain{i}"))).await.unwrap().unwrap();
        }
        let page = s.usage(&a, 3).await.unwrap();
        assert_eq!(page.iter().map(|r| r.credits).collect::<Vec<_>>(), vec![5, 4, 3], "{page:?}");
        assert!(page.iter().all(|r| r.account == a));
        let rest = s.usage_before(&a, Some(page[2].entry), 10).await.unwrap();
        assert_eq!(rest.iter().map(|r| r.credits).collect::<Vec<_>>(), vec![2, 1]);
        // Another account's log and usage grow large behind the store's back; with the tables
        // analyzed, the page is still found by index (no scan of either table).
        db.batch_execute(
            "INSERT INTO ledger_entries (id, account_id, at, kind, d_monthly, d_rollover, d_purchased, d_held, balance_after, held_after, reference,
                                         operation, model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_micros)
             SELECT 1000000 + g, (SELECT id FROM accounts WHERE external_id = 'b'), now(), 'spend', 0, 0, 0, 0, 0, 0, 'bulk', 'run', 'm', 1, 1, 0, 0, 0
             FROM generate_series(1, 50000) g;
             ANALYZE ledger_entries;",
        )
        .await
        .unwrap();
        for who in ["a", "b"] {
            let id: i64 = db.query_one("SELECT id FROM accounts WHERE external_id = $1", &[&who]).await.unwrap().get(0);
            let plan: Vec<String> =
                db.query(&format!("EXPLAIN {}", postgres::USAGE_PAGE_SQL), &[&id, &50i64, &i64::MAX]).await.unwrap().iter().map(|r| r.get(0)).collect();
            let plan = plan.join("\n");
            assert!(!plan.contains("Seq Scan"), "{who}: {plan}");
            // The small account's page walks its own entries. (For the account that owns nearly
            // every row, walking both keys backwards and stopping at the page's end is as good.)
            if who == "a" {
                assert!(plan.contains("ledger_entries_by_account"), "{who}: {plan}");
            }
        }
        assert_eq!(s.usage(&a, 10).await.unwrap().len(), 5);
        let newest = s.usage(&b, 1_000).await.unwrap();
        assert_eq!((newest.len(), newest[0].entry.0, newest[999].entry.0), (1_000, 1_050_000, 1_049_001));
    });
}

/// Migration V10 moves each usage record into its log entry: the records already rolled up stay
/// counted once, those not rolled up yet are rolled up on the way, an account's usage page reads
/// the same, and the log is append-only again afterwards.
#[test]
fn usage_records_move_into_their_log_entries() {
    let Some(cluster) = shared_cluster() else { return };
    rt().block_on(async {
        let url = cluster.create_database().await.unwrap();
        let mut db = connect(&url).await;
        postgres::migrate_up_to(&mut db, 9).await.unwrap();
        // An account granted 100, then two runs on 2026-11-20: 3 credits (rolled up already)
        // and 2 (not yet).
        db.batch_execute(
            "INSERT INTO accounts (id, external_id, kind, monthly, rollover, purchased, held, created_at, updated_at)
                 VALUES (1, 'old', 'user', 0, 0, 95, 0, '2026-11-20T00:00:00Z', '2026-11-20T12:00:00Z');
             INSERT INTO ledger_entries (id, account_id, at, kind, d_monthly, d_rollover, d_purchased, d_held, balance_after, held_after, source, reference) VALUES
                 (1, 1, '2026-11-20T10:00:00Z', 'grant', 0, 0, 100, 0, 100, 0, 'admin', 'g'),
                 (2, 1, '2026-11-20T11:00:00Z', 'spend', 0, 0, -3, 0, 97, 0, NULL, 'r1'),
                 (3, 1, '2026-11-20T12:00:00Z', 'spend', 0, 0, -2, 0, 95, 0, NULL, 'r2');
             SELECT setval('ledger_entries_id_seq', 3); SELECT setval('accounts_id_seq', 1);
             INSERT INTO usage_records (entry_id, account_id, at, operation, model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, credits, cost_micros, rolled_up) VALUES
                 (2, 1, '2026-11-20T11:00:00Z', 'playground_run', 'm1', 100, 10, 1, 2, 3, 300, TRUE),
                 (3, 1, '2026-11-20T12:00:00Z', 'playground_run', 'm2', 200, 20, 0, 0, 2, 200, FALSE);
             INSERT INTO usage_daily VALUES (1, '2026-11-20', 1, 3, 100, 10, 1, 2, 300);",
        )
        .await
        .unwrap();
        let store = PgStore::open(PgOptions::new(url.clone())).await.unwrap();
        let s: &dyn Store = &store;
        let old = acct("old");
        let day = chrono::NaiveDate::from_ymd_opt(2026, 11, 20).unwrap();
        let q = DailyUsageQuery { account: Some(old.clone()), from: day, until: day.succ_opt().unwrap() };
        let expect = vec![DailyUsage { day, runs: 2, credits: 5, tokens: TokenUsage { input: 300, output: 30, cache_read: 1, cache_write: 2 }, cost_micros: 500 }];
        assert_eq!(s.daily_usage(&q).await.unwrap(), expect);
        assert_eq!(s.refresh_analytics().await.unwrap().usage_records, 0, "rolled up by the migration");
        assert_eq!(s.daily_usage(&q).await.unwrap(), expect);
        let page = s.usage(&old, 10).await.unwrap();
        let got: Vec<(i64, i64, &str, u64, i64)> = page.iter().map(|r| (r.entry.0, r.credits, r.usage.model.as_str(), r.usage.tokens.input, r.usage.cost_micros)).collect();
        assert_eq!(got, vec![(3, 2, "m2", 200, 200), (2, 3, "m1", 100, 300)]);
        assert!(s.verify().await.unwrap().is_clean(), "{:?}", s.verify().await.unwrap().discrepancies);
        let e = db.execute("UPDATE ledger_entries SET reference = 'x' WHERE id = 1", &[]).await.unwrap_err();
        assert!(e.to_string().contains("append-only") || format!("{e:?}").contains("append-only"), "{e:?}");
        // A new spend with usage is rolled up once, after the migration's watermark.
        s.spend(Spend { usage: Some(conformance::usage_of(700)), ..spend_cmd(&old, 4, "new") }).await.unwrap().unwrap();
        assert_eq!(s.refresh_analytics().await.unwrap().usage_records, 1);
        assert_eq!(s.refresh_analytics().await.unwrap().usage_records, 0);
    });
}

/// A batch writes all its tables in one statement sent with its COMMIT; that statement checks
/// the rows each table took against what the batch computed. When they differ (here a trigger
/// silently skips the account's update), the transaction rolls back: no log entry, usage row
/// or key is left without the balance change it belongs to.
#[test]
fn a_batch_that_writes_other_rows_than_it_computed_commits_nothing() {
    let Some(cluster) = shared_cluster() else { return };
    rt().block_on(async {
        let url = cluster.create_database().await.unwrap();
        let db = connect(&url).await;
        let store = PgStore::open(PgOptions::new(url.clone()).pool_size(2)).await.unwrap();
        let s: &dyn Store = &store;
        let a = create_user(s, "skipped").await;
        grant(s, &a, Bucket::Purchased, 100, None, "g").await;
        let entries = || async { db.query_one("SELECT count(*) FROM ledger_entries", &[]).await.unwrap().get::<_, i64>(0) };
        let (entries_before, balance_before) = (entries().await, s.balance(&a).await.unwrap());
        db.batch_execute(
            "CREATE FUNCTION skip_update() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
             CREATE TRIGGER skip_update BEFORE UPDATE ON accounts FOR EACH ROW EXECUTE FUNCTION skip_update();",
        )
        .await
        .unwrap();
        let r = s.spend(spend_cmd(&a, 7, "lost-update")).await;
        assert!(matches!(r, Err(Error::Invariant(_))), "{r:?}");
        let stats = store.batch_stats();
        assert_eq!(stats.failed_batches, 1, "{stats:?}");
        assert!(stats.last_failure.as_deref().is_some_and(|f| f.contains("batch wrote {1,1,0} rows per table, not {1,1,1}")), "{stats:?}");
        db.batch_execute("DROP TRIGGER skip_update ON accounts").await.unwrap();
        assert_eq!(entries().await, entries_before);
        assert_eq!(s.balance(&a).await.unwrap(), balance_before);
        let keys: i64 = db.query_one("SELECT count(*) FROM idempotency WHERE key = 'lost-update'", &[]).await.unwrap().get(0);
        assert_eq!(keys, 0);
        assert!(s.verify().await.unwrap().is_clean());
        // The same command, the trigger gone, applies once.
        s.spend(spend_cmd(&a, 7, "lost-update")).await.unwrap().unwrap();
        assert_eq!(s.balance(&a).await.unwrap().total, balance_before.total - 7);
    });
}

/// Ids follow the real-time order of writes under concurrency: 16 callers on two nodes (two
/// lanes each), over a hot account and a few shared ones, spends and holds with settles; every
/// write that returned before another was submitted has the lower entry id (and hold id).
#[test]
fn ids_follow_the_order_of_writes_across_lanes_and_nodes() {
    let Some(cluster) = shared_cluster() else { return };
    rt().block_on(async {
        let url = cluster.create_database().await.unwrap();
        let mut nodes: Vec<Arc<dyn Store>> = Vec::new();
        for _ in 0..2 {
            let mut opts = PgOptions::new(url.clone());
            opts.lanes = 2;
            nodes.push(Arc::new(PgStore::open(opts).await.unwrap()));
        }
        let accounts: Vec<AccountId> = ["hot", "s1", "s2", "s3", "s4", "s5"].into_iter().map(acct).collect();
        for a in &accounts {
            create_user(&*nodes[0], a.as_str()).await;
            grant(&*nodes[0], a, Bucket::Purchased, 100_000, None, &format!("g{a}")).await;
        }
        let t0 = std::time::Instant::now();
        // (submitted, returned, entry id, hold id) in nanoseconds since t0.
        let tasks: Vec<_> = (0..16usize)
            .map(|c| {
                let store = nodes[c % 2].clone();
                let accounts = accounts.clone();
                tokio::spawn(async move {
                    let mut seen: Vec<(u128, u128, i64, Option<i64>)> = Vec::new();
                    for i in 0..40usize {
                        let a = &accounts[if c % 4 == 0 { 0 } else { (c + i) % accounts.len() }];
                        let submitted = t0.elapsed().as_nanos();
                        if i % 3 == 0 {
                            let hold = match store.hold(cost_hold(a, 2, 0, &format!("h{c}-{i}"))).await.unwrap().unwrap().effect {
                                Effect::Held { hold, .. } => hold,
                                e => panic!("expected a hold, got {e:?}"),
                            };
                            seen.push((submitted, t0.elapsed().as_nanos(), 0, Some(hold.0)));
                        } else {
                            let entry = match store.spend(spend_cmd(a, 1, &format!("s{c}-{i}"))).await.unwrap().unwrap().effect {
                                Effect::Spent { entry, .. } => entry.0,
                                e => panic!("expected a spend, got {e:?}"),
                            };
                            seen.push((submitted, t0.elapsed().as_nanos(), entry, None));
                        }
                    }
                    seen
                })
            })
            .collect();
        let mut writes = Vec::new();
        for t in tasks {
            writes.extend(t.await.unwrap());
        }
        // For each write in order of submission, every write that returned before it was
        // submitted has a lower id (entries and holds apart).
        for (pick, what) in [(0usize, "entry"), (1, "hold")] {
            let id_of = |w: &(u128, u128, i64, Option<i64>)| if pick == 0 { (w.2 > 0).then_some(w.2) } else { w.3 };
            let mut by_return: Vec<(u128, i64)> = writes.iter().filter_map(|w| id_of(w).map(|id| (w.1, id))).collect();
            by_return.sort();
            let mut by_submit: Vec<(u128, i64)> = writes.iter().filter_map(|w| id_of(w).map(|id| (w.0, id))).collect();
            by_submit.sort();
            assert!(by_submit.len() > 100, "{what}: {}", by_submit.len());
            let (mut k, mut max_before) = (0, 0i64);
            for (submitted, id) in by_submit {
                while k < by_return.len() && by_return[k].0 < submitted {
                    max_before = max_before.max(by_return[k].1);
                    k += 1;
                }
                assert!(id > max_before, "{what} {id} was submitted after {what} {max_before} returned");
            }
        }
        let report = nodes[0].verify().await.unwrap();
        assert!(report.is_clean(), "{:?}", report.discrepancies);
    });
}

/// A node with one lane (its cache and the node's id block serve every account) and another
/// node, on a fresh database.
async fn one_lane_and_another_node(cluster: &PgCluster) -> (PgStore, PgStore) {
    let url = cluster.create_database().await.unwrap();
    let mut opts = PgOptions::new(url.clone());
    opts.lanes = 1;
    (PgStore::open(opts).await.unwrap(), PgStore::open(PgOptions::new(url)).await.unwrap())
}

/// Unlocked batches take their ids from the node's block while it holds the newest ids of the
/// sequences; once another node writes higher ids, the block is stale (the write checks the tables' highest ids),
/// the batch takes the locked path, and its entry lies above the other node's: ids follow the
/// order of writes across nodes.
#[test]
fn the_id_block_serves_while_it_is_newest() {
    let Some(cluster) = shared_cluster() else { return };
    rt().block_on(async {
        let (store, other) = one_lane_and_another_node(&cluster).await;
        let (a, b): (&dyn Store, &dyn Store) = (&store, &other);
        let counts = || {
            let s = store.batch_stats();
            assert_eq!(s.failed_batches, 0, "{s:?}");
            (s.unlocked_batches, s.stale_batches, s.block_batches)
        };
        let entry = |o: Committed| match o.effect {
            Effect::Spent { entry, .. } => entry.0,
            e => panic!("expected a spend, got {e:?}"),
        };
        // v's cost profile is set on the locked path, whose spare ids become the block.
        let v = create_user(a, "v").await;
        grant(a, &v, Bucket::Purchased, 95, None, "gv").await;
        let mut last = 0;
        for i in 0..3 {
            let id = entry(a.spend(spend_cmd(&v, 1, &format!("v{i}"))).await.unwrap().unwrap());
            assert!(id > last);
            last = id;
        }
        assert_eq!(counts(), (4, 0, 4), "the grant and three spends, ids from the block");

        // Another node allocates ids (for another account).
        let w = create_user(b, "w").await;
        grant(b, &w, Bucket::Purchased, 10, None, "gw").await;
        let theirs = entry(b.spend(spend_cmd(&w, 1, "w1")).await.unwrap().unwrap());
        assert!(theirs > last);
        let ours = entry(a.spend(spend_cmd(&v, 1, "v3")).await.unwrap().unwrap());
        assert!(ours > theirs, "{ours} after the other node's {theirs}");
        assert_eq!(counts(), (4, 1, 4), "the block was stale: the locked path");

        // Cooling down, unlocked batches allocate their ids (a round trip of their own).
        let mut last = ours;
        for i in 4..8 {
            let id = entry(a.spend(spend_cmd(&v, 1, &format!("v{i}"))).await.unwrap().unwrap());
            assert!(id > last);
            last = id;
        }
        assert_eq!(counts(), (8, 1, 4));
        assert_eq!(a.balance(&v).await.unwrap().total, 100 - 8);
        let report = a.verify().await.unwrap();
        assert!(report.is_clean(), "{:?}", report.discrepancies);
    });
}

/// A lane applies a batch on one account to the state its own last write of it left (one
/// round trip, no locked reads), and any other write since sends the batch down the locked
/// path instead: another node's, a key used before, a tier change. Each case is counted, and
/// the ledger stays exact.
#[test]
fn a_lane_applies_batches_to_the_state_it_wrote_and_sees_other_writes() {
    let Some(cluster) = shared_cluster() else { return };
    rt().block_on(async {
        let (store, other) = one_lane_and_another_node(&cluster).await;
        let (a, b): (&dyn Store, &dyn Store) = (&store, &other);
        let counts = || {
            let s = store.batch_stats();
            assert_eq!(s.failed_batches, 0, "{s:?}");
            (s.unlocked_batches, s.stale_batches)
        };
        // Setting v's cost profile takes the locked path (the lane does not know v yet); the
        // grant then applies to the state it left.
        let v = create_user(a, "v").await;
        assert_eq!(counts(), (0, 0));
        grant(a, &v, Bucket::Purchased, 95, None, "gv").await;
        assert_eq!(counts(), (1, 0), "v as the lane left it");

        // u's creation takes its entry's id from the sequence; setting its cost profile takes
        // the locked path.
        let u = create_user(a, "u").await;
        assert_eq!(counts(), (1, 0));
        grant(a, &u, Bucket::Purchased, 95, None, "gu").await;
        a.spend(spend_cmd(&u, 1, "u1")).await.unwrap().unwrap();
        assert_eq!(counts(), (3, 0));

        // Another node writes u.
        b.spend(spend_cmd(&u, 5, "elsewhere")).await.unwrap().unwrap();
        let first = a.spend(spend_cmd(&u, 1, "u3")).await.unwrap().unwrap();
        assert_eq!(counts(), (3, 1), "u changed on another node");
        assert!(!first.replayed);

        // A key used before: the unlocked statement cannot store it again.
        a.spend(spend_cmd(&u, 1, "u4")).await.unwrap().unwrap();
        assert_eq!(counts(), (4, 1));
        let again = a.spend(spend_cmd(&u, 1, "u4")).await.unwrap().unwrap();
        assert!(again.replayed, "{again:?}");
        assert_eq!(counts(), (4, 2), "the key was in use");

        // A replay that the state now rejects is not decided on the cache (nothing sent).
        let rest = a.balance(&u).await.unwrap().total;
        a.spend(spend_cmd(&u, rest, "all")).await.unwrap().unwrap(); // locked: u was dropped above
        assert_eq!(counts(), (4, 2));
        let all = a.spend(spend_cmd(&u, rest, "all")).await.unwrap().unwrap();
        assert!(all.replayed, "{all:?}");
        assert_eq!(counts(), (4, 2), "declined before sending");
        assert!(matches!(a.spend(spend_cmd(&u, 1, "broke")).await.unwrap(), Err(Rejection::InsufficientCredits { .. })));

        // A tier change.
        a.spend(spend_cmd(&v, 1, "v2")).await.unwrap().unwrap();
        assert_eq!(counts(), (5, 2));
        let tier = prpm_playground_core::cost::TierLimits {
            name: "analyst".into(),
            monthly_revenue_micros: 0,
            monthly_cost_limit_micros: Some(1_000_000),
            daily_cost_limit_micros: None,
            hourly_request_limit: None,
            alert_threshold_pct: None,
            throttle_on_exceed: true,
        };
        b.set_tier(tier, conformance::key("tier")).await.unwrap().unwrap();
        a.spend(spend_cmd(&v, 1, "v3")).await.unwrap().unwrap();
        assert_eq!(counts(), (5, 3), "the tiers changed");
        a.spend(spend_cmd(&v, 1, "v4")).await.unwrap().unwrap();
        assert_eq!(counts(), (6, 3));

        assert_eq!(a.balance(&v).await.unwrap().total, 100 - 3);
        assert_eq!(b.balance(&u).await.unwrap().total, 0);
        let report = a.verify().await.unwrap();
        assert!(report.is_clean(), "{:?}", report.discrepancies);
    });
}

/// A batch over several accounts the lane's cache holds goes out in one round trip (no locked
/// reads), and if any one of them was written elsewhere since, the whole batch commits nothing
/// and is decided again under the locks: no command is lost or applied twice.
#[test]
fn a_batch_over_several_cached_accounts_is_unlocked_until_one_changes() {
    let Some(cluster) = shared_cluster() else { return };
    rt().block_on(async {
        let (store, other) = one_lane_and_another_node(&cluster).await;
        let (a, b): (&dyn Store, &dyn Store) = (&store, &other);
        let accounts: Vec<AccountId> = ["m1", "m2", "m3", "m4"].into_iter().map(acct).collect();
        for x in &accounts {
            create_user(a, x.as_str()).await;
            grant(a, x, Bucket::Purchased, 995, None, &format!("g{x}")).await;
        }
        let stats = || {
            let s = store.batch_stats();
            assert_eq!(s.failed_batches, 0, "{s:?}");
            s
        };
        // Rounds of one spend per account, sent together: the lane batches them.
        let round = |tag: String| {
            let accounts = accounts.clone();
            async move {
                let spends = accounts.iter().map(|x| a.spend(spend_cmd(x, 1, &format!("{tag}-{x}"))));
                for r in futures_util::future::join_all(spends).await {
                    assert!(!r.unwrap().unwrap().replayed);
                }
            }
        };
        let s0 = stats();
        for i in 0..20 {
            round(format!("r{i}")).await;
        }
        let s1 = stats();
        let multi = (s1.batched_commands - s0.batched_commands) as f64 / (s1.batches - s0.batches) as f64;
        // (Above 1: some batches named several accounts; how many depends on timing.)
        assert!(multi > 1.2, "the lane batched the rounds ({multi:.2} commands a batch)");
        assert_eq!(s1.unlocked_batches - s0.unlocked_batches, s1.batches - s0.batches, "every batch unlocked: {s1:?}");
        assert_eq!(s1.stale_batches, s0.stale_batches);

        // Another node writes one of them: the next batch that names it is stale, then the
        // lane knows its state again.
        b.spend(spend_cmd(&accounts[2], 5, "elsewhere")).await.unwrap().unwrap();
        round("after".into()).await;
        let s2 = stats();
        assert!(s2.stale_batches > s1.stale_batches, "{s2:?}");
        for i in 0..5 {
            round(format!("again{i}")).await;
        }
        let s3 = stats();
        assert_eq!(s3.stale_batches, s2.stale_batches, "{s3:?}");

        for (k, x) in accounts.iter().enumerate() {
            let want = 1_000 - 26 - if k == 2 { 5 } else { 0 };
            assert_eq!(a.balance(x).await.unwrap().total, want, "{x}");
        }
        // A replay of a command of a batch that went down the locked path is a replay.
        assert!(a.spend(spend_cmd(&accounts[2], 1, "after-m3")).await.unwrap().unwrap().replayed);
        let report = a.verify().await.unwrap();
        assert!(report.is_clean(), "{:?}", report.discrepancies);
    });
}

/// Two batches in flight never share an account: 24 callers, each sending spends and holds
/// with their settles one after the other over six shared accounts, on a node with two
/// batches in flight. Once each account has been written (and so cached), every batch is
/// applied to the node's cache without the locked reads, or (rarely) finds it stale and takes
/// them: a batch that took an account another batch in flight had would find it missing from
/// the cache (and read it under the lock), or stale, as dozens did when the batcher let two
/// batches share an account. (A batch finds its ids stale when another batch of the node wrote
/// ids from a newer block before its statement ran: rare, and it then takes the locked path.)
/// The balances are exact.
#[test]
fn batches_in_flight_never_share_an_account() {
    let Some(cluster) = shared_cluster() else { return };
    rt().block_on(async {
        let url = cluster.create_database().await.unwrap();
        let store = Arc::new(PgStore::open(PgOptions::new(url).pool_size(8)).await.unwrap());
        assert_eq!(PgOptions::new("").lanes, 2);
        let s: Arc<dyn Store> = store.clone();
        let accounts: Vec<AccountId> = (0..6).map(|i| acct(&format!("shared{i}"))).collect();
        for (i, a) in accounts.iter().enumerate() {
            create_user(&*s, a.as_str()).await;
            grant(&*s, a, Bucket::Purchased, 9_995, None, &format!("g{i}")).await; // 10,000
            s.spend(spend_cmd(a, 1, &format!("warm{i}"))).await.unwrap().unwrap();
        }
        let s0 = store.batch_stats();
        let callers = (0..24).map(|c| {
            let s = s.clone();
            let accounts = accounts.clone();
            tokio::spawn(async move {
                for i in 0..30 {
                    let a = &accounts[(c + i) % accounts.len()];
                    if i % 3 == 2 {
                        let h = match s.hold(cost_hold(a, 3, 100, &format!("h{c}-{i}"))).await.unwrap().unwrap().effect {
                            Effect::Held { hold, .. } => hold,
                            other => panic!("{other:?}"),
                        };
                        let settle = Settle { hold: h, credits: 2, usage: None, key: conformance::key(&format!("st{c}-{i}")) };
                        s.settle(settle).await.unwrap().unwrap();
                    } else {
                        s.spend(spend_cmd(a, 1, &format!("s{c}-{i}"))).await.unwrap().unwrap();
                    }
                }
            })
        });
        for r in futures_util::future::join_all(callers).await {
            r.unwrap();
        }
        let s1 = store.batch_stats();
        let batches = s1.batches - s0.batches;
        assert!(s1.batched_commands - s0.batched_commands > batches, "commands shared batches: {s1:?}");
        let (unlocked, stale) = (s1.unlocked_batches - s0.unlocked_batches, s1.stale_batches - s0.stale_batches);
        assert_eq!(unlocked + stale, batches, "every batch on the cache: {s0:?} then {s1:?}");
        assert!(stale <= 5, "{stale} stale batches: {s0:?} then {s1:?}");
        assert_eq!(s1.failed_batches, s0.failed_batches, "{s1:?}");
        // Per caller: 20 spends of 1 and 10 settles of 2, spread evenly over the accounts.
        let spent: i64 = 24 * (20 + 10 * 2);
        let mut total = 0;
        for a in &accounts {
            let b = s.balance(a).await.unwrap();
            assert_eq!(b.held, 0, "{a}");
            total += b.total;
        }
        assert_eq!(total, 6 * (10_000 - 1) - spent);
        let report = s.verify().await.unwrap();
        assert!(report.is_clean(), "{:?}", report.discrepancies);
    });
}

/// A batch that changed only its accounts' hot columns (the buckets but rollover, what is
/// held, the cost counters) writes them with the narrow update; one that changed more (a
/// rollover lot spent, a request window moved) writes whole rows. Either way another node,
/// which reads the rows themselves, sees what the writing node has: balances, lots, cost
/// counters, and the request window, whose hourly limit holds across the nodes.
#[test]
fn another_node_reads_every_column_a_batch_wrote() {
    let Some(cluster) = shared_cluster() else { return };
    rt().block_on(async {
        let (store, other) = one_lane_and_another_node(&cluster).await;
        let (a, b): (&dyn Store, &dyn Store) = (&store, &other);
        // Unlimited users spending purchased credits: only hot columns change.
        let hot: Vec<AccountId> = ["h1", "h2", "h3"].into_iter().map(acct).collect();
        for x in &hot {
            create_user(a, x.as_str()).await;
            grant(a, x, Bucket::Purchased, 1_000, None, &format!("g{x}")).await;
        }
        // A free user (ten requests an hour) whose spends draw on a rollover lot.
        let w = create_free_user(a, "w").await;
        let expiry = chrono::Utc::now() + chrono::Duration::days(20);
        grant(a, &w, Bucket::Rollover, 20, Some(expiry), "gw-rollover").await;
        grant(a, &w, Bucket::Purchased, 100, None, "gw-purchased").await;
        let spend = |x: &AccountId, k: String| Spend {
            account: x.clone(),
            amount: 2,
            usage: Some(conformance::usage_of(1_000)),
            reference: "run".into(),
            key: conformance::key(&k),
        };

        let s0 = store.batch_stats();
        for i in 0..8 {
            let spends = hot.iter().chain([&w]).map(|x| a.spend(spend(x, format!("{x}-{i}"))));
            for r in futures_util::future::join_all(spends).await {
                assert!(!r.unwrap().unwrap().replayed);
            }
        }
        let s1 = store.batch_stats();
        assert_eq!(s1.failed_batches, 0, "{s1:?}");
        assert!(s1.batched_commands - s0.batched_commands > s1.batches - s0.batches, "some batches took several accounts: {s1:?}");

        for x in &hot {
            let (balance, cost) = (b.balance(x).await.unwrap(), b.cost(x).await.unwrap());
            // The signup's 5 credits and the grant's 1,000, less 16.
            assert_eq!((balance.monthly, balance.purchased, balance.held), (0, 989, 0), "{x}");
            assert_eq!((cost.day_cost_micros, cost.month_cost_micros, cost.held_cost_micros), (8_000, 8_000, 0), "{x}");
        }
        let balance = b.balance(&w).await.unwrap();
        // 16 credits, all from the lot (rollover goes before purchased; the signup's 5 are
        // purchased).
        assert_eq!((balance.monthly, balance.rollover, balance.purchased), (0, 4, 105));
        assert_eq!(balance.next_expiry.map(|l| l.amount), Some(4));
        assert_eq!(b.cost(&w).await.unwrap().requests_last_hour, 8);

        // The other node takes the last two requests of the hour; this node, whose cached row
        // is now stale, is refused the next.
        for i in 0..2 {
            b.spend(spend(&w, format!("w-other-{i}"))).await.unwrap().unwrap();
        }
        match a.spend(spend(&w, "w-over".into())).await.unwrap() {
            Err(Rejection::RateLimited { .. }) => {}
            other => panic!("expected the hourly limit, got {other:?}"),
        }
        let balance = a.balance(&w).await.unwrap();
        assert_eq!((balance.rollover, balance.purchased), (0, 105));
        let report = a.verify().await.unwrap();
        assert!(report.is_clean(), "{:?}", report.discrepancies);
    });
}
