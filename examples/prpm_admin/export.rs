//! `export-usage`: usage records as CSV, for one account or all of them.

use std::io::Write;
use std::path::PathBuf;

use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt;
use prpm_playground_core::pricing::micros_to_usd;
use prpm_playground_core::store::MAX_PAGE;
use prpm_playground_core::{AccountId, CostFilter, Store, UsageRow};

use crate::progress;
use crate::{CliResult, Db, ExportArgs, Fail};

/// The CSV header row.
pub const HEADER: [&str; 12] = [
    "account",
    "at",
    "entry",
    "operation",
    "model",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "tokens",
    "credits",
    "cost_usd",
];

/// Accounts whose usage is read at once.
const CONCURRENCY: usize = 8;

/// Free text that a spreadsheet would read as a formula gets a leading `'` (as the library's
/// history export does).
fn defuse(s: &str) -> String {
    if s.starts_with(['=', '+', '-', '@']) { format!("'{s}") } else { s.to_owned() }
}

/// One usage record as CSV fields; the cost is exact USD (micro-dollar precision).
pub fn row(r: &UsageRow) -> [String; 12] {
    let t = &r.usage.tokens;
    [
        defuse(r.account.as_str()),
        r.at.to_rfc3339_opts(SecondsFormat::Millis, true),
        r.entry.0.to_string(),
        defuse(&r.usage.operation),
        defuse(&r.usage.model),
        t.input.to_string(),
        t.output.to_string(),
        t.cache_read.to_string(),
        t.cache_write.to_string(),
        t.total().to_string(),
        r.credits.to_string(),
        micros_to_usd(r.usage.cost_micros).to_string(),
    ]
}

/// Where the CSV goes: stdout, or a temporary file next to the destination that replaces it
/// once the export is complete (an export that fails leaves no file behind).
enum Out {
    Stdout,
    File { tmp: PathBuf, dest: PathBuf },
}

impl Out {
    fn open(out: &str) -> CliResult<(Out, Box<dyn Write>)> {
        if out == "-" {
            return Ok((Out::Stdout, Box::new(std::io::BufWriter::new(std::io::stdout().lock()))));
        }
        let dest = PathBuf::from(out);
        let name = dest.file_name().ok_or_else(|| Fail::Usage(format!("--out {out} names no file")))?.to_string_lossy().into_owned();
        let tmp = dest.with_file_name(format!(".{name}.partial-{}", std::process::id()));
        let file = std::fs::File::create(&tmp).map_err(|e| Fail::Failed(format!("{}: {e}", tmp.display())))?;
        Ok((Out::File { tmp, dest }, Box::new(std::io::BufWriter::new(file))))
    }

    fn commit(self) -> CliResult {
        if let Out::File { tmp, dest } = self {
            std::fs::rename(&tmp, &dest).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                Fail::Failed(format!("{}: {e}", dest.display()))
            })?;
        }
        Ok(())
    }

    fn abort(self) {
        if let Out::File { tmp, .. } = self {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Every account, by id (pages of [`Store::cost_accounts`]).
async fn all_accounts(store: &dyn Store, quiet: bool) -> CliResult<Vec<AccountId>> {
    let spinner = progress::spinner(quiet, "listing the accounts");
    let mut accounts = Vec::new();
    loop {
        let page = store.cost_accounts(CostFilter::All, accounts.last(), MAX_PAGE).await?;
        let full = page.len() == MAX_PAGE as usize;
        accounts.extend(page.into_iter().map(|v| v.account));
        spinner.set_message(format!("listing the accounts: {}", accounts.len()));
        if !full {
            break;
        }
    }
    spinner.finish_and_clear();
    Ok(accounts)
}

struct Written {
    rows: u64,
    accounts: u64,
}

/// An account's usage records in `[from, until)`, oldest first: pages of
/// [`Store::usage_before`], newest first, until a page reaches past `from` or the records end.
async fn account_usage(store: &dyn Store, account: &AccountId, from: Option<DateTime<Utc>>, until: Option<DateTime<Utc>>) -> CliResult<Vec<UsageRow>> {
    let mut rows = Vec::new();
    let mut before = None;
    loop {
        let page = store.usage_before(account, before, MAX_PAGE).await?;
        let full = page.len() == MAX_PAGE as usize;
        let reached_from = page.last().is_some_and(|r| from.is_some_and(|f| r.at < f));
        before = page.last().map(|r| r.entry);
        rows.extend(page.into_iter().filter(|r| from.is_none_or(|f| r.at >= f) && until.is_none_or(|u| r.at < u)));
        if !full || reached_from {
            break;
        }
    }
    rows.reverse();
    Ok(rows)
}

async fn write_csv(
    store: &dyn Store,
    accounts: &[AccountId],
    from: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    out: &mut dyn Write,
    quiet: bool,
) -> CliResult<Written> {
    let io = |e: csv::Error| Fail::Failed(format!("writing CSV: {e}"));
    let mut w = csv::Writer::from_writer(out);
    w.write_record(HEADER).map_err(io)?;
    let bar = progress::bar(quiet, Some(accounts.len() as u64), "exporting usage");
    let mut pages = futures_util::stream::iter(accounts).map(|a| account_usage(store, a, from, until)).buffered(CONCURRENCY);
    let mut written = Written { rows: 0, accounts: 0 };
    while let Some(rows) = pages.next().await {
        let rows = rows?;
        for r in &rows {
            w.write_record(row(r)).map_err(io)?;
        }
        written.rows += rows.len() as u64;
        written.accounts += u64::from(!rows.is_empty());
        bar.inc(1);
    }
    bar.finish_and_clear();
    w.flush().map_err(|e| Fail::Failed(format!("writing CSV: {e}")))?;
    Ok(written)
}

pub async fn export_usage(db: &Db, a: ExportArgs, quiet: bool) -> CliResult<u8> {
    if let (Some(f), Some(u)) = (a.from, a.until)
        && f > u
    {
        return Err(Fail::Usage("--from is after --until".into()));
    }
    let store = db.open(false).await?;
    let accounts = match &a.account {
        Some(account) => {
            // An unknown account fails here, before any file is created.
            store.balance(account).await?;
            vec![account.clone()]
        }
        None => all_accounts(&*store, quiet).await?,
    };
    let (out, mut writer) = Out::open(&a.out)?;
    let result = write_csv(&*store, &accounts, a.from, a.until, &mut *writer, quiet).await;
    let flushed = writer.flush().map_err(|e| Fail::Failed(format!("writing CSV: {e}")));
    drop(writer);
    match result.and_then(|w| flushed.map(|()| w)) {
        Ok(w) => {
            out.commit()?;
            if !quiet {
                eprintln!("exported {} usage record(s) of {} account(s) to {}", w.rows, w.accounts, if a.out == "-" { "stdout" } else { &a.out });
            }
            Ok(0)
        }
        Err(e) => {
            out.abort();
            Err(e)
        }
    }
}
