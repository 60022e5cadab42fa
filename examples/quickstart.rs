//! The main job on the embedded SQLite default: open a database file, create an account,
//! grant a credit pack, estimate a run, hold its worst case (credits and cost, admitted by the
//! account's tier limits), settle the actual usage, and print the balance, the cost-control
//! state and the log.
//!
//! ```text
//! cargo run --example quickstart [-- path/to/ledger.db]
//! ```
//!
//! Environment: `PRPM_DATABASE` (the SQLite file, default `prpm-playground.db`), or
//! `DATABASE_URL` (a PostgreSQL URL: the same job on PostgreSQL),
//! `PRPM_PRICE_TABLE` (a TOML or JSON price table; default: the built-in one).
//! Running it again is safe: the account and the pack are keyed, so only a new run is added.

use std::sync::Arc;

use prpm_playground_core::history::csv_row;
use prpm_playground_core::pricing::micros_to_usd;
use prpm_playground_core::store::HistoryQuery;
use prpm_playground_core::*;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).or_else(|| std::env::var("PRPM_DATABASE").ok()).unwrap_or_else(|| "prpm-playground.db".into());
    let pricing = match std::env::var("PRPM_PRICE_TABLE") {
        Ok(file) => Pricing::with_table(PriceTable::load(file)?),
        Err(_) => Pricing::default(),
    };
    // `DATABASE_URL=postgres://...` (or `host=... dbname=...`) runs the same job on PostgreSQL.
    let store: Arc<dyn Store> = match std::env::var("DATABASE_URL") {
        Ok(url) if prpm_playground_core::store::postgres::is_postgres_url(&url) => {
            println!("database: PostgreSQL");
            Arc::new(prpm_playground_core::store::postgres::PgStore::open(prpm_playground_core::store::postgres::PgOptions::new(url)).await?)
        }
        _ => {
            println!("database: {path} (SQLite, WAL)");
            Arc::new(SqliteStore::open(&path)?)
        }
    };

    // 1. An account: 5 free credits on creation.
    let alice = AccountId::new("alice")?;
    match store.create_account(alice.clone(), AccountKind::User, IdempotencyKey::new("signup:alice")?).await? {
        Ok(c) if c.replayed => println!("account alice exists already"),
        Ok(c) => println!("created account alice: {:?}", c.effect.balances()),
        Err(rejection) => println!("account alice: {rejection}"),
    }

    // 2. A purchase of the small pack (100 credits), keyed by its purchase id: credited once.
    let pack = Grant {
        account: alice.clone(),
        bucket: Bucket::Purchased,
        amount: 100,
        source: GrantSource::Purchase,
        expires_at: None,
        reference: "purchase:demo-small-pack".into(),
        key: IdempotencyKey::new("purchase:demo-small-pack")?,
    };
    let granted = store.grant(pack).await?.map_err(|r| format!("grant refused: {r}"))?;
    println!("small pack (100 credits): {}", if granted.replayed { "already credited" } else { "credited" });

    // 3. Estimate a run before it happens.
    let model = "claude-sonnet-4-5";
    let estimate =
        pricing.estimate(&EstimateRequest { model: model.into(), input_tokens: 1_800, max_output_tokens: Some(4_096), expected_output_tokens: None })?;
    println!(
        "estimate for {model}: ~{} credits (at most {}), ~${} (at most ${}){}",
        estimate.expected.credits,
        estimate.worst_case.credits,
        micros_to_usd(estimate.expected.cost_micros),
        micros_to_usd(estimate.worst_case.cost_micros),
        if estimate.expensive { " (expensive run)" } else { "" }
    );

    // 4. Hold the worst case, run, settle the actual usage.
    let run_id = format!("run-{}", chrono::Utc::now().timestamp_micros());
    let hold = Hold {
        account: alice.clone(),
        amount: estimate.worst_case.credits as i64,
        ttl_secs: 600,
        // The worst-case provider cost: admission checks it against the tier's limits.
        cost_micros: estimate.worst_case.cost_micros,
        reference: run_id.clone(),
        key: IdempotencyKey::new(format!("hold:{run_id}"))?,
    };
    let held = match store.hold(hold).await? {
        Ok(Committed { effect: Effect::Held { hold, amount, .. }, .. }) => {
            println!("held {amount} credits for {run_id}");
            Some(hold)
        }
        Ok(other) => return Err(format!("unexpected {other:?}").into()),
        // Cost control at work (e.g. the free tier's daily $0.10 after a few runs today):
        // nothing was charged.
        Err(rejection) => {
            println!("run refused ({}): {rejection}", rejection.code());
            None
        }
    };
    if let Some(hold_id) = held {
        // The provider's reported usage (a real run gets it from the API response).
        let tokens = TokenUsage { input: 1_800, output: 612, cache_read: 0, cache_write: 0 };
        let quote = pricing.price_usage(model, &tokens)?;
        let settle = Settle {
            hold: hold_id,
            credits: quote.credits as i64,
            usage: Some(Usage { operation: "playground_run".into(), model: model.into(), tokens, cost_micros: quote.cost_micros }),
            key: IdempotencyKey::new(format!("settle:{run_id}"))?,
        };
        match store.settle(settle).await? {
            Ok(Committed { effect: Effect::Settled { charged, released, .. }, .. }) => println!(
                "settled {run_id}: {} tokens, {} credits charged (monthly {}, rollover {}, purchased {}), {released} released, cost ${}",
                tokens.total(),
                charged.total(),
                charged.monthly,
                charged.rollover,
                charged.purchased,
                micros_to_usd(quote.cost_micros)
            ),
            other => return Err(format!("settle: {other:?}").into()),
        }
    }

    // 5. The balance and the log.
    let b = store.balance(&alice).await?;
    println!(
        "\nbalance of alice: total {} (monthly {}, rollover {}, purchased {}), held {}, available {}",
        b.total, b.monthly, b.rollover, b.purchased, b.held, b.available
    );
    let c = store.cost(&alice).await?;
    println!(
        "cost control: tier {}, today ${} of ${}, this month ${} of ${}, {} requests in the last hour, risk {}{}",
        c.tier,
        micros_to_usd(c.day_cost_micros),
        c.limits.daily_cost_limit_micros.map_or("-".into(), |l| micros_to_usd(l).to_string()),
        micros_to_usd(c.month_cost_micros),
        c.limits.monthly_cost_limit_micros.map_or("-".into(), |l| micros_to_usd(l).to_string()),
        c.requests_last_hour,
        c.risk.as_str(),
        c.throttle.as_ref().map_or(String::new(), |t| format!(", throttled: {:?}", t.reason))
    );
    let mut q = HistoryQuery::new(alice.clone());
    q.limit = 10;
    println!("\nlast {} log entries (newest first):", q.limit);
    println!("{:>5}  {:<24} {:<10} {:>8} {:>8} {:>9} {:>6} {:>8}  reference", "id", "at", "kind", "monthly", "rollover", "purchased", "held", "balance");
    for e in store.history(&q).await?.entries {
        let f = csv_row(&e);
        println!("{:>5}  {:<24} {:<10} {:>8} {:>8} {:>9} {:>6} {:>8}  {}", f[0], f[1], f[3], f[4], f[5], f[6], f[7], f[8], e.reference);
    }
    let report = store.verify().await?;
    println!("\nverify: {} accounts, {} entries, {}", report.accounts, report.entries, if report.is_clean() { "clean" } else { "DIFFERENCES FOUND" });
    if !report.is_clean() {
        return Err(format!("{:?}", report.discrepancies).into());
    }
    Ok(())
}
