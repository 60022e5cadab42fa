//! `prpm-server`: the HTTP surface of prpm-playground, what a self-hoster runs.
//!
//! Configured from the environment (a `.env` file is read if present; `.env.example` lists
//! every variable). SQLite file by default, PostgreSQL when `DATABASE_URL` is a postgres URL.
//! Runs the maintenance jobs at their UTC times, serves `/healthz`, `/metrics` (admin),
//! `/openapi.json` and the admin dashboard (`/admin`), and on SIGINT/SIGTERM stops taking
//! requests and waits for runs in flight to settle or release their holds.

mod api;
mod error;
mod metrics;
mod scheduler;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use prpm_playground_core::auth::JwtKey;
use prpm_playground_core::billing::{Billing, BillingConfig};
use prpm_playground_core::playground::{Playground, PlaygroundConfig, StorePackages};
use prpm_playground_core::pricing::{PriceTable, Pricing};
use prpm_playground_core::provider::{ClientConfig, ProviderClient};
use prpm_playground_core::{Clock, LedgerConfig, ManualClock, Store, SystemClock};

/// Everything read from the environment.
struct Config {
    database_url: String,
    bind: SocketAddr,
    jwt: JwtKey,
    frontend_url: Option<String>,
    billing: Option<BillingConfig>,
    price_table: Option<String>,
    scheduler: bool,
    /// `PRPM_TEST_CLOCK=1`: a settable clock (admin route), for end-to-end tests only,
    /// starting at `PRPM_TEST_CLOCK_START` (RFC 3339) or now.
    test_clock: Option<chrono::DateTime<chrono::Utc>>,
    max_body_bytes: usize,
    shutdown_grace: Duration,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

impl Config {
    fn from_env() -> Result<Config, String> {
        let bind = var("BIND_ADDR").unwrap_or_else(|| "127.0.0.1:3000".into());
        let bind: SocketAddr = bind.parse().map_err(|e| format!("BIND_ADDR {bind:?}: {e}"))?;
        let secret = var("JWT_SECRET").ok_or("JWT_SECRET must be set (at least 32 bytes)")?;
        let jwt = JwtKey::new(secret.as_bytes()).map_err(|e| format!("JWT_SECRET: {e}"))?;
        let billing = BillingConfig::from_env().map_err(|e| format!("Stripe configuration: {e}"))?;
        let flag = |name: &str, default: bool| match var(name).as_deref() {
            None => Ok(default),
            Some("1" | "true" | "on" | "yes") => Ok(true),
            Some("0" | "false" | "off" | "no") => Ok(false),
            Some(other) => Err(format!("{name}={other:?}: use 1 or 0")),
        };
        let num = |name: &str, default: u64| var(name).map_or(Ok(default), |v| v.parse::<u64>().map_err(|e| format!("{name}: {e}")));
        Ok(Config {
            database_url: var("DATABASE_URL").unwrap_or_else(|| "prpm-playground.db".into()),
            bind,
            jwt,
            frontend_url: var("FRONTEND_URL"),
            billing,
            price_table: var("PRPM_PRICE_TABLE"),
            scheduler: flag("PRPM_SCHEDULER", true)?,
            test_clock: if flag("PRPM_TEST_CLOCK", false)? {
                Some(match var("PRPM_TEST_CLOCK_START") {
                    Some(t) => chrono::DateTime::parse_from_rfc3339(&t).map_err(|e| format!("PRPM_TEST_CLOCK_START: {e}"))?.with_timezone(&chrono::Utc),
                    None => chrono::Utc::now(),
                })
            } else {
                None
            },
            max_body_bytes: num("PRPM_MAX_BODY_BYTES", 1 << 20)? as usize,
            shutdown_grace: Duration::from_secs(num("PRPM_SHUTDOWN_GRACE_SECS", 30)?),
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let dotenv = dotenvy::dotenv();
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| "info".into());
    if var("PRPM_LOG_FORMAT").as_deref() == Some("json") {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).json().init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    if let Ok(path) = dotenv {
        tracing::info!(path = %path.display(), "read .env");
    }
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("configuration: {e}");
            return ExitCode::from(2);
        }
    };
    match serve(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cfg: Config) -> Result<(), String> {
    let manual = cfg.test_clock.map(|start| Arc::new(ManualClock::new(start)));
    let clock: Arc<dyn Clock> = match &manual {
        Some(m) => m.clone(),
        None => Arc::new(SystemClock),
    };
    let store: Arc<dyn Store> =
        prpm_playground_core::store::open_url(&cfg.database_url, clock.clone(), LedgerConfig::default()).await.map_err(|e| format!("database: {e}"))?;
    let mut pricing = Pricing::default();
    if let Some(path) = &cfg.price_table {
        pricing.table = PriceTable::load(path).map_err(|e| format!("PRPM_PRICE_TABLE: {e}"))?;
    }
    let billing = cfg.billing.clone().map(|b| Billing::new(store.clone(), b)).transpose().map_err(|e| format!("billing: {e}"))?;
    let check_debt = billing.as_ref().is_some_and(|b| b.config().refund_policy == prpm_playground_core::billing::RefundPolicy::Debt);
    let mut play = Playground::new(store.clone(), pricing, Arc::new(StorePackages(store.clone())))
        .with_config(PlaygroundConfig { check_debt, ..PlaygroundConfig::default() });
    let mut providers = Vec::new();
    for p in [
        prpm_playground_core::pricing::Provider::Anthropic,
        prpm_playground_core::pricing::Provider::Openai,
        prpm_playground_core::pricing::Provider::OpenaiCompatible,
    ] {
        if let Some(c) = ClientConfig::from_env(p).map_err(|e| format!("provider {p:?}: {e}"))? {
            play = play.with_client(ProviderClient::new(c).map_err(|e| format!("provider {p:?}: {e}"))?);
            providers.push(format!("{p:?}"));
        }
    }
    let state = Arc::new(api::AppState::new(store.clone(), play, billing, cfg.jwt.clone(), clock, manual));
    let app = api::router(state.clone(), cfg.frontend_url.as_deref(), cfg.max_body_bytes);

    let listener = tokio::net::TcpListener::bind(cfg.bind).await.map_err(|e| format!("bind {}: {e}", cfg.bind))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    // Tests read this line to find the port when BIND_ADDR asks for port 0.
    println!("listening on http://{local}");
    tracing::info!(%local, database = %redact(&cfg.database_url), ?providers, stripe = cfg.billing.is_some(), "prpm-server started");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let jobs = cfg.scheduler.then(|| tokio::spawn(scheduler::run(state.clone(), stop_rx.clone())));
    let shutdown = async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new requests; waiting for runs in flight");
        let _ = stop_tx.send(true);
    };
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| format!("server: {e}"))?;
    // Streams the clients dropped are still settling on their own tasks: wait for them.
    if !state.play.wait_idle(cfg.shutdown_grace).await {
        tracing::warn!(left = state.play.runs_in_flight(), "runs still in flight after the grace period; their holds expire on their own");
    }
    if let Some(j) = jobs {
        let _ = j.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// A database URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
