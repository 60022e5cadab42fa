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
    /// fsyncs under way (on either thread).
    syncing: u32,
    stop: bool,
    stats: SyncStats,
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
    pub(super) gate: Mutex<Option<Arc<dyn Fn(bool) -> std::io::Result<()> + Send + Sync>>>,
}

fn wal_path(db: &Path) -> PathBuf {
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
    /// then, unless a sync is under way or other groups wait for one, it syncs on its own thread
    /// at once (as SQLite's `FULL` would: no hand-off for a lone caller). Otherwise the sync
    /// thread does, while the writer goes on.
    pub(super) fn finished(&self, done: Finished, idle: bool) {
        let now = {
            let mut st = self.lock();
            let seq = self.begun.load(Ordering::SeqCst);
            debug_assert!(seq >= st.finished);
            let now = idle && st.syncing == 0 && st.pending.is_empty();
            st.finished = seq;
            st.stats.groups += 1;
            st.pending.push_back((seq, done));
            now
        };
        if now {
            self.sync(false);
        } else {
            self.wake.notify_one();
        }
    }

    /// fsyncs the WAL and hands every group it made durable to its callers. Either thread may
    /// call it, even both at once: each group is answered once, by whichever sync covered it. A
    /// group whose commits are all durable already (one that never reached `COMMIT`) is answered
    /// without an fsync.
    fn sync(&self, background: bool) {
        let job = {
            let mut st = self.lock();
            let job = (st.failed.is_none() && st.finished > st.durable).then(|| (st.finished, self.wal_file(&mut st)));
            st.syncing += u32::from(job.is_some());
            job
        };
        let synced = job.map(|(target, file)| {
            let fsync = |f: Arc<File>| {
                #[cfg(test)]
                if let Some(gate) = self.gate.lock().unwrap().clone() {
                    return gate(background);
                }
                f.sync_data()
            };
            (target, file.and_then(|f| fsync(f).map_err(|e| format!("fsync of {}: {e}", self.wal_path.display()))))
        });
        let mut answered = Vec::new();
        let state = {
            let mut st = self.lock();
            if let Some((target, r)) = synced {
                st.syncing -= 1;
                st.stats.syncs += 1;
                if background {
                    st.stats.background_syncs += 1;
                }
                match r {
                    Ok(()) => st.durable = st.durable.max(target),
                    Err(e) if st.failed.is_none() => {
                        st.failed = Some(format!("the WAL could not be made durable ({e}); committed writes may be lost on power loss: reopen the store"));
                        st.wal = None;
                    }
                    Err(_) => {}
                }
            }
            match st.failed.clone() {
                // Everything waiting, synced or not: its outcome is unknown.
                Some(msg) => answered.extend(st.pending.drain(..).map(|(_, f)| (f, Some(msg.clone())))),
                None => {
                    while st.pending.front().is_some_and(|(seq, _)| *seq <= st.durable) {
                        answered.push((st.pending.pop_front().expect("front").1, None));
                    }
                }
            }
            (st.durable, st.failed.is_some())
        };
        self.watch.send_replace(state);
        for (f, error) in answered {
            for (reply, result) in f.replies {
                let result = match &error {
                    Some(msg) => Err(Error::Backend(msg.clone())),
                    None => result,
                };
                let _ = reply.send(result);
            }
            if error.is_none()
                && let Some(sink) = &self.sink
            {
                for (account, alert) in &f.alerts {
                    sink.alert(account, alert);
                }
            }
        }
    }

    /// The WAL file to fsync: opened once, and again should the path now name another file
    /// (SQLite removes the WAL when its last connection closes; a new one is a new file, whose
    /// directory entry is synced once too).
    fn wal_file(&self, st: &mut State) -> std::result::Result<Arc<File>, String> {
        use std::os::unix::fs::MetadataExt;
        let err = |e: std::io::Error| format!("{}: {e}", self.wal_path.display());
        let meta = std::fs::metadata(&self.wal_path).map_err(err)?;
        let id = (meta.dev(), meta.ino());
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

    /// The sync thread: fsyncs whenever a group waits, until [`WalSync::stop`].
    pub(super) fn run(&self) {
        loop {
            {
                let mut st = self.lock();
                while !st.stop && st.pending.is_empty() {
                    st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                if st.stop {
                    return;
                }
            }
            self.sync(true);
        }
    }

    /// Answers what still waits (the writer has stopped) and ends the sync thread.
    pub(super) fn stop(&self) {
        self.sync(false);
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
