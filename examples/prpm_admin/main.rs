//! `prpm-admin`: the operator CLI of a prpm-playground deployment. It opens the same database
//! as the server (a SQLite file, or PostgreSQL) through the library and runs one operation:
//! migrate, create accounts, grant credits, show balances and history, throttle and
//! unthrottle, run a maintenance job now, mint a bearer token, export usage as CSV, verify the
//! ledger.
//!
//! ```text
//! cargo run --bin prpm-admin -- --help
//! cargo run --bin prpm-admin -- --database data/prpm.db grant alice 100 --bucket purchased --source admin
//! ```
//!
//! Configuration: `--database` or `DATABASE_URL` (default `prpm-playground.db`), `JWT_SECRET`
//! for `mint-jwt`; a `.env` file in the current directory is read first (variables already
//! set win).
//!
//! Exit codes: 0 done (including "exists already" and "not throttled": the state asked for
//! holds), 1 failed (unknown account, a refusal, a database error, ledger discrepancies, an
//! failed export), 2 bad usage (arguments or environment; nothing was touched).

mod commands;
mod export;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use prpm_playground_core::store::{DatabaseUrl, open_url};
use prpm_playground_core::{AccountId, Bucket, EntryKind, GrantSource, IdempotencyKey, LedgerConfig, Store, SystemClock};

const EXIT_CODES: &str = "\
Exit codes: 0 done (also when the state asked for holds already: an account that exists, an
account that is not throttled); 1 failed (unknown account, a refusal, a database error, ledger
discrepancies, a failed export); 2 bad usage (arguments or environment; nothing was
touched).

Environment: DATABASE_URL (the default of --database), JWT_SECRET (mint-jwt). A .env file in the
current directory is read first; variables already set win.";

#[derive(Debug, Parser)]
#[command(
    name = "prpm-admin",
    version,
    about = "Operator CLI of a prpm-playground ledger: accounts, credits, jobs, tokens, usage exports, verification",
    after_help = EXIT_CODES,
    arg_required_else_help = true
)]
struct Cli {
    /// The database: a postgres:// or postgresql:// URL (or `host=... dbname=...` pairs) opens
    /// PostgreSQL; anything else names a SQLite file (`sqlite://path`, `sqlite:path` or a path).
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true, default_value = "prpm-playground.db", value_name = "URL")]
    database: String,

    /// No progress bars and no notes on stderr (progress bars are shown only when stderr is a
    /// terminal anyway).
    #[arg(long, short, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Open the database (creating a SQLite file if needed), apply pending migrations, and print
    /// the schema state.
    #[command(after_help = "Example:\n  prpm-admin --database postgres://prpm@db/prpm migrate")]
    Migrate,

    /// Create a user account (it gets the sign-up credits, 5 by default).
    ///
    /// Keyed by the account id: running it again says the account exists already and changes
    /// nothing.
    #[command(after_help = "Example:\n  prpm-admin create-user alice")]
    CreateUser(CreateArgs),

    /// Create a verified organisation (it gets the verification credits, 200 by default).
    ///
    /// Keyed by the account id: running it again says the account exists already and changes
    /// nothing.
    #[command(after_help = "Example:\n  prpm-admin create-org acme")]
    CreateOrg(CreateArgs),

    /// Grant credits to one bucket of an account.
    ///
    /// Every grant is keyed. With --key, or with --reference (the key is then derived from the
    /// account and the reference), running it again grants nothing more; without either, each
    /// run grants anew under a fresh key, which is printed.
    #[command(after_help = "Examples:\n  prpm-admin grant alice 100 --bucket purchased --source admin --reference TICKET-42\n  \
                            prpm-admin grant alice 20 --bucket rollover --source bonus --expires 2026-12-31T00:00:00Z")]
    Grant(GrantArgs),

    /// Show an account's balances, holds, plan and cost control.
    #[command(after_help = "Example:\n  prpm-admin balance alice")]
    Balance(AccountArg),

    /// Show an account's transaction log, newest first.
    #[command(after_help = "Examples:\n  prpm-admin history alice --kind grant,spend --limit 20\n  \
                            prpm-admin history alice --from 2026-11-01 --until 2026-12-01 --csv > alice-november.csv")]
    History(HistoryArgs),

    /// Throttle an account: its runs are refused until an admin unthrottles it.
    #[command(after_help = "Example:\n  prpm-admin throttle alice --by ops@example.com --reason \"abuse report 17\"")]
    Throttle(ThrottleArgs),

    /// Lift an account's throttle (an admin's, or a cost limit's before its period ends).
    ///
    /// An account that is not throttled is reported as such and left unchanged (exit code 0).
    #[command(after_help = "Example:\n  prpm-admin unthrottle alice --by ops@example.com --reason \"limit raised\"")]
    Unthrottle(ThrottleArgs),

    /// Run a maintenance job now (the server's scheduler runs them at their UTC times) and
    /// print its report.
    ///
    /// Jobs are idempotent: running one twice, or while the scheduler runs it, does the work
    /// once.
    #[command(after_help = "Example:\n  prpm-admin job monthly-rollover")]
    Job(JobArgs),

    /// Mint an HS256 bearer token (JWT) for an account, signed with JWT_SECRET (at least 32
    /// bytes). Prints the token only.
    #[command(after_help = "Example:\n  TOKEN=$(prpm-admin mint-jwt alice --ttl-secs 600)\n  \
                            curl -H \"Authorization: Bearer $TOKEN\" http://localhost:8080/api/v1/playground/credits")]
    MintJwt(MintArgs),

    /// Export usage records (account, time, operation, model, tokens, credits, cost in USD) as
    /// CSV.
    ///
    /// Without --account, every account is exported (in account id order). Rows are oldest
    /// first within an account. Costs are exact decimals of USD (micro-dollar precision).
    /// The store lists at most the newest 1,000 usage records per account: an export that
    /// would need older ones fails (exit code 1, no file written) rather than leave them out.
    #[command(after_help = "Examples:\n  prpm-admin export-usage --from 2026-11-01 --until 2026-12-01 --out usage-november.csv\n  \
                            prpm-admin export-usage --account alice --out -")]
    ExportUsage(ExportArgs),

    /// Recompute every balance from the transaction log and report each difference (exit code
    /// 0 when clean, 1 otherwise).
    #[command(after_help = "Example:\n  prpm-admin verify || alert-the-on-call")]
    Verify,
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// The account id (the embedding application's id, 1 to 128 bytes).
    #[arg(value_parser = parse_account)]
    id: AccountId,
    /// Idempotency key (default: derived from the account id).
    #[arg(long, value_parser = parse_key)]
    key: Option<IdempotencyKey>,
}

#[derive(Debug, Args)]
struct AccountArg {
    /// The account id.
    #[arg(value_parser = parse_account)]
    account: AccountId,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BucketArg {
    /// The subscription's allocation of the current period.
    Monthly,
    /// Carried-over credits; they expire (at most a month from now).
    Rollover,
    /// Bought or given credits; they never expire.
    Purchased,
}

impl From<BucketArg> for Bucket {
    fn from(b: BucketArg) -> Bucket {
        match b {
            BucketArg::Monthly => Bucket::Monthly,
            BucketArg::Rollover => Bucket::Rollover,
            BucketArg::Purchased => Bucket::Purchased,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SourceArg {
    /// An operator's decision.
    Admin,
    /// A gift (promotion, apology).
    Bonus,
    /// A plan's allocation.
    Plan,
    /// A purchase made outside Stripe.
    Purchase,
}

impl From<SourceArg> for GrantSource {
    fn from(s: SourceArg) -> GrantSource {
        match s {
            SourceArg::Admin => GrantSource::Admin,
            SourceArg::Bonus => GrantSource::Bonus,
            SourceArg::Plan => GrantSource::Plan,
            SourceArg::Purchase => GrantSource::Purchase,
        }
    }
}

#[derive(Debug, Args)]
struct GrantArgs {
    /// The account id.
    #[arg(value_parser = parse_account)]
    account: AccountId,
    /// Credits to grant (a whole number, 1 to 1,000,000,000).
    #[arg(allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(1..=prpm_playground_core::MAX_CREDITS_PER_REQUEST))]
    credits: i64,
    /// The bucket the credits go to.
    #[arg(long, value_enum)]
    bucket: BucketArg,
    /// Where the credits come from (recorded in the log).
    #[arg(long, value_enum)]
    source: SourceArg,
    /// When rollover credits expire: RFC 3339 (2026-12-31T00:00:00Z) or a date (midnight UTC).
    /// Only for --bucket rollover; default and latest: a month from now.
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    expires: Option<DateTime<Utc>>,
    /// Free text recorded in the log (a ticket, a reason). Also makes the grant keyed by it: a
    /// second grant to the account with the same reference grants nothing.
    #[arg(long, value_name = "TEXT")]
    reference: Option<String>,
    /// Idempotency key: a grant with a key used before grants nothing more.
    #[arg(long, value_parser = parse_key)]
    key: Option<IdempotencyKey>,
}

#[derive(Debug, Args)]
struct HistoryArgs {
    /// The account id.
    #[arg(value_parser = parse_account)]
    account: AccountId,
    /// Only entries of these kinds (repeat the option or separate with commas): grant, hold,
    /// release, settle, spend, refund, clawback, expire_hold, expire_credits, rollover, meter,
    /// throttle, unthrottle, cost_profile.
    #[arg(long = "kind", value_delimiter = ',', value_parser = parse_entry_kind, value_name = "KIND")]
    kinds: Vec<EntryKind>,
    /// Entries at or after this time: RFC 3339 or a date (midnight UTC).
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    from: Option<DateTime<Utc>>,
    /// Entries before this time: RFC 3339 or a date (midnight UTC).
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    until: Option<DateTime<Utc>>,
    /// Most entries shown.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    limit: u32,
    /// Print CSV (the library's history export columns) instead of a table.
    #[arg(long)]
    csv: bool,
}

#[derive(Debug, Args)]
struct ThrottleArgs {
    /// The account id.
    #[arg(value_parser = parse_account)]
    account: AccountId,
    /// Who does it (recorded in the log).
    #[arg(long, value_name = "ADMIN")]
    by: String,
    /// Why (recorded in the log).
    #[arg(long, value_name = "TEXT")]
    reason: String,
    /// Idempotency key (default: a fresh one, so that an account can be throttled and
    /// unthrottled again later).
    #[arg(long, value_parser = parse_key)]
    key: Option<IdempotencyKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum JobName {
    /// Return holds past their deadline (and remove expired credits of those accounts).
    ExpireHolds,
    /// Remove rollover credits past their expiry (daily, 00:10 UTC).
    ExpireRollover,
    /// The monthly credit reset of every account whose plan period ended (daily, 00:05 UTC).
    MonthlyRollover,
    /// Clear cost counters of ended days and months, lift cost throttles whose period ended
    /// (daily, 00:00 UTC).
    CostReset,
    /// Roll usage records into the daily rollups (hourly).
    RefreshAnalytics,
}

impl JobName {
    fn as_str(self) -> &'static str {
        match self {
            JobName::ExpireHolds => "expire-holds",
            JobName::ExpireRollover => "expire-rollover",
            JobName::MonthlyRollover => "monthly-rollover",
            JobName::CostReset => "cost-reset",
            JobName::RefreshAnalytics => "refresh-analytics",
        }
    }
}

#[derive(Debug, Args)]
struct JobArgs {
    /// The job to run.
    #[arg(value_enum)]
    job: JobName,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    /// The account's own routes.
    User,
    /// Every route, the admin ones included.
    Admin,
}

#[derive(Debug, Args)]
struct MintArgs {
    /// The account the token is for (its `sub` claim).
    #[arg(value_parser = parse_account)]
    account: AccountId,
    /// The token's role.
    #[arg(long, value_enum, default_value_t = RoleArg::User)]
    role: RoleArg,
    /// How long the token is valid, in seconds (at most a year).
    #[arg(long, default_value_t = 3_600, value_parser = clap::value_parser!(i64).range(1..=prpm_playground_core::auth::MAX_TTL_SECS))]
    ttl_secs: i64,
    /// Mint without checking that the account exists in the database (e.g. an operator's
    /// admin id that holds no credits).
    #[arg(long)]
    no_account_check: bool,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// Only this account (default: every account).
    #[arg(long, value_parser = parse_account)]
    account: Option<AccountId>,
    /// Records at or after this time: RFC 3339 or a date (midnight UTC).
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    from: Option<DateTime<Utc>>,
    /// Records before this time: RFC 3339 or a date (midnight UTC).
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    until: Option<DateTime<Utc>>,
    /// The CSV file to write (replaced only once the export is complete), or `-` for stdout.
    #[arg(long, value_name = "FILE")]
    out: String,
}

fn parse_account(s: &str) -> Result<AccountId, String> {
    AccountId::new(s).map_err(|e| e.to_string())
}

fn parse_key(s: &str) -> Result<IdempotencyKey, String> {
    IdempotencyKey::new(s).map_err(|e| e.to_string())
}

fn parse_entry_kind(s: &str) -> Result<EntryKind, String> {
    EntryKind::parse(s).map_err(|_| format!("unknown kind; one of {}", EntryKind::ALL.map(EntryKind::as_str).join(", ")))
}

/// RFC 3339, or a date meaning its midnight UTC.
fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err("expected an RFC 3339 time (2026-11-01T00:00:00Z) or a date (2026-11-01)".into())
}

/// Why a command did not succeed: bad usage (exit code 2; nothing was touched) or a failure
/// (exit code 1).
#[derive(Debug)]
pub enum Fail {
    Usage(String),
    Failed(String),
}

impl From<prpm_playground_core::Error> for Fail {
    fn from(e: prpm_playground_core::Error) -> Fail {
        match e {
            prpm_playground_core::Error::InvalidInput { .. } => Fail::Usage(e.to_string()),
            e => Fail::Failed(e.to_string()),
        }
    }
}

pub type CliResult<T = ()> = Result<T, Fail>;

/// Which database `--database` names.
#[derive(Debug, Clone)]
pub enum Target {
    Sqlite(PathBuf),
    /// A URL or `key=value` connection string.
    Postgres(String),
}

impl Target {
    fn parse(url: &str) -> CliResult<Target> {
        Ok(match DatabaseUrl::parse(url)? {
            DatabaseUrl::Sqlite(path) => Target::Sqlite(path),
            DatabaseUrl::Postgres(url) => Target::Postgres(url),
        })
    }

    /// A description without credentials.
    pub fn describe(&self) -> String {
        match self {
            Target::Sqlite(path) => format!("SQLite file {}", path.display()),
            Target::Postgres(url) => match url.parse::<tokio_postgres::Config>() {
                Ok(c) => {
                    let hosts: Vec<String> = c
                        .get_hosts()
                        .iter()
                        .map(|h| match h {
                            tokio_postgres::config::Host::Tcp(h) => h.clone(),
                            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                        })
                        .collect();
                    format!(
                        "PostgreSQL database {} on {}",
                        c.get_dbname().unwrap_or("(default)"),
                        if hosts.is_empty() { "localhost".into() } else { hosts.join(",") }
                    )
                }
                Err(_) => "PostgreSQL".into(),
            },
        }
    }
}

/// The command line's database.
pub struct Db {
    pub url: String,
    pub target: Target,
}

impl Db {
    /// Opens the store (applying pending migrations). Unless `create`, a SQLite file that does
    /// not exist is an error rather than a new empty database.
    pub async fn open(&self, create: bool) -> CliResult<Arc<dyn Store>> {
        if let Target::Sqlite(path) = &self.target
            && !create
            && !path.exists()
        {
            return Err(Fail::Failed(format!(
                "no database at {}: pass --database (or set DATABASE_URL), or create it with `prpm-admin migrate`",
                path.display()
            )));
        }
        let clock = Arc::new(SystemClock);
        Ok(open_url(&self.url, clock, LedgerConfig::default()).await?)
    }
}

/// The `.env` file of the current directory, if there is one. Variables already set win.
fn load_dotenv() -> Result<(), String> {
    match dotenvy::from_path(".env") {
        Ok(()) => Ok(()),
        Err(e) if e.not_found() => Ok(()),
        Err(e) => Err(format!(".env: {e}")),
    }
}

fn main() -> ExitCode {
    if let Err(e) = load_dotenv() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    // Bad usage exits with 2 here (and --help / --version with 0).
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(run(cli));
    drop(rt);
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Fail::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(2)
        }
        Err(Fail::Failed(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(1)
        }
    }
}

/// Runs the command; returns the exit code of a command that completed (0, or 1 for verify's
/// discrepancies and a job's failed accounts).
async fn run(cli: Cli) -> CliResult<u8> {
    let db = Db { target: Target::parse(&cli.database)?, url: cli.database.clone() };
    let quiet = cli.quiet;
    match cli.command {
        Cmd::Migrate => commands::migrate(&db).await,
        Cmd::CreateUser(a) => commands::create(&db, a, prpm_playground_core::AccountKind::User).await,
        Cmd::CreateOrg(a) => commands::create(&db, a, prpm_playground_core::AccountKind::Organisation).await,
        Cmd::Grant(a) => commands::grant(&db, a).await,
        Cmd::Balance(a) => commands::balance(&db, a).await,
        Cmd::History(a) => commands::history(&db, a).await,
        Cmd::Throttle(a) => commands::throttle(&db, a, true).await,
        Cmd::Unthrottle(a) => commands::throttle(&db, a, false).await,
        Cmd::Job(a) => commands::job(&db, a.job, quiet).await,
        Cmd::MintJwt(a) => commands::mint_jwt(&db, a).await,
        Cmd::ExportUsage(a) => export::export_usage(&db, a, quiet).await,
        Cmd::Verify => commands::verify(&db, quiet).await,
    }
}
