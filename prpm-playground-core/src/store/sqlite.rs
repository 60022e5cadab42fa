//! The SQLite backend: one file in WAL mode (or in memory), one writer thread that commits
//! concurrent commands in groups, and a small pool of read connections.
//!
//! Group commit: the writer takes every command queued (up to `max_batch`), applies them one
//! after the other inside one `BEGIN IMMEDIATE` transaction, commits once and answers every
//! caller with its own outcome once the commit is durable. With `synchronous=FULL` (a file),
//! the fsync that makes it durable runs beside the next group when commands are waiting (see
//! [`wal_sync`]): the writer writes group N+1 while the disk syncs group N. Each command is
//! decided (idempotency, rules) before it writes anything, so a rejection or a bad request
//! writes nothing; a failing write rolls the group back and its commands are retried one by
//! one. The writer caches committed account state and drops the cache whenever another
//! connection (another process) has committed (`PRAGMA data_version`, read inside the write
//! lock) and after any failure.
//!
//! The playground's writes (packages, sessions, runs) go through the same writer, each in its
//! own `BEGIN IMMEDIATE` transaction after the group it arrived with; they touch no table the
//! writer caches. Billing's writes (purchases, Stripe events, customers, credit debts) go the
//! same way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use super::*;
use crate::clock::{SystemClock, to_millis};
use crate::cost::{Alert, AlertSink, CostState, LimitWarning, TierLimits, TierTable};
use crate::ledger::rules::{self, ChargeRecord, HoldRecord, NEW_HOLD, OpenHold, Snapshot, Transition};
use crate::purchase::{PurchaseKind, PurchaseStatus};
use crate::session::{Role, RunId, RunOutcome, SharedTurn, Turn};

use super::outcome;
mod wal_sync;
mod wal_writes;
pub use wal_sync::SyncStats;
use wal_sync::{Finished, WalSync};

mod embedded {
    refinery::embed_migrations!("../migrations/sqlite");
}

/// `PRAGMA application_id` of our files ("PRPM").
pub const APPLICATION_ID: i32 = 0x5052_504D;
const MAX_DISCREPANCIES: usize = 10_000;
/// Most ids in one row of `ledger_by_account_batches` (it bounds what a history read parses).
pub const INDEX_ROW_ENTRIES: usize = 1_024;

/// Indexes the log's entries in `(after, upto]` by account: one row of
/// `ledger_by_account_batches` per account (per [`INDEX_ROW_ENTRIES`] of its entries) with the
/// JSON array of its ids, ascending, keyed by its last id. Rows of one account never overlap
/// (migration `V9`), which history reads rely on. The entries are read in log order and
/// grouped here, rather than by SQL's window and grouping, which sorted the batch three times;
/// at most [`MAX_HISTORY_INDEX_BATCH`] entries are held at once. Returns the rows written.
pub fn index_log(conn: &Connection, after: i64, upto: i64) -> Result<u64> {
    index_log_in_slices(conn, after, upto, MAX_HISTORY_INDEX_BATCH)
}

fn index_log_in_slices(conn: &Connection, after: i64, upto: i64, slice_entries: u32) -> Result<u64> {
    let mut read = conn.prepare_cached("SELECT id, account_id FROM ledger_entries WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3")?;
    let mut insert = conn.prepare_cached("INSERT INTO ledger_by_account_batches (account_id, last_entry, entries) VALUES (?1, ?2, ?3)")?;
    let mut by_account: std::collections::BTreeMap<i64, Vec<i64>> = std::collections::BTreeMap::new();
    let (mut from, mut rows_written) = (after, 0);
    while from < upto {
        let slice_after = from;
        let mut rows = read.query(params![from, upto, slice_entries])?;
        while let Some(r) = rows.next()? {
            from = r.get(0)?;
            by_account.entry(r.get(1)?).or_default().push(from);
        }
        if from == slice_after {
            break;
        }
        for (account, ids) in std::mem::take(&mut by_account) {
            for chunk in ids.chunks(INDEX_ROW_ENTRIES) {
                let last = *chunk.last().expect("chunks are not empty");
                insert.execute(params![account, last, serde_json::to_string(chunk).expect("ids serialize")])?;
                rows_written += 1;
            }
        }
    }
    Ok(rows_written)
}

/// Upper bound of [`SqliteOptions::history_index_batch`] (it bounds history's tail scan).
pub const MAX_HISTORY_INDEX_BATCH: u32 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// Every commit durable against power loss before its callers hear of it (the WAL is
    /// fsynced after each group; the fsync may overlap the next group's writing). The default.
    Full,
    /// fsync at checkpoints only (durable against process crashes, not power loss).
    Normal,
}

/// How to open a SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// The database file; `None` for an in-memory database.
    pub path: Option<PathBuf>,
    pub synchronous: Synchronous,
    /// How long a connection waits for a lock held by another process.
    pub busy_timeout: Duration,
    /// Most commands committed in one transaction.
    pub max_batch: usize,
    /// Read connections (file databases only; in memory, reads go through the writer).
    pub readers: usize,
    pub ledger: LedgerConfig,
    pub clock: Arc<dyn Clock>,
    /// Caps the database's size (`PRAGMA max_page_count`); writes past it fail with a backend
    /// error and change nothing. `None`: no cap beyond SQLite's own.
    pub max_size_bytes: Option<u64>,
    /// WAL pages after which the WAL is copied back into the database (a checkpoint). Hot
    /// pages rewritten many times between checkpoints are copied back once, so a larger value
    /// writes less (measured: +20 % spends/s at 4,000 over SQLite's 1,000) at the price of a
    /// larger WAL file (4,000 pages: 16 MiB). For a file, the checkpoint runs on a thread and
    /// connection of its own, so no commit waits for it (a checkpoint copies and fsyncs
    /// megabytes: 15–20 ms on this project's machine, which the commit that crossed the mark
    /// used to wait for, as SQLite's `wal_autocheckpoint` does). Once that thread has copied
    /// all but the last eighth of this, the writer copies the rest and starts the WAL over
    /// between two groups (under a steady stream of commits SQLite never would). Should the
    /// thread fall behind (a long read pinning the WAL), the writer checkpoints itself at four
    /// times this.
    /// `0`: never checkpoint (as `PRAGMA wal_autocheckpoint = 0`).
    pub wal_autocheckpoint_pages: u32,
    /// Log entries appended before the writer indexes them by account, all at once inside the
    /// group that crosses the mark. Until then history reads scan the unindexed
    /// tail, so this bounds that scan. Larger batches share more index pages per entry.
    pub history_index_batch: u32,
    /// Where alerts go besides the `cost_alerts` table.
    pub alert_sink: Option<Arc<dyn AlertSink>>,
    /// A command that finds the writer thread asleep (no command for 50 µs, nothing queued)
    /// after three groups of one command in a row commits on the caller's own thread, as a
    /// plain transaction would: its transaction and, with `FULL`, its fsync run there, and the
    /// two hand-offs between threads (to the writer and back, tens of microseconds each on a
    /// virtual machine) are saved. Commands that arrive meanwhile queue for the writer thread,
    /// which groups them as ever (and after a group of more than one, commands go to it). The
    /// caller's thread is then busy for one commit (a fraction of a millisecond with a quick
    /// fsync; an async runtime's thread too, as with any synchronous SQLite call). `false`:
    /// every command goes to the writer thread.
    pub inline_commits: bool,
}

impl std::fmt::Debug for dyn AlertSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AlertSink")
    }
}

impl SqliteOptions {
    pub fn file(path: impl Into<PathBuf>) -> Self {
        SqliteOptions { path: Some(path.into()), ..SqliteOptions::memory() }
    }
    pub fn memory() -> Self {
        SqliteOptions {
            path: None,
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            max_batch: 512,
            readers: 4,
            ledger: LedgerConfig::default(),
            clock: Arc::new(SystemClock),
            max_size_bytes: None,
            wal_autocheckpoint_pages: 4_000,
            history_index_batch: 8_192,
            alert_sink: None,
            inline_commits: true,
        }
    }
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
    pub fn ledger(mut self, ledger: LedgerConfig) -> Self {
        self.ledger = ledger;
        self
    }
    pub fn history_index_batch(mut self, entries: u32) -> Self {
        self.history_index_batch = entries;
        self
    }
    pub fn alert_sink(mut self, sink: Arc<dyn AlertSink>) -> Self {
        self.alert_sink = Some(sink);
        self
    }
    pub fn synchronous(mut self, s: Synchronous) -> Self {
        self.synchronous = s;
        self
    }
}

/// Work the writer runs on its connection after the group it arrived with: reads of an
/// in-memory store, and writes outside the ledger (in their own transaction, see `in_write`).
type ConnFn = Box<dyn FnOnce(&Connection) + Send>;

enum Job {
    Exec(Box<Prepared>, Reply),
    Run(ConnFn),
}

/// Runs `f` in its own write transaction (`BEGIN IMMEDIATE`): committed if it returns `Ok`,
/// rolled back otherwise (or if the commit fails), so a caller hears of a success only once it
/// is committed. These writes touch no table the writer caches.
fn in_write<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    let r = (|| {
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        let v = f(conn)?;
        if conn.is_autocommit() {
            return Err(Error::Backend("the transaction was rolled back by SQLite".into()));
        }
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(v)
    })();
    // Whatever failed (the write or the commit itself), leave no transaction open.
    if r.is_err() && !conn.is_autocommit() {
        let _ = conn.prepare_cached("ROLLBACK").and_then(|mut s| s.execute([]));
    }
    r
}

struct ReadPool {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
}

/// Prepared statements kept per connection. The store has about 80 statements (rusqlite keeps
/// 16 by default): with fewer slots than the statements a group or a read runs, the cache evicts
/// them in turn and every statement is compiled again each time.
const STATEMENT_CACHE: usize = 256;

/// Sets up a connection of the store (the writer's and the readers') so that its prepared
/// statements stay compiled.
///
/// Besides the cache's size: the query planner's stability guarantee. Without it, SQLite
/// (3.54) marks a statement such as `... WHERE session_id = ?1 ORDER BY seq` to be compiled
/// again whenever its parameter gets a new value (in case the value allows a better plan), and
/// rusqlite clears a cached statement's parameters each time it is returned: every such
/// statement was compiled again on every use. Our plans never depend on a value (no `LIKE`, no
/// `ANALYZE` statistics), so nothing is lost.
fn tune(conn: &Connection) -> Result<()> {
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}

impl ReadPool {
    fn get(&self) -> Result<Connection> {
        if let Some(c) = self.idle.lock().unwrap().pop() {
            return Ok(c);
        }
        let c = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        c.busy_timeout(self.busy_timeout)?;
        tune(&c)?;
        c.pragma_update(None, "query_only", true)?;
        Ok(c)
    }
    fn put(&self, c: Connection) {
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < self.max_idle {
            idle.push(c);
        }
    }

    /// Runs `f` on a pooled connection, on this thread.
    fn run<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.get()?;
        let r = f(&conn);
        self.put(conn);
        r
    }
}

/// The SQLite store. Cheap to share behind an `Arc`; dropping it stops the writer thread after
/// the commands already queued.
pub struct SqliteStore {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// Jobs sent and not yet taken by the writer thread.
    queued: Arc<AtomicUsize>,
    /// Set while the writer thread sleeps for want of jobs (see [`next_job`]).
    writer_asleep: Arc<AtomicBool>,
    /// The writer: the writer thread's between its groups, and a caller's that finds it idle
    /// (see [`SqliteOptions::inline_commits`]). `None` once the writer thread has stopped.
    shared: Arc<Mutex<Option<Writer>>>,
    inline_commits: bool,
    /// Commands committed on their caller's thread.
    inline_count: AtomicU64,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Option<Arc<ReadPool>>,
    clock: Arc<dyn Clock>,
    ledger: LedgerConfig,
    /// Pipelined fsyncs of the WAL (a file with `synchronous=FULL`), see [`wal_sync`].
    sync: Option<Arc<WalSync>>,
    /// A file's checkpoints (see [`start_checkpointer`]).
    checkpoints: Option<Arc<Checkpoints>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.readers.as_ref().map(|r| &r.path)).finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) a database file with the default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        SqliteStore::open_with(SqliteOptions::file(path.as_ref()))
    }

    /// Opens a fresh in-memory database.
    pub fn open_in_memory() -> Result<Self> {
        SqliteStore::open_with(SqliteOptions::memory())
    }

    /// Opens a store: checks the file is ours and not newer than this code, switches to WAL,
    /// applies pending migrations, starts the writer.
    pub fn open_with(opts: SqliteOptions) -> Result<Self> {
        if opts.max_batch == 0 {
            return Err(Error::invalid("max_batch", "must be at least 1"));
        }
        if !(1..=MAX_HISTORY_INDEX_BATCH).contains(&opts.history_index_batch) {
            return Err(Error::invalid("history_index_batch", format!("{} is outside 1..={MAX_HISTORY_INDEX_BATCH}", opts.history_index_batch)));
        }
        let mut conn = match &opts.path {
            Some(path) => {
                check_header(path)?;
                // The writer's connection writes each commit to the WAL in one call (see
                // `wal_writes`); every other connection opens the file plainly.
                let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
                Connection::open_with_flags_and_vfs(path, flags, wal_writes::register()?)?
            }
            None => Connection::open_in_memory()?,
        };
        conn.busy_timeout(opts.busy_timeout)?;
        tune(&conn)?;
        check_ours(&conn)?;
        if opts.path.is_some() {
            let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(Error::Backend(format!("could not switch to WAL (journal_mode is {mode})")));
            }
        }
        let sync = match opts.synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        conn.pragma_update(None, "foreign_keys", true)?;
        // A file's checkpoints run on their own thread (its WAL hook replaces SQLite's automatic
        // checkpoint); otherwise `0` turns them off (and in memory there is no WAL).
        let (checkpointer, checkpoints) = match &opts.path {
            Some(path) if opts.wal_autocheckpoint_pages > 0 => {
                let (thread, shared, wake) = start_checkpointer(&mut conn, path, sync, opts.wal_autocheckpoint_pages, opts.busy_timeout)?;
                (Some(thread), Some((shared, wake)))
            }
            _ => {
                conn.pragma_update(None, "wal_autocheckpoint", opts.wal_autocheckpoint_pages)?;
                (None, None)
            }
        };
        if let Some(bytes) = opts.max_size_bytes {
            let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            let pages = i64::try_from(bytes).unwrap_or(i64::MAX) / page.max(1);
            conn.pragma_update(None, "max_page_count", pages.max(1))?;
        }
        embedded::migrations::runner()
            .set_abort_divergent(true)
            .set_abort_missing(true)
            .run(&mut conn)
            .map_err(|e| Error::Backend(format!("migration failed: {e}")))?;
        conn.pragma_update(None, "application_id", APPLICATION_ID)?;
        // A file with `FULL`: the writer's commits write their WAL frames and `WalSync` fsyncs
        // them, overlapping the next group (everything above ran with `FULL`, so the WAL file
        // and its directory entry are durable already).
        let sync = match (&opts.path, opts.synchronous) {
            (Some(path), Synchronous::Full) => {
                conn.pragma_update(None, "synchronous", "NORMAL")?;
                Some(WalSync::new(path, opts.alert_sink.clone()))
            }
            _ => None,
        };
        let syncer = match &sync {
            Some(s) => {
                let s = s.clone();
                Some(
                    std::thread::Builder::new()
                        .name("prpm-sqlite-sync".into())
                        .spawn(move || s.run())
                        .map_err(|e| Error::Backend(format!("cannot start the sync thread: {e}")))?,
                )
            }
            None => None,
        };

        let (tx, rx) = mpsc::channel();
        let clock = opts.clock.clone();
        let ledger = opts.ledger.clone();
        let max_batch = opts.max_batch;
        let index_batch = i64::from(opts.history_index_batch);
        let sink = opts.alert_sink.clone();
        let writer_sync = sync.clone();
        let (checkpoints, writer_checkpoints) = match checkpoints {
            Some((shared, wake)) => (Some(shared.clone()), Some((shared, wake))),
            None => (None, None),
        };
        let shared = Arc::new(Mutex::new(Some(Writer {
            conn,
            ledger,
            cache: Cache::default(),
            data_version: -1,
            index_batch,
            sink,
            alerts: Vec::new(),
            sync: writer_sync.clone(),
            checkpoints: writer_checkpoints,
            busy_timeout: opts.busy_timeout,
            lone_groups: LONE_GROUPS,
        })));
        let queued = Arc::new(AtomicUsize::new(0));
        let writer_asleep = Arc::new(AtomicBool::new(false));
        let queue = Queue { rx, queued: queued.clone(), asleep: writer_asleep.clone() };
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("prpm-sqlite-writer".into())
            .spawn(move || {
                // Every group answered and the sync thread ended when the writer stops, even by
                // a panic.
                let stop = writer_sync.map(|s| StopSync(s, syncer));
                let conn = writer_loop(&writer_shared, queue, clock, max_batch);
                // Before the connection closes (the last to close removes the WAL).
                drop(stop);
                // The checkpoint thread's connection closes first, then this one, alone: SQLite
                // copies the WAL back and removes it only in the last connection to close, and
                // two connections closing at once each see the other and both leave it. (Should
                // the hook not come off, its end in this connection's close stops that thread.)
                if let Some(mut conn) = conn
                    && let Some(checkpointer) = checkpointer
                    && conn.wal_hook(None::<fn(&mut rusqlite::hooks::Wal, std::ffi::c_int) -> rusqlite::Result<()>>).is_ok()
                {
                    let _ = checkpointer.join();
                }
            })
            .map_err(|e| Error::Backend(format!("cannot start the writer thread: {e}")))?;
        let readers = opts
            .path
            .as_ref()
            .filter(|_| opts.readers > 0)
            .map(|p| Arc::new(ReadPool { path: p.clone(), busy_timeout: opts.busy_timeout, idle: Mutex::new(Vec::new()), max_idle: opts.readers }));
        Ok(SqliteStore {
            jobs: Mutex::new(Some(tx)),
            queued,
            writer_asleep,
            shared,
            inline_commits: opts.inline_commits,
            inline_count: AtomicU64::new(0),
            writer: Mutex::new(Some(writer)),
            readers,
            clock: opts.clock,
            ledger: opts.ledger,
            sync,
            checkpoints,
        })
    }

    fn send(&self, job: Job) -> Result<()> {
        let jobs = self.jobs.lock().unwrap();
        let jobs = jobs.as_ref().ok_or(Error::Closed)?;
        self.queued.fetch_add(1, Ordering::AcqRel);
        jobs.send(job).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            Error::Closed
        })
    }

    /// Runs a command: on this thread if the writer is idle (see
    /// [`SqliteOptions::inline_commits`]), else on the writer thread with the group it joins.
    async fn exec(&self, p: Prepared) -> Result<Done> {
        let (tx, rx) = oneshot::channel();
        if let Err((p, tx)) = self.try_inline(p, tx) {
            self.send(Job::Exec(Box::new(p), tx))?;
        }
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Commits `p` alone on this thread if the writer thread sleeps for want of jobs (no
    /// command came for a while: under a stream of commands it is awake, and they are grouped)
    /// and nothing is queued; its answer goes to `reply` (at once, or once an fsync under way
    /// on the sync thread covers it). Hands `p` back otherwise.
    fn try_inline(&self, p: Prepared, reply: Reply) -> Result<(), (Prepared, Reply)> {
        if !self.inline_commits || !self.writer_asleep.load(Ordering::Acquire) || self.queued.load(Ordering::Acquire) != 0 {
            return Err((p, reply));
        }
        // Busy (or poisoned by a panic, or closed): the writer thread answers, or the send
        // fails with `Closed`.
        let Ok(mut guard) = self.shared.try_lock() else { return Err((p, reply)) };
        let Some(w) = guard.as_mut().filter(|w| w.lone_groups >= LONE_GROUPS) else { return Err((p, reply)) };
        let now = to_millis(self.clock.now());
        let queued = &self.queued;
        w.commit_and_answer(vec![(p, reply)], now, || queued.load(Ordering::Acquire) == 0);
        self.inline_count.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Commands committed on their caller's thread, the writer thread being idle (see
    /// [`SqliteOptions::inline_commits`]).
    pub fn inline_commits(&self) -> u64 {
        self.inline_count.load(Ordering::Relaxed)
    }

    /// Runs `f` on a read connection (or on the writer for in-memory databases).
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        match &self.readers {
            Some(pool) => {
                let pool = pool.clone();
                let r = tokio::task::spawn_blocking(move || pool.run(f)).await.map_err(|e| Error::Backend(format!("read task failed: {e}")))?;
                self.settled().await?;
                r
            }
            None => {
                let (tx, rx) = oneshot::channel();
                self.send(Job::Run(Box::new(move |c| {
                    let _ = tx.send(f(c));
                })))?;
                // On the writer's connection (in memory, or a file without read connections),
                // right after a group whose fsync may still be under way.
                let r = rx.await.map_err(|_| Error::Closed)?;
                self.settled().await?;
                r
            }
        }
    }

    /// Runs a small indexed read (a point lookup of a few rows: a balance, a package, a
    /// session) on a read connection on the caller's own thread. Handing such a read to a
    /// blocking thread and back costs two thread wake-ups, several times the read itself; in
    /// WAL mode a reader never waits for the writer, so it cannot hold the runtime's thread for
    /// long. Scans (history, verify, analytics) go through [`SqliteStore::read`].
    async fn read_now<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        match &self.readers {
            Some(pool) => {
                let r = pool.run(f);
                self.settled().await?;
                r
            }
            None => self.read(f).await,
        }
    }

    /// Waits until what a read that has just ended may have seen is durable (see [`wal_sync`]).
    async fn settled(&self) -> Result<()> {
        match &self.sync {
            Some(s) => s.settled().await,
            None => Ok(()),
        }
    }

    /// How the writer's commits were made durable: `None` unless the store is a file with
    /// `synchronous=FULL`.
    pub fn sync_stats(&self) -> Option<SyncStats> {
        self.sync.as_ref().map(|s| s.stats())
    }

    /// How the WAL was started over: `None` unless the store is a file that checkpoints.
    pub fn checkpoint_stats(&self) -> Option<CheckpointStats> {
        self.checkpoints.as_ref().map(|c| CheckpointStats {
            early_restarts: c.early_restarts.load(Ordering::Relaxed),
            early_tries: c.early_tries.load(Ordering::Relaxed),
            bound_restarts: c.bound_restarts.load(Ordering::Relaxed),
        })
    }

    /// Runs `f` on the writer's connection in its own write transaction (see [`in_write`]).
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Run(Box::new(move |c| {
            let _ = tx.send(in_write(c, f));
        })))?;
        let r = rx.await.map_err(|_| Error::Closed)?;
        // A write that changed nothing commits without an fsync, and may have read a group
        // whose fsync is under way.
        self.settled().await?;
        r
    }

    /// Stops the writer (and its checkpoint thread) after the queued commands and waits for it.
    pub fn close(&self) {
        self.jobs.lock().unwrap().take();
        if let Some(h) = self.writer.lock().unwrap().take() {
            let _ = h.join();
        }
    }
}

/// Stops a store's [`WalSync`] (answering what waits) and joins its thread when dropped.
struct StopSync(Arc<WalSync>, Option<JoinHandle<()>>);

impl Drop for StopSync {
    fn drop(&mut self) {
        self.0.stop();
        if let Some(t) = self.1.take() {
            let _ = t.join();
        }
    }
}

/// Starts the thread that checkpoints the WAL of `path` on its own connection, and has the
/// writer's connection `conn` wake it after each commit that leaves `pages` or more in the WAL
/// (in place of SQLite's automatic checkpoint, which runs inside that commit). A checkpoint is
/// `PASSIVE`: it copies what no reader still needs and never blocks the writer or a reader.
///
/// SQLite starts the WAL over only when a write transaction begins with the WAL fully copied
/// back. Under a steady stream of commits that never happens by itself: each commit adds
/// frames before the thread has copied those of the one before, so the WAL would grow and the
/// thread would checkpoint after every commit, sorting the WAL's index each time. So once the
/// thread reports that all but the last `pages / 8` frames are copied, the hook marks the WAL
/// due to start over, and the writer does it before its next group, or at once when nothing
/// is queued ([`Writer::restart_wal_if_due`]): it copies the rest (a few commits' frames) and
/// starts the WAL over, waiting for nothing.
///
/// Should the WAL reach four times `pages` all the same (that thread short of CPU, a long read),
/// the writer checkpoints itself in `RESTART` mode inside the hook: it copies everything, waits
/// for readers still using the WAL and starts it over, so the next commit writes at its
/// beginning and the file stays bounded. It waits up to `busy_timeout` for that thread's
/// checkpoint under way (SQLite answers `BUSY` at once while another connection checkpoints,
/// without asking the busy handler); past that, the next commit tries again. The thread ends
/// when `conn`'s WAL hook is removed or `conn` is closed.
fn start_checkpointer(
    conn: &mut Connection,
    path: &Path,
    sync: &str,
    pages: u32,
    busy_timeout: Duration,
) -> Result<(JoinHandle<()>, Arc<Checkpoints>, mpsc::SyncSender<()>)> {
    use rusqlite::hooks::Wal;
    use rusqlite::wal::CheckpointMode;
    let own = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    // The syncs of its checkpoints, as the writer's (it never commits).
    own.pragma_update(None, "synchronous", sync)?;
    // At most one wake-up waits: commits that cross the mark while a checkpoint runs add none.
    let (wake, woken) = mpsc::sync_channel::<()>(1);
    let shared = Arc::new(Checkpoints::default());
    let thread_shared = shared.clone();
    let handle = std::thread::Builder::new()
        .name("prpm-sqlite-checkpoint".into())
        .spawn(move || {
            while woken.recv().is_ok() {
                // An error (I/O, a lock) is left to the next wake-up or to the writer's bound.
                if let Ok((log, copied)) = own.wal_checkpoint_v2(Some(rusqlite::MAIN_DB), CheckpointMode::PASSIVE) {
                    thread_shared.report(log, copied);
                }
            }
        })
        .map_err(|e| Error::Backend(format!("cannot start the checkpoint thread: {e}")))?;
    let bound = pages.saturating_mul(4);
    let slack = (pages / 8).max(1);
    let hook_shared = shared.clone();
    let writer_wake = wake.clone();
    let mut last_frames = 0;
    // Replaces SQLite's automatic checkpoint (both are this hook). Never an error: the commit it
    // follows is already durable, and an error here would be reported as the commit's.
    conn.wal_hook(Some(move |wal: &mut Wal, frames: std::ffi::c_int| {
        let c = &hook_shared;
        let frames = u32::try_from(frames).unwrap_or(0);
        if frames < last_frames {
            // The WAL started over: the thread's last report was about the one before.
            c.progress.store(0, Ordering::Release);
        }
        last_frames = frames;
        if frames >= bound {
            let deadline = std::time::Instant::now() + busy_timeout;
            while let Err(e) = wal.checkpoint_v2(CheckpointMode::RESTART) {
                let busy = e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy);
                if !busy || std::time::Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            c.bound_restarts.fetch_add(1, Ordering::Relaxed);
        } else if frames >= pages {
            let (log, copied) = c.reported();
            if log <= frames && copied >= pages / 2 && frames - copied <= slack {
                // Once per report: should the writer's attempt fail (a reader on the WAL), the
                // thread is woken again and the next report may mark it due again.
                c.progress.store(0, Ordering::Release);
                c.restart_due.store(true, Ordering::Release);
            } else {
                // A wake-up may wait behind a checkpoint under way, so the thread catches up with
                // the last commit before an idle spell. The writer's restart then sometimes finds
                // it busy (a few microseconds lost; the next report marks it due again).
                let _ = wake.try_send(());
            }
        }
        Ok(())
    }))?;
    Ok((handle, shared, writer_wake))
}

/// What the writer's WAL hook, the checkpoint thread and the writer share.
#[derive(Default)]
struct Checkpoints {
    /// The thread's last checkpoint: the WAL's frames it found and those then copied back
    /// ([`Checkpoints::report`]); 0 when none since the WAL started over.
    progress: AtomicU64,
    /// Set by the hook: the writer is to copy the rest and start the WAL over before its next group.
    restart_due: AtomicBool,
    /// WAL restarts by the writer before a group, and those it tried.
    early_restarts: AtomicU64,
    early_tries: AtomicU64,
    /// `RESTART` checkpoints the hook ran at the bound (whether or not they got through).
    bound_restarts: AtomicU64,
}

impl Checkpoints {
    /// Frame counts are below 2^32 (the WAL is bounded far below).
    fn report(&self, log: std::ffi::c_int, copied: std::ffi::c_int) {
        let frames = |n: std::ffi::c_int| u64::from(u32::try_from(n).unwrap_or(0));
        self.progress.store((frames(log) << 32) | frames(copied), Ordering::Release);
    }

    /// The last report: (the WAL's frames, those copied back).
    fn reported(&self) -> (u32, u32) {
        let v = self.progress.load(Ordering::Acquire);
        ((v >> 32) as u32, v as u32)
    }
}

/// How the WAL was started over since the store opened (see [`SqliteOptions::wal_autocheckpoint_pages`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointStats {
    /// By the writer between groups, once the checkpoint thread had copied nearly everything.
    pub early_restarts: u64,
    /// Those it tried (the others found a reader on the WAL or the thread checkpointing).
    pub early_tries: u64,
    /// Tried by the writer's commit that took the WAL to four times the mark (whether or not
    /// it got through).
    pub bound_restarts: u64,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

fn check_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::Backend(format!("{}: {e}", path.display()))),
    };
    let mut head = [0u8; 16];
    let n = f.read(&mut head).map_err(|e| Error::Backend(format!("{}: {e}", path.display())))?;
    if n == 0 {
        return Ok(());
    }
    if n < 16 || &head != b"SQLite format 3\0" {
        return Err(Error::NotOurDatabase(format!("{} is not a SQLite database", path.display())));
    }
    Ok(())
}

fn check_ours(conn: &Connection) -> Result<()> {
    let app_id: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(|e| match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::NotADatabase => Error::NotOurDatabase(e.to_string()),
        e => e.into(),
    })?;
    let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'", [], |r| r.get(0))?;
    if app_id != APPLICATION_ID && (app_id != 0 || tables > 0) {
        return Err(Error::NotOurDatabase(format!("application_id is {app_id:#x} and the file has {tables} tables of another application")));
    }
    if tables > 0 {
        let found: Option<i64> = conn.query_row("SELECT max(version) FROM refinery_schema_history", [], |r| r.get(0)).optional()?.flatten();
        let supported = embedded::migrations::runner().get_migrations().iter().map(|m| i64::from(m.version())).max().unwrap_or(0);
        if let Some(found) = found.filter(|f| *f > supported) {
            return Err(Error::SchemaTooNew { found, supported });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The writer

/// A command checked and fingerprinted by the caller, so the writer does less.
struct Prepared {
    cmd: Command,
    fingerprint: i64,
    /// A run to record in the same transaction once the settle command settles.
    run: Option<Box<RunToRecord>>,
}

/// The run part of [`Store::settle_run`], validated.
struct RunToRecord {
    run: RunRecord,
    turns: Vec<NewTurn>,
    new_session: Option<NewSession>,
}

/// A command's outcome, and where its run's turns went (see [`SettledRun::session`]).
struct Done {
    outcome: Outcome,
    session: Option<SessionId>,
}

type Reply = oneshot::Sender<Result<Done>>;

/// An account as the writer caches it: state and open holds, exactly as committed.
struct Cached {
    ext: AccountId,
    state: AccountState,
    holds: Vec<OpenHold>,
    /// The plan or the next expiry changed in this group (their indexed columns need writing).
    indexed_changed: bool,
}

/// The writer's cache of committed account state. It is only ever ahead of the database
/// inside a transaction; any failure clears it, and so does a commit by another connection
/// (seen through `PRAGMA data_version`).
#[derive(Default)]
struct Cache {
    ids: HashMap<AccountId, i64>,
    accounts: HashMap<i64, Cached>,
    /// Open hold -> account.
    holds: HashMap<HoldId, i64>,
    /// `ledger_index_state.indexed_upto` as committed.
    indexed_upto: Option<i64>,
    /// The `cost_tiers` table.
    tiers: Option<Arc<TierTable>>,
}

impl Cache {
    fn clear(&mut self) {
        self.ids.clear();
        self.accounts.clear();
        self.holds.clear();
        self.indexed_upto = None;
        self.tiers = None;
    }
}

const MAX_CACHED_ACCOUNTS: usize = 100_000;

enum GroupError {
    Begin(Error),
    Write(Error),
}

enum Step {
    /// A replay or a rejection: nothing to write.
    Done(Outcome),
    Apply {
        account_id: Option<i64>,
        transition: Box<Transition>,
        fingerprint: i64,
    },
    /// A tier's limits to store.
    Tier {
        limits: TierLimits,
        warnings: Vec<LimitWarning>,
        fingerprint: i64,
    },
}

struct Writer {
    conn: Connection,
    ledger: LedgerConfig,
    cache: Cache,
    data_version: i64,
    index_batch: i64,
    sink: Option<Arc<dyn AlertSink>>,
    /// Alerts of the group being committed, for the sink.
    alerts: Vec<(AccountId, Alert)>,
    sync: Option<Arc<WalSync>>,
    /// With the wake-up of the checkpoint thread (dropped with the writer, before the thread is
    /// joined).
    checkpoints: Option<(Arc<Checkpoints>, mpsc::SyncSender<()>)>,
    busy_timeout: Duration,
    /// Groups of one command committed in a row. Commands commit on their callers' threads
    /// only after [`LONE_GROUPS`] of them: a group of more than one means callers arrive
    /// together (those one fsync answered come back at once, a straggler may make a group of
    /// its own between), and their next commands are left to the writer thread to group, even
    /// should the first find that thread asleep.
    lone_groups: u32,
}

/// Groups of one command in a row after which a command may commit on its caller's thread (see
/// [`Writer::lone_groups`]).
const LONE_GROUPS: u32 = 3;

/// The writer thread's end of the job queue, counting what it takes off (see
/// [`SqliteStore::try_inline`]).
struct Queue {
    rx: mpsc::Receiver<Job>,
    queued: Arc<AtomicUsize>,
    /// Set while the writer thread sleeps for want of jobs.
    asleep: Arc<AtomicBool>,
}

impl Queue {
    fn taken(&self, job: Option<Job>) -> Option<Job> {
        if job.is_some() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        job
    }
    /// The next job, waiting for it.
    fn next(&self) -> Option<Job> {
        self.taken(next_job(&self.rx, &self.asleep))
    }
    /// The next job, if one is queued.
    fn try_next(&self) -> Option<Job> {
        self.taken(self.rx.try_recv().ok())
    }
}

/// The writer thread: takes jobs until the queue closes, and commits their commands in groups
/// on the shared writer. Returns the writer's connection (`None` if a panic while it was in use
/// left it poisoned: dropping it then rolls back whatever was open).
fn writer_loop(shared: &Mutex<Option<Writer>>, queue: Queue, clock: Arc<dyn Clock>, max_batch: usize) -> Option<Connection> {
    let mut group = Vec::with_capacity(max_batch);
    // Reads and playground writes, in arrival order, after the group.
    let mut others: Vec<ConnFn> = Vec::new();
    // A command taken from the queue to see whether one waits (it starts the next group).
    let mut carried: Option<Job> = None;
    while let Some(first) = carried.take().or_else(|| queue.next()) {
        // Commands that queue while a caller commits on its own thread join this group.
        let Ok(mut guard) = shared.lock() else { break };
        let Some(w) = guard.as_mut() else { break };
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Exec(p, reply) => group.push((*p, reply)),
                Job::Run(f) => others.push(f),
            }
            if group.len() < max_batch {
                next = queue.try_next();
            }
        }
        if !group.is_empty() {
            let now = to_millis(clock.now());
            let group = std::mem::take(&mut group);
            w.commit_and_answer(group, now, || {
                if others.is_empty() {
                    carried = queue.try_next();
                }
                carried.is_none() && others.is_empty()
            });
        }
        if !others.is_empty() {
            // Their own transactions commit with `FULL` (SQLite fsyncs before it makes them
            // visible), which also makes the groups before them durable. Should the setting
            // fail (it cannot inside no transaction), they are not run: their callers get an
            // error rather than an answer before their write is durable.
            // After a failed fsync they are not run either (the store refuses everything).
            let full = match &w.sync {
                None => true,
                Some(s) => s.failed().is_none() && w.conn.pragma_update(None, "synchronous", "FULL").is_ok(),
            };
            for f in others.drain(..) {
                if full {
                    f(&w.conn);
                }
            }
            if w.sync.is_some() {
                // Should this fail, the connection stays at FULL: every commit syncs itself.
                let _ = w.conn.pragma_update(None, "synchronous", "NORMAL");
            }
        }
    }
    match shared.lock() {
        Ok(mut w) => w.take().map(|w| w.conn),
        Err(poisoned) => {
            poisoned.into_inner().take();
            None
        }
    }
}

/// How long the writer polls for the next command before it sleeps: a caller that sends its
/// next command right after its reply then finds the writer awake (no thread wake-up, which
/// costs tens of microseconds on a virtual machine).
const SPIN: Duration = Duration::from_micros(50);

fn next_job(rx: &mpsc::Receiver<Job>, asleep: &AtomicBool) -> Option<Job> {
    let t0 = std::time::Instant::now();
    loop {
        match rx.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if t0.elapsed() < SPIN => std::hint::spin_loop(),
            Err(mpsc::TryRecvError::Empty) => {
                asleep.store(true, Ordering::Release);
                let job = rx.recv().ok();
                asleep.store(false, Ordering::Release);
                return job;
            }
        }
    }
}

impl Writer {
    /// Commits a group ([`Writer::commit_group`]) and answers its callers: through the sync
    /// thread with `FULL` (at once, with the fsync on this thread, if `idle` says nothing waits
    /// and no fsync is under way), else at once. With nothing waiting, a WAL restart found due
    /// is done next (the replies are out), so the last commits before an idle spell are copied
    /// back too.
    fn commit_and_answer(&mut self, group: Vec<(Prepared, Reply)>, now: DateTime<Utc>, idle: impl FnOnce() -> bool) {
        self.lone_groups = if group.len() == 1 { self.lone_groups.saturating_add(1) } else { 0 };
        let mut replies = Vec::with_capacity(group.len());
        match self.sync.as_ref().and_then(|s| s.failed()) {
            Some(msg) => {
                replies.extend(group.into_iter().map(|(_, reply)| (reply, Err(Error::Backend(msg.clone())))));
            }
            None => {
                self.restart_wal_if_due();
                self.commit_group(group, now, &mut replies)
            }
        }
        let alerts = std::mem::take(&mut self.alerts);
        // With commands queued, the next group is written while the sync thread fsyncs this
        // one; alone, this thread fsyncs at once.
        let idle = idle();
        match &self.sync {
            Some(s) => s.finished(Finished { replies, alerts }, idle),
            None => Finished { replies, alerts }.deliver(self.sink.as_ref()),
        }
        if idle {
            self.restart_wal_if_due();
        }
    }

    /// Copies the rest of the WAL back and starts it over, if the hook found the checkpoint
    /// thread nearly done (see [`start_checkpointer`]). Between groups, so no write is open;
    /// waiting for nothing: a reader still on the WAL (or the thread checkpointing) leaves it
    /// to the thread, woken for it, and to a later report. A failure changes nothing a commit
    /// relies on.
    fn restart_wal_if_due(&mut self) {
        let Some((c, wake)) = &self.checkpoints else { return };
        if !c.restart_due.swap(false, Ordering::AcqRel) {
            return;
        }
        c.early_tries.fetch_add(1, Ordering::Relaxed);
        if self.conn.busy_timeout(Duration::ZERO).is_err() {
            return;
        }
        let r = self.conn.wal_checkpoint_v2(Some(rusqlite::MAIN_DB), rusqlite::wal::CheckpointMode::RESTART);
        if matches!(r, Ok((log, copied)) if log == copied) {
            c.early_restarts.fetch_add(1, Ordering::Relaxed);
        } else {
            // The thread copies what it may, should no commit follow to wake it.
            let _ = wake.try_send(());
        }
        // Should this fail, the connection keeps no busy timeout: a commit that finds the file
        // locked (another process) fails at once rather than after waiting.
        let _ = self.conn.busy_timeout(self.busy_timeout);
    }

    /// Commits the group in one transaction. If a write fails (I/O, a broken invariant), the
    /// transaction is rolled back, the cache dropped, and each command retried alone, so one
    /// bad command cannot fail the others. If the transaction cannot even begin (the file is
    /// locked by another process past the busy timeout), the whole group gets that error.
    ///
    /// Each caller's result goes to `replies` (to be sent once the commit is durable), the
    /// alerts of what committed to `self.alerts`.
    fn commit_group(&mut self, group: Vec<(Prepared, Reply)>, now: DateTime<Utc>, replies: &mut Vec<(Reply, Result<Done>)>) {
        let mut alerts = std::mem::take(&mut self.alerts);
        let tried = self.try_group(&group, now);
        // Alerts only of what committed.
        let mut committed = std::mem::take(&mut self.alerts);
        match tried {
            Ok(results) => {
                replies.extend(group.into_iter().map(|(_, reply)| reply).zip(results));
                alerts.append(&mut committed);
            }
            Err(GroupError::Begin(e)) => {
                let msg = e.to_string();
                replies.extend(group.into_iter().map(|(_, reply)| (reply, Err(Error::Backend(msg.clone())))));
            }
            Err(GroupError::Write(e)) if group.len() == 1 => {
                let (_, reply) = group.into_iter().next().expect("one");
                replies.push((reply, Err(e)));
            }
            Err(GroupError::Write(_)) => {
                for item in group {
                    self.commit_group(vec![item], now, replies);
                    alerts.append(&mut self.alerts);
                }
            }
        }
        self.alerts = alerts;
    }

    fn try_group(&mut self, group: &[(Prepared, Reply)], now: DateTime<Utc>) -> Result<Vec<Result<Done>>, GroupError> {
        self.alerts.clear();
        self.conn.prepare_cached("BEGIN IMMEDIATE").and_then(|mut s| s.execute([])).map_err(|e| GroupError::Begin(e.into()))?;
        // Inside the write lock: nobody can commit between this check and our commit.
        let version =
            self.conn.prepare_cached("PRAGMA data_version").and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0))).map_err(|e| GroupError::Write(e.into()));
        let result = version.and_then(|version| {
            if version != self.data_version || self.cache.accounts.len() > MAX_CACHED_ACCOUNTS {
                self.cache.clear();
                self.data_version = version;
            }
            self.apply_group(group, now).map_err(GroupError::Write)
        });
        if result.is_err() {
            let _ = self.conn.prepare_cached("ROLLBACK").and_then(|mut s| s.execute([]));
            self.cache.clear();
        }
        result
    }

    fn apply_group(&mut self, group: &[(Prepared, Reply)], now: DateTime<Utc>) -> Result<Vec<Result<Done>>> {
        let mut dirty = Vec::new();
        let mut wrote = false;
        let mut results = Vec::with_capacity(group.len());
        for (p, _) in group {
            match self.prepare(p, now) {
                // A database error may have rolled the whole transaction back (SQLite does so
                // on I/O errors, a full disk, no memory): fail the group, retry one by one.
                Err(e @ Error::Backend(_)) => return Err(e),
                Err(e) => results.push(Err(e)),
                Ok(Step::Done(outcome)) => {
                    // A replayed settle records its run too (a retry after an error that hid
                    // the commit); the run's id keeps that idempotent.
                    let session = self.record_attached(p, &outcome, now)?;
                    results.push(Ok(Done { outcome, session }));
                }
                Ok(Step::Tier { limits, warnings, fingerprint }) => {
                    let effect = self.write_tier(&p.cmd, &limits, warnings, fingerprint, now)?;
                    results.push(Ok(Done { outcome: Ok(Committed { effect, replayed: false }), session: None }));
                }
                Ok(Step::Apply { account_id, transition, fingerprint }) => {
                    let (id, effect) = self.write(&p.cmd, account_id, *transition, fingerprint, now)?;
                    wrote = true;
                    if account_id.is_some() && !dirty.contains(&id) {
                        dirty.push(id);
                    }
                    let outcome = Ok(Committed { effect, replayed: false });
                    let session = self.record_attached(p, &outcome, now)?;
                    results.push(Ok(Done { outcome, session }));
                }
            }
        }
        if self.conn.is_autocommit() {
            return Err(Error::Backend("the transaction was rolled back by SQLite".into()));
        }
        for id in dirty {
            let c = self.cache.accounts.get_mut(&id).expect("dirty accounts are cached");
            update_account(&self.conn, id, &c.state, c.indexed_changed, now)?;
            c.indexed_changed = false;
        }
        if wrote {
            self.index_history()?;
        }
        if let Some(s) = &self.sync {
            s.begin();
        }
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(results)
    }

    /// Records the run attached to a settle command once it settled (see
    /// [`Store::settle_run`]), inside the group's transaction. Returns where its turns went.
    fn record_attached(&self, p: &Prepared, outcome: &Outcome, now: DateTime<Utc>) -> Result<Option<SessionId>> {
        let Some(r) = &p.run else { return Ok(None) };
        let Some(credits) = settled_credits(outcome)? else { return Ok(None) };
        let run = RunRecord { credits, ..r.run.clone() };
        if run.session.is_some() {
            // In a savepoint: a session that is gone or full leaves nothing behind.
            self.conn.prepare_cached("SAVEPOINT run_in_session")?.execute([])?;
            let r = (|| {
                if let Some(ns) = &r.new_session {
                    insert_session(&self.conn, ns, now)?;
                }
                write_run(&self.conn, &run, &r.turns, now)
            })();
            match r {
                Ok(_) => {
                    self.conn.prepare_cached("RELEASE run_in_session")?.execute([])?;
                    return Ok(run.session);
                }
                Err(e @ (Error::Backend(_) | Error::Invariant(_))) => return Err(e),
                Err(_) => {
                    self.conn.prepare_cached("ROLLBACK TO run_in_session")?.execute([])?;
                    self.conn.prepare_cached("RELEASE run_in_session")?.execute([])?;
                }
            }
        }
        write_run(&self.conn, &RunRecord { session: None, ..run }, &[], now)?;
        Ok(None)
    }

    /// Indexes the log's tail by account once it holds `index_batch` entries: each account's
    /// new entries become one row of `ledger_by_account_batches` (see [`index_log`]), so an
    /// account's end of the index is sought and written once per batch rather than once per
    /// entry.
    fn index_history(&mut self) -> Result<()> {
        let upto = match self.cache.indexed_upto {
            Some(upto) => upto,
            None => self.conn.prepare_cached("SELECT indexed_upto FROM ledger_index_state WHERE id = 1")?.query_row([], |r| r.get(0))?,
        };
        self.cache.indexed_upto = Some(upto);
        let last: i64 = self.conn.prepare_cached("SELECT COALESCE(max(id), 0) FROM ledger_entries")?.query_row([], |r| r.get(0))?;
        if last - upto < self.index_batch {
            return Ok(());
        }
        index_log(&self.conn, upto, last)?;
        self.conn.prepare_cached("UPDATE ledger_index_state SET indexed_upto = ?1 WHERE id = 1")?.execute([last])?;
        // On a failure the group rolls back and the cache (this value included) is dropped.
        self.cache.indexed_upto = Some(last);
        // The daily usage rollups follow at the same pace, so their tail stays as bounded.
        roll_up_usage(&self.conn)?;
        Ok(())
    }

    /// The tier table, loaded once per change of the database.
    fn tiers(&mut self) -> Result<Arc<TierTable>> {
        if let Some(t) = &self.cache.tiers {
            return Ok(t.clone());
        }
        let t = Arc::new(load_tiers(&self.conn)?);
        self.cache.tiers = Some(t.clone());
        Ok(t)
    }

    fn write_tier(&mut self, cmd: &Command, limits: &TierLimits, warnings: Vec<LimitWarning>, fingerprint: i64, now: DateTime<Utc>) -> Result<Effect> {
        self.conn
            .prepare_cached(
                "INSERT INTO cost_tiers (name, monthly_revenue_micros, monthly_cost_limit_micros, daily_cost_limit_micros, hourly_request_limit,
                                         alert_threshold_pct, throttle_on_exceed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (name) DO UPDATE SET monthly_revenue_micros = excluded.monthly_revenue_micros,
                    monthly_cost_limit_micros = excluded.monthly_cost_limit_micros, daily_cost_limit_micros = excluded.daily_cost_limit_micros,
                    hourly_request_limit = excluded.hourly_request_limit, alert_threshold_pct = excluded.alert_threshold_pct,
                    throttle_on_exceed = excluded.throttle_on_exceed",
            )?
            .execute(params![
                limits.name,
                limits.monthly_revenue_micros,
                limits.monthly_cost_limit_micros,
                limits.daily_cost_limit_micros,
                limits.hourly_request_limit,
                limits.alert_threshold_pct,
                limits.throttle_on_exceed
            ])?;
        let mut tiers = (*self.tiers()?).clone();
        tiers.set(limits.clone())?;
        self.cache.tiers = Some(Arc::new(tiers));
        let effect = Effect::TierSet { warnings };
        self.remember(cmd, &effect, fingerprint, now)?;
        Ok(effect)
    }

    /// Stores a keyed command's first result.
    fn remember(&self, cmd: &Command, effect: &Effect, fingerprint: i64, now: DateTime<Utc>) -> Result<()> {
        if let Some(key) = cmd.key() {
            let outcome = outcome::encode(effect);
            self.conn.prepare_cached("INSERT INTO idempotency (key, fingerprint, outcome, at_ms) VALUES (?1, ?2, ?3, ?4)")?.execute(params![
                key.as_str(),
                fingerprint,
                outcome,
                ms(now)
            ])?;
        }
        Ok(())
    }

    /// Loads an account (by internal id or external id) into the cache.
    fn load(&mut self, id: Option<i64>, ext: Option<&AccountId>) -> Result<Option<i64>> {
        if let Some(id) = id.filter(|id| self.cache.accounts.contains_key(id)) {
            return Ok(Some(id));
        }
        if let Some(id) = ext.and_then(|e| self.cache.ids.get(e)) {
            return Ok(Some(*id));
        }
        let loaded = match (id, ext) {
            (Some(id), _) => load_account_by_id(&self.conn, id)?.map(|(ext, s)| (id, ext, s)),
            (None, Some(ext)) => load_account(&self.conn, ext)?.map(|(id, s)| (id, ext.clone(), s)),
            (None, None) => None,
        };
        let Some((id, ext, state)) = loaded else {
            return Ok(None);
        };
        let holds = load_open_holds(&self.conn, id)?;
        for h in &holds {
            self.cache.holds.insert(h.id, id);
        }
        self.cache.ids.insert(ext.clone(), id);
        self.cache.accounts.insert(id, Cached { ext, state, holds, indexed_changed: false });
        Ok(Some(id))
    }

    /// Everything before the first write: idempotency, snapshot, the rules.
    fn prepare(&mut self, p: &Prepared, now: DateTime<Utc>) -> Result<Step> {
        let cmd = &p.cmd;
        if let Some(key) = cmd.key() {
            let found = self
                .conn
                .prepare_cached("SELECT fingerprint, outcome FROM idempotency WHERE key = ?1")?
                .query_row([key.as_str()], |r| Ok((r.get::<_, i64>(0)?, outcome::decode(r.get_ref(1)?))))
                .optional()?;
            if let Some((stored, effect)) = found {
                if stored != p.fingerprint {
                    return Err(Error::IdempotencyConflict { key: key.to_string() });
                }
                return Ok(Step::Done(Ok(Committed { effect: effect?, replayed: true })));
            }
        }
        if let Command::SetTier(c) = cmd {
            let warnings = c.limits.validate()?;
            return Ok(Step::Tier { limits: c.limits.clone(), warnings, fingerprint: p.fingerprint });
        }
        let mut snap = Snapshot::default();
        let mut account_id = None;
        if let Some(hold_id) = cmd.hold() {
            if let Some(&id) = self.cache.holds.get(&hold_id) {
                let c = &self.cache.accounts[&id];
                let h = c.holds.iter().find(|h| h.id == hold_id).ok_or_else(|| Error::Invariant("cached hold missing".into()))?;
                snap.hold = Some(HoldRecord { id: hold_id, amount: h.amount, deadline: h.deadline, status: rules::HoldStatus::Open });
                account_id = Some(id);
            } else {
                let row = self
                    .conn
                    .prepare_cached("SELECT account_id, amount, deadline_ms, status FROM holds WHERE id = ?1")?
                    .query_row([hold_id.0], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?)))
                    .optional()?;
                if let Some((acc, amount, deadline, status)) = row {
                    snap.hold = Some(HoldRecord { id: hold_id, amount, deadline: at(deadline)?, status: rules::HoldStatus::parse(&status)? });
                    account_id = Some(acc);
                }
            }
        }
        let account_id = match (account_id, cmd.account()) {
            (Some(id), _) => self.load(Some(id), None)?,
            (None, Some(ext)) => self.load(None, Some(ext))?,
            (None, None) => None,
        };
        if let Some(id) = account_id {
            let c = &self.cache.accounts[&id];
            snap.state = Some(c.state.clone());
            snap.open_holds = c.holds.clone();
            if let Command::Refund(r) = cmd {
                snap.charge = load_charge(&self.conn, id, r.entry)?;
            }
        }
        let tiers = self.tiers()?;
        Ok(match rules::apply(&self.ledger, &tiers, &snap, cmd, now)? {
            Ok(transition) => Step::Apply { account_id, transition: Box::new(transition), fingerprint: p.fingerprint },
            Err(rejection) => Step::Done(Err(rejection)),
        })
    }

    /// Writes a transition and moves the cache along. Returns the account id and the effect.
    fn write(&mut self, cmd: &Command, account_id: Option<i64>, mut t: Transition, fingerprint: i64, now: DateTime<Utc>) -> Result<(i64, Effect)> {
        let conn = &self.conn;
        let id = match (account_id, cmd) {
            (Some(id), _) => id,
            (None, Command::CreateAccount(c)) => {
                let id = insert_account(conn, &c.account, &t.state, now)?;
                self.cache.ids.insert(c.account.clone(), id);
                self.cache.accounts.insert(id, Cached { ext: c.account.clone(), state: t.state.clone(), holds: Vec::new(), indexed_changed: false });
                id
            }
            (None, _) => return Err(Error::Invariant("transition without an account".into())),
        };
        let mut new_hold = None;
        if let Some(h) = &t.new_hold {
            conn.prepare_cached(
                "INSERT INTO holds (account_id, amount, deadline_ms, status, reference, created_ms, cost_micros) VALUES (?1, ?2, ?3, 'open', ?4, ?5, ?6)",
            )?
            .execute(params![id, h.amount, ms(h.deadline), h.reference, ms(now), h.cost_micros])?;
            let hold_id = HoldId(conn.last_insert_rowid());
            t.effect.set_hold(hold_id);
            new_hold = Some(OpenHold { id: hold_id, amount: h.amount, deadline: h.deadline, cost_micros: h.cost_micros });
        }
        for (hold_id, status) in &t.closed_holds {
            let n = conn.prepare_cached("UPDATE holds SET status = ?2, closed_ms = ?3 WHERE id = ?1 AND status = 'open'")?.execute(params![
                hold_id.0,
                status.as_str(),
                ms(now)
            ])?;
            if n != 1 {
                return Err(Error::Invariant(format!("hold {hold_id:?} was not open")));
            }
        }
        let mut main_entry = None;
        {
            let mut ins = conn.prepare_cached(
                "INSERT INTO ledger_entries (account_id, at_ms, kind, d_monthly, d_rollover, d_purchased, d_held, balance_after, held_after, source, hold_id, ref_entry, reference, rollover_expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?;
            for e in &t.entries {
                let hold = e.hold.map(|h| if h == NEW_HOLD { new_hold.map_or(h, |n| n.id) } else { h });
                ins.execute(params![
                    id,
                    ms(now),
                    e.kind.as_str(),
                    e.delta.monthly,
                    e.delta.rollover,
                    e.delta.purchased,
                    e.held_delta,
                    e.balance_after,
                    e.held_after,
                    e.source.map(GrantSource::as_str),
                    hold.map(|h| h.0),
                    e.ref_entry.map(|r| r.0),
                    e.reference,
                    e.rollover_expires_at.map(ms),
                ])?;
                if e.main {
                    main_entry = Some((EntryId(conn.last_insert_rowid()), e.delta, hold));
                }
            }
        }
        if let Some((entry, _, _)) = main_entry {
            t.effect.set_entry(entry);
        }
        if let Some(u) = &t.usage {
            let (entry, delta, hold) = main_entry.ok_or_else(|| Error::Invariant("usage without a charge entry".into()))?;
            conn.prepare_cached(
                "INSERT INTO usage_records (entry_id, account_id, at_ms, hold_id, operation, model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, credits, cost_micros)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?
            .execute(params![
                entry.0,
                id,
                ms(now),
                hold.map(|h| h.0),
                u.operation,
                u.model,
                u.tokens.input as i64,
                u.tokens.output as i64,
                u.tokens.cache_read as i64,
                u.tokens.cache_write as i64,
                -delta.total(),
                u.cost_micros,
            ])?;
        }
        // One alert per account, kind and month: one already recorded is not recorded (nor sent)
        // again, and never fails the settle that raised it.
        let mut new_alerts = Vec::with_capacity(t.alerts.len());
        for a in &t.alerts {
            let n = conn
                .prepare_cached(
                    "INSERT INTO cost_alerts (account_id, kind, month_ms, cost_micros, limit_micros, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (account_id, kind, month_ms) DO NOTHING",
                )?
                .execute(params![id, alert_kind_str(a.kind), day_ms(a.month), a.cost_micros, a.limit_micros, ms(a.at)])?;
            if n == 1 {
                new_alerts.push(a.clone());
            }
        }
        self.remember(cmd, &t.effect, fingerprint, now)?;
        // The cache follows the committed-to-be state.
        let c = self.cache.accounts.get_mut(&id).ok_or_else(|| Error::Invariant("account not cached".into()))?;
        self.alerts.extend(new_alerts.into_iter().map(|a| (c.ext.clone(), a)));
        let next_expiry = |s: &AccountState| s.next_expiry().map(|l| l.expires_at);
        c.indexed_changed |= c.state.plan != t.state.plan || next_expiry(&c.state) != next_expiry(&t.state);
        c.state = t.state;
        for (hold_id, _) in &t.closed_holds {
            c.holds.retain(|h| h.id != *hold_id);
            self.cache.holds.remove(hold_id);
        }
        if let Some(h) = new_hold {
            c.holds.push(h);
            self.cache.holds.insert(h.id, id);
        }
        Ok((id, t.effect))
    }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// Whole milliseconds, rounded up (for bounds: `at >= from` and `at < until` on stored ms).
fn ms_ceil(t: DateTime<Utc>) -> i64 {
    let m = t.timestamp_millis();
    if t.timestamp_subsec_nanos().is_multiple_of(1_000_000) { m } else { m + 1 }
}

fn at(ms: i64) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms).ok_or(rusqlite::Error::IntegralValueOutOfRange(0, ms))
}

fn lots_json(lots: &[Lot]) -> String {
    let v: Vec<(i64, i64)> = lots.iter().map(|l| (l.amount, ms(l.expires_at))).collect();
    serde_json::to_string(&v).expect("lots serialize")
}

fn parse_lots(s: &str) -> Result<Vec<Lot>> {
    let v: Vec<(i64, i64)> = serde_json::from_str(s).map_err(|e| Error::Invariant(format!("rollover_lots: {e}")))?;
    v.into_iter().map(|(amount, exp)| Ok(Lot { amount, expires_at: at(exp)? })).collect()
}

const ACCOUNT_COLUMNS: &str = "id, external_id, kind, monthly, purchased, held, rollover_lots, plan_credits, plan_active, period_end_ms, plan_anchor_day,
    org_member, tier_override, cost_day_ms, day_cost_micros, cost_month_ms, month_cost_micros, held_cost_micros, throttle, requests, alerted";

fn invariant(what: &str) -> impl Fn(String) -> Error + '_ {
    move |e| Error::Invariant(format!("{what}: {e}"))
}

/// Reads a row of [`ACCOUNT_COLUMNS`].
fn account_from_row(r: &rusqlite::Row<'_>) -> Result<(i64, AccountId, AccountState)> {
    let kind = match r.get_ref(2)?.as_str().map_err(|e| Error::Invariant(e.to_string()))? {
        "user" => AccountKind::User,
        "organisation" => AccountKind::Organisation,
        k => return Err(Error::Invariant(format!("unknown account kind {k:?}"))),
    };
    let plan = match (r.get::<_, Option<i64>>(7)?, r.get::<_, Option<bool>>(8)?, r.get::<_, Option<i64>>(9)?) {
        (Some(c), Some(a), Some(p)) => {
            let period_end = at(p)?;
            let anchor_day = r.get::<_, Option<u32>>(10)?.unwrap_or_else(|| chrono::Datelike::day(&period_end));
            Some(PlanState { monthly_credits: c, active: a, period_end, anchor_day })
        }
        _ => None,
    };
    let cost = CostState {
        day: r.get::<_, Option<i64>>(13)?.map(|t| at(t).map(|t| t.date_naive())).transpose()?,
        day_cost_micros: r.get(14)?,
        month: r.get::<_, Option<i64>>(15)?.map(|t| at(t).map(|t| t.date_naive())).transpose()?,
        month_cost_micros: r.get(16)?,
        held_cost_micros: r.get(17)?,
        throttle: r.get::<_, Option<String>>(18)?.map(|j| serde_json::from_str(&j).map_err(|e| invariant("throttle")(e.to_string()))).transpose()?,
        requests_ms: decode_requests(r.get_ref(19)?.as_blob_or_null().map_err(|e| Error::Invariant(e.to_string()))?)?,
        alerted: decode_alerted(r.get(20)?),
    };
    let state = AccountState {
        kind,
        monthly: r.get(3)?,
        purchased: r.get(4)?,
        rollover: parse_lots(&r.get::<_, String>(6)?)?,
        held: r.get(5)?,
        plan,
        cost,
        org_member: r.get(11)?,
        tier: r.get(12)?,
    };
    Ok((r.get(0)?, AccountId::new(r.get::<_, String>(1)?)?, state))
}

fn decode_requests(b: Option<&[u8]>) -> Result<Vec<i64>> {
    let b = b.unwrap_or_default();
    if !b.len().is_multiple_of(8) {
        return Err(Error::Invariant(format!("requests blob of {} bytes", b.len())));
    }
    Ok(b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

fn encode_requests(v: &[i64]) -> Option<Vec<u8>> {
    (!v.is_empty()).then(|| v.iter().flat_map(|t| t.to_le_bytes()).collect())
}

fn day_ms(d: chrono::NaiveDate) -> i64 {
    ms(crate::cost::day_start(d))
}

fn load_account(conn: &Connection, ext: &AccountId) -> Result<Option<(i64, AccountState)>> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE external_id = ?1"))?;
    let mut rows = stmt.query([ext.as_str()])?;
    rows.next()?.map(|r| account_from_row(r).map(|(id, _, s)| (id, s))).transpose()
}

fn load_account_by_id(conn: &Connection, id: i64) -> Result<Option<(AccountId, AccountState)>> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?1"))?;
    let mut rows = stmt.query([id])?;
    rows.next()?.map(|r| account_from_row(r).map(|(_, ext, s)| (ext, s))).transpose()
}

fn load_open_holds(conn: &Connection, account_id: i64) -> Result<Vec<OpenHold>> {
    let mut stmt = conn.prepare_cached("SELECT id, amount, deadline_ms, cost_micros FROM holds WHERE account_id = ?1 AND status = 'open'")?;
    let rows = stmt.query_map([account_id], |r| Ok(OpenHold { id: HoldId(r.get(0)?), amount: r.get(1)?, deadline: at(r.get(2)?)?, cost_micros: r.get(3)? }))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn load_charge(conn: &Connection, account_id: i64, entry: EntryId) -> Result<Option<ChargeRecord>> {
    let row = conn
        .prepare_cached("SELECT kind, d_monthly, d_rollover, d_purchased, rollover_expires_ms FROM ledger_entries WHERE id = ?1 AND account_id = ?2")?
        .query_row(params![entry.0, account_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?, r.get::<_, Option<i64>>(4)?))
        })
        .optional()?;
    let Some((kind, m, ro, p, exp)) = row else {
        return Ok(None);
    };
    let refunded = conn
        .prepare_cached("SELECT COALESCE(SUM(d_monthly), 0), COALESCE(SUM(d_rollover), 0), COALESCE(SUM(d_purchased), 0) FROM ledger_entries WHERE ref_entry = ?1 AND kind = 'refund'")?
        .query_row([entry.0], |r| Ok(BucketAmounts { monthly: r.get(0)?, rollover: r.get(1)?, purchased: r.get(2)? }))?;
    Ok(Some(ChargeRecord {
        id: entry,
        kind: EntryKind::parse(&kind)?,
        charged: BucketAmounts { monthly: -m, rollover: -ro, purchased: -p },
        rollover_expires_at: exp.map(at).transpose()?,
        refunded,
    }))
}

fn plan_columns(s: &AccountState) -> (Option<i64>, Option<bool>, Option<i64>, Option<u32>) {
    match s.plan {
        Some(p) => (Some(p.monthly_credits), Some(p.active), Some(ms(p.period_end)), Some(p.anchor_day)),
        None => (None, None, None, None),
    }
}

/// Inserts the account's identity, then writes its state with [`update_account`], so the
/// column list lives in one place.
fn insert_account(conn: &Connection, ext: &AccountId, s: &AccountState, now: DateTime<Utc>) -> Result<i64> {
    conn.prepare_cached(
        "INSERT INTO accounts (external_id, kind, monthly, rollover, purchased, held, created_ms, updated_ms)
         VALUES (?1, ?2, 0, 0, 0, 0, ?3, ?3)",
    )?
    .execute(params![ext.as_str(), s.kind.as_str(), ms(now)])?;
    let id = conn.last_insert_rowid();
    update_account(conn, id, s, true, now)?;
    Ok(id)
}

/// Writes an account's balances and cost state; the indexed columns (plan period end, next
/// expiry) only when they changed, so a plain spend does not rewrite index entries.
fn update_account(conn: &Connection, id: i64, s: &AccountState, indexed_changed: bool, now: DateTime<Utc>) -> Result<()> {
    let c = &s.cost;
    let throttle = c.throttle.as_ref().map(|t| serde_json::to_string(t).expect("throttles serialize"));
    let lifts = c.throttle.as_ref().and_then(crate::cost::Throttle::lifts_at).map(ms);
    let cost_params = params![
        c.day.map(day_ms),
        c.day_cost_micros,
        c.month.map(day_ms),
        c.month_cost_micros,
        c.held_cost_micros,
        throttle,
        lifts,
        encode_requests(&c.requests_ms),
        encode_alerted(&c.alerted),
        s.org_member,
        s.tier,
    ];
    const COST: &str = "cost_day_ms = ?8, day_cost_micros = ?9, cost_month_ms = ?10, month_cost_micros = ?11, held_cost_micros = ?12,
        throttle = ?13, throttle_lifts_ms = ?14, requests = ?15, alerted = ?16, org_member = ?17, tier_override = ?18";
    let base = params![id, s.monthly, s.rollover_total(), s.purchased, s.held, lots_json(&s.rollover), ms(now)];
    if indexed_changed {
        let (pc, pa, pe, anchor) = plan_columns(s);
        let plan_params = params![s.next_expiry().map(|l| ms(l.expires_at)), pc, pa, pe, anchor];
        let all: Vec<&dyn rusqlite::ToSql> = base.iter().chain(cost_params.iter()).chain(plan_params.iter()).copied().collect();
        conn.prepare_cached(&format!(
            "UPDATE accounts SET monthly = ?2, rollover = ?3, purchased = ?4, held = ?5, rollover_lots = ?6, updated_ms = ?7, {COST},
             next_expiry_ms = ?19, plan_credits = ?20, plan_active = ?21, period_end_ms = ?22, plan_anchor_day = ?23 WHERE id = ?1"
        ))?
        .execute(all.as_slice())?;
    } else {
        let all: Vec<&dyn rusqlite::ToSql> = base.iter().chain(cost_params.iter()).copied().collect();
        conn.prepare_cached(&format!(
            "UPDATE accounts SET monthly = ?2, rollover = ?3, purchased = ?4, held = ?5, rollover_lots = ?6, updated_ms = ?7, {COST} WHERE id = ?1"
        ))?
        .execute(all.as_slice())?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reads

fn entry_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Entry, String, Option<String>)> {
    let kind: String = r.get(3)?;
    let source: Option<String> = r.get(11)?;
    Ok((
        Entry {
            id: EntryId(r.get(0)?),
            account: AccountId::new(r.get::<_, String>(1)?).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
            at: at(r.get(2)?)?,
            kind: EntryKind::Grant,
            delta: BucketAmounts { monthly: r.get(4)?, rollover: r.get(5)?, purchased: r.get(6)? },
            held_delta: r.get(7)?,
            balance_after: r.get(8)?,
            held_after: r.get(9)?,
            source: None,
            hold: r.get::<_, Option<i64>>(10)?.map(HoldId),
            ref_entry: r.get::<_, Option<i64>>(12)?.map(EntryId),
            reference: r.get(13)?,
            rollover_expires_at: r.get::<_, Option<i64>>(14)?.map(at).transpose()?,
        },
        kind,
        source,
    ))
}

/// Runs `f` in one read transaction, so its queries see one snapshot.
fn in_snapshot<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    conn.prepare_cached("BEGIN")?.execute([])?;
    let r = f(conn);
    conn.prepare_cached("COMMIT")?.execute([])?;
    r
}

/// The newest log entries `e` of the account with internal id `account_id` (with the tables
/// of `join`), ids below `before`, passing `filter` (whose parameters `extra` are `?4`, `?5`,
/// ...), newest first, at most `limit`. Call inside one snapshot: entries above `indexed_upto`
/// come from a scan of the log's tail, the older ones from `ledger_by_account_batches`, row by
/// row, newest first: the first row ending at or above `before` (it may hold ids on both sides
/// of it), then the rows ending below it (rows of an account never overlap, see `V9`).
fn account_entries<T>(
    conn: &Connection,
    select: &str,
    join: &str,
    filter: &str,
    (account_id, before, limit): (i64, i64, i64),
    extra: &[&dyn rusqlite::ToSql],
    mut map: impl FnMut(&rusqlite::Row<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    let tail = format!(
        "SELECT {select} FROM ledger_entries e {join}
         WHERE e.id > (SELECT indexed_upto FROM ledger_index_state WHERE id = 1) AND e.account_id = ?1 AND e.id < ?2 {filter}
         ORDER BY e.id DESC LIMIT ?3"
    );
    // The row's key comes after the caller's parameters.
    let row_param = 4 + extra.len();
    let in_row = format!(
        "SELECT {select} FROM ledger_by_account_batches x, json_each(x.entries) j JOIN ledger_entries e ON e.id = j.value {join}
         WHERE x.account_id = ?1 AND x.last_entry = ?{row_param} AND j.value < ?2 {filter}
         ORDER BY j.value DESC LIMIT ?3"
    );
    let mut out = Vec::new();
    let mut take = |sql: &str, row: Option<i64>, out: &mut Vec<T>| -> Result<()> {
        let left = limit - out.len() as i64;
        if left <= 0 {
            return Ok(());
        }
        let mut params: Vec<&dyn rusqlite::ToSql> = [&account_id as &dyn rusqlite::ToSql, &before, &left].into_iter().chain(extra.iter().copied()).collect();
        if let Some(row) = &row {
            params.push(row);
        }
        let mut stmt = conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params.as_slice())?;
        while let Some(r) = rows.next()? {
            out.push(map(r)?);
        }
        Ok(())
    };
    take(&tail, None, &mut out)?;
    // Newest first from the first row ending at or above `before` (or from `before` if none does).
    let mut stmt = conn.prepare_cached(
        "SELECT last_entry FROM ledger_by_account_batches WHERE account_id = ?1
           AND last_entry <= COALESCE((SELECT min(last_entry) FROM ledger_by_account_batches WHERE account_id = ?1 AND last_entry >= ?2), ?2)
         ORDER BY last_entry DESC",
    )?;
    let mut rows = stmt.query(params![account_id, before])?;
    while (out.len() as i64) < limit {
        let Some(r) = rows.next()? else { break };
        take(&in_row, Some(r.get(0)?), &mut out)?;
    }
    Ok(out)
}

fn query_history(conn: &Connection, q: &HistoryQuery) -> Result<HistoryPage> {
    let Some((account_id, _)) = load_account(conn, &q.account)? else {
        return Err(Error::UnknownAccount(q.account.to_string()));
    };
    let mut filter = String::from("AND e.at_ms >= ?4 AND e.at_ms < ?5");
    if !q.kinds.is_empty() {
        let kinds: Vec<String> = q.kinds.iter().map(|k| format!("'{}'", k.as_str())).collect();
        filter.push_str(&format!(" AND e.kind IN ({})", kinds.join(",")));
    }
    let select = "e.id, ?6, e.at_ms, e.kind, e.d_monthly, e.d_rollover, e.d_purchased, e.d_held, e.balance_after, e.held_after,
                  e.hold_id, e.source, e.ref_entry, e.reference, e.rollover_expires_ms";
    let (before, from, until) = (q.before.map_or(i64::MAX, |b| b.0), q.from.map_or(i64::MIN, ms_ceil), q.until.map_or(i64::MAX, ms_ceil));
    let limit = i64::from(q.limit) + 1;
    let account = q.account.as_str();
    let mut entries = in_snapshot(conn, |conn| {
        account_entries(conn, select, "", &filter, (account_id, before, limit), &[&from, &until, &account], |row| {
            let (mut e, kind, source) = entry_from_row(row)?;
            e.kind = EntryKind::parse(&kind)?;
            e.source = source.as_deref().map(parse_source).transpose()?;
            Ok(e)
        })
    })?;
    let next = if entries.len() > q.limit as usize {
        entries.truncate(q.limit as usize);
        entries.last().map(|e| e.id)
    } else {
        None
    };
    Ok(HistoryPage { entries, next })
}

fn query_balance(conn: &Connection, account: &AccountId, now: DateTime<Utc>) -> Result<BalanceView> {
    let Some((id, state)) = load_account(conn, account)? else {
        return Err(Error::UnknownAccount(account.to_string()));
    };
    let holds = load_open_holds(conn, id)?;
    let (state, holds) = rules::view_at(&state, &holds, now);
    Ok(BalanceView::from_state(account.clone(), &state, holds.len() as u32))
}

fn query_usage(conn: &Connection, account: &AccountId, before: Option<EntryId>, limit: u32) -> Result<Vec<UsageRow>> {
    let Some((id, _)) = load_account(conn, account)? else {
        return Err(Error::UnknownAccount(account.to_string()));
    };
    let limit = i64::from(limit);
    in_snapshot(conn, |conn| {
        account_entries(
            conn,
            "u.at_ms, u.entry_id, u.hold_id, u.operation, u.model, u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens, u.credits, u.cost_micros",
            "JOIN usage_records u ON u.entry_id = e.id",
            "AND e.kind IN ('spend', 'settle', 'meter')",
            (id, before.map_or(i64::MAX, |e| e.0), limit),
            &[],
            |r| {
                Ok(UsageRow {
                    account: account.clone(),
                    at: at(r.get(0)?)?,
                    entry: EntryId(r.get(1)?),
                    hold: r.get::<_, Option<i64>>(2)?.map(HoldId),
                    usage: Usage {
                        operation: r.get(3)?,
                        model: r.get(4)?,
                        tokens: crate::pricing::TokenUsage {
                            input: r.get::<_, i64>(5)? as u64,
                            output: r.get::<_, i64>(6)? as u64,
                            cache_read: r.get::<_, i64>(7)? as u64,
                            cache_write: r.get::<_, i64>(8)? as u64,
                        },
                        cost_micros: r.get(10)?,
                    },
                    credits: r.get(9)?,
                })
            },
        )
    })
}

fn query_due(conn: &Connection, due: Due, after: Option<&AccountId>, limit: u32, now: DateTime<Utc>) -> Result<Vec<AccountId>> {
    let after = after.map_or("", |a| a.as_str());
    if due == Due::CostReset {
        // The three conditions of CostState::reset_due.
        let today = now.date_naive();
        let mut stmt = conn.prepare_cached(
            "SELECT external_id FROM accounts WHERE external_id > ?2
               AND (cost_month_ms < ?4 OR (cost_day_ms < ?5 AND day_cost_micros > 0) OR throttle_lifts_ms <= ?1)
             ORDER BY external_id LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![ms(now), after, limit, day_ms(crate::cost::month_start(today)), day_ms(today)], |r| r.get::<_, String>(0))?;
        return rows.map(|r| AccountId::new(r?)).collect();
    }
    let sql = match due {
        Due::CostReset => unreachable!("handled above"),
        Due::Rollover => "SELECT external_id FROM accounts WHERE period_end_ms <= ?1 AND external_id > ?2 ORDER BY external_id LIMIT ?3",
        Due::ExpiredCredits => "SELECT external_id FROM accounts WHERE next_expiry_ms <= ?1 AND external_id > ?2 ORDER BY external_id LIMIT ?3",
        Due::ExpiredHolds => {
            "SELECT a.external_id FROM accounts a WHERE a.external_id > ?2
               AND EXISTS (SELECT 1 FROM holds h WHERE h.account_id = a.id AND h.status = 'open' AND h.deadline_ms <= ?1)
             ORDER BY a.external_id LIMIT ?3"
        }
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params![ms(now), after, limit], |r| r.get::<_, String>(0))?;
    rows.map(|r| AccountId::new(r?)).collect()
}

fn load_tiers(conn: &Connection) -> Result<TierTable> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, monthly_revenue_micros, monthly_cost_limit_micros, daily_cost_limit_micros, hourly_request_limit, alert_threshold_pct,
                throttle_on_exceed FROM cost_tiers ORDER BY name",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(TierLimits {
            name: r.get(0)?,
            monthly_revenue_micros: r.get(1)?,
            monthly_cost_limit_micros: r.get(2)?,
            daily_cost_limit_micros: r.get(3)?,
            hourly_request_limit: r.get(4)?,
            alert_threshold_pct: r.get(5)?,
            throttle_on_exceed: r.get(6)?,
        })
    })?;
    let tiers = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    TierTable::from_tiers(tiers).map_err(|e| Error::Invariant(format!("cost_tiers: {e}")))
}

/// Rolls the usage records above the watermark into `usage_daily` and moves the watermark.
/// Call inside a write transaction. Returns the records rolled up.
fn roll_up_usage(conn: &Connection) -> Result<u64> {
    let upto: i64 = conn.prepare_cached("SELECT rolled_upto FROM usage_rollup_state WHERE id = 1")?.query_row([], |r| r.get(0))?;
    let (last, n): (i64, i64) = conn
        .prepare_cached("SELECT COALESCE(max(entry_id), ?1), count(*) FROM usage_records WHERE entry_id > ?1")?
        .query_row([upto], |r| Ok((r.get(0)?, r.get(1)?)))?;
    if n == 0 {
        return Ok(0);
    }
    conn.prepare_cached(
        "INSERT INTO usage_daily (account_id, day_ms, runs, credits, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_micros)
         SELECT account_id, (at_ms / 86400000) * 86400000, count(*), sum(credits), sum(input_tokens), sum(output_tokens),
                sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_micros)
         FROM usage_records WHERE entry_id > ?1 AND entry_id <= ?2 GROUP BY 1, 2
         ON CONFLICT (account_id, day_ms) DO UPDATE SET runs = runs + excluded.runs, credits = credits + excluded.credits,
            input_tokens = input_tokens + excluded.input_tokens, output_tokens = output_tokens + excluded.output_tokens,
            cache_read_tokens = cache_read_tokens + excluded.cache_read_tokens, cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
            cost_micros = cost_micros + excluded.cost_micros",
    )?
    .execute([upto, last])?;
    conn.prepare_cached("UPDATE usage_rollup_state SET rolled_upto = ?1 WHERE id = 1")?.execute([last])?;
    Ok(n as u64)
}

/// The columns the cost views need (lighter than a whole account).
const COST_COLUMNS: &str = "external_id, kind, plan_credits IS NOT NULL, org_member, tier_override, cost_day_ms, day_cost_micros, cost_month_ms,
    month_cost_micros, held_cost_micros, throttle, requests";

fn cost_view_from_row(r: &rusqlite::Row<'_>, tiers: &TierTable, now: DateTime<Utc>) -> Result<CostView> {
    let kind = match r.get_ref(1)?.as_str().map_err(|e| Error::Invariant(e.to_string()))? {
        "user" => AccountKind::User,
        "organisation" => AccountKind::Organisation,
        k => return Err(Error::Invariant(format!("unknown account kind {k:?}"))),
    };
    let day = |i| -> Result<Option<chrono::NaiveDate>> { Ok(r.get::<_, Option<i64>>(i)?.map(|t| at(t).map(|t| t.date_naive())).transpose()?) };
    let cost = CostState {
        day: day(5)?,
        day_cost_micros: r.get(6)?,
        month: day(7)?,
        month_cost_micros: r.get(8)?,
        held_cost_micros: r.get(9)?,
        throttle: r
            .get_ref(10)?
            .as_str_or_null()
            .map_err(|e| Error::Invariant(e.to_string()))?
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| Error::Invariant(format!("throttle: {e}")))?,
        requests_ms: decode_requests(r.get_ref(11)?.as_blob_or_null().map_err(|e| Error::Invariant(e.to_string()))?)?,
        alerted: Vec::new(),
    };
    let tier_override: Option<String> = r.get(4)?;
    CostView::build(AccountId::new(r.get::<_, String>(0)?)?, kind, r.get(2)?, r.get(3)?, tier_override.as_deref(), &cost, tiers, now)
}

fn query_cost(conn: &Connection, account: &AccountId, now: DateTime<Utc>) -> Result<CostView> {
    let tiers = load_tiers(conn)?;
    let mut stmt = conn.prepare_cached(&format!("SELECT {COST_COLUMNS} FROM accounts WHERE external_id = ?1"))?;
    let mut rows = stmt.query([account.as_str()])?;
    match rows.next()? {
        Some(r) => cost_view_from_row(r, &tiers, now),
        None => Err(Error::UnknownAccount(account.to_string())),
    }
}

/// Calls `f` with every account's cost view after `after`, in id order, until it says stop.
fn scan_costs(conn: &Connection, after: Option<&AccountId>, now: DateTime<Utc>, mut f: impl FnMut(CostView) -> bool) -> Result<()> {
    let tiers = load_tiers(conn)?;
    let mut stmt = conn.prepare_cached(&format!("SELECT {COST_COLUMNS} FROM accounts WHERE external_id > ?1 ORDER BY external_id"))?;
    let mut rows = stmt.query([after.map_or("", |a| a.as_str())])?;
    while let Some(r) = rows.next()? {
        if !f(cost_view_from_row(r, &tiers, now)?) {
            break;
        }
    }
    Ok(())
}

fn query_summary(conn: &Connection, now: DateTime<Utc>) -> Result<crate::cost::Summary> {
    let tiers = load_tiers(conn)?;
    let mut users = Vec::new();
    let mut stmt = conn.prepare_cached(&format!("SELECT {COST_COLUMNS} FROM accounts"))?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        users.push(cost_view_from_row(r, &tiers, now)?.user_cost());
    }
    crate::cost::summarize(&tiers, &users)
}

fn query_alerts(conn: &Connection, q: &AlertQuery) -> Result<Vec<StoredAlert>> {
    let mut stmt = conn.prepare_cached(
        "SELECT c.id, a.external_id, c.kind, c.month_ms, c.cost_micros, c.limit_micros, c.at_ms
         FROM cost_alerts c JOIN accounts a ON a.id = c.account_id
         WHERE c.id > ?1 AND (?2 IS NULL OR a.external_id = ?2) ORDER BY c.id LIMIT ?3",
    )?;
    let mut rows = stmt.query(params![q.after.unwrap_or(0), q.account.as_ref().map(|a| a.as_str()), q.limit])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let kind = parse_alert_kind(r.get_ref(2)?.as_str().map_err(|e| Error::Invariant(e.to_string()))?)?;
        out.push(StoredAlert {
            id: r.get(0)?,
            account: AccountId::new(r.get::<_, String>(1)?)?,
            alert: Alert { kind, month: at(r.get(3)?)?.date_naive(), cost_micros: r.get(4)?, limit_micros: r.get(5)?, at: at(r.get(6)?)? },
        });
    }
    Ok(out)
}

fn query_daily_usage(conn: &Connection, q: &DailyUsageQuery) -> Result<Vec<DailyUsage>> {
    let account_id = match &q.account {
        Some(a) => Some(load_account(conn, a)?.ok_or_else(|| Error::UnknownAccount(a.to_string()))?.0),
        None => None,
    };
    let (from, until) = (day_ms(q.from), day_ms(q.until));
    let mut days: std::collections::BTreeMap<i64, DailyUsage> = std::collections::BTreeMap::new();
    in_snapshot(conn, |conn| {
        // The rollups, then the records above the watermark, grouped alike.
        let parts = [
            "SELECT day_ms, sum(runs), sum(credits), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_micros)
             FROM usage_daily WHERE day_ms >= ?1 AND day_ms < ?2 AND (?3 IS NULL OR account_id = ?3) GROUP BY day_ms",
            "SELECT (at_ms / 86400000) * 86400000 AS d, count(*), sum(credits), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_micros)
             FROM usage_records WHERE entry_id > (SELECT rolled_upto FROM usage_rollup_state WHERE id = 1)
               AND at_ms >= ?1 AND at_ms < ?2 AND (?3 IS NULL OR account_id = ?3) GROUP BY d",
        ];
        for sql in parts {
            let mut stmt = conn.prepare_cached(sql)?;
            let mut rows = stmt.query(params![from, until, account_id])?;
            while let Some(r) = rows.next()? {
                let d: i64 = r.get(0)?;
                let e = days.entry(d).or_insert_with(|| DailyUsage {
                    day: DateTime::from_timestamp_millis(d).map(|t| t.date_naive()).unwrap_or_default(),
                    runs: 0,
                    credits: 0,
                    tokens: crate::pricing::TokenUsage::default(),
                    cost_micros: 0,
                });
                e.runs += r.get::<_, i64>(1)? as u64;
                e.credits += r.get::<_, i64>(2)?;
                e.tokens.input += r.get::<_, i64>(3)? as u64;
                e.tokens.output += r.get::<_, i64>(4)? as u64;
                e.tokens.cache_read += r.get::<_, i64>(5)? as u64;
                e.tokens.cache_write += r.get::<_, i64>(6)? as u64;
                e.cost_micros += r.get::<_, i64>(7)?;
            }
        }
        Ok(())
    })?;
    Ok(days.into_values().collect())
}

fn run_verify(conn: &Connection) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let push = |report: &mut VerifyReport, account: &str, what: &str, stored: i64, from_log: i64| -> Result<()> {
        if report.discrepancies.len() < MAX_DISCREPANCIES {
            report.discrepancies.push(Discrepancy { account: AccountId::new(account)?, what: what.to_owned(), stored, from_log });
        }
        Ok(())
    };
    // Bucket totals and held against the sums of the log, and the account's own invariants.
    let mut stmt = conn.prepare(
        "SELECT a.id, a.external_id, a.monthly, a.rollover, a.purchased, a.held, a.rollover_lots,
                COALESCE(l.m, 0), COALESCE(l.r, 0), COALESCE(l.p, 0), COALESCE(l.h, 0), COALESCE(l.n, 0),
                (SELECT COALESCE(SUM(amount), 0) FROM holds h WHERE h.account_id = a.id AND h.status = 'open'),
                a.held_cost_micros,
                (SELECT COALESCE(SUM(cost_micros), 0) FROM holds h WHERE h.account_id = a.id AND h.status = 'open')
         FROM accounts a LEFT JOIN (
             SELECT account_id, SUM(d_monthly) AS m, SUM(d_rollover) AS r, SUM(d_purchased) AS p, SUM(d_held) AS h, COUNT(*) AS n
             FROM ledger_entries GROUP BY account_id) l ON l.account_id = a.id
         ORDER BY a.id",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let ext: String = r.get(1)?;
        let stored = [r.get::<_, i64>(2)?, r.get(3)?, r.get(4)?, r.get(5)?];
        let logged = [r.get::<_, i64>(7)?, r.get(8)?, r.get(9)?, r.get(10)?];
        for (i, what) in ["monthly", "rollover", "purchased", "held"].into_iter().enumerate() {
            if stored[i] != logged[i] {
                push(&mut report, &ext, what, stored[i], logged[i])?;
            }
        }
        let lots = parse_lots(&r.get::<_, String>(6)?)?;
        let lot_sum: i64 = lots.iter().map(|l| l.amount).sum();
        if lot_sum != stored[1] {
            push(&mut report, &ext, "rollover lots", stored[1], lot_sum)?;
        }
        let bad_lots = lots.iter().any(|l| l.amount <= 0) || lots.windows(2).any(|w| w[0].expires_at >= w[1].expires_at) || lots.len() > MAX_ROLLOVER_LOTS_HARD;
        if bad_lots {
            push(&mut report, &ext, "rollover lots malformed (count)", lots.len() as i64, 0)?;
        }
        let open: i64 = r.get(12)?;
        if open != stored[3] {
            push(&mut report, &ext, "open holds", stored[3], open)?;
        }
        let (held_cost, open_cost): (i64, i64) = (r.get(13)?, r.get(14)?);
        if held_cost != open_cost {
            push(&mut report, &ext, "held cost (micro-USD) of open holds", held_cost, open_cost)?;
        }
        report.accounts += 1;
        report.entries += r.get::<_, i64>(11)? as u64;
    }
    // Every entry's balance_after / held_after against the running sums.
    let mut stmt = conn.prepare(
        "SELECT a.external_id, x.balance_after, x.bal, x.held_after, x.hld FROM (
             SELECT account_id, balance_after, held_after,
                    SUM(d_monthly + d_rollover + d_purchased) OVER w AS bal, SUM(d_held) OVER w AS hld
             FROM ledger_entries WINDOW w AS (PARTITION BY account_id ORDER BY id ROWS UNBOUNDED PRECEDING)) x
         JOIN accounts a ON a.id = x.account_id
         WHERE x.balance_after != x.bal OR x.held_after != x.hld",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let ext: String = r.get(0)?;
        let (ba, bal, ha, hld): (i64, i64, i64, i64) = (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
        if ba != bal {
            push(&mut report, &ext, "entry balance_after", ba, bal)?;
        }
        if ha != hld {
            push(&mut report, &ext, "entry held_after", ha, hld)?;
        }
    }
    // The derived per-account index. Each row: an array of ids, strictly ascending, ending at
    // its key, above the account's row before it (history reads rely on that).
    let mut stmt = conn.prepare(
        "SELECT b.account_id, a.external_id, b.last_entry, b.entries FROM ledger_by_account_batches b
         LEFT JOIN accounts a ON a.id = b.account_id ORDER BY b.account_id, b.last_entry",
    )?;
    let mut rows = stmt.query([])?;
    let mut before: Option<(i64, i64)> = None;
    while let Some(r) = rows.next()? {
        let (id, ext, last, entries): (i64, Option<String>, i64, String) = (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
        let ext = ext.unwrap_or_else(|| format!("(no account with internal id {id})"));
        let ids: Option<Vec<i64>> = serde_json::from_str(&entries).ok();
        let Some(ids) = ids.filter(|ids| !ids.is_empty()) else {
            push(&mut report, &ext, "history index batch that is not a list of ids (its key)", last, 0)?;
            continue;
        };
        let (first, last_id) = (ids[0], ids[ids.len() - 1]);
        if last_id != last {
            push(&mut report, &ext, "history index batch key (its last id)", last, last_id)?;
        }
        if ids.windows(2).any(|w| w[0] >= w[1]) {
            push(&mut report, &ext, "history index batch not ascending (its key)", last, 0)?;
        }
        if let Some((account, prev)) = before
            && account == id
            && first <= prev
        {
            push(&mut report, &ext, "history index batch overlapping the one before (its first id, the last before)", first, prev)?;
        }
        before = Some((id, last));
    }
    drop(rows);
    // Exactly the entries up to `indexed_upto`, each under its own account. (`CROSS JOIN` keeps
    // SQLite's join order: each row's array expanded once, each id looked up in the log.)
    let mut stmt = conn.prepare(
        "WITH w AS (SELECT indexed_upto AS upto FROM ledger_index_state WHERE id = 1)
         SELECT a.external_id, COALESCE(t.n, 0), COALESCE(ok.n, 0), COALESCE(l.n, 0) FROM accounts a
         LEFT JOIN (SELECT account_id, sum(json_array_length(entries)) AS n FROM ledger_by_account_batches
                    WHERE json_valid(entries) GROUP BY account_id) t ON t.account_id = a.id
         LEFT JOIN (SELECT b.account_id, count(*) AS n FROM ledger_by_account_batches b CROSS JOIN json_each(b.entries) j
                    CROSS JOIN ledger_entries e ON e.id = j.value AND e.account_id = b.account_id
                    WHERE json_valid(b.entries) AND j.value <= (SELECT upto FROM w) GROUP BY b.account_id) ok ON ok.account_id = a.id
         LEFT JOIN (SELECT account_id, count(*) AS n FROM ledger_entries WHERE id <= (SELECT upto FROM w) GROUP BY account_id) l
                ON l.account_id = a.id
         WHERE COALESCE(t.n, 0) != COALESCE(l.n, 0) OR COALESCE(ok.n, 0) != COALESCE(l.n, 0)",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let ext: String = r.get(0)?;
        let (all, matching, logged): (i64, i64, i64) = (r.get(1)?, r.get(2)?, r.get(3)?);
        if all != logged {
            push(&mut report, &ext, "history index entries", all, logged)?;
        } else {
            push(&mut report, &ext, "history index entries of this account", matching, logged)?;
        }
    }
    let mut stmt = conn.prepare(
        "SELECT b.account_id, sum(json_array_length(b.entries)) FROM ledger_by_account_batches b LEFT JOIN accounts a ON a.id = b.account_id
         WHERE a.id IS NULL AND json_valid(b.entries) GROUP BY b.account_id",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (id, n): (i64, i64) = (r.get(0)?, r.get(1)?);
        push(&mut report, &format!("(no account with internal id {id})"), "history index entries", n, 0)?;
    }
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// The playground: packages, sessions and their turns, runs

const SESSION_COLUMNS: &str = "id, owner, package_id, model, title, turn_count, share_token, created_ms, updated_ms";

/// Reads a row of [`SESSION_COLUMNS`]: the summary and the share token.
fn session_from_row(r: &rusqlite::Row<'_>) -> Result<(SessionSummary, Option<ShareToken>)> {
    let token: Option<String> = r.get(6)?;
    let summary = SessionSummary {
        id: stored("session id", SessionId::parse(&r.get::<_, String>(0)?))?,
        owner: stored("session owner", AccountId::new(r.get::<_, String>(1)?))?,
        package_id: r.get(2)?,
        model: r.get(3)?,
        title: r.get(4)?,
        turns: r.get(5)?,
        shared: token.is_some(),
        created_at: at(r.get(7)?)?,
        updated_at: at(r.get(8)?)?,
    };
    let token = token.map(|t| stored("share token", ShareToken::parse(&t))).transpose()?;
    Ok((summary, token))
}

const TURNS_SQL: &str = "SELECT seq, role, content, run_id, at_ms FROM session_turns WHERE session_id = ?1 ORDER BY seq";

fn load_turns(conn: &Connection, session: &str) -> Result<Vec<Turn>> {
    let mut stmt = conn.prepare_cached(TURNS_SQL)?;
    let mut rows = stmt.query([session])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(Turn {
            seq: r.get(0)?,
            role: Role::parse(&r.get::<_, String>(1)?)?,
            content: r.get(2)?,
            run_id: r.get::<_, Option<String>>(3)?.map(|id| stored("run id", RunId::parse(&id))).transpose()?,
            at: at(r.get(4)?)?,
        });
    }
    Ok(out)
}

fn query_session(conn: &Connection, owner: &AccountId, id: &SessionId) -> Result<Option<Session>> {
    let row = {
        let mut stmt = conn.prepare_cached(&format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1 AND owner = ?2"))?;
        let mut rows = stmt.query([id.as_str(), owner.as_str()])?;
        rows.next()?.map(session_from_row).transpose()?
    };
    let Some((summary, share_token)) = row else {
        return Ok(None);
    };
    let turns = load_turns(conn, id.as_str())?;
    Ok(Some(Session { summary, share_token, turns }))
}

fn query_sessions(conn: &Connection, owner: &AccountId, cursor: Option<(DateTime<Utc>, SessionId)>, limit: u32) -> Result<SessionPage> {
    // Below the cursor in (created_ms desc, id desc) order; without one, everything.
    let (below_ms, below_id) = cursor.map_or((i64::MAX, String::new()), |(t, id)| (ms(t), id.to_string()));
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {SESSION_COLUMNS} FROM sessions WHERE owner = ?1 AND created_ms <= ?2 AND (created_ms < ?2 OR id < ?3)
         ORDER BY created_ms DESC, id DESC LIMIT ?4"
    ))?;
    let mut rows = stmt.query(params![owner.as_str(), below_ms, below_id, i64::from(limit) + 1])?;
    let mut sessions = Vec::new();
    while let Some(r) = rows.next()? {
        sessions.push(session_from_row(r)?.0);
    }
    let next = if sessions.len() > limit as usize {
        sessions.truncate(limit as usize);
        sessions.last().map(session_cursor)
    } else {
        None
    };
    Ok(SessionPage { sessions, next })
}

fn query_runs(conn: &Connection, account: &AccountId, limit: u32) -> Result<Vec<RunRecord>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, session_id, package_id, model, with_prompt, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, credits, cost_micros,
                latency_ms, outcome, error, hold_id, at_ms
         FROM runs WHERE account = ?1 ORDER BY at_ms DESC, id DESC LIMIT ?2",
    )?;
    let mut rows = stmt.query(params![account.as_str(), limit])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let count = |i| -> Result<u64> {
            let v: i64 = r.get(i)?;
            u64::try_from(v).map_err(|_| Error::Invariant(format!("runs: negative count {v}")))
        };
        out.push(RunRecord {
            id: stored("run id", RunId::parse(&r.get::<_, String>(0)?))?,
            account: account.clone(),
            session: r.get::<_, Option<String>>(1)?.map(|id| stored("session id", SessionId::parse(&id))).transpose()?,
            package_id: r.get(2)?,
            model: r.get(3)?,
            with_prompt: r.get(4)?,
            tokens: crate::pricing::TokenUsage { input: count(5)?, output: count(6)?, cache_read: count(7)?, cache_write: count(8)? },
            credits: r.get(9)?,
            cost_micros: r.get(10)?,
            latency_ms: count(11)?,
            outcome: RunOutcome::parse(&r.get::<_, String>(12)?)?,
            error: r.get(13)?,
            hold: r.get::<_, Option<i64>>(14)?.map(HoldId),
            at: at(r.get(15)?)?,
        });
    }
    Ok(out)
}

fn query_shared(conn: &Connection, token: &ShareToken) -> Result<Option<SharedSession>> {
    let row = conn
        .prepare_cached("SELECT id, title, package_id, model FROM sessions WHERE share_token = ?1")?
        .query_row([token.as_str()], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?, r.get::<_, String>(3)?)))
        .optional()?;
    let Some((id, title, package_id, model)) = row else {
        return Ok(None);
    };
    let turns = load_turns(conn, &id)?.into_iter().map(|t| SharedTurn { role: t.role, content: t.content }).collect();
    Ok(Some(SharedSession { title, package_id, model, turns }))
}

fn query_keyed(c: &Connection, account: &AccountId, key: &str) -> Result<Option<KeyedResponse>> {
    let row = c
        .prepare_cached("SELECT fingerprint, status, body, at_ms FROM keyed_responses WHERE account = ?1 AND key = ?2")?
        .query_row([account.as_str(), key], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u16>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?)))
        .optional()?;
    row.map(|(fingerprint, status, body, at_ms)| Ok(KeyedResponse { account: account.clone(), key: key.to_owned(), fingerprint, status, body, at: at(at_ms)? }))
        .transpose()
}

/// Inserts a new session; an id that exists is [`Error::InvalidInput`].
fn insert_session(conn: &Connection, s: &NewSession, now: DateTime<Utc>) -> Result<()> {
    let n = conn
        .prepare_cached(
            "INSERT INTO sessions (id, owner, package_id, model, title, turn_count, share_token, created_ms, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, 0, NULL, ?6, ?6) ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![s.id.as_str(), s.owner.as_str(), s.package_id, s.model, s.title, ms(now)])?;
    if n == 0 {
        return Err(Error::invalid("session_id", "a session with this id exists"));
    }
    Ok(())
}

/// Records a run and appends its turns (see [`Store::record_run`]). Call inside a write
/// transaction: an error leaves it to be rolled back.
fn write_run(conn: &Connection, run: &RunRecord, turns: &[NewTurn], now: DateTime<Utc>) -> Result<bool> {
    let latency = i64::try_from(run.latency_ms).map_err(|_| Error::invalid("latency_ms", "too large"))?;
    let t = &run.tokens;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO runs (id, account, session_id, package_id, model, with_prompt, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                               credits, cost_micros, latency_ms, outcome, error, hold_id, at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
             ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            run.id.as_str(),
            run.account.as_str(),
            run.session.as_ref().map(SessionId::as_str),
            run.package_id,
            run.model,
            run.with_prompt,
            t.input as i64,
            t.output as i64,
            t.cache_read as i64,
            t.cache_write as i64,
            run.credits,
            run.cost_micros,
            latency,
            run.outcome.as_str(),
            run.error,
            run.hold.map(|h| h.0),
            ms(run.at),
        ])?;
    if inserted == 0 {
        return Ok(false);
    }
    let Some(session) = &run.session else {
        return Ok(true);
    };
    let stored_turns: Option<u32> = conn
        .prepare_cached("SELECT turn_count FROM sessions WHERE id = ?1 AND owner = ?2")?
        .query_row([session.as_str(), run.account.as_str()], |r| r.get(0))
        .optional()?;
    let Some(stored_turns) = stored_turns else {
        return Err(Error::NotFound { what: "session" });
    };
    if turns.is_empty() {
        return Ok(true);
    }
    check_turn_limit(stored_turns, turns.len())?;
    let mut ins = conn.prepare_cached("INSERT INTO session_turns (session_id, seq, role, content, run_id, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
    for (i, turn) in turns.iter().enumerate() {
        ins.execute(params![session.as_str(), i64::from(stored_turns) + 1 + i as i64, turn.role.as_str(), turn.content, run.id.as_str(), ms(now)])?;
    }
    conn.prepare_cached("UPDATE sessions SET turn_count = turn_count + ?2, updated_ms = ?3 WHERE id = ?1")?.execute(params![
        session.as_str(),
        turns.len() as i64,
        ms(now)
    ])?;
    Ok(true)
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

// ---------------------------------------------------------------------------------------------
// Billing: purchases, Stripe events, customers, credit debts

const PURCHASE_COLUMNS: &str = "id, account, kind, product, credits, amount_cents, currency, status, checkout_session, payment_intent, customer, credited,
    refunded_cents, credits_reversed, version, created_ms, updated_ms, reversing_to";

fn purchase_from_row(r: &rusqlite::Row<'_>) -> Result<Purchase> {
    Ok(Purchase {
        id: r.get(0)?,
        account: stored("purchase account", AccountId::new(r.get::<_, String>(1)?))?,
        kind: PurchaseKind::parse(&r.get::<_, String>(2)?)?,
        product: r.get(3)?,
        credits: r.get(4)?,
        amount_cents: r.get(5)?,
        currency: r.get(6)?,
        status: PurchaseStatus::parse(&r.get::<_, String>(7)?)?,
        checkout_session: r.get(8)?,
        payment_intent: r.get(9)?,
        customer: r.get(10)?,
        credited: r.get(11)?,
        refunded_cents: r.get(12)?,
        credits_reversed: r.get(13)?,
        version: r.get(14)?,
        created_at: at(r.get(15)?)?,
        updated_at: at(r.get(16)?)?,
        reversing_to: r.get(17)?,
    })
}

fn query_purchase(conn: &Connection, id: &str) -> Result<Option<Purchase>> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {PURCHASE_COLUMNS} FROM purchases WHERE id = ?1"))?;
    let mut rows = stmt.query([id])?;
    rows.next()?.map(purchase_from_row).transpose()
}

/// A purchase's id, checkout session or payment intent that another purchase has already
/// (the primary key or one of the unique indexes): [`purchase_conflict`].
fn purchase_write_error(e: rusqlite::Error) -> Error {
    let key = matches!(&e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY);
    if key { purchase_conflict(&e.to_string()) } else { e.into() }
}

/// Saves a purchase (see [`Store::save_purchase`]). Call inside a write transaction.
fn write_purchase(conn: &Connection, p: &Purchase, now: DateTime<Utc>) -> Result<Option<Purchase>> {
    let Some(stored) = query_purchase(conn, &p.id)? else {
        return Err(Error::NotFound { what: "purchase" });
    };
    check_immutable(&stored, p)?;
    let Some(next) = p.version.checked_add(1) else {
        return Ok(None);
    };
    let n = conn
        .prepare_cached(
            "UPDATE purchases SET status = ?3, checkout_session = ?4, payment_intent = ?5, customer = ?6, credited = ?7, refunded_cents = ?8,
                                  credits_reversed = ?9, version = ?10, updated_ms = ?11, reversing_to = ?12
             WHERE id = ?1 AND version = ?2",
        )?
        .execute(params![
            p.id,
            p.version,
            p.status.as_str(),
            p.checkout_session,
            p.payment_intent,
            p.customer,
            p.credited,
            p.refunded_cents,
            p.credits_reversed,
            next,
            ms(now),
            p.reversing_to
        ])
        .map_err(purchase_write_error)?;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(Purchase { version: next, created_at: stored.created_at, updated_at: now, ..p.clone() }))
}

const EVENT_COLUMNS: &str = "id, kind, created, status, account, payload, received_ms, object_ref";

fn event_from_row(r: &rusqlite::Row<'_>) -> Result<StripeEventRecord> {
    Ok(StripeEventRecord {
        id: r.get(0)?,
        kind: r.get(1)?,
        created: r.get(2)?,
        status: EventStatus::parse(&r.get::<_, String>(3)?)?,
        account: r.get::<_, Option<String>>(4)?.map(|a| stored("event account", AccountId::new(a))).transpose()?,
        payload: r.get(5)?,
        received_at: at(r.get(6)?)?,
        object_ref: r.get(7)?,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn execute(&self, cmd: Command) -> Result<Outcome> {
        cmd.validate()?;
        let fingerprint = fingerprint(&cmd);
        Ok(self.exec(Prepared { cmd, fingerprint, run: None }).await?.outcome)
    }

    async fn settle_run(&self, r: SettleRun) -> Result<SettledRun> {
        r.validate()?;
        let cmd = Command::Settle(r.settle);
        let fingerprint = fingerprint(&cmd);
        let run = RunRecord { at: to_millis(r.run.at), ..r.run };
        let attached = RunToRecord { run, turns: r.turns, new_session: r.new_session };
        let done = self.exec(Prepared { cmd, fingerprint, run: Some(Box::new(attached)) }).await?;
        Ok(SettledRun { settled: done.outcome, session: done.session })
    }

    async fn balance(&self, account: &AccountId) -> Result<BalanceView> {
        let account = account.clone();
        let now = to_millis(self.clock.now());
        self.read_now(move |c| query_balance(c, &account, now)).await
    }

    async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage> {
        query.validate()?;
        let q = query.clone();
        self.read(move |c| query_history(c, &q)).await
    }

    async fn usage_before(&self, account: &AccountId, before: Option<EntryId>, limit: u32) -> Result<Vec<UsageRow>> {
        check_page(limit, MAX_PAGE)?;
        let account = account.clone();
        self.read(move |c| query_usage(c, &account, before, limit)).await
    }

    async fn due(&self, due: Due, after: Option<&AccountId>, limit: u32) -> Result<Vec<AccountId>> {
        check_page(limit, MAX_PAGE)?;
        let after = after.cloned();
        let now = to_millis(self.clock.now());
        self.read(move |c| query_due(c, due, after.as_ref(), limit, now)).await
    }

    async fn verify(&self) -> Result<VerifyReport> {
        self.read(|c| {
            // One read transaction so the two passes see the same snapshot.
            c.execute_batch("BEGIN")?;
            let r = run_verify(c);
            c.execute_batch("COMMIT")?;
            r
        })
        .await
    }

    async fn tiers(&self) -> Result<TierTable> {
        self.read_now(load_tiers).await
    }

    async fn cost(&self, account: &AccountId) -> Result<CostView> {
        let account = account.clone();
        let now = to_millis(self.clock.now());
        self.read_now(move |c| query_cost(c, &account, now)).await
    }

    async fn cost_accounts(&self, filter: CostFilter, after: Option<&AccountId>, limit: u32) -> Result<Vec<CostView>> {
        check_page(limit, MAX_PAGE)?;
        let after = after.cloned();
        let now = to_millis(self.clock.now());
        self.read(move |c| {
            let mut out = Vec::new();
            scan_costs(c, after.as_ref(), now, |v| {
                if filter.matches(&v) {
                    out.push(v);
                }
                out.len() < limit as usize
            })?;
            Ok(out)
        })
        .await
    }

    async fn summary(&self) -> Result<crate::cost::Summary> {
        let now = to_millis(self.clock.now());
        self.read(move |c| in_snapshot(c, |c| query_summary(c, now))).await
    }

    async fn alerts(&self, query: &AlertQuery) -> Result<Vec<StoredAlert>> {
        check_page(query.limit, MAX_PAGE)?;
        let q = query.clone();
        self.read(move |c| query_alerts(c, &q)).await
    }

    async fn daily_usage(&self, query: &DailyUsageQuery) -> Result<Vec<DailyUsage>> {
        query.validate()?;
        let q = query.clone();
        self.read(move |c| query_daily_usage(c, &q)).await
    }

    async fn refresh_analytics(&self) -> Result<AnalyticsReport> {
        // On the writer's connection, between groups, in its own write transaction.
        self.write(|c| Ok(AnalyticsReport { usage_records: roll_up_usage(c)? })).await
    }

    async fn put_package(&self, p: &Package) -> Result<()> {
        p.validate()?;
        let p = p.clone();
        let clock = self.clock.clone();
        self.write(move |c| {
            let now = ms(to_millis(clock.now()));
            c.prepare_cached(
                "INSERT INTO packages (id, name, version, prompt, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, version = excluded.version, prompt = excluded.prompt, updated_ms = excluded.updated_ms",
            )?
            .execute(params![p.id, p.name, p.version, p.prompt, now])?;
            Ok(())
        })
        .await
    }

    async fn package(&self, id: &str) -> Result<Option<Package>> {
        let id = id.to_owned();
        self.read_now(move |c| {
            Ok(c.prepare_cached("SELECT id, name, version, prompt FROM packages WHERE id = ?1")?
                .query_row([&id], |r| Ok(Package { id: r.get(0)?, name: r.get(1)?, version: r.get(2)?, prompt: r.get(3)? }))
                .optional()?)
        })
        .await
    }

    async fn create_session(&self, s: &NewSession) -> Result<SessionSummary> {
        s.validate()?;
        let s = s.clone();
        let clock = self.clock.clone();
        self.write(move |c| {
            let now = to_millis(clock.now());
            insert_session(c, &s, now)?;
            Ok(SessionSummary {
                id: s.id,
                owner: s.owner,
                package_id: s.package_id,
                model: s.model,
                title: s.title,
                turns: 0,
                shared: false,
                created_at: now,
                updated_at: now,
            })
        })
        .await
    }

    async fn session(&self, owner: &AccountId, id: &SessionId) -> Result<Option<Session>> {
        let (owner, id) = (owner.clone(), id.clone());
        self.read_now(move |c| in_snapshot(c, |c| query_session(c, &owner, &id))).await
    }

    async fn sessions(&self, owner: &AccountId, cursor: Option<&str>, limit: u32) -> Result<SessionPage> {
        check_session_page(limit)?;
        let cursor = cursor.map(parse_session_cursor).transpose()?;
        let owner = owner.clone();
        self.read(move |c| query_sessions(c, &owner, cursor, limit)).await
    }

    async fn delete_session(&self, owner: &AccountId, id: &SessionId) -> Result<bool> {
        let (owner, id) = (owner.clone(), id.clone());
        self.write(move |c| {
            c.prepare_cached("DELETE FROM session_turns WHERE session_id = ?1 AND EXISTS (SELECT 1 FROM sessions WHERE id = ?1 AND owner = ?2)")?
                .execute([id.as_str(), owner.as_str()])?;
            let n = c.prepare_cached("DELETE FROM sessions WHERE id = ?1 AND owner = ?2")?.execute([id.as_str(), owner.as_str()])?;
            Ok(n == 1)
        })
        .await
    }

    async fn record_run(&self, run: &RunRecord, turns: &[NewTurn]) -> Result<bool> {
        check_run(run, turns)?;
        let mut run = run.clone();
        run.at = to_millis(run.at);
        let turns = turns.to_vec();
        let clock = self.clock.clone();
        self.write(move |c| write_run(c, &run, &turns, to_millis(clock.now()))).await
    }

    async fn runs(&self, account: &AccountId, limit: u32) -> Result<Vec<RunRecord>> {
        check_session_page(limit)?;
        let account = account.clone();
        self.read(move |c| query_runs(c, &account, limit)).await
    }

    async fn share_session(&self, owner: &AccountId, id: &SessionId, token: &ShareToken) -> Result<bool> {
        let (owner, id, token) = (owner.clone(), id.clone(), token.clone());
        self.write(move |c| {
            let n = c
                .prepare_cached("UPDATE sessions SET share_token = ?3 WHERE id = ?1 AND owner = ?2")?
                .execute([id.as_str(), owner.as_str(), token.as_str()])
                .map_err(|e| if is_unique_violation(&e) { Error::invalid("share_token", "another session has this token") } else { e.into() })?;
            Ok(n == 1)
        })
        .await
    }

    async fn revoke_share(&self, owner: &AccountId, id: &SessionId) -> Result<bool> {
        let (owner, id) = (owner.clone(), id.clone());
        self.write(move |c| {
            let n = c
                .prepare_cached("UPDATE sessions SET share_token = NULL WHERE id = ?1 AND owner = ?2 AND share_token IS NOT NULL")?
                .execute([id.as_str(), owner.as_str()])?;
            Ok(n == 1)
        })
        .await
    }

    async fn shared_session(&self, token: &ShareToken) -> Result<Option<SharedSession>> {
        let token = token.clone();
        self.read_now(move |c| in_snapshot(c, |c| query_shared(c, &token))).await
    }

    async fn create_purchase(&self, p: &Purchase) -> Result<Purchase> {
        p.validate()?;
        let p = p.clone();
        let clock = self.clock.clone();
        self.write(move |c| {
            let now = to_millis(clock.now());
            c.prepare_cached(&format!(
                "INSERT INTO purchases ({PURCHASE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 1, ?15, ?15, ?16)"
            ))?
            .execute(params![
                p.id,
                p.account.as_str(),
                p.kind.as_str(),
                p.product,
                p.credits,
                p.amount_cents,
                p.currency,
                p.status.as_str(),
                p.checkout_session,
                p.payment_intent,
                p.customer,
                p.credited,
                p.refunded_cents,
                p.credits_reversed,
                ms(now),
                p.reversing_to
            ])
            .map_err(purchase_write_error)?;
            Ok(Purchase { version: 1, created_at: now, updated_at: now, ..p })
        })
        .await
    }

    async fn purchase(&self, id: &str) -> Result<Option<Purchase>> {
        check_purchase_id(id)?;
        let id = id.to_owned();
        self.read_now(move |c| query_purchase(c, &id)).await
    }

    async fn purchase_by_stripe_id(&self, stripe_id: &str) -> Result<Option<Purchase>> {
        check_stripe_id(stripe_id)?;
        let stripe_id = stripe_id.to_owned();
        self.read_now(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {PURCHASE_COLUMNS}, 0 AS pref FROM purchases WHERE checkout_session = ?1
                 UNION ALL SELECT {PURCHASE_COLUMNS}, 1 AS pref FROM purchases WHERE payment_intent = ?1
                 ORDER BY pref LIMIT 1"
            ))?;
            let mut rows = stmt.query([&stripe_id])?;
            rows.next()?.map(purchase_from_row).transpose()
        })
        .await
    }

    async fn save_purchase(&self, p: &Purchase) -> Result<Option<Purchase>> {
        p.validate()?;
        let p = p.clone();
        let clock = self.clock.clone();
        self.write(move |c| write_purchase(c, &p, to_millis(clock.now()))).await
    }

    async fn purchases(&self, after: Option<&str>, limit: u32) -> Result<Vec<Purchase>> {
        check_billing_page(limit)?;
        if let Some(after) = after {
            check_purchase_id(after)?;
        }
        let after = after.unwrap_or_default().to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!("SELECT {PURCHASE_COLUMNS} FROM purchases WHERE id > ?1 ORDER BY id LIMIT ?2"))?;
            let mut rows = stmt.query(params![after, limit])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push(purchase_from_row(r)?);
            }
            Ok(out)
        })
        .await
    }

    async fn record_stripe_event(&self, e: &StripeEventRecord) -> Result<bool> {
        check_stripe_event(e)?;
        let e = e.clone();
        let clock = self.clock.clone();
        self.write(move |c| {
            let now = to_millis(clock.now());
            let n = c
                .prepare_cached(&format!("INSERT INTO stripe_events ({EVENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (id) DO NOTHING"))?
                .execute(params![e.id, e.kind, e.created, e.status.as_str(), e.account.as_ref().map(AccountId::as_str), e.payload, ms(now), e.object_ref])?;
            Ok(n == 1)
        })
        .await
    }

    async fn set_stripe_event_status(&self, id: &str, status: EventStatus, account: Option<&AccountId>) -> Result<()> {
        check_stripe_id(id)?;
        let (id, account) = (id.to_owned(), account.cloned());
        self.write(move |c| {
            let n = c.prepare_cached("UPDATE stripe_events SET status = ?2, account = COALESCE(?3, account) WHERE id = ?1")?.execute(params![
                id,
                status.as_str(),
                account.as_ref().map(AccountId::as_str)
            ])?;
            if n == 0 {
                return Err(Error::NotFound { what: "stripe event" });
            }
            Ok(())
        })
        .await
    }

    async fn stripe_event(&self, id: &str) -> Result<Option<StripeEventRecord>> {
        check_stripe_id(id)?;
        let id = id.to_owned();
        self.read_now(move |c| {
            let mut stmt = c.prepare_cached(&format!("SELECT {EVENT_COLUMNS} FROM stripe_events WHERE id = ?1"))?;
            let mut rows = stmt.query([&id])?;
            rows.next()?.map(event_from_row).transpose()
        })
        .await
    }

    async fn stripe_events(&self, status: Option<EventStatus>, limit: u32) -> Result<Vec<StripeEventRecord>> {
        check_billing_page(limit)?;
        self.read(move |c| {
            // Two statements, so that a status is looked up in stripe_events_by_status.
            let (mut stmt, mut rows);
            match status {
                Some(status) => {
                    stmt = c.prepare_cached(&format!("SELECT {EVENT_COLUMNS} FROM stripe_events WHERE status = ?1 ORDER BY received_ms, id LIMIT ?2"))?;
                    rows = stmt.query(params![status.as_str(), limit])?;
                }
                None => {
                    stmt = c.prepare_cached(&format!("SELECT {EVENT_COLUMNS} FROM stripe_events ORDER BY received_ms, id LIMIT ?1"))?;
                    rows = stmt.query(params![limit])?;
                }
            }
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push(event_from_row(r)?);
            }
            Ok(out)
        })
        .await
    }

    async fn stripe_events_about(&self, object_ref: &str, status: EventStatus, limit: u32) -> Result<Vec<StripeEventRecord>> {
        check_stripe_id(object_ref)?;
        check_billing_page(limit)?;
        let object_ref = object_ref.to_owned();
        self.read_now(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM stripe_events WHERE object_ref = ?1 AND status = ?2 ORDER BY created DESC, id DESC LIMIT ?3"
            ))?;
            let mut rows = stmt.query(params![object_ref, status.as_str(), limit])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push(event_from_row(r)?);
            }
            Ok(out)
        })
        .await
    }

    async fn link_customer(&self, customer: &str, account: &AccountId) -> Result<()> {
        check_stripe_id(customer)?;
        let (customer, account) = (customer.to_owned(), account.clone());
        let clock = self.clock.clone();
        self.write(move |c| {
            let now = ms(to_millis(clock.now()));
            c.prepare_cached(
                "INSERT INTO stripe_customers (customer, account, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (customer) DO UPDATE SET account = excluded.account, updated_ms = excluded.updated_ms",
            )?
            .execute(params![customer, account.as_str(), now])?;
            Ok(())
        })
        .await
    }

    async fn customer_account(&self, customer: &str) -> Result<Option<AccountId>> {
        check_stripe_id(customer)?;
        let customer = customer.to_owned();
        self.read_now(move |c| {
            let account: Option<String> =
                c.prepare_cached("SELECT account FROM stripe_customers WHERE customer = ?1")?.query_row([&customer], |r| r.get(0)).optional()?;
            account.map(|a| stored("customer account", AccountId::new(a))).transpose()
        })
        .await
    }

    async fn add_debt(&self, account: &AccountId, credits: i64, key: &str) -> Result<DebtChange> {
        check_debt_change(credits, key)?;
        let (account, key) = (account.clone(), key.to_owned());
        let clock = self.clock.clone();
        // One write transaction: the key, the debt and its record change together.
        self.write(move |c| {
            let now = ms(to_millis(clock.now()));
            let seen = c
                .prepare_cached("SELECT account, requested, applied, debt_after FROM debt_updates WHERE key = ?1")?
                .query_row([&key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .optional()?;
            if let Some(seen) = seen {
                return replay_debt_change(&key, &account, credits, seen);
            }
            let before: i64 =
                c.prepare_cached("SELECT credits FROM credit_debts WHERE account = ?1")?.query_row([account.as_str()], |r| r.get(0)).optional()?.unwrap_or(0);
            let after = (before + credits).clamp(0, MAX_BUCKET_CREDITS);
            c.prepare_cached(
                "INSERT INTO credit_debts (account, credits, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (account) DO UPDATE SET credits = ?2, updated_ms = ?3",
            )?
            .execute(params![account.as_str(), after, now])?;
            c.prepare_cached("INSERT INTO debt_updates (key, account, requested, applied, debt_after, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?
                .execute(params![key, account.as_str(), credits, after - before, after, now])?;
            Ok(DebtChange { applied: after - before, debt_after: after, replayed: false })
        })
        .await
    }

    async fn debt(&self, account: &AccountId) -> Result<i64> {
        let account = account.clone();
        self.read_now(move |c| {
            let debt: Option<i64> =
                c.prepare_cached("SELECT credits FROM credit_debts WHERE account = ?1")?.query_row([account.as_str()], |r| r.get(0)).optional()?;
            Ok(debt.unwrap_or(0))
        })
        .await
    }

    async fn keyed_response(&self, account: &AccountId, key: &str) -> Result<Option<KeyedResponse>> {
        check_request_key(key)?;
        let (account, key) = (account.clone(), key.to_owned());
        self.read_now(move |c| query_keyed(c, &account, &key)).await
    }

    async fn remember_response(&self, r: &KeyedResponse) -> Result<KeyedResponse> {
        r.validate()?;
        let r = KeyedResponse { at: to_millis(r.at), ..r.clone() };
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO keyed_responses (account, key, fingerprint, status, body, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (account, key) DO NOTHING",
            )?
            .execute(params![r.account.as_str(), r.key, r.fingerprint, r.status, r.body, ms(r.at)])?;
            query_keyed(c, &r.account, &r.key)?.ok_or_else(|| Error::Invariant("a keyed response vanished".into()))
        })
        .await
    }

    fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    fn config(&self) -> &LedgerConfig {
        &self.ledger
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many times the store's statement reading a session's turns was compiled again over
    /// `runs` uses with alternating sessions, on a connection set up by `setup`.
    fn recompiles(setup: impl Fn(&Connection) -> Result<()>, runs: usize) -> i32 {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db")).unwrap();
        store.close();
        let conn = Connection::open(dir.path().join("t.db")).unwrap();
        setup(&conn).unwrap();
        for id in ["s1", "s2"] {
            conn.execute("INSERT INTO sessions (id, owner, model, title, created_ms, updated_ms) VALUES (?1, 'a', 'm', 't', 0, 0)", [id]).unwrap();
            conn.execute("INSERT INTO session_turns (session_id, seq, role, content, at_ms) VALUES (?1, 1, 'user', 'hi', 0)", [id]).unwrap();
        }
        for i in 0..runs {
            assert_eq!(load_turns(&conn, if i % 2 == 0 { "s1" } else { "s2" }).unwrap().len(), 1);
        }
        let stmt = conn.prepare_cached(TURNS_SQL).unwrap();
        stmt.get_status(rusqlite::StatementStatus::RePrepare)
    }

    /// The index rows of the log's entries written by slices: each account's ids, whole,
    /// ascending, in rows of at most [`INDEX_ROW_ENTRIES`] that do not overlap; `verify()`
    /// finds the store clean.
    #[test]
    fn the_log_is_indexed_by_slices_without_losing_or_overlapping_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let store = SqliteStore::open(&path).unwrap();
        rt.block_on(async {
            for a in ["a1", "a2", "a3"] {
                crate::conformance::create_user(&store, a).await;
            }
        });
        store.close();
        drop(store);
        // The accounts' first entries (their signup grants), then 3,000 entries that move
        // nothing: account 1 has every other one (1,500: two rows in one slice), 2 and 3 the rest.
        let conn = Connection::open(&path).unwrap();
        let mut logged: Vec<(i64, i64)> = conn
            .prepare("SELECT id, account_id FROM ledger_entries ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let accounts: Vec<i64> =
            conn.prepare("SELECT id FROM accounts ORDER BY id").unwrap().query_map([], |r| r.get(0)).unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(accounts, [1, 2, 3]);
        let first = logged.last().unwrap().0 + 1;
        for x in first..first + 3_000 {
            let account = if x % 2 == 0 { 1 } else { 2 + (x / 2) % 2 };
            let sql =
                "INSERT INTO ledger_entries (id, account_id, at_ms, kind, d_monthly, d_rollover, d_purchased, d_held, balance_after, held_after, reference)
                       VALUES (?1, ?2, 0, 'spend', 0, 0, 0, 0, 5, 0, 'r')";
            conn.execute(sql, [x, account]).unwrap();
            logged.push((x, account));
        }
        let last = first + 2_999;
        let rows = |c: &Connection| -> Vec<(i64, i64, Vec<i64>)> {
            let mut st = c.prepare("SELECT account_id, last_entry, entries FROM ledger_by_account_batches ORDER BY account_id, last_entry").unwrap();
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, serde_json::from_str(&r.get::<_, String>(2)?).unwrap()))).unwrap().map(|r| r.unwrap()).collect()
        };
        // Two calls, the first up to an id in the middle, the second by slices of 700.
        assert_eq!(index_log_in_slices(&conn, 0, 1_001, MAX_HISTORY_INDEX_BATCH).unwrap(), 3);
        let written = index_log_in_slices(&conn, 1_001, last, 700).unwrap();
        conn.execute("UPDATE ledger_index_state SET indexed_upto = ?1", [last]).unwrap();
        let all = rows(&conn);
        assert_eq!(all.len() as u64, 3 + written);
        assert!(written >= 3 * 3, "three slices, each with rows of three accounts: {written}");
        for account in 1..=3 {
            let mine: Vec<_> = all.iter().filter(|r| r.0 == account).collect();
            let ids: Vec<i64> = mine.iter().flat_map(|r| r.2.iter().copied()).collect();
            let expected: Vec<i64> = logged.iter().filter(|(_, a)| *a == account).map(|(id, _)| *id).collect();
            assert_eq!(ids, expected, "account {account}: every entry once, ascending across rows");
            for r in &mine {
                assert!(!r.2.is_empty() && r.2.len() <= INDEX_ROW_ENTRIES);
                assert_eq!(r.1, *r.2.last().unwrap(), "a row is keyed by its last id");
            }
        }
        drop(conn);
        let store = SqliteStore::open(&path).unwrap();
        let report = rt.block_on(store.verify()).unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.entries, logged.len() as u64);
    }

    #[test]
    fn tuned_connections_keep_their_statements_compiled() {
        assert_eq!(recompiles(tune, 50), 0, "a cached statement was compiled again");
        // What `tune` prevents: with the cache alone, every use but the first compiled it again.
        let cache_only = |c: &Connection| {
            c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
            Ok(())
        };
        assert!(recompiles(cache_only, 50) >= 40);
    }

    /// Holds back, lets through or fails the store's fsyncs of the WAL (in place of them).
    #[derive(Default)]
    struct Gate {
        mode: Mutex<GateMode>,
        cv: std::sync::Condvar,
        entered: std::sync::atomic::AtomicUsize,
    }

    #[derive(Clone, Copy, PartialEq, Default)]
    enum GateMode {
        #[default]
        Open,
        HoldAll,
        HoldBackground,
        /// Lets the first `n` fsyncs since the gate was installed through, holds every later one.
        HoldFrom(usize),
        Fail,
    }

    impl Gate {
        fn install(store: &SqliteStore) -> Arc<Gate> {
            let gate = Arc::new(Gate::default());
            let g = gate.clone();
            *store.sync.as_ref().expect("a file with synchronous=FULL has a WalSync").gate.lock().unwrap() =
                Some(Arc::new(move |background| g.pass(background)));
            gate
        }
        fn pass(&self, background: bool) -> std::io::Result<()> {
            let i = self.entered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut mode = self.mode.lock().unwrap();
            loop {
                match *mode {
                    GateMode::Fail => return Err(std::io::Error::other("injected fsync failure")),
                    GateMode::HoldAll => {}
                    GateMode::HoldBackground if background => {}
                    GateMode::HoldFrom(n) if i >= n => {}
                    _ => return Ok(()),
                }
                mode = self.cv.wait(mode).unwrap();
            }
        }
        fn set(&self, mode: GateMode) {
            *self.mode.lock().unwrap() = mode;
            self.cv.notify_all();
        }
        fn entered(&self) -> usize {
            self.entered.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// Opens the gate when dropped: a failing test must not leave the store's threads held
    /// (closing the store waits for them).
    struct OpenOnDrop(Arc<Gate>);

    impl Drop for OpenOnDrop {
        fn drop(&mut self) {
            self.0.set(GateMode::Open);
        }
    }

    fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Polls a future once (sending its command, for a store call), true if it is still pending.
    fn pending<F: std::future::Future>(f: &mut std::pin::Pin<Box<F>>) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        f.as_mut().poll(&mut cx).is_pending()
    }

    fn spend_of(account: &str, key: &str) -> Command {
        Command::Spend(Spend {
            account: AccountId::new(account).unwrap(),
            amount: 1,
            usage: None,
            reference: "t".into(),
            key: IdempotencyKey::new(key).unwrap(),
        })
    }

    fn spends_in(path: &Path) -> i64 {
        let c = Connection::open(path).unwrap();
        c.query_row("SELECT count(*) FROM ledger_entries WHERE kind = 'spend'", [], |r| r.get(0)).unwrap()
    }

    fn with_user(opts: SqliteOptions) -> (tokio::runtime::Runtime, Arc<SqliteStore>) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let store = Arc::new(SqliteStore::open_with(opts).unwrap());
        let s: &dyn Store = &*store;
        rt.block_on(s.create_account(AccountId::new("u").unwrap(), AccountKind::User, IdempotencyKey::new("create-u").unwrap())).unwrap().unwrap();
        (rt, store)
    }

    /// Holds every fsync and has the writer, alone, sync a spend itself: held there, it takes
    /// nothing else until the gate lets that fsync through; what is sent meanwhile queues up.
    fn hold_the_writer(rt: &tokio::runtime::Runtime, s: &Arc<dyn Store>, gate: &Gate) -> tokio::task::JoinHandle<Result<Outcome>> {
        gate.set(GateMode::HoldAll);
        let first = rt.spawn({
            let s = s.clone();
            async move { s.execute(spend_of("u", "first")).await }
        });
        until("the first spend's fsync begins", || gate.entered() == 1);
        first
    }

    /// A spend's reply, and a read that may see it, wait for the fsync of the WAL that makes it
    /// durable; the commit itself is in the file (another connection sees it) before that.
    #[test]
    fn replies_and_reads_wait_for_the_fsync_of_their_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (rt, store) = with_user(SqliteOptions::file(&path));
        let gate = Gate::install(&store);
        let _open = OpenOnDrop(gate.clone());
        gate.set(GateMode::HoldAll);
        let syncs = store.sync_stats().unwrap().syncs;
        let s: Arc<dyn Store> = store.clone();
        let spend = rt.spawn({
            let s = s.clone();
            async move { s.execute(spend_of("u", "s1")).await }
        });
        until("the spend's fsync begins", || gate.entered() == 1);
        assert_eq!(spends_in(&path), 1, "committed before its fsync");
        let read = rt.spawn({
            let s = s.clone();
            async move { s.balance(&AccountId::new("u").unwrap()).await }
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!spend.is_finished(), "the spend was answered before its commit was durable");
        assert!(!read.is_finished(), "a read returned a commit that was not durable yet");
        gate.set(GateMode::Open);
        let done = rt.block_on(spend).unwrap().unwrap().unwrap();
        assert!(matches!(done.effect, Effect::Spent { .. }), "{done:?}");
        assert_eq!(rt.block_on(read).unwrap().unwrap().total, 4);
        assert_eq!(store.sync_stats().unwrap().syncs, syncs + 1);
    }

    /// A file without read connections reads on the writer's connection, right after the group
    /// it arrived with: the read still waits for that group's fsync (run on the sync thread).
    #[test]
    fn a_read_on_the_writers_connection_waits_for_the_fsync_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (rt, store) = with_user(SqliteOptions { readers: 0, ..SqliteOptions::file(&path) });
        let gate = Gate::install(&store);
        let _open = OpenOnDrop(gate.clone());
        let s: Arc<dyn Store> = store.clone();
        let first = hold_the_writer(&rt, &s, &gate);
        let mut spend = Box::pin(s.execute(spend_of("u", "second")));
        let u = AccountId::new("u").unwrap();
        let mut read = Box::pin(s.balance(&u));
        assert!(pending(&mut spend) && pending(&mut read));
        // The second spend's group, then the read, run while that group's fsync is held.
        gate.set(GateMode::HoldBackground);
        rt.block_on(first).unwrap().unwrap().unwrap();
        until("the sync thread's fsync begins", || gate.entered() >= 2);
        std::thread::sleep(Duration::from_millis(200));
        assert!(pending(&mut read), "a read returned a commit that was not durable yet");
        assert!(pending(&mut spend));
        gate.set(GateMode::Open);
        rt.block_on(async {
            spend.await.unwrap().unwrap();
            assert_eq!(read.await.unwrap().total, 3, "the read saw the second spend");
        });
    }

    /// While the fsync of one group waits, the writer commits the next groups (with commands
    /// queued, it leaves fsyncs to the sync thread); none is answered until an fsync covers it.
    #[test]
    fn the_writer_commits_the_next_group_while_one_is_being_synced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        // One command per group, so that the spends below make a group each.
        let (rt, store) = with_user(SqliteOptions { max_batch: 1, ..SqliteOptions::file(&path) });
        let gate = Gate::install(&store);
        let _open = OpenOnDrop(gate.clone());
        let s: Arc<dyn Store> = store.clone();
        let first = hold_the_writer(&rt, &s, &gate);
        let mut queued: Vec<_> = ["a", "b", "c"].iter().map(|k| Box::pin(s.execute(spend_of("u", k)))).collect();
        assert!(queued.iter_mut().all(pending), "queued behind the first");
        // The first spend's fsync through, every later one held: `a` and `b` each finish with
        // another command queued, so the writer goes on to the next without syncing.
        gate.set(GateMode::HoldFrom(1));
        rt.block_on(first).unwrap().unwrap().unwrap();
        until("all three spends are committed", || spends_in(&path) == 4);
        until("an fsync of them begins", || gate.entered() >= 2);
        std::thread::sleep(Duration::from_millis(100));
        assert!(queued.iter_mut().all(pending), "answered before an fsync covered them");
        gate.set(GateMode::Open);
        rt.block_on(async {
            for q in queued {
                q.await.unwrap().unwrap();
            }
        });
        assert_eq!(rt.block_on(s.balance(&AccountId::new("u").unwrap())).unwrap().total, 1);
    }

    /// A failed fsync: the callers waiting get a backend error, and the store refuses writes
    /// and reads from then on; opened again, it works (and what was written is consistent).
    #[test]
    fn a_failed_fsync_stops_the_store_until_it_is_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (rt, store) = with_user(SqliteOptions::file(&path));
        let gate = Gate::install(&store);
        let _open = OpenOnDrop(gate.clone());
        gate.set(GateMode::Fail);
        let s: Arc<dyn Store> = store.clone();
        let e = rt.block_on(s.execute(spend_of("u", "s1"))).unwrap_err();
        assert!(e.to_string().contains("could not be made durable"), "{e}");
        gate.set(GateMode::Open);
        let e = rt.block_on(s.execute(spend_of("u", "s2"))).unwrap_err();
        assert!(e.to_string().contains("could not be made durable"), "{e}");
        assert!(rt.block_on(s.balance(&AccountId::new("u").unwrap())).is_err(), "a read after a failed fsync");
        assert_eq!(spends_in(&path), 1, "the refused spend wrote nothing");
        drop(s);
        store.close();
        drop(store);
        let again: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        rt.block_on(async {
            // The first spend's outcome was unknown; replaying its key tells.
            assert!(again.execute(spend_of("u", "s1")).await.unwrap().unwrap().replayed);
            again.execute(spend_of("u", "s2")).await.unwrap().unwrap();
            assert_eq!(again.balance(&AccountId::new("u").unwrap()).await.unwrap().total, 3);
            assert!(again.verify().await.unwrap().is_clean());
        });
    }

    /// Grants `amount` credits to "u" and lifts its hourly request limit (the unlimited tier).
    fn fund_u(rt: &tokio::runtime::Runtime, s: &dyn Store, amount: i64) {
        let u = AccountId::new("u").unwrap();
        rt.block_on(s.set_cost_profile(u.clone(), false, Some("unlimited".into()), IdempotencyKey::new("unlimited-u").unwrap())).unwrap().unwrap();
        let key = IdempotencyKey::new("grant-u").unwrap();
        let g = Grant { account: u, bucket: Bucket::Purchased, amount, source: GrantSource::Admin, expires_at: None, reference: "t".into(), key };
        rt.block_on(s.grant(g)).unwrap().unwrap();
    }

    /// The WAL header's checkpoint sequence number: SQLite adds one each time it starts the WAL
    /// over (written with the first frame after).
    fn wal_restarts_seen(path: &Path) -> u32 {
        use std::io::Read;
        let mut header = [0; 16];
        std::fs::File::open(wal_sync::wal_path(path)).unwrap().read_exact(&mut header).unwrap();
        u32::from_be_bytes(header[12..16].try_into().unwrap())
    }

    /// Under a steady stream of commits the WAL is never found fully copied back when one begins
    /// (SQLite's condition to start it over); the writer starts it over between groups once the
    /// checkpoint thread has copied nearly everything, and every spend is still there.
    #[test]
    fn a_steady_stream_of_commits_starts_the_wal_over_between_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut opts = SqliteOptions::file(&path).synchronous(Synchronous::Normal);
        opts.wal_autocheckpoint_pages = 400;
        let (rt, store) = with_user(opts);
        let s: Arc<dyn Store> = store.clone();
        fund_u(&rt, &*s, 1_000_000);
        let (callers, each) = (32, 300);
        // Whether a try finds no reader on the WAL depends on the threads' timing: on a loaded
        // machine one stream may end without (the bound restarts the WAL then). Up to four.
        let mut streams = 0;
        while streams < 4 && store.checkpoint_stats().unwrap().early_restarts == 0 {
            streams += 1;
            rt.block_on(async {
                let tasks: Vec<_> = (0..callers)
                    .map(|c| {
                        let s = s.clone();
                        tokio::spawn(async move {
                            for i in 0..each {
                                s.execute(spend_of("u", &format!("s-{streams}-{c}-{i}"))).await.unwrap().unwrap();
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            });
        }
        let stats = store.checkpoint_stats().unwrap();
        assert!(stats.early_restarts >= 1, "{streams} streams: {stats:?}");
        assert!(stats.early_tries >= stats.early_restarts, "{stats:?}");
        assert!(rt.block_on(s.verify()).unwrap().is_clean());
        drop(s);
        store.close();
        drop(store);
        assert_eq!(spends_in(&path), streams * callers * each);
    }

    /// A lone caller's commands commit on its own thread once the writer thread sleeps (no
    /// hand-off to it and back), durably (each answered after its fsync, on that thread too);
    /// with `inline_commits` off every one goes through the writer thread. Same outcomes.
    #[test]
    fn a_lone_callers_commands_commit_on_its_own_thread() {
        for inline in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("t.db");
            let mut opts = SqliteOptions::file(&path);
            opts.inline_commits = inline;
            let (rt, store) = with_user(opts);
            let s: Arc<dyn Store> = store.clone();
            fund_u(&rt, &*s, 100);
            let before = store.inline_commits();
            let n = 40;
            for i in 0..n {
                // A lone caller: the writer thread has gone to sleep since the last command (it
                // spins 50 µs first; on a loaded machine that can take longer).
                until("the writer thread sleeps", || store.writer_asleep.load(Ordering::Acquire));
                let Ok(Committed { effect: Effect::Spent { charged, .. }, replayed: false }) = rt.block_on(s.execute(spend_of("u", &format!("s{i}")))).unwrap()
                else {
                    panic!("spend {i} did not commit")
                };
                assert_eq!(charged.total(), 1);
            }
            // A replay answers the first outcome and writes nothing, on either path.
            assert!(matches!(rt.block_on(s.execute(spend_of("u", "s0"))).unwrap(), Ok(Committed { replayed: true, .. })));
            let inlined = store.inline_commits() - before;
            if inline {
                // The writer thread may still be awake for the first (it sleeps after 50 µs
                // without a command).
                assert!(inlined >= n as u64 - 2, "{inlined} of {n} on the caller's thread");
            } else {
                assert_eq!(inlined, 0);
            }
            let stats = store.sync_stats().unwrap();
            assert!(stats.syncs >= n as u64, "{stats:?}: every lone commit has its fsync");
            assert_eq!(rt.block_on(s.balance(&AccountId::new("u").unwrap())).unwrap().available, 105 - n);
            assert!(rt.block_on(s.verify()).unwrap().is_clean());
            drop(s);
            store.close();
            drop(store);
            assert_eq!(spends_in(&path), n);
        }
    }

    /// Commits on callers' threads and groups on the writer thread, racing: one caller spends
    /// without a pause (on its own thread while the writer thread sleeps), four others now and
    /// then (queued for the writer thread, woken for them, while that caller commits). Exactly
    /// as many spends succeed as the balance allows, and every one is in the file after a
    /// reopen.
    #[test]
    fn commits_on_callers_threads_and_groups_race_without_overspend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (rt, store) = with_user(SqliteOptions::file(&path));
        let s: Arc<dyn Store> = store.clone();
        fund_u(&rt, &*s, 295);
        let before = store.inline_commits();
        let ok = rt.block_on(async {
            let tasks: Vec<_> = (0..5)
                .map(|c| {
                    let s = s.clone();
                    tokio::spawn(async move {
                        let (mut ok, each) = (0, if c == 0 { 200 } else { 40 });
                        for i in 0..each {
                            if c > 0 {
                                tokio::time::sleep(Duration::from_millis(1 + ((c + i) % 3) as u64)).await;
                            }
                            match s.execute(spend_of("u", &format!("s-{c}-{i}"))).await.unwrap() {
                                Ok(_) => ok += 1,
                                Err(Rejection::InsufficientCredits { .. }) => {}
                                Err(r) => panic!("{r:?}"),
                            }
                        }
                        ok
                    })
                })
                .collect();
            let mut ok = 0;
            for t in tasks {
                ok += t.await.unwrap();
            }
            ok
        });
        assert_eq!(ok, 300, "5 free credits and 295 granted, 360 tried");
        let inlined = store.inline_commits() - before;
        let groups = store.sync_stats().unwrap().groups;
        assert!(inlined >= 5, "{inlined} commands committed on their callers' threads, {groups} groups");
        assert_eq!(rt.block_on(s.balance(&AccountId::new("u").unwrap())).unwrap().available, 0);
        assert!(rt.block_on(s.verify()).unwrap().is_clean());
        drop(s);
        store.close();
        drop(store);
        assert_eq!(spends_in(&path), 300);
    }

    /// The writer's restart between groups waits for no reader: with a read still on the WAL it
    /// leaves the WAL as it is at once (a restart inside the commit's hook, as at the bound,
    /// would wait out the busy timeout); once the read ends it starts the WAL over.
    #[test]
    fn the_writers_restart_between_groups_waits_for_no_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut opts = SqliteOptions::file(&path);
        // No checkpoint of its own: the test marks the restart due itself.
        opts.wal_autocheckpoint_pages = 1_000_000;
        opts.busy_timeout = Duration::from_secs(3);
        let (rt, store) = with_user(opts);
        let s: Arc<dyn Store> = store.clone();
        fund_u(&rt, &*s, 1_000);
        for i in 0..20 {
            rt.block_on(s.execute(spend_of("u", &format!("a{i}")))).unwrap().unwrap();
        }
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let seen: i64 = reader.query_row("SELECT count(*) FROM ledger_entries WHERE kind = 'spend'", [], |r| r.get(0)).unwrap();
        assert_eq!(seen, 20);
        rt.block_on(s.execute(spend_of("u", "b1"))).unwrap().unwrap();
        let restarts = wal_restarts_seen(&path);
        let due = || store.checkpoints.as_ref().unwrap().restart_due.store(true, Ordering::Release);

        due();
        let t0 = std::time::Instant::now();
        rt.block_on(s.execute(spend_of("u", "b2"))).unwrap().unwrap();
        assert!(t0.elapsed() < Duration::from_millis(1500), "the writer waited {:?} for the reader", t0.elapsed());
        assert_eq!(store.checkpoint_stats().unwrap(), CheckpointStats { early_restarts: 0, early_tries: 1, bound_restarts: 0 });
        rt.block_on(s.execute(spend_of("u", "b3"))).unwrap().unwrap();
        assert_eq!(wal_restarts_seen(&path), restarts, "the WAL was started over under a reader");

        reader.execute_batch("COMMIT").unwrap();
        due();
        rt.block_on(s.execute(spend_of("u", "c1"))).unwrap().unwrap();
        assert_eq!(store.checkpoint_stats().unwrap(), CheckpointStats { early_restarts: 1, early_tries: 2, bound_restarts: 0 });
        rt.block_on(s.execute(spend_of("u", "c2"))).unwrap().unwrap();
        assert_eq!(wal_restarts_seen(&path), restarts.wrapping_add(1));

        assert_eq!(rt.block_on(s.balance(&AccountId::new("u").unwrap())).unwrap().total, 5 + 1_000 - 25);
        drop(s);
        store.close();
        drop(store);
        let again: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        rt.block_on(async {
            assert_eq!(again.balance(&AccountId::new("u").unwrap()).await.unwrap().total, 5 + 1_000 - 25);
            assert!(again.verify().await.unwrap().is_clean());
        });
    }
}
