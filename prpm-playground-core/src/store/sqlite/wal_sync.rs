//! Pipelined durability for the writer's group commits (`synchronous=FULL` on a file).
//!
//! With `PRAGMA synchronous=FULL`, SQLite's commit writes the group's WAL frames and then waits
//! for an fsync of the WAL, holding the write lock and the writer thread: the next group, queued
//! meanwhile, starts only after the disk has answered. Here the writer's connection runs with
//! `synchronous=NORMAL` (the frames are written at `COMMIT`, not synced) and this module makes
//! them durable: the group's replies (and its alerts) wait in [`WalSync`] until an fsync of the
//! WAL file that began after the group's `COMMIT` returned has completed. When other commands are
//! already queued, that fsync runs on a thread of its own while the writer applies and writes the
//! next group; otherwise the writer syncs at once, as SQLite would.
//!
//! Why this is as durable as `FULL`: a commit's frames are in the WAL file (in the page cache)
//! once `COMMIT` returns, so an fsync begun afterwards covers them. After a power loss SQLite
//! recovers the WAL up to the first frame that does not continue its checksum chain, so it keeps a
//! prefix of the commits: never a later group without an earlier one. A checkpoint (which copies
//! WAL frames into the database) syncs the WAL before it copies and the database after, also with
//! `NORMAL`, so no frame reaches the database before it is durable in the WAL.
//!
//! This relies on SQLite's power-safe overwrite (`SQLITE_POWERSAFE_OVERWRITE`, on by default
//! and in the bundled build): writing the next group's frames cannot damage the bytes of a
//! synced frame beside them. Without it, `FULL` pads each commit's last frame to a sector
//! boundary and `NORMAL` does not.
//!
//! What differs: another connection can read a group between its `COMMIT` and its fsync. Reads of
//! this store wait until every commit begun before the read ended is durable ([`WalSync::settled`]),
//! so no caller of the store ever sees a write that a power loss could take back. Other processes
//! reading the same file can (as with any `synchronous=NORMAL` writer).
//!
//! If an fsync fails, the store cannot know what reached the disk (Linux may drop the failed pages
//! from its cache and report later fsyncs clean): the callers waiting get a backend error, and
//! every later write and read is refused until the store is opened again.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::watch;

use super::{Done, Reply};
use crate::cost::{Alert, AlertSink};
use crate::error::{Error, Result};
use crate::ledger::AccountId;

/// What a group left to do once it is durable: answer its callers, hand on its alerts.
pub(super) struct Finished {
    pub replies: Vec<(Reply, Result<Done>)>,
    pub alerts: Vec<(AccountId, Alert)>,
}

impl Finished {
    /// Answers the group's callers and hands its alerts to the sink.
    pub(super) fn deliver(self, sink: Option<&Arc<dyn AlertSink>>) {
        for (reply, result) in self.replies {
            let _ = reply.send(result);
        }
        if let Some(sink) = sink {
            for (account, alert) in &self.alerts {
                sink.alert(account, alert);
            }
        }
    }
}

/// How the writer's commits were made durable (file stores with `synchronous=FULL`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Groups committed (each a transaction; a group retried command by command counts once).
    pub groups: u64,
    /// fsyncs of the WAL.
    pub syncs: u64,
    /// Of those, the ones run on the sync thread while the writer went on with the next group.
    pub background_syncs: u64,
}

struct State {
    /// Groups committed, oldest first, with the commit sequence each must see durable.
    pending: VecDeque<(u64, Finished)>,
    /// The sequence of the last commit that has returned (see [`WalSync::begin`]).
    finished: u64,
    /// Every commit up to this sequence is durable.
    durable: u64,
    /// The WAL file, as last opened, with its identity (device, inode).
    wal: Option<(Arc<File>, (u64, u64))>,
    /// Why an fsync failed: the store refuses everything from then on.
    failed: Option<String>,
    /// fsyncs under way (on either thread), and the highest sequence one of them covers.
    syncing: u32,
    syncing_upto: u64,
    stop: bool,
    stats: SyncStats,
}

#[cfg(test)]
pub(super) type SyncGate = Arc<dyn Fn(bool) -> std::io::Result<()> + Send + Sync>;

/// An fsync to run: every commit up to `target` has returned.
struct Job {
    target: u64,
    file: std::result::Result<Arc<File>, String>,
}

/// Pops the groups that can be answered now: after a failed fsync every one (with the error),
/// otherwise those whose commits are all durable.
fn answerable(st: &mut State) -> Vec<(Finished, Option<String>)> {
    match st.failed.clone() {
        Some(msg) => st.pending.drain(..).map(|(_, f)| (f, Some(msg.clone()))).collect(),
        None => {
            let mut out = Vec::new();
            while st.pending.front().is_some_and(|(seq, _)| *seq <= st.durable) {
                out.push((st.pending.pop_front().expect("front").1, None));
            }
            out
        }
    }
}

pub(super) struct WalSync {
    wal_path: PathBuf,
    state: Mutex<State>,
    wake: Condvar,
    /// Commit sequences begun (each `COMMIT` of the writer's connection takes the next).
    begun: AtomicU64,
    /// `(durable, failed)`, for reads waiting on the runtime.
    watch: watch::Sender<(u64, bool)>,
    sink: Option<Arc<dyn AlertSink>>,
    /// Test only: runs in place of each fsync (told whether on the sync thread), to hold it
    /// back or fail it.
    #[cfg(test)]
    pub(super) gate: Mutex<Option<SyncGate>>,
}

#[cfg(unix)]
fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// Elsewhere the file is taken to stay the same (the writer's connection keeps it).
#[cfg(not(unix))]
fn file_id(_: &std::fs::Metadata) -> (u64, u64) {
    (0, 0)
}

pub(super) fn wal_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

impl WalSync {
    pub(super) fn new(db: &Path, sink: Option<Arc<dyn AlertSink>>) -> Arc<WalSync> {
        Arc::new(WalSync {
            wal_path: wal_path(db),
            state: Mutex::new(State {
                pending: VecDeque::new(),
                finished: 0,
                durable: 0,
                wal: None,
                failed: None,
                syncing: 0,
                syncing_upto: 0,
                stop: false,
                stats: SyncStats::default(),
            }),
            wake: Condvar::new(),
            begun: AtomicU64::new(0),
            watch: watch::Sender::new((0, false)),
            sink,
            #[cfg(test)]
            gate: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing in this module panics while holding the lock; should anything, the state is
        // still consistent (each field is written whole).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by the writer right before each `COMMIT` of its connection: a read that ends after
    /// this waits for this commit to be durable (it may see it).
    pub(super) fn begin(&self) {
        self.begun.fetch_add(1, Ordering::SeqCst);
    }

    /// Why the store refuses writes, if an fsync failed.
    pub(super) fn failed(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// The writer has committed (or failed to commit) a group: its replies wait for the fsync
    /// that makes every commit begun so far durable. `idle`: the writer has nothing else queued;
    /// then, unless a sync is under way, it syncs on its own thread at once (as SQLite's `FULL`
    /// would: no hand-off for a lone caller). Otherwise the sync thread does, while the writer
    /// goes on. A group with nothing to make durable (it never reached `COMMIT`), or any group
    /// after a failed fsync, is answered at once.
    pub(super) fn finished(&self, done: Finished, idle: bool) {
        let (job, answered) = {
            let mut st = self.lock();
            let seq = self.begun.load(Ordering::SeqCst);
            debug_assert!(seq >= st.finished);
            st.finished = seq;
            st.stats.groups += 1;
            st.pending.push_back((seq, done));
            let job = if idle && st.syncing == 0 { self.take(&mut st) } else { None };
            (job, answerable(&mut st))
        };
        self.answer(answered);
        match job {
            Some(job) => self.complete(job, false),
            None => self.wake.notify_one(),
        }
    }

    /// Takes the next fsync to run, if commits have finished that no fsync done or under way
    /// covers (so two fsyncs never cover the same commits alone).
    fn take(&self, st: &mut State) -> Option<Job> {
        if st.failed.is_some() || st.finished <= st.durable.max(st.syncing_upto) {
            return None;
        }
        st.syncing += 1;
        st.syncing_upto = st.finished;
        Some(Job { target: st.finished, file: self.wal_file(st) })
    }

    /// Runs an fsync taken by [`WalSync::take`] and answers every group it made durable.
    fn complete(&self, job: Job, background: bool) {
        let synced = job.file.and_then(|f| {
            #[cfg(test)]
            if let Some(gate) = self.gate.lock().unwrap().clone() {
                return gate(background).map_err(|e| format!("fsync of {}: {e}", self.wal_path.display()));
            }
            f.sync_data().map_err(|e| format!("fsync of {}: {e}", self.wal_path.display()))
        });
        let (answered, state) = {
            let mut st = self.lock();
            st.syncing -= 1;
            st.stats.syncs += 1;
            if background {
                st.stats.background_syncs += 1;
            }
            match synced {
                Ok(()) => st.durable = st.durable.max(job.target),
                Err(e) if st.failed.is_none() => {
                    st.failed = Some(format!("the WAL could not be made durable ({e}); committed writes may be lost on power loss: reopen the store"));
                    st.wal = None;
                }
                Err(_) => {}
            }
            (answerable(&mut st), (st.durable, st.failed.is_some()))
        };
        self.watch.send_replace(state);
        self.answer(answered);
    }

    /// Sends the replies of answered groups (an error for each after a failed fsync), and hands
    /// on the alerts of those that are durable.
    fn answer(&self, answered: Vec<(Finished, Option<String>)>) {
        for (f, error) in answered {
            let f = match error {
                Some(msg) => {
                    Finished { replies: f.replies.into_iter().map(|(reply, _)| (reply, Err(Error::Backend(msg.clone())))).collect(), alerts: Vec::new() }
                }
                None => f,
            };
            f.deliver(self.sink.as_ref());
        }
    }

    /// The WAL file to fsync: opened once, and again should the path now name another file
    /// (SQLite removes the WAL when its last connection closes; a new one is a new file, whose
    /// directory entry is synced once too).
    fn wal_file(&self, st: &mut State) -> std::result::Result<Arc<File>, String> {
        let err = |e: std::io::Error| format!("{}: {e}", self.wal_path.display());
        let id = file_id(&std::fs::metadata(&self.wal_path).map_err(err)?);
        if let Some((f, known)) = &st.wal
            && *known == id
        {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(&self.wal_path).map_err(err)?);
        if let Some(dir) = self.wal_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
        }
        st.wal = Some((f.clone(), id));
        Ok(f)
    }

    /// The sync thread: runs each fsync the writer leaves to it, until [`WalSync::stop`].
    pub(super) fn run(&self) {
        loop {
            let job = {
                let mut st = self.lock();
                loop {
                    if st.stop {
                        return;
                    }
                    if let Some(job) = self.take(&mut st) {
                        break job;
                    }
                    st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                }
            };
            self.complete(job, true);
        }
    }

    /// The writer has stopped: syncs what no fsync covers yet (an fsync under way on the sync
    /// thread answers what it covers) and ends the sync thread once that is done.
    pub(super) fn stop(&self) {
        let job = self.take(&mut self.lock());
        if let Some(job) = job {
            self.complete(job, false);
        }
        self.lock().stop = true;
        self.wake.notify_all();
    }

    pub(super) fn stats(&self) -> SyncStats {
        self.lock().stats
    }

    /// Waits until every commit begun before now is durable, so that a read that has just ended
    /// returns nothing a power loss could take back. Immediate when nothing is in flight.
    pub(super) async fn settled(&self) -> Result<()> {
        let target = self.begun.load(Ordering::SeqCst);
        let mut rx = self.watch.subscribe();
        let r = rx.wait_for(|(durable, failed)| *failed || *durable >= target).await.map(|s| s.1);
        match r {
            Ok(false) => Ok(()),
            Ok(true) => Err(Error::Backend(self.failed().unwrap_or_else(|| "the WAL could not be made durable".into()))),
            Err(_) => Err(Error::Closed),
        }
    }
}
