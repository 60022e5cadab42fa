//! The analysis readers on both backends, against what the store itself reports per account:
//! a real SQLite file and a throw-away PostgreSQL cluster (skipped with one line without
//! PostgreSQL, unless `PRPM_REQUIRE_POSTGRES=1`).

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};

use super::postgres::PgReader;
use super::sqlite::SqliteReader;
use super::*;
use crate::clock::{Clock, ManualClock};
use crate::conformance::{acct, applied, key, run_record};
use crate::ledger::*;
use crate::pg_cluster::PgCluster;
use crate::store::postgres::{PgOptions, PgStore};
use crate::store::{DailyUsageQuery, HistoryQuery, Store};
use crate::{SqliteOptions, SqliteStore};

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 30, 22, 0, 0).unwrap()
}

fn usage(model: &str, input: u64, output: u64, cost_micros: i64) -> Usage {
    Usage { operation: "playground_run".into(), model: model.into(), tokens: TokenUsage { input, output, cache_read: 7, cache_write: 3 }, cost_micros }
}

const SONNET: &str = "claude-sonnet-4-5";
const OPUS: &str = "claude-opus-4-5";

/// Three accounts over three days (across a month's end): holds settled with usage, spends with
/// and without usage, meters, runs, a throttle; then every list checked against the store.
async fn reads_across_accounts(store: &dyn Store, reader: &dyn Analysis, clock: &ManualClock) {
    let (a, b, c) = (acct("alice"), acct("bob"), acct("carol"));
    for (u, kind) in [(&a, AccountKind::User), (&b, AccountKind::User), (&c, AccountKind::Organisation)] {
        applied(store.create_account(u.clone(), kind, key(&format!("create:{u}"))).await);
        applied(store.set_cost_profile(u.clone(), false, Some("unlimited".into()), key(&format!("tier:{u}"))).await);
        applied(
            store
                .grant(Grant {
                    account: u.clone(),
                    bucket: Bucket::Purchased,
                    amount: 500,
                    source: GrantSource::Purchase,
                    expires_at: None,
                    reference: "pack".into(),
                    key: key(&format!("grant:{u}")),
                })
                .await,
        );
    }
    let mut expected_cost: BTreeMap<(chrono::NaiveDate, String), i64> = BTreeMap::new();
    let mut runs = Vec::new();
    for day in 0..3 {
        for (i, u) in [&a, &b, &c].into_iter().enumerate() {
            let k = format!("d{day}-{u}");
            let model = if i == 1 { OPUS } else { SONNET };
            let cost = 1_000 * (day + 1) + i as i64;
            let held = match applied(
                store.hold(Hold { account: u.clone(), amount: 5, ttl_secs: 600, cost_micros: cost, reference: k.clone(), key: key(&format!("h{k}")) }).await,
            ) {
                Effect::Held { hold, .. } => hold,
                e => panic!("{e:?}"),
            };
            applied(store.settle(Settle { hold: held, credits: 2, usage: Some(usage(model, 900, 100, cost)), key: key(&format!("s{k}")) }).await);
            *expected_cost.entry((clock.now().date_naive(), u.to_string())).or_default() += cost;
            if i == 0 {
                applied(store.meter(Meter { account: u.clone(), usage: usage(SONNET, 10, 10, 5), reference: k.clone(), key: key(&format!("m{k}")) }).await);
                *expected_cost.entry((clock.now().date_naive(), u.to_string())).or_default() += 5;
                applied(store.spend(Spend { account: u.clone(), amount: 1, usage: None, reference: k.clone(), key: key(&format!("p{k}")) }).await);
            }
            let mut r = run_record(u, None, clock.now());
            r.model = model.into();
            assert!(store.record_run(&r, &[]).await.unwrap());
            runs.push(r);
            clock.advance(Duration::minutes(7));
        }
        clock.advance(Duration::hours(23));
    }
    applied(store.throttle(AdminThrottle { account: b.clone(), by: "ops".into(), why: "review".into(), key: key("throttle-b") }).await);

    // The usage log: every record, in entry order, the same whatever the page size.
    let all = reader.usage_records(&Filter::default(), None, MAX_PAGE).await.unwrap();
    assert_eq!(all.len(), 12, "9 settles + 3 meters (a spend without usage writes none)");
    assert!(all.windows(2).all(|w| w[0].entry < w[1].entry));
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = reader.usage_records(&Filter::default(), after, 5).await.unwrap();
        after = page.last().map(|r| r.entry);
        let last = page.len() < 5;
        paged.extend(page);
        if last {
            break;
        }
    }
    assert_eq!(paged, all);
    for u in [&a, &b, &c] {
        let mine: Vec<_> = all.iter().filter(|r| &r.account == u).cloned().collect();
        let f = Filter { account: Some(u.clone()), ..Filter::default() };
        assert_eq!(reader.usage_records(&f, None, 100).await.unwrap(), mine);
        // The store's own per-account usage, newest first.
        let mut from_store: Vec<(EntryId, i64, String)> =
            store.usage(u, 100).await.unwrap().into_iter().map(|r| (r.entry, r.usage.cost_micros, r.usage.model)).collect();
        from_store.reverse();
        assert_eq!(from_store, mine.iter().map(|r| (r.entry, r.cost_micros, r.model.clone())).collect::<Vec<_>>());
    }
    let opus = reader.usage_records(&Filter { model: Some(OPUS.into()), ..Filter::default() }, None, 100).await.unwrap();
    assert_eq!(opus.len(), 3);
    assert!(opus.iter().all(|r| r.account == b && r.model == OPUS && r.tokens == TokenUsage { input: 900, output: 100, cache_read: 7, cache_write: 3 }));
    // Time range: the second day only (from inclusive, until exclusive).
    let day2 = Filter { from: Some(start() + Duration::hours(24)), until: Some(start() + Duration::hours(48)), ..Filter::default() };
    let second = reader.usage_records(&day2, None, 100).await.unwrap();
    assert_eq!(second.len(), 4);
    assert!(second.iter().all(|r| r.at >= day2.from.unwrap() && r.at < day2.until.unwrap()));
    let exact = Filter { from: Some(second[0].at), until: Some(second[0].at), ..Filter::default() };
    assert!(reader.usage_records(&exact, None, 100).await.unwrap().is_empty(), "an empty range");

    // The transaction log: exactly the union of every account's history.
    let entries = reader.entries(&Filter::default(), &[], None, MAX_PAGE).await.unwrap();
    let mut from_history = Vec::new();
    for u in [&a, &b, &c] {
        let mut q = HistoryQuery::new(u.clone());
        q.limit = 1_000;
        from_history.extend(store.history(&q).await.unwrap().entries);
    }
    from_history.sort_by_key(|e| e.id);
    assert_eq!(entries, from_history);
    let settles = reader.entries(&Filter { account: Some(a.clone()), ..Filter::default() }, &[EntryKind::Settle, EntryKind::Meter], None, 100).await.unwrap();
    assert_eq!(settles.iter().map(|e| e.kind).collect::<Vec<_>>(), [EntryKind::Settle, EntryKind::Meter].repeat(3));
    let grants = reader.entries(&Filter::default(), &[EntryKind::Grant], None, 100).await.unwrap();
    assert_eq!(grants, from_history.iter().filter(|e| e.kind == EntryKind::Grant).cloned().collect::<Vec<_>>());
    assert_eq!(grants.iter().filter(|e| e.source == Some(GrantSource::Purchase) && e.delta.purchased == 500).count(), 3);
    let first = reader.entries(&Filter::default(), &[EntryKind::Grant], None, 2).await.unwrap();
    let rest = reader.entries(&Filter::default(), &[EntryKind::Grant], Some(first[1].id), 100).await.unwrap();
    assert_eq!([first, rest].concat(), grants);

    // Runs: every account's, in (at, id) order, by page; by model and time.
    let all_runs = reader.runs(&Filter::default(), None, 100).await.unwrap();
    assert_eq!(all_runs, runs);
    let page1 = reader.runs(&Filter::default(), None, 4).await.unwrap();
    let cursor = page1.last().map(|r| (r.at, r.id.clone())).unwrap();
    let page2 = reader.runs(&Filter::default(), Some(&cursor), 100).await.unwrap();
    assert_eq!([page1, page2].concat(), runs);
    for u in [&a, &b, &c] {
        let mut from_store = store.runs(u, 100).await.unwrap();
        from_store.reverse();
        assert_eq!(reader.runs(&Filter { account: Some(u.clone()), ..Filter::default() }, None, 100).await.unwrap(), from_store);
    }
    let opus_runs = reader.runs(&Filter { model: Some(OPUS.into()), from: Some(start() + Duration::hours(1)), ..Filter::default() }, None, 100).await.unwrap();
    assert_eq!(opus_runs.len(), 2);

    // Daily usage per account, across the month's end: the sums of the records, and what the
    // store reports per account.
    let range = Filter { from: Some(start() - Duration::days(1)), until: Some(start() + Duration::days(4)), ..Filter::default() };
    let daily = reader.daily_by_account(&range).await.unwrap();
    let got: BTreeMap<(chrono::NaiveDate, String), i64> = daily.iter().map(|d| ((d.day, d.account.to_string()), d.cost_micros)).collect();
    assert_eq!(got, expected_cost);
    assert_eq!(daily.len(), 9);
    assert!(daily.windows(2).all(|w| (w[0].day, w[0].account.as_str()) < (w[1].day, w[1].account.as_str())));
    for u in [&a, &b, &c] {
        let q = DailyUsageQuery { account: Some(u.clone()), from: range.from.unwrap().date_naive(), until: range.until.unwrap().date_naive() };
        let from_store: Vec<_> = store.daily_usage(&q).await.unwrap().into_iter().map(|d| (d.day, d.runs, d.credits, d.tokens, d.cost_micros)).collect();
        let mine: Vec<_> = daily.iter().filter(|d| &d.account == u).map(|d| (d.day, d.runs, d.credits, d.tokens, d.cost_micros)).collect();
        assert_eq!(mine, from_store);
    }
    let sonnet_daily = reader.daily_by_account(&Filter { model: Some(SONNET.into()), account: Some(a.clone()), ..range.clone() }).await.unwrap();
    assert_eq!(sonnet_daily.iter().map(|d| d.runs).collect::<Vec<_>>(), [2, 2, 2]);

    // Accounts: balances and plans as the store reports them.
    let accounts = reader.accounts(None, None, 100).await.unwrap();
    assert_eq!(accounts.iter().map(|r| r.account.as_str()).collect::<Vec<_>>(), ["alice", "bob", "carol"]);
    for r in &accounts {
        let bal = store.balance(&r.account).await.unwrap();
        assert_eq!((r.kind, r.monthly, r.rollover, r.purchased, r.held), (bal.kind, bal.monthly, bal.rollover, bal.purchased, bal.held));
        assert_eq!(r.plan_credits, None);
    }
    assert_eq!(reader.accounts(None, Some(&a), 1).await.unwrap()[0].account, b);
    assert_eq!(reader.accounts(Some(&c), None, 10).await.unwrap().len(), 1);
    assert!(reader.accounts(Some(&acct("nobody")), None, 10).await.unwrap().is_empty());

    // Bad input.
    let code = |r: Result<Vec<Entry>>| r.unwrap_err().code();
    assert_eq!(code(reader.entries(&Filter { model: Some(SONNET.into()), ..Filter::default() }, &[], None, 10).await), "invalid_input");
    assert_eq!(code(reader.entries(&Filter::default(), &[], None, 0).await), "invalid_input");
    assert_eq!(code(reader.entries(&Filter::default(), &[], None, MAX_PAGE + 1).await), "invalid_input");
    let backwards = Filter { from: range.until, until: range.from, ..Filter::default() };
    assert_eq!(reader.usage_records(&backwards, None, 10).await.unwrap_err().code(), "invalid_input");
    assert_eq!(reader.daily_by_account(&Filter::default()).await.unwrap_err().code(), "invalid_input");
    let long = Filter { from: Some(start()), until: Some(start() + Duration::days(MAX_DAYS + 1)), ..Filter::default() };
    assert_eq!(reader.daily_by_account(&long).await.unwrap_err().code(), "invalid_input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_reader() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("analysis.db");
    let clock = Arc::new(ManualClock::new(start()));
    let store = SqliteStore::open_with(SqliteOptions::file(&path).clock(clock.clone())).unwrap();
    let reader = SqliteReader::open(&path).unwrap();
    reads_across_accounts(&store, &reader, &clock).await;

    // What is not ours, or not there, is refused.
    assert_eq!(SqliteReader::open(dir.path().join("missing.db")).unwrap_err().code(), "not_found");
    let foreign = dir.path().join("foreign.db");
    rusqlite::Connection::open(&foreign).unwrap().execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
    assert_eq!(SqliteReader::open(&foreign).unwrap_err().code(), "not_our_database");
    let text = dir.path().join("text.db");
    std::fs::write(&text, "not a database at all, just some text that is long enough to be looked at").unwrap();
    assert_eq!(SqliteReader::open(&text).unwrap_err().code(), "not_our_database");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reader() {
    let cluster = match PgCluster::shared() {
        Ok(Some(c)) => c,
        Ok(None) => {
            eprintln!("SKIPPED: PostgreSQL is not installed here (CI installs it and sets PRPM_REQUIRE_POSTGRES=1)");
            return;
        }
        Err(e) => panic!("cannot start a PostgreSQL cluster: {e}"),
    };
    let url = cluster.create_database().await.unwrap();
    let clock = Arc::new(ManualClock::new(start()));
    let store = PgStore::open(PgOptions::new(url.clone()).clock(clock.clone()).pool_size(4)).await.unwrap();
    let reader = PgReader::connect(&url, 2).await.unwrap();
    reads_across_accounts(&store, &reader, &clock).await;

    // A database without our schema is refused.
    let empty = cluster.create_database().await.unwrap();
    assert_eq!(PgReader::connect(&empty, 1).await.unwrap_err().code(), "not_our_database");
}
