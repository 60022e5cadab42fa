//! End-to-end: the real `prpm-server` binary on a loopback port, a fresh SQLite file, a local
//! server speaking Anthropic's wire format, another speaking Stripe's API, and webhooks signed
//! with Stripe's scheme; driven over HTTP.
#![recursion_limit = "256"]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use prpm_playground_core::auth::{Claims, JwtKey, Role};
use prpm_playground_core::billing::signature::sign;
use prpm_playground_core::pricing::TokenUsage;
use prpm_playground_core::provider::fake::{self, FakeProvider, Reply};
use prpm_playground_core::{AccountId, SqliteStore, Store};
use reqwest::StatusCode;
use serde_json::{Value, json};

const JWT_SECRET: &str = "e2e-secret-e2e-secret-e2e-secret!";
const WEBHOOK_SECRET: &str = "whsec_e2e";
const MODEL: &str = "claude-sonnet-4-5";

struct Server {
    child: Child,
    base: String,
    db: std::path::PathBuf,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token(sub: &str, role: Role, now: DateTime<Utc>) -> String {
    JwtKey::new(JWT_SECRET).unwrap().mint(&AccountId::new(sub).unwrap(), role, now, 3_600).unwrap()
}

impl Server {
    /// Starts the server binary with `env` on top of a base configuration.
    fn start(env: &[(&str, String)]) -> Server {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("e2e.db");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_prpm-server"));
        cmd.current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("BIND_ADDR", "127.0.0.1:0")
            .env("DATABASE_URL", &db)
            .env("JWT_SECRET", JWT_SECRET)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start prpm-server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let base = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_owned();
        Server { child, base, db, http: reqwest::Client::new(), _dir: dir }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn call(&self, method: reqwest::Method, path: &str, token: Option<&str>, body: Option<Value>) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let (status, headers) = (res.status(), res.headers().clone());
        let text = res.text().await.unwrap();
        let v = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        (status, headers, v)
    }

    async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let (s, _, v) = self.call(reqwest::Method::GET, path, Some(token), None).await;
        (s, v)
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        let (s, _, v) = self.call(reqwest::Method::POST, path, Some(token), Some(body)).await;
        (s, v)
    }

    async fn set_clock(&self, admin: &str, to: DateTime<Utc>) {
        let (s, v) = self.post("/api/v1/admin/test/clock", admin, json!({ "now": to.to_rfc3339() })).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }

    async fn deliver(&self, now: i64, body: &[u8]) -> (StatusCode, Value) {
        let res = self
            .http
            .post(self.url("/api/v1/webhooks/stripe/credits"))
            .header("stripe-signature", sign(WEBHOOK_SECRET, now, body))
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        let s = res.status();
        (s, res.json().await.unwrap())
    }

    /// Opens the server's database file beside it (WAL: both may use it) and checks the ledger.
    async fn verify(&self) {
        let store = SqliteStore::open(&self.db).unwrap();
        let report = (&store as &dyn Store).verify().await.unwrap();
        assert!(report.is_clean(), "{:?}", report.discrepancies);
    }
}

fn event(id: &str, kind: &str, created: i64, object: Value) -> Vec<u8> {
    json!({"id": id, "object": "event", "api_version": "2025-09-30.clover", "created": created, "data": {"object": object},
           "livemode": false, "pending_webhooks": 1, "request": {"id": null, "idempotency_key": null}, "type": kind})
    .to_string()
    .into_bytes()
}

fn session_json(id: &str, purchase_id: &str) -> String {
    json!({
        "id": id, "object": "checkout.session", "adaptive_pricing": {"enabled": false}, "after_expiration": null,
        "allow_promotion_codes": null, "amount_subtotal": 500, "amount_total": 500,
        "automatic_tax": {"enabled": false, "liability": null, "provider": null, "status": null},
        "billing_address_collection": null, "cancel_url": "https://app.example/cancel", "client_reference_id": purchase_id,
        "client_secret": null, "collected_information": null, "consent": null, "consent_collection": null, "created": 1_773_144_000,
        "currency": "usd", "currency_conversion": null, "custom_fields": [], "custom_text": {"after_submit": null, "shipping_address": null, "submit": null, "terms_of_service_acceptance": null},
        "customer": null, "customer_creation": "if_required", "customer_details": null, "customer_email": null, "discounts": [],
        "expires_at": 1_773_230_400, "invoice": null, "invoice_creation": null, "livemode": false, "locale": null,
        "metadata": {"purchase_id": purchase_id}, "mode": "payment", "payment_intent": null, "payment_link": null,
        "payment_method_collection": "always", "payment_method_configuration_details": null, "payment_method_options": {},
        "payment_method_types": ["card"], "payment_status": "unpaid", "phone_number_collection": {"enabled": false},
        "recovered_from": null, "saved_payment_method_options": null, "setup_intent": null, "shipping_address_collection": null,
        "shipping_cost": null, "shipping_options": [], "status": "open", "submit_type": null, "subscription": null,
        "success_url": "https://app.example/success", "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "ui_mode": "hosted", "url": format!("https://checkout.stripe.com/c/pay/{id}")
    })
    .to_string()
}

fn subscription(id: &str, account: &str, period_start: i64, period_end: i64) -> Value {
    json!({
        "id": id, "object": "subscription", "customer": "cus_e2e", "status": "active", "cancel_at_period_end": false,
        "created": period_start, "start_date": period_start, "livemode": false, "collection_method": "charge_automatically",
        "items": {"object": "list", "has_more": false, "data": [{
            "id": format!("si_{id}"), "object": "subscription_item", "quantity": 1,
            "current_period_start": period_start, "current_period_end": period_end,
            "price": {"id": "price_plus", "object": "price", "currency": "usd", "unit_amount": 600, "recurring": {"interval": "month", "interval_count": 1}}
        }]},
        "metadata": {"account_id": account}
    })
}

/// Reads a server-sent event stream to its end: (event, data) pairs.
async fn read_sse(res: reqwest::Response) -> Vec<(String, Value)> {
    let text = res.text().await.unwrap();
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut event = String::from("message");
        let mut data = String::new();
        for line in block.lines() {
            if let Some(e) = line.strip_prefix("event:") {
                event = e.trim().to_owned();
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.trim_start());
            }
        }
        if !data.is_empty() {
            out.push((event, serde_json::from_str(&data).unwrap()));
        }
    }
    out
}

async fn stack() -> (Server, FakeProvider, FakeProvider, DateTime<Utc>) {
    // A fixed start, ten days before a month ends.
    let start = Utc.with_ymd_and_hms(2026, 3, 21, 12, 0, 0).unwrap();
    let anthropic = FakeProvider::start().await.unwrap();
    let stripe = FakeProvider::start().await.unwrap();
    let server = Server::start(&[
        ("ANTHROPIC_API_KEY", "sk-ant-e2e".into()),
        ("ANTHROPIC_BASE_URL", anthropic.url()),
        ("STRIPE_SECRET_KEY", "sk_test_e2e".into()),
        ("STRIPE_API_BASE", stripe.url()),
        ("STRIPE_PLAYGROUND_WEBHOOK_SECRET", WEBHOOK_SECRET.into()),
        ("STRIPE_PRPM_PLUS_PRICE_ID", "price_plus".into()),
        ("STRIPE_PRPM_PLUS_ORG_MEMBER_PRICE_ID", "price_plus_org".into()),
        ("STRIPE_SMALL_PACK_PRICE_ID", "price_small".into()),
        ("STRIPE_MEDIUM_PACK_PRICE_ID", "price_medium".into()),
        ("STRIPE_LARGE_PACK_PRICE_ID", "price_large".into()),
        ("PRPM_TEST_CLOCK", "1".into()),
        ("PRPM_TEST_CLOCK_START", start.to_rfc3339()),
        ("PRPM_SCHEDULER_TICK_MS", "50".into()),
    ]);
    (server, anthropic, stripe, start)
}

/// The whole story: sign-up credits, estimate, a streamed run, a purchase credited by a signed
/// webhook, its refund, a subscription and its monthly reset across a month boundary (by the
/// scheduler, on the injectable clock), the admin summary; the ledger clean at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_story_over_http() {
    let (s, anthropic, stripe, start) = stack().await;
    // Tokens are checked on the server's clock; minted long enough to outlive the jumps.
    let key = JwtKey::new(JWT_SECRET).unwrap();
    let long = |sub: &str, role: Role| {
        key.sign(&Claims { sub: AccountId::new(sub).unwrap(), role, exp: start.timestamp() + 400 * 86_400, iat: start.timestamp() }).unwrap()
    };
    let (alice, admin) = (long("alice", Role::User), long("ops", Role::Admin));

    // The package a run uses.
    let (st, _, _) = s
        .call(
            reqwest::Method::PUT,
            "/api/v1/admin/packages/reviewer",
            Some(&admin),
            Some(json!({"name": "@prpm/reviewer", "version": "1.0.0", "prompt": "You review code."})),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);

    // Sign-up credits on first sight.
    let (st, b) = s.get("/api/v1/playground/credits", &alice).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!((b["total"].as_i64(), b["available"].as_i64(), b["account"].as_str()), (Some(5), Some(5), Some("alice")));

    // Estimate.
    let run_body = json!({"packageId": "reviewer", "userInput": "Please review: fn add(a: i64, b: i64) -> i64 { a + b }", "model": MODEL, "maxTokens": 1000});
    let (st, e) = s.post("/api/v1/playground/estimate", &alice, run_body.clone()).await;
    assert_eq!(st, StatusCode::OK, "{e}");
    assert_eq!((e["model"].as_str(), e["worstCase"]["credits"].as_u64(), e["affordable"].as_bool()), (Some(MODEL), Some(1), Some(true)));
    assert!(e["inputTokens"].as_u64().unwrap() > 10);

    // A streamed run: start, deltas as the provider sends them, done; one credit charged.
    anthropic.push(Reply::stream(fake::anthropic_stream(MODEL, &["Looks ", "fine ", "to me."], TokenUsage { input: 40, output: 6, ..Default::default() })));
    let res = s.http.post(s.url("/api/v1/playground/run")).bearer_auth(&alice).header("accept", "text/event-stream").json(&run_body).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = read_sse(res).await;
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names, ["start", "delta", "delta", "delta", "done"], "{events:?}");
    let text: String = events.iter().filter(|(e, _)| e == "delta").map(|(_, d)| d["text"].as_str().unwrap()).collect();
    assert_eq!(text, "Looks fine to me.");
    let done = &events[4].1;
    assert_eq!((done["response"].as_str(), done["creditsCharged"].as_i64(), done["outcome"].as_str()), (Some("Looks fine to me."), Some(1), Some("completed")));
    let session = done["sessionId"].as_str().unwrap().to_owned();
    assert_eq!(events[0].1["sessionId"].as_str(), Some(session.as_str()));
    let (st, sess) = s.get(&format!("/api/v1/playground/sessions/{session}"), &alice).await;
    assert_eq!((st, sess["turns"].as_u64()), (StatusCode::OK, Some(2)), "{sess}");
    let (_, b) = s.get("/api/v1/playground/credits", &alice).await;
    assert_eq!(b["total"].as_i64(), Some(4));

    // A pack bought through Checkout and credited by the signed webhook (delivered twice).
    stripe.push(Reply::ok(session_json("cs_e2e_1", "pur")));
    let (st, c) = s
        .post(
            "/api/v1/playground/credits/purchase",
            &alice,
            json!({"package": "small", "successUrl": "https://app.example/ok", "cancelUrl": "https://app.example/no"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{c}");
    let purchase = c["purchaseId"].as_str().unwrap().to_owned();
    assert_eq!(c["url"].as_str(), Some("https://checkout.stripe.com/c/pay/cs_e2e_1"));
    let now = start.timestamp();
    let intent = json!({"id": "pi_e2e", "object": "payment_intent", "amount": 500, "amount_received": 500, "currency": "usd", "customer": "cus_e2e",
                        "status": "succeeded", "livemode": false, "last_payment_error": null, "metadata": {"purchase_id": purchase, "account_id": "alice"}});
    let paid = event("evt_paid", "payment_intent.succeeded", now, intent);
    assert_eq!(s.deliver(now, &paid).await.1["outcome"], "processed");
    assert_eq!(s.deliver(now, &paid).await.1["outcome"], "duplicate");
    let (_, b) = s.get("/api/v1/playground/credits", &alice).await;
    // The sign-up credits are in the purchased bucket too (they never expire).
    assert_eq!((b["total"].as_i64(), b["purchased"].as_i64()), (Some(104), Some(104)));

    // A tampered delivery is refused and changes nothing.
    let mut forged = paid.clone();
    let at = forged.len() - 3;
    forged[at] ^= 1;
    let res =
        s.http.post(s.url("/api/v1/webhooks/stripe/credits")).header("stripe-signature", sign(WEBHOOK_SECRET, now, &paid)).body(forged).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(res.json::<Value>().await.unwrap()["error"], "invalid_signature");

    // Half of it refunded: 50 credits taken back.
    let charge = json!({"id": "ch_e2e", "object": "charge", "amount": 500, "amount_captured": 500, "amount_refunded": 250, "currency": "usd",
                        "captured": true, "paid": true, "refunded": false, "payment_intent": "pi_e2e", "status": "succeeded", "metadata": {}});
    assert_eq!(s.deliver(now, &event("evt_refund", "charge.refunded", now, charge)).await.1["outcome"], "processed");
    let (_, b) = s.get("/api/v1/playground/credits", &alice).await;
    assert_eq!(b["total"].as_i64(), Some(54));

    // PRPM+ from today to April 21: 60 monthly credits.
    let end = Utc.with_ymd_and_hms(2026, 4, 21, 12, 0, 0).unwrap().timestamp();
    let sub = event("evt_sub", "customer.subscription.created", now, subscription("sub_e2e", "alice", now, end));
    assert_eq!(s.deliver(now, &sub).await.1["outcome"], "processed");
    let (_, b) = s.get("/api/v1/playground/credits", &alice).await;
    assert_eq!((b["monthly"].as_i64(), b["planMonthlyCredits"].as_i64()), (Some(60), Some(60)));

    // Across the month boundary the cost counters reset (00:00) and, past the period's end,
    // the monthly credit reset (00:05) rolls the unused 60 over and grants 60 more: the
    // scheduler does it on the server's clock.
    s.set_clock(&admin, Utc.with_ymd_and_hms(2026, 4, 22, 0, 6, 0).unwrap()).await;
    let mut b = Value::Null;
    for _ in 0..100 {
        b = s.get("/api/v1/playground/credits", &alice).await.1;
        if b["rollover"].as_i64() == Some(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!((b["monthly"].as_i64(), b["rollover"].as_i64()), (Some(60), Some(60)), "{b}");

    // The admin summary sees alice on PRPM+ ($6.00 a month).
    let (st, sum) = s.get("/api/v1/admin/cost-analytics/summary", &admin).await;
    assert_eq!(st, StatusCode::OK, "{sum}");
    assert_eq!(sum["totalMonthlyRevenue"], "6.00");
    assert_eq!(sum["users"].as_u64(), Some(1));

    // History, as JSON and CSV.
    let (st, h) = s.get("/api/v1/playground/credits/history?limit=100", &alice).await;
    assert_eq!(st, StatusCode::OK);
    let kinds: Vec<&str> = h["entries"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    for k in ["grant", "hold", "settle", "clawback", "rollover"] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    let csv = s.http.get(s.url("/api/v1/playground/credits/history?format=csv")).bearer_auth(&alice).send().await.unwrap();
    assert!(csv.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let csv = csv.text().await.unwrap();
    assert!(csv.starts_with("id,at,account,kind"));
    assert_eq!(csv.lines().count(), kinds.len() + 1);

    // Metrics saw the run and the job.
    let m = s.http.get(s.url("/metrics")).bearer_auth(&admin).send().await.unwrap().text().await.unwrap();
    assert!(m.contains(&format!("prpm_runs_total{{model=\"{MODEL}\",outcome=\"completed\"}} 1")), "{m}");
    assert!(m.contains("prpm_job_runs_total{job=\"monthly-credit-reset\",result=\"ok\"}"), "{m}");
    assert!(m.contains("prpm_http_responses_total{status=\"200\"} "), "{m}");
    s.verify().await;
}

/// Every failure the issue lists, each with its status and one JSON error body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_status_and_one_error_body() {
    let (s, anthropic, _stripe, start) = stack().await;
    let key = JwtKey::new(JWT_SECRET).unwrap();
    let tok =
        |sub: &str, role: Role| key.sign(&Claims { sub: AccountId::new(sub).unwrap(), role, exp: start.timestamp() + 86_400, iat: start.timestamp() }).unwrap();
    let (bob, carol, admin) = (tok("bob", Role::User), tok("carol", Role::User), tok("ops", Role::Admin));
    let body = |input: &str| json!({"userInput": input, "model": MODEL, "maxTokens": 100});
    let check = |st: StatusCode, v: &Value, want: StatusCode, code: &str| {
        assert_eq!(st, want, "{v}");
        assert_eq!(v["error"].as_str(), Some(code), "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    };

    // 400: a body that is not JSON, an unknown field, an unknown model, a bad query.
    let res = s.http.post(s.url("/api/v1/playground/estimate")).bearer_auth(&bob).body("{not json").send().await.unwrap();
    let st = res.status();
    check(st, &res.json().await.unwrap(), StatusCode::BAD_REQUEST, "invalid_input");
    let (st, v) = s.post("/api/v1/playground/estimate", &bob, json!({"userInput": "hi", "surprise": 1})).await;
    check(st, &v, StatusCode::BAD_REQUEST, "invalid_input");
    let (st, v) = s.post("/api/v1/playground/estimate", &bob, json!({"userInput": "hi", "model": "no-such-model"})).await;
    check(st, &v, StatusCode::BAD_REQUEST, "unknown_model");
    let (st, v) = s.get("/api/v1/playground/credits/history?limit=many", &bob).await;
    check(st, &v, StatusCode::BAD_REQUEST, "invalid_input");

    // 401: no token, a bad one, an expired one, another secret's.
    let (st, _, v) = s.call(reqwest::Method::GET, "/api/v1/playground/credits", None, None).await;
    check(st, &v, StatusCode::UNAUTHORIZED, "unauthorized");
    let (st, v) = s.get("/api/v1/playground/credits", "not.a.token").await;
    check(st, &v, StatusCode::UNAUTHORIZED, "unauthorized");
    let expired = key.sign(&Claims { sub: AccountId::new("bob").unwrap(), role: Role::User, exp: start.timestamp() - 1, iat: 0 }).unwrap();
    let (st, v) = s.get("/api/v1/playground/credits", &expired).await;
    check(st, &v, StatusCode::UNAUTHORIZED, "unauthorized");
    let other = JwtKey::new("another-secret-another-secret-1234").unwrap().mint(&AccountId::new("bob").unwrap(), Role::Admin, start, 60).unwrap();
    let (st, v) = s.get("/api/v1/admin/cost-analytics/summary", &other).await;
    check(st, &v, StatusCode::UNAUTHORIZED, "unauthorized");

    // 403 on every admin route for a user, 401 without a token: route by route, from the
    // OpenAPI document (so a new admin route is covered as soon as it exists).
    let doc: Value = s.http.get(s.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    let mut admin_routes = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !(path.starts_with("/api/v1/admin/") || path == "/metrics") {
            continue;
        }
        for method in item.as_object().unwrap().keys() {
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let p = path.replace("{id}", "bob").replace("{name}", "free").replace("{job}", "cost-reset");
            let (st, _, v) = s.call(m.clone(), &p, Some(&bob), Some(json!({}))).await;
            check(st, &v, StatusCode::FORBIDDEN, "forbidden");
            let (st, _, v) = s.call(m, &p, None, Some(json!({}))).await;
            check(st, &v, StatusCode::UNAUTHORIZED, "unauthorized");
            admin_routes += 1;
        }
    }
    assert!(admin_routes >= 14, "{admin_routes} admin routes");

    // 404: another user's session looks like no session; unknown routes too.
    anthropic.push(Reply::ok(fake::anthropic_message(MODEL, "Hello.", TokenUsage { input: 10, output: 2, ..Default::default() })));
    let (st, r) = s.post("/api/v1/playground/run", &bob, body("hi")).await;
    assert_eq!(st, StatusCode::OK, "{r}");
    let session = r["sessionId"].as_str().unwrap().to_owned();
    let (st, v) = s.get(&format!("/api/v1/playground/sessions/{session}"), &carol).await;
    check(st, &v, StatusCode::NOT_FOUND, "not_found");
    let (st, _, v) = s.call(reqwest::Method::DELETE, &format!("/api/v1/playground/sessions/{session}"), Some(&carol), None).await;
    check(st, &v, StatusCode::NOT_FOUND, "not_found");
    let (st, v) = s.post("/api/v1/playground/run", &carol, json!({"userInput": "hi", "model": MODEL, "sessionId": session})).await;
    check(st, &v, StatusCode::NOT_FOUND, "not_found");
    let (st, v) = s.get("/api/v1/playground/sessions/garbage", &bob).await;
    check(st, &v, StatusCode::NOT_FOUND, "not_found");
    let (st, v) = s.get("/api/v1/nothing-here", &bob).await;
    check(st, &v, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(s.get(&format!("/api/v1/playground/sessions/{session}"), &bob).await.0, StatusCode::OK);

    // 409: an idempotency key reused for another request. The same request replays its first
    // response and runs (and charges) nothing more.
    anthropic.push(Reply::ok(fake::anthropic_message(MODEL, "Once.", TokenUsage { input: 10, output: 2, ..Default::default() })));
    let send = |key: &str, input: &str| s.http.post(s.url("/api/v1/playground/run")).bearer_auth(&bob).header("idempotency-key", key).json(&body(input)).send();
    let first = send("k1", "one").await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let first: Value = first.json().await.unwrap();
    let total = s.get("/api/v1/playground/credits", &bob).await.1["total"].clone();
    let again = send("k1", "one").await.unwrap();
    assert_eq!(again.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    let other = send("k1", "two").await.unwrap();
    let st = other.status();
    check(st, &other.json().await.unwrap(), StatusCode::CONFLICT, "idempotency_conflict");
    assert_eq!(s.get("/api/v1/playground/credits", &bob).await.1["total"], total);
    assert_eq!(anthropic.requests().len(), 2, "the provider was called for the first run of each key only");

    // 413: over the 20,000-token cap, and over the body limit.
    let (st, v) = s.post("/api/v1/playground/estimate", &bob, body(&"lorem ipsum dolor sit amet ".repeat(6_000))).await;
    check(st, &v, StatusCode::PAYLOAD_TOO_LARGE, "request_too_large");
    // (A client of its own: the server answers before reading the body and closes that connection.)
    let res = reqwest::Client::new()
        .post(s.url("/api/v1/playground/run"))
        .bearer_auth(&bob)
        .header("content-type", "application/json")
        .body(vec![b' '; 2 << 20])
        .send()
        .await
        .unwrap();
    let st = res.status();
    check(st, &res.json().await.unwrap(), StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");

    // 402: more than carol has (5 sign-up credits), with needed and available. (The free
    // tier's $0.10 a day would refuse such a run first: the admin raises it.)
    let (_, tiers) = s.get("/api/v1/admin/cost-analytics/tier-limits", &admin).await;
    let mut free = tiers.as_array().unwrap().iter().find(|t| t["name"] == "free").unwrap().clone();
    free["dailyCostLimit"] = json!("10.00");
    free["monthlyCostLimit"] = json!("10.00");
    let (st, _, v) = s.call(reqwest::Method::PUT, "/api/v1/admin/cost-analytics/tier-limits/free", Some(&admin), Some(free)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = s.post("/api/v1/playground/run", &carol, json!({"userInput": "hi", "model": MODEL, "maxTokens": 64_000})).await;
    check(st, &v, StatusCode::PAYMENT_REQUIRED, "insufficient_credits");
    assert_eq!(v["available"].as_i64(), Some(5));
    assert!(v["needed"].as_i64().unwrap() > 5);

    // 503: a model whose provider is not configured (no OpenAI key); nothing charged.
    let before = s.get("/api/v1/playground/credits", &carol).await.1;
    let (st, v) = s.post("/api/v1/playground/run", &carol, json!({"userInput": "hi", "model": "gpt-4o", "maxTokens": 10})).await;
    check(st, &v, StatusCode::SERVICE_UNAVAILABLE, "provider_unavailable");
    assert_eq!(s.get("/api/v1/playground/credits", &carol).await.1, before);
    // An estimate needs no provider.
    let (st, v) = s.post("/api/v1/playground/estimate", &carol, json!({"userInput": "hi", "model": "gpt-4o", "maxTokens": 10})).await;
    assert_eq!((st, v["model"].as_str()), (StatusCode::OK, Some("gpt-4o")), "{v}");

    // 429: the free tier's hourly request limit (lowered to two by the admin); the third
    // waits, with Retry-After.
    let (st, tiers) = s.get("/api/v1/admin/cost-analytics/tier-limits", &admin).await;
    assert_eq!(st, StatusCode::OK);
    let mut free = tiers.as_array().unwrap().iter().find(|t| t["name"] == "free").unwrap().clone();
    free["hourlyRequestLimit"] = json!(2);
    let (st, _, v) = s.call(reqwest::Method::PUT, "/api/v1/admin/cost-analytics/tier-limits/free", Some(&admin), Some(free)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let dave = tok("dave", Role::User);
    for i in 0..2 {
        anthropic.push(Reply::ok(fake::anthropic_message(MODEL, "k", TokenUsage { input: 5, output: 1, ..Default::default() })));
        let (st, v) = s.post("/api/v1/playground/run", &dave, json!({"userInput": format!("q{i}"), "model": MODEL, "maxTokens": 10})).await;
        assert_eq!(st, StatusCode::OK, "run {i}: {v}");
    }
    let (st, headers, v) =
        s.call(reqwest::Method::POST, "/api/v1/playground/run", Some(&dave), Some(json!({"userInput": "q3", "model": MODEL, "maxTokens": 10}))).await;
    check(st, &v, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3_600).contains(&retry), "{retry}");
    assert_eq!(v["retryAfterSecs"].as_u64(), Some(retry));

    // Throttled by an admin: 429 too.
    let (st, _) = s.post("/api/v1/admin/cost-analytics/users/carol/throttle", &admin, json!({"reason": "abuse"})).await;
    assert_eq!(st, StatusCode::OK);
    let (st, headers, v) =
        s.call(reqwest::Method::POST, "/api/v1/playground/run", Some(&carol), Some(json!({"userInput": "hi", "model": MODEL, "maxTokens": 10}))).await;
    check(st, &v, StatusCode::TOO_MANY_REQUESTS, "throttled");
    assert!(headers.contains_key("retry-after"));
    let (_, users) = s.get("/api/v1/admin/cost-analytics/throttled-users", &admin).await;
    assert_eq!(users.as_array().unwrap().iter().map(|u| u["userId"].as_str().unwrap()).collect::<Vec<_>>(), ["carol"]);
    assert_eq!(users[0]["throttleKind"], "admin", "{users}");
    assert_eq!(users[0]["throttleReason"].as_str().unwrap(), "throttled by ops: abuse", "{users}");

    // Public routes: health and a shared session need no token.
    let (st, _, v) = s.call(reqwest::Method::GET, "/healthz", None, None).await;
    assert_eq!((st, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (st, share) = s.post(&format!("/api/v1/playground/sessions/{session}/share"), &bob, json!({})).await;
    assert_eq!(st, StatusCode::OK, "{share}");
    let (st, _, v) = s.call(reqwest::Method::GET, share["path"].as_str().unwrap(), None, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["turns"].as_array().unwrap().len(), 2);
    let public = v.to_string();
    for secret in ["bob", "credits", "cost", "runId"] {
        assert!(!public.contains(secret), "the shared view shows {secret:?}: {public}");
    }
    s.verify().await;
}

/// SIGTERM: the server stops taking requests, lets the runs in flight settle, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_settles_runs_in_flight() {
    let anthropic = FakeProvider::start().await.unwrap();
    let mut s = Server::start(&[("ANTHROPIC_API_KEY", "sk-ant-e2e".into()), ("ANTHROPIC_BASE_URL", anthropic.url()), ("PRPM_SCHEDULER", "0".into())]);
    let alice = token("alice", Role::User, Utc::now());
    // The provider streams four chunks 400 ms apart: the run is in flight when the signal comes.
    let chunks = fake::anthropic_stream(MODEL, &["Late ", "but ", "fine."], TokenUsage { input: 10, output: 3, ..Default::default() });
    anthropic.push(Reply::Stream { events: chunks, delay: Duration::from_millis(400), cut_after: None });
    let http = s.http.clone();
    let url = s.url("/api/v1/playground/run");
    let tok = alice.clone();
    let run = tokio::spawn(async move {
        let res = http
            .post(url)
            .bearer_auth(tok)
            .header("accept", "text/event-stream")
            .json(&json!({"userInput": "hi", "model": MODEL, "maxTokens": 10}))
            .send()
            .await
            .unwrap();
        (res.status(), read_sse(res).await)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = s.child.id();
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    let (status, events) = run.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(events.last().map(|(e, _)| e.as_str()), Some("done"), "{events:?}");
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let store = SqliteStore::open(&s.db).unwrap();
    let b = (&store as &dyn Store).balance(&AccountId::new("alice").unwrap()).await.unwrap();
    assert_eq!((b.held, b.total), (0, 4), "settled, no hold left open");
}

/// 200 clients at once against one account with credits for 50 runs: exactly 50 run, the
/// others get 402, and the ledger is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_fifty_runs() {
    let (s, anthropic, _stripe, start) = stack().await;
    anthropic.set_default(Reply::ok(fake::anthropic_message(MODEL, "ok", TokenUsage { input: 20, output: 2, ..Default::default() })));
    let key = JwtKey::new(JWT_SECRET).unwrap();
    let tok =
        |sub: &str, role: Role| key.sign(&Claims { sub: AccountId::new(sub).unwrap(), role, exp: start.timestamp() + 86_400, iat: start.timestamp() }).unwrap();
    let (user, admin) = (tok("crowd", Role::User), tok("ops", Role::Admin));
    // The free tier without an hourly limit and with room in dollars: credits are the limit.
    let (_, tiers) = s.get("/api/v1/admin/cost-analytics/tier-limits", &admin).await;
    let mut free = tiers.as_array().unwrap().iter().find(|t| t["name"] == "free").unwrap().clone();
    free["hourlyRequestLimit"] = Value::Null;
    free["dailyCostLimit"] = json!("100.00");
    free["monthlyCostLimit"] = json!("100.00");
    let (st, _, v) = s.call(reqwest::Method::PUT, "/api/v1/admin/cost-analytics/tier-limits/free", Some(&admin), Some(free)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    // 5 sign-up credits + 45: fifty one-credit runs.
    let (st, b) = s.post("/api/v1/admin/users/crowd/credits", &admin, json!({"credits": 45, "reference": "load test"})).await;
    assert_eq!((st, b["total"].as_i64()), (StatusCode::OK, Some(50)), "{b}");

    let runs = (0..200).map(|i| {
        let (http, url, user) = (s.http.clone(), s.url("/api/v1/playground/run"), user.clone());
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(user)
                .json(&json!({"userInput": format!("question {i}"), "model": MODEL, "maxTokens": 10}))
                .send()
                .await
                .unwrap()
                .status()
        })
    });
    let statuses: Vec<StatusCode> = futures_util::future::join_all(runs).await.into_iter().map(Result::unwrap).collect();
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let refused = statuses.iter().filter(|s| **s == StatusCode::PAYMENT_REQUIRED).count();
    assert_eq!((ok, refused), (50, 150), "{statuses:?}");
    let (_, b) = s.get("/api/v1/playground/credits", &user).await;
    assert_eq!((b["total"].as_i64(), b["held"].as_i64()), (Some(0), Some(0)), "{b}");
    s.verify().await;
}
