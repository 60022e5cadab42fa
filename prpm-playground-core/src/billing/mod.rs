//! Stripe billing: credit packs and subscriptions bought through Checkout, and the signed
//! webhooks that pay for them, fail them, refund them and keep plans in step.
//!
//! Every event is applied **exactly once in effect**, whatever Stripe repeats or reorders and
//! whichever node receives it: the ledger commands it issues carry keys derived from the
//! purchase (a grant, a reversal from one refunded level to the next, a plan change per event),
//! and purchase rows move by compare-and-set, so two nodes applying the same event at once
//! apply it once, and an event that arrives again changes nothing.

pub mod signature;

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::ledger::*;
use crate::purchase::*;
use crate::store::Store;

/// A Stripe secret key; its `Debug` form never shows it.
#[derive(Clone)]
pub struct SecretKey(String);

impl SecretKey {
    pub fn new(key: impl Into<String>) -> Self {
        SecretKey(key.into())
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(***)")
    }
}

/// The five Stripe price ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceIds {
    pub small_pack: String,
    pub medium_pack: String,
    pub large_pack: String,
    pub plus_individual: String,
    pub plus_org_member: String,
}

/// A one-time credit pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pack {
    Small,
    Medium,
    Large,
}

impl Pack {
    pub const ALL: [Pack; 3] = [Pack::Small, Pack::Medium, Pack::Large];
    pub fn name(self) -> &'static str {
        match self {
            Pack::Small => "small",
            Pack::Medium => "medium",
            Pack::Large => "large",
        }
    }
    /// $5 / $10 / $20.
    pub fn cents(self) -> i64 {
        match self {
            Pack::Small => 500,
            Pack::Medium => 1_000,
            Pack::Large => 2_000,
        }
    }
    /// 100 / 250 / 600 credits.
    pub fn credits(self) -> i64 {
        match self {
            Pack::Small => 100,
            Pack::Medium => 250,
            Pack::Large => 600,
        }
    }
}

/// A subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Plan {
    /// PRPM+ Individual, $6 a month.
    PlusIndividual,
    /// PRPM+ Org member, $3 a month.
    PlusOrgMember,
}

impl Plan {
    pub fn name(self) -> &'static str {
        match self {
            Plan::PlusIndividual => "plus_individual",
            Plan::PlusOrgMember => "plus_org_member",
        }
    }
    pub fn cents(self) -> i64 {
        match self {
            Plan::PlusIndividual => 600,
            Plan::PlusOrgMember => 300,
        }
    }
}

/// What happens to refunded credits that were already spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RefundPolicy {
    /// Take back what is left, at most down to zero (the default).
    #[default]
    Clamp,
    /// Take back what is left and record the rest as a debt (`Store::debt`), which a
    /// playground configured with `check_debt` refuses runs on, and which the next purchases
    /// repay first.
    Debt,
}

#[derive(Debug, Clone)]
pub struct BillingConfig {
    pub secret_key: SecretKey,
    /// Endpoint secrets (`whsec_...`); more than one while rolling.
    pub webhook_secrets: Vec<String>,
    /// The Stripe API's base URL (`https://api.stripe.com/` when `None`).
    pub api_base: Option<String>,
    pub prices: PriceIds,
    pub refund_policy: RefundPolicy,
    /// Monthly allocation of each plan, in credits.
    pub plus_individual_credits: i64,
    pub plus_org_member_credits: i64,
    /// Tolerance of a webhook's signed timestamp, in seconds (Stripe's default: 300).
    pub tolerance_secs: i64,
}

impl BillingConfig {
    /// From the environment: `STRIPE_SECRET_KEY`, `STRIPE_PLAYGROUND_WEBHOOK_SECRET` (several
    /// separated by commas while rolling), `STRIPE_SMALL_PACK_PRICE_ID`,
    /// `STRIPE_MEDIUM_PACK_PRICE_ID`, `STRIPE_LARGE_PACK_PRICE_ID`, `STRIPE_PRPM_PLUS_PRICE_ID`,
    /// `STRIPE_PRPM_PLUS_ORG_MEMBER_PRICE_ID`, and optionally `STRIPE_API_BASE`,
    /// `PRPM_PLUS_MONTHLY_CREDITS`, `PRPM_PLUS_ORG_MEMBER_MONTHLY_CREDITS`,
    /// `PRPM_REFUND_POLICY` (`clamp` or `debt`). `Ok(None)` without a secret key.
    pub fn from_env() -> Result<Option<Self>> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let Some(key) = var("STRIPE_SECRET_KEY") else { return Ok(None) };
        let need = |n: &'static str| var(n).ok_or_else(|| Error::invalid(n, "must be set with STRIPE_SECRET_KEY"));
        let num = |n: &'static str, default: i64| -> Result<i64> {
            var(n).map_or(Ok(default), |v| v.parse().map_err(|_| Error::invalid(n, "must be a whole number of credits")))
        };
        let cfg = BillingConfig {
            secret_key: SecretKey::new(key),
            webhook_secrets: need("STRIPE_PLAYGROUND_WEBHOOK_SECRET")?.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect(),
            api_base: var("STRIPE_API_BASE"),
            prices: PriceIds {
                small_pack: need("STRIPE_SMALL_PACK_PRICE_ID")?,
                medium_pack: need("STRIPE_MEDIUM_PACK_PRICE_ID")?,
                large_pack: need("STRIPE_LARGE_PACK_PRICE_ID")?,
                plus_individual: need("STRIPE_PRPM_PLUS_PRICE_ID")?,
                plus_org_member: need("STRIPE_PRPM_PLUS_ORG_MEMBER_PRICE_ID")?,
            },
            refund_policy: match var("PRPM_REFUND_POLICY").as_deref() {
                None | Some("clamp") => RefundPolicy::Clamp,
                Some("debt") => RefundPolicy::Debt,
                Some(_) => return Err(Error::invalid("PRPM_REFUND_POLICY", "clamp or debt")),
            },
            plus_individual_credits: num("PRPM_PLUS_MONTHLY_CREDITS", DEFAULT_PLUS_CREDITS)?,
            plus_org_member_credits: num("PRPM_PLUS_ORG_MEMBER_MONTHLY_CREDITS", DEFAULT_ORG_MEMBER_CREDITS)?,
            tolerance_secs: signature::DEFAULT_TOLERANCE_SECS,
        };
        cfg.validate()?;
        Ok(Some(cfg))
    }

    pub fn validate(&self) -> Result<()> {
        if self.webhook_secrets.is_empty() {
            return Err(Error::invalid("webhook_secrets", "at least one"));
        }
        for c in [self.plus_individual_credits, self.plus_org_member_credits] {
            if !(0..=MAX_CREDITS_PER_REQUEST).contains(&c) {
                return Err(Error::invalid("monthly_credits", "out of range"));
            }
        }
        if !(1..=3_600).contains(&self.tolerance_secs) {
            return Err(Error::invalid("tolerance_secs", "1..=3600"));
        }
        Ok(())
    }

    fn plan_of_price(&self, price: &str) -> Option<Plan> {
        if price == self.prices.plus_individual {
            Some(Plan::PlusIndividual)
        } else if price == self.prices.plus_org_member {
            Some(Plan::PlusOrgMember)
        } else {
            None
        }
    }

    fn monthly_credits(&self, plan: Plan) -> i64 {
        match plan {
            Plan::PlusIndividual => self.plus_individual_credits,
            Plan::PlusOrgMember => self.plus_org_member_credits,
        }
    }
}

/// Monthly credits of PRPM+ Individual ($6): the earlier $20 plan's 10 credits a dollar.
pub const DEFAULT_PLUS_CREDITS: i64 = 60;
/// Monthly credits of PRPM+ Org member ($3).
pub const DEFAULT_ORG_MEMBER_CREDITS: i64 = 30;

/// A checkout to send the buyer to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Checkout {
    pub purchase_id: String,
    pub session_id: String,
    /// Stripe's hosted page.
    pub url: Option<String>,
}

/// What a webhook did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// Applied.
    Processed { event: String },
    /// Already applied (Stripe delivered it again): nothing changed.
    Duplicate { event: String },
    /// A type we do not handle: acknowledged.
    Ignored { event: String },
    /// For a customer or purchase we do not know: stored for reconciliation.
    Unmatched { event: String },
}

/// A purchase whose Stripe side and ledger side disagree.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Discrepancy {
    pub purchase_id: String,
    pub account: AccountId,
    /// `paid_not_credited`, `credited_not_paid`, `refund_not_reversed`, `reversed_more_than_refunded`,
    /// `ledger_grant_missing`, `ledger_reversal_mismatch`.
    pub kind: &'static str,
    pub detail: String,
}

/// Billing over a store and the Stripe API.
pub struct Billing {
    store: Arc<dyn Store>,
    cfg: BillingConfig,
    client: stripe::Client,
}

fn stripe_error(e: stripe::StripeError) -> Error {
    match e {
        stripe::StripeError::Stripe(api, status) => {
            let msg = api.message.clone().unwrap_or_default();
            let code = match status {
                402 => "payment_declined",
                429 => "stripe_rate_limited",
                401 | 403 => "stripe_auth",
                s if s >= 500 => "stripe_unavailable",
                _ if api.decline_code.is_some() => "payment_declined",
                _ => "stripe_error",
            };
            Error::Stripe { code, message: format!("HTTP {status}: {msg}") }
        }
        stripe::StripeError::ClientError(m) | stripe::StripeError::ConfigError(m) => Error::Stripe { code: "stripe_unavailable", message: m },
        stripe::StripeError::Timeout => Error::Stripe { code: "stripe_unavailable", message: "timed out".into() },
        stripe::StripeError::JSONDeserialize(m) => Error::Stripe { code: "stripe_error", message: format!("unexpected response: {m}") },
    }
}

fn key(s: String) -> Result<IdempotencyKey> {
    IdempotencyKey::new(s)
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn i64_at(v: &Value, path: &[&str]) -> Option<i64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_i64()
}

/// Credits to take back when `refunded_cents` of `amount_cents` are refunded: the same share,
/// rounded down (a refund never takes back more than its share).
pub fn credits_to_reverse(credits: i64, amount_cents: i64, refunded_cents: i64) -> i64 {
    if amount_cents <= 0 {
        return 0;
    }
    let r = i128::from(credits) * i128::from(refunded_cents.clamp(0, amount_cents)) / i128::from(amount_cents);
    r as i64
}

impl Billing {
    pub fn new(store: Arc<dyn Store>, cfg: BillingConfig) -> Result<Self> {
        cfg.validate()?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = stripe::ClientBuilder::new(cfg.secret_key.0.clone());
        if let Some(url) = &cfg.api_base {
            // The client appends `v1/...` to the base as given.
            b = b.url(if url.ends_with('/') { url.clone() } else { format!("{url}/") });
        }
        let client = b.build().map_err(stripe_error)?;
        Ok(Billing { store, cfg, client })
    }

    pub fn config(&self) -> &BillingConfig {
        &self.cfg
    }

    // ---- purchases --------------------------------------------------------------------------

    /// Starts buying a pack: records the purchase as pending, then creates the Checkout Session
    /// (idempotent on the purchase id, so a retried call cannot create two).
    pub async fn checkout_pack(&self, account: &AccountId, pack: Pack, success_url: &str, cancel_url: &str) -> Result<Checkout> {
        let price = match pack {
            Pack::Small => &self.cfg.prices.small_pack,
            Pack::Medium => &self.cfg.prices.medium_pack,
            Pack::Large => &self.cfg.prices.large_pack,
        }
        .clone();
        self.checkout(account, PurchaseKind::Pack, pack.name(), pack.credits(), pack.cents(), &price, success_url, cancel_url).await
    }

    /// Starts a subscription through Checkout.
    pub async fn checkout_subscription(&self, account: &AccountId, plan: Plan, success_url: &str, cancel_url: &str) -> Result<Checkout> {
        let price = match plan {
            Plan::PlusIndividual => &self.cfg.prices.plus_individual,
            Plan::PlusOrgMember => &self.cfg.prices.plus_org_member,
        }
        .clone();
        self.checkout(account, PurchaseKind::Subscription, plan.name(), 0, plan.cents(), &price, success_url, cancel_url).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn checkout(
        &self,
        account: &AccountId,
        kind: PurchaseKind,
        product: &str,
        credits: i64,
        cents: i64,
        price: &str,
        success_url: &str,
        cancel_url: &str,
    ) -> Result<Checkout> {
        use stripe::{IdempotencyKey as StripeKey, RequestStrategy, StripeRequest};
        use stripe_checkout::checkout_session::{
            CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionPaymentIntentData, CreateCheckoutSessionSubscriptionData,
        };
        for (field, url) in [("success_url", success_url), ("cancel_url", cancel_url)] {
            if !(url.starts_with("https://") || url.starts_with("http://")) || url.len() > 2_048 {
                return Err(Error::invalid(field, "must be an http(s) URL"));
            }
        }
        let now = self.store.clock().now();
        let id = format!("pur_{}", crate::session::RunId::generate());
        let pending = Purchase {
            id: id.clone(),
            account: account.clone(),
            kind,
            product: product.into(),
            credits,
            amount_cents: cents,
            currency: "usd".into(),
            status: PurchaseStatus::Pending,
            checkout_session: None,
            payment_intent: None,
            customer: None,
            credited: false,
            refunded_cents: 0,
            credits_reversed: 0,
            reversing_to: None,
            version: 0,
            created_at: now,
            updated_at: now,
        };
        // The account must exist before anyone pays.
        self.store.balance(account).await?;
        let mut p = self.store.create_purchase(&pending).await?;
        let metadata: HashMap<String, String> = [("purchase_id".to_owned(), id.clone()), ("account_id".to_owned(), account.to_string())].into();
        let mut req = CreateCheckoutSession::new()
            .line_items(vec![CreateCheckoutSessionLineItems { price: Some(price.to_owned()), quantity: Some(1), ..Default::default() }])
            .success_url(success_url)
            .cancel_url(cancel_url)
            .client_reference_id(id.clone())
            .metadata(metadata.clone());
        req = match kind {
            PurchaseKind::Pack => req
                .mode(stripe_checkout::CheckoutSessionMode::Payment)
                .payment_intent_data(CreateCheckoutSessionPaymentIntentData { metadata: Some(metadata), ..Default::default() }),
            PurchaseKind::Subscription => req
                .mode(stripe_checkout::CheckoutSessionMode::Subscription)
                .subscription_data(CreateCheckoutSessionSubscriptionData { metadata: Some(metadata), ..Default::default() }),
        };
        let strategy = RequestStrategy::Idempotent(StripeKey::new(&id).map_err(|e| Error::Invariant(format!("idempotency key: {e}")))?);
        let session = match req.customize().request_strategy(strategy).send(&self.client).await {
            Ok(s) => s,
            Err(e) => {
                let err = stripe_error(e);
                p.status = PurchaseStatus::Failed;
                let _ = self.store.save_purchase(&p).await;
                return Err(err);
            }
        };
        p.checkout_session = Some(session.id.to_string());
        p.customer = session.customer.as_ref().map(|c| c.id().to_string());
        self.store.save_purchase(&p).await?.ok_or_else(|| Error::Invariant("a new purchase moved under its checkout".into()))?;
        Ok(Checkout { purchase_id: id, session_id: session.id.to_string(), url: session.url })
    }

    // ---- webhooks ---------------------------------------------------------------------------

    /// Verifies and applies one webhook delivery. An `Err` changes nothing and should be
    /// answered with a 4xx (bad signature) or 5xx (retry later); every `Ok` with a 2xx.
    pub async fn handle_webhook(&self, signature: Option<&str>, body: &[u8]) -> Result<WebhookOutcome> {
        if body.len() > MAX_EVENT_PAYLOAD_BYTES {
            return Err(Error::invalid("payload", format!("longer than {MAX_EVENT_PAYLOAD_BYTES} bytes")));
        }
        signature::verify(signature, body, &self.cfg.webhook_secrets, self.store.clock().now(), self.cfg.tolerance_secs)?;
        let event: Value = serde_json::from_slice(body).map_err(|e| Error::invalid("payload", format!("not JSON: {e}")))?;
        let id = str_at(&event, &["id"]).ok_or_else(|| Error::invalid("payload", "no event id"))?.to_owned();
        let kind = str_at(&event, &["type"]).ok_or_else(|| Error::invalid("payload", "no event type"))?.to_owned();
        let object = event.get("data").and_then(|d| d.get("object")).ok_or_else(|| Error::invalid("payload", "no data.object"))?;
        let created = i64_at(&event, &["created"]).unwrap_or(0);
        let record = StripeEventRecord {
            id: id.clone(),
            kind: kind.clone(),
            created,
            object_ref: StripeEventRecord::object_ref_of(&kind, object),
            status: EventStatus::Received,
            account: None,
            payload: String::from_utf8_lossy(body).into_owned(),
            received_at: self.store.clock().now(),
        };
        if !self.store.record_stripe_event(&record).await? {
            match self.store.stripe_event(&id).await?.map(|e| e.status) {
                Some(EventStatus::Processed) => return Ok(WebhookOutcome::Duplicate { event: id }),
                Some(EventStatus::Ignored) => return Ok(WebhookOutcome::Ignored { event: id }),
                // Received (a delivery that failed half-way, or one being applied by another
                // node right now) or unmatched (the customer may be known by now): apply again;
                // every step is idempotent.
                _ => {}
            }
        }
        let (status, account) = self.apply(&id, &kind, created, object).await?;
        self.store.set_stripe_event_status(&id, status, account.as_ref()).await?;
        Ok(match status {
            EventStatus::Processed | EventStatus::Received => WebhookOutcome::Processed { event: id },
            EventStatus::Ignored => WebhookOutcome::Ignored { event: id },
            EventStatus::Unmatched => WebhookOutcome::Unmatched { event: id },
        })
    }

    /// Re-applies the events kept as unmatched (after their customer became known).
    pub async fn retry_unmatched(&self, limit: u32) -> Result<Vec<WebhookOutcome>> {
        let mut out = Vec::new();
        for e in self.store.stripe_events(Some(EventStatus::Unmatched), limit).await? {
            let event: Value = serde_json::from_str(&e.payload).map_err(|err| Error::Invariant(format!("stored event {}: {err}", e.id)))?;
            let Some(object) = event.get("data").and_then(|d| d.get("object")) else { continue };
            let (status, account) = self.apply(&e.id, &e.kind, e.created, object).await?;
            self.store.set_stripe_event_status(&e.id, status, account.as_ref()).await?;
            out.push(match status {
                EventStatus::Unmatched => WebhookOutcome::Unmatched { event: e.id },
                _ => WebhookOutcome::Processed { event: e.id },
            });
        }
        Ok(out)
    }

    async fn apply(&self, event_id: &str, kind: &str, created: i64, o: &Value) -> Result<(EventStatus, Option<AccountId>)> {
        match kind {
            "checkout.session.completed" => {
                let Some(p) = self.find_purchase(o, &["id"]).await? else { return Ok((EventStatus::Unmatched, None)) };
                let customer = str_at(o, &["customer"]).map(str::to_owned);
                if let Some(c) = &customer {
                    self.store.link_customer(c, &p.account).await?;
                }
                let intent = str_at(o, &["payment_intent"]).map(str::to_owned);
                let p = self.note_ids(p, intent, customer).await?;
                self.retry_refunds_for(&p).await?;
                if p.kind == PurchaseKind::Pack && str_at(o, &["payment_status"]) == Some("paid") {
                    self.credit_pack(&p.id).await?;
                } else if p.kind == PurchaseKind::Subscription {
                    self.set_status(&p.id, |p| (p.status == PurchaseStatus::Pending).then_some(PurchaseStatus::Completed)).await?;
                }
                Ok((EventStatus::Processed, Some(p.account)))
            }
            "payment_intent.succeeded" => {
                let Some(p) = self.find_purchase(o, &["id"]).await? else { return Ok((EventStatus::Unmatched, None)) };
                let p = self.note_ids(p, str_at(o, &["id"]).map(str::to_owned), str_at(o, &["customer"]).map(str::to_owned)).await?;
                self.retry_refunds_for(&p).await?;
                if p.kind == PurchaseKind::Pack {
                    self.credit_pack(&p.id).await?;
                }
                Ok((EventStatus::Processed, Some(p.account)))
            }
            "payment_intent.payment_failed" => {
                let Some(p) = self.find_purchase(o, &["id"]).await? else { return Ok((EventStatus::Unmatched, None)) };
                let p = self.note_ids(p, str_at(o, &["id"]).map(str::to_owned), None).await?;
                // A payment that failed before one that succeeded (a retried card) changes
                // nothing once credited.
                self.set_status(&p.id, |p| (p.status == PurchaseStatus::Pending && !p.credited).then_some(PurchaseStatus::Failed)).await?;
                Ok((EventStatus::Processed, Some(p.account)))
            }
            "charge.refunded" => {
                // A charge names its payment intent, which a purchase learns from its payment
                // events: a refund that overtakes them is kept as unmatched (and the payment's
                // event applies it). Marked before a second look, so that a payment event
                // noting the intent in between finds it.
                let p = match self.find_purchase(o, &["payment_intent"]).await? {
                    Some(p) => p,
                    None => {
                        self.store.set_stripe_event_status(event_id, EventStatus::Unmatched, None).await?;
                        match self.find_purchase(o, &["payment_intent"]).await? {
                            Some(p) => p,
                            None => return Ok((EventStatus::Unmatched, None)),
                        }
                    }
                };
                let refunded = i64_at(o, &["amount_refunded"]).ok_or_else(|| Error::invalid("payload", "charge without amount_refunded"))?;
                self.refund(&p.id, refunded).await?;
                Ok((EventStatus::Processed, Some(p.account)))
            }
            "customer.subscription.created" | "customer.subscription.updated" | "customer.subscription.deleted" => {
                self.subscription(event_id, kind, created, o).await
            }
            _ => Ok((EventStatus::Ignored, None)),
        }
    }

    /// Applies the refunds kept as unmatched that belong to this purchase's payment intent
    /// (looked up by the intent: however many other events are kept as unmatched).
    async fn retry_refunds_for(&self, p: &Purchase) -> Result<()> {
        let Some(pi) = &p.payment_intent else { return Ok(()) };
        for e in self.store.stripe_events_about(pi, EventStatus::Unmatched, crate::store::MAX_PAGE).await? {
            if e.kind != "charge.refunded" {
                continue;
            }
            let Ok(event) = serde_json::from_str::<Value>(&e.payload) else { continue };
            let Some(o) = event.get("data").and_then(|d| d.get("object")) else { continue };
            if str_at(o, &["payment_intent"]) != Some(pi.as_str()) {
                continue;
            }
            if let Some(refunded) = i64_at(o, &["amount_refunded"]) {
                self.refund(&p.id, refunded).await?;
                self.store.set_stripe_event_status(&e.id, EventStatus::Processed, Some(&p.account)).await?;
            }
        }
        Ok(())
    }

    /// The purchase an object belongs to: by its metadata's `purchase_id`, else by the Stripe
    /// id at `id_path` (a checkout session or payment intent id).
    async fn find_purchase(&self, o: &Value, id_path: &[&str]) -> Result<Option<Purchase>> {
        if let Some(id) = str_at(o, &["metadata", "purchase_id"]) {
            if let Some(p) = self.store.purchase(id).await? {
                return Ok(Some(p));
            }
        }
        match str_at(o, id_path) {
            Some(sid) if check_stripe_id(sid).is_ok() => self.store.purchase_by_stripe_id(sid).await,
            _ => Ok(None),
        }
    }

    /// Read-modify-write of a purchase until the compare-and-set holds. `f` returns `None`
    /// when there is nothing to change.
    async fn update(&self, id: &str, mut f: impl FnMut(&Purchase) -> Option<Purchase>) -> Result<(Purchase, bool)> {
        for _ in 0..64 {
            let p = self.store.purchase(id).await?.ok_or(Error::NotFound { what: "purchase" })?;
            let Some(next) = f(&p) else { return Ok((p, false)) };
            if let Some(saved) = self.store.save_purchase(&next).await? {
                return Ok((saved, true));
            }
        }
        Err(Error::Backend(format!("purchase {id} kept changing under its update")))
    }

    async fn set_status(&self, id: &str, f: impl Fn(&Purchase) -> Option<PurchaseStatus>) -> Result<Purchase> {
        Ok(self.update(id, |p| f(p).map(|status| Purchase { status, ..p.clone() })).await?.0)
    }

    async fn note_ids(&self, p: Purchase, intent: Option<String>, customer: Option<String>) -> Result<Purchase> {
        let intent = intent.filter(|i| check_stripe_id(i).is_ok() && p.payment_intent.is_none() && p.kind == PurchaseKind::Pack);
        let customer = customer.filter(|c| check_stripe_id(c).is_ok() && p.customer.is_none());
        if intent.is_none() && customer.is_none() {
            return Ok(p);
        }
        Ok(self
            .update(&p.id, |cur| {
                let mut next = cur.clone();
                if next.payment_intent.is_none() {
                    next.payment_intent = intent.clone();
                }
                if next.customer.is_none() {
                    next.customer = customer.clone();
                }
                (next != *cur).then_some(next)
            })
            .await?
            .0)
    }

    /// Grants a paid pack's credits (once: the grant's key is the purchase's), marks it
    /// credited, then takes back whatever was refunded before the payment was seen.
    async fn credit_pack(&self, id: &str) -> Result<()> {
        let p = self.store.purchase(id).await?.ok_or(Error::NotFound { what: "purchase" })?;
        let grant = Grant {
            account: p.account.clone(),
            bucket: Bucket::Purchased,
            amount: p.credits,
            source: GrantSource::Purchase,
            expires_at: None,
            reference: format!("stripe purchase {}", p.id),
            key: key(format!("stripe:{}:credit", p.id))?,
        };
        self.store.grant(grant).await?.map_err(|r| Error::Invariant(format!("grant of purchase {id}: {r}")))?;
        self.update(id, |p| (!p.credited).then(|| Purchase { credited: true, status: refund_status(p.refunded_cents, p.amount_cents), ..p.clone() })).await?;
        // Every step is keyed by the purchase: a redelivery after a crash anywhere here does
        // what is missing and repeats nothing.
        self.repay_debt(&p).await?;
        self.reverse(id).await
    }

    /// Records Stripe's cumulative `amount_refunded` (never moving back) and takes back the
    /// credits it covers.
    async fn refund(&self, id: &str, amount_refunded: i64) -> Result<()> {
        self.update(id, |p| {
            let refunded = amount_refunded.clamp(0, p.amount_cents);
            (refunded > p.refunded_cents).then(|| Purchase {
                refunded_cents: refunded,
                status: if p.credited || p.status != PurchaseStatus::Pending { refund_status(refunded, p.amount_cents) } else { p.status },
                ..p.clone()
            })
        })
        .await?;
        self.reverse(id).await
    }

    /// Takes back the credits a credited purchase's refunds cover, in steps. A step is claimed
    /// on the purchase row first (compare-and-set of `reversing_to`), so two nodes never take
    /// the same credits twice; the claim stays until the step is done, and whoever finds it
    /// (a redelivery after a crash, another node, [`Billing::finish_reversals`]) finishes that
    /// very step under its ledger key, which a second attempt replays.
    async fn reverse(&self, id: &str) -> Result<()> {
        loop {
            let (p, _) = self
                .update(id, |p| {
                    let target = credits_to_reverse(p.credits, p.amount_cents, p.refunded_cents);
                    (p.reversing_to.is_none() && p.credited && target > p.credits_reversed).then(|| Purchase { reversing_to: Some(target), ..p.clone() })
                })
                .await?;
            let Some(to) = p.reversing_to else { return Ok(()) };
            let from = p.credits_reversed;
            self.take_back(&p, from, to).await?;
            self.update(id, |p| {
                (p.reversing_to == Some(to) && p.credits_reversed == from).then(|| Purchase { credits_reversed: to, reversing_to: None, ..p.clone() })
            })
            .await?;
        }
    }

    /// One reversal step: claws `to - from` credits back; under the debt policy, what was
    /// already spent becomes debt. Both under the step's key: doing it again changes nothing.
    async fn take_back(&self, p: &Purchase, from: i64, to: i64) -> Result<()> {
        let step = format!("stripe:{}:reverse:{from}-{to}", p.id);
        let claw = Clawback {
            account: p.account.clone(),
            bucket: Bucket::Purchased,
            amount: to - from,
            reference: format!("stripe refund of purchase {}", p.id),
            key: key(step.clone())?,
        };
        let done = self.store.clawback(claw).await?.map_err(|r| Error::Invariant(format!("reversal of purchase {}: {r}", p.id)))?;
        if let Effect::ClawedBack { shortfall, .. } = done.effect
            && shortfall > 0
            && self.cfg.refund_policy == RefundPolicy::Debt
        {
            self.store.add_debt(&p.account, shortfall, &step).await?;
        }
        Ok(())
    }

    /// Finishes every reversal step that was claimed and not done (a process that stopped
    /// between the claim and the ledger write); returns the purchases it finished. Safe at any
    /// time and on any number of nodes: a step in progress elsewhere is finished under the same
    /// keys.
    pub async fn finish_reversals(&self) -> Result<Vec<String>> {
        let mut done = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.store.purchases(after.as_deref(), crate::store::MAX_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for p in page.iter().filter(|p| p.reversing_to.is_some()) {
                self.reverse(&p.id).await?;
                done.push(p.id.clone());
            }
        }
        Ok(done)
    }

    /// Under the debt policy, a new purchase repays the account's debt first: the repayment is
    /// taken from the debt atomically (so two purchases at once never repay the same debt),
    /// then clawed from the credits; both keyed by the purchase, so a crash in between is
    /// finished by the redelivery. Credits spent before the clawback stay owed.
    async fn repay_debt(&self, p: &Purchase) -> Result<()> {
        if self.cfg.refund_policy != RefundPolicy::Debt {
            return Ok(());
        }
        let k = format!("stripe:{}:repay", p.id);
        let claimed = self.store.add_debt(&p.account, -p.credits, &k).await?;
        let amount = -claimed.applied;
        if amount <= 0 {
            return Ok(());
        }
        let claw = Clawback {
            account: p.account.clone(),
            bucket: Bucket::Purchased,
            amount,
            reference: format!("debt repaid from purchase {}", p.id),
            key: key(k.clone())?,
        };
        let done = self.store.clawback(claw).await?.map_err(|r| Error::Invariant(format!("repayment from purchase {}: {r}", p.id)))?;
        if let Effect::ClawedBack { shortfall, .. } = done.effect
            && shortfall > 0
        {
            self.store.add_debt(&p.account, shortfall, &format!("{k}:shortfall")).await?;
        }
        Ok(())
    }

    async fn subscription(&self, event_id: &str, kind: &str, created: i64, o: &Value) -> Result<(EventStatus, Option<AccountId>)> {
        let customer = str_at(o, &["customer"]);
        let account = match str_at(o, &["metadata", "account_id"]).and_then(|a| AccountId::new(a).ok()) {
            Some(a) => Some(a),
            None => match customer.filter(|c| check_stripe_id(c).is_ok()) {
                Some(c) => self.store.customer_account(c).await?,
                None => None,
            },
        };
        let Some(account) = account else { return Ok((EventStatus::Unmatched, None)) };
        match self.store.balance(&account).await {
            Ok(_) => {}
            // An account we do not know (yet): kept. Any other error: the delivery fails and
            // Stripe retries it.
            Err(Error::UnknownAccount(_)) => return Ok((EventStatus::Unmatched, None)),
            Err(e) => return Err(e),
        }
        if let Some(c) = customer.filter(|c| check_stripe_id(c).is_ok()) {
            self.store.link_customer(c, &account).await?;
        }
        let item = o.get("items").and_then(|i| i.get("data")).and_then(|d| d.get(0));
        let price = item.and_then(|i| str_at(i, &["price", "id"]).or_else(|| str_at(i, &["plan", "id"])));
        let Some(plan) = price.and_then(|p| self.cfg.plan_of_price(p)) else { return Ok((EventStatus::Ignored, Some(account))) };
        // Newer API versions carry the period on the item, older ones on the subscription.
        let period_end = item.and_then(|i| i64_at(i, &["current_period_end"])).or_else(|| i64_at(o, &["current_period_end"]));
        let period_end = period_end
            .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
            .ok_or_else(|| Error::invalid("payload", "subscription without current_period_end"))?;
        let status = str_at(o, &["status"]).unwrap_or("");
        let running = matches!(status, "active" | "trialing" | "past_due") && kind != "customer.subscription.deleted";
        let cancelling = o.get("cancel_at_period_end").and_then(Value::as_bool).unwrap_or(false);
        let current = self.store.balance(&account).await?.plan;
        // An older state than the one applied (`updated` overtaken by a late `created`), or a
        // running state whose period is over (a late copy): skip, never move the plan back.
        if current.is_some_and(|c| c.period_end > period_end) || (running && period_end <= self.store.clock().now()) {
            return Ok((EventStatus::Processed, Some(account)));
        }
        if self.superseded(event_id, kind, created, o).await? {
            return Ok((EventStatus::Processed, Some(account)));
        }
        let org_member = plan == Plan::PlusOrgMember;
        self.store.set_cost_profile(account.clone(), org_member, None, key(format!("stripe:{event_id}:profile"))?).await?.ok();
        let terms = (running && !cancelling && period_end > self.store.clock().now()).then(|| PlanTerms {
            monthly_credits: self.cfg.monthly_credits(plan),
            period_end,
            anchor_day: None,
        });
        // The allocation is granted when a plan starts and at each period's end by the ledger's
        // rollover, never by an event: repeats and reorders cannot grant a period twice.
        match self.store.set_plan(account.clone(), terms, key(format!("stripe:{event_id}:plan"))?).await? {
            Ok(_) | Err(Rejection::NothingDue) => {}
            // A run's hold spans the period's end: the change waits for it. The delivery fails
            // (nothing was applied) and Stripe sends it again.
            Err(Rejection::HoldsOpen) => {
                return Err(Error::Backend(format!("plan change from {event_id} waits for open holds to close; retry later")));
            }
            Err(r) => return Err(Error::Invariant(format!("plan from {event_id}: {r}"))),
        }
        Ok((EventStatus::Processed, Some(account)))
    }

    /// Whether a subscription event is older than one already applied to its subscription
    /// (Stripe's `created`; Stripe does not deliver in order), or comes after the
    /// subscription's deletion (final at Stripe: a late `updated` must not bring a cancelled
    /// plan back, even from the same second).
    async fn superseded(&self, event_id: &str, kind: &str, created: i64, o: &Value) -> Result<bool> {
        let Some(sub) = str_at(o, &["id"]).filter(|s| check_stripe_id(s).is_ok()) else { return Ok(false) };
        // The newest applied events: a deletion, being the last event of a subscription, is
        // among them.
        let applied = self.store.stripe_events_about(sub, EventStatus::Processed, 16).await?;
        let others = applied.iter().filter(|e| e.id != event_id && e.kind.starts_with("customer.subscription."));
        let (mut newest, mut deleted) = (i64::MIN, false);
        for e in others {
            newest = newest.max(e.created);
            deleted |= e.kind == "customer.subscription.deleted";
        }
        Ok(created < newest || (deleted && kind != "customer.subscription.deleted"))
    }

    // ---- reconciliation ---------------------------------------------------------------------

    /// Purchases whose Stripe state (as the events told it) and ledger state disagree.
    pub async fn reconcile(&self) -> Result<Vec<Discrepancy>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.store.purchases(after.as_deref(), 500).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for p in &page {
                let d = |kind: &'static str, detail: String| Discrepancy { purchase_id: p.id.clone(), account: p.account.clone(), kind, detail };
                let paid = matches!(p.status, PurchaseStatus::Completed | PurchaseStatus::PartiallyRefunded | PurchaseStatus::Refunded);
                if p.kind != PurchaseKind::Pack {
                    continue;
                }
                if paid && !p.credited && p.refunded_cents < p.amount_cents {
                    out.push(d("paid_not_credited", format!("status {}", p.status.as_str())));
                }
                if p.credited && !paid {
                    out.push(d("credited_not_paid", format!("status {}", p.status.as_str())));
                }
                if let Some(to) = p.reversing_to {
                    out.push(d("reversal_pending", format!("a step to {to} credits was claimed and not finished (finish_reversals does it)")));
                }
                let due = credits_to_reverse(p.credits, p.amount_cents, p.refunded_cents);
                // A pending step that reaches `due` is reported as pending (above).
                if p.credited && p.reversing_to.unwrap_or(p.credits_reversed) < due {
                    out.push(d("refund_not_reversed", format!("{} of {due} credits taken back", p.credits_reversed)));
                }
                if p.credits_reversed > due {
                    out.push(d("reversed_more_than_refunded", format!("{} taken back, {due} due", p.credits_reversed)));
                }
                // The ledger: the grant and the reversals this purchase should have made.
                let (granted, reversed) = self.ledger_effects(p).await?;
                if p.credited && granted != p.credits {
                    out.push(d("ledger_grant_missing", format!("{granted} of {} credits granted in the log", p.credits)));
                }
                // A claimed step may be in the log before the purchase row records it done.
                let recorded = p.reversing_to.unwrap_or(p.credits_reversed);
                if p.credited && reversed > recorded {
                    out.push(d("ledger_reversal_mismatch", format!("{reversed} taken back in the log, {recorded} recorded")));
                }
            }
        }
        Ok(out)
    }

    /// Credits granted and taken back in the log under this purchase's references.
    async fn ledger_effects(&self, p: &Purchase) -> Result<(i64, i64)> {
        let grant_ref = format!("stripe purchase {}", p.id);
        let reverse_ref = format!("stripe refund of purchase {}", p.id);
        let (mut granted, mut reversed) = (0, 0);
        let mut q = crate::store::HistoryQuery::new(p.account.clone());
        q.limit = 500;
        loop {
            let page = self.store.history(&q).await?;
            for e in &page.entries {
                if e.reference == grant_ref {
                    granted += e.delta.total();
                } else if e.reference == reverse_ref {
                    reversed -= e.delta.total();
                }
            }
            match page.next {
                Some(n) => q.before = Some(n),
                None => break,
            }
        }
        Ok((granted, reversed))
    }
}

fn refund_status(refunded: i64, amount: i64) -> PurchaseStatus {
    if refunded <= 0 {
        PurchaseStatus::Completed
    } else if refunded >= amount {
        PurchaseStatus::Refunded
    } else {
        PurchaseStatus::PartiallyRefunded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reversal_is_the_refunded_share_rounded_down() {
        assert_eq!(credits_to_reverse(100, 500, 0), 0);
        assert_eq!(credits_to_reverse(100, 500, 500), 100);
        assert_eq!(credits_to_reverse(100, 500, 250), 50);
        assert_eq!(credits_to_reverse(250, 1_000, 333), 83);
        assert_eq!(credits_to_reverse(600, 2_000, 2_500), 600, "never more than the purchase");
        assert_eq!(credits_to_reverse(100, 0, 10), 0);
    }
}
