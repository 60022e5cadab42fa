//! Progress bars on stderr (only when it is a terminal and without `--quiet`), and a store
//! wrapper that advances a bar on every command, so the library's jobs run unchanged and still
//! show how far they are.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use indicatif::{ProgressBar, ProgressStyle};
use prpm_playground_core::cost::{Summary, TierTable};
use prpm_playground_core::purchase::{EventStatus, Purchase, StripeEventRecord};
use prpm_playground_core::store::{AlertQuery, AnalyticsReport, DailyUsage, DailyUsageQuery, DebtChange, Due, MAX_PAGE, StoredAlert};
use prpm_playground_core::*;

/// Whether progress is drawn.
pub fn shown(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

/// A bar of `len` steps (a spinner with a count when the length is unknown).
pub fn bar(quiet: bool, len: Option<u64>, message: &'static str) -> ProgressBar {
    if !shown(quiet) {
        return ProgressBar::hidden();
    }
    let pb = match len {
        Some(n) => ProgressBar::new(n)
            .with_style(ProgressStyle::with_template("{msg} [{wide_bar}] {pos}/{len} accounts, eta {eta}").expect("a valid template").progress_chars("=> ")),
        None => ProgressBar::new_spinner().with_style(ProgressStyle::with_template("{spinner} {msg}: {pos} accounts, {elapsed}").expect("a valid template")),
    };
    pb.set_message(message);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// A spinner for a step that reports no progress of its own.
pub fn spinner(quiet: bool, message: impl Into<std::borrow::Cow<'static, str>>) -> ProgressBar {
    if !shown(quiet) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner().with_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("a valid template"));
    pb.set_message(message);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// The accounts a job has work for now (for the bar's length; the job looks again itself).
pub async fn count_due(store: &dyn Store, due: Due) -> Result<u64> {
    let spinner = spinner(false, "finding the accounts due");
    let mut n = 0u64;
    let mut after: Option<AccountId> = None;
    loop {
        let page = store.due(due, after.as_ref(), MAX_PAGE).await?;
        n += page.len() as u64;
        spinner.set_message(format!("finding the accounts due: {n}"));
        match page.last() {
            Some(last) if page.len() == MAX_PAGE as usize => after = Some(last.clone()),
            _ => break,
        }
    }
    spinner.finish_and_clear();
    Ok(n)
}

/// A store that advances `bar` by one on every command it executes (each job step is one
/// command on one account) and forwards everything to the inner store.
pub struct Counting {
    inner: Arc<dyn Store>,
    bar: ProgressBar,
}

impl Counting {
    pub fn new(inner: Arc<dyn Store>, bar: ProgressBar) -> Self {
        Counting { inner, bar }
    }
}

#[async_trait]
impl Store for Counting {
    async fn execute(&self, cmd: Command) -> Result<Outcome> {
        let r = self.inner.execute(cmd).await;
        // More accounts may have become due since they were counted.
        if self.bar.length().is_some_and(|len| self.bar.position() >= len) {
            self.bar.inc_length(1);
        }
        self.bar.inc(1);
        r
    }
    async fn balance(&self, account: &AccountId) -> Result<BalanceView> {
        self.inner.balance(account).await
    }
    async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage> {
        self.inner.history(query).await
    }
    async fn usage_before(&self, account: &AccountId, before: Option<EntryId>, limit: u32) -> Result<Vec<UsageRow>> {
        self.inner.usage_before(account, before, limit).await
    }
    async fn due(&self, due: Due, after: Option<&AccountId>, limit: u32) -> Result<Vec<AccountId>> {
        self.inner.due(due, after, limit).await
    }
    async fn verify(&self) -> Result<VerifyReport> {
        self.inner.verify().await
    }
    async fn tiers(&self) -> Result<TierTable> {
        self.inner.tiers().await
    }
    async fn cost(&self, account: &AccountId) -> Result<CostView> {
        self.inner.cost(account).await
    }
    async fn cost_accounts(&self, filter: CostFilter, after: Option<&AccountId>, limit: u32) -> Result<Vec<CostView>> {
        self.inner.cost_accounts(filter, after, limit).await
    }
    async fn summary(&self) -> Result<Summary> {
        self.inner.summary().await
    }
    async fn alerts(&self, query: &AlertQuery) -> Result<Vec<StoredAlert>> {
        self.inner.alerts(query).await
    }
    async fn daily_usage(&self, query: &DailyUsageQuery) -> Result<Vec<DailyUsage>> {
        self.inner.daily_usage(query).await
    }
    async fn refresh_analytics(&self) -> Result<AnalyticsReport> {
        self.inner.refresh_analytics().await
    }
    async fn put_package(&self, p: &Package) -> Result<()> {
        self.inner.put_package(p).await
    }
    async fn package(&self, id: &str) -> Result<Option<Package>> {
        self.inner.package(id).await
    }
    async fn create_session(&self, s: &NewSession) -> Result<SessionSummary> {
        self.inner.create_session(s).await
    }
    async fn session(&self, owner: &AccountId, id: &SessionId) -> Result<Option<Session>> {
        self.inner.session(owner, id).await
    }
    async fn sessions(&self, owner: &AccountId, cursor: Option<&str>, limit: u32) -> Result<SessionPage> {
        self.inner.sessions(owner, cursor, limit).await
    }
    async fn delete_session(&self, owner: &AccountId, id: &SessionId) -> Result<bool> {
        self.inner.delete_session(owner, id).await
    }
    async fn record_run(&self, run: &RunRecord, turns: &[NewTurn]) -> Result<bool> {
        self.inner.record_run(run, turns).await
    }
    async fn settle_run(&self, r: SettleRun) -> Result<SettledRun> {
        self.inner.settle_run(r).await
    }
    async fn runs(&self, account: &AccountId, limit: u32) -> Result<Vec<RunRecord>> {
        self.inner.runs(account, limit).await
    }
    async fn share_session(&self, owner: &AccountId, id: &SessionId, token: &ShareToken) -> Result<bool> {
        self.inner.share_session(owner, id, token).await
    }
    async fn revoke_share(&self, owner: &AccountId, id: &SessionId) -> Result<bool> {
        self.inner.revoke_share(owner, id).await
    }
    async fn shared_session(&self, token: &ShareToken) -> Result<Option<SharedSession>> {
        self.inner.shared_session(token).await
    }
    async fn create_purchase(&self, p: &Purchase) -> Result<Purchase> {
        self.inner.create_purchase(p).await
    }
    async fn purchase(&self, id: &str) -> Result<Option<Purchase>> {
        self.inner.purchase(id).await
    }
    async fn purchase_by_stripe_id(&self, stripe_id: &str) -> Result<Option<Purchase>> {
        self.inner.purchase_by_stripe_id(stripe_id).await
    }
    async fn save_purchase(&self, p: &Purchase) -> Result<Option<Purchase>> {
        self.inner.save_purchase(p).await
    }
    async fn purchases(&self, after: Option<&str>, limit: u32) -> Result<Vec<Purchase>> {
        self.inner.purchases(after, limit).await
    }
    async fn record_stripe_event(&self, e: &StripeEventRecord) -> Result<bool> {
        self.inner.record_stripe_event(e).await
    }
    async fn set_stripe_event_status(&self, id: &str, status: EventStatus, account: Option<&AccountId>) -> Result<()> {
        self.inner.set_stripe_event_status(id, status, account).await
    }
    async fn stripe_event(&self, id: &str) -> Result<Option<StripeEventRecord>> {
        self.inner.stripe_event(id).await
    }
    async fn stripe_events(&self, status: Option<EventStatus>, limit: u32) -> Result<Vec<StripeEventRecord>> {
        self.inner.stripe_events(status, limit).await
    }
    async fn stripe_events_about(&self, object_ref: &str, status: EventStatus, limit: u32) -> Result<Vec<StripeEventRecord>> {
        self.inner.stripe_events_about(object_ref, status, limit).await
    }
    async fn link_customer(&self, customer: &str, account: &AccountId) -> Result<()> {
        self.inner.link_customer(customer, account).await
    }
    async fn customer_account(&self, customer: &str) -> Result<Option<AccountId>> {
        self.inner.customer_account(customer).await
    }
    async fn add_debt(&self, account: &AccountId, credits: i64, key: &str) -> Result<DebtChange> {
        self.inner.add_debt(account, credits, key).await
    }
    async fn debt(&self, account: &AccountId) -> Result<i64> {
        self.inner.debt(account).await
    }
    async fn keyed_response(&self, account: &AccountId, key: &str) -> Result<Option<prpm_playground_core::store::KeyedResponse>> {
        self.inner.keyed_response(account, key).await
    }
    async fn remember_response(&self, r: &prpm_playground_core::store::KeyedResponse) -> Result<prpm_playground_core::store::KeyedResponse> {
        self.inner.remember_response(r).await
    }
    fn clock(&self) -> Arc<dyn Clock> {
        self.inner.clock()
    }
    fn config(&self) -> &LedgerConfig {
        self.inner.config()
    }
}
