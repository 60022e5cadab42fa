//! The operator CLI (`examples/prpm_admin/`, binary `prpm-admin`), run as a real process
//! against a fresh SQLite file in a temporary directory (and once against PostgreSQL): every
//! subcommand and its `--help`, bad input (exit code, message, nothing changed), idempotent
//! repeats, the minted token verifying, the usage export matching the store, and verify.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use prpm_playground_core::auth::{JwtKey, Role, TokenError};
use prpm_playground_core::conformance::{acct, key};
use prpm_playground_core::history::csv_row;
use prpm_playground_core::pg_cluster::PgCluster;
use prpm_playground_core::store::postgres::{PgOptions, PgStore};
use prpm_playground_core::*;
use rust_decimal::Decimal;

const SUBCOMMANDS: [&str; 12] =
    ["migrate", "create-user", "create-org", "grant", "balance", "history", "throttle", "unthrottle", "job", "mint-jwt", "export-usage", "verify"];
const SECRET: &str = "a-test-secret-of-more-than-32-bytes-0123456789";

/// A temporary directory holding the database; the CLI runs in it (so no `.env` of the
/// developer's is read) with `DATABASE_URL` and `JWT_SECRET` removed from its environment.
struct Cli {
    dir: tempfile::TempDir,
    db: PathBuf,
}

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn ok(self) -> Run {
        assert_eq!(self.code, 0, "expected success: {self:?}");
        self
    }
    #[track_caller]
    fn fails(self, code: i32, message: &str) -> Run {
        assert_eq!(self.code, code, "expected exit code {code} with {message:?}: {self:?}");
        assert!(self.stderr.contains(message), "expected {message:?} on stderr: {self:?}");
        self
    }
}

impl Cli {
    fn new() -> Cli {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ledger.db");
        Cli { dir, db }
    }

    /// Runs `prpm-admin <args>` with no `--database` (so the default or `.env` applies).
    fn raw(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut c = Command::new(env!("CARGO_BIN_EXE_prpm-admin"));
        c.args(args).current_dir(self.dir.path()).env_remove("DATABASE_URL").env_remove("JWT_SECRET");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        Run { code: out.status.code().unwrap_or(-1), stdout: String::from_utf8(out.stdout).unwrap(), stderr: String::from_utf8(out.stderr).unwrap() }
    }

    /// Runs `prpm-admin --database <the test's database> <args>`.
    fn env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut all = vec!["--database", self.db.to_str().unwrap()];
        all.extend_from_slice(args);
        self.raw(&all, env)
    }

    fn run(&self, args: &[&str]) -> Run {
        self.env(args, &[])
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Opens the database with the library (while no CLI runs) and runs `f` on it.
    fn with_store<T>(&self, f: impl AsyncFnOnce(Arc<dyn Store>) -> T) -> T {
        rt().block_on(async {
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&self.db).unwrap());
            f(store).await
        })
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Every row of the ledger's tables, as text: equal snapshots mean nothing was written.
fn snapshot(db: &Path) -> String {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE).unwrap();
    let mut out = String::new();
    for table in ["accounts", "ledger_entries", "holds", "usage_records", "idempotency", "cost_alerts", "credit_debts"] {
        let mut st = c.prepare(&format!("SELECT * FROM {table} ORDER BY 1")).unwrap();
        let n = st.column_count();
        let rows: Vec<String> = st
            .query_map([], |r| (0..n).map(|i| r.get::<_, rusqlite::types::Value>(i).map(|v| format!("{v:?}"))).collect::<Result<Vec<_>, _>>())
            .unwrap()
            .map(|r| r.unwrap().join("|"))
            .collect();
        out.push_str(&format!("{table}: {}\n", rows.join("\n")));
    }
    out
}

fn migrations(backend: &str) -> usize {
    std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join(backend)).unwrap().count()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn usage(operation: &str, model: &str, cost_micros: i64) -> Usage {
    Usage { operation: operation.into(), model: model.into(), tokens: TokenUsage { input: 1_200, output: 345, cache_read: 67, cache_write: 8 }, cost_micros }
}

async fn meter(store: &dyn Store, account: &str, u: Usage, k: &str) {
    let m = Meter { account: acct(account), usage: u, reference: format!("op {k}"), key: key(k) };
    store.meter(m).await.unwrap().unwrap();
}

/// The CSV rows the export must give for these accounts (oldest first within each).
async fn expected_rows(store: &dyn Store, accounts: &[&str], keep: impl Fn(DateTime<Utc>) -> bool) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for a in accounts {
        let mut list = store.usage(&acct(a), 1_000).await.unwrap();
        list.reverse();
        for r in list.into_iter().filter(|r| keep(r.at)) {
            let t = r.usage.tokens;
            let defuse = |s: &str| if s.starts_with(['=', '+', '-', '@']) { format!("'{s}") } else { s.to_owned() };
            rows.push(vec![
                r.account.to_string(),
                rfc3339(r.at),
                r.entry.0.to_string(),
                defuse(&r.usage.operation),
                defuse(&r.usage.model),
                t.input.to_string(),
                t.output.to_string(),
                t.cache_read.to_string(),
                t.cache_write.to_string(),
                t.total().to_string(),
                r.credits.to_string(),
                Decimal::new(r.usage.cost_micros, 6).to_string(),
            ]);
        }
    }
    rows
}

fn parse_csv(text: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut r = csv::Reader::from_reader(text.as_bytes());
    let header = r.headers().unwrap().iter().map(str::to_owned).collect();
    let rows = r.records().map(|rec| rec.unwrap().iter().map(str::to_owned).collect()).collect();
    (header, rows)
}

#[test]
fn help_on_everything() {
    let cli = Cli::new();
    let top = cli.raw(&["--help"], &[]).ok();
    for sub in SUBCOMMANDS {
        assert!(top.stdout.contains(&format!("  {sub} ")), "{sub} missing from --help: {}", top.stdout);
        for args in [vec![sub, "--help"], vec!["help", sub]] {
            let r = cli.raw(&args, &[]).ok();
            assert!(r.stdout.contains(&format!("Usage: prpm-admin {sub}")), "{args:?}: {}", r.stdout);
            assert!(r.stdout.contains("Example"), "{args:?} has no example: {}", r.stdout);
        }
        // Short help too.
        let r = cli.raw(&[sub, "-h"], &[]).ok();
        assert!(r.stdout.contains("Usage:"), "{sub} -h: {}", r.stdout);
    }
    assert!(top.stdout.contains("Exit codes"), "{}", top.stdout);
    assert!(cli.raw(&["--version"], &[]).ok().stdout.starts_with("prpm-admin "));
    // Nothing to do, or an unknown command: usage on stderr, exit code 2.
    cli.raw(&[], &[]).fails(2, "Usage: prpm-admin");
    cli.raw(&["frobnicate"], &[]).fails(2, "unrecognized subcommand");
    cli.raw(&["job"], &[]).fails(2, "<JOB>");
    // Help never touches a database.
    assert!(!cli.path("prpm-playground.db").exists());
    assert_eq!(std::fs::read_dir(cli.dir.path()).unwrap().count(), 0);
}

#[test]
fn accounts_credits_balance_and_history() {
    let cli = Cli::new();
    let r = cli.run(&["migrate"]).ok();
    let n = migrations("sqlite");
    assert!(r.stdout.contains(&format!("database: SQLite file {}", cli.db.display())), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("schema version {n}: applied {n} migration(s) now: V1 ledger")), "{}", r.stdout);
    let r = cli.run(&["migrate"]).ok();
    assert!(r.stdout.contains(&format!("schema version {n}: up to date, nothing to apply")), "{}", r.stdout);
    assert_eq!(r.stdout.lines().filter(|l| l.trim_start().starts_with('V')).count(), n, "{}", r.stdout);

    // Accounts: sign-up credits; a repeat (or the other kind with the same id) changes nothing.
    let r = cli.run(&["create-user", "alice"]).ok();
    assert!(r.stdout.contains("created user alice with 5 credits"), "{}", r.stdout);
    assert!(cli.run(&["create-user", "alice"]).ok().stdout.contains("user alice exists already"));
    assert!(cli.run(&["create-org", "acme"]).ok().stdout.contains("created organisation acme with 200 credits"));
    let before = snapshot(&cli.db);
    assert!(cli.run(&["create-org", "alice"]).ok().stdout.contains("account alice exists already (a user); nothing changed"));
    assert!(cli.run(&["create-org", "acme"]).ok().stdout.contains("organisation acme exists already"));
    assert_eq!(snapshot(&cli.db), before);

    // Grants: a fresh key each time without --key or --reference; keyed by the reference.
    let r = cli.run(&["grant", "alice", "100", "--bucket", "purchased", "--source", "admin"]).ok();
    assert!(r.stdout.contains("granted 100 purchased credits to alice (source admin)"), "{}", r.stdout);
    assert!(r.stdout.contains("balance: total 105 = monthly 0 + rollover 0 + purchased 105; held 0; available 105"), "{}", r.stdout);
    assert!(r.stdout.contains("idempotency key: "), "{}", r.stdout);
    let grant_ref = ["grant", "alice", "10", "--bucket", "monthly", "--source", "bonus", "--reference", "TICKET-7"];
    assert!(cli.run(&grant_ref).ok().stdout.contains("granted 10 monthly credits"));
    let before = snapshot(&cli.db);
    let r = cli.run(&grant_ref).ok();
    assert!(r.stdout.contains("already granted with this key (nothing changed)"), "{}", r.stdout);
    cli.run(&["grant", "alice", "11", "--bucket", "monthly", "--source", "bonus", "--reference", "TICKET-7"])
        .fails(1, "was used before for a different request");
    let r = cli.run(&["grant", "alice", "12", "--bucket", "purchased", "--source", "plan", "--key", "prpm-admin:grant:alice:TICKET-7"]);
    r.fails(1, "was used before");
    assert_eq!(snapshot(&cli.db), before);
    let expires = Utc::now() + Duration::days(10);
    cli.run(&["grant", "alice", "20", "--bucket", "rollover", "--source", "bonus", "--expires", &rfc3339(expires)]).ok();
    let k = ["grant", "alice", "3", "--bucket", "purchased", "--source", "purchase", "--key", "order-991"];
    cli.run(&k).ok();
    assert!(cli.run(&k).ok().stdout.contains("already granted"));

    let (b, entries) = cli.with_store(async |s| {
        let mut q = store::HistoryQuery::new(acct("alice"));
        q.limit = 1_000;
        (s.balance(&acct("alice")).await.unwrap(), s.history(&q).await.unwrap().entries)
    });
    assert_eq!((b.monthly, b.rollover, b.purchased, b.total, b.held), (10, 20, 108, 138, 0));
    assert_eq!(b.next_expiry.map(|l| (l.amount, l.expires_at)), Some((20, clock::to_millis(expires))));
    assert_eq!(entries.len(), 5);
    let sources: Vec<&str> = entries.iter().map(|e| e.source.unwrap().as_str()).collect();
    assert_eq!(sources, ["purchase", "bonus", "bonus", "admin", "bonus"]);
    assert_eq!(entries[2].reference, "TICKET-7");

    let r = cli.run(&["balance", "alice"]).ok();
    for line in [
        "account:     alice (user)",
        "total:       138 credits = monthly 10 + rollover 20 + purchased 108",
        "held:        0 in 0 open hold(s)",
        "available:   138",
        "next expiry: 20 rollover credits at ",
        "plan:        none",
        "tier:        free",
        "cost month:  $0.00 of $0.50",
        "throttled:   no",
        "debt:        0 credits",
    ] {
        assert!(r.stdout.contains(line), "{line:?} not in {}", r.stdout);
    }
    assert!(cli.run(&["balance", "acme"]).ok().stdout.contains("account:     acme (organisation)"));

    // History: a table (newest first), filters, a limit, CSV equal to the library's rows.
    let r = cli.run(&["history", "alice"]).ok();
    assert_eq!(r.stdout.lines().count(), 1 + entries.len(), "{}", r.stdout);
    assert!(r.stdout.lines().nth(1).unwrap().contains(&format!(" {} ", entries[0].id.0)));
    let r = cli.run(&["history", "alice", "--kind", "grant", "--limit", "2"]).ok();
    assert_eq!(r.stdout.lines().count(), 3, "{}", r.stdout);
    assert!(cli.run(&["history", "alice", "--kind", "spend,throttle"]).ok().stdout.contains("no entries"));
    assert!(cli.run(&["history", "alice", "--from", "2100-01-01"]).ok().stdout.contains("no entries"));
    let r = cli.run(&["history", "alice", "--csv"]).ok();
    let (header, rows) = parse_csv(&r.stdout);
    assert_eq!(header, history::CSV_HEADER);
    assert_eq!(rows, entries.iter().map(|e| csv_row(e).to_vec()).collect::<Vec<_>>());
    let r = cli.run(&["history", "alice", "--csv", "--until", &rfc3339(entries[3].at + Duration::milliseconds(1)), "--kind", "grant"]).ok();
    let (_, rows) = parse_csv(&r.stdout);
    assert_eq!(rows, entries[3..].iter().map(|e| csv_row(e).to_vec()).collect::<Vec<_>>());

    let r = cli.run(&["verify"]).ok();
    assert!(r.stdout.contains("verify: 2 account(s), 6 log entries: clean"), "{}", r.stdout);
}

#[test]
fn bad_input_fails_clearly_and_changes_nothing() {
    let cli = Cli::new();
    // No database file: refused, and none is created.
    cli.run(&["balance", "alice"]).fails(1, "no database at");
    assert!(!cli.db.exists());
    // A file that is not ours: refused, untouched.
    let foreign = cli.path("notes.db");
    std::fs::write(&foreign, "just some notes, not a database\n".repeat(10)).unwrap();
    cli.raw(&["--database", foreign.to_str().unwrap(), "migrate"], &[]).fails(1, "not a prpm-playground database");
    assert_eq!(std::fs::read_to_string(&foreign).unwrap(), "just some notes, not a database\n".repeat(10));
    cli.raw(&["--database", "sqlite:", "migrate"], &[]).fails(2, "names no database");

    cli.run(&["migrate"]).ok();
    cli.run(&["create-user", "alice"]).ok();
    cli.run(&["grant", "alice", "50", "--bucket", "purchased", "--source", "admin"]).ok();
    let before = snapshot(&cli.db);
    fn grant<'a>(rest: &[&'a str]) -> Vec<&'a str> {
        [&["grant"][..], rest].concat()
    }
    let in_a_year = rfc3339(Utc::now() + Duration::days(365));
    // Arguments, extra environment, exit code, a part of the message.
    type Case<'a> = (Vec<&'a str>, &'a [(&'a str, &'a str)], i32, &'a str);
    let cases: Vec<Case> = vec![
        (grant(&["bob", "5", "--bucket", "purchased", "--source", "admin"]), &[], 1, "unknown account \"bob\""),
        (grant(&["alice", "-5", "--bucket", "purchased", "--source", "admin"]), &[], 2, "-5 is not in 1..=1000000000"),
        (grant(&["alice", "0", "--bucket", "purchased", "--source", "admin"]), &[], 2, "0 is not in 1..="),
        (grant(&["alice", "1.5", "--bucket", "purchased", "--source", "admin"]), &[], 2, "invalid value '1.5'"),
        (grant(&["alice", "1000000001", "--bucket", "purchased", "--source", "admin"]), &[], 2, "is not in 1..="),
        (grant(&["alice", "5", "--bucket", "gold", "--source", "admin"]), &[], 2, "[possible values: monthly, rollover, purchased]"),
        (grant(&["alice", "5", "--bucket", "purchased", "--source", "gift"]), &[], 2, "[possible values: admin, bonus, plan, purchase]"),
        (grant(&["alice", "5", "--source", "admin"]), &[], 2, "--bucket <BUCKET>"),
        (grant(&["alice", "5", "--bucket", "monthly", "--source", "admin", "--expires", "2026-12-01"]), &[], 2, "the monthly bucket does not expire"),
        (grant(&["alice", "5", "--bucket", "rollover", "--source", "admin", "--expires", "tomorrow"]), &[], 2, "RFC 3339"),
        (grant(&["alice", "5", "--bucket", "rollover", "--source", "admin", "--expires", &in_a_year]), &[], 2, "within one month"),
        (grant(&["alice", "5", "--bucket", "purchased", "--source", "admin", "--key", ""]), &[], 2, "key: must not be empty"),
        (vec!["create-user", ""], &[], 2, "account: must not be empty"),
        (vec!["create-user", "bad\u{7}id"], &[], 2, "control characters"),
        (vec!["balance", "bob"], &[], 1, "unknown account \"bob\""),
        (vec!["history", "bob"], &[], 1, "unknown account \"bob\""),
        (vec!["history", "alice", "--kind", "bonus"], &[], 2, "unknown kind; one of grant, hold"),
        (vec!["history", "alice", "--from", "2026-02-01", "--until", "2026-01-01"], &[], 2, "is after until"),
        (vec!["history", "alice", "--limit", "0"], &[], 2, "0 is not in 1.."),
        (vec!["throttle", "bob", "--by", "ops", "--reason", "x"], &[], 1, "unknown account \"bob\""),
        (vec!["throttle", "alice", "--by", "", "--reason", "x"], &[], 2, "by: must not be empty"),
        (vec!["unthrottle", "bob", "--by", "ops", "--reason", "x"], &[], 1, "unknown account \"bob\""),
        (vec!["unthrottle", "alice", "--by", "ops"], &[], 2, "--reason <TEXT>"),
        (vec!["job", "rollover"], &[], 2, "invalid value 'rollover'"),
        (vec!["mint-jwt", "alice"], &[], 2, "JWT_SECRET is not set"),
        (vec!["mint-jwt", "alice"], &[("JWT_SECRET", "too-short-a-secret")], 2, "JWT_SECRET must be at least 32 bytes; it has 18"),
        (vec!["mint-jwt", "bob"], &[("JWT_SECRET", SECRET)], 1, "unknown account \"bob\""),
        (vec!["mint-jwt", "alice", "--ttl-secs", "0"], &[("JWT_SECRET", SECRET)], 2, "0 is not in 1.."),
        (vec!["mint-jwt", "alice", "--role", "root"], &[("JWT_SECRET", SECRET)], 2, "[possible values: user, admin]"),
        (vec!["export-usage", "--account", "bob", "--out", "bob.csv"], &[], 1, "unknown account \"bob\""),
        (vec!["export-usage", "--out", "x.csv", "--from", "2026-02-01", "--until", "2026-01-01"], &[], 2, "--from is after --until"),
        (vec!["export-usage"], &[], 2, "--out <FILE>"),
    ];
    for (args, env, code, message) in cases {
        let r = cli.env(&args, env);
        assert_eq!(r.code, code, "{args:?}: {r:?}");
        assert!(r.stderr.contains(message), "{args:?}: expected {message:?} in {:?}", r.stderr);
        assert!(r.stdout.is_empty(), "{args:?} printed {:?}", r.stdout);
    }
    assert_eq!(snapshot(&cli.db), before, "a refused command changed the database");
    let left: Vec<String> = std::fs::read_dir(cli.dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!left.iter().any(|f| f.contains(".csv")), "an export left a file: {left:?}");
}

#[test]
fn throttle_and_unthrottle() {
    let cli = Cli::new();
    cli.run(&["create-user", "alice"]).ok();
    assert_eq!(cli.run(&["throttle", "alice", "--by", "ops@example.com", "--reason", "abuse report 17"]).ok().stdout.trim(), "throttled alice");
    let r = cli.run(&["balance", "alice"]).ok();
    assert!(r.stdout.contains("throttled:   yes, since ") && r.stdout.contains("by ops@example.com: abuse report 17"), "{}", r.stdout);
    let before = snapshot(&cli.db);
    assert!(cli.run(&["throttle", "alice", "--by", "ops", "--reason", "again"]).ok().stdout.contains("alice is already throttled; nothing changed"));
    assert_eq!(snapshot(&cli.db), before);
    // The throttle refuses runs.
    let refused = cli.with_store(async |s| {
        let h = Hold { account: acct("alice"), amount: 1, ttl_secs: 60, cost_micros: 0, reference: "r".into(), key: key("h1") };
        s.hold(h).await.unwrap()
    });
    assert!(matches!(refused, Err(Rejection::Throttled { .. })), "{refused:?}");

    assert_eq!(cli.run(&["unthrottle", "alice", "--by", "ops@example.com", "--reason", "resolved"]).ok().stdout.trim(), "unthrottled alice");
    let before = snapshot(&cli.db);
    let r = cli.run(&["unthrottle", "alice", "--by", "ops@example.com", "--reason", "resolved"]).ok();
    assert_eq!(r.stdout.trim(), "alice is not throttled; nothing changed");
    assert_eq!(snapshot(&cli.db), before);
    // A key replays: nothing more happens.
    cli.run(&["throttle", "alice", "--by", "ops", "--reason", "x", "--key", "t-1"]).ok();
    assert!(cli.run(&["throttle", "alice", "--by", "ops", "--reason", "x", "--key", "t-1"]).ok().stdout.contains("already done with this key"));
    cli.run(&["unthrottle", "alice", "--by", "ops", "--reason", "y"]).ok();

    let (cost, log) = cli.with_store(async |s| {
        let mut q = store::HistoryQuery::new(acct("alice"));
        q.kinds = vec![EntryKind::Throttle, EntryKind::Unthrottle];
        (s.cost(&acct("alice")).await.unwrap(), s.history(&q).await.unwrap().entries)
    });
    assert!(cost.throttle.is_none());
    assert_eq!(log.len(), 4);
    assert!(log[3].reference.contains("ops@example.com") && log[3].reference.contains("abuse report 17"), "{:?}", log[3].reference);
    let r = cli.run(&["history", "alice", "--kind", "throttle,unthrottle"]).ok();
    assert_eq!(r.stdout.lines().count(), 5, "{}", r.stdout);
}

#[test]
fn jobs_run_now_and_once() {
    let cli = Cli::new();
    for a in ["holder", "roller", "subscriber"] {
        cli.run(&["create-user", a]).ok();
    }
    let soon = Utc::now() + Duration::seconds(4);
    cli.run(&["grant", "roller", "7", "--bucket", "rollover", "--source", "bonus", "--expires", &rfc3339(soon)]).ok();
    cli.with_store(async |s| {
        let h = Hold { account: acct("holder"), amount: 2, ttl_secs: 1, cost_micros: 0, reference: "run".into(), key: key("hold-1") };
        s.hold(h).await.unwrap().unwrap();
        let plan = PlanTerms { monthly_credits: 60, period_end: soon, anchor_day: None };
        s.set_plan(acct("subscriber"), Some(plan), key("plan-1")).await.unwrap().unwrap();
        meter(&*s, "subscriber", usage("embedding", "text-embedding-3-small", 1_500), "m-1").await;
    });
    std::thread::sleep((soon - Utc::now()).to_std().unwrap_or_default() + std::time::Duration::from_millis(300));

    for job in ["expire-holds", "expire-rollover", "monthly-rollover"] {
        let r = cli.run(&["job", job]).ok();
        assert_eq!(r.stdout.trim(), format!("job {job}: 1 account(s) due, 1 applied, 0 deferred (open holds), 0 failed"));
        // Idempotent: a second run finds nothing.
        let r = cli.run(&["--quiet", "job", job]).ok();
        assert_eq!(r.stdout.trim(), format!("job {job}: 0 account(s) due, 0 applied, 0 deferred (open holds), 0 failed"));
    }
    assert_eq!(cli.run(&["job", "refresh-analytics"]).ok().stdout.trim(), "job refresh-analytics: 1 usage record(s) rolled up");
    assert_eq!(cli.run(&["job", "refresh-analytics"]).ok().stdout.trim(), "job refresh-analytics: 0 usage record(s) rolled up");
    assert!(cli.run(&["job", "cost-reset"]).ok().stdout.contains("job cost-reset: 0 account(s) due"));

    let (holder, roller, subscriber, verify) = cli.with_store(async |s| {
        (
            s.balance(&acct("holder")).await.unwrap(),
            s.balance(&acct("roller")).await.unwrap(),
            s.balance(&acct("subscriber")).await.unwrap(),
            s.verify().await.unwrap(),
        )
    });
    assert_eq!((holder.held, holder.available, holder.open_holds), (0, 5, 0));
    assert_eq!((roller.rollover, roller.total), (0, 5));
    let plan = subscriber.plan.unwrap();
    assert!(plan.period_end > Utc::now(), "the period moved on: {plan:?}");
    assert_eq!((subscriber.monthly, subscriber.rollover), (60, 60));
    assert!(verify.is_clean(), "{:?}", verify.discrepancies);
}

#[test]
fn minted_tokens_verify() {
    let cli = Cli::new();
    cli.run(&["create-user", "alice"]).ok();
    let key = JwtKey::new(SECRET).unwrap();
    let r = cli.env(&["mint-jwt", "alice", "--role", "admin", "--ttl-secs", "600"], &[("JWT_SECRET", SECRET)]).ok();
    assert_eq!(r.stdout.lines().count(), 1, "the token only: {:?}", r.stdout);
    let token = r.stdout.trim();
    let now = Utc::now();
    let claims = key.verify(token, now).unwrap();
    assert_eq!((claims.sub.as_str(), claims.role, claims.exp - claims.iat), ("alice", Role::Admin, 600));
    assert!((claims.iat - now.timestamp()).abs() < 60, "{claims:?}");
    assert_eq!(key.verify(token, now + Duration::seconds(601)), Err(TokenError::Expired));
    assert_eq!(JwtKey::new("another-secret-that-is-also-32-bytes-long").unwrap().verify(token, now), Err(TokenError::Signature));

    let token = cli.env(&["mint-jwt", "alice"], &[("JWT_SECRET", SECRET)]).ok().stdout;
    let claims = key.verify(token.trim(), Utc::now()).unwrap();
    assert_eq!((claims.role, claims.exp - claims.iat), (Role::User, 3_600));
    // An id that is not an account, on request.
    let token = cli.env(&["mint-jwt", "ops-admin", "--role", "admin", "--no-account-check"], &[("JWT_SECRET", SECRET)]).ok().stdout;
    assert_eq!(key.verify(token.trim(), Utc::now()).unwrap().sub.as_str(), "ops-admin");

    // The .env file of the current directory: its database and its secret; the environment wins.
    std::fs::write(cli.path(".env"), format!("# operator settings\nDATABASE_URL={}\nJWT_SECRET=\"{SECRET}\"\n", cli.db.display())).unwrap();
    let token = cli.raw(&["mint-jwt", "alice"], &[]).ok().stdout;
    assert_eq!(key.verify(token.trim(), Utc::now()).unwrap().sub.as_str(), "alice");
    assert!(cli.raw(&["balance", "alice"], &[]).ok().stdout.contains("account:     alice (user)"));
    cli.raw(&["balance", "alice"], &[("DATABASE_URL", "elsewhere.db")]).fails(1, "no database at elsewhere.db");
    cli.raw(&["mint-jwt", "alice"], &[("JWT_SECRET", "short")]).fails(2, "at least 32 bytes");
    std::fs::write(cli.path(".env"), "THIS LINE IS NOT A SETTING\n").unwrap();
    cli.raw(&["balance", "alice"], &[]).fails(2, ".env");
}

#[test]
fn usage_export_matches_the_store() {
    let cli = Cli::new();
    for a in ["a1", "a2", "a3"] {
        cli.run(&["create-user", a]).ok();
    }
    let mid = cli.with_store(async |s| {
        meter(&*s, "a1", usage("embedding", "text-embedding-3-small", 1_234_567), "m1").await;
        meter(&*s, "a2", usage("playground_run", "=HYPERLINK(\"x\")", 10), "m2").await;
        // A settled run (credits and cost) too.
        let h = Hold { account: acct("a2"), amount: 3, ttl_secs: 60, cost_micros: 0, reference: "run".into(), key: key("h") };
        let Effect::Held { hold, .. } = s.hold(h).await.unwrap().unwrap().effect else { panic!() };
        let settle = Settle { hold, credits: 2, usage: Some(usage("playground_run", "claude-sonnet-4-5", 999_999)), key: key("s") };
        s.settle(settle).await.unwrap().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        let mid = clock::to_millis(Utc::now());
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        meter(&*s, "a1", usage("summary", "gpt-4o", 0), "m3").await;
        mid
    });
    let all = cli.with_store(async |s| expected_rows(&*s, &["a1", "a2", "a3"], |_| true).await);
    assert_eq!(all.len(), 4);
    assert!(all.iter().any(|r| r[11] == "1.234567") && all.iter().any(|r| r[11] == "0.000010") && all.iter().any(|r| r[11] == "0.999999"));
    assert!(all.iter().any(|r| r[4] == "'=HYPERLINK(\"x\")"), "formulas are defused: {all:?}");

    let r = cli.run(&["export-usage", "--out", "usage.csv"]).ok();
    assert!(r.stdout.is_empty());
    assert!(r.stderr.contains("exported 4 usage record(s) of 2 account(s) to usage.csv"), "{}", r.stderr);
    let (header, rows) = parse_csv(&std::fs::read_to_string(cli.path("usage.csv")).unwrap());
    assert_eq!(
        header,
        [
            "account",
            "at",
            "entry",
            "operation",
            "model",
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "tokens",
            "credits",
            "cost_usd"
        ]
    );
    assert_eq!(rows, all);
    let settled = rows.iter().find(|r| r[11] == "0.999999").unwrap();
    assert_eq!((settled[0].as_str(), settled[9].as_str(), settled[10].as_str()), ("a2", "1620", "2"));

    // One account, to stdout; a time range.
    let r = cli.run(&["export-usage", "--account", "a2", "--out", "-", "--quiet"]).ok();
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    assert_eq!(parse_csv(&r.stdout).1, all.iter().filter(|r| r[0] == "a2").cloned().collect::<Vec<_>>());
    let r = cli.run(&["export-usage", "--from", &rfc3339(mid), "--out", "-"]).ok();
    assert_eq!(parse_csv(&r.stdout).1, cli.with_store(async |s| expected_rows(&*s, &["a1", "a2"], |t| t >= mid).await));
    assert_eq!(parse_csv(&r.stdout).1.len(), 1);
    let r = cli.run(&["export-usage", "--until", &rfc3339(mid), "--out", "-"]).ok();
    assert_eq!(parse_csv(&r.stdout).1.len(), 3);
    let r = cli.run(&["export-usage", "--account", "a3", "--out", "-"]).ok();
    assert_eq!(parse_csv(&r.stdout).1.len(), 0);
    // No temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(cli.dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.contains("partial")), "{names:?}");
}

/// The usage records of an account straight from the SQLite file, oldest first: (entry id,
/// cost in micro-dollars).
fn stored_usage(db: &std::path::Path, account: &str) -> Vec<(i64, i64)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut stmt = c
        .prepare("SELECT u.entry_id, u.cost_micros FROM usage_records u JOIN accounts a ON a.id = u.account_id WHERE a.external_id = ?1 ORDER BY u.entry_id")
        .unwrap();
    stmt.query_map([account], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
}

#[test]
fn usage_export_pages_past_the_stores_page_size() {
    let cli = Cli::new();
    cli.run(&["create-user", "big"]).ok();
    cli.run(&["create-user", "small"]).ok();
    // 2,100 records: more than two of the store's pages of 1,000.
    let mid = cli.with_store(async |s| {
        for chunk in 0..21 {
            let ms = (0..100).map(|i| {
                let m = Meter { account: acct("big"), usage: usage("op", "m", 1), reference: String::new(), key: key(&format!("b{chunk}-{i}")) };
                s.meter(m)
            });
            for r in futures_util::future::join_all(ms).await {
                r.unwrap().unwrap();
            }
        }
        meter(&*s, "small", usage("op", "m", 5), "s1").await;
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        let mid = clock::to_millis(Utc::now());
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        for i in 0..3 {
            meter(&*s, "big", usage("op", "m", 2), &format!("late-{i}")).await;
        }
        mid
    });
    let (big, small) = (stored_usage(&cli.db, "big"), stored_usage(&cli.db, "small"));
    assert_eq!((big.len(), small.len()), (2_103, 1));
    let exported = |rows: &[Vec<String>], account: &str| -> Vec<(i64, i64)> {
        rows.iter()
            .filter(|r| r[0] == account)
            .map(|r| (r[2].parse().unwrap(), (r[11].parse::<rust_decimal::Decimal>().unwrap() * rust_decimal::Decimal::from(1_000_000)).try_into().unwrap()))
            .collect()
    };

    // Everything, in order, nothing twice, nothing left out.
    let r = cli.run(&["export-usage", "--out", "all.csv"]).ok();
    assert!(r.stderr.contains("exported 2104 usage record(s) of 2 account(s) to all.csv"), "{}", r.stderr);
    let (_, rows) = parse_csv(&std::fs::read_to_string(cli.path("all.csv")).unwrap());
    assert_eq!(rows.len(), 2_104);
    assert_eq!(exported(&rows, "big"), big);
    assert_eq!(exported(&rows, "small"), small);
    assert_eq!(rows.iter().position(|r| r[0] == "small"), Some(2_103), "accounts in id order: big, then small");

    // A range: only the late records, though the export pages backwards through the others.
    let r = cli.run(&["export-usage", "--from", &rfc3339(mid), "--out", "late.csv"]).ok();
    let (_, rows) = parse_csv(&std::fs::read_to_string(cli.path("late.csv")).unwrap());
    assert_eq!(rows.len(), 3, "{}", r.stderr);
    assert_eq!(exported(&rows, "big"), big[2_100..]);
    // Up to the middle: every early record of both accounts.
    let r = cli.run(&["export-usage", "--until", &rfc3339(mid), "--out", "-", "--quiet"]).ok();
    let (_, rows) = parse_csv(&r.stdout);
    assert_eq!(exported(&rows, "big"), big[..2_100]);
    assert_eq!(exported(&rows, "small"), small);
}

#[test]
fn verify_is_clean_and_finds_tampering() {
    let cli = Cli::new();
    cli.run(&["create-user", "alice"]).ok();
    cli.run(&["create-org", "acme"]).ok();
    cli.run(&["grant", "alice", "100", "--bucket", "purchased", "--source", "admin"]).ok();
    let r = cli.run(&["verify"]).ok();
    assert_eq!(r.stdout.trim(), "verify: 2 account(s), 3 log entries: clean");
    {
        let c = rusqlite::Connection::open(&cli.db).unwrap();
        c.execute("UPDATE accounts SET purchased = purchased + 7 WHERE external_id = 'alice'", []).unwrap();
    }
    let r = cli.run(&["verify"]).fails(1, "the ledger does not match its log");
    assert!(r.stdout.contains("verify: 2 account(s), 3 log entries: 1 discrepancies"), "{}", r.stdout);
    assert!(r.stdout.contains("  alice: purchased: stored 112, from the log 105"), "{}", r.stdout);
}

/// The connection string of a cluster database as a `postgresql://` URL (its unix socket
/// directory percent-encoded as the host).
fn pg_url(conninfo: &str) -> String {
    let kv: HashMap<&str, &str> = conninfo.split_whitespace().filter_map(|p| p.split_once('=')).collect();
    format!("postgresql://{}@{}:{}/{}", kv["user"], kv["host"].replace('/', "%2F"), kv["port"], kv["dbname"])
}

#[test]
fn the_cli_on_postgres() {
    let cluster = match PgCluster::shared() {
        Ok(Some(c)) => c,
        Ok(None) => {
            eprintln!("SKIPPED: PostgreSQL is not installed here (CI installs it and sets PRPM_REQUIRE_POSTGRES=1)");
            return;
        }
        Err(e) => panic!("cannot start a PostgreSQL cluster: {e}"),
    };
    let rt = rt();
    let conninfo = rt.block_on(cluster.create_database()).unwrap();
    let url = pg_url(&conninfo);
    let cli = Cli::new();
    let pg = |args: &[&str]| cli.raw(&[&["--database", url.as_str()][..], args].concat(), &[("JWT_SECRET", SECRET)]);

    let n = migrations("postgres");
    let r = pg(&["migrate"]).ok();
    assert!(r.stdout.contains("database: PostgreSQL database t"), "{}", r.stdout);
    assert!(!r.stdout.contains("postgresql://"), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("schema version {n}: applied {n} migration(s) now: V1 ledger")), "{}", r.stdout);
    assert!(pg(&["migrate"]).ok().stdout.contains(&format!("schema version {n}: up to date")));
    assert!(pg(&["create-user", "alice"]).ok().stdout.contains("created user alice with 5 credits"));
    assert!(pg(&["create-user", "alice"]).ok().stdout.contains("exists already"));
    assert!(pg(&["create-org", "acme"]).ok().stdout.contains("with 200 credits"));
    pg(&["grant", "alice", "100", "--bucket", "purchased", "--source", "admin", "--reference", "T-1"]).ok();
    assert!(pg(&["grant", "alice", "100", "--bucket", "purchased", "--source", "admin", "--reference", "T-1"]).ok().stdout.contains("already granted"));
    pg(&["grant", "bob", "1", "--bucket", "purchased", "--source", "admin"]).fails(1, "unknown account \"bob\"");
    assert!(pg(&["balance", "alice"]).ok().stdout.contains("total:       105 credits = monthly 0 + rollover 0 + purchased 105"));
    // The key=value form opens PostgreSQL too.
    assert!(cli.raw(&["--database", &conninfo, "balance", "acme"], &[]).ok().stdout.contains("account:     acme (organisation)"));

    let store: Arc<dyn Store> = Arc::new(rt.block_on(PgStore::open(PgOptions::new(url.clone()))).unwrap());
    rt.block_on(meter(&*store, "alice", usage("playground_run", "claude-opus-4-1", 42_000), "pg-m1"));
    let r = pg(&["export-usage", "--out", "-"]).ok();
    assert_eq!(parse_csv(&r.stdout).1, rt.block_on(expected_rows(&*store, &["acme", "alice"], |_| true)));
    assert!(r.stdout.lines().any(|l| l.starts_with("alice,") && l.ends_with(",0.042000")), "{}", r.stdout);
    let r = pg(&["history", "alice", "--csv"]).ok();
    assert_eq!(parse_csv(&r.stdout).1.len(), 3);

    assert_eq!(pg(&["throttle", "alice", "--by", "ops", "--reason", "test"]).ok().stdout.trim(), "throttled alice");
    assert_eq!(pg(&["unthrottle", "alice", "--by", "ops", "--reason", "test"]).ok().stdout.trim(), "unthrottled alice");
    assert!(pg(&["unthrottle", "alice", "--by", "ops", "--reason", "test"]).ok().stdout.contains("not throttled"));
    for job in ["expire-holds", "expire-rollover", "monthly-rollover", "cost-reset"] {
        assert!(pg(&["job", job]).ok().stdout.contains(&format!("job {job}: 0 account(s) due")));
    }
    assert_eq!(pg(&["job", "refresh-analytics"]).ok().stdout.trim(), "job refresh-analytics: 1 usage record(s) rolled up");
    let token = pg(&["mint-jwt", "alice"]).ok().stdout;
    assert_eq!(JwtKey::new(SECRET).unwrap().verify(token.trim(), Utc::now()).unwrap().sub.as_str(), "alice");
    assert!(pg(&["verify"]).ok().stdout.contains("verify: 2 account(s)"));
    assert!(rt.block_on(store.verify()).unwrap().is_clean());
}
