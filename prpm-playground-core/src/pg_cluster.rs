//! A throw-away PostgreSQL cluster for tests, started from the installed binaries (`initdb`,
//! `pg_ctl`; through `runuser -u postgres --` when running as root), with its data directory
//! and unix socket under /tmp, removed when dropped. One cluster per test binary; one fresh
//! database per test ([`PgCluster::create_database`]).
//!
//! Without PostgreSQL installed, [`PgCluster::start`] returns `Ok(None)` and the reason, so
//! local runs can skip with one clear line; with `PRPM_REQUIRE_POSTGRES=1` (set by `.ci/run`)
//! a missing PostgreSQL is an error, so CI can never skip these tests silently.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// A running cluster; stopped and deleted on drop.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
    bin: PathBuf,
}

static DATABASES: AtomicU32 = AtomicU32::new(0);

fn find_bin() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    // Debian installs the server binaries off PATH.
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    candidates.into_iter().find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

impl PgCluster {
    /// Starts a cluster, or says why it cannot (`Ok(None)`: PostgreSQL is not installed and
    /// `PRPM_REQUIRE_POSTGRES` is not set).
    pub fn start() -> Result<Option<PgCluster>, String> {
        let required = std::env::var("PRPM_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
        let Some(bin) = find_bin() else {
            let why = "PostgreSQL is not installed (no initdb/pg_ctl on PATH or under /usr/lib/postgresql)".to_string();
            return if required { Err(format!("{why}, and PRPM_REQUIRE_POSTGRES=1")) } else { Ok(None) };
        };
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!("prpm-pg-{}-{}", std::process::id(), DATABASES.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            l.local_addr().map_err(|e| e.to_string())?.port()
        };
        let cluster = PgCluster { dir, port, as_postgres, bin };
        if as_postgres {
            let ok = Command::new("chown").args(["postgres:postgres"]).arg(&cluster.dir).status().map_err(|e| e.to_string())?.success();
            if !ok {
                return Err("chown of the cluster directory to postgres failed".into());
            }
        }
        let data = cluster.dir.join("data");
        cluster
            .run("initdb", &["-D".as_ref(), data.as_os_str(), "-U".as_ref(), "postgres".as_ref(), "--auth=trust".as_ref(), "-E".as_ref(), "UTF8".as_ref()])?;
        // `PRPM_PG_SERVER_OPTS` adds server settings (e.g. `-c log_min_duration_statement=0` to
        // see what each statement costs).
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on -c max_connections=200 {}",
            cluster.port,
            cluster.dir.display(),
            std::env::var("PRPM_PG_SERVER_OPTS").unwrap_or_default()
        );
        let log = cluster.dir.join("server.log");
        cluster
            .run("pg_ctl", &["-D".as_ref(), data.as_os_str(), "-l".as_ref(), log.as_os_str(), "-o".as_ref(), opts.as_ref(), "-w".as_ref(), "start".as_ref()])?;
        cluster.watchdog()?;
        Ok(Some(cluster))
    }

    /// One cluster for the whole test binary, started on first use. It is never dropped (it is
    /// a static): the watchdog every cluster has stops and removes it when the process exits.
    pub fn shared() -> Result<Option<&'static PgCluster>, String> {
        static SHARED: OnceLock<Result<Option<PgCluster>, String>> = OnceLock::new();
        SHARED.get_or_init(PgCluster::start).as_ref().map(Option::as_ref).map_err(Clone::clone)
    }

    /// A shell that waits for this process to end, however it ends (a panic that aborts, a
    /// static never dropped), then stops the cluster and removes its directory.
    fn watchdog(&self) -> Result<(), String> {
        let data = self.dir.join("data");
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = if self.as_postgres {
            format!("runuser -u postgres -- '{}' -D '{}' -m immediate -w stop", pg_ctl.display(), data.display())
        } else {
            format!("'{}' -D '{}' -m immediate -w stop", pg_ctl.display(), data.display())
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; {stop} >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            dir = self.dir.display()
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cluster watchdog: {e}"))?;
        Ok(())
    }

    fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd.args(args).current_dir(&self.dir).output().map_err(|e| format!("{tool}: {e}"))?;
        if !out.status.success() {
            return Err(format!("{tool} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    }

    /// A connection string for `database` over the unix socket.
    pub fn url(&self, database: &str) -> String {
        format!("host={} port={} user=postgres dbname={database}", self.dir.display(), self.port)
    }

    /// Creates a fresh, empty database and returns its connection string.
    pub async fn create_database(&self) -> Result<String, String> {
        let name = format!("t{}_{}", std::process::id(), DATABASES.fetch_add(1, Ordering::Relaxed));
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
        let task = tokio::spawn(conn);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.map_err(|e| e.to_string())?;
        drop(client);
        let _ = task.await;
        Ok(self.url(&name))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self.run("pg_ctl", &["-D".as_ref(), data.as_os_str(), "-m".as_ref(), "immediate".as_ref(), "-w".as_ref(), "stop".as_ref()]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
