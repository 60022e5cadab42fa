//! Maintenance jobs as library functions over any [`Store`]. Each is idempotent: it finds the
//! accounts with work due at the store's clock and applies one state-checked command per
//! account, so running a job twice (or on two nodes at once) does the work once. Scheduling
//! them is the host's business.

use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ledger::{AccountId, Command, Rejection};
use crate::store::{Due, Store};

/// Accounts fetched per page, and commands in flight at once (they commit in groups).
const PAGE: u32 = 256;

/// What a job did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    /// Accounts found with work due.
    pub examined: u64,
    /// Accounts changed.
    pub applied: u64,
    /// Accounts left for a later run (the rollover step waits for open holds).
    pub deferred: u64,
}

/// Returns holds past their deadline (and removes expired credits on the same accounts).
pub async fn expire_holds(store: &dyn Store) -> Result<JobReport> {
    run(store, Due::ExpiredHolds, |account| Command::Sweep { account }).await
}

/// Removes rollover credits past their expiry.
pub async fn expire_rollover(store: &dyn Store) -> Result<JobReport> {
    run(store, Due::ExpiredCredits, |account| Command::Sweep { account }).await
}

/// The monthly rollover step for every account whose plan period ended: unused monthly credits
/// move to rollover (capped at one month's allocation), the previous rollover expires, the new
/// allocation is granted.
pub async fn monthly_rollover(store: &dyn Store) -> Result<JobReport> {
    run(store, Due::Rollover, |account| Command::Rollover { account }).await
}

async fn run(store: &dyn Store, due: Due, command: impl Fn(AccountId) -> Command) -> Result<JobReport> {
    let mut report = JobReport::default();
    let mut after: Option<AccountId> = None;
    loop {
        let page = store.due(due, after.as_ref(), PAGE).await?;
        let Some(last) = page.last().cloned() else { break };
        let outcomes = join_all(page.into_iter().map(|a| store.execute(command(a)))).await;
        for outcome in outcomes {
            report.examined += 1;
            match outcome? {
                Ok(_) => report.applied += 1,
                Err(Rejection::HoldsOpen) => report.deferred += 1,
                // Another node (or a command on the account) did the work first.
                Err(Rejection::NothingDue) => {}
                Err(other) => return Err(Error::Invariant(format!("maintenance step rejected: {other}"))),
            }
        }
        after = Some(last);
    }
    Ok(report)
}
