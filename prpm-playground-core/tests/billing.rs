//! Stripe billing against a local server returning Stripe-shaped responses, and webhooks with
#![recursion_limit = "256"]
//! Stripe-shaped event payloads signed with Stripe's real scheme. After every scenario the
//! ledger is exact and `verify()` clean.

use std::sync::Arc;

use chrono::{Duration, TimeZone, Utc};
use prpm_playground_core::billing::signature::sign;
use prpm_playground_core::billing::*;
use prpm_playground_core::conformance::{applied, create_user, key};
use prpm_playground_core::pricing::Pricing;
use prpm_playground_core::provider::fake::{FakeProvider, Reply};
use prpm_playground_core::purchase::*;
use prpm_playground_core::*;
use serde_json::{Value, json};

const SECRET: &str = "whsec_test_secret";

struct World {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    clock: Arc<ManualClock>,
    store: Arc<dyn Store>,
    stripe: FakeProvider,
    billing: Billing,
}

fn config(api: &str, policy: RefundPolicy) -> BillingConfig {
    BillingConfig {
        secret_key: SecretKey::new("sk_test_51Abc"),
        webhook_secrets: vec![SECRET.into()],
        api_base: Some(api.into()),
        prices: PriceIds {
            small_pack: "price_small".into(),
            medium_pack: "price_medium".into(),
            large_pack: "price_large".into(),
            plus_individual: "price_plus".into(),
            plus_org_member: "price_plus_org".into(),
        },
        refund_policy: policy,
        plus_individual_credits: 60,
        plus_org_member_credits: 30,
        tolerance_secs: 300,
    }
}

async fn world_with(policy: RefundPolicy) -> World {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("billing.db");
    let clock = Arc::new(ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 10, 12, 0, 0).unwrap()));
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_with(SqliteOptions::file(&path).clock(clock.clone())).unwrap());
    let stripe = FakeProvider::start().await.unwrap();
    let billing = Billing::new(store.clone(), config(&stripe.url(), policy)).unwrap();
    World { _dir: dir, path, clock, store, stripe, billing }
}

async fn world() -> World {
    world_with(RefundPolicy::Clamp).await
}

/// A Checkout Session as the API returns it (the fields Stripe always sends).
fn session_json(id: &str, mode: &str, purchase_id: &str) -> String {
    json!({
        "id": id, "object": "checkout.session", "adaptive_pricing": {"enabled": false}, "after_expiration": null,
        "allow_promotion_codes": null, "amount_subtotal": 500, "amount_total": 500,
        "automatic_tax": {"enabled": false, "liability": null, "provider": null, "status": null},
        "billing_address_collection": null, "cancel_url": "https://app.example/cancel", "client_reference_id": purchase_id,
        "client_secret": null, "collected_information": null, "consent": null, "consent_collection": null, "created": 1_773_144_000,
        "currency": "usd", "currency_conversion": null, "custom_fields": [], "custom_text": {"after_submit": null, "shipping_address": null, "submit": null, "terms_of_service_acceptance": null},
        "customer": null, "customer_creation": "if_required", "customer_details": null, "customer_email": null, "discounts": [],
        "expires_at": 1_773_230_400, "invoice": null, "invoice_creation": null, "livemode": false, "locale": null,
        "metadata": {"purchase_id": purchase_id}, "mode": mode, "payment_intent": null, "payment_link": null,
        "payment_method_collection": "always", "payment_method_configuration_details": null, "payment_method_options": {},
        "payment_method_types": ["card"], "payment_status": "unpaid", "phone_number_collection": {"enabled": false},
        "recovered_from": null, "saved_payment_method_options": null, "setup_intent": null, "shipping_address_collection": null,
        "shipping_cost": null, "shipping_options": [], "status": "open", "submit_type": null, "subscription": null,
        "success_url": "https://app.example/success", "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "ui_mode": "hosted", "url": format!("https://checkout.stripe.com/c/pay/{id}")
    })
    .to_string()
}

fn stripe_error(status: u16, kind: &str, code: &str, message: &str) -> Reply {
    Reply::Json {
        status,
        headers: vec![("request-id".into(), "req_test".into())],
        body: json!({"error": {"type": kind, "code": code, "message": message, "decline_code": if code == "card_declined" { json!("generic_decline") } else { Value::Null }}}).to_string(),
    }
}

/// A Stripe event, as delivered.
fn event(id: &str, kind: &str, created: i64, object: Value) -> Vec<u8> {
    json!({
        "id": id, "object": "event", "api_version": "2025-09-30.clover", "created": created,
        "data": {"object": object}, "livemode": false, "pending_webhooks": 1,
        "request": {"id": "req_abc", "idempotency_key": null}, "type": kind
    })
    .to_string()
    .into_bytes()
}

fn intent(id: &str, purchase: &Purchase, status: &str) -> Value {
    json!({"id": id, "object": "payment_intent", "amount": purchase.amount_cents, "amount_received": if status == "succeeded" { purchase.amount_cents } else { 0 },
           "currency": "usd", "customer": "cus_Test1", "status": status, "livemode": false,
           "last_payment_error": if status == "requires_payment_method" { json!({"code": "card_declined", "decline_code": "insufficient_funds", "type": "card_error"}) } else { Value::Null },
           "metadata": {"purchase_id": purchase.id, "account_id": purchase.account.as_str()}})
}

fn charge(intent: &str, amount: i64, refunded: i64) -> Value {
    json!({"id": format!("ch_{intent}"), "object": "charge", "amount": amount, "amount_captured": amount, "amount_refunded": refunded,
           "currency": "usd", "captured": true, "paid": true, "refunded": refunded == amount, "payment_intent": intent, "status": "succeeded", "metadata": {}})
}

impl World {
    fn now(&self) -> i64 {
        self.clock.now().timestamp()
    }

    async fn deliver(&self, body: &[u8]) -> Result<WebhookOutcome> {
        let header = sign(SECRET, self.now(), body);
        self.billing.handle_webhook(Some(&header), body).await
    }

    async fn buy(&self, account: &AccountId, pack: Pack) -> Purchase {
        let n = self.stripe.requests().len();
        self.stripe.push(Reply::ok(session_json(&format!("cs_test_{n}"), "payment", "pur")));
        let c = self.billing.checkout_pack(account, pack, "https://app.example/success", "https://app.example/cancel").await.unwrap();
        self.store.purchase(&c.purchase_id).await.unwrap().unwrap()
    }

    async fn total(&self, a: &AccountId) -> Credits {
        let report = self.store.verify().await.unwrap();
        assert!(report.is_clean(), "{:?}", report.discrepancies);
        self.store.balance(a).await.unwrap().total
    }
}

fn form(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            let dec = |s: &str| {
                let s = s.replace('+', " ");
                let mut out = Vec::new();
                let b = s.as_bytes();
                let mut i = 0;
                while i < b.len() {
                    if b[i] == b'%' && i + 2 < b.len() {
                        out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                        i += 3;
                    } else {
                        out.push(b[i]);
                        i += 1;
                    }
                }
                String::from_utf8(out).unwrap()
            };
            (dec(k), dec(v))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_records_a_pending_purchase_and_sends_stripe_the_right_request() {
    let w = world().await;
    let a = create_user(&*w.store, "buyer").await;
    let p = w.buy(&a, Pack::Medium).await;
    assert_eq!((p.status, p.credits, p.amount_cents, p.credited), (PurchaseStatus::Pending, 250, 1_000, false));
    assert_eq!(p.checkout_session.as_deref(), Some("cs_test_0"));
    let sent = &w.stripe.requests()[0];
    assert_eq!(sent.path, "/v1/checkout/sessions");
    assert_eq!(sent.header("authorization"), Some("Bearer sk_test_51Abc"));
    assert_eq!(sent.header("idempotency-key"), Some(p.id.as_str()), "a retried checkout cannot create two sessions");
    let f = form(&sent.raw);
    let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("mode"), Some("payment"));
    assert_eq!(get("line_items[0][price]"), Some("price_medium"));
    assert_eq!(get("line_items[0][quantity]"), Some("1"));
    assert_eq!(get("metadata[purchase_id]"), Some(p.id.as_str()));
    assert_eq!(get("payment_intent_data[metadata][purchase_id]"), Some(p.id.as_str()));
    assert_eq!(get("success_url"), Some("https://app.example/success"));
    assert_eq!(w.total(&a).await, 5, "nothing credited before payment");

    // A subscription checkout.
    w.stripe.push(Reply::ok(session_json("cs_test_sub", "subscription", "pur")));
    let c = w.billing.checkout_subscription(&a, Plan::PlusIndividual, "https://app.example/s", "https://app.example/c").await.unwrap();
    let f = form(&w.stripe.requests()[1].raw);
    assert!(f.contains(&("mode".into(), "subscription".into())));
    assert!(f.contains(&("subscription_data[metadata][account_id]".into(), "buyer".into())));
    assert_eq!(w.store.purchase(&c.purchase_id).await.unwrap().unwrap().kind, PurchaseKind::Subscription);

    // Bad input.
    assert!(matches!(w.billing.checkout_pack(&a, Pack::Small, "javascript:alert(1)", "https://x").await, Err(Error::InvalidInput { .. })));
    assert!(w.billing.checkout_pack(&acct_of("nobody"), Pack::Small, "https://x", "https://x").await.is_err());
    assert_eq!(w.stripe.requests().len(), 2);
}

fn acct_of(s: &str) -> AccountId {
    AccountId::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_api_errors_are_typed_and_fail_the_purchase() {
    let w = world().await;
    let a = create_user(&*w.store, "err").await;
    for (reply, code) in [
        (stripe_error(402, "card_error", "card_declined", "Your card was declined."), "payment_declined"),
        (stripe_error(429, "invalid_request_error", "rate_limit", "Too many requests hit the API too quickly."), "stripe_rate_limited"),
        (stripe_error(500, "api_error", "", "An unknown error occurred"), "stripe_unavailable"),
        (stripe_error(401, "invalid_request_error", "", "Invalid API Key provided: sk_test_****"), "stripe_auth"),
    ] {
        w.stripe.push(reply);
        let e = w.billing.checkout_pack(&a, Pack::Small, "https://x", "https://x").await.unwrap_err();
        assert_eq!(e.code(), code, "{e}");
    }
    let all = w.store.purchases(None, 100).await.unwrap();
    assert_eq!(all.len(), 4);
    assert!(all.iter().all(|p| p.status == PurchaseStatus::Failed && !p.credited));
    assert_eq!(w.total(&a).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_pack_is_credited_once_whatever_arrives_and_how_often() {
    let w = world().await;
    let a = create_user(&*w.store, "payer").await;
    let p = w.buy(&a, Pack::Small).await;
    let succeeded = event("evt_pi_ok", "payment_intent.succeeded", w.now(), intent("pi_1", &p, "succeeded"));
    let completed = event(
        "evt_cs_done",
        "checkout.session.completed",
        w.now(),
        json!({"id": "cs_test_0", "object": "checkout.session", "mode": "payment", "payment_status": "paid", "status": "complete",
               "payment_intent": "pi_1", "customer": "cus_Test1", "client_reference_id": p.id, "metadata": {"purchase_id": p.id}}),
    );
    assert_eq!(w.deliver(&succeeded).await.unwrap(), WebhookOutcome::Processed { event: "evt_pi_ok".into() });
    for _ in 0..10 {
        assert_eq!(w.deliver(&succeeded).await.unwrap(), WebhookOutcome::Duplicate { event: "evt_pi_ok".into() });
        w.deliver(&completed).await.unwrap();
    }
    assert_eq!(w.total(&a).await, 105);
    let p = w.store.purchase(&p.id).await.unwrap().unwrap();
    assert_eq!((p.status, p.credited, p.payment_intent.as_deref(), p.customer.as_deref()), (PurchaseStatus::Completed, true, Some("pi_1"), Some("cus_Test1")));
    assert_eq!(w.store.customer_account("cus_Test1").await.unwrap(), Some(a.clone()));
    assert!(w.billing.reconcile().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_payment_credits_nothing() {
    let w = world().await;
    let a = create_user(&*w.store, "declined").await;
    let p = w.buy(&a, Pack::Large).await;
    for _ in 0..10 {
        w.deliver(&event("evt_fail", "payment_intent.payment_failed", w.now(), intent("pi_f", &p, "requires_payment_method"))).await.unwrap();
    }
    let p2 = w.store.purchase(&p.id).await.unwrap().unwrap();
    assert_eq!((p2.status, p2.credited), (PurchaseStatus::Failed, false));
    assert_eq!(w.total(&a).await, 5);
    // The buyer retries with another card: the payment succeeds after all.
    w.deliver(&event("evt_ok", "payment_intent.succeeded", w.now(), intent("pi_f", &p, "succeeded"))).await.unwrap();
    assert_eq!(w.total(&a).await, 605);
    // A late copy of the failure changes nothing.
    w.deliver(&event("evt_fail_late", "payment_intent.payment_failed", w.now(), intent("pi_f", &p, "requires_payment_method"))).await.unwrap();
    assert_eq!(w.store.purchase(&p.id).await.unwrap().unwrap().status, PurchaseStatus::Completed);
    assert_eq!(w.total(&a).await, 605);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_full_partial_twice_and_before_the_payment() {
    let w = world().await;
    let a = create_user(&*w.store, "refunds").await;
    // Full refund.
    let p = w.buy(&a, Pack::Small).await;
    w.deliver(&event("evt_1", "payment_intent.succeeded", w.now(), intent("pi_a", &p, "succeeded"))).await.unwrap();
    for _ in 0..10 {
        w.deliver(&event("evt_2", "charge.refunded", w.now(), charge("pi_a", 500, 500))).await.unwrap();
    }
    assert_eq!(w.total(&a).await, 5);
    assert_eq!(w.store.purchase(&p.id).await.unwrap().unwrap().status, PurchaseStatus::Refunded);

    // Two partial refunds ($3.33 then the rest of $10), each delivered twice, the second
    // before the first: 83 credits, then all 250.
    let q = w.buy(&a, Pack::Medium).await;
    w.deliver(&event("evt_3", "payment_intent.succeeded", w.now(), intent("pi_b", &q, "succeeded"))).await.unwrap();
    assert_eq!(w.total(&a).await, 255);
    w.deliver(&event("evt_4", "charge.refunded", w.now(), charge("pi_b", 1_000, 333))).await.unwrap();
    assert_eq!(w.total(&a).await, 255 - 83);
    let q2 = w.store.purchase(&q.id).await.unwrap().unwrap();
    assert_eq!((q2.status, q2.refunded_cents, q2.credits_reversed), (PurchaseStatus::PartiallyRefunded, 333, 83));
    w.deliver(&event("evt_5", "charge.refunded", w.now(), charge("pi_b", 1_000, 1_000))).await.unwrap();
    w.deliver(&event("evt_4", "charge.refunded", w.now(), charge("pi_b", 1_000, 333))).await.unwrap();
    // A late copy of the first refund under a new event id: amount_refunded never moves back.
    w.deliver(&event("evt_4b", "charge.refunded", w.now(), charge("pi_b", 1_000, 333))).await.unwrap();
    assert_eq!(w.total(&a).await, 5);

    // A refund that arrives before the payment: the pack nets to what was not refunded.
    let r = w.buy(&a, Pack::Large).await;
    assert_eq!(
        w.deliver(&event("evt_6", "charge.refunded", w.now(), charge("pi_c", 2_000, 1_000))).await.unwrap(),
        WebhookOutcome::Unmatched { event: "evt_6".into() }
    );
    assert_eq!(w.total(&a).await, 5, "nothing to take back yet");
    w.deliver(&event("evt_7", "payment_intent.succeeded", w.now(), intent("pi_c", &r, "succeeded"))).await.unwrap();
    assert_eq!(w.total(&a).await, 5 + 300);
    assert_eq!(w.store.stripe_event("evt_6").await.unwrap().unwrap().status, EventStatus::Processed);
    assert!(w.billing.reconcile().await.unwrap().is_empty(), "{:?}", w.billing.reconcile().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_of_spent_credits_clamp_or_become_debt() {
    for policy in [RefundPolicy::Clamp, RefundPolicy::Debt] {
        let w = world_with(policy).await;
        let a = create_user(&*w.store, "spender").await;
        let p = w.buy(&a, Pack::Small).await;
        w.deliver(&event("evt_1", "payment_intent.succeeded", w.now(), intent("pi_s", &p, "succeeded"))).await.unwrap();
        // 80 of the 105 spent.
        applied(w.store.spend(Spend { account: a.clone(), amount: 80, usage: None, reference: "runs".into(), key: key("spend-80") }).await);
        w.deliver(&event("evt_2", "charge.refunded", w.now(), charge("pi_s", 500, 500))).await.unwrap();
        // Only 25 were left to take back.
        assert_eq!(w.total(&a).await, 0);
        let debt = w.store.debt(&a).await.unwrap();
        match policy {
            RefundPolicy::Clamp => assert_eq!(debt, 0),
            RefundPolicy::Debt => {
                assert_eq!(debt, 75);
                // A playground that checks debts refuses runs until it is repaid.
                let play = prpm_playground_core::playground::Playground::new(
                    w.store.clone(),
                    Pricing::default(),
                    Arc::new(prpm_playground_core::playground::StorePackages(w.store.clone())),
                )
                .with_client(provider::ProviderClient::new(provider::ClientConfig::anthropic(provider::ApiKey::new("k").unwrap())).unwrap())
                .with_config(prpm_playground_core::playground::PlaygroundConfig { check_debt: true, ..Default::default() });
                let run = prpm_playground_core::playground::RunRequest {
                    account: a.clone(),
                    package_id: None,
                    session: None,
                    input: "hi".into(),
                    model: "claude-sonnet-4-5".into(),
                    temperature: None,
                    max_tokens: Some(100),
                    run_id: None,
                };
                assert!(matches!(play.run(run.clone()).await.unwrap(), Err(Rejection::InDebt { credits: 75 })));
                // The next pack repays the debt first, once, however often its event comes.
                let q = w.buy(&a, Pack::Small).await;
                for _ in 0..5 {
                    w.deliver(&event("evt_3", "payment_intent.succeeded", w.now(), intent("pi_t", &q, "succeeded"))).await.unwrap();
                }
                assert_eq!(w.store.debt(&a).await.unwrap(), 0);
                assert_eq!(w.total(&a).await, 25);
            }
        }
    }
}

fn subscription(id: &str, account: &str, customer: &str, price: &str, status: &str, period_start: i64, period_end: i64, cancelling: bool) -> Value {
    json!({
        "id": id, "object": "subscription", "customer": customer, "status": status, "cancel_at_period_end": cancelling,
        "created": period_start, "start_date": period_start, "livemode": false, "collection_method": "charge_automatically",
        "items": {"object": "list", "has_more": false, "data": [{
            "id": format!("si_{id}"), "object": "subscription_item", "quantity": 1,
            "current_period_start": period_start, "current_period_end": period_end,
            "price": {"id": price, "object": "price", "currency": "usd", "unit_amount": 600, "recurring": {"interval": "month", "interval_count": 1}}
        }]},
        "metadata": if account.is_empty() { json!({}) } else { json!({"account_id": account}) }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_set_the_plan_and_grant_each_period_once() {
    let w = world().await;
    let a = create_user(&*w.store, "subscriber").await;
    let start = w.now();
    let end = (w.clock.now() + Duration::days(31)).timestamp();
    let created =
        event("evt_sub_1", "customer.subscription.created", start, subscription("sub_1", "subscriber", "cus_S", "price_plus", "active", start, end, false));
    let updated =
        event("evt_sub_2", "customer.subscription.updated", start + 5, subscription("sub_1", "subscriber", "cus_S", "price_plus", "active", start, end, false));
    // `updated` first, then `created`, each ten times.
    for _ in 0..10 {
        w.deliver(&updated).await.unwrap();
        w.deliver(&created).await.unwrap();
    }
    let b = w.store.balance(&a).await.unwrap();
    assert_eq!(b.monthly, 60, "one allocation");
    let plan = b.plan.unwrap();
    assert_eq!((plan.active, plan.period_end.timestamp()), (true, end));
    assert_eq!(w.store.cost(&a).await.unwrap().tier, "prpm_plus_individual");
    assert_eq!(w.total(&a).await, 65);

    // The renewal: the period ends, Stripe sends the next one (twice); the ledger grants it once.
    w.clock.set(w.clock.now() + Duration::days(31) + Duration::minutes(1));
    let end2 = (w.clock.now() + Duration::days(30)).timestamp();
    let renewed =
        event("evt_sub_3", "customer.subscription.updated", w.now(), subscription("sub_1", "subscriber", "cus_S", "price_plus", "active", end, end2, false));
    w.deliver(&renewed).await.unwrap();
    w.deliver(&renewed).await.unwrap();
    // A stale copy of the first period's state changes nothing.
    let stale =
        event("evt_sub_2b", "customer.subscription.updated", w.now(), subscription("sub_1", "subscriber", "cus_S", "price_plus", "active", start, end, false));
    w.deliver(&stale).await.unwrap();
    let b = w.store.balance(&a).await.unwrap();
    assert_eq!(b.plan.unwrap().period_end.timestamp(), end2);
    assert_eq!(b.monthly, 60, "the new period's allocation (the old one rolled over)");
    assert_eq!(b.rollover, 60);

    // Cancelled: the plan runs to the end of the period, then stops.
    let deleted =
        event("evt_sub_4", "customer.subscription.deleted", w.now(), subscription("sub_1", "subscriber", "cus_S", "price_plus", "canceled", end, end2, false));
    w.deliver(&deleted).await.unwrap();
    let plan = w.store.balance(&a).await.unwrap().plan.unwrap();
    assert!(!plan.active);
    assert_eq!(w.store.cost(&a).await.unwrap().tier, "prpm_plus_individual", "until the period ends");
    w.total(&a).await;

    // The org-member price sets the org tier.
    let o = create_user(&*w.store, "member").await;
    w.deliver(&event(
        "evt_org",
        "customer.subscription.created",
        w.now(),
        subscription("sub_2", "member", "cus_O", "price_plus_org", "active", w.now(), end2 + 100, false),
    ))
    .await
    .unwrap();
    assert_eq!(w.store.cost(&o).await.unwrap().tier, "prpm_plus_org");
    assert_eq!(w.store.balance(&o).await.unwrap().monthly, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signatures_are_refused_and_change_nothing() {
    let w = world().await;
    let a = create_user(&*w.store, "victim").await;
    let p = w.buy(&a, Pack::Large).await;
    let body = event("evt_forged", "payment_intent.succeeded", w.now(), intent("pi_x", &p, "succeeded"));
    let good = sign(SECRET, w.now(), &body);
    let mut tampered = body.clone();
    let at = tampered.iter().position(|&b| b == b'2').unwrap();
    tampered[at] = b'9';
    let cases: Vec<(Option<String>, Vec<u8>)> = vec![
        (Some(good.clone()), tampered),
        (Some(sign("whsec_wrong", w.now(), &body)), body.clone()),
        (Some(sign(SECRET, w.now() - 301, &body)), body.clone()),
        (Some(sign(SECRET, w.now() + 301, &body)), body.clone()),
        (None, body.clone()),
        (Some("t=,v1=".into()), body.clone()),
        (Some("complete garbage".into()), body.clone()),
        (Some(good.replace("v1=", "v0=")), body.clone()),
    ];
    for (header, b) in cases {
        let e = w.billing.handle_webhook(header.as_deref(), &b).await.unwrap_err();
        assert_eq!(e.code(), "invalid_signature", "{header:?}: {e}");
    }
    assert!(w.store.stripe_events(None, 100).await.unwrap().is_empty(), "nothing stored");
    assert_eq!(w.total(&a).await, 5);
    // The same event, properly signed, goes through.
    w.billing.handle_webhook(Some(&good), &body).await.unwrap();
    assert_eq!(w.total(&a).await, 605);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_types_are_ignored_and_unknown_customers_kept_for_later() {
    let w = world().await;
    let ignored = event("evt_inv", "invoice.paid", w.now(), json!({"id": "in_1", "object": "invoice"}));
    assert_eq!(w.deliver(&ignored).await.unwrap(), WebhookOutcome::Ignored { event: "evt_inv".into() });
    assert_eq!(w.deliver(&ignored).await.unwrap(), WebhookOutcome::Ignored { event: "evt_inv".into() });
    let end = (w.clock.now() + Duration::days(30)).timestamp();
    let orphan =
        event("evt_orphan", "customer.subscription.created", w.now(), subscription("sub_9", "", "cus_Unknown", "price_plus", "active", w.now(), end, false));
    assert_eq!(w.deliver(&orphan).await.unwrap(), WebhookOutcome::Unmatched { event: "evt_orphan".into() });
    let kept = w.store.stripe_events(Some(EventStatus::Unmatched), 10).await.unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].kind, "customer.subscription.created");
    // Once the customer is known, the kept event applies.
    let a = create_user(&*w.store, "late").await;
    w.store.link_customer("cus_Unknown", &a).await.unwrap();
    assert_eq!(w.billing.retry_unmatched(10).await.unwrap(), vec![WebhookOutcome::Processed { event: "evt_orphan".into() }]);
    assert_eq!(w.store.balance(&a).await.unwrap().monthly, 60);
    assert_eq!(w.store.stripe_event("evt_orphan").await.unwrap().unwrap().status, EventStatus::Processed);
    w.total(&a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_receiving_the_same_events_at_once_apply_them_once() {
    let w = world().await;
    // A second worker: its own store handle on the same file, its own Billing.
    let other: Arc<dyn Store> = Arc::new(SqliteStore::open_with(SqliteOptions::file(&w.path).clock(w.clock.clone())).unwrap());
    two_workers(w, other).await;
}

/// The same on PostgreSQL: two nodes (two pools) on one database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postgres_nodes_receiving_the_same_events_at_once_apply_them_once() {
    use prpm_playground_core::pg_cluster::PgCluster;
    use prpm_playground_core::store::postgres::{PgOptions, PgStore};
    let cluster = match PgCluster::shared() {
        Ok(Some(c)) => c,
        Ok(None) => {
            eprintln!("SKIPPED: PostgreSQL is not installed here (CI installs it and sets PRPM_REQUIRE_POSTGRES=1)");
            return;
        }
        Err(e) => panic!("cannot start a PostgreSQL cluster: {e}"),
    };
    let url = cluster.create_database().await.unwrap();
    let mut w = world().await;
    let node = |url: String, clock: Arc<ManualClock>| async move {
        Arc::new(PgStore::open(PgOptions::new(url).clock(clock).pool_size(8)).await.unwrap()) as Arc<dyn Store>
    };
    w.store = node(url.clone(), w.clock.clone()).await;
    w.billing = Billing::new(w.store.clone(), config(&w.stripe.url(), RefundPolicy::Clamp)).unwrap();
    let other = node(url, w.clock.clone()).await;
    two_workers(w, other).await;
}

async fn two_workers(w: World, other: Arc<dyn Store>) {
    let a = create_user(&*w.store, "busy").await;
    let billing2 = Arc::new(Billing::new(other.clone(), config(&w.stripe.url(), RefundPolicy::Clamp)).unwrap());
    let mut purchases = Vec::new();
    for _ in 0..5 {
        purchases.push(w.buy(&a, Pack::Medium).await);
    }
    let billing1 = Arc::new(w.billing);
    let mut tasks = Vec::new();
    for (i, p) in purchases.iter().enumerate() {
        let pi = format!("pi_{i}");
        let bodies = [
            event(&format!("evt_ok_{i}"), "payment_intent.succeeded", w.clock.now().timestamp(), intent(&pi, p, "succeeded")),
            event(&format!("evt_rf_{i}"), "charge.refunded", w.clock.now().timestamp(), charge(&pi, 1_000, 400)),
            event(&format!("evt_rf2_{i}"), "charge.refunded", w.clock.now().timestamp(), charge(&pi, 1_000, 700)),
        ];
        for body in bodies {
            for b in [billing1.clone(), billing2.clone(), billing1.clone(), billing2.clone()] {
                let body = body.clone();
                let header = sign(SECRET, w.clock.now().timestamp(), &body);
                tasks.push(tokio::spawn(async move { b.handle_webhook(Some(&header), &body).await }));
            }
        }
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // Each pack: 250 credited, then 70 % of it (175) taken back, whatever the interleaving.
    let report = w.store.verify().await.unwrap();
    assert!(report.is_clean(), "{:?}", report.discrepancies);
    assert_eq!(w.store.balance(&a).await.unwrap().total, 5 + 5 * (250 - 175));
    for p in &purchases {
        let p = w.store.purchase(&p.id).await.unwrap().unwrap();
        assert_eq!((p.refunded_cents, p.credits_reversed, p.credited), (700, 175, true));
    }
    assert!(billing1.reconcile().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_lists_what_disagrees() {
    let w = world().await;
    let a = create_user(&*w.store, "recon").await;
    let p = w.buy(&a, Pack::Small).await;
    // Stripe says paid, the ledger never credited it (a crash, or an event never delivered).
    w.store.save_purchase(&Purchase { status: PurchaseStatus::Completed, ..p.clone() }).await.unwrap().unwrap();
    let q = w.buy(&a, Pack::Small).await;
    w.deliver(&event("evt_q", "payment_intent.succeeded", w.now(), intent("pi_q", &q, "succeeded"))).await.unwrap();
    // Refunded on record, not taken back in the ledger.
    let q = w.store.purchase(&q.id).await.unwrap().unwrap();
    w.store.save_purchase(&Purchase { refunded_cents: 500, status: PurchaseStatus::Refunded, ..q.clone() }).await.unwrap().unwrap();
    let found = w.billing.reconcile().await.unwrap();
    let kinds: Vec<(&str, &str)> = found.iter().map(|d| (d.purchase_id.as_str(), d.kind)).collect();
    assert!(kinds.contains(&(p.id.as_str(), "paid_not_credited")), "{found:?}");
    assert!(kinds.contains(&(q.id.as_str(), "refund_not_reversed")), "{found:?}");
    assert_eq!(found.len(), 2, "{found:?}");
}

/// A process that stopped between claiming a reversal step on the purchase row and taking
/// the credits back (with or without the clawback already in the ledger) leaves the claim;
/// the redelivery, or `finish_reversals`, finishes that very step, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_cut_short_is_finished_once() {
    for clawed_before_the_crash in [false, true] {
        for by_redelivery in [true, false] {
            let w = world().await;
            let a = create_user(&*w.store, "buyer").await;
            let p = w.buy(&a, Pack::Small).await;
            w.deliver(&event("evt_pay", "payment_intent.succeeded", w.now(), intent("pi_c", &p, "succeeded"))).await.unwrap();
            assert_eq!(w.total(&a).await, 105);
            // What the crash leaves: half refunded at Stripe, recorded, the step to 50 claimed.
            let cur = w.store.purchase(&p.id).await.unwrap().unwrap();
            let claimed = Purchase { refunded_cents: 250, status: PurchaseStatus::PartiallyRefunded, reversing_to: Some(50), ..cur };
            w.store.save_purchase(&claimed).await.unwrap().unwrap();
            if clawed_before_the_crash {
                let claw = Clawback {
                    account: a.clone(),
                    bucket: Bucket::Purchased,
                    amount: 50,
                    reference: format!("stripe refund of purchase {}", p.id),
                    key: key(&format!("stripe:{}:reverse:0-50", p.id)),
                };
                applied(w.store.clawback(claw).await);
            }
            assert_eq!(w.total(&a).await, if clawed_before_the_crash { 55 } else { 105 });
            let found = w.billing.reconcile().await.unwrap();
            assert_eq!(found.iter().map(|d| d.kind).collect::<Vec<_>>(), ["reversal_pending"], "{found:?}");

            if by_redelivery {
                // Stripe never got its 2xx: the refund comes again (and again).
                for _ in 0..3 {
                    w.deliver(&event("evt_ref", "charge.refunded", w.now(), charge("pi_c", 500, 250))).await.unwrap();
                }
            } else {
                assert_eq!(w.billing.finish_reversals().await.unwrap(), [p.id.clone()]);
            }
            assert!(w.billing.finish_reversals().await.unwrap().is_empty(), "nothing left to finish");
            assert_eq!(w.total(&a).await, 55, "50 taken back, once (clawed before the crash: {clawed_before_the_crash})");
            let done = w.store.purchase(&p.id).await.unwrap().unwrap();
            assert_eq!((done.credits_reversed, done.reversing_to), (50, None));
            assert!(w.billing.reconcile().await.unwrap().is_empty(), "{:?}", w.billing.reconcile().await.unwrap());

            // The rest of the refund later: the next step, once.
            for _ in 0..3 {
                w.deliver(&event("evt_ref2", "charge.refunded", w.now(), charge("pi_c", 500, 500))).await.unwrap();
            }
            assert_eq!(w.total(&a).await, 5);
            assert!(w.billing.reconcile().await.unwrap().is_empty());
        }
    }
}

/// Under the debt policy: two packs paid at the same moment repay one debt once between them;
/// a repayment cut short (the debt claimed, the credits not yet taken) is finished by the
/// redelivery; a reversal's debt is recorded once however often its event comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debt_repayments_are_exact_under_concurrency_and_crashes() {
    let w = world_with(RefundPolicy::Debt).await;
    let a = create_user(&*w.store, "debtor").await;
    let p = w.buy(&a, Pack::Small).await;
    w.deliver(&event("evt_1", "payment_intent.succeeded", w.now(), intent("pi_1", &p, "succeeded"))).await.unwrap();
    applied(w.store.spend(Spend { account: a.clone(), amount: 80, usage: None, reference: "runs".into(), key: key("spend-80") }).await);
    for _ in 0..3 {
        w.deliver(&event("evt_2", "charge.refunded", w.now(), charge("pi_1", 500, 500))).await.unwrap();
    }
    assert_eq!((w.total(&a).await, w.store.debt(&a).await.unwrap()), (0, 75), "25 taken back, 75 owed, once");

    // Two packs at once: the 75 are repaid once between them.
    let (q, r) = (w.buy(&a, Pack::Small).await, w.buy(&a, Pack::Small).await);
    let (eq, er) = (
        event("evt_q", "payment_intent.succeeded", w.now(), intent("pi_q", &q, "succeeded")),
        event("evt_r", "payment_intent.succeeded", w.now(), intent("pi_r", &r, "succeeded")),
    );
    let (x, y) = tokio::join!(w.deliver(&eq), w.deliver(&er));
    x.unwrap();
    y.unwrap();
    assert_eq!((w.total(&a).await, w.store.debt(&a).await.unwrap()), (200 - 75, 0));

    // A new debt: all 125 spent, then r refunded in full (100 owed).
    applied(w.store.spend(Spend { account: a.clone(), amount: 125, usage: None, reference: "runs".into(), key: key("spend-125") }).await);
    w.deliver(&event("evt_r_ref", "charge.refunded", w.now(), charge("pi_r", 500, 500))).await.unwrap();
    assert_eq!((w.total(&a).await, w.store.debt(&a).await.unwrap()), (0, 100));
    // A large pack whose repayment was cut short: the debt was claimed, nothing else happened.
    let s = w.buy(&a, Pack::Large).await;
    let claimed = w.store.add_debt(&a, -s.credits, &format!("stripe:{}:repay", s.id)).await.unwrap();
    assert_eq!((claimed.applied, claimed.debt_after), (-100, 0));
    for _ in 0..3 {
        w.deliver(&event("evt_s", "payment_intent.succeeded", w.now(), intent("pi_s", &s, "succeeded"))).await.unwrap();
    }
    assert_eq!((w.total(&a).await, w.store.debt(&a).await.unwrap()), (600 - 100, 0), "the claimed 100 taken, once");
    assert!(w.billing.reconcile().await.unwrap().is_empty(), "{:?}", w.billing.reconcile().await.unwrap());
}

/// Stripe does not deliver in order: a subscription event older than one applied, or any
/// but `deleted` after the deletion (even from the same second), changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_update_never_brings_a_cancelled_plan_back() {
    let w = world().await;
    let a = create_user(&*w.store, "late").await;
    let start = w.now();
    let end = (w.clock.now() + Duration::days(31)).timestamp();
    let sub = |status: &str, cancelling: bool| subscription("sub_l", "late", "cus_L", "price_plus", status, start, end, cancelling);
    w.deliver(&event("evt_l1", "customer.subscription.created", start, sub("active", false))).await.unwrap();
    assert!(w.store.balance(&a).await.unwrap().plan.unwrap().active);
    w.deliver(&event("evt_l3", "customer.subscription.deleted", start + 10, sub("canceled", false))).await.unwrap();
    assert!(!w.store.balance(&a).await.unwrap().plan.unwrap().active);
    // Late: an update from the same second as the deletion, and an older one.
    for (id, at) in [("evt_l2", start + 10), ("evt_l0", start + 5)] {
        for _ in 0..3 {
            w.deliver(&event(id, "customer.subscription.updated", at, sub("active", false))).await.unwrap();
        }
        assert!(!w.store.balance(&a).await.unwrap().plan.unwrap().active, "{id} brought the plan back");
    }

    // Updates out of order: cancel at period end (newer) before an older "active".
    let b = create_user(&*w.store, "late2").await;
    let sub2 = |cancelling: bool| subscription("sub_m", "late2", "cus_M", "price_plus", "active", start, end, cancelling);
    w.deliver(&event("evt_m1", "customer.subscription.created", start, sub2(false))).await.unwrap();
    w.deliver(&event("evt_m3", "customer.subscription.updated", start + 20, sub2(true))).await.unwrap();
    assert!(!w.store.balance(&b).await.unwrap().plan.unwrap().active, "cancelling at the period's end");
    w.deliver(&event("evt_m2", "customer.subscription.updated", start + 10, sub2(false))).await.unwrap();
    assert!(!w.store.balance(&b).await.unwrap().plan.unwrap().active, "an older update changed nothing");
    // A newer one applies.
    w.deliver(&event("evt_m4", "customer.subscription.updated", start + 30, sub2(false))).await.unwrap();
    assert!(w.store.balance(&b).await.unwrap().plan.unwrap().active, "resumed");
    w.total(&a).await;
}

/// A refund that overtakes its payment is found by its payment intent, however many other
/// events are kept as unmatched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_refund_is_found_among_many_unmatched_events() {
    let w = world().await;
    let a = create_user(&*w.store, "early").await;
    // 1,500 events of customers nobody knows, kept before the refund.
    for i in 0..1_500 {
        let e = StripeEventRecord {
            id: format!("evt_unknown_{i:04}"),
            kind: "customer.subscription.updated".into(),
            created: w.now(),
            object_ref: Some(format!("sub_unknown_{i}")),
            status: EventStatus::Unmatched,
            account: None,
            payload: "{}".into(),
            received_at: w.clock.now(),
        };
        assert!(w.store.record_stripe_event(&e).await.unwrap());
    }
    let p = w.buy(&a, Pack::Large).await;
    assert_eq!(
        w.deliver(&event("evt_early", "charge.refunded", w.now(), charge("pi_e", 2_000, 1_000))).await.unwrap(),
        WebhookOutcome::Unmatched { event: "evt_early".into() }
    );
    w.deliver(&event("evt_pay", "payment_intent.succeeded", w.now(), intent("pi_e", &p, "succeeded"))).await.unwrap();
    assert_eq!(w.total(&a).await, 5 + 300, "600 credited, the refunded half taken back");
    assert_eq!(w.store.stripe_event("evt_early").await.unwrap().unwrap().status, EventStatus::Processed);
    assert!(w.billing.reconcile().await.unwrap().is_empty());
}
