//! The three-bucket credit ledger: vocabulary ([`types`]) and rules ([`rules`]).

pub mod rules;
pub mod types;

pub use rules::{AccountState, HoldStatus, LedgerConfig, Lot, PlanState};
pub use types::*;
