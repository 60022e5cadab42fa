//! Several OS processes on one SQLite file: each opens its own store (its own writer and
//! cache) and spends from one hot account; nothing is overspent and `verify()` is clean.
//!
//! The test re-runs its own binary as the worker processes (the `worker` test below does
//! nothing unless `PRPM_WORKER_DB` is set).

use std::process::Command as Process;
use std::sync::Arc;

use prpm_playground_core::conformance::{acct, create_user, grant, spend_cmd};
use prpm_playground_core::*;

const PROCESSES: usize = 3;
const TASKS: usize = 8;
const SPENDS_PER_TASK: usize = 25;

#[test]
fn worker() {
    let Ok(path) = std::env::var("PRPM_WORKER_DB") else {
        return;
    };
    let id = std::env::var("PRPM_WORKER_ID").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let spent: i64 = rt.block_on(async {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let store = store.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    let mut spent = 0;
                    for i in 0..SPENDS_PER_TASK {
                        let amount = 1 + (i % 3) as i64;
                        match store.spend(spend_cmd(&acct("hot"), amount, &format!("p{id}-t{t}-{i}"))).await.unwrap() {
                            Ok(_) => spent += amount,
                            Err(Rejection::InsufficientCredits { .. }) => {}
                            Err(other) => panic!("{other:?}"),
                        }
                    }
                    spent
                })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total
    });
    println!("SPENT {spent}");
}

#[test]
fn processes_share_one_file_without_overspending() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    rt.block_on(async {
        let hot = create_user(&*store, "hot").await;
        grant(&*store, &hot, Bucket::Purchased, 295, None, "g").await; // 300 credits
    });
    // This process keeps its store open (and its cache warm) while the others write.
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|p| {
            Process::new(&exe)
                .args(["worker", "--exact", "--nocapture", "--test-threads=1"])
                .env("PRPM_WORKER_DB", &path)
                .env("PRPM_WORKER_ID", p.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut spent = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "worker failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        // libtest prints the worker's line after "test worker ... ".
        let total =
            stdout.split("SPENT ").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap_or_else(|| panic!("no total from the worker: {stdout}"));
        spent += total.parse::<i64>().unwrap();
    }
    rt.block_on(async {
        let b = store.balance(&acct("hot")).await.unwrap();
        assert_eq!(spent + b.total, 300, "spent {spent}, left {}", b.total);
        // Demand (3 x 8 x 50 credits) is far above supply.
        assert!(b.total < 3, "credits left while callers were refused: {}", b.total);
        // The first process's cached state is stale; its next spend must see the truth.
        let r = store.spend(spend_cmd(&acct("hot"), 3, "after")).await.unwrap();
        assert!(matches!(r, Err(Rejection::InsufficientCredits { available, .. }) if available == b.total), "{r:?}");
        let report = store.verify().await.unwrap();
        assert!(report.is_clean(), "{:?}", report.discrepancies);
    });
}
