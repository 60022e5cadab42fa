//! Several OS processes of the example binary `spend_node` (`examples/spend_node.rs`, also a
//! binary target so that cargo builds it for this test), each its own app node with its own
//! pool, on one PostgreSQL database: a hot account shared by all (as an organisation pool would
//! be) is never overspent, the hourly limit of a free user is exact across processes, and
//! `verify()` is clean. Skips with one line without PostgreSQL, unless `PRPM_REQUIRE_POSTGRES=1`.

use std::process::Command;
use std::sync::Arc;

use prpm_playground_core::conformance::{acct, create_free_user, create_user, grant};
use prpm_playground_core::pg_cluster::PgCluster;
use prpm_playground_core::store::postgres::{PgOptions, PgStore};
use prpm_playground_core::*;

const PROCESSES: usize = 3;

#[test]
fn example_nodes_share_one_database_without_overspending() {
    let cluster = match PgCluster::shared() {
        Ok(Some(c)) => c,
        Ok(None) => {
            eprintln!("SKIPPED: PostgreSQL is not installed here (CI installs it and sets PRPM_REQUIRE_POSTGRES=1)");
            return;
        }
        Err(e) => panic!("cannot start a PostgreSQL cluster: {e}"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let url = rt.block_on(cluster.create_database()).unwrap();
    let store: Arc<dyn Store> = Arc::new(rt.block_on(PgStore::open(PgOptions::new(url.clone()))).unwrap());
    rt.block_on(async {
        let hot = create_user(&*store, "hot").await;
        grant(&*store, &hot, Bucket::Purchased, 295, None, "g").await; // 300 credits
        for i in 0..20 {
            create_user(&*store, &format!("a{i}")).await;
        }
        let limited = create_free_user(&*store, "limited").await;
        grant(&*store, &limited, Bucket::Purchased, 100, None, "gl").await;
    });
    let children: Vec<_> = (0..PROCESSES)
        .map(|p| {
            Command::new(env!("CARGO_BIN_EXE_spend_node"))
                .arg(p.to_string())
                .env("DATABASE_URL", &url)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let (mut spent, mut admitted) = (0i64, 0u32);
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "node failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let field =
            |name: &str| stdout.split(name).nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap_or_else(|| panic!("no {name}: {stdout}")).to_owned();
        spent += field("SPENT ").parse::<i64>().unwrap();
        admitted += field("ADMITTED ").parse::<u32>().unwrap();
    }
    rt.block_on(async {
        let b = store.balance(&acct("hot")).await.unwrap();
        assert_eq!(spent + b.total, 300, "spent {spent}, left {}", b.total);
        // Demand (3 nodes x 8 tasks x 13 spends of 1-3) is far above supply.
        assert!(b.total < 3, "credits left while callers were refused: {}", b.total);
        assert_eq!(admitted, 10, "the hourly limit across processes");
        assert_eq!(store.balance(&acct("limited")).await.unwrap().held, 10);
        let report = store.verify().await.unwrap();
        assert!(report.is_clean(), "{:?}", report.discrepancies);
    });
}
