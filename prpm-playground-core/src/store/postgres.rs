//! The PostgreSQL backend (in progress: schema and migrations so far). Many stateless app
//! nodes share one database; the schema lives in `migrations/postgres/`.

use tokio_postgres::Client;

use crate::error::{Error, Result};

mod embedded {
    refinery::embed_migrations!("../migrations/postgres");
}

/// The advisory lock every node takes while it migrates ("PRPM" and "MIGR"), so that nodes
/// starting at once migrate once: the others wait, then find nothing to do.
pub const MIGRATION_LOCK: i64 = 0x5052_504D_4D49_4752;

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => Error::Backend(format!("postgres: {} ({})", db.message(), db.code().code())),
            None => Error::Backend(format!("postgres: {e}")),
        }
    }
}

/// The schema version this code knows.
pub fn supported_version() -> i64 {
    embedded::migrations::runner().get_migrations().iter().map(|m| i64::from(m.version())).max().unwrap_or(0)
}

/// Applies pending migrations under [`MIGRATION_LOCK`]. Refuses a database migrated by a newer
/// version of this library. Returns the versions applied by this call.
pub async fn migrate(client: &mut Client) -> Result<Vec<i64>> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    let result = migrate_locked(client).await;
    let unlock = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn migrate_locked(client: &mut Client) -> Result<Vec<i64>> {
    let found: Option<i64> = match client.query_opt("SELECT max(version)::bigint FROM refinery_schema_history", &[]).await {
        Ok(row) => row.and_then(|r| r.get(0)),
        // No history table yet: a fresh database.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
        Err(e) => return Err(e.into()),
    };
    let supported = supported_version();
    if let Some(found) = found.filter(|f| *f > supported) {
        return Err(Error::SchemaTooNew { found, supported });
    }
    let report = embedded::migrations::runner()
        .set_abort_divergent(true)
        .set_abort_missing(true)
        .run_async(client)
        .await
        .map_err(|e| Error::Backend(format!("migration failed: {e}")))?;
    Ok(report.applied_migrations().iter().map(|m| i64::from(m.version())).collect())
}
