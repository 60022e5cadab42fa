//! Requests per second of `prpm-server` (release build, SQLite file) for `POST /estimate` and
//! `GET /credits`, next to an axum hello-world handler measured in the same run (target: ≥ 0.5×
//! of it), and the server's resident memory idle and under that load.
//!
//! Both servers are separate processes (the hello world is this bench binary started again
//! with `PRPM_HELLO_WORLD=1`), so the load generator here shares the machine with each alike:
//! `CONCURRENCY` keep-alive connections sending requests back to back.
//!
//! `cargo bench --bench http` prints criterion's figures (time per request at that
//! concurrency) and a table of requests/s, ratios and RSS. Under `cargo test --all-targets`
//! every benchmark runs once.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::Criterion;
use prpm_playground_core::AccountId;
use prpm_playground_core::auth::{JwtKey, Role};

const CONCURRENCY: usize = 32;
const SECRET: &str = "bench-secret-bench-secret-bench-secret";

struct Proc(Child, String);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a process that prints `listening on http://ADDR` first.
fn spawn(mut cmd: Command) -> Proc {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("start server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let base = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("first line {line:?}")).to_owned();
    Proc(child, base)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

#[derive(Clone)]
struct Target {
    http: reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: Option<String>,
    body: Option<&'static str>,
}

impl Target {
    async fn once(&self) {
        let mut req = self.http.request(self.method.clone(), &self.url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = self.body {
            req = req.header("content-type", "application/json").body(b);
        }
        let res = req.send().await.expect("request");
        assert!(res.status().is_success(), "{} {}", self.url, res.status());
        res.bytes().await.expect("body");
    }

    /// `n` requests over `CONCURRENCY` connections; the elapsed time.
    async fn batch(&self, n: u64) -> Duration {
        let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let t0 = Instant::now();
        let workers: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let (me, next) = (self.clone(), next.clone());
                tokio::spawn(async move {
                    while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                        me.once().await;
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        t0.elapsed()
    }
}

fn hello_world() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "Hello, World!" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("listening on http://{}", listener.local_addr().unwrap());
        axum::serve(listener, app).await.unwrap();
    });
}

fn main() {
    if std::env::var_os("PRPM_HELLO_WORLD").is_some() {
        return hello_world();
    }
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_prpm-server"));
    server
        .env_clear()
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", dir.path().join("http.db"))
        .env("JWT_SECRET", SECRET)
        .env("PRPM_SCHEDULER", "0")
        .env("RUST_LOG", "warn");
    let server = spawn(server);
    let mut hello = Command::new(std::env::current_exe().unwrap());
    hello.env("PRPM_HELLO_WORLD", "1");
    let hello = spawn(hello);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let http = reqwest::Client::builder().pool_max_idle_per_host(CONCURRENCY).build().unwrap();
    let token = JwtKey::new(SECRET).unwrap().mint(&AccountId::new("bench-user").unwrap(), Role::User, chrono::Utc::now(), 86_400).unwrap();
    let hello_t = Target { http: http.clone(), method: reqwest::Method::GET, url: format!("{}/", hello.1), token: None, body: None };
    let credits_t = Target {
        http: http.clone(),
        method: reqwest::Method::GET,
        url: format!("{}/api/v1/playground/credits", server.1),
        token: Some(token.clone()),
        body: None,
    };
    let estimate_t = Target {
        http: http.clone(),
        method: reqwest::Method::POST,
        url: format!("{}/api/v1/playground/estimate", server.1),
        token: Some(token),
        body: Some(r#"{"userInput":"Please review this function: fn add(a: i64, b: i64) -> i64 { a + b }","model":"claude-sonnet-4-5","maxTokens":1024}"#),
    };
    // The first request creates the account.
    rt.block_on(credits_t.once());
    let rss_idle = rss_kib(server.0.id());

    let mut c = Criterion::default().configure_from_args().sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    let mut g = c.benchmark_group("http");
    g.throughput(criterion::Throughput::Elements(1));
    for (name, t) in [("axum_hello_world", &hello_t), ("get_credits", &credits_t), ("post_estimate", &estimate_t)] {
        g.bench_function(name, |b| b.iter_custom(|n| rt.block_on(t.batch(n))));
    }
    g.finish();
    c.final_summary();

    // Requests/s, interleaved rounds so drift weighs on all alike; RSS sampled under load.
    let (rounds, per_round) = if bench_mode { (5, 20_000) } else { (1, 200) };
    let mut totals = [Duration::ZERO; 3];
    let mut rss_load = 0;
    for _ in 0..rounds {
        for (i, t) in [&hello_t, &credits_t, &estimate_t].into_iter().enumerate() {
            let sampler = {
                let pid = server.0.id();
                std::thread::spawn(move || {
                    let mut max = 0;
                    for _ in 0..20 {
                        max = max.max(rss_kib(pid));
                        std::thread::sleep(Duration::from_millis(25));
                    }
                    max
                })
            };
            totals[i] += rt.block_on(t.batch(per_round));
            rss_load = rss_load.max(sampler.join().unwrap());
        }
    }
    let rps = |d: Duration| (rounds * per_round) as f64 / d.as_secs_f64();
    let hello_rps = rps(totals[0]);
    println!("\nHTTP: requests/s over {CONCURRENCY} keep-alive connections, {rounds} x {per_round} requests each, interleaved");
    println!("{:<34} {:>12} {:>10}   target", "", "requests/s", "ratio");
    println!("{:<34} {:>12.0} {:>9.2}x", "axum hello world", hello_rps, 1.0);
    println!("{:<34} {:>12.0} {:>9.2}x   >= 0.5x", "GET /api/v1/playground/credits", rps(totals[1]), rps(totals[1]) / hello_rps);
    println!("{:<34} {:>12.0} {:>9.2}x   >= 0.5x", "POST /api/v1/playground/estimate", rps(totals[2]), rps(totals[2]) / hello_rps);
    println!("prpm-server RSS: idle {} KiB, under load {} KiB", rss_idle, rss_load);
}
