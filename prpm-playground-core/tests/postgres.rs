//! The PostgreSQL schema on a real, throw-away cluster (see `pg_cluster`): migrations applied
//! once under an advisory lock by nodes starting together, the seeded tiers, the append-only
//! log, and refusing a newer schema. Skips with one line when PostgreSQL is not installed,
//! unless `PRPM_REQUIRE_POSTGRES=1` (CI), where a missing PostgreSQL fails.

use prpm_playground_core::Error;
use prpm_playground_core::cost::{TierLimits, TierTable};
use prpm_playground_core::pg_cluster::PgCluster;
use prpm_playground_core::store::postgres;

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

#[test]
fn postgres_schema() {
    let cluster = match PgCluster::start() {
        Ok(Some(c)) => c,
        Ok(None) => {
            eprintln!("SKIPPED postgres tests: PostgreSQL is not installed here (CI installs it and sets PRPM_REQUIRE_POSTGRES=1)");
            return;
        }
        Err(e) => panic!("cannot start a PostgreSQL cluster: {e}"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        // Four nodes start at once on a fresh database: one migrates, the others find it done.
        let url = cluster.create_database().await.unwrap();
        let nodes = (0..4).map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut c = connect(&url).await;
                postgres::migrate(&mut c).await.unwrap()
            })
        });
        let applied: Vec<Vec<i64>> = futures_util::future::join_all(nodes).await.into_iter().map(|r| r.unwrap()).collect();
        let mut applied_by: Vec<_> = applied.iter().filter(|a| !a.is_empty()).collect();
        assert_eq!(applied_by.len(), 1, "exactly one node migrates: {applied:?}");
        assert_eq!(applied_by.pop().unwrap().last(), Some(&postgres::supported_version()));

        let mut c = connect(&url).await;
        assert!(postgres::migrate(&mut c).await.unwrap().is_empty(), "a second run applies nothing");

        // The tiers are the spec's.
        let rows = c
            .query(
                "SELECT name, monthly_revenue_micros, monthly_cost_limit_micros, daily_cost_limit_micros, hourly_request_limit, alert_threshold_pct, throttle_on_exceed
                 FROM cost_tiers ORDER BY name",
                &[],
            )
            .await
            .unwrap();
        let tiers = TierTable::from_tiers(rows.iter().map(|r| TierLimits {
            name: r.get(0),
            monthly_revenue_micros: r.get(1),
            monthly_cost_limit_micros: r.get(2),
            daily_cost_limit_micros: r.get(3),
            hourly_request_limit: r.get::<_, Option<i32>>(4).map(|v| v as u32),
            alert_threshold_pct: r.get::<_, Option<i32>>(5).map(|v| v as u32),
            throttle_on_exceed: r.get(6),
        }))
        .unwrap();
        assert_eq!(tiers, TierTable::default());

        // The log is append-only.
        c.batch_execute(
            "INSERT INTO accounts (external_id, kind, monthly, rollover, purchased, held, created_at, updated_at) VALUES ('u', 'user', 0, 0, 5, 0, now(), now());
             INSERT INTO ledger_entries (account_id, at, kind, d_monthly, d_rollover, d_purchased, d_held, balance_after, held_after, reference)
                 SELECT id, now(), 'grant', 0, 0, 5, 0, 5, 0, 'signup' FROM accounts;",
        )
        .await
        .unwrap();
        for sql in ["UPDATE ledger_entries SET d_purchased = 500", "DELETE FROM ledger_entries"] {
            let e = c.batch_execute(sql).await.unwrap_err();
            let message = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
            assert!(message.contains("append-only"), "{sql}: {e:?}");
        }

        // A database migrated by a newer version is refused, untouched.
        c.batch_execute("INSERT INTO refinery_schema_history (version, name, applied_on, checksum) VALUES (99, 'from_the_future', '2030-01-01T00:00:00Z', '1')")
            .await
            .unwrap();
        match postgres::migrate(&mut c).await {
            Err(Error::SchemaTooNew { found: 99, supported }) => assert_eq!(supported, postgres::supported_version()),
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    });
}
