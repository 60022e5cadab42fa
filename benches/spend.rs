//! The SQLite spend paths against a hand-written baseline, measured in the same run.
//!
//! Every database is a file in WAL mode with `synchronous=FULL` (one fsync per commit).
//! The baseline is the straightforward design: per spend one transaction that selects the
//! account's buckets, updates them, inserts a log row and a usage row, and commits. Beside it,
//! as a yardstick for group commit, the same statements 64 spends to a transaction on one
//! thread: what SQLite itself does with the baseline's work grouped.
//!
//! `cargo bench --bench spend` prints criterion's figures, then runs every workload again in
//! interleaved rounds (so the disk's drifting fsync latency weighs on all alike) and prints a
//! table of throughputs and ratios to the baseline. Under `cargo test --all-targets` each
//! benchmark runs once on small data (the 10-million-row log shrinks to 10,000 rows unless
//! `PRPM_BENCH_LOG_ROWS` is set).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use prpm_playground_core::conformance::{acct, key};
use prpm_playground_core::*;
use rusqlite::{Connection, params};

const ACCOUNTS: usize = 1_000;
const CALLERS: usize = 64;
const START_CREDITS: i64 = 1_000_000_000;

static SEQ: AtomicU64 = AtomicU64::new(0);

/// The keys an application generates for its own runs: time-ordered, unique across runs too
/// (the big-log database is kept between runs).
fn next_key() -> IdempotencyKey {
    IdempotencyKey::generate()
}

/// Keys as a caller might bring them from elsewhere: 128 random-looking bits (like UUIDv4).
fn random_key() -> IdempotencyKey {
    static RUN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let run = *RUN.get_or_init(|| chrono::Utc::now().timestamp_micros() as u64);
    let splitmix = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let a = splitmix(run ^ SEQ.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x2545_F491_4F6C_DD1D));
    key(&format!("{a:016x}{:016x}", splitmix(a)))
}

fn account(i: usize) -> AccountId {
    acct(&format!("acct-{i:05}"))
}

fn usage() -> Usage {
    Usage {
        operation: "playground_run".into(),
        model: "claude-sonnet-4-5".into(),
        tokens: TokenUsage { input: 1_200, output: 400, cache_read: 0, cache_write: 0 },
        cost_micros: 9_600,
    }
}

fn spend_cmd(i: usize) -> Spend {
    Spend { account: account(i), amount: 1, usage: Some(usage()), reference: "bench".into(), key: next_key() }
}

fn spend_cmd_random_key(i: usize) -> Spend {
    Spend { key: random_key(), ..spend_cmd(i) }
}

// ---------------------------------------------------------------------------------------------
// Baseline

struct Baseline {
    conn: Connection,
}

impl Baseline {
    fn open(path: &Path) -> Baseline {
        let conn = Connection::open(path).unwrap();
        conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)).unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS credits (account_id TEXT PRIMARY KEY, monthly INTEGER NOT NULL, rollover INTEGER NOT NULL, purchased INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS transactions (id INTEGER PRIMARY KEY, account_id TEXT NOT NULL, at_ms INTEGER NOT NULL, kind TEXT NOT NULL,
                 d_monthly INTEGER NOT NULL, d_rollover INTEGER NOT NULL, d_purchased INTEGER NOT NULL, balance_after INTEGER NOT NULL, reference TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS transactions_by_account ON transactions (account_id, id);
             CREATE TABLE IF NOT EXISTS usage (id INTEGER PRIMARY KEY, account_id TEXT NOT NULL, at_ms INTEGER NOT NULL, model TEXT NOT NULL,
                 input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, credits INTEGER NOT NULL, cost_micros INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS usage_by_account ON usage (account_id, id);",
        )
        .unwrap();
        let tx = conn.unchecked_transaction().unwrap();
        for i in 0..ACCOUNTS {
            tx.execute("INSERT OR IGNORE INTO credits VALUES (?1, 0, 0, ?2)", params![account(i).as_str(), START_CREDITS]).unwrap();
        }
        tx.commit().unwrap();
        Baseline { conn }
    }

    /// One spend, the plain way.
    fn spend(&mut self, i: usize, amount: i64) {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).unwrap();
        Baseline::write(&tx, i, amount);
        tx.commit().unwrap();
    }

    /// One spend per account of `accounts`, the same statements, in one transaction: what SQLite itself
    /// does with the baseline's work when commits are grouped (no rules, no idempotency, no
    /// hand-off between threads).
    fn spend_group(&mut self, accounts: impl Iterator<Item = usize>, amount: i64) {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).unwrap();
        for i in accounts {
            Baseline::write(&tx, i, amount);
        }
        tx.commit().unwrap();
    }

    /// The reads and writes of one spend: select the buckets, update them, insert a log row
    /// and a usage row.
    fn write(tx: &rusqlite::Transaction<'_>, i: usize, amount: i64) {
        let a = account(i);
        let now = chrono::Utc::now().timestamp_millis();
        let (m, r, p): (i64, i64, i64) = tx
            .prepare_cached("SELECT monthly, rollover, purchased FROM credits WHERE account_id = ?1")
            .unwrap()
            .query_row([a.as_str()], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .unwrap();
        assert!(m + r + p >= amount, "baseline account ran dry");
        let tm = amount.min(m);
        let tr = (amount - tm).min(r);
        let tp = amount - tm - tr;
        tx.prepare_cached("UPDATE credits SET monthly = ?2, rollover = ?3, purchased = ?4 WHERE account_id = ?1")
            .unwrap()
            .execute(params![a.as_str(), m - tm, r - tr, p - tp])
            .unwrap();
        tx.prepare_cached(
            "INSERT INTO transactions (account_id, at_ms, kind, d_monthly, d_rollover, d_purchased, balance_after, reference) VALUES (?1, ?2, 'spend', ?3, ?4, ?5, ?6, 'bench')",
        )
        .unwrap()
        .execute(params![a.as_str(), now, -tm, -tr, -tp, m + r + p - amount])
        .unwrap();
        let u = usage();
        tx.prepare_cached(
            "INSERT INTO usage (account_id, at_ms, model, input_tokens, output_tokens, credits, cost_micros) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .unwrap()
        .execute(params![a.as_str(), now, u.model, u.tokens.input as i64, u.tokens.output as i64, amount, u.cost_micros])
        .unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Ours

/// `PRPM_BENCH_INLINE=0`: every command through the writer thread (see
/// `SqliteOptions::inline_commits`), for comparison.
fn open_store(path: &Path) -> Arc<dyn Store> {
    let mut opts = SqliteOptions::file(path).synchronous(Synchronous::Full);
    opts.inline_commits = std::env::var("PRPM_BENCH_INLINE").map_or(true, |v| v != "0");
    Arc::new(SqliteStore::open_with(opts).unwrap())
}

async fn seed_accounts(store: &dyn Store) {
    let creates = (0..ACCOUNTS).map(|i| async move {
        let a = account(i);
        store.create_account(a.clone(), AccountKind::User, key(&format!("create-{i}"))).await.unwrap().ok();
        // The bench measures spends, not the free tier's ten requests an hour.
        store.set_cost_profile(a.clone(), false, Some("unlimited".into()), key(&format!("unlimited-{i}"))).await.unwrap().ok();
        let g = Grant {
            account: a,
            bucket: Bucket::Purchased,
            amount: START_CREDITS,
            source: GrantSource::Admin,
            expires_at: None,
            reference: "bench".into(),
            key: key(&format!("grant-{i}")),
        };
        store.grant(g).await.unwrap().unwrap();
    });
    futures_util::future::join_all(creates).await;
}

/// Fills the log (and the usage and idempotency tables, as that many spends would) with
/// `rows` rows spread over the accounts, directly in SQL. Zero-credit rows, so balances stay.
fn fill_log(path: &Path, rows: u64) {
    let conn = Connection::open(path).unwrap();
    let have: i64 = conn.query_row("SELECT count(*) FROM ledger_entries", [], |r| r.get(0)).unwrap();
    if have as u64 >= rows {
        return;
    }
    let t0 = Instant::now();
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -1000000;").unwrap();
    let tx = conn.unchecked_transaction().unwrap();
    let n = rows - have as u64;
    tx.execute(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?1)
         INSERT INTO ledger_entries (account_id, at_ms, kind, d_monthly, d_rollover, d_purchased, d_held, balance_after, held_after, reference)
         SELECT 1 + (x % ?2), 1700000000000 + x, 'spend', 0, 0, 0, 0, ?3, 0, 'history' FROM c",
        params![n as i64, ACCOUNTS as i64, START_CREDITS + 5],
    )
    .unwrap();
    tx.execute(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?1)
         INSERT INTO usage_records (account_id, at_ms, entry_id, operation, model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, credits, cost_micros)
         SELECT 1 + (x % ?2), 1700000000000 + x, x, 'playground_run', 'claude-sonnet-4-5', 1200, 400, 0, 0, 0, 0 FROM c",
        params![n as i64, ACCOUNTS as i64],
    )
    .unwrap();
    tx.execute(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?1)
         INSERT INTO idempotency (key, fingerprint, outcome, at_ms) SELECT printf('history-%010d', x), x, '{}', 1700000000000 + x FROM c",
        params![n as i64],
    )
    .unwrap();
    // Indexed by account, as the writer would have done along the way.
    let (upto, last): (i64, i64) =
        tx.query_row("SELECT indexed_upto, (SELECT max(id) FROM ledger_entries) FROM ledger_index_state", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    prpm_playground_core::store::sqlite::index_log(&tx, upto, last).unwrap();
    tx.execute("UPDATE ledger_index_state SET indexed_upto = ?1", [last]).unwrap();
    tx.commit().unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
    drop(conn);
    // Wait for the kernel to write the new pages back, or the first measurements pay for it.
    std::fs::File::open(path).unwrap().sync_all().unwrap();
    eprintln!("filled the log with {n} rows in {:.1?}", t0.elapsed());
}

/// Runs `iters` operations spread over `callers` concurrent tasks; returns the wall time.
fn concurrent<F, Fut>(rt: &tokio::runtime::Runtime, callers: usize, iters: u64, op: F) -> (u64, Duration)
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let per = iters.div_ceil(callers as u64).max(1);
    rt.block_on(async move {
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|c| {
                let op = op.clone();
                tokio::spawn(async move {
                    for i in 0..per {
                        op(c, i).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        (per * callers as u64, t0.elapsed())
    })
}

fn pick(c: usize, i: u64) -> usize {
    (c * 7919 + i as usize * 104_729) % ACCOUNTS
}

async fn hold_settle(store: &dyn Store, i: usize) {
    let h = match store
        .hold(Hold { account: account(i), amount: 4, ttl_secs: 600, cost_micros: 0, reference: "bench".into(), key: next_key() })
        .await
        .unwrap()
        .unwrap()
        .effect
    {
        Effect::Held { hold, .. } => hold,
        other => panic!("{other:?}"),
    };
    store.settle(Settle { hold: h, credits: 1, usage: Some(usage()), key: next_key() }).await.unwrap().unwrap();
}

/// The measured workloads. Each runs `n` operations (spends, or hold + settle pairs) and
/// returns (operations done, wall time).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Load {
    BaselineSingle,
    /// The baseline's statements, `CALLERS` spends per transaction, one thread: SQLite's own
    /// ceiling for group commit of this work on this machine (not a target; a yardstick).
    BaselineGrouped,
    SpendSingle,
    HoldSettleSingle,
    SpendSingleBigLog,
    Spend64,
    Spend64RandomKeys,
    HoldSettle64,
}

impl Load {
    const ALL: [Load; 8] = [
        Load::BaselineSingle,
        Load::BaselineGrouped,
        Load::SpendSingle,
        Load::HoldSettleSingle,
        Load::SpendSingleBigLog,
        Load::Spend64,
        Load::Spend64RandomKeys,
        Load::HoldSettle64,
    ];

    fn name(self) -> &'static str {
        match self {
            Load::BaselineSingle => "baseline_single",
            Load::BaselineGrouped => "baseline_grouped_64",
            Load::SpendSingle => "spend_single",
            Load::HoldSettleSingle => "hold_settle_single",
            Load::SpendSingleBigLog => "spend_single_big_log",
            Load::Spend64 => "spend_64_callers",
            Load::Spend64RandomKeys => "spend_64_callers_random_keys",
            Load::HoldSettle64 => "hold_settle_64_callers",
        }
    }
}

struct Bench {
    rt: Arc<tokio::runtime::Runtime>,
    baseline: Baseline,
    store: Arc<dyn Store>,
    big: Arc<dyn Store>,
    next: usize,
    /// Side connections to our two files, for checkpoints between timed bursts.
    ours_files: Vec<Connection>,
}

impl Bench {
    /// Checkpoints every database's WAL, so that each burst pays for copying back what it wrote
    /// itself, and nothing an earlier burst of another workload left in a shared WAL.
    ///
    /// `RESTART`, not `TRUNCATE`: the next commit writes at the start of the WAL file, over
    /// frames already copied back, as in any long-running use (SQLite never shrinks the WAL
    /// by itself). A WAL truncated to nothing makes each commit of the next burst grow the
    /// file, and its fsync then also commits the file system's journal (the new size): that
    /// cost ~100 µs a commit here, for the baseline and for us alike, and no steady state has it.
    fn checkpoint(&self) {
        self.baseline.conn.execute_batch("PRAGMA wal_checkpoint(RESTART);").unwrap();
        for c in &self.ours_files {
            c.execute_batch("PRAGMA wal_checkpoint(RESTART);").unwrap();
        }
    }

    fn run(&mut self, load: Load, n: u64) -> (u64, Duration) {
        match load {
            Load::BaselineSingle => {
                let t0 = Instant::now();
                for _ in 0..n {
                    self.next = (self.next + 1) % ACCOUNTS;
                    self.baseline.spend(self.next, 1);
                }
                (n, t0.elapsed())
            }
            Load::BaselineGrouped => {
                let t0 = Instant::now();
                let mut done = 0;
                while done < n {
                    let k = (n - done).min(CALLERS as u64);
                    let start = self.next;
                    self.next = (self.next + 1) % ACCOUNTS;
                    self.baseline.spend_group((0..k).map(|j| pick(start, j)), 1);
                    done += k;
                }
                (n, t0.elapsed())
            }
            Load::SpendSingle | Load::SpendSingleBigLog | Load::HoldSettleSingle => {
                let s = if load == Load::SpendSingleBigLog { self.big.clone() } else { self.store.clone() };
                let start = self.next;
                self.next = (self.next + n as usize) % ACCOUNTS;
                self.rt.block_on(async move {
                    let t0 = Instant::now();
                    for k in 0..n {
                        let i = (start + k as usize) % ACCOUNTS;
                        if load == Load::HoldSettleSingle {
                            hold_settle(&*s, i).await;
                        } else {
                            s.spend(spend_cmd(i)).await.unwrap().unwrap();
                        }
                    }
                    (n, t0.elapsed())
                })
            }
            Load::Spend64 | Load::Spend64RandomKeys => {
                let s = self.store.clone();
                concurrent(&self.rt, CALLERS, n, move |c, k| {
                    let s = s.clone();
                    async move {
                        let cmd = if load == Load::Spend64 { spend_cmd(pick(c, k)) } else { spend_cmd_random_key(pick(c, k)) };
                        s.spend(cmd).await.unwrap().unwrap();
                    }
                })
            }
            Load::HoldSettle64 => {
                let s = self.store.clone();
                concurrent(&self.rt, CALLERS, n, move |c, k| {
                    let s = s.clone();
                    async move { hold_settle(&*s, pick(c, k)).await }
                })
            }
        }
    }
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let log_rows: u64 = std::env::var("PRPM_BENCH_LOG_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(if bench_mode { 10_000_000 } else { 10_000 });
    let rounds: u64 = std::env::var("PRPM_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(if bench_mode { 15 } else { 1 });
    let data_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("bench-data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let scratch = tempfile::tempdir_in(&data_dir).unwrap();

    let rt = Arc::new(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap());
    let baseline = Baseline::open(&scratch.path().join("baseline.db"));
    let store = open_store(&scratch.path().join("ours.db"));
    rt.block_on(seed_accounts(&*store));

    // The big log lives across runs (building it takes a while); spends add to it harmlessly.
    let big_path = data_dir.join(format!("log-{log_rows}.db"));
    {
        let s = open_store(&big_path);
        // Keyed: a database kept from an earlier run replays what it has and gains what is
        // new (the unlimited tier, when it was built before cost control).
        rt.block_on(seed_accounts(&*s));
    }
    fill_log(&big_path, log_rows);
    let big = open_store(&big_path);
    let ours_files = [scratch.path().join("ours.db"), big_path.clone()].iter().map(|p| Connection::open(p).unwrap()).collect();
    let mut bench = Bench { rt: rt.clone(), baseline, store: store.clone(), big, next: 0, ours_files };

    // 1. Criterion's own figures, one workload after the other.
    let mut c = Criterion::default().configure_from_args().sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    let mut g = c.benchmark_group("sqlite_spend");
    g.throughput(Throughput::Elements(1));
    for load in Load::ALL {
        g.bench_function(load.name(), |b| {
            b.iter_custom(|iters| {
                let (ops, e) = bench.run(load, iters);
                e.mul_f64(iters as f64 / ops as f64)
            })
        });
    }
    g.finish();
    c.final_summary();

    // 2. The ratios, from rounds that interleave every workload, so that the disk's drifting
    //    fsync latency weighs on all of them alike. Each burst is timed with the checkpoint of
    //    what it wrote (the steady-state cost of WAL mode), and starts from empty WALs.
    let mut totals: BTreeMap<Load, (u64, Duration)> = BTreeMap::new();
    // Of each workload's time, the closing checkpoints.
    let mut checkpoints: BTreeMap<Load, Duration> = BTreeMap::new();
    bench.checkpoint();
    let per_round: u64 = if bench_mode { 400 } else { 8 };
    for round in 0..rounds {
        for k in 0..Load::ALL.len() {
            let load = Load::ALL[(k + round as usize) % Load::ALL.len()];
            let n = match load {
                Load::BaselineGrouped | Load::Spend64 | Load::Spend64RandomKeys | Load::HoldSettle64 => per_round * 8,
                Load::HoldSettleSingle => per_round / 2,
                _ => per_round,
            };
            let (ops, e) = bench.run(load, n);
            let t0 = Instant::now();
            bench.checkpoint();
            let closing = t0.elapsed();
            *checkpoints.entry(load).or_default() += closing;
            let e = e + closing;
            let t = totals.entry(load).or_default();
            t.0 += ops;
            t.1 += e;
        }
    }
    let report = rt.block_on(store.verify()).unwrap();
    assert!(report.is_clean(), "{:?}", report.discrepancies);

    let rate = |load: Load| totals.get(&load).map(|(n, t)| *n as f64 / t.as_secs_f64()).unwrap_or(f64::NAN);
    let base = rate(Load::BaselineSingle);
    println!("\nSQLite spend paths (file, WAL, synchronous=FULL): operations per second over {rounds} interleaved rounds");
    let ckpt = |load: Load| checkpoints.get(&load).zip(totals.get(&load)).map(|(c, (_, t))| 100.0 * c.as_secs_f64() / t.as_secs_f64()).unwrap_or(f64::NAN);
    println!("{:<46} {:>10} {:>9} {:>9} {:>11}", "workload", "ops/s", "ratio", "target", "checkpoint");
    for (load, label, target) in [
        (Load::BaselineSingle, "baseline: plain SQL transaction per spend", "1.00"),
        (Load::SpendSingle, "spend, single caller", ">= 0.70"),
        (Load::HoldSettleSingle, "hold + settle pairs, single caller", ">= 0.35"),
        (Load::BaselineGrouped, "  yardstick: baseline's SQL, 64 per transaction", ""),
        (Load::Spend64, "spend, 64 callers over 1,000 accounts", ">= 10"),
        (Load::Spend64RandomKeys, "  the same, random (UUIDv4-like) keys", ""),
        (Load::HoldSettle64, "hold + settle pairs, 64 callers", ">= 5"),
    ] {
        println!("{label:<46} {:>10.0} {:>8.2}x {target:>9} {:>10.0}%", rate(load), rate(load) / base, ckpt(load));
    }
    println!(
        "{:<46} {:>10.0} {:>8.2}x {:>9}",
        format!("spend, single caller, {log_rows} log rows"),
        rate(Load::SpendSingleBigLog),
        rate(Load::SpendSingle) / rate(Load::SpendSingleBigLog),
        "<= 1.5"
    );
    println!("(ratios to the baseline's throughput; the last is the time per spend with the big log over the time with an empty log;");
    println!(" checkpoint: the share of the workload's time spent in the checkpoint that closes each burst)");
}
