//! The library's own overhead for one playground run on SQLite, and the tokenizer.
//!
//! A run here is everything the library does: read the package and the session, count the
//! input tokens, estimate, admission and hold (a commit), the provider call, settle, record the
//! run and append its two turns to the session (one commit). The provider is a local instant
//! responder (`provider::fake`, keep-alive HTTP/1.1 on loopback). The library's own time is
//! each run's time minus its provider call (`RunResult::provider_micros`, measured by the
//! library around the call); whole runs, the responder's round trip alone and the disk's
//! fsync alone are reported too. Measured twice: with `synchronous=FULL` (each commit waits
//! for an fsync of the WAL: the disk's latency, twice per run) and with `synchronous=NORMAL`
//! (durable against a process crash, not a power loss: the library's own work).
//!
//! `cargo bench --bench playground` prints criterion's figures, then a table of latency
//! percentiles over many runs (targets: the library's own time per run, p99 under 1 ms;
//! counting a 20,000-token input under 5 ms). Under `cargo test --all-targets` every benchmark
//! runs once on a few runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use prpm_playground_core::conformance::{applied, create_user, key};
use prpm_playground_core::playground::{Playground, RunRequest, StorePackages};
use prpm_playground_core::pricing::{Pricing, TokenUsage};
use prpm_playground_core::provider::fake::{self, FakeProvider, Reply};
use prpm_playground_core::provider::tokens::Counter;
use prpm_playground_core::provider::{ApiKey, ChatMessage, ChatRequest, ClientConfig, ProviderClient};
use prpm_playground_core::*;

const MODEL: &str = "claude-sonnet-4-5";
/// Runs per session before the next one starts (the history sent grows with each).
const RUNS_PER_SESSION: u32 = 10;

struct Bench {
    rt: tokio::runtime::Runtime,
    play: Playground,
    client: ProviderClient,
    account: AccountId,
    session: Option<SessionId>,
    runs_in_session: u32,
    _fake: FakeProvider,
    _dir: tempfile::TempDir,
}

impl Bench {
    fn new(sync: Synchronous) -> Bench {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("bench-data");
        std::fs::create_dir_all(&data).unwrap();
        let dir = tempfile::tempdir_in(&data).unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_with(SqliteOptions::file(dir.path().join("playground.db")).synchronous(sync)).unwrap());
        let (fake, client, account) = rt.block_on(async {
            let fake = FakeProvider::start().await.unwrap();
            fake.set_default(Reply::ok(fake::anthropic_message(MODEL, "Looks fine to me.", TokenUsage { input: 900, output: 120, ..Default::default() })));
            let cfg = ClientConfig { base_url: fake.url(), ..ClientConfig::anthropic(ApiKey::new("sk-bench").unwrap()) };
            let client = ProviderClient::new(cfg).unwrap();
            store
                .put_package(&Package { id: "pkg".into(), name: "@prpm/reviewer".into(), version: "1.0.0".into(), prompt: "You review code. ".repeat(40) })
                .await
                .unwrap();
            let a = create_user(&*store, "bench").await;
            applied(
                store
                    .grant(Grant {
                        account: a.clone(),
                        bucket: Bucket::Purchased,
                        amount: 1_000_000_000,
                        source: GrantSource::Admin,
                        expires_at: None,
                        reference: "bench".into(),
                        key: key("bench-grant"),
                    })
                    .await,
            );
            (fake, client, a)
        });
        let play = Playground::new(store.clone(), Pricing::default(), Arc::new(StorePackages(store))).with_client(client.clone());
        Bench { rt, play, client, account, session: None, runs_in_session: 0, _fake: fake, _dir: dir }
    }

    /// One run; returns its latency and its provider call's (within it).
    fn run_parts(&mut self) -> (Duration, Duration) {
        if self.runs_in_session >= RUNS_PER_SESSION {
            self.session = None;
            self.runs_in_session = 0;
        }
        let req = RunRequest {
            account: self.account.clone(),
            package_id: Some("pkg".into()),
            session: self.session.clone(),
            input: "Please review: fn add(a: i64, b: i64) -> i64 { a + b }".into(),
            model: MODEL.into(),
            temperature: None,
            max_tokens: Some(1_024),
            run_id: None,
        };
        let t0 = Instant::now();
        let r = self.rt.block_on(self.play.run(req)).unwrap().unwrap();
        let e = t0.elapsed();
        self.session = r.session;
        self.runs_in_session += 1;
        (e, Duration::from_micros(r.provider_micros))
    }

    /// One run; returns its latency.
    fn run(&mut self) -> Duration {
        self.run_parts().0
    }

    /// The provider alone: one call to the instant responder.
    fn round_trip(&self) -> Duration {
        let req = ChatRequest {
            model: MODEL.into(),
            system: Some("You review code.".into()),
            messages: vec![ChatMessage { role: Role::User, content: "Please review".into() }],
            max_tokens: 1_024,
            temperature: None,
        };
        let t0 = Instant::now();
        self.rt.block_on(self.client.complete(&req)).unwrap();
        t0.elapsed()
    }
}

/// About `tokens` tokens of varied English and code, exactly `tokens` in o200k.
fn text_of(tokens: u64) -> String {
    let words = [
        "the",
        "ledger",
        "holds",
        "credits",
        "for",
        "each",
        "run",
        "and",
        "settles",
        "them",
        "when",
        "provider",
        "reports",
        "usage",
        "fn",
        "main()",
        "{",
        "}",
        "let",
        "x",
        "=",
        "42;",
        "println!(\"{x}\");",
        "rollover",
        "expires",
        "after",
        "one",
        "month,",
        "purchased",
        "credits",
        "never",
        "do.",
    ];
    let mut s = String::new();
    let mut i = 0usize;
    while Counter::O200k.count(&s) < tokens {
        for _ in 0..200 {
            s.push_str(words[(i * 7 + i / 3) % words.len()]);
            s.push(if i % 17 == 0 { '\n' } else { ' ' });
            if i % 29 == 0 {
                s.push_str(&format!("{} ", i * 31));
            }
            i += 1;
        }
    }
    // The longest prefix of at most `tokens` tokens, by bisection over character boundaries.
    let ends: Vec<usize> = s.char_indices().map(|(i, _)| i).chain([s.len()]).collect();
    let (mut lo, mut hi) = (0, ends.len() - 1);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if Counter::O200k.count(&s[..ends[mid]]) <= tokens { lo = mid } else { hi = mid - 1 }
    }
    s.truncate(ends[lo]);
    s
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn row(label: &str, mut v: Vec<Duration>, target: &str) {
    if v.is_empty() {
        return;
    }
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{label:<44} {:>9.0} {:>9.0} {:>9.0} {:>9.0}   {target}",
        us(percentile(&v, 0.5)),
        us(percentile(&v, 0.9)),
        us(percentile(&v, 0.99)),
        us(*v.last().unwrap())
    );
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let mut full = Bench::new(Synchronous::Full);
    let mut normal = Bench::new(Synchronous::Normal);
    let text = text_of(20_000);

    let mut c = Criterion::default().configure_from_args().sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    let mut g = c.benchmark_group("playground");
    g.bench_function("run_sqlite_full_instant_provider", |bn| bn.iter_custom(|n| (0..n).map(|_| full.run()).sum()));
    g.bench_function("run_sqlite_normal_instant_provider", |bn| bn.iter_custom(|n| (0..n).map(|_| normal.run()).sum()));
    g.bench_function("provider_round_trip_alone", |bn| bn.iter_custom(|n| (0..n).map(|_| full.round_trip()).sum()));
    g.bench_function("count_20k_tokens_o200k", |bn| bn.iter(|| Counter::O200k.count(&text)));
    g.bench_function("count_20k_tokens_cl100k", |bn| bn.iter(|| Counter::Cl100k.count(&text)));
    g.bench_function("count_20k_tokens_claude_approximation", |bn| bn.iter(|| Counter::Approximate.count(&text)));
    g.finish();
    c.final_summary();

    // Percentiles: runs and round trips interleaved, so the disk's drift weighs on both.
    let n: usize = std::env::var("PRPM_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(if bench_mode { 3_000 } else { 5 });
    let (mut runs_full, mut runs_normal, mut trips) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    // Each run's own time: the run minus its provider call (the responder's round trip, which
    // is the provider's part, not the library's).
    let (mut own_full, mut own_normal) = (Vec::with_capacity(n), Vec::with_capacity(n));
    // The disk alone: what a `FULL` commit waits for beyond `NORMAL`'s work, an fsync of the
    // frames just written (16 KiB rewritten in place in a 1 MiB file beside the database, as a
    // WAL is reused after a checkpoint).
    let mut fsyncs = Vec::with_capacity(n);
    let probe = {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(full._dir.path().join("fsync-probe")).unwrap();
        f.write_all(&vec![0u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        f
    };
    let frames = vec![7u8; 16 << 10];
    for i in 0..n {
        let (run, call) = full.run_parts();
        runs_full.push(run);
        own_full.push(run.saturating_sub(call));
        let (run, call) = normal.run_parts();
        runs_normal.push(run);
        own_normal.push(run.saturating_sub(call));
        trips.push(full.round_trip());
        let t0 = Instant::now();
        std::os::unix::fs::FileExt::write_all_at(&probe, &frames, (i % 64 * frames.len()) as u64).unwrap();
        probe.sync_data().unwrap();
        fsyncs.push(t0.elapsed());
    }
    let count = |counter: Counter| {
        (0..if bench_mode { 200 } else { 2 })
            .map(|_| {
                let t0 = Instant::now();
                std::hint::black_box(counter.count(std::hint::black_box(&text)));
                t0.elapsed()
            })
            .collect::<Vec<_>>()
    };
    println!("\nPlayground: latency in microseconds ({n} runs each on a SQLite file in WAL mode; provider: a local instant responder)");
    println!("{:<44} {:>9} {:>9} {:>9} {:>9}   target", "", "p50", "p90", "p99", "max");
    row("library's own time, synchronous=FULL", own_full, "p99 < 1,000");
    row("library's own time, synchronous=NORMAL", own_normal, "p99 < 1,000");
    row("whole run, synchronous=FULL (2 fsyncs)", runs_full, "");
    row("whole run, synchronous=NORMAL", runs_normal, "");
    row("  the provider round trip alone", trips, "");
    row("  the disk alone: write 16 KiB, fdatasync", fsyncs, "");
    row("count a 20,000-token input, o200k", count(Counter::O200k), "< 5,000");
    row("count a 20,000-token input, cl100k", count(Counter::Cl100k), "< 5,000");
    row("count a 20,000-token input, Claude approx.", count(Counter::Approximate), "< 5,000");
    for b in [&full, &normal] {
        let report = b.rt.block_on(b.play.store().verify()).unwrap();
        assert!(report.is_clean(), "{:?}", report.discrepancies);
    }
}
