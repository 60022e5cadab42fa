//! The conformance suite on the SQLite backend, as a WAL file (also with a history index
//! batch of three entries) and in memory.

use std::sync::Arc;

use prpm_playground_core::conformance::TestStore;
use prpm_playground_core::{LedgerConfig, ManualClock, SqliteOptions, SqliteStore};

async fn open_file(ledger: LedgerConfig, clock: Arc<ManualClock>) -> TestStore {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_with(SqliteOptions::file(dir.path().join("ledger.db")).clock(clock).ledger(ledger)).unwrap();
    TestStore { store: Arc::new(store), guard: Box::new(dir) }
}

/// Indexes the log by account every three entries, so the suite's history reads cross the
/// border between the indexed log and its scanned tail.
async fn open_file_small_index_batch(ledger: LedgerConfig, clock: Arc<ManualClock>) -> TestStore {
    let dir = tempfile::tempdir().unwrap();
    let opts = SqliteOptions::file(dir.path().join("ledger.db")).clock(clock).ledger(ledger).history_index_batch(3);
    TestStore { store: Arc::new(SqliteStore::open_with(opts).unwrap()), guard: Box::new(dir) }
}

async fn open_memory(ledger: LedgerConfig, clock: Arc<ManualClock>) -> TestStore {
    let store = SqliteStore::open_with(SqliteOptions::memory().clock(clock).ledger(ledger)).unwrap();
    TestStore { store: Arc::new(store), guard: Box::new(()) }
}

mod file {
    use super::*;
    prpm_playground_core::conformance_suite!(open_file);
}

mod file_small_index_batch {
    use super::*;
    prpm_playground_core::conformance_suite!(open_file_small_index_batch);
}

mod memory {
    use super::*;
    prpm_playground_core::conformance_suite!(open_memory);
}
