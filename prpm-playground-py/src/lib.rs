//! `prpm_playground._native`: the Python bindings of prpm-playground-core for cost analysis.
//!
//! A [`Store`] opens a SQLite file or a PostgreSQL database, read-only unless asked otherwise;
//! its tables are Arrow streams (see [`tables`]); its functions return small frozen objects
//! with exact money (`decimal.Decimal`). Store work runs on a tokio runtime the module owns,
//! with the GIL released.

mod convert;
mod errors;
mod results;
mod tables;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use chrono::{DateTime, Utc};
use prpm_playground_core::analysis::postgres::PgReader;
use prpm_playground_core::analysis::sqlite::SqliteReader;
use prpm_playground_core::analysis::{self, AccountDay, AccountRow, Analysis, Filter};
use prpm_playground_core::cost::{TierLimits, TierTable};
use prpm_playground_core::ledger::rules::account_tier;
use prpm_playground_core::ledger::*;
use prpm_playground_core::pricing::{EstimateRequest, ModelPrice, PriceTable, Pricing, TokenUsage};
use prpm_playground_core::purchase::Purchase;
use prpm_playground_core::simulate::{self, Scenario, SimUsage, SimUser};
use prpm_playground_core::store::postgres::{PgOptions, PgStore, is_postgres_url};
use prpm_playground_core::store::{CostFilter, CostView, Store as CoreStore};
use prpm_playground_core::{ManualClock, RunRecord, SqliteOptions, SqliteStore};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::{nonneg, opt_account, opt_time, opt_usd, time, usd};
use crate::errors::{PlayError, PlayResult, invalid};
use crate::results::{Balance, Estimate, Quote, Receipt, Simulation, Summary, VerifyReport};
use crate::tables::{Columns, Table};

/// Rows per record batch (and per page read from the database).
const PAGE: u32 = 65_536;

/// The module's runtime: store work runs here, off the GIL.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("prpm-playground-py").enable_all().build().expect("a tokio runtime")
    })
}

/// Runs `fut` on the module's runtime with the GIL released.
fn block<T: Send>(py: Python<'_>, fut: impl Future<Output = PlayResult<T>> + Send) -> PlayResult<T> {
    py.detach(|| runtime().block_on(fut))
}

fn pricing_from(prices: Option<PathBuf>) -> PlayResult<Pricing> {
    Ok(match prices {
        Some(p) => Pricing::with_table(PriceTable::load(p)?),
        None => Pricing::default(),
    })
}

struct Open {
    store: Arc<dyn CoreStore>,
    reader: Arc<dyn Analysis>,
    sqlite: Option<Arc<SqliteStore>>,
}

/// A prpm-playground database, SQLite (a file path) or PostgreSQL (a `postgres://` URL or
/// `key=value` pairs with a `dbname`).
///
/// Read-only unless `writable=True`: every write raises `ReadOnly`, the tables are read over
/// read-only connections, and a SQLite file must exist already. (Opening still brings an older
/// schema up to date, as every store does.) `now` fixes the store's clock to that time (it
/// then moves only with `set_now`: back-fills, tests); `prices` names a price table file
/// (TOML or JSON) used to price usage given without a cost.
///
/// A context manager: `with Store(path) as s: ...` closes it at the end.
#[pyclass(module = "prpm_playground._native", frozen)]
struct Store {
    inner: Mutex<Option<Arc<Open>>>,
    #[pyo3(get)]
    writable: bool,
    #[pyo3(get)]
    backend: &'static str,
    clock: Option<Arc<ManualClock>>,
    pricing: Pricing,
}

impl Store {
    fn open(&self) -> PlayResult<Arc<Open>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or(PlayError::Core(prpm_playground_core::Error::Closed))
    }

    fn writing(&self, op: &'static str) -> PlayResult<Arc<Open>> {
        if !self.writable {
            return Err(PlayError::ReadOnly(op));
        }
        self.open()
    }

    fn execute(&self, py: Python<'_>, op: &'static str, cmd: Command) -> PlayResult<Receipt> {
        let o = self.writing(op)?;
        let committed = block(py, async move { Ok(o.store.execute(cmd).await??) })?;
        Ok(Receipt::from(committed))
    }

    /// A usage record from the arguments (`None` without a model), priced from the tokens when
    /// no cost is given.
    #[allow(clippy::too_many_arguments)]
    fn make_usage(
        &self,
        model: Option<String>,
        operation: String,
        input_tokens: i64,
        output_tokens: i64,
        cache_read_tokens: i64,
        cache_write_tokens: i64,
        cost_usd: Option<&Bound<'_, PyAny>>,
    ) -> PlayResult<Option<Usage>> {
        let tokens = TokenUsage {
            input: nonneg("input_tokens", input_tokens)?,
            output: nonneg("output_tokens", output_tokens)?,
            cache_read: nonneg("cache_read_tokens", cache_read_tokens)?,
            cache_write: nonneg("cache_write_tokens", cache_write_tokens)?,
        };
        let cost = opt_usd("cost_usd", cost_usd)?;
        let Some(model) = model else {
            if tokens.total() > 0 || cost.is_some() {
                return Err(invalid("model", "usage (tokens or a cost) needs its model"));
            }
            return Ok(None);
        };
        let cost_micros = match cost {
            Some(c) => c,
            None => self.pricing.price_usage(&model, &tokens)?.cost_micros,
        };
        Ok(Some(Usage { operation, model, tokens, cost_micros }))
    }

    /// Credits given, or the price of the usage's tokens.
    fn credits(&self, credits: Option<i64>, usage: Option<&Usage>) -> PlayResult<Credits> {
        match (credits, usage) {
            (Some(c), _) => Ok(c),
            (None, Some(u)) => Ok(self.pricing.price_usage(&u.model, &u.tokens)?.credits as Credits),
            (None, None) => Err(invalid("credits", "give the credits, or a model and its tokens to price them")),
        }
    }
}

fn filter(start: Option<&Bound<'_, PyAny>>, end: Option<&Bound<'_, PyAny>>, account: Option<&str>, model: Option<String>) -> PlayResult<Filter> {
    Ok(Filter { from: opt_time("start", start)?, until: opt_time("end", end)?, account: opt_account(account)?, model })
}

/// Reads every page of a keyset-paginated list: `fetch(after)` gives the page after a key
/// (the first page for `None`), `key` the key of a row, `pages` gets each page (a short one
/// is the last). `limit` is the page size `fetch` asks for.
async fn each_page<T, K, Fut>(limit: u32, mut fetch: impl FnMut(Option<K>) -> Fut, key: impl Fn(&T) -> K, mut pages: impl FnMut(Vec<T>)) -> PlayResult<()>
where
    Fut: Future<Output = prpm_playground_core::Result<Vec<T>>>,
{
    let mut after = None;
    loop {
        let page = fetch(after.take()).await?;
        after = page.last().map(&key);
        let last = page.len() < limit as usize;
        pages(page);
        if last {
            return Ok(());
        }
    }
}

/// Every cost view (paged through the store).
async fn all_costs(store: &dyn CoreStore) -> PlayResult<Vec<CostView>> {
    let mut out: Vec<CostView> = Vec::new();
    each_page(
        1_000,
        |after: Option<AccountId>| async move { store.cost_accounts(CostFilter::All, after.as_ref(), 1_000).await },
        |v| v.account.clone(),
        |p| out.extend(p),
    )
    .await?;
    Ok(out)
}

#[pymethods]
impl Store {
    #[new]
    #[pyo3(signature = (target, *, writable = false, now = None, prices = None))]
    fn new(py: Python<'_>, target: &Bound<'_, PyAny>, writable: bool, now: Option<&Bound<'_, PyAny>>, prices: Option<PathBuf>) -> PlayResult<Store> {
        let target: String = match target.extract::<PathBuf>() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(_) => target.extract()?,
        };
        let clock = opt_time("now", now)?.map(|t| Arc::new(ManualClock::new(t)));
        let pricing = pricing_from(prices)?;
        let postgres = is_postgres_url(&target);
        let open = {
            let clock = clock.clone();
            block(py, async move {
                if postgres {
                    let mut opts = PgOptions::new(target.clone()).pool_size(4);
                    if let Some(c) = clock {
                        opts = opts.clock(c);
                    }
                    let store = PgStore::open(opts).await?;
                    let reader = PgReader::connect(&target, 2).await?;
                    Ok(Open { store: Arc::new(store), reader: Arc::new(reader), sqlite: None })
                } else {
                    if target == ":memory:" || target.is_empty() {
                        return Err(invalid("target", "analysis needs a database file (or a PostgreSQL URL)"));
                    }
                    let path = PathBuf::from(&target);
                    if !writable && !path.is_file() {
                        return Err(PlayError::Core(prpm_playground_core::Error::NotFound { what: "database file" }));
                    }
                    let mut opts = SqliteOptions::file(&path);
                    if let Some(c) = clock {
                        opts = opts.clock(c);
                    }
                    let store =
                        Arc::new(tokio::task::spawn_blocking(move || SqliteStore::open_with(opts)).await.map_err(|e| invalid("target", e.to_string()))??);
                    let reader = SqliteReader::open(&path)?;
                    Ok(Open { store: store.clone(), reader: Arc::new(reader), sqlite: Some(store) })
                }
            })?
        };
        Ok(Store { inner: Mutex::new(Some(Arc::new(open))), writable, backend: if postgres { "postgres" } else { "sqlite" }, clock, pricing })
    }

    /// Closes the store (a SQLite store finishes the writes queued first). Further calls raise
    /// `Backend` (code `closed`); closing twice does nothing.
    fn close(&self, py: Python<'_>) {
        let open = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(o) = open {
            py.detach(move || {
                if let Some(s) = &o.sqlite {
                    s.close();
                }
                drop(o);
            });
        }
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        format!("Store(backend={:?}, writable={}, closed={})", self.backend, results::py_bool(self.writable), results::py_bool(self.closed()))
    }

    /// The store's current time (UTC).
    fn now(&self) -> PlayResult<DateTime<Utc>> {
        Ok(self.open()?.store.clock().now())
    }

    /// Moves a store opened with `now=` to this time.
    fn set_now(&self, now: &Bound<'_, PyAny>) -> PlayResult<()> {
        let t = time("now", now)?;
        match &self.clock {
            Some(c) => {
                c.set(t);
                Ok(())
            }
            None => Err(invalid("now", "the store runs on the system clock (open it with now=... to set its time)")),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Functions

    /// The account's balances at the store's time.
    fn balance(&self, py: Python<'_>, account: &str) -> PlayResult<Balance> {
        let (o, a) = (self.open()?, convert::account(account)?);
        let b = block(py, async move { Ok(o.store.balance(&a).await?) })?;
        Ok(Balance::from(b))
    }

    /// The admin summary of the current month.
    fn summary(&self, py: Python<'_>) -> PlayResult<Summary> {
        let o = self.open()?;
        Ok(Summary::from(block(py, async move { Ok(o.store.summary().await?) })?))
    }

    /// Recomputes every balance from the log and reports each difference.
    fn verify(&self, py: Python<'_>) -> PlayResult<VerifyReport> {
        let o = self.open()?;
        Ok(VerifyReport::from(block(py, async move { Ok(o.store.verify().await?) })?))
    }

    /// Creates an account (`kind`: `user` or `organisation`) with its sign-up credits.
    #[pyo3(signature = (account, kind = "user", *, key = None))]
    fn create_account(&self, py: Python<'_>, account: &str, kind: &str, key: Option<&str>) -> PlayResult<Receipt> {
        let kind = match kind {
            "user" => AccountKind::User,
            "organisation" | "organization" => AccountKind::Organisation,
            k => return Err(invalid("kind", format!("{k:?}: user or organisation"))),
        };
        let cmd = Command::CreateAccount(CreateAccount { account: convert::account(account)?, kind, key: convert::key(key)? });
        self.execute(py, "create_account", cmd)
    }

    /// Adds credits to a bucket (`purchased`, `monthly` or `rollover`).
    #[pyo3(signature = (account, credits, *, bucket = "purchased", source = "admin", reference = String::new(), expires_at = None, key = None))]
    #[allow(clippy::too_many_arguments)]
    fn grant(
        &self,
        py: Python<'_>,
        account: &str,
        credits: i64,
        bucket: &str,
        source: &str,
        reference: String,
        expires_at: Option<&Bound<'_, PyAny>>,
        key: Option<&str>,
    ) -> PlayResult<Receipt> {
        let bucket =
            Bucket::ALL.into_iter().find(|b| b.as_str() == bucket).ok_or_else(|| invalid("bucket", format!("{bucket:?}: monthly, rollover or purchased")))?;
        let source = [GrantSource::Plan, GrantSource::Purchase, GrantSource::Bonus, GrantSource::Admin]
            .into_iter()
            .find(|s| s.as_str() == source)
            .ok_or_else(|| invalid("source", format!("{source:?}: plan, purchase, bonus or admin")))?;
        let cmd = Command::Grant(Grant {
            account: convert::account(account)?,
            bucket,
            amount: credits,
            source,
            expires_at: opt_time("expires_at", expires_at)?,
            reference,
            key: convert::key(key)?,
        });
        self.execute(py, "grant", cmd)
    }

    /// Holds a run's worst case (credits, and its cost in USD against the cost limits) until
    /// it is settled or released, or `ttl_secs` pass. The receipt's `hold` names it.
    #[pyo3(signature = (account, credits, *, cost_usd = None, ttl_secs = 600, reference = String::new(), key = None))]
    #[allow(clippy::too_many_arguments)]
    fn hold(
        &self,
        py: Python<'_>,
        account: &str,
        credits: i64,
        cost_usd: Option<&Bound<'_, PyAny>>,
        ttl_secs: u32,
        reference: String,
        key: Option<&str>,
    ) -> PlayResult<Receipt> {
        let cmd = Command::Hold(Hold {
            account: convert::account(account)?,
            amount: credits,
            ttl_secs,
            cost_micros: opt_usd("cost_usd", cost_usd)?.unwrap_or(0),
            reference,
            key: convert::key(key)?,
        });
        self.execute(py, "hold", cmd)
    }

    /// Settles a hold to what the run used: `credits` (default: the price of the tokens) and
    /// its usage (model, tokens, and `cost_usd`, default: priced from the tokens).
    #[pyo3(signature = (hold, credits = None, *, model = None, operation = "playground_run".to_string(), input_tokens = 0, output_tokens = 0,
                        cache_read_tokens = 0, cache_write_tokens = 0, cost_usd = None, key = None))]
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        py: Python<'_>,
        hold: i64,
        credits: Option<i64>,
        model: Option<String>,
        operation: String,
        input_tokens: i64,
        output_tokens: i64,
        cache_read_tokens: i64,
        cache_write_tokens: i64,
        cost_usd: Option<&Bound<'_, PyAny>>,
        key: Option<&str>,
    ) -> PlayResult<Receipt> {
        let usage = self.make_usage(model, operation, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd)?;
        let credits = self.credits(credits, usage.as_ref())?;
        let cmd = Command::Settle(Settle { hold: HoldId(hold), credits, usage, key: convert::key(key)? });
        self.execute(py, "settle", cmd)
    }

    /// Releases a hold: nothing is charged.
    #[pyo3(signature = (hold, *, key = None))]
    fn release(&self, py: Python<'_>, hold: i64, key: Option<&str>) -> PlayResult<Receipt> {
        self.execute(py, "release", Command::Release(Release { hold: HoldId(hold), key: convert::key(key)? }))
    }

    /// Charges credits in one step (with the usage, when a model is given).
    #[pyo3(signature = (account, credits = None, *, model = None, operation = "playground_run".to_string(), input_tokens = 0, output_tokens = 0,
                        cache_read_tokens = 0, cache_write_tokens = 0, cost_usd = None, reference = String::new(), key = None))]
    #[allow(clippy::too_many_arguments)]
    fn spend(
        &self,
        py: Python<'_>,
        account: &str,
        credits: Option<i64>,
        model: Option<String>,
        operation: String,
        input_tokens: i64,
        output_tokens: i64,
        cache_read_tokens: i64,
        cache_write_tokens: i64,
        cost_usd: Option<&Bound<'_, PyAny>>,
        reference: String,
        key: Option<&str>,
    ) -> PlayResult<Receipt> {
        let usage = self.make_usage(model, operation, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd)?;
        let amount = self.credits(credits, usage.as_ref())?;
        let cmd = Command::Spend(Spend { account: convert::account(account)?, amount, usage, reference, key: convert::key(key)? });
        self.execute(py, "spend", cmd)
    }

    /// Records an AI operation paid elsewhere: its cost counts toward the cost limits (it may
    /// throttle the account), it charges no credits and is never refused.
    #[pyo3(signature = (account, *, model, operation = "ai_operation".to_string(), input_tokens = 0, output_tokens = 0, cache_read_tokens = 0,
                        cache_write_tokens = 0, cost_usd = None, reference = String::new(), key = None))]
    #[allow(clippy::too_many_arguments)]
    fn meter(
        &self,
        py: Python<'_>,
        account: &str,
        model: String,
        operation: String,
        input_tokens: i64,
        output_tokens: i64,
        cache_read_tokens: i64,
        cache_write_tokens: i64,
        cost_usd: Option<&Bound<'_, PyAny>>,
        reference: String,
        key: Option<&str>,
    ) -> PlayResult<Receipt> {
        let usage = self.make_usage(Some(model), operation, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd)?.expect("a model");
        let cmd = Command::Meter(Meter { account: convert::account(account)?, usage, reference, key: convert::key(key)? });
        self.execute(py, "meter", cmd)
    }

    /// Starts or updates a plan (`monthly_credits` each period, the current one ending at
    /// `period_end`); `monthly_credits=None` ends it at the end of its period.
    #[pyo3(signature = (account, monthly_credits, period_end = None, *, anchor_day = None, key = None))]
    fn set_plan(
        &self,
        py: Python<'_>,
        account: &str,
        monthly_credits: Option<i64>,
        period_end: Option<&Bound<'_, PyAny>>,
        anchor_day: Option<u32>,
        key: Option<&str>,
    ) -> PlayResult<Receipt> {
        let plan = match monthly_credits {
            Some(c) => {
                let end = opt_time("period_end", period_end)?.ok_or_else(|| invalid("period_end", "a plan needs the end of its current period"))?;
                Some(PlanTerms { monthly_credits: c, period_end: end, anchor_day })
            }
            None => None,
        };
        self.execute(py, "set_plan", Command::SetPlan(SetPlan { account: convert::account(account)?, plan, key: convert::key(key)? }))
    }

    /// Sets organisation membership and an admin's tier override (`None`: the derived tier).
    #[pyo3(signature = (account, *, org_member = false, tier = None, key = None))]
    fn set_cost_profile(&self, py: Python<'_>, account: &str, org_member: bool, tier: Option<String>, key: Option<&str>) -> PlayResult<Receipt> {
        let cmd = Command::SetCostProfile(SetCostProfile { account: convert::account(account)?, org_member, tier, key: convert::key(key)? });
        self.execute(py, "set_cost_profile", cmd)
    }

    /// Records a model call (the runs table): its tokens, credits, cost (default: priced from
    /// the tokens), latency and outcome (`completed`, `failed`, `interrupted`), at the store's
    /// time unless `at` is given. Idempotent by `run_id` (32 hex digits; default: a new one);
    /// returns the run id. Recording charges nothing: settle or spend for that.
    #[pyo3(signature = (account, *, model, input_tokens = 0, output_tokens = 0, cache_read_tokens = 0, cache_write_tokens = 0, credits = 0,
                        cost_usd = None, latency_ms = 0, outcome = "completed", error = None, hold = None, package = None, with_prompt = true,
                        at = None, run_id = None))]
    #[allow(clippy::too_many_arguments)]
    fn record_run(
        &self,
        py: Python<'_>,
        account: &str,
        model: String,
        input_tokens: i64,
        output_tokens: i64,
        cache_read_tokens: i64,
        cache_write_tokens: i64,
        credits: i64,
        cost_usd: Option<&Bound<'_, PyAny>>,
        latency_ms: i64,
        outcome: &str,
        error: Option<String>,
        hold: Option<i64>,
        package: Option<String>,
        with_prompt: bool,
        at: Option<&Bound<'_, PyAny>>,
        run_id: Option<&str>,
    ) -> PlayResult<String> {
        let o = self.writing("record_run")?;
        let usage =
            self.make_usage(Some(model), String::new(), input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd)?.expect("a model");
        let run = RunRecord {
            id: match run_id {
                Some(id) => prpm_playground_core::RunId::parse(id)?,
                None => prpm_playground_core::RunId::generate(),
            },
            account: convert::account(account)?,
            session: None,
            package_id: package,
            model: usage.model,
            with_prompt,
            tokens: usage.tokens,
            credits,
            cost_micros: usage.cost_micros,
            latency_ms: nonneg("latency_ms", latency_ms)?,
            outcome: prpm_playground_core::RunOutcome::parse(outcome)?,
            error,
            hold: hold.map(HoldId),
            at: match opt_time("at", at)? {
                Some(t) => t,
                None => o.store.clock().now(),
            },
        };
        let id = run.id.as_str().to_owned();
        block(py, async move { Ok(o.store.record_run(&run, &[]).await?) })?;
        Ok(id)
    }

    /// An admin throttles the account.
    #[pyo3(signature = (account, *, by, why, key = None))]
    fn throttle(&self, py: Python<'_>, account: &str, by: String, why: String, key: Option<&str>) -> PlayResult<Receipt> {
        self.execute(py, "throttle", Command::Throttle(AdminThrottle { account: convert::account(account)?, by, why, key: convert::key(key)? }))
    }

    /// An admin lifts the account's throttle.
    #[pyo3(signature = (account, *, by, why, key = None))]
    fn unthrottle(&self, py: Python<'_>, account: &str, by: String, why: String, key: Option<&str>) -> PlayResult<Receipt> {
        self.execute(py, "unthrottle", Command::Unthrottle(AdminThrottle { account: convert::account(account)?, by, why, key: convert::key(key)? }))
    }

    // -----------------------------------------------------------------------------------------
    // Tables

    /// The usage log: every metered operation (settles, spends with usage, meters).
    #[pyo3(signature = (*, start = None, end = None, account = None, model = None))]
    fn usage(
        &self,
        py: Python<'_>,
        start: Option<&Bound<'_, PyAny>>,
        end: Option<&Bound<'_, PyAny>>,
        account: Option<&str>,
        model: Option<String>,
    ) -> PlayResult<Table> {
        let (o, f) = (self.open()?, filter(start, end, account, model)?);
        block(py, async move {
            let mut batches = Vec::new();
            each_page(
                PAGE,
                |after| o.reader.usage_records(&f, after, PAGE),
                |r| r.entry,
                |page| {
                    batches.push(
                        Columns::new(&page)
                            .int("entry", |r| r.entry.0)
                            .str("account", |r| r.account.as_str())
                            .time("at", |r| r.at)
                            .opt_int("hold", |r| r.hold.map(|h| h.0))
                            .str("operation", |r| &r.operation)
                            .str("model", |r| &r.model)
                            .int("input_tokens", |r| r.tokens.input as i64)
                            .int("output_tokens", |r| r.tokens.output as i64)
                            .int("cache_read_tokens", |r| r.tokens.cache_read as i64)
                            .int("cache_write_tokens", |r| r.tokens.cache_write as i64)
                            .int("total_tokens", |r| r.tokens.total() as i64)
                            .int("credits", |r| r.credits)
                            .usd("cost_usd", |r| r.cost_micros)
                            .batch(),
                    )
                },
            )
            .await?;
            Ok(Table::new(batches))
        })
    }

    /// Playground runs (model calls, with latency and outcome).
    #[pyo3(signature = (*, start = None, end = None, account = None, model = None))]
    fn runs(
        &self,
        py: Python<'_>,
        start: Option<&Bound<'_, PyAny>>,
        end: Option<&Bound<'_, PyAny>>,
        account: Option<&str>,
        model: Option<String>,
    ) -> PlayResult<Table> {
        let (o, f) = (self.open()?, filter(start, end, account, model)?);
        block(py, async move {
            let mut batches = Vec::new();
            each_page(
                PAGE,
                |after: Option<analysis::RunCursor>| {
                    let (o, f) = (&o, &f);
                    async move { o.reader.runs(f, after.as_ref(), PAGE).await }
                },
                |r| (r.at, r.id.clone()),
                |page| {
                    batches.push(
                        Columns::new(&page)
                            .str("id", |r| r.id.as_str())
                            .str("account", |r| r.account.as_str())
                            .time("at", |r| r.at)
                            .opt_str("session", |r| r.session.as_ref().map(|s| s.as_str()))
                            .opt_str("package", |r| r.package_id.as_deref())
                            .str("model", |r| &r.model)
                            .bool("with_prompt", |r| r.with_prompt)
                            .int("input_tokens", |r| r.tokens.input as i64)
                            .int("output_tokens", |r| r.tokens.output as i64)
                            .int("cache_read_tokens", |r| r.tokens.cache_read as i64)
                            .int("cache_write_tokens", |r| r.tokens.cache_write as i64)
                            .int("credits", |r| r.credits)
                            .usd("cost_usd", |r| r.cost_micros)
                            .int("latency_ms", |r| r.latency_ms as i64)
                            .str("outcome", |r| r.outcome.as_str())
                            .opt_str("error", |r| r.error.as_deref())
                            .opt_int("hold", |r| r.hold.map(|h| h.0))
                            .batch(),
                    )
                },
            )
            .await?;
            Ok(Table::new(batches))
        })
    }

    /// The transaction log of every account (`kinds`: entry kinds such as `grant`, `settle`).
    #[pyo3(signature = (*, start = None, end = None, account = None, kinds = None))]
    fn transactions(
        &self,
        py: Python<'_>,
        start: Option<&Bound<'_, PyAny>>,
        end: Option<&Bound<'_, PyAny>>,
        account: Option<&str>,
        kinds: Option<Vec<String>>,
    ) -> PlayResult<Table> {
        let (o, f) = (self.open()?, filter(start, end, account, None)?);
        let kinds = kinds.unwrap_or_default().iter().map(|k| EntryKind::parse(k)).collect::<prpm_playground_core::Result<Vec<_>>>()?;
        block(py, async move {
            let mut batches = Vec::new();
            each_page(
                PAGE,
                |after| o.reader.entries(&f, &kinds, after, PAGE),
                |e| e.id,
                |page| {
                    batches.push(
                        Columns::new(&page)
                            .int("id", |e| e.id.0)
                            .str("account", |e| e.account.as_str())
                            .time("at", |e| e.at)
                            .str("kind", |e| e.kind.as_str())
                            .opt_str("source", |e| e.source.map(|s| s.as_str()))
                            .int("monthly", |e| e.delta.monthly)
                            .int("rollover", |e| e.delta.rollover)
                            .int("purchased", |e| e.delta.purchased)
                            .int("total", |e| e.delta.total())
                            .int("held", |e| e.held_delta)
                            .int("balance_after", |e| e.balance_after)
                            .int("held_after", |e| e.held_after)
                            .opt_int("hold", |e| e.hold.map(|h| h.0))
                            .opt_int("ref_entry", |e| e.ref_entry.map(|r| r.0))
                            .str("reference", |e| &e.reference)
                            .opt_time("rollover_expires_at", |e| e.rollover_expires_at)
                            .batch(),
                    )
                },
            )
            .await?;
            Ok(Table::new(batches))
        })
    }

    /// Cost and revenue per account and UTC day in `[start, end)` (both required, at most 400
    /// days). Usage sums the usage log exactly; `plan_revenue_usd` is each plan period's fee
    /// (the tier's monthly revenue) on the day the period started (its allocation in the log),
    /// left out (zero) when a model filter is given.
    #[pyo3(signature = (*, start, end, account = None, model = None))]
    fn daily(&self, py: Python<'_>, start: &Bound<'_, PyAny>, end: &Bound<'_, PyAny>, account: Option<&str>, model: Option<String>) -> PlayResult<Table> {
        let (o, f) = (self.open()?, filter(Some(start), Some(end), account, model)?);
        block(py, async move {
            let usage = o.reader.daily_by_account(&f).await?;
            let mut days: BTreeMap<(chrono::NaiveDate, AccountId), (Option<AccountDay>, i64)> =
                usage.into_iter().map(|d| ((d.day, d.account.clone()), (Some(d), 0))).collect();
            if f.model.is_none() {
                let mut grants = Vec::new();
                each_page(
                    PAGE,
                    |after| o.reader.entries(&f, &[EntryKind::Grant], after, PAGE),
                    |e| e.id,
                    |page| grants.extend(page.into_iter().filter(|e| e.source == Some(GrantSource::Plan))),
                )
                .await?;
                if !grants.is_empty() {
                    let tiers = o.store.tiers().await?;
                    let views: HashMap<AccountId, CostView> = all_costs(&*o.store).await?.into_iter().map(|v| (v.account.clone(), v)).collect();
                    for g in grants {
                        let Some(v) = views.get(&g.account) else { continue };
                        let tier = if v.plan_active { v.tier.as_str() } else { account_tier(v.kind, true, v.org_member, None) };
                        let fee = tiers.get(tier)?.monthly_revenue_micros;
                        days.entry((g.at.date_naive(), g.account.clone())).or_insert((None, 0)).1 += fee;
                    }
                }
            }
            let rows: Vec<_> = days.into_iter().collect();
            let usage = |r: &((chrono::NaiveDate, AccountId), (Option<AccountDay>, i64)), f: fn(&AccountDay) -> i64| r.1.0.as_ref().map_or(0, f);
            let batch = Columns::new(&rows)
                .date("day", |r| r.0.0)
                .str("account", |r| r.0.1.as_str())
                .int("runs", |r| usage(r, |d| d.runs as i64))
                .int("credits", |r| usage(r, |d| d.credits))
                .int("input_tokens", |r| usage(r, |d| d.tokens.input as i64))
                .int("output_tokens", |r| usage(r, |d| d.tokens.output as i64))
                .int("cache_read_tokens", |r| usage(r, |d| d.tokens.cache_read as i64))
                .int("cache_write_tokens", |r| usage(r, |d| d.tokens.cache_write as i64))
                .usd("cost_usd", |r| usage(r, |d| d.cost_micros))
                .usd("plan_revenue_usd", |r| r.1.1)
                .batch();
            Ok(Table::new(vec![batch]))
        })
    }

    /// Every account (or one, or one tier's) with its tier, cost this month, limits, risk,
    /// throttle, balances and plan, at the store's time.
    #[pyo3(signature = (*, account = None, tier = None))]
    fn users(&self, py: Python<'_>, account: Option<&str>, tier: Option<String>) -> PlayResult<Table> {
        let (o, account) = (self.open()?, opt_account(account)?);
        block(py, async move {
            let views = match &account {
                Some(a) => vec![o.store.cost(a).await?],
                None => all_costs(&*o.store).await?,
            };
            let mut balances: HashMap<AccountId, AccountRow> = HashMap::new();
            let (reader, account) = (&o.reader, &account);
            each_page(
                PAGE,
                |after: Option<AccountId>| async move { reader.accounts(account.as_ref(), after.as_ref(), PAGE).await },
                |r| r.account.clone(),
                |page| balances.extend(page.into_iter().map(|r| (r.account.clone(), r))),
            )
            .await?;
            let tiers = o.store.tiers().await?;
            let rows: Vec<(CostView, Option<AccountRow>, i64)> = views
                .into_iter()
                .filter(|v| tier.as_ref().is_none_or(|t| &v.tier == t))
                .map(|v| {
                    let revenue = if v.plan_active { tiers.get(&v.tier).map_or(0, |t| t.monthly_revenue_micros) } else { 0 };
                    let b = balances.remove(&v.account);
                    (v, b, revenue)
                })
                .collect();
            let bal = |r: &(CostView, Option<AccountRow>, i64), f: fn(&AccountRow) -> i64| r.1.as_ref().map_or(0, f);
            let batch = Columns::new(&rows)
                .str("account", |r| r.0.account.as_str())
                .str("kind", |r| r.0.kind.as_str())
                .str("tier", |r| &r.0.tier)
                .bool("plan_active", |r| r.0.plan_active)
                .bool("org_member", |r| r.0.org_member)
                .usd("monthly_revenue_usd", |r| r.2)
                .usd("month_cost_usd", |r| r.0.month_cost_micros)
                .usd("margin_usd", |r| r.2 - r.0.month_cost_micros)
                .usd("day_cost_usd", |r| r.0.day_cost_micros)
                .usd("held_cost_usd", |r| r.0.held_cost_micros)
                .opt_usd("monthly_cost_limit_usd", |r| r.0.limits.monthly_cost_limit_micros)
                .opt_usd("daily_cost_limit_usd", |r| r.0.limits.daily_cost_limit_micros)
                .opt_int("hourly_request_limit", |r| r.0.limits.hourly_request_limit.map(i64::from))
                .int("requests_last_hour", |r| i64::from(r.0.requests_last_hour))
                .str("risk", |r| r.0.risk.as_str())
                .bool("throttled", |r| r.0.throttle.is_some())
                .opt_str("throttle_reason", |r| r.0.throttle.as_ref().map(|t| t.reason.code()))
                .opt_time("throttled_since", |r| r.0.throttle.as_ref().map(|t| t.since))
                .int("monthly_credits", |r| bal(r, |b| b.monthly))
                .int("rollover_credits", |r| bal(r, |b| b.rollover))
                .int("purchased_credits", |r| bal(r, |b| b.purchased))
                .int("held_credits", |r| bal(r, |b| b.held))
                .int("available_credits", |r| bal(r, |b| b.monthly + b.rollover + b.purchased - b.held))
                .opt_int("plan_monthly_credits", |r| r.1.as_ref().and_then(|b| b.plan_credits))
                .opt_time("period_end", |r| r.1.as_ref().and_then(|b| b.period_end))
                .opt_time("created_at", |r| r.1.as_ref().map(|b| b.created_at))
                .batch();
            Ok(Table::new(vec![batch]))
        })
    }

    /// Purchases (credit packs and subscriptions) created in `[start, end)`.
    #[pyo3(signature = (*, start = None, end = None, account = None))]
    fn purchases(&self, py: Python<'_>, start: Option<&Bound<'_, PyAny>>, end: Option<&Bound<'_, PyAny>>, account: Option<&str>) -> PlayResult<Table> {
        let (o, f) = (self.open()?, filter(start, end, account, None)?);
        f.validate()?;
        block(py, async move {
            let mut rows: Vec<Purchase> = Vec::new();
            let store = &o.store;
            each_page(
                1_000,
                |after: Option<String>| async move { store.purchases(after.as_deref(), 1_000).await },
                |p| p.id.clone(),
                |page| {
                    rows.extend(page.into_iter().filter(|p| {
                        f.account.as_ref().is_none_or(|a| &p.account == a)
                            && f.from.is_none_or(|t| p.created_at >= t)
                            && f.until.is_none_or(|t| p.created_at < t)
                    }))
                },
            )
            .await?;
            let batch = Columns::new(&rows)
                .str("id", |p| &p.id)
                .str("account", |p| p.account.as_str())
                .str("kind", |p| p.kind.as_str())
                .str("product", |p| &p.product)
                .int("credits", |p| p.credits)
                .usd_cents("amount_usd", |p| p.amount_cents)
                .usd_cents("refunded_usd", |p| p.refunded_cents)
                .str("currency", |p| &p.currency)
                .str("status", |p| p.status.as_str())
                .bool("credited", |p| p.credited)
                .int("credits_reversed", |p| p.credits_reversed)
                .opt_str("checkout_session", |p| p.checkout_session.as_deref())
                .opt_str("payment_intent", |p| p.payment_intent.as_deref())
                .opt_str("customer", |p| p.customer.as_deref())
                .int("version", |p| p.version)
                .time("created_at", |p| p.created_at)
                .time("updated_at", |p| p.updated_at)
                .batch();
            Ok(Table::new(vec![batch]))
        })
    }

    /// The tier table (`cost_limits_config`).
    fn tiers(&self, py: Python<'_>) -> PlayResult<Table> {
        let o = self.open()?;
        let tiers = block(py, async move { Ok(o.store.tiers().await?) })?;
        Ok(tier_table(&tiers))
    }

    // -----------------------------------------------------------------------------------------
    // What-if pricing

    /// Replays the usage of `[start, end)` under changed tiers, prices, multipliers, credit
    /// size or request cap (see `prpm_playground_core::simulate`). `tiers` maps a tier name to
    /// the fields that change (`monthly_revenue`, `monthly_cost_limit`, `daily_cost_limit` in
    /// USD, `None` for no limit; `hourly_request_limit`, `alert_threshold_pct`,
    /// `throttle_on_exceed`); `prices` maps a model to its changed USD per million tokens
    /// (`input`, `output`, `cache_read`, `cache_write`) or `multiplier`. Users keep the tier
    /// they have now; those with a plan pay their tier's revenue for each month the period
    /// touches.
    #[pyo3(signature = (*, start, end, tiers = None, prices = None, multipliers = None, tokens_per_credit = None, request_cap_tokens = None))]
    #[allow(clippy::too_many_arguments)]
    fn simulate(
        &self,
        py: Python<'_>,
        start: &Bound<'_, PyAny>,
        end: &Bound<'_, PyAny>,
        tiers: Option<&Bound<'_, PyDict>>,
        prices: Option<&Bound<'_, PyDict>>,
        multipliers: Option<BTreeMap<String, u32>>,
        tokens_per_credit: Option<u64>,
        request_cap_tokens: Option<u64>,
    ) -> PlayResult<Simulation> {
        let o = self.open()?;
        let f = filter(Some(start), Some(end), None, None)?;
        f.validate()?;
        let (from, until) = (f.from.expect("given"), f.until.expect("given"));
        let base_tiers = {
            let o = o.clone();
            block(py, async move { Ok(o.store.tiers().await?) })?
        };
        let scenario = Scenario {
            tiers: tiers.map(|t| tier_changes(&base_tiers, t)).transpose()?.unwrap_or_default(),
            prices: prices.map(|p| price_changes(&self.pricing.table, p)).transpose()?.unwrap_or_default(),
            multipliers: multipliers.unwrap_or_default(),
            tokens_per_credit,
            request_cap_tokens,
        };
        let table = self.pricing.table.clone();
        let projection = block(py, async move {
            let users: Vec<SimUser> =
                all_costs(&*o.store).await?.into_iter().map(|v| SimUser { account: v.account, tier: v.tier, paying: v.plan_active }).collect();
            let mut usage = Vec::new();
            each_page(
                PAGE,
                |after| o.reader.usage_records(&f, after, PAGE),
                |r| r.entry,
                |page| {
                    usage.extend(page.into_iter().map(|r| SimUsage {
                        account: r.account,
                        at: r.at,
                        model: r.model,
                        tokens: r.tokens,
                        cost_micros: r.cost_micros,
                    }))
                },
            )
            .await?;
            Ok(simulate::simulate(&base_tiers, &table, &scenario, &users, &usage, simulate::months_in(from, until))?)
        })?;
        Ok(Simulation::new(projection))
    }
}

/// The tiers a scenario replaces: each named tier of `base` with the fields given changed.
fn tier_changes(base: &TierTable, changes: &Bound<'_, PyDict>) -> PlayResult<Vec<TierLimits>> {
    let mut out = Vec::new();
    for (name, fields) in changes.iter() {
        let name: String = name.extract()?;
        let mut t = base.get(&name)?.clone();
        let fields = fields.cast::<PyDict>().map_err(|_| invalid("tiers", format!("{name}: expected a dict of changes")))?;
        for (field, v) in fields.iter() {
            let field: String = field.extract()?;
            let opt_int = |v: &Bound<'_, PyAny>| -> PlayResult<Option<u32>> { if v.is_none() { Ok(None) } else { Ok(Some(v.extract::<u32>()?)) } };
            match field.as_str() {
                "monthly_revenue" => t.monthly_revenue_micros = usd("monthly_revenue", &v)?,
                "monthly_cost_limit" => t.monthly_cost_limit_micros = opt_usd("monthly_cost_limit", Some(&v))?,
                "daily_cost_limit" => t.daily_cost_limit_micros = opt_usd("daily_cost_limit", Some(&v))?,
                "hourly_request_limit" => t.hourly_request_limit = opt_int(&v)?,
                "alert_threshold_pct" => t.alert_threshold_pct = opt_int(&v)?,
                "throttle_on_exceed" => t.throttle_on_exceed = v.extract()?,
                other => return Err(invalid("tiers", format!("{name}: unknown field {other:?}"))),
            }
        }
        out.push(t);
    }
    Ok(out)
}

/// The models a scenario re-prices: each named model of `table` with the rates given changed.
fn price_changes(table: &PriceTable, changes: &Bound<'_, PyDict>) -> PlayResult<Vec<ModelPrice>> {
    let mut out = Vec::new();
    for (model, fields) in changes.iter() {
        let model: String = model.extract()?;
        let mut p = table.get(&model)?.clone();
        let fields = fields.cast::<PyDict>().map_err(|_| invalid("prices", format!("{model}: expected a dict of changes")))?;
        for (field, v) in fields.iter() {
            let field: String = field.extract()?;
            // Rates in USD per million tokens, exact (as decimal micro-dollars per token).
            let rate = |v: &Bound<'_, PyAny>| -> PlayResult<rust_decimal::Decimal> { Ok(prpm_playground_core::pricing::micros_to_usd(usd("prices", v)?)) };
            match field.as_str() {
                "input" => p.input_usd_per_mtok = rate(&v)?,
                "output" => p.output_usd_per_mtok = rate(&v)?,
                "cache_read" => p.cache_read_usd_per_mtok = rate(&v)?,
                "cache_write" => p.cache_write_usd_per_mtok = rate(&v)?,
                "multiplier" => p.multiplier = v.extract()?,
                other => return Err(invalid("prices", format!("{model}: unknown field {other:?}"))),
            }
        }
        out.push(p);
    }
    Ok(out)
}

fn tier_table(tiers: &TierTable) -> Table {
    let rows: Vec<&TierLimits> = tiers.tiers().collect();
    let batch = Columns::new(&rows)
        .str("tier", |t| &t.name)
        .usd("monthly_revenue_usd", |t| t.monthly_revenue_micros)
        .opt_usd("monthly_cost_limit_usd", |t| t.monthly_cost_limit_micros)
        .opt_usd("daily_cost_limit_usd", |t| t.daily_cost_limit_micros)
        .opt_int("hourly_request_limit", |t| t.hourly_request_limit.map(i64::from))
        .opt_int("alert_threshold_pct", |t| t.alert_threshold_pct.map(i64::from))
        .bool("throttle_on_exceed", |t| t.throttle_on_exceed)
        .batch();
    Table::new(vec![batch])
}

/// The pre-run estimate of a run: worst case (input + max output) and expected case, in
/// credits and USD. Over the request cap: `RequestTooLarge`; an unknown model: `InvalidInput`.
#[pyfunction]
#[pyo3(signature = (model, input_tokens, max_output_tokens = None, expected_output_tokens = None, *, request_cap_tokens = None, prices = None))]
fn estimate(
    model: String,
    input_tokens: i64,
    max_output_tokens: Option<u32>,
    expected_output_tokens: Option<u32>,
    request_cap_tokens: Option<u64>,
    prices: Option<PathBuf>,
) -> PlayResult<Estimate> {
    let mut pricing = pricing_from(prices)?;
    if let Some(cap) = request_cap_tokens {
        pricing.request_cap_tokens = cap;
    }
    let e = pricing.estimate(&EstimateRequest { model, input_tokens: nonneg("input_tokens", input_tokens)?, max_output_tokens, expected_output_tokens })?;
    Ok(Estimate::from(e))
}

/// Credits and USD cost of a finished call from its reported usage.
#[pyfunction]
#[pyo3(signature = (model, input_tokens = 0, output_tokens = 0, cache_read_tokens = 0, cache_write_tokens = 0, *, prices = None))]
fn price(model: String, input_tokens: i64, output_tokens: i64, cache_read_tokens: i64, cache_write_tokens: i64, prices: Option<PathBuf>) -> PlayResult<Quote> {
    let tokens = TokenUsage {
        input: nonneg("input_tokens", input_tokens)?,
        output: nonneg("output_tokens", output_tokens)?,
        cache_read: nonneg("cache_read_tokens", cache_read_tokens)?,
        cache_write: nonneg("cache_write_tokens", cache_write_tokens)?,
    };
    Ok(Quote::from(pricing_from(prices)?.price_usage(&model, &tokens)?))
}

/// A throw-away PostgreSQL cluster for the tests (the core's `pg_cluster`: `initdb` and
/// `pg_ctl` under /tmp, stopped and removed when the process ends). `None` without PostgreSQL
/// installed, unless `PRPM_REQUIRE_POSTGRES=1`, where that raises.
#[pyclass(module = "prpm_playground._native", frozen)]
struct TestCluster {
    cluster: &'static prpm_playground_core::pg_cluster::PgCluster,
}

#[pymethods]
impl TestCluster {
    #[staticmethod]
    fn start(py: Python<'_>) -> PlayResult<Option<TestCluster>> {
        let started = py.detach(prpm_playground_core::pg_cluster::PgCluster::shared);
        match started {
            Ok(Some(cluster)) => Ok(Some(TestCluster { cluster })),
            Ok(None) => Ok(None),
            Err(e) => Err(PlayError::Core(prpm_playground_core::Error::Backend(e))),
        }
    }

    /// A fresh, empty database; its connection string.
    fn create_database(&self, py: Python<'_>) -> PlayResult<String> {
        let c = self.cluster;
        block(py, async move { c.create_database().await.map_err(|e| PlayError::Core(prpm_playground_core::Error::Backend(e))) })
    }
}

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Store>()?;
    m.add_class::<Table>()?;
    m.add_class::<TestCluster>()?;
    results::register(m)?;
    errors::register(m)?;
    m.add_function(wrap_pyfunction!(estimate, m)?)?;
    m.add_function(wrap_pyfunction!(price, m)?)?;
    Ok(())
}
