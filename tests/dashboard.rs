//! The admin dashboard (`GET /admin`, `examples/server/dashboard.html`) in headless Chromium.
//!
//! Seeds a fresh SQLite file through the library, starts the real `prpm-server` binary on a
//! loopback port, and drives Debian's Chromium through chromedriver's WebDriver HTTP API
//! (hand-written HTTP/1.1 on a `TcpStream`): the page without a token and with a user's token
//! shows the auth message and no figures; with an admin token (passed in the URL fragment) it
//! shows the figures the store gives, one chart element per day, the lists of users, and its
//! Unthrottle button lifts the throttle (checked in the store and in the page).
//!
//! Skips with one line without `/usr/bin/chromium` and `/usr/bin/chromedriver`, unless
//! `PRPM_REQUIRE_BROWSER=1` (set by `.ci/run`, which installs them). With
//! `PRPM_DASHBOARD_SCREENSHOT=<file.png>` it also saves a screenshot of the seeded dashboard
//! (`docs/dashboard.png` is made that way).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{NaiveDate, Utc};
use prpm_playground_core::auth::{JwtKey, Role as AuthRole};
use prpm_playground_core::conformance::{acct, applied, cents, create_free_user, create_plus_user, grant, key, meter_cmd, usage_of};
use prpm_playground_core::cost::TierLimits;
use prpm_playground_core::*;
use rust_decimal::Decimal;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const SECRET: &str = "dashboard-test-secret-of-at-least-32-bytes";
const WAIT: Duration = Duration::from_secs(30);

/// Micro-dollars as the server writes them (`api::usd`): exact, at least two decimals.
fn usd(micros: i64) -> String {
    let mut d = Decimal::new(micros, 6).normalize();
    if d.scale() < 2 {
        d.rescale(2);
    }
    d.to_string()
}

// ---- HTTP/1.1 by hand -------------------------------------------------------------------------

/// One request on a fresh connection; the body is JSON or empty. The response is read up to
/// its `Content-Length` (chromedriver keeps the connection open after `Connection: close`),
/// through its last chunk, or to the end of the stream.
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<(u16, Value)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let mut read = |raw: &mut Vec<u8>| -> std::io::Result<bool> {
        let n = s.read(&mut buf)?;
        raw.extend_from_slice(&buf[..n]);
        Ok(n > 0)
    };
    let split = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if !read(&mut raw)? {
            return Err(std::io::Error::other("connection closed before the end of the headers"));
        }
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    let header = |name: &str| head.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()));
    let length = header("content-length:").and_then(|v| v.parse::<usize>().ok());
    let chunked = header("transfer-encoding:").is_some_and(|v| v.contains("chunked"));
    loop {
        let have = raw.len() - split - 4;
        let done = match (length, chunked) {
            (Some(n), _) => have >= n,
            (None, true) => raw.ends_with(b"0\r\n\r\n"),
            (None, false) => false,
        };
        if done || !read(&mut raw)? {
            break;
        }
    }
    let mut payload = raw[split + 4..].to_vec();
    if let Some(n) = length {
        payload.truncate(n);
    } else if chunked {
        payload = dechunk(&payload);
    }
    let value = if payload.iter().all(u8::is_ascii_whitespace) { Value::Null } else { serde_json::from_slice(&payload).map_err(std::io::Error::other)? };
    Ok((status, value))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ---- processes --------------------------------------------------------------------------------

/// A child process killed when dropped; its log file is printed if the test is failing.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last lines of the {} log ({}):", self.name, self.log.display());
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Starts `prpm-server` on a free loopback port and returns it with its base URL.
fn start_server(dir: &Path, db: &Path) -> (Proc, String) {
    let log = dir.join("server.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_prpm-server"))
        .current_dir(dir) // no `.env` of the developer's
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", db)
        .env("JWT_SECRET", SECRET)
        .env("PRPM_SCHEDULER", "0")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start prpm-server");
    let stdout = child.stdout.take().unwrap();
    let proc = Proc { name: "prpm-server", child, log };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("listening on ") {
                let _ = tx.send(url.trim().to_owned());
            }
        }
    });
    let url = rx.recv_timeout(WAIT).expect("prpm-server printed no `listening on` line");
    (proc, url)
}

/// A WebDriver session of headless Chromium; ends the session and chromedriver when dropped.
struct Browser {
    port: u16,
    session: String,
    _driver: Proc,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(self.port, "DELETE", &format!("/session/{}", self.session), None);
    }
}

impl Browser {
    fn start(dir: &Path) -> Browser {
        let port = free_port();
        let log = dir.join("chromedriver.log");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let driver = Proc { name: "chromedriver", child, log };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok((200, v)) = http(port, "GET", "/status", None)
                && v["value"]["ready"] == json!(true)
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not become ready on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile).unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "pageLoadStrategy": "normal",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,1000", "--hide-scrollbars",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let (status, v) = http(port, "POST", "/session", Some(&caps)).expect("new session");
        assert_eq!(status, 200, "new WebDriver session: {v}");
        let session = v["value"]["sessionId"].as_str().expect("session id").to_owned();
        Browser { port, session, _driver: driver }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let (status, v) = http(self.port, method, &path, body.as_ref()).unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        assert_eq!(status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs a script (a function body) in the page and returns what it returns.
    fn js(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({ "script": script, "args": [] })))
    }

    /// Waits until `expr` is truthy in the page; returns the last page state on a timeout.
    fn wait_for(&self, what: &str, expr: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.js(&format!("return !!({expr});")) == json!(true) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("timed out waiting for {what}; page: {}", self.page());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Clicks the element `css` selects, as a user would (WebDriver element click).
    fn click(&self, css: &str) {
        let el = self.cmd("POST", "/element", Some(json!({ "using": "css selector", "value": css })));
        let id = el["element-6066-11e4-a52e-4f735466cecf"].as_str().unwrap_or_else(|| panic!("no element {css}: {el}")).to_owned();
        self.cmd("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    /// What the test reads from the page: state, messages, figures, alerts, lists and chart.
    fn page(&self) -> Value {
        self.js(r#"
            const t = (id) => { const e = document.querySelector('[data-testid="' + id + '"]'); return e ? e.textContent : null; };
            const shown = (id) => { const e = document.querySelector('[data-testid="' + id + '"]'); return !!e && !e.hidden && e.offsetParent !== null; };
            const users = (id) => Array.from(document.querySelectorAll('#' + id + ' tr[data-user]')).map((r) => r.dataset.user);
            return {
                state: document.body.dataset.state || null,
                loads: Number(document.body.dataset.loads || 0),
                url: location.href,
                authShown: shown("auth"),
                authMessage: t("auth-message"),
                dashboardShown: shown("dashboard"),
                notice: t("notice"),
                figures: {
                    revenue: t("fig-revenue"), cost: t("fig-cost"), margin: t("fig-margin"), active: t("fig-active"),
                    throttled: t("fig-throttled"), highRisk: t("fig-high-risk"), users: t("fig-users"),
                },
                alertMargin: shown("alert-margin"),
                alertThrottled: shown("alert-throttled"),
                atRisk: users("at-risk-rows"),
                highRisk: users("high-risk-rows"),
                throttled: users("throttled-rows"),
                throttledReasons: Array.from(document.querySelectorAll('#throttled-rows tr[data-user] td:nth-child(3)')).map((c) => c.textContent),
                top: users("top-rows"),
                unthrottleButtons: Array.from(document.querySelectorAll('button[data-testid="unthrottle"]')).map((b) => b.dataset.user),
                chart: Array.from(document.querySelectorAll('[data-testid="daily-chart"] [data-testid="chart-day"]'))
                    .map((g) => ({ day: g.dataset.day, cost: g.dataset.cost, revenue: g.dataset.revenue })),
                chartLabels: document.querySelectorAll('[data-testid="daily-chart"] text').length,
                token: sessionStorage.getItem("prpm-admin-token"),
            };
            "#)
    }

    fn screenshot(&self, to: &Path) {
        use base64::Engine as _;
        // The whole page: make the window as tall as the document first.
        let height = self.js("return Math.ceil(document.documentElement.scrollHeight);").as_u64().unwrap_or(1000);
        self.cmd("POST", "/window/rect", Some(json!({ "width": 1280, "height": height.clamp(600, 4000) + 120 })));
        let png = self.cmd("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD.decode(png.as_str().expect("base64 PNG")).expect("decode the screenshot");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(to, png).unwrap();
        eprintln!("screenshot saved to {}", to.display());
    }
}

// ---- the seeded database ----------------------------------------------------------------------

struct Seeded {
    throttled: AccountId,
    user: AccountId,
}

fn open(db: &Path, clock: Arc<dyn Clock>) -> SqliteStore {
    SqliteStore::open_with(SqliteOptions::file(db).clock(clock)).expect("open the database")
}

/// Seven users over the last seven days (up to now): plans, a custom tier, usage through
/// `meter`, `spend` and `hold`+`settle`, and an admin throttle.
async fn seed(db: &Path) -> Seeded {
    let now = Utc::now();
    let clock = Arc::new(ManualClock::new(now - chrono::Duration::days(6)));
    let store = open(db, clock.clone());
    let s: &dyn Store = &store;
    // A custom tier with no daily limit, so that one user can be at risk on any day of the month.
    let team = TierLimits {
        name: "team".into(),
        monthly_revenue_micros: cents(2_000),
        monthly_cost_limit_micros: Some(cents(1_200)),
        daily_cost_limit_micros: None,
        hourly_request_limit: None,
        alert_threshold_pct: Some(80),
        throttle_on_exceed: true,
    };
    applied(s.set_tier(team, key("tier:team")).await);
    let alice = create_plus_user(s, &clock, "alice", false).await; // $6 a month, $1 a day
    let bob = create_plus_user(s, &clock, "bob", true).await; // org member: $3, $0.50 a day
    let carol = create_free_user(s, "carol").await;
    let dave = create_plus_user(s, &clock, "dave", false).await;
    applied(s.set_cost_profile(dave.clone(), false, Some("team".into()), key("team:dave")).await);
    let erin = create_free_user(s, "erin").await;
    grant(s, &erin, Bucket::Purchased, 100, None, "grant:erin").await;
    let frank = create_plus_user(s, &clock, "frank", false).await;
    create_free_user(s, "hank").await; // no usage
    for d in 0..7 {
        applied(s.meter(meter_cmd(&alice, cents(40), &format!("alice:{d}"))).await);
        if d % 2 == 0 {
            applied(s.meter(meter_cmd(&bob, cents(30), &format!("bob:{d}"))).await);
        }
        if d >= 3 {
            // A run paid in credits, with its provider cost.
            let spend = Spend {
                account: frank.clone(),
                amount: 3,
                usage: Some(usage_of(cents(25) + 2_500 * (d - 3))),
                reference: format!("run f{d}"),
                key: key(&format!("frank:{d}")),
            };
            applied(s.spend(spend).await);
        }
        if d < 6 {
            clock.advance(chrono::Duration::days(1));
        }
    }
    clock.set(Utc::now());
    applied(s.meter(meter_cmd(&carol, cents(5), "carol")).await);
    applied(s.meter(meter_cmd(&dave, cents(950), "dave")).await); // 79 % of $12: at risk
    // Erin: a held run settled on its usage, then throttled by an admin.
    let held = applied(
        s.hold(Hold { account: erin.clone(), amount: 2, ttl_secs: 600, cost_micros: cents(8), reference: "run e1".into(), key: key("hold:erin") }).await,
    );
    let Effect::Held { hold, .. } = held else { panic!("{held:?}") };
    applied(s.settle(Settle { hold, credits: 1, usage: Some(usage_of(cents(7))), key: key("settle:erin") }).await);
    applied(s.throttle(AdminThrottle { account: erin.clone(), by: "ops".into(), why: "abuse review".into(), key: key("throttle:erin") }).await);
    assert!(store.verify().await.unwrap().is_clean());
    Seeded { throttled: erin, user: carol }
}

/// What the page must show, from the store (at the current time).
struct Expected {
    figures: Value,
    alert_margin: bool,
    alert_throttled: bool,
    at_risk: Vec<String>,
    high_risk: Vec<String>,
    throttled: Vec<String>,
    top: Vec<String>,
    /// (day, cost) of the last 30 days.
    days: Vec<(String, String)>,
}

async fn expected(store: &dyn Store) -> Expected {
    let s = store.summary().await.unwrap();
    let ids = |v: Vec<CostView>| v.into_iter().map(|c| c.account.to_string()).collect::<Vec<_>>();
    let mut all = store.cost_accounts(CostFilter::All, None, 1000).await.unwrap();
    all.retain(|v| v.month_cost_micros > 0);
    all.sort_by(|a, b| b.month_cost_micros.cmp(&a.month_cost_micros).then_with(|| a.account.cmp(&b.account)));
    all.truncate(10);
    let today = Utc::now().date_naive();
    let from = today - chrono::Days::new(29);
    let usage = store.daily_usage(&DailyUsageQuery { account: None, from, until: today + chrono::Days::new(1) }).await.unwrap();
    let days = from
        .iter_days()
        .take_while(|d| *d <= today)
        .map(|d: NaiveDate| (d.to_string(), usd(usage.iter().find(|u| u.day == d).map_or(0, |u| u.cost_micros))))
        .collect();
    Expected {
        figures: json!({
            "revenue": format!("${}", usd(s.total_monthly_revenue_micros)),
            "cost": format!("${}", usd(s.total_monthly_cost_micros)),
            "margin": s.overall_margin_pct.map_or("—".to_owned(), |m| format!("{m} %")),
            "active": s.active_users.to_string(),
            "throttled": s.throttled_users.to_string(),
            "highRisk": s.high_risk_users.to_string(),
            "users": s.users.to_string(),
        }),
        alert_margin: s.margin_below_70,
        alert_throttled: s.throttled_over_5pct,
        at_risk: ids(store.cost_accounts(CostFilter::AtRisk, None, 100).await.unwrap()),
        high_risk: ids(store.cost_accounts(CostFilter::HighRisk, None, 100).await.unwrap()),
        throttled: ids(store.cost_accounts(CostFilter::Throttled, None, 100).await.unwrap()),
        top: ids(all),
        days,
    }
}

fn assert_shows(page: &Value, want: &Expected) {
    assert_eq!(page["figures"], want.figures, "summary figures; page: {page}");
    assert_eq!(page["alertMargin"], json!(want.alert_margin), "margin alert; page: {page}");
    assert_eq!(page["alertThrottled"], json!(want.alert_throttled), "throttled alert; page: {page}");
    assert_eq!(page["atRisk"], json!(want.at_risk), "users at risk");
    assert_eq!(page["highRisk"], json!(want.high_risk), "high-risk users");
    assert_eq!(page["throttled"], json!(want.throttled), "throttled users");
    assert_eq!(page["unthrottleButtons"], json!(want.throttled), "one Unthrottle button per throttled user");
    assert_eq!(page["top"], json!(want.top), "top spenders, in order");
    let chart: Vec<(String, String)> =
        page["chart"].as_array().unwrap().iter().map(|d| (d["day"].as_str().unwrap().to_owned(), d["cost"].as_str().unwrap().to_owned())).collect();
    assert_eq!(chart.len(), 30, "one chart element per day");
    assert_eq!(chart, want.days, "cost per day in the chart");
    assert!(page["chartLabels"].as_u64().unwrap() >= 10, "the chart has axis labels");
}

fn browser_missing() -> Option<String> {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER].into_iter().filter(|p| !Path::new(p).exists()).collect();
    (!missing.is_empty()).then(|| format!("{} not installed (Debian packages chromium, chromium-driver)", missing.join(" and ")))
}

#[test]
fn dashboard_in_headless_chromium() {
    if let Some(why) = browser_missing() {
        if std::env::var("PRPM_REQUIRE_BROWSER").is_ok_and(|v| v == "1") {
            panic!("{why}, and PRPM_REQUIRE_BROWSER=1");
        }
        eprintln!("SKIPPED: {why} (CI installs them and sets PRPM_REQUIRE_BROWSER=1)");
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("dashboard.db");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let seeded = rt.block_on(seed(&db));

    let (_server, base) = start_server(dir.path(), &db);
    let jwt = JwtKey::new(SECRET).unwrap();
    let admin_token = jwt.mint(&acct("ops-admin"), AuthRole::Admin, Utc::now(), 3_600).unwrap();
    let user_token = jwt.mint(&seeded.user, AuthRole::User, Utc::now(), 3_600).unwrap();
    let browser = Browser::start(dir.path());
    eprintln!("server and browser ready after {:?}", started.elapsed());

    // No token: the auth message, no figures.
    browser.goto(&format!("{base}/admin"));
    browser.wait_for("the auth message without a token", "document.body.dataset.state === 'auth'");
    let page = browser.page();
    assert!(page["authShown"] == json!(true) && page["dashboardShown"] == json!(false), "{page}");
    assert!(page["authMessage"].as_str().unwrap().contains("Enter an admin token"), "{page}");
    assert!(page["figures"].as_object().unwrap().values().all(|v| v == ""), "no figures without a token: {page}");

    // A user's token: refused (403), the auth message, no figures, the token forgotten.
    browser.goto("about:blank");
    browser.goto(&format!("{base}/admin#token={user_token}"));
    browser.wait_for("the auth message with a user's token", "document.body.dataset.state === 'auth'");
    let page = browser.page();
    assert!(page["authShown"] == json!(true) && page["dashboardShown"] == json!(false), "{page}");
    assert!(page["authMessage"].as_str().unwrap().contains("not an admin"), "{page}");
    assert!(page["figures"].as_object().unwrap().values().all(|v| v == ""), "no figures with a user's token: {page}");
    assert_eq!(page["token"], Value::Null, "a refused token is not kept");
    assert!(!page["url"].as_str().unwrap().contains("token="), "the token leaves the address bar: {page}");

    // The admin's token: the figures of the seeded database.
    browser.goto("about:blank");
    browser.goto(&format!("{base}/admin#token={admin_token}"));
    browser.wait_for("the figures", "document.body.dataset.state === 'ready'");
    let page = browser.page();
    assert!(!page["url"].as_str().unwrap().contains("token="), "the token leaves the address bar: {page}");
    let store = open(&db, Arc::new(SystemClock));
    let want = rt.block_on(expected(&store));
    assert_shows(&page, &want);
    // The seed's own facts, so that the comparison above is not between two empty pages.
    assert_eq!(want.throttled, vec![seeded.throttled.to_string()]);
    assert_eq!(page["throttledReasons"], json!(["throttled by ops: abuse review"]), "the reason, as text: {page}");
    assert!(want.at_risk.contains(&"dave".to_owned()) && want.top.first().map(String::as_str) == Some("dave"), "{page}");
    assert!(want.alert_throttled && want.alert_margin, "both alerts show in the seeded database: {page}");
    assert_eq!(want.figures["users"], "7");
    assert_ne!(want.days.last().unwrap().1, "0.00", "today has cost");

    if let Some(path) = std::env::var_os("PRPM_DASHBOARD_SCREENSHOT") {
        browser.screenshot(Path::new(&path));
    }

    // Unthrottle from the page: the store has no throttle any more, the page refreshed itself.
    let loads = page["loads"].as_u64().unwrap();
    browser.click(&format!(r#"button[data-testid="unthrottle"][data-user="{}"]"#, seeded.throttled));
    browser.wait_for("the page to refresh after the unthrottle", &format!("Number(document.body.dataset.loads) > {loads}"));
    let page = browser.page();
    let cost = rt.block_on(store.cost(&seeded.throttled)).unwrap();
    assert!(cost.throttle.is_none(), "unthrottled in the store: {cost:?}");
    assert_eq!(page["throttled"], json!([]), "the user left the throttled list: {page}");
    assert!(page["notice"].as_str().unwrap().contains("unthrottled"), "{page}");
    let want = rt.block_on(expected(&store));
    assert_eq!(want.figures["throttled"], "0");
    assert_shows(&page, &want);
    eprintln!("dashboard test done in {:?}", started.elapsed());
}
