//! The conformance suite on PostgreSQL: one throw-away cluster for this test binary, one fresh
//! database per test. Without PostgreSQL installed each test skips with one line, unless
//! `PRPM_REQUIRE_POSTGRES=1` (CI), where that fails.

use std::sync::Arc;

use prpm_playground_core::conformance::TestStore;
use prpm_playground_core::pg_cluster::PgCluster;
use prpm_playground_core::store::postgres::{PgOptions, PgStore};
use prpm_playground_core::{LedgerConfig, ManualClock};

async fn open_pg(ledger: LedgerConfig, clock: Arc<ManualClock>) -> Option<TestStore> {
    let cluster = match PgCluster::shared() {
        Ok(Some(c)) => c,
        Ok(None) => {
            eprintln!("SKIPPED: PostgreSQL is not installed here (CI installs it and sets PRPM_REQUIRE_POSTGRES=1)");
            return None;
        }
        Err(e) => panic!("cannot start a PostgreSQL cluster: {e}"),
    };
    let url = cluster.create_database().await.expect("create database");
    let store = PgStore::open(PgOptions::new(url).clock(clock).ledger(ledger).pool_size(8)).await.expect("open");
    Some(TestStore { store: Arc::new(store), guard: Box::new(()) })
}

prpm_playground_core::conformance_suite!(skippable open_pg);
