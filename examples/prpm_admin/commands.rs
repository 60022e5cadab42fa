//! The subcommands (all but the usage export).

use std::sync::Arc;

use chrono::{SecondsFormat, Utc};
use prpm_playground_core::auth::{JwtKey, MIN_SECRET_BYTES, Role};
use prpm_playground_core::cost::ThrottleReason;
use prpm_playground_core::history::{CSV_HEADER, csv_row};
use prpm_playground_core::store::{HistoryQuery, MAX_PAGE};
use prpm_playground_core::*;

use crate::progress::{self, Counting};
use crate::{CliResult, CreateArgs, Db, Fail, GrantArgs, HistoryArgs, JobName, MintArgs, RoleArg, Target, ThrottleArgs};

/// A refusal the command did not expect: a failure.
fn refused(r: Rejection) -> Fail {
    Fail::Failed(format!("refused: {r} ({})", r.code()))
}

/// A key derived from the command's arguments.
fn derived_key(s: String) -> CliResult<IdempotencyKey> {
    IdempotencyKey::new(s).map_err(|_| Fail::Usage("the idempotency key derived from the arguments is longer than 255 bytes: pass --key".into()))
}

/// USD, exact, with at least two decimals.
pub fn usd(micros: i64) -> String {
    format!("${}", prpm_playground_core::pricing::format_usd(micros))
}

fn time(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn print_balances(b: &Balances) {
    println!(
        "balance: total {} = monthly {} + rollover {} + purchased {}; held {}; available {}",
        b.total(),
        b.monthly,
        b.rollover,
        b.purchased,
        b.held,
        b.available()
    );
}

// ---------------------------------------------------------------------------------------------
// migrate

/// One row of refinery's migration history.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Migration {
    version: i64,
    name: String,
    applied_on: String,
}

/// The migrations applied to the database so far (none for a database that does not exist yet).
async fn schema_state(target: &Target) -> CliResult<Vec<Migration>> {
    match target {
        Target::Sqlite(path) => {
            if !path.exists() {
                return Ok(Vec::new());
            }
            let read = || -> rusqlite::Result<Vec<Migration>> {
                // Read-write without create: the file exists (a read-only connection could not
                // open a WAL database whose shared-memory file is gone).
                let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
                let exists: i64 =
                    c.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'refinery_schema_history'", [], |r| r.get(0))?;
                if exists == 0 {
                    return Ok(Vec::new());
                }
                let mut st = c.prepare("SELECT version, name, applied_on FROM refinery_schema_history ORDER BY version")?;
                st.query_map([], |r| {
                    Ok(Migration {
                        version: r.get(0)?,
                        name: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                        applied_on: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                    })
                })?
                .collect()
            };
            read().map_err(|e| Fail::Failed(format!("reading the schema state of {}: {e}", path.display())))
        }
        Target::Postgres(url) => {
            let fail = |e: tokio_postgres::Error| Fail::Failed(format!("reading the schema state: postgres: {e}"));
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(fail)?;
            let task = tokio::spawn(conn);
            let rows = match client.query("SELECT version::bigint, name::text, applied_on::text FROM refinery_schema_history ORDER BY version", &[]).await {
                Ok(rows) => rows,
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Vec::new(),
                Err(e) => return Err(fail(e)),
            };
            drop(client);
            let _ = task.await;
            Ok(rows
                .iter()
                .map(|r| Migration {
                    version: r.get(0),
                    name: r.get::<_, Option<String>>(1).unwrap_or_default(),
                    applied_on: r.get::<_, Option<String>>(2).unwrap_or_default(),
                })
                .collect())
        }
    }
}

pub async fn migrate(db: &Db) -> CliResult<u8> {
    // The state before is only for telling what this run applied: a file that is not ours
    // fails in the open below, with the library's message.
    let before = schema_state(&db.target).await.unwrap_or_default();
    let store = db.open(true).await?;
    drop(store);
    let after = schema_state(&db.target).await?;
    println!("database: {}", db.target.describe());
    let now: Vec<&Migration> = after.iter().filter(|m| !before.iter().any(|b| b.version == m.version)).collect();
    let version = after.last().map_or(0, |m| m.version);
    if now.is_empty() {
        println!("schema version {version}: up to date, nothing to apply");
    } else {
        let names: Vec<String> = now.iter().map(|m| format!("V{} {}", m.version, m.name)).collect();
        println!("schema version {version}: applied {} migration(s) now: {}", now.len(), names.join(", "));
    }
    println!("migrations:");
    for m in &after {
        println!("  V{:<3} {:<20} applied {}", m.version, m.name, m.applied_on);
    }
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// accounts and credits

pub async fn create(db: &Db, a: CreateArgs, kind: AccountKind) -> CliResult<u8> {
    let what = match kind {
        AccountKind::User => "user",
        AccountKind::Organisation => "organisation",
    };
    let key = match a.key {
        Some(k) => k,
        None => derived_key(format!("prpm-admin:create-{}:{}", kind.as_str(), a.id))?,
    };
    let store = db.open(true).await?;
    match store.create_account(a.id.clone(), kind, key).await? {
        Ok(c) if c.replayed => println!("{what} {} exists already (created earlier with this key); nothing changed", a.id),
        Ok(c) => {
            let granted = match c.effect {
                Effect::AccountCreated { granted, .. } => granted,
                _ => 0,
            };
            println!("created {what} {} with {granted} credits", a.id);
            print_balances(&c.effect.balances());
        }
        Err(Rejection::AccountExists) => {
            let existing = store.balance(&a.id).await?;
            println!("account {} exists already (a {}); nothing changed", a.id, existing.kind.as_str());
        }
        Err(r) => return Err(refused(r)),
    }
    Ok(0)
}

pub async fn grant(db: &Db, a: GrantArgs) -> CliResult<u8> {
    let (key, generated) = match (a.key, &a.reference) {
        (Some(k), _) => (k, false),
        (None, Some(r)) => (derived_key(format!("prpm-admin:grant:{}:{r}", a.account))?, false),
        (None, None) => (IdempotencyKey::generate(), true),
    };
    let bucket: Bucket = a.bucket.into();
    let source: GrantSource = a.source.into();
    let g = Grant {
        account: a.account.clone(),
        bucket,
        amount: a.credits,
        source,
        expires_at: a.expires,
        reference: a.reference.unwrap_or_else(|| "prpm-admin grant".into()),
        key: key.clone(),
    };
    // Bad input is refused before the database is opened.
    Command::Grant(g.clone()).validate()?;
    let store = db.open(false).await?;
    let c = match store.grant(g).await {
        Err(Error::IdempotencyConflict { key }) => {
            return Err(Fail::Failed(format!(
                "the key {key:?} was used before for a different request (a grant with other arguments under this --reference or --key); \
                 nothing changed: pass another --reference or --key"
            )));
        }
        other => other?.map_err(refused)?,
    };
    let entry = match c.effect {
        Effect::Granted { entry, .. } => format!(", log entry {}", entry.0),
        _ => String::new(),
    };
    if c.replayed {
        println!("already granted with this key (nothing changed): {} {} credits to {}{entry}", a.credits, bucket.as_str(), a.account);
    } else {
        println!("granted {} {} credits to {} (source {}){entry}", a.credits, bucket.as_str(), a.account, source.as_str());
    }
    print_balances(&c.effect.balances());
    if generated {
        println!("idempotency key: {key} (pass --key {key} to retry this grant safely)");
    } else {
        println!("idempotency key: {key}");
    }
    Ok(0)
}

/// The library's text, with an admin's throttle as `by ops: abuse`.
fn throttle_reason(r: &ThrottleReason) -> String {
    match r {
        ThrottleReason::Admin { by, why } => format!("by {by}: {why}"),
        limit => limit.to_string(),
    }
}

pub async fn balance(db: &Db, a: crate::AccountArg) -> CliResult<u8> {
    let store = db.open(false).await?;
    let b = store.balance(&a.account).await?;
    let c = store.cost(&a.account).await?;
    let debt = store.debt(&a.account).await?;
    println!("account:     {} ({})", b.account, b.kind.as_str());
    println!("total:       {} credits = monthly {} + rollover {} + purchased {}", b.total, b.monthly, b.rollover, b.purchased);
    println!("held:        {} in {} open hold(s)", b.held, b.open_holds);
    println!("available:   {}", b.available);
    match b.next_expiry {
        Some(lot) => println!("next expiry: {} rollover credits at {}", lot.amount, time(lot.expires_at)),
        None => println!("next expiry: none"),
    }
    match b.plan {
        Some(p) => println!(
            "plan:        {} credits a month, period ends {} (anchor day {}){}",
            p.monthly_credits,
            time(p.period_end),
            p.anchor_day,
            if p.active { "" } else { ", cancelled: no renewal" }
        ),
        None => println!("plan:        none"),
    }
    let limit = |l: Option<i64>| l.map_or_else(|| "no limit".to_owned(), usd);
    println!("tier:        {}{}", c.tier, if c.org_member { " (organisation member)" } else { "" });
    println!("cost today:  {} of {}", usd(c.day_cost_micros), limit(c.limits.daily_cost_limit_micros));
    println!("cost month:  {} of {}", usd(c.month_cost_micros), limit(c.limits.monthly_cost_limit_micros));
    println!("in flight:   {}", usd(c.held_cost_micros));
    println!("requests:    {} in the last hour{}", c.requests_last_hour, c.limits.hourly_request_limit.map_or_else(String::new, |l| format!(" (limit {l})")));
    println!("risk:        {}", c.risk.as_str());
    match &c.throttle {
        Some(t) => println!("throttled:   yes, since {}, {}", time(t.since), throttle_reason(&t.reason)),
        None => println!("throttled:   no"),
    }
    println!("debt:        {debt} credits");
    Ok(0)
}

pub async fn history(db: &Db, a: HistoryArgs) -> CliResult<u8> {
    let mut q = HistoryQuery::new(a.account.clone());
    q.kinds = a.kinds;
    q.from = a.from;
    q.until = a.until;
    q.validate()?;
    let store = db.open(false).await?;
    let mut entries = Vec::new();
    let mut left = a.limit;
    while left > 0 {
        q.limit = left.min(MAX_PAGE);
        let page = store.history(&q).await?;
        left -= page.entries.len() as u32;
        entries.extend(page.entries);
        match page.next {
            Some(next) => q.before = Some(next),
            None => break,
        }
    }
    if a.csv {
        let mut w = csv::Writer::from_writer(std::io::stdout().lock());
        let io = |e: csv::Error| Fail::Failed(format!("writing CSV: {e}"));
        w.write_record(CSV_HEADER).map_err(io)?;
        for e in &entries {
            w.write_record(csv_row(e)).map_err(io)?;
        }
        w.flush().map_err(|e| Fail::Failed(format!("writing CSV: {e}")))?;
        return Ok(0);
    }
    if entries.is_empty() {
        println!("no entries");
        return Ok(0);
    }
    println!(
        "{:>7}  {:<24} {:<14} {:>8} {:>8} {:>9} {:>6} {:>8} {:>6}  reference",
        "id", "at", "kind", "monthly", "rollover", "purchased", "held", "balance", "source"
    );
    for e in &entries {
        let f = csv_row(e);
        println!("{:>7}  {:<24} {:<14} {:>8} {:>8} {:>9} {:>6} {:>8} {:>6}  {}", f[0], f[1], f[3], f[4], f[5], f[6], f[7], f[8], f[10], e.reference);
    }
    Ok(0)
}

pub async fn throttle(db: &Db, a: ThrottleArgs, on: bool) -> CliResult<u8> {
    let account = a.account.clone();
    let t = AdminThrottle { account: a.account, by: a.by, why: a.reason, key: a.key.unwrap_or_else(IdempotencyKey::generate) };
    let cmd = if on { Command::Throttle(t) } else { Command::Unthrottle(t) };
    cmd.validate()?;
    let store = db.open(false).await?;
    match store.execute(cmd).await? {
        Ok(c) if c.replayed => println!("already done with this key; nothing changed"),
        Ok(_) => println!("{} {account}", if on { "throttled" } else { "unthrottled" }),
        Err(Rejection::AlreadyThrottled) => println!("{account} is already throttled; nothing changed"),
        Err(Rejection::NotThrottled) => println!("{account} is not throttled; nothing changed"),
        Err(r) => return Err(refused(r)),
    }
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// jobs, tokens, verify

pub async fn job(db: &Db, name: JobName, quiet: bool) -> CliResult<u8> {
    let store = db.open(false).await?;
    let due = match name {
        JobName::ExpireHolds => store::Due::ExpiredHolds,
        JobName::ExpireRollover => store::Due::ExpiredCredits,
        JobName::MonthlyRollover => store::Due::Rollover,
        JobName::CostReset => store::Due::CostReset,
        JobName::RefreshAnalytics => {
            let spinner = progress::spinner(quiet, "refreshing analytics");
            let r = jobs::refresh_analytics(&*store).await;
            spinner.finish_and_clear();
            println!("job refresh-analytics: {} usage record(s) rolled up", r?.usage_records);
            return Ok(0);
        }
    };
    // The bar's length: the accounts due now (counted only when the bar is shown).
    let total = if progress::shown(quiet) { Some(progress::count_due(&*store, due).await?) } else { None };
    let bar = progress::bar(quiet, total, name.as_str());
    let counting: Arc<dyn Store> = Arc::new(Counting::new(store.clone(), bar.clone()));
    let report = match name {
        JobName::ExpireHolds => jobs::expire_holds(&*counting).await,
        JobName::ExpireRollover => jobs::expire_rollover(&*counting).await,
        JobName::MonthlyRollover => jobs::monthly_rollover(&*counting).await,
        JobName::CostReset => jobs::cost_reset(&*counting).await,
        JobName::RefreshAnalytics => unreachable!("handled above"),
    };
    bar.finish_and_clear();
    let r = report?;
    println!("job {}: {} account(s) due, {} applied, {} deferred (open holds), {} failed", name.as_str(), r.examined, r.applied, r.deferred, r.failed);
    for (account, error) in &r.errors {
        println!("  {account}: {error}");
    }
    if r.failed > r.errors.len() as u64 {
        println!("  ... and {} more", r.failed - r.errors.len() as u64);
    }
    Ok(if r.failed > 0 { 1 } else { 0 })
}

pub async fn mint_jwt(db: &Db, a: MintArgs) -> CliResult<u8> {
    let secret = match std::env::var("JWT_SECRET") {
        Ok(s) => s,
        Err(std::env::VarError::NotPresent) => {
            return Err(Fail::Usage(format!("JWT_SECRET is not set: the server's token secret, at least {MIN_SECRET_BYTES} bytes")));
        }
        Err(std::env::VarError::NotUnicode(_)) => return Err(Fail::Usage("JWT_SECRET is not valid UTF-8".into())),
    };
    let key =
        JwtKey::new(secret.as_bytes()).map_err(|_| Fail::Usage(format!("JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes; it has {}", secret.len())))?;
    if !a.no_account_check {
        let store = db.open(false).await?;
        store.balance(&a.account).await?;
    }
    let role = match a.role {
        RoleArg::User => Role::User,
        RoleArg::Admin => Role::Admin,
    };
    println!("{}", key.mint(&a.account, role, Utc::now(), a.ttl_secs)?);
    Ok(0)
}

pub async fn verify(db: &Db, quiet: bool) -> CliResult<u8> {
    let store = db.open(false).await?;
    let spinner = progress::spinner(quiet, "verifying the ledger");
    let r = store.verify().await;
    spinner.finish_and_clear();
    let r = r?;
    if r.is_clean() {
        println!("verify: {} account(s), {} log entries: clean", r.accounts, r.entries);
        return Ok(0);
    }
    println!("verify: {} account(s), {} log entries: {} discrepancies", r.accounts, r.entries, r.discrepancies.len());
    for d in &r.discrepancies {
        println!("  {}: {}: stored {}, from the log {}", d.account, d.what, d.stored, d.from_log);
    }
    eprintln!("error: the ledger does not match its log");
    Ok(1)
}
