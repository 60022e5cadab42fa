//! Billing records: purchases (credit packs and subscriptions bought through Stripe), the
//! Stripe events received, customers, and credit debts. The rules that move them are in
//! [`crate::billing`]; both stores keep them (see the billing methods of [`crate::Store`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ledger::AccountId;

const MAX_ID_BYTES: usize = 255;
/// Largest Stripe event payload kept, in bytes.
pub const MAX_EVENT_PAYLOAD_BYTES: usize = 512 * 1024;

fn check_id(field: &'static str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > MAX_ID_BYTES || s.chars().any(char::is_control) {
        return Err(Error::invalid(field, format!("must be 1..={MAX_ID_BYTES} bytes without control characters")));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PurchaseKind {
    Pack,
    Subscription,
}

impl PurchaseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PurchaseKind::Pack => "pack",
            PurchaseKind::Subscription => "subscription",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "pack" => Ok(PurchaseKind::Pack),
            "subscription" => Ok(PurchaseKind::Subscription),
            o => Err(Error::Invariant(format!("unknown purchase kind {o:?}"))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PurchaseStatus {
    /// Checkout created, not paid yet.
    Pending,
    /// Paid (a pack: its credits granted; a subscription: started).
    Completed,
    /// The payment failed; nothing granted.
    Failed,
    /// Paid, then refunded in part.
    PartiallyRefunded,
    /// Paid, then refunded in full.
    Refunded,
}

impl PurchaseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PurchaseStatus::Pending => "pending",
            PurchaseStatus::Completed => "completed",
            PurchaseStatus::Failed => "failed",
            PurchaseStatus::PartiallyRefunded => "partially_refunded",
            PurchaseStatus::Refunded => "refunded",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "pending" => Ok(PurchaseStatus::Pending),
            "completed" => Ok(PurchaseStatus::Completed),
            "failed" => Ok(PurchaseStatus::Failed),
            "partially_refunded" => Ok(PurchaseStatus::PartiallyRefunded),
            "refunded" => Ok(PurchaseStatus::Refunded),
            o => Err(Error::Invariant(format!("unknown purchase status {o:?}"))),
        }
    }
}

/// A purchase. Saved with optimistic concurrency: [`crate::Store::save_purchase`] writes it
/// only if the stored `version` is still the one read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purchase {
    /// Our id (also in the Stripe objects' metadata as `purchase_id`).
    pub id: String,
    pub account: AccountId,
    pub kind: PurchaseKind,
    /// `small`, `medium`, `large`, `plus_individual`, `plus_org_member`.
    pub product: String,
    /// Credits the purchase grants (a pack's; 0 for a subscription).
    pub credits: i64,
    pub amount_cents: i64,
    /// ISO currency code, lower case (`usd`).
    pub currency: String,
    pub status: PurchaseStatus,
    pub checkout_session: Option<String>,
    pub payment_intent: Option<String>,
    pub customer: Option<String>,
    /// Whether the pack's credits were granted.
    pub credited: bool,
    /// Cents refunded so far (Stripe's cumulative `amount_refunded`).
    pub refunded_cents: i64,
    /// Credits taken back (or recorded as debt) for the refunds so far.
    pub credits_reversed: i64,
    /// A reversal step claimed and not yet done: it takes `credits_reversed..reversing_to`
    /// back (under a ledger key named by the two levels) and then moves `credits_reversed` to
    /// it. Whoever finds it set finishes that very step, so a crash between the claim and the
    /// ledger write loses nothing.
    pub reversing_to: Option<i64>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Purchase {
    pub fn validate(&self) -> Result<()> {
        check_id("purchase_id", &self.id)?;
        check_id("product", &self.product)?;
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(Error::invalid("currency", "must be a three-letter lower-case ISO code"));
        }
        for (field, v) in [
            ("credits", self.credits),
            ("amount_cents", self.amount_cents),
            ("refunded_cents", self.refunded_cents),
            ("credits_reversed", self.credits_reversed),
        ] {
            if !(0..=crate::ledger::MAX_CREDITS_PER_REQUEST).contains(&v) {
                return Err(Error::invalid(field, "out of range"));
            }
        }
        if self.refunded_cents > self.amount_cents {
            return Err(Error::invalid("refunded_cents", "more than the amount"));
        }
        if self.credits_reversed > self.credits {
            return Err(Error::invalid("credits_reversed", "more than the credits"));
        }
        if self.reversing_to.is_some_and(|t| t <= self.credits_reversed || t > self.credits) {
            return Err(Error::invalid("reversing_to", "must be above credits_reversed and at most the credits"));
        }
        for id in [&self.checkout_session, &self.payment_intent, &self.customer].into_iter().flatten() {
            check_id("stripe_id", id)?;
        }
        Ok(())
    }
}

/// What became of a Stripe event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventStatus {
    /// Received, not yet (fully) processed.
    Received,
    /// Applied.
    Processed,
    /// A type we do not handle: acknowledged and ignored.
    Ignored,
    /// For a customer or purchase we do not know: kept for reconciliation.
    Unmatched,
}

impl EventStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Received => "received",
            EventStatus::Processed => "processed",
            EventStatus::Ignored => "ignored",
            EventStatus::Unmatched => "unmatched",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "received" => Ok(EventStatus::Received),
            "processed" => Ok(EventStatus::Processed),
            "ignored" => Ok(EventStatus::Ignored),
            "unmatched" => Ok(EventStatus::Unmatched),
            o => Err(Error::Invariant(format!("unknown event status {o:?}"))),
        }
    }
}

/// A Stripe event as received (its verified raw payload is kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeEventRecord {
    /// Stripe's event id (`evt_...`).
    pub id: String,
    /// Stripe's event type (`payment_intent.succeeded`, ...).
    pub kind: String,
    /// Stripe's `created` (Unix seconds).
    pub created: i64,
    /// The Stripe object the event is about (see [`StripeEventRecord::object_ref_of`]), for
    /// [`crate::Store::stripe_events_about`].
    pub object_ref: Option<String>,
    pub status: EventStatus,
    pub account: Option<AccountId>,
    pub payload: String,
    pub received_at: DateTime<Utc>,
}

impl StripeEventRecord {
    /// The object an event of type `kind` is about, from its `data.object`: a charge's payment
    /// intent (refunds are matched to purchases by it), the object's own id otherwise (a
    /// subscription's events share the subscription's id).
    pub fn object_ref_of(kind: &str, object: &serde_json::Value) -> Option<String> {
        let field = if kind.starts_with("charge.") { "payment_intent" } else { "id" };
        object.get(field).and_then(serde_json::Value::as_str).filter(|s| check_id("object_ref", s).is_ok()).map(str::to_owned)
    }

    pub fn validate(&self) -> Result<()> {
        check_id("event_id", &self.id)?;
        check_id("event_type", &self.kind)?;
        if let Some(r) = &self.object_ref {
            check_id("object_ref", r)?;
        }
        if self.payload.len() > MAX_EVENT_PAYLOAD_BYTES {
            return Err(Error::invalid("payload", format!("longer than {MAX_EVENT_PAYLOAD_BYTES} bytes")));
        }
        Ok(())
    }
}

/// Checks a Stripe id before it is stored or looked up.
pub fn check_stripe_id(id: &str) -> Result<()> {
    check_id("stripe_id", id)
}
