//! What is about SQLite itself: the file format, WAL, migrations, refusing foreign or newer
//! files, durability across reopen, tamper detection, and many threads on one file.

use std::sync::Arc;

use prpm_playground_core::conformance::{acct, applied, create_user, grant, hold_cmd, rejected, settle_cmd, spend_cmd};
use prpm_playground_core::*;
use rusqlite::Connection;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

#[test]
fn file_is_wal_full_sync_with_our_application_id_and_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    let store = SqliteStore::open(&path).unwrap();
    drop(store);
    let c = Connection::open(&path).unwrap();
    let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
    let app: i32 = c.query_row("PRAGMA application_id", [], |r| r.get(0)).unwrap();
    assert_eq!(app, prpm_playground_core::store::sqlite::APPLICATION_ID);
    let v: i64 = c.query_row("SELECT max(version) FROM refinery_schema_history", [], |r| r.get(0)).unwrap();
    assert_eq!(v, 9);
    // Opening again applies nothing and keeps the data.
    SqliteStore::open(&path).unwrap();
}

#[test]
fn data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    rt().block_on(async {
        let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let u = create_user(&*s, "u").await;
        applied(s.spend(spend_cmd(&u, 2, "s1")).await);
    });
    rt().block_on(async {
        let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let b = s.balance(&acct("u")).await.unwrap();
        assert_eq!(b.total, 3);
        // The idempotency record survived too.
        assert!(s.spend(spend_cmd(&acct("u"), 2, "s1")).await.unwrap().unwrap().replayed);
        assert!(s.verify().await.unwrap().is_clean());
    });
}

#[test]
fn refuses_files_that_are_not_ours_and_leaves_them_untouched() {
    let dir = tempfile::tempdir().unwrap();
    // Not a database at all.
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, b"this is a text file, not a database, and it is long enough").unwrap();
    let err = SqliteStore::open(&junk).unwrap_err();
    assert_eq!(err.code(), "not_our_database", "{err}");
    assert_eq!(std::fs::read(&junk).unwrap(), b"this is a text file, not a database, and it is long enough");

    // Another application's SQLite database.
    let other = dir.path().join("other.db");
    {
        let c = Connection::open(&other).unwrap();
        c.execute_batch("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT); INSERT INTO notes (body) VALUES ('hi');").unwrap();
    }
    let before = std::fs::read(&other).unwrap();
    let err = SqliteStore::open(&other).unwrap_err();
    assert_eq!(err.code(), "not_our_database", "{err}");
    assert_eq!(std::fs::read(&other).unwrap(), before, "file changed");
    let c = Connection::open(&other).unwrap();
    let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "delete", "journal mode changed");
}

#[test]
fn refuses_a_schema_newer_than_the_code() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    drop(SqliteStore::open(&path).unwrap());
    {
        let c = Connection::open(&path).unwrap();
        c.execute("INSERT INTO refinery_schema_history (version, name, applied_on, checksum) VALUES (99, 'from_the_future', '2030-01-01T00:00:00Z', '1')", [])
            .unwrap();
    }
    match SqliteStore::open(&path) {
        Err(Error::SchemaTooNew { found: 99, supported: 9 }) => {}
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

/// The migrations as the code has them, to build a file as an older release left it.
mod sqlite_migrations {
    refinery::embed_migrations!("../migrations/sqlite");
}

/// Every row of `table` as text (all its columns), in rowid order.
fn rows_of(c: &Connection, table: &str) -> Vec<String> {
    let mut stmt = c.prepare(&format!("SELECT * FROM {table} ORDER BY rowid")).unwrap();
    let n = stmt.column_count();
    stmt.query_map([], |r| Ok((0..n).map(|i| format!("{:?}", r.get_ref(i).unwrap())).collect::<Vec<_>>().join("|"))).unwrap().map(Result::unwrap).collect()
}

fn index_sql(c: &Connection, table: &str) -> Vec<String> {
    let mut stmt = c.prepare("SELECT sql FROM sqlite_schema WHERE type = 'index' AND tbl_name = ?1 AND sql IS NOT NULL ORDER BY name").unwrap();
    stmt.query_map([table], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
}

/// Whether SQLite builds a temporary b-tree to run `sql` (`OpenEphemeral` in its program).
fn builds_a_temporary_table(c: &Connection, sql: &str) -> bool {
    let mut stmt = c.prepare(&format!("EXPLAIN {sql}")).unwrap();
    let ops: Vec<String> = stmt.query_map([], |r| r.get(1)).unwrap().map(Result::unwrap).collect();
    ops.iter().any(|op| op == "OpenEphemeral")
}

const HOLD_INSERT: &str = "INSERT INTO holds (account_id, amount, deadline_ms, status, reference, created_ms, cost_micros) VALUES (1, 4, 9, 'open', 'x', 5, 0)";
const HOLD_CLOSE: &str = "UPDATE holds SET status = 'settled', closed_ms = 6 WHERE id = 1 AND status = 'open'";
const RUN_INSERT: &str = "INSERT INTO runs (id, account, session_id, package_id, model, with_prompt, input_tokens, output_tokens, cache_read_tokens,
     cache_write_tokens, credits, cost_micros, latency_ms, outcome, error, hold_id, at_ms) VALUES ('r9', 'old', NULL, NULL, 'm', 1, 1, 1, 0, 0, 1, 5, 3, 'completed', NULL, 1, 7)";

#[test]
fn v8_rebuilds_holds_and_runs_with_the_same_rows_and_checks_that_need_no_temporary_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    // A file as release V7 left it, with holds and runs in it.
    let (holds, runs, hold_indexes, run_indexes) = {
        let mut c = Connection::open(&path).unwrap();
        c.pragma_update(None, "application_id", prpm_playground_core::store::sqlite::APPLICATION_ID).unwrap();
        sqlite_migrations::migrations::runner().set_target(refinery::Target::Version(7)).run(&mut c).unwrap();
        // The form V8 replaces: each of these statements built a temporary b-tree for its CHECK.
        for sql in [HOLD_INSERT, HOLD_CLOSE, RUN_INSERT] {
            assert!(builds_a_temporary_table(&c, sql), "{sql}");
        }
        c.execute_batch(
            "INSERT INTO accounts (id, external_id, kind, monthly, rollover, purchased, held, created_ms, updated_ms) VALUES (1, 'old', 'user', 5, 0, 0, 4, 0, 0);
             INSERT INTO holds (id, account_id, amount, deadline_ms, status, reference, created_ms, closed_ms, cost_micros) VALUES
                 (3, 1, 4, 900, 'open', 'r-open', 10, NULL, 25), (7, 1, 2, 800, 'settled', 'r-done', 11, 12, 0), (8, 1, 1, 700, 'expired', 'r-old', 13, 14, 3);
             INSERT INTO runs (id, account, session_id, package_id, model, with_prompt, input_tokens, output_tokens, cache_read_tokens,
                 cache_write_tokens, credits, cost_micros, latency_ms, outcome, error, hold_id, at_ms) VALUES
                 ('run-b', 'old', 's1', 'pkg', 'claude-sonnet-4-5', 1, 1200, 400, 10, 20, 1, 9600, 812, 'completed', NULL, 7, 12),
                 ('run-a', 'old', NULL, NULL, 'gpt-4o', 0, 50, 0, 0, 0, 0, 0, 30, 'failed', 'provider unavailable', NULL, 13);",
        )
        .unwrap();
        (rows_of(&c, "holds"), rows_of(&c, "runs"), index_sql(&c, "holds"), index_sql(&c, "runs"))
    };
    assert_eq!((holds.len(), runs.len(), hold_indexes.len()), (3, 2, 2));

    // Opening it applies V8 (and what follows).
    drop(SqliteStore::open(&path).unwrap());
    let c = Connection::open(&path).unwrap();
    let v: i64 = c.query_row("SELECT max(version) FROM refinery_schema_history", [], |r| r.get(0)).unwrap();
    assert_eq!(v, 9);
    assert_eq!(rows_of(&c, "holds"), holds);
    assert_eq!(rows_of(&c, "runs"), runs);
    assert_eq!(index_sql(&c, "holds"), hold_indexes);
    assert_eq!(index_sql(&c, "runs"), run_indexes);
    for sql in [HOLD_INSERT, HOLD_CLOSE, RUN_INSERT] {
        assert!(!builds_a_temporary_table(&c, sql), "{sql}");
    }
    // The CHECKs still refuse what they refused, and change nothing.
    c.pragma_update(None, "foreign_keys", true).unwrap();
    let bad_hold = c.execute(&HOLD_INSERT.replace("'open'", "'pending'"), []).unwrap_err();
    assert!(bad_hold.to_string().contains("CHECK constraint failed"), "{bad_hold}");
    assert!(c.execute("UPDATE holds SET status = 'gone' WHERE id = 3", []).is_err());
    assert!(c.execute(&RUN_INSERT.replace("'completed'", "'done'"), []).is_err());
    assert!(c.execute(&HOLD_INSERT.replace("VALUES (1,", "VALUES (99,"), []).is_err(), "the foreign key to accounts is kept");
    assert_eq!(rows_of(&c, "holds"), holds);
    assert_eq!(rows_of(&c, "runs"), runs);
    drop(c);

    // And the store goes on from there: a new hold takes the next id and settles.
    rt().block_on(async {
        let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let u = create_user(&*s, "u").await;
        let Effect::Held { hold, .. } = applied(s.hold(hold_cmd(&u, 3, 600, "h1")).await) else { panic!("not held") };
        assert_eq!(hold, HoldId(9));
        applied(s.settle(settle_cmd(hold, 2, "st1")).await);
        let b = s.balance(&u).await.unwrap();
        assert_eq!((b.total, b.held), (3, 0));
    });
}

#[test]
fn the_log_is_append_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    rt().block_on(async {
        let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        create_user(&*s, "u").await;
    });
    let c = Connection::open(&path).unwrap();
    assert!(c.execute("UPDATE ledger_entries SET d_purchased = 500", []).is_err());
    assert!(c.execute("DELETE FROM ledger_entries", []).is_err());
}

#[test]
fn verify_reports_every_difference() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    rt().block_on(async {
        let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let u = create_user(&*s, "u").await;
        create_user(&*s, "w").await;
        grant(&*s, &u, Bucket::Monthly, 10, None, "g").await;
        assert!(s.verify().await.unwrap().is_clean());
    });
    {
        // Someone edits balances behind the ledger's back, and forges a log row.
        let c = Connection::open(&path).unwrap();
        c.execute("UPDATE accounts SET purchased = purchased + 7 WHERE external_id = 'u'", []).unwrap();
        c.execute("UPDATE accounts SET held = 3 WHERE external_id = 'w'", []).unwrap();
        c.execute("UPDATE accounts SET held_cost_micros = 40 WHERE external_id = 'u'", []).unwrap();
        c.execute(
            "INSERT INTO ledger_entries (account_id, at_ms, kind, d_monthly, d_rollover, d_purchased, d_held, balance_after, held_after, reference)
             SELECT id, 0, 'grant', 1, 0, 0, 0, 999, 0, 'forged' FROM accounts WHERE external_id = 'w'",
            [],
        )
        .unwrap();
    }
    rt().block_on(async {
        let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let r = s.verify().await.unwrap();
        let mut found: Vec<(String, String, i64, i64)> =
            r.discrepancies.iter().map(|d| (d.account.to_string(), d.what.clone(), d.stored, d.from_log)).collect();
        found.sort();
        assert_eq!(
            found,
            vec![
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

/// Many OS threads, each with its own runtime, spending from one account of one file.
#[test]
fn threads_on_a_file_never_overspend() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("l.db")).unwrap());
    rt().block_on(async {
        let u = create_user(&*store, "hot").await;
        grant(&*store, &u, Bucket::Purchased, 295, None, "g").await; // 300
    });
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    let (mut ok, mut short) = (0, 0);
                    for i in 0..40 {
                        let amount = 1 + (i % 3);
                        match store.spend(spend_cmd(&acct("hot"), amount, &format!("t{t}-{i}"))).await.unwrap() {
                            Ok(_) => ok += amount,
                            Err(Rejection::InsufficientCredits { .. }) => short += 1,
                            Err(other) => panic!("{other:?}"),
                        }
                    }
                    (ok, short)
                })
            })
        })
        .collect();
    let results: Vec<(i64, i64)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let spent: i64 = results.iter().map(|r| r.0).sum();
    rt().block_on(async {
        let b = store.balance(&acct("hot")).await.unwrap();
        assert_eq!(spent + b.total, 300, "spent {spent}, left {}", b.total);
        assert!(b.total < 3, "demand (16 threads x 80 credits) exceeds supply; at most 2 can be left, got {}", b.total);
        assert!(store.verify().await.unwrap().is_clean());
    });
}

/// Many tasks spending over a few accounts of a file: the WAL's fsyncs overlap the groups after
/// them (some run on the store's sync thread), and still every caller gets its own exact outcome
/// and not a credit more is spent than there was.
#[test]
fn concurrent_spends_overlap_their_fsyncs_with_the_next_groups() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Arc::new(SqliteStore::open(dir.path().join("l.db")).unwrap());
    let store: Arc<dyn Store> = sqlite.clone();
    let rt = rt();
    rt.block_on(async {
        for a in 0..8 {
            let u = create_user(&*store, &format!("a{a}")).await;
            grant(&*store, &u, Bucket::Purchased, 95, None, &format!("g{a}")).await; // 100 each
        }
    });
    let before = sqlite.sync_stats().unwrap();
    // 32 tasks x 30 spends, each account asked for 120 credits and holding 100.
    let tasks: Vec<_> = (0..32)
        .map(|t| {
            let store = store.clone();
            rt.spawn(async move {
                let (mut ok, mut short) = (0, 0);
                for i in 0..30 {
                    match store.spend(spend_cmd(&acct(&format!("a{}", (t + i) % 8)), 1, &format!("t{t}-{i}"))).await.unwrap() {
                        Ok(_) => ok += 1,
                        Err(Rejection::InsufficientCredits { .. }) => short += 1,
                        Err(other) => panic!("{other:?}"),
                    }
                }
                (ok, short)
            })
        })
        .collect();
    let (ok, short) = rt.block_on(async {
        let mut sum = (0, 0);
        for t in tasks {
            let (o, s) = t.await.unwrap();
            sum = (sum.0 + o, sum.1 + s);
        }
        sum
    });
    assert_eq!((ok, short), (800, 160));
    rt.block_on(async {
        for a in 0..8 {
            assert_eq!(store.balance(&acct(&format!("a{a}"))).await.unwrap().total, 0);
        }
        assert!(store.verify().await.unwrap().is_clean());
    });
    let after = sqlite.sync_stats().unwrap();
    assert!(after.background_syncs > before.background_syncs, "no fsync ran beside the writer: {before:?} -> {after:?}");
    assert!(after.syncs - before.syncs <= after.groups - before.groups, "more fsyncs than groups: {before:?} -> {after:?}");
}

#[test]
fn rejections_and_replays_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    let count = |path: &std::path::Path| -> (i64, i64, i64) {
        let c = Connection::open(path).unwrap();
        let q = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
        (q("SELECT count(*) FROM ledger_entries"), q("SELECT count(*) FROM idempotency"), q("SELECT count(*) FROM usage_records"))
    };
    rt().block_on(async {
        let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let u = create_user(&*s, "u").await;
        applied(s.spend(spend_cmd(&u, 1, "s1")).await);
        let before = count(&path);
        assert_eq!(rejected(s.spend(spend_cmd(&u, 50, "s2")).await).code(), "insufficient_credits");
        assert!(s.spend(spend_cmd(&u, 1, "s1")).await.unwrap().unwrap().replayed);
        assert!(s.spend(spend_cmd(&u, 2, "s1")).await.is_err());
        assert!(s.spend(spend_cmd(&u, 0, "s3")).await.is_err());
        assert_eq!(count(&path), before);
    });
}

/// Another connection (another process) changing the file while a store is open: the store
/// notices (its cached state is dropped) and works on the new data.
#[test]
fn sees_commits_made_by_other_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    rt().block_on(async {
        let a: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let b: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let u = create_user(&*a, "u").await; // 5, and now in a's cache
        applied(a.spend(spend_cmd(&u, 1, "a1")).await);
        // b grants and spends behind a's back.
        grant(&*b, &u, Bucket::Purchased, 10, None, "b-g").await;
        applied(b.spend(spend_cmd(&u, 2, "b1")).await);
        // a sees 12 left, not its cached 4.
        match applied(a.spend(spend_cmd(&u, 12, "a2")).await) {
            Effect::Spent { balances, .. } => assert_eq!(balances.total(), 0),
            other => panic!("{other:?}"),
        }
        assert_eq!(rejected(b.spend(spend_cmd(&u, 1, "b2")).await).code(), "insufficient_credits");
        assert!(a.verify().await.unwrap().is_clean());
    });
}

/// A full disk (a capped database) in the middle of group commits: callers get backend errors,
/// nothing is half-written, the store goes on serving, and `verify()` stays clean.
#[test]
fn a_full_database_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    let mut opts = SqliteOptions::file(&path);
    // The empty schema takes 54 of these 56 pages (4 KiB each): the data soon fills the rest.
    opts.max_size_bytes = Some(224 * 1024);
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_with(opts).unwrap());
    rt().block_on(async {
        let u = create_user(&*store, "u").await;
        grant(&*store, &u, Bucket::Purchased, 1_000_000, None, "g").await;
        let (mut ok, mut full) = (0i64, 0);
        for round in 0..40 {
            let outcomes = futures_util::future::join_all((0..64).map(|i| store.spend(spend_cmd(&u, 1, &format!("r{round}-{i}-{}", "k".repeat(120)))))).await;
            for o in outcomes {
                match o {
                    Ok(Ok(_)) => ok += 1,
                    Err(Error::Backend(_)) => full += 1,
                    other => panic!("{other:?}"),
                }
            }
        }
        assert!(full > 0, "the cap was never reached");
        assert!(ok > 0);
        let b = store.balance(&u).await.unwrap();
        assert_eq!(b.total, 1_000_005 - ok, "every applied spend and only those");
        assert_eq!(rejected(store.spend(spend_cmd(&u, 10_000_000, "too-much")).await).code(), "insufficient_credits");
        let report = store.verify().await.unwrap();
        assert!(report.is_clean(), "{:?}", report.discrepancies);
    });
}

/// Every entry id of the account's history, newest first, read in pages of `limit`.
async fn history_ids(s: &dyn Store, account: &AccountId, limit: u32) -> Vec<i64> {
    let mut q = HistoryQuery::new(account.clone());
    q.limit = limit;
    let mut seen = Vec::new();
    loop {
        let page = s.history(&q).await.unwrap();
        seen.extend(page.entries.iter().map(|e| e.id.0));
        match page.next {
            Some(n) => q.before = Some(n),
            None => return seen,
        }
    }
}

/// V9 turns the history index's rows (one per entry) into rows of up to 1,024 entries of one
/// account, keeping every entry findable: history pages through all of them, newest first,
/// across rows, and verify() finds the index exact.
#[test]
fn v9_groups_the_history_index_by_account_and_keeps_every_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    const ENTRIES: i64 = 140_000;
    {
        let mut c = Connection::open(&path).unwrap();
        c.pragma_update(None, "application_id", prpm_playground_core::store::sqlite::APPLICATION_ID).unwrap();
        sqlite_migrations::migrations::runner().set_target(refinery::Target::Version(8)).run(&mut c).unwrap();
        // Two accounts, entries alternating between them (a grant of 1 each), all indexed the V2 way.
        c.execute_batch(&format!(
            "INSERT INTO accounts (id, external_id, kind, monthly, rollover, purchased, held, created_ms, updated_ms) VALUES
                 (1, 'odd', 'user', 0, 0, {half}, 0, 0, 0), (2, 'even', 'user', 0, 0, {half}, 0, 0, 0);
             WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < {ENTRIES})
             INSERT INTO ledger_entries (id, account_id, at_ms, kind, d_monthly, d_rollover, d_purchased, d_held, balance_after, held_after, source, reference)
                 SELECT x, 2 - x % 2, 1000 + x, 'grant', 0, 0, 1, 0, (x + 1) / 2, 0, 'admin', 'g' || x FROM n;
             INSERT INTO ledger_by_account (account_id, entry_id) SELECT account_id, id FROM ledger_entries;
             UPDATE ledger_index_state SET indexed_upto = {ENTRIES};",
            half = ENTRIES / 2
        ))
        .unwrap();
    }
    let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    {
        let c = Connection::open(&path).unwrap();
        let (rows, ids): (i64, i64) =
            c.query_row("SELECT count(*), sum(json_array_length(entries)) FROM ledger_by_account_batches", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        // Each account's 70,000 entries in rows of at most 1,024.
        assert_eq!((rows, ids), (2 * ((ENTRIES / 2 + 1023) / 1024), ENTRIES));
        let longest: i64 = c.query_row("SELECT max(json_array_length(entries)) FROM ledger_by_account_batches", [], |r| r.get(0)).unwrap();
        assert_eq!(longest, 1024);
        let old: i64 = c.query_row("SELECT count(*) FROM sqlite_schema WHERE name = 'ledger_by_account'", [], |r| r.get(0)).unwrap();
        assert_eq!(old, 0, "the per-entry table is gone");
    }
    rt().block_on(async {
        assert!(s.verify().await.unwrap().is_clean());
        for (name, parity) in [("odd", 1), ("even", 0)] {
            let seen = history_ids(&*s, &acct(name), 1000).await;
            let expected: Vec<i64> = (1..=ENTRIES).rev().filter(|x| x % 2 == parity).collect();
            assert_eq!(seen, expected, "{name}");
        }
        // The store goes on indexing in the new form.
        let a = acct("odd");
        applied(s.spend(spend_cmd(&a, 1, "after-v9")).await);
        assert!(s.verify().await.unwrap().is_clean());
    });
}

/// One account's entries of a batch go into rows of at most 1,024 (what a history read parses
/// is bounded whatever the batch), and history still pages through every one of them.
#[test]
fn a_hot_accounts_batch_is_indexed_in_rows_of_at_most_1024() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    let s: Arc<dyn Store> = Arc::new(SqliteStore::open_with(SqliteOptions::file(&path).history_index_batch(2_100)).unwrap());
    rt().block_on(async {
        let u = create_user(&*s, "hot").await;
        grant(&*s, &u, Bucket::Purchased, 3_000, None, "g").await;
        for i in 0..2_200 {
            applied(s.spend(spend_cmd(&u, 1, &format!("s{i}"))).await);
        }
        let seen = history_ids(&*s, &u, 500).await;
        assert!(s.verify().await.unwrap().is_clean());
        let c = Connection::open(&path).unwrap();
        let all: Vec<i64> =
            c.prepare("SELECT id FROM ledger_entries ORDER BY id DESC").unwrap().query_map([], |r| r.get(0)).unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(seen, all);
        let (rows, longest, indexed): (i64, i64, i64) = c
            .query_row("SELECT count(*), max(json_array_length(entries)), sum(json_array_length(entries)) FROM ledger_by_account_batches", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert!(indexed >= 2_100, "one batch or more was indexed ({indexed})");
        assert_eq!(longest, 1024);
        assert!(rows >= (indexed + 1023) / 1024, "{rows} rows for {indexed} entries");
    });
}

/// The per-account history index is derived data: verify() checks it against the log.
#[test]
fn verify_checks_the_history_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    let open = || SqliteStore::open_with(SqliteOptions::file(&path).history_index_batch(2)).unwrap();
    rt().block_on(async {
        let s: Arc<dyn Store> = Arc::new(open());
        let u = create_user(&*s, "u").await;
        let w = create_user(&*s, "w").await;
        for i in 0..4 {
            applied(s.spend(spend_cmd(&u, 1, &format!("u{i}"))).await);
            applied(s.spend(spend_cmd(&w, 1, &format!("w{i}"))).await);
        }
        let r = s.verify().await.unwrap();
        assert!(r.is_clean(), "{r:?}");
    });
    {
        let c = Connection::open(&path).unwrap();
        let upto: i64 = c.query_row("SELECT indexed_upto FROM ledger_index_state", [], |r| r.get(0)).unwrap();
        assert!(upto >= 8, "most entries are indexed by now ({upto})");
        // Drop one of u's indexed entries and file one of w's under u (as a row of its own, so
        // that every row keeps its shape), and index an entry under an account that does not exist.
        let first_of = |c: &Connection, who: &str| -> (i64, i64, i64) {
            c.query_row(
                "SELECT b.account_id, b.last_entry, b.entries ->> '$[0]' FROM ledger_by_account_batches b JOIN accounts a ON a.id = b.account_id
                 WHERE a.external_id = ?1 ORDER BY b.last_entry LIMIT 1",
                [who],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
        };
        let take_first = |c: &Connection, (account, last, first): (i64, i64, i64)| {
            if first == last {
                c.execute("DELETE FROM ledger_by_account_batches WHERE account_id = ?1 AND last_entry = ?2", [account, last]).unwrap();
            } else {
                c.execute(
                    "UPDATE ledger_by_account_batches SET entries = json_remove(entries, '$[0]') WHERE account_id = ?1 AND last_entry = ?2",
                    [account, last],
                )
                .unwrap();
            }
        };
        let u_first = first_of(&c, "u");
        take_first(&c, u_first);
        let w_first = first_of(&c, "w");
        take_first(&c, w_first);
        c.execute("INSERT INTO ledger_by_account_batches VALUES (?1, ?2, json_array(?2))", [u_first.0, w_first.2]).unwrap();
        c.execute("INSERT INTO ledger_by_account_batches VALUES (999, 1, '[1]')", []).unwrap();
    }
    rt().block_on(async {
        let s: Arc<dyn Store> = Arc::new(open());
        let r = s.verify().await.unwrap();
        let mut found: Vec<(String, String, i64, i64)> =
            r.discrepancies.iter().map(|d| (d.account.to_string(), d.what.clone(), d.stored, d.from_log)).collect();
        found.sort();
        let upto_w = found.iter().find(|f| f.0 == "w").map(|f| f.3).unwrap();
        let upto_u = found.iter().find(|f| f.0 == "u").map(|f| f.3).unwrap();
        assert_eq!(
            found,
            vec![
                ("(no account with internal id 999)".into(), "history index entries".into(), 1, 0),
                ("u".into(), "history index entries of this account".into(), upto_u - 1, upto_u),
                ("w".into(), "history index entries".into(), upto_w - 1, upto_w),
            ]
        );
    });
    // Rows of the wrong shape: one that is not a list of ids, one whose key is not its last id.
    let w_last = {
        let c = Connection::open(&path).unwrap();
        c.execute("UPDATE ledger_by_account_batches SET entries = 'not json' WHERE account_id = 999", []).unwrap();
        let (w, last): (i64, i64) = c
            .query_row(
                "SELECT b.account_id, max(b.last_entry) FROM ledger_by_account_batches b JOIN accounts a ON a.id = b.account_id WHERE a.external_id = 'w'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        c.execute("UPDATE ledger_by_account_batches SET last_entry = last_entry + 1 WHERE account_id = ?1 AND last_entry = ?2", [w, last]).unwrap();
        last
    };
    rt().block_on(async {
        let s: Arc<dyn Store> = Arc::new(open());
        let r = s.verify().await.unwrap();
        let found: Vec<(String, String, i64, i64)> = r.discrepancies.iter().map(|d| (d.account.to_string(), d.what.clone(), d.stored, d.from_log)).collect();
        assert!(
            found.contains(&("(no account with internal id 999)".into(), "history index batch that is not a list of ids (its key)".into(), 1, 0)),
            "{found:?}"
        );
        assert!(found.contains(&("w".into(), "history index batch key (its last id)".into(), w_last + 1, w_last)), "{found:?}");
        assert!(!found.iter().any(|f| f.0.contains("999") && f.1 == "history index entries"), "a row that is not a list counts no entries: {found:?}");
    });
}

/// History reads see every entry, indexed or not, with the index step crossing pages.
#[test]
fn history_is_the_same_whatever_the_index_batch() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut pages_by_batch = Vec::new();
        for batch in [1, 5, 64, 100_000] {
            let path = dir.path().join(format!("b{batch}.db"));
            let s: Arc<dyn Store> = Arc::new(SqliteStore::open_with(SqliteOptions::file(&path).history_index_batch(batch)).unwrap());
            // One after another: created concurrently, their first entries' ids would depend on how the
            // creations were grouped, and the runs would differ by that and not by the index batch.
            let mut accounts: Vec<AccountId> = Vec::new();
            for name in ["a", "b", "c"] {
                accounts.push(create_user(&*s, name).await);
            }
            for i in 0..60usize {
                let a = &accounts[(i * 7 + i / 5) % 3];
                if s.balance(a).await.unwrap().available > 0 {
                    applied(s.spend(spend_cmd(a, 1, &format!("s{i}"))).await);
                } else {
                    grant(&*s, a, Bucket::Purchased, 4, None, &format!("g{i}")).await;
                }
            }
            let mut all = Vec::new();
            for a in &accounts {
                let mut q = HistoryQuery::new(a.clone());
                q.limit = 4;
                loop {
                    let page = s.history(&q).await.unwrap();
                    all.extend(page.entries.iter().map(|e| (e.account.to_string(), e.id, e.kind, e.balance_after)));
                    match page.next {
                        Some(n) => q.before = Some(n),
                        None => break,
                    }
                }
                let usage = s.usage(a, 7).await.unwrap();
                all.extend(usage.iter().map(|u| (u.account.to_string(), u.entry, EntryKind::Spend, u.credits)));
            }
            assert!(s.verify().await.unwrap().is_clean());
            pages_by_batch.push(all);
        }
        assert!(pages_by_batch[0].len() > 60);
        for other in &pages_by_batch[1..] {
            assert_eq!(other, &pages_by_batch[0]);
        }
    });
}

#[test]
fn history_index_batch_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [0, prpm_playground_core::store::sqlite::MAX_HISTORY_INDEX_BATCH + 1] {
        let err = SqliteStore::open_with(SqliteOptions::file(dir.path().join("x.db")).history_index_batch(bad)).unwrap_err();
        assert_eq!(err.code(), "invalid_input", "{err}");
    }
    assert!(!dir.path().join("x.db").exists(), "a bad option creates nothing");
}

/// Alerts go to the pluggable sink once each, after they committed, as well as to the table.
#[test]
fn alerts_reach_the_sink_once() {
    use prpm_playground_core::conformance::{create_free_user, meter_cmd};
    use prpm_playground_core::cost::{Alert, AlertKind, AlertSink};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, AlertKind, i64)>>);
    impl AlertSink for Recorder {
        fn alert(&self, account: &AccountId, alert: &Alert) {
            self.0.lock().unwrap().push((account.to_string(), alert.kind, alert.cost_micros));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(Recorder::default());
    let clock = Arc::new(ManualClock::new(conformance::start()));
    let opts = SqliteOptions::file(dir.path().join("l.db")).clock(clock.clone()).alert_sink(sink.clone());
    let s: Arc<dyn Store> = Arc::new(SqliteStore::open_with(opts).unwrap());
    rt().block_on(async {
        let u = create_free_user(&*s, "u").await;
        // $0.09 a day for five days: $0.36 (nothing), then $0.45 (both alerts at once).
        for d in 0..6 {
            let m = meter_cmd(&u, 90_000, &format!("m{d}"));
            applied(s.meter(m.clone()).await);
            // A replay changes nothing and alerts nobody.
            assert!(s.meter(m).await.unwrap().unwrap().replayed);
            clock.advance(chrono::Duration::days(1));
        }
        let got = sink.0.lock().unwrap().clone();
        assert_eq!(got, vec![("u".to_string(), AlertKind::AtRisk, 450_000), ("u".to_string(), AlertKind::Threshold, 450_000)]);
        let stored = s.alerts(&store::AlertQuery { account: None, after: None, limit: 10 }).await.unwrap();
        assert_eq!(stored.len(), 2);
    });
}

/// Bytes of one WAL frame (a 4 KiB page and its header); the WAL file starts with 32 bytes.
const WAL_FRAME_BYTES: u64 = 4096 + 24;

/// A file store whose WAL is checkpointed once it holds `pages`.
fn marked(path: &std::path::Path, pages: u32) -> SqliteOptions {
    SqliteOptions { wal_autocheckpoint_pages: pages, ..SqliteOptions::file(path) }
}

/// The WAL file of the database file `db`.
fn wal_of(db: &std::path::Path) -> std::path::PathBuf {
    db.with_extension("db-wal")
}

fn wal_frames(db: &std::path::Path) -> u64 {
    std::fs::metadata(wal_of(db)).map(|m| m.len().saturating_sub(32) / WAL_FRAME_BYTES).unwrap_or(0)
}

/// Closing the store leaves the database in its one file: its last connection copies the WAL
/// back and removes it. Its connections close one after another (the checkpoint thread's, the
/// writer's, the idle readers'), never two at once: SQLite removes the WAL only in the last
/// connection to close, and two closing together each see the other and both leave it. The
/// commits cross the checkpoint mark, so the checkpoint thread has work in flight at the close.
#[test]
fn closing_the_store_removes_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    let rt = rt();
    for round in 0..200 {
        let store = SqliteStore::open_with(marked(&path, 8)).unwrap();
        rt.block_on(async {
            let u = create_user(&store, &format!("u{round}")).await;
            for g in 0..12 {
                grant(&store, &u, Bucket::Purchased, 1, None, &format!("g{round}:{g}")).await;
            }
            // Every other round, a point read and a scan: idle read connections of both kinds
            // are open at the close too.
            if round % 2 == 1 {
                assert!(store.balance(&u).await.unwrap().purchased >= 12);
                let page = store.history(&HistoryQuery { account: u.clone(), kinds: vec![], from: None, until: None, before: None, limit: 100 }).await.unwrap();
                assert!(page.entries.len() >= 12);
            }
        });
        assert!(wal_frames(&path) > 0, "the commits went through the WAL");
        drop(store);
        assert!(!wal_of(&path).exists(), "round {round}: the WAL outlived the store");
    }
}

/// The WAL is copied back into the database by the store's own checkpoint thread, not by the
/// commit that crossed the mark: once a commit leaves `wal_autocheckpoint_pages` in the WAL
/// (and well below the four times at which the writer would checkpoint itself), the database
/// file alone, copied without its WAL, soon holds every commit (the last few frames may be
/// copied by the idle writer as it starts the WAL over).
#[test]
fn a_thread_of_its_own_checkpoints_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    let pages = 64;
    // The account, then a fresh WAL: closing the store copies everything back and removes the
    // WAL (its file never shrinks, so only from empty does its size count the frames since).
    rt().block_on(async { create_user(&SqliteStore::open_with(marked(&path, pages)).unwrap(), "u").await });
    assert!(!wal_of(&path).exists(), "the WAL outlived the store");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_with(marked(&path, pages)).unwrap());
    let grants = rt().block_on(async {
        let u = acct("u");
        let mut n = 0;
        // Commit by commit, until the WAL holds more than the mark.
        while wal_frames(&path) < u64::from(pages) + 8 {
            n += 1;
            assert!(n < 200, "the WAL did not grow past {pages} pages");
            grant(&*store, &u, Bucket::Purchased, 1, None, &format!("g{n}")).await;
        }
        assert!(wal_frames(&path) < u64::from(pages) * 2, "past the writer's own bound: the test would not tell who checkpointed");
        let purchased = store.balance(&u).await.unwrap().purchased;
        assert!(purchased >= n);
        purchased
    });
    let copy = dir.path().join("copy.db");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let balance = loop {
        // The database file alone: what the checkpoints have copied back so far (a copy taken
        // in the middle of one may be unreadable; try again).
        let _ = std::fs::remove_file(dir.path().join("copy.db-wal"));
        std::fs::copy(&path, &copy).unwrap();
        let seen = Connection::open(&copy).and_then(|c| c.query_row("SELECT purchased FROM accounts WHERE external_id = 'u'", [], |r| r.get::<_, i64>(0)));
        match seen {
            Ok(b) if b == grants => break b,
            _ if std::time::Instant::now() > deadline => panic!("the database file alone has {seen:?} after {grants} grants"),
            _ => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    };
    assert_eq!(balance, grants);
}

/// However many commits, the WAL stays within four times `wal_autocheckpoint_pages` (plus one
/// group), and everything is there after reopening.
#[test]
fn the_wal_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    let pages = 32;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_with(marked(&path, pages)).unwrap());
    let mut largest = 0;
    let before = rt().block_on(async {
        let u = create_user(&*store, "u").await;
        let before = store.balance(&u).await.unwrap().purchased;
        for n in 0..400 {
            grant(&*store, &u, Bucket::Purchased, 1, None, &format!("g{n}")).await;
            largest = largest.max(wal_frames(&path));
        }
        before
    });
    assert!(largest <= 4 * u64::from(pages) + 32, "the WAL reached {largest} pages");
    drop(store);
    rt().block_on(async {
        let s = SqliteStore::open_with(marked(&path, pages)).unwrap();
        assert_eq!(s.balance(&acct("u")).await.unwrap().purchased, before + 400);
        assert!(s.verify().await.unwrap().is_clean());
    });
}

/// The first results of held, settled, released and spent commands are stored as short
/// records; other effects, and every result stored by versions before them, as JSON text.
/// Both replay to the first result; a damaged record is a typed error that writes nothing.
#[test]
fn replays_read_compact_records_and_the_json_of_earlier_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    let (held, settled, released, spent) = rt().block_on(async {
        let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let u = create_user(&*s, "u").await;
        grant(&*s, &u, Bucket::Purchased, 100, None, "g").await;
        let held = applied(s.hold(hold_cmd(&u, 4, 600, "h1")).await);
        let Effect::Held { hold: h1, .. } = held else { panic!("{held:?}") };
        let settled = applied(s.settle(settle_cmd(h1, 3, "s1")).await);
        let Effect::Held { hold: h2, .. } = applied(s.hold(hold_cmd(&u, 5, 600, "h2")).await) else { panic!() };
        let released = applied(s.release(h2, conformance::key("r2")).await);
        let spent = applied(s.spend(spend_cmd(&u, 2, "p1")).await);
        (held, settled, released, spent)
    });
    let c = Connection::open(&path).unwrap();
    let stored = |k: &str| -> (String, i64) {
        c.query_row("SELECT typeof(outcome), length(CAST(outcome AS BLOB)) FROM idempotency WHERE key = ?1", [k], |r| Ok((r.get(0)?, r.get(1)?))).unwrap()
    };
    for k in ["h1", "s1", "r2", "p1"] {
        let (kind, len) = stored(k);
        assert_eq!(kind, "blob", "{k}");
        assert!(len <= 40, "{k}: {len} bytes");
    }
    assert_eq!(stored("g").0, "text", "a grant's result is JSON");
    // What versions before the records stored: the effect's JSON.
    for (k, e) in [("h1", &held), ("s1", &settled)] {
        c.execute("UPDATE idempotency SET outcome = ?2 WHERE key = ?1", [k, &serde_json::to_string(e).unwrap()]).unwrap();
    }
    assert_eq!(stored("h1").0, "text");
    let log = |c: &Connection| -> i64 { c.query_row("SELECT count(*) FROM ledger_entries", [], |r| r.get(0)).unwrap() };
    let entries = log(&c);
    drop(c);
    rt().block_on(async {
        let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let u = acct("u");
        let Effect::Held { hold: h1, .. } = held else { unreachable!() };
        let replay = |r: Result<Outcome>| {
            let c = r.unwrap().unwrap();
            assert!(c.replayed);
            c.effect
        };
        assert_eq!(replay(s.hold(hold_cmd(&u, 4, 600, "h1")).await), held);
        assert_eq!(replay(s.settle(settle_cmd(h1, 3, "s1")).await), settled);
        let Effect::Released { hold: h2, .. } = released else { unreachable!() };
        assert_eq!(replay(s.release(h2, conformance::key("r2")).await), released);
        assert_eq!(replay(s.spend(spend_cmd(&u, 2, "p1")).await), spent);
        // A different command under a stored key is still a conflict.
        assert_eq!(s.spend(spend_cmd(&u, 1, "p1")).await.unwrap_err().code(), "idempotency_conflict");
        assert!(s.verify().await.unwrap().is_clean());
    });
    // A damaged record: the replay fails with a typed error and writes nothing.
    let c = Connection::open(&path).unwrap();
    c.execute("UPDATE idempotency SET outcome = X'0104' WHERE key = 'p1'", []).unwrap();
    drop(c);
    rt().block_on(async {
        let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let err = s.spend(spend_cmd(&acct("u"), 2, "p1")).await.unwrap_err();
        assert_eq!(err.code(), "invariant_violated", "{err}");
        assert_eq!(s.balance(&acct("u")).await.unwrap().total, 100 + 5 - 3 - 2);
    });
    assert_eq!(log(&Connection::open(&path).unwrap()), entries);
}
