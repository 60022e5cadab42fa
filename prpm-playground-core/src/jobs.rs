//! Maintenance jobs as library functions over any [`Store`]. Each is idempotent: it finds the
//! accounts with work due at the store's clock and applies one state-checked command per
//! account, so running a job twice (or on two nodes at once) does the work once. Scheduling
//! them is the host's business.

use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ledger::{AccountId, Command, Rejection};
use crate::store::{AnalyticsReport, Due, Store};

/// Accounts fetched per page, and commands in flight at once (they commit in groups).
const PAGE: u32 = 256;

/// What a job did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    /// Accounts found with work due.
    pub examined: u64,
    /// Accounts changed.
    pub applied: u64,
    /// Accounts left for a later run (a rollover that would leave an open hold unbacked).
    pub deferred: u64,
    /// Accounts whose step failed (the job goes on with the others); the first
    /// [`MAX_REPORTED_ERRORS`] are listed.
    pub failed: u64,
    pub errors: Vec<(AccountId, String)>,
}

/// Most failures listed in a [`JobReport`].
pub const MAX_REPORTED_ERRORS: usize = 100;

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

/// The monthly cost reset (daily, 00:00 UTC): clears the cost counters of days and months that
/// ended and lifts the cost throttles whose period ended. (Admission and settle roll the
/// counters lazily, so limits are exact without it; the job keeps the stored figures current
/// for reports and lists.)
pub async fn cost_reset(store: &dyn Store) -> Result<JobReport> {
    run(store, Due::CostReset, |account| Command::CostReset { account }).await
}

/// The analytics refresh (hourly): rolls the usage records not rolled up yet into the
/// per-account daily rollups. A second run finds nothing to do.
pub async fn refresh_analytics(store: &dyn Store) -> Result<AnalyticsReport> {
    store.refresh_analytics().await
}

async fn run(store: &dyn Store, due: Due, command: impl Fn(AccountId) -> Command) -> Result<JobReport> {
    let mut report = JobReport::default();
    let mut after: Option<AccountId> = None;
    loop {
        let page = store.due(due, after.as_ref(), PAGE).await?;
        let Some(last) = page.last().cloned() else {
            break;
        };
        let outcomes = join_all(page.iter().map(|a| store.execute(command(a.clone())))).await;
        for (account, outcome) in page.into_iter().zip(outcomes) {
            report.examined += 1;
            let failure = match outcome {
                Ok(Ok(_)) => {
                    report.applied += 1;
                    continue;
                }
                Ok(Err(Rejection::HoldsOpen)) => {
                    report.deferred += 1;
                    continue;
                }
                // Another node (or a command on the account) did the work first.
                Ok(Err(Rejection::NothingDue)) => continue,
                // The store itself is gone: stop.
                Err(e @ (Error::Closed | Error::Backend(_))) => return Err(e),
                Ok(Err(other)) => other.to_string(),
                Err(e) => e.to_string(),
            };
            report.failed += 1;
            if report.errors.len() < MAX_REPORTED_ERRORS {
                report.errors.push((account, failure));
            }
        }
        after = Some(last);
    }
    Ok(report)
}
