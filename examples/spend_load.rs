//! A load generator: `callers` concurrent tasks spending 1 credit at a time from `accounts`
//! accounts of one SQLite file; prints the throughput and checks `verify()`.
//! `PRPM_LOAD=pairs` makes each operation a hold and its settle.
//! `PRPM_SYNCHRONOUS=normal` opens the file with `synchronous=NORMAL` (no fsyncs).
//!
//! ```text
//! cargo run --release --example spend_load -- [db-path] [callers] [spends] [accounts]
//! ```

use std::sync::Arc;
use std::time::Instant;

use prpm_playground_core::*;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).cloned().unwrap_or_else(|| "spend-load.db".into());
    let callers: usize = args.get(2).map_or(Ok(64), |s| s.parse())?;
    let spends: usize = args.get(3).map_or(Ok(50_000), |s| s.parse())?;
    let accounts: usize = args.get(4).map_or(Ok(1_000), |s| s.parse())?;
    let sqlite = Arc::new(match path.as_str() {
        ":memory:" => SqliteStore::open_in_memory()?,
        // PRPM_SYNCHRONOUS=normal: no fsyncs (what they cost, by difference).
        _ if std::env::var("PRPM_SYNCHRONOUS").is_ok_and(|v| v.eq_ignore_ascii_case("normal")) => {
            SqliteStore::open_with(SqliteOptions::file(&path).synchronous(Synchronous::Normal))?
        }
        // PRPM_CHECKPOINT_PAGES: the WAL's checkpoint mark (default 4,000 pages).
        _ => {
            let mut opts = SqliteOptions::file(&path);
            if let Ok(pages) = std::env::var("PRPM_CHECKPOINT_PAGES") {
                opts.wal_autocheckpoint_pages = pages.parse()?;
            }
            SqliteStore::open_with(opts)?
        }
    });
    let store: Arc<dyn Store> = sqlite.clone();
    let id = |i: usize| AccountId::new(format!("load-{i:05}")).unwrap();
    for i in 0..accounts {
        store.create_account(id(i), AccountKind::User, IdempotencyKey::new(format!("load-create-{i}"))?).await?.ok();
        // Load tests measure the ledger: no hourly request limit.
        store.set_cost_profile(id(i), false, Some("unlimited".into()), IdempotencyKey::new(format!("load-unlimited-{i}"))?).await?.ok();
        let g = Grant {
            account: id(i),
            bucket: Bucket::Purchased,
            amount: 1_000_000_000,
            source: GrantSource::Admin,
            expires_at: None,
            reference: "load".into(),
            key: IdempotencyKey::new(format!("load-grant-{i}"))?,
        };
        store.grant(g).await?.ok();
    }
    // PRPM_LOAD=pairs: each operation is a hold and its settle instead of a spend.
    let pairs = std::env::var("PRPM_LOAD").is_ok_and(|v| v == "pairs");
    let per = spends.div_ceil(callers);
    // The setup's commits are not the load's: its figures are told apart from these.
    let sync0 = sqlite.sync_stats().unwrap_or_default();
    let ckpt0 = sqlite.checkpoint_stats();
    let inline0 = sqlite.inline_commits();
    let cpu0 = thread_cpu();
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let store = store.clone();
            tokio::spawn(async move {
                for k in 0..per {
                    let account = id((c * 7919 + k * 104_729) % accounts);
                    let usage = Some(Usage {
                        operation: "playground_run".into(),
                        model: "claude-sonnet-4-5".into(),
                        tokens: TokenUsage { input: 1_200, output: 400, cache_read: 0, cache_write: 0 },
                        cost_micros: 9_600,
                    });
                    if !pairs {
                        let s = Spend { account, amount: 1, usage, reference: "load".into(), key: IdempotencyKey::generate() };
                        store.spend(s).await.unwrap().unwrap();
                        continue;
                    }
                    let h = Hold { account, amount: 4, ttl_secs: 600, cost_micros: 0, reference: "load".into(), key: IdempotencyKey::generate() };
                    let Effect::Held { hold, .. } = store.hold(h).await.unwrap().unwrap().effect else { panic!("not held") };
                    store.settle(Settle { hold, credits: 1, usage, key: IdempotencyKey::generate() }).await.unwrap().unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let e = t0.elapsed();
    let n = per * callers;
    let what = if pairs { "hold + settle pairs" } else { "spends" };
    println!("{n} {what} by {callers} callers over {accounts} accounts in {e:.2?}: {:.0} {what}/s", n as f64 / e.as_secs_f64());
    if let Some(s) = sqlite.sync_stats() {
        println!(
            "{} groups ({} committed on a caller's thread), {} fsyncs of the WAL ({} on the sync thread)",
            s.groups - sync0.groups,
            sqlite.inline_commits() - inline0,
            s.syncs - sync0.syncs,
            s.background_syncs - sync0.background_syncs
        );
    }
    if let (Some(c), Some(c0)) = (sqlite.checkpoint_stats(), ckpt0) {
        println!(
            "WAL started over {} times between groups ({} tries), {} times at the bound",
            c.early_restarts - c0.early_restarts,
            c.early_tries - c0.early_tries,
            c.bound_restarts - c0.bound_restarts
        );
    }
    // CPU time per thread during the run (Linux: /proc), to see which thread limits it.
    let cpu1 = thread_cpu();
    let mut by_name: std::collections::BTreeMap<String, f64> = Default::default();
    for (tid, (name, t1)) in &cpu1 {
        let t0 = cpu0.get(tid).map_or(0.0, |(_, t)| *t);
        *by_name.entry(name.clone()).or_default() += t1 - t0;
    }
    let busy: Vec<String> = by_name.iter().filter(|(_, s)| **s > 0.0).map(|(n, s)| format!("{n} {:.0}%", 100.0 * s / e.as_secs_f64())).collect();
    if !busy.is_empty() {
        println!("CPU by thread (share of the run's wall time): {}", busy.join(", "));
    }
    let report = store.verify().await?;
    println!("verify: {}", if report.is_clean() { "clean" } else { "DIFFERENCES" });
    Ok(())
}

/// Each thread's CPU seconds (user + system), by thread id, with its name. Empty off Linux.
fn thread_cpu() -> std::collections::HashMap<String, (String, f64)> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return out };
    for t in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else { continue };
        // `pid (comm) state ppid ...`: after the closing parenthesis, the state (field 3) is at
        // index 0, so utime (field 14) and stime (field 15) are at indices 11 and 12.
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        let name = head.split_once('(').map_or("", |(_, n)| n).to_string();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        out.insert(t.file_name().to_string_lossy().into_owned(), (name, (ticks(11) + ticks(12)) / 100.0));
    }
    out
}
