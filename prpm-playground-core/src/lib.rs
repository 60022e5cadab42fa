//! # prpm-playground-core
//!
//! Prices, gates, meters and bills LLM runs with a three-bucket credit ledger (monthly,
//! rollover, purchased), two-phase holds, idempotent mutations and an append-only log, over
//! SQLite (embedded default) or PostgreSQL.
//!
//! * [`pricing`]: pure token pricing (credits, USD, estimates, request cap).
//! * [`cost`]: cost-control rules (tier limits, admission, throttles, alerts, risk, summary).
//! * [`ledger`]: the ledger's vocabulary and its rules as a pure function.
//! * [`store`]: the [`Store`] trait, the SQLite backend and the PostgreSQL backend.
//! * [`pg_cluster`]: a throw-away PostgreSQL cluster for tests and benches.
//! * [`jobs`]: maintenance steps (hold expiry, rollover, rollover expiry) over any store.
//! * [`history`]: CSV export of the transaction log.
//! * [`conformance`]: the behaviour every backend must show, as library code.
//! * [`auth`]: HS256 bearer tokens (feature `auth`).
//! * [`analysis`]: read-only queries across accounts for cost analysis.
//! * [`simulate`]: what-if pricing, replaying real usage under other limits and prices.

pub mod analysis;
#[cfg(feature = "auth")]
pub mod auth;
#[cfg(feature = "stripe")]
pub mod billing;
pub mod clock;
pub mod conformance;
pub mod cost;
pub mod error;
pub mod history;
pub mod jobs;
pub mod ledger;
pub mod pg_cluster;
#[cfg(feature = "provider")]
pub mod playground;
pub mod pricing;
#[cfg(feature = "provider")]
pub mod provider;
pub mod purchase;
pub mod session;
pub mod simulate;
pub mod store;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, Result};
pub use ledger::*;
pub use pricing::{Estimate, EstimateRequest, PriceTable, Pricing, Quote, TokenUsage};
pub use session::{
    NewSession, NewTurn, Package, Role, RunId, RunOutcome, RunRecord, Session, SessionId, SessionPage, SessionSummary, ShareToken, SharedSession,
};
pub use store::sqlite::{CheckpointStats, SqliteOptions, SqliteStore, SyncStats, Synchronous};
pub use store::{
    AlertQuery, AnalyticsReport, BalanceView, CostFilter, CostView, DailyUsage, DailyUsageQuery, Due, Entry, HistoryPage, HistoryQuery, SettleRun, SettledRun,
    Store, StoredAlert, UsageRow, VerifyReport,
};
