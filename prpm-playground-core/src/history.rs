//! The transaction log as CSV.

use std::io::Write;

use crate::error::{Error, Result};
use crate::store::{Entry, HistoryQuery, MAX_PAGE, Store};

/// The CSV header row.
pub const CSV_HEADER: [&str; 15] = [
    "id",
    "at",
    "account",
    "kind",
    "monthly",
    "rollover",
    "purchased",
    "held",
    "balance_after",
    "held_after",
    "source",
    "hold",
    "ref_entry",
    "reference",
    "rollover_expires_at",
];

/// Writes every entry matching `query` (newest first, all pages) as CSV; returns the row count.
pub async fn export_csv<W: Write>(store: &dyn Store, query: &HistoryQuery, out: W) -> Result<u64> {
    let mut w = csv::Writer::from_writer(out);
    let io = |e: csv::Error| Error::Backend(format!("csv: {e}"));
    w.write_record(CSV_HEADER).map_err(io)?;
    let mut q = query.clone();
    q.limit = MAX_PAGE;
    let mut rows = 0u64;
    loop {
        let page = store.history(&q).await?;
        for e in &page.entries {
            w.write_record(csv_row(e)).map_err(io)?;
            rows += 1;
        }
        match page.next {
            Some(next) => q.before = Some(next),
            None => break,
        }
    }
    w.flush().map_err(|e| Error::Backend(format!("csv: {e}")))?;
    Ok(rows)
}

/// One entry as CSV fields. Free text that a spreadsheet would read as a formula is prefixed
/// with `'`.
pub fn csv_row(e: &Entry) -> [String; 15] {
    let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
    [
        e.id.0.to_string(),
        e.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        defuse(e.account.as_str()),
        e.kind.as_str().to_owned(),
        e.delta.monthly.to_string(),
        e.delta.rollover.to_string(),
        e.delta.purchased.to_string(),
        e.held_delta.to_string(),
        e.balance_after.to_string(),
        e.held_after.to_string(),
        e.source.map(|s| s.as_str().to_owned()).unwrap_or_default(),
        opt(e.hold.map(|h| h.0)),
        opt(e.ref_entry.map(|r| r.0)),
        defuse(&e.reference),
        e.rollover_expires_at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)).unwrap_or_default(),
    ]
}

fn defuse(s: &str) -> String {
    if s.starts_with(['=', '+', '-', '@']) { format!("'{s}") } else { s.to_owned() }
}
