//! The maintenance jobs at the spec's UTC times, read off the store's clock:
//!
//! | job | when (UTC) |
//! |---|---|
//! | `cost-reset` | daily 00:00 |
//! | `analytics-refresh` | hourly, minute 0 |
//! | `monthly-credit-reset` | daily 00:05 |
//! | `rollover-expiration` | daily 00:10 |
//! | `expire-holds` | every minute |
//!
//! The scheduler wakes every `PRPM_SCHEDULER_TICK_MS` (default 15 s), and runs each job whose
//! latest scheduled time has passed since its last run by this process. Several servers on
//! one PostgreSQL database may all run a job: every job is idempotent in the library (it finds
//! the accounts with work due and applies one state-checked command per account), so the work
//! is done once (the conformance suite's `jobs_run_twice_at_once_do_the_work_once`).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Duration as Span, DurationRound, NaiveTime, Utc};
use prpm_playground_core::jobs;
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::AppState;

/// A maintenance job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    CostReset,
    AnalyticsRefresh,
    MonthlyCreditReset,
    RolloverExpiration,
    ExpireHolds,
}

pub const ALL: [Job; 5] = [Job::CostReset, Job::AnalyticsRefresh, Job::MonthlyCreditReset, Job::RolloverExpiration, Job::ExpireHolds];

impl Job {
    pub fn name(self) -> &'static str {
        match self {
            Job::CostReset => "cost-reset",
            Job::AnalyticsRefresh => "analytics-refresh",
            Job::MonthlyCreditReset => "monthly-credit-reset",
            Job::RolloverExpiration => "rollover-expiration",
            Job::ExpireHolds => "expire-holds",
        }
    }

    pub fn parse(s: &str) -> Option<Job> {
        ALL.into_iter().find(|j| j.name() == s)
    }

    /// The latest time at or before `now` the job is scheduled for.
    pub fn last_slot(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let daily = |h: u32, m: u32| {
            let today = now.date_naive().and_time(NaiveTime::from_hms_opt(h, m, 0).expect("valid time")).and_utc();
            if today <= now { today } else { today - Span::days(1) }
        };
        match self {
            Job::CostReset => daily(0, 0),
            Job::MonthlyCreditReset => daily(0, 5),
            Job::RolloverExpiration => daily(0, 10),
            Job::AnalyticsRefresh => now.duration_trunc(Span::hours(1)).expect("in range"),
            Job::ExpireHolds => now.duration_trunc(Span::minutes(1)).expect("in range"),
        }
    }
}

/// What a job run did.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobResult {
    pub job: String,
    /// Accounts found with work due.
    pub examined: u64,
    /// Accounts (or usage records, for the analytics refresh) changed.
    pub applied: u64,
    /// Accounts left for a later run (open holds).
    pub deferred: u64,
    pub failed: u64,
    pub errors: Vec<String>,
}

/// Runs a job now.
pub async fn run_job(state: &AppState, job: Job) -> prpm_playground_core::Result<JobResult> {
    let store = &*state.store;
    let report = match job {
        Job::CostReset => jobs::cost_reset(store).await,
        Job::MonthlyCreditReset => jobs::monthly_rollover(store).await,
        Job::RolloverExpiration => jobs::expire_rollover(store).await,
        Job::ExpireHolds => jobs::expire_holds(store).await,
        Job::AnalyticsRefresh => {
            let r = jobs::refresh_analytics(store).await;
            state.metrics.job(job.name(), if r.is_ok() { "ok" } else { "error" });
            let r = r?;
            return Ok(JobResult { job: job.name().into(), examined: r.usage_records, applied: r.usage_records, deferred: 0, failed: 0, errors: vec![] });
        }
    };
    state.metrics.job(job.name(), if report.as_ref().is_ok_and(|r| r.failed == 0) { "ok" } else { "error" });
    let r = report?;
    Ok(JobResult {
        job: job.name().into(),
        examined: r.examined,
        applied: r.applied,
        deferred: r.deferred,
        failed: r.failed,
        errors: r.errors.into_iter().map(|(a, e)| format!("{a}: {e}")).collect(),
    })
}

/// The scheduler loop, until `stop` turns true.
pub async fn run(state: Arc<AppState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let tick = std::env::var("PRPM_SCHEDULER_TICK_MS").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(15_000).max(10);
    let start = state.clock.now();
    let mut last: Vec<DateTime<Utc>> = ALL.iter().map(|j| j.last_slot(start)).collect();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(tick)) => {}
            _ = stop.changed() => return,
        }
        let now = state.clock.now();
        for (i, job) in ALL.iter().enumerate() {
            let slot = job.last_slot(now);
            if slot > last[i] {
                last[i] = slot;
                match run_job(&state, *job).await {
                    Ok(r) if r.failed == 0 => {
                        if r.applied > 0 || *job != Job::ExpireHolds {
                            tracing::info!(job = job.name(), examined = r.examined, applied = r.applied, deferred = r.deferred, "job ran");
                        }
                    }
                    Ok(r) => tracing::warn!(job = job.name(), failed = r.failed, errors = ?r.errors, "job ran with failures"),
                    Err(e) => tracing::error!(job = job.name(), error = %e, "job failed"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn slots_follow_the_utc_schedule() {
        let at = |d, h, m| Utc.with_ymd_and_hms(2026, 3, d, h, m, 0).unwrap();
        assert_eq!(Job::CostReset.last_slot(at(2, 0, 0)), at(2, 0, 0));
        assert_eq!(Job::CostReset.last_slot(at(2, 23, 59)), at(2, 0, 0));
        assert_eq!(Job::MonthlyCreditReset.last_slot(at(2, 0, 4)), at(1, 0, 5));
        assert_eq!(Job::MonthlyCreditReset.last_slot(at(2, 0, 5)), at(2, 0, 5));
        assert_eq!(Job::RolloverExpiration.last_slot(at(2, 0, 9)), at(1, 0, 10));
        assert_eq!(Job::AnalyticsRefresh.last_slot(at(2, 13, 59)), at(2, 13, 0));
        assert_eq!(Job::ExpireHolds.last_slot(at(2, 13, 59) + Span::seconds(30)), at(2, 13, 59));
        assert_eq!(Job::parse("monthly-credit-reset"), Some(Job::MonthlyCreditReset));
        assert_eq!(Job::parse("nope"), None);
    }
}
