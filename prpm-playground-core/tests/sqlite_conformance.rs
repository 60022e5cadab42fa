//! The conformance suite on the SQLite backend, as a WAL file and in memory.

use std::sync::Arc;

use prpm_playground_core::conformance::TestStore;
use prpm_playground_core::{LedgerConfig, ManualClock, SqliteOptions, SqliteStore};

async fn open_file(ledger: LedgerConfig, clock: Arc<ManualClock>) -> TestStore {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_with(SqliteOptions::file(dir.path().join("ledger.db")).clock(clock).ledger(ledger)).unwrap();
    TestStore { store: Arc::new(store), guard: Box::new(dir) }
}

async fn open_memory(ledger: LedgerConfig, clock: Arc<ManualClock>) -> TestStore {
    let store = SqliteStore::open_with(SqliteOptions::memory().clock(clock).ledger(ledger)).unwrap();
    TestStore { store: Arc::new(store), guard: Box::new(()) }
}

mod file {
    use super::*;
    prpm_playground_core::conformance_suite!(open_file);
}

mod memory {
    use super::*;
    prpm_playground_core::conformance_suite!(open_memory);
}
