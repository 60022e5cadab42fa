//! One app node of a multi-node deployment, for the cross-process test and for trying it by
//! hand: opens the store at `DATABASE_URL` (PostgreSQL, or a SQLite file path), then `tasks`
//! concurrent tasks each spend `spends` times from the hot account `hot` (1 to 3 credits) and
//! from the shared accounts `a0..a19`, and try three holds on `limited` (a free-tier user, ten
//! requests an hour). Prints `SPENT <credits taken from hot> ADMITTED <holds on limited>`.
//!
//! ```text
//! DATABASE_URL=postgres://... cargo run --example spend_node -- <node-id> [tasks] [spends]
//! ```

use std::sync::Arc;

use prpm_playground_core::conformance::cost_hold;
use prpm_playground_core::store::postgres::{PgOptions, PgStore};
use prpm_playground_core::*;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let node = args.get(1).cloned().ok_or("usage: spend_node <node-id> [tasks] [spends]")?;
    let tasks: usize = args.get(2).map_or(Ok(8), |s| s.parse())?;
    let spends: usize = args.get(3).map_or(Ok(25), |s| s.parse())?;
    let url = std::env::var("DATABASE_URL")?;
    let store: Arc<dyn Store> = if prpm_playground_core::store::postgres::is_postgres_url(&url) {
        Arc::new(PgStore::open(PgOptions::new(url).pool_size(8)).await?)
    } else {
        Arc::new(SqliteStore::open(&url)?)
    };
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let store = store.clone();
            let node = node.clone();
            tokio::spawn(async move {
                let (mut spent, mut admitted) = (0i64, 0u32);
                for i in 0..spends {
                    let amount = 1 + (i % 3) as i64;
                    let hot = i % 2 == 0;
                    let account = AccountId::new(if hot { "hot".to_string() } else { format!("a{}", (t * 7 + i) % 20) })?;
                    let spend = Spend { account, amount, usage: None, reference: "node".into(), key: IdempotencyKey::new(format!("n{node}-t{t}-{i}"))? };
                    match store.spend(spend).await? {
                        Ok(_) if hot => spent += amount,
                        Ok(_) | Err(Rejection::InsufficientCredits { .. }) => {}
                        Err(other) => return Err(format!("unexpected {other:?}").into()),
                    }
                }
                for i in 0..3 {
                    match store.hold(cost_hold(&AccountId::new("limited")?, 1, 0, &format!("l{node}-t{t}-{i}"))).await? {
                        Ok(_) => admitted += 1,
                        Err(Rejection::RateLimited { limit: 10, .. }) => {}
                        Err(other) => return Err(format!("unexpected {other:?}").into()),
                    }
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((spent, admitted))
            })
        })
        .collect();
    let (mut spent, mut admitted) = (0, 0);
    for h in handles {
        let (s, a) = h.await?.map_err(|e| e.to_string())?;
        spent += s;
        admitted += a;
    }
    println!("SPENT {spent} ADMITTED {admitted}");
    Ok(())
}
