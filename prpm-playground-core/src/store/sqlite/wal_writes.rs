//! One write per commit to the WAL file, instead of two per page.
//!
//! SQLite appends a commit to the WAL frame by frame, and each frame with two `write` calls: its
//! 24-byte header, then the page. A group of spends dirties ~25 pages, so its `COMMIT` made ~50
//! system calls, each taking the file's lock and partly filling one or two page-cache pages
//! (frames are 4,120 bytes and straddle them); on this project's virtual machine that was a
//! fifth of the writer thread's time.
//!
//! This is a VFS that wraps the default one and changes only the WAL file: appends (writes that
//! continue one another past everything written since the WAL last started over) are gathered
//! in memory and written with one call when the commit's last frame (the one whose header
//! carries the database size) is complete. Anything else that touches the file (a read, a sync,
//! a truncate, its size, a file control, its close, any write that is not the next append)
//! first writes what is gathered, and so does a gathering past [`MAX_GATHERED_BYTES`] (the
//! frames a large transaction spills before its commit). A write over frames already written
//! (a spilled page SQLite changed again, then the checksums of the frames after it, rewritten
//! after the commit's last frame) goes straight through. So:
//!
//! - by the time SQLite publishes a commit in the WAL index (after its frames are written), its
//!   frames are in the file, as without this layer: other connections and processes read them
//!   there, a crash of the process loses nothing that `COMMIT` reported done, and an fsync of
//!   the file begun afterwards covers them;
//! - the bytes and their order in the file are those SQLite wrote; only the number of calls
//!   changes. A failed write fails the write SQLite was making (the commit's last frame, or the
//!   next one), and SQLite fails the transaction. Should gathered bytes fail to be written when
//!   something other than a write needs them, SQLite was told they were written, so the file
//!   fails every call from then on and the store stops until it is opened again.
//!
//! Only the writer's connection opens files through this VFS; the main database file and every
//! other file it opens are the default VFS's own, unwrapped.

use std::ffi::{CStr, c_int, c_void};
use std::sync::OnceLock;

use rusqlite::ffi;

/// The name the VFS is registered under.
pub(super) const VFS_NAME: &CStr = c"prpm-wal-writes";

/// Past this many gathered bytes, they are written at once (a transaction larger than this
/// writes in pieces of about this size).
pub(super) const MAX_GATHERED_BYTES: usize = 4 << 20;

/// The most the unix VFS writes in one call: its `seekAndWrite` keeps the low 17 bits of the
/// length (`nBuf &= 0x1ffff`), so a longer write would be cut short, or to nothing.
const MAX_WRITE_BYTES: usize = 0x1f000;

/// Size of a WAL frame header; the database size after the commit is at bytes 4..8 (big-endian),
/// zero for a frame that does not end a commit.
const FRAME_HEADER: c_int = 24;

/// Counts for one WAL file (read in tests through `SQLITE_FCNTL_JOURNAL_POINTER`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct WriteStats {
    /// `xWrite` calls made by SQLite.
    pub asked: u64,
    /// Writes made to the file.
    pub written: u64,
}

/// What has been gathered for the file: `bytes` belong at `offset`.
struct Gathered {
    offset: i64,
    bytes: Vec<u8>,
    /// The last write was the header of a commit's last frame: write once its page is in.
    commit_frame: bool,
    /// The end of the furthest write since the WAL last started over (its header, at offset 0,
    /// is rewritten then). Only writes from here on are appends, and only appends are gathered:
    /// a write below it is SQLite going back over frames of the transaction (a page it spilled
    /// and changed again, the checksums of the frames after), which goes straight through.
    appended_to: i64,
    /// Why gathered bytes could not be written when something other than a write asked for
    /// them (SQLite was told the earlier writes succeeded): every later call fails with it.
    failed: Option<c_int>,
    stats: WriteStats,
    /// Test only: the next flush fails as a full disk would.
    #[cfg(test)]
    fail_next_flush: bool,
}

/// A WAL file opened through this VFS: our methods, what is gathered, then the default VFS's file
/// (`szOsFile` of it) in the same allocation.
#[repr(C)]
struct GatheringFile {
    base: ffi::sqlite3_file,
    gathered: *mut Gathered,
}

/// Offset of the wrapped file in the allocation SQLite makes for ours (kept 8-aligned).
const REAL_OFFSET: usize = std::mem::size_of::<GatheringFile>().next_multiple_of(8);

struct Vfs {
    ours: Box<ffi::sqlite3_vfs>,
    real: *mut ffi::sqlite3_vfs,
}

// SAFETY: both point at VFS structures that live for the whole process and are only read.
unsafe impl Send for Vfs {}
unsafe impl Sync for Vfs {}

static VFS: OnceLock<Result<Vfs, String>> = OnceLock::new();

/// Registers the VFS (once per process, not as the default); returns its name to open the
/// writer's connection with.
pub(super) fn register() -> crate::Result<&'static CStr> {
    let vfs = VFS.get_or_init(|| {
        // SAFETY: `sqlite3_vfs_find(NULL)` returns the default VFS, which SQLite never frees;
        // ours copies it, changing what opens files, and lives (leaked in the static) as long.
        unsafe {
            let real = ffi::sqlite3_vfs_find(std::ptr::null());
            if real.is_null() {
                return Err("SQLite has no default VFS".to_string());
            }
            let mut ours = Box::new(std::ptr::read(real));
            ours.pNext = std::ptr::null_mut();
            ours.zName = VFS_NAME.as_ptr();
            ours.szOsFile = c_int::try_from(REAL_OFFSET).expect("small") + (*real).szOsFile;
            ours.xOpen = Some(x_open);
            let rc = ffi::sqlite3_vfs_register(&mut *ours, 0);
            if rc != ffi::SQLITE_OK {
                return Err(format!("cannot register the WAL-writes VFS (SQLite error {rc})"));
            }
            Ok(Vfs { ours, real })
        }
    });
    match vfs {
        Ok(v) => {
            debug_assert!(std::ptr::eq(v.ours.zName, VFS_NAME.as_ptr()));
            Ok(VFS_NAME)
        }
        Err(e) => Err(crate::Error::Backend(e.clone())),
    }
}

fn real_vfs() -> *mut ffi::sqlite3_vfs {
    match VFS.get() {
        Some(Ok(v)) => v.real,
        _ => unreachable!("files are only opened through the VFS once it is registered"),
    }
}

/// # Safety
/// `file` is a [`GatheringFile`] SQLite allocated with our `szOsFile`.
unsafe fn real_file(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    unsafe { file.cast::<u8>().add(REAL_OFFSET).cast() }
}

/// # Safety
/// As [`real_file`], opened (its `gathered` set).
unsafe fn gathered<'a>(file: *mut ffi::sqlite3_file) -> &'a mut Gathered {
    unsafe { &mut *(*file.cast::<GatheringFile>()).gathered }
}

unsafe extern "C" fn x_open(_vfs: *mut ffi::sqlite3_vfs, name: ffi::sqlite3_filename, file: *mut ffi::sqlite3_file, flags: c_int, out: *mut c_int) -> c_int {
    let real_vfs = real_vfs();
    // SAFETY: SQLite gives us `file` of our `szOsFile` bytes; the default VFS's file fits in it,
    // at its start (unwrapped) or after our header (a WAL file).
    unsafe {
        let open = (*real_vfs).xOpen.expect("every VFS opens files");
        if flags & ffi::SQLITE_OPEN_WAL == 0 {
            return open(real_vfs, name, file, flags, out);
        }
        (*file).pMethods = std::ptr::null();
        let real = real_file(file);
        (*real).pMethods = std::ptr::null();
        let rc = open(real_vfs, name, real, flags, out);
        if rc != ffi::SQLITE_OK {
            // A VFS that set its methods must be closed even though its open failed.
            if let Some(close) = (*real).pMethods.as_ref().and_then(|m| m.xClose) {
                close(real);
            }
            return rc;
        }
        let g = Box::new(Gathered {
            offset: 0,
            bytes: Vec::new(),
            commit_frame: false,
            appended_to: 0,
            failed: None,
            stats: WriteStats::default(),
            #[cfg(test)]
            fail_next_flush: false,
        });
        (*file.cast::<GatheringFile>()).gathered = Box::into_raw(g);
        (*file).pMethods = &METHODS;
        ffi::SQLITE_OK
    }
}

/// Writes what is gathered, if anything, for a write that cannot go on without it. On failure
/// the bytes are dropped and the error is that write's: SQLite fails the transaction they
/// belong to (rolled back at its commit, or the pager stopped after a spill).
///
/// # Safety
/// `file` is an open [`GatheringFile`].
unsafe fn flush(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let g = gathered(file);
        if let Some(rc) = g.failed {
            return rc;
        }
        g.commit_frame = false;
        if g.bytes.is_empty() {
            return ffi::SQLITE_OK;
        }
        #[cfg(test)]
        if std::mem::take(&mut g.fail_next_flush) {
            g.bytes.clear();
            return ffi::SQLITE_FULL;
        }
        let real = real_file(file);
        let write = (*(*real).pMethods).xWrite.expect("files write");
        let mut rc = ffi::SQLITE_OK;
        let mut offset = g.offset;
        for piece in g.bytes.chunks(MAX_WRITE_BYTES) {
            let n = c_int::try_from(piece.len()).expect("a piece fits in an int");
            rc = write(real, piece.as_ptr().cast(), n, offset);
            g.stats.written += 1;
            if rc != ffi::SQLITE_OK {
                break;
            }
            offset += i64::try_from(piece.len()).expect("a piece fits in an i64");
        }
        g.bytes.clear();
        // Keep a large transaction's buffer from staying allocated.
        if g.bytes.capacity() > 2 * MAX_GATHERED_BYTES {
            g.bytes = Vec::new();
        }
        rc
    }
}

/// As [`flush`], for a call that is not a write (a read, a sync, ...). Should the bytes fail to
/// be written here, no write of SQLite's can report it, so the file fails every call from then
/// on: the store stops until it is opened again.
///
/// # Safety
/// `file` is an open [`GatheringFile`].
unsafe fn flush_before(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let rc = flush(file);
        if rc != ffi::SQLITE_OK {
            let g = gathered(file);
            g.failed.get_or_insert(rc);
        }
        rc
    }
}

/// Writes what is gathered ([`flush_before`]), then calls `f` with the wrapped file's methods.
///
/// # Safety
/// `file` is an open [`GatheringFile`].
unsafe fn after_flush(file: *mut ffi::sqlite3_file, f: impl FnOnce(&ffi::sqlite3_io_methods, *mut ffi::sqlite3_file) -> c_int) -> c_int {
    unsafe {
        let rc = flush_before(file);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        let (m, real) = real_methods(file);
        f(m, real)
    }
}

/// The default VFS's methods of the wrapped file.
///
/// # Safety
/// `file` is an open [`GatheringFile`].
unsafe fn real_methods<'a>(file: *mut ffi::sqlite3_file) -> (&'a ffi::sqlite3_io_methods, *mut ffi::sqlite3_file) {
    unsafe {
        let real = real_file(file);
        (&*(*real).pMethods, real)
    }
}

unsafe extern "C" fn x_write(file: *mut ffi::sqlite3_file, data: *const c_void, amount: c_int, offset: i64) -> c_int {
    unsafe {
        let g = gathered(file);
        g.stats.asked += 1;
        if let Some(rc) = g.failed {
            return rc;
        }
        let Ok(len) = usize::try_from(amount) else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        let end = offset + i64::from(amount);
        if offset == 0 {
            // The WAL's header: the log starts over from the beginning of the file.
            g.appended_to = 0;
        }
        let gathered_end = g.offset + i64::try_from(g.bytes.len()).expect("bounded");
        if !g.bytes.is_empty() && offset != gathered_end {
            let rc = flush(file);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        let g = gathered(file);
        if offset < g.appended_to {
            // Over frames already written (or just flushed above): straight through, now.
            g.stats.written += 1;
            let (m, real) = real_methods(file);
            return m.xWrite.expect("files write")(real, data, amount, offset);
        }
        g.appended_to = end;
        if g.bytes.is_empty() {
            g.offset = offset;
        }
        let bytes = std::slice::from_raw_parts(data.cast::<u8>(), len);
        g.bytes.extend_from_slice(bytes);
        if amount == FRAME_HEADER {
            // A new frame's header: does it end a commit? Its page comes next.
            g.commit_frame = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) != 0;
            return ffi::SQLITE_OK;
        }
        if g.commit_frame || g.bytes.len() >= MAX_GATHERED_BYTES {
            return flush(file);
        }
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn x_close(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let rc = flush(file);
        let (m, real) = real_methods(file);
        let closed = m.xClose.map_or(ffi::SQLITE_OK, |close| close(real));
        let g = (*file.cast::<GatheringFile>()).gathered;
        (*file.cast::<GatheringFile>()).gathered = std::ptr::null_mut();
        drop(Box::from_raw(g));
        (*file).pMethods = std::ptr::null();
        if rc != ffi::SQLITE_OK { rc } else { closed }
    }
}

unsafe extern "C" fn x_read(file: *mut ffi::sqlite3_file, data: *mut c_void, amount: c_int, offset: i64) -> c_int {
    unsafe { after_flush(file, |m, real| m.xRead.expect("files read")(real, data, amount, offset)) }
}

unsafe extern "C" fn x_truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    unsafe { after_flush(file, |m, real| m.xTruncate.expect("files truncate")(real, size)) }
}

unsafe extern "C" fn x_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    unsafe { after_flush(file, |m, real| m.xSync.expect("files sync")(real, flags)) }
}

unsafe extern "C" fn x_file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    unsafe { after_flush(file, |m, real| m.xFileSize.expect("files have a size")(real, size)) }
}

unsafe extern "C" fn x_lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe {
        let (m, real) = real_methods(file);
        m.xLock.map_or(ffi::SQLITE_OK, |f| f(real, level))
    }
}

unsafe extern "C" fn x_unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe {
        let (m, real) = real_methods(file);
        m.xUnlock.map_or(ffi::SQLITE_OK, |f| f(real, level))
    }
}

unsafe extern "C" fn x_check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    unsafe {
        let (m, real) = real_methods(file);
        match m.xCheckReservedLock {
            Some(f) => f(real, out),
            None => {
                *out = 0;
                ffi::SQLITE_OK
            }
        }
    }
}

unsafe extern "C" fn x_file_control(file: *mut ffi::sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    unsafe { after_flush(file, |m, real| m.xFileControl.map_or(ffi::SQLITE_NOTFOUND, |f| f(real, op, arg))) }
}

unsafe extern "C" fn x_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let (m, real) = real_methods(file);
        m.xSectorSize.map_or(4096, |f| f(real))
    }
}

unsafe extern "C" fn x_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let (m, real) = real_methods(file);
        m.xDeviceCharacteristics.map_or(0, |f| f(real))
    }
}

/// Version 1: SQLite maps shared memory and memory-maps pages through the database file, never
/// through its WAL.
static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

/// `conn`'s WAL file, if it is open through this VFS.
#[cfg(test)]
fn wal_of(conn: &rusqlite::Connection) -> Option<*mut ffi::sqlite3_file> {
    let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: `SQLITE_FCNTL_JOURNAL_POINTER` stores the journal's (here the WAL's) file pointer,
    // owned by the connection (SQLite answers it without calling the file's methods).
    unsafe {
        let rc = ffi::sqlite3_file_control(conn.handle(), c"main".as_ptr(), ffi::SQLITE_FCNTL_JOURNAL_POINTER, (&raw mut file).cast());
        (rc == ffi::SQLITE_OK && !file.is_null() && std::ptr::eq((*file).pMethods, &METHODS)).then_some(file)
    }
}

/// The counts of `conn`'s WAL file, if it is open through this VFS.
#[cfg(test)]
pub(super) fn stats(conn: &rusqlite::Connection) -> Option<WriteStats> {
    // SAFETY: an open file of ours, used by this thread only while `conn` is borrowed.
    wal_of(conn).map(|f| unsafe { gathered(f).stats })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rusqlite::{Connection, OpenFlags, params};

    use super::*;

    /// A connection through the VFS, in WAL mode, committing without syncs (as the writer's),
    /// with automatic checkpoints off so the WAL keeps every frame.
    fn gathering(path: &Path) -> Connection {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let c = Connection::open_with_flags_and_vfs(path, flags, register().unwrap()).unwrap();
        let mode: String = c.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        c.pragma_update(None, "synchronous", "NORMAL").unwrap();
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        c.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB NOT NULL)").unwrap();
        c
    }

    fn insert(c: &Connection, from: i64, rows: i64, bytes: usize) {
        let tx = c.unchecked_transaction().unwrap();
        for i in from..from + rows {
            // Different bytes per row, so a misplaced page shows.
            let body: Vec<u8> = (0..bytes).map(|k| (i as usize * 31 + k) as u8).collect();
            tx.execute("INSERT INTO t (id, body) VALUES (?1, ?2)", params![i, body]).unwrap();
        }
        tx.commit().unwrap();
    }

    /// Every row `insert` wrote, read through `c`.
    fn check(c: &Connection, rows: i64, bytes: usize) {
        let ok: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(ok, "ok");
        let mut s = c.prepare("SELECT id, body FROM t ORDER BY id").unwrap();
        let got: Vec<(i64, Vec<u8>)> = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!(got.len() as i64, rows);
        for (n, (id, body)) in got.iter().enumerate() {
            assert_eq!(*id, n as i64);
            let want: Vec<u8> = (0..bytes).map(|k| (*id as usize * 31 + k) as u8).collect();
            assert!(*body == want, "row {id} differs");
        }
    }

    /// What a process opening the files now would find: the database and its WAL copied aside
    /// while the writer still has them open, then opened plainly (SQLite rebuilds the WAL index
    /// from the WAL's frames, checking their checksums).
    fn copy_aside(path: &Path, dir: &Path) -> Connection {
        let copy = dir.join("copy.db");
        std::fs::copy(path, &copy).unwrap();
        std::fs::copy(path.with_extension("db-wal"), dir.join("copy.db-wal")).unwrap();
        Connection::open(&copy).unwrap()
    }

    #[test]
    fn a_commit_reaches_the_wal_in_one_write_that_others_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let c = gathering(&path);
        let before = stats(&c).expect("the WAL is ours");
        // ~25 pages of rows in one transaction: ~50 writes asked of the file.
        insert(&c, 0, 100, 1_000);
        let after = stats(&c).unwrap();
        assert!(after.asked - before.asked >= 50, "{before:?} -> {after:?}");
        assert_eq!(after.written - before.written, 1, "{before:?} -> {after:?}");
        // Ten more commits: one write each.
        for k in 0..10 {
            insert(&c, 100 + k, 1, 1_000);
        }
        let last = stats(&c).unwrap();
        assert_eq!(last.written - after.written, 10);
        // Another connection of this process sees all of it, and so does a fresh open of the
        // files as they are on disk.
        let plain = Connection::open(&path).unwrap();
        check(&plain, 110, 1_000);
        check(&copy_aside(&path, dir.path()), 110, 1_000);
        // Reads and writes through the gathering connection agree.
        check(&c, 110, 1_000);
    }

    #[test]
    fn a_transaction_that_spills_and_rolls_back_leaves_the_wal_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let c = gathering(&path);
        // A small cache: a large transaction writes frames before its commit (and rewrites
        // some of them in place), and is larger than what is gathered at once.
        c.pragma_update(None, "cache_size", 16).unwrap();
        insert(&c, 0, 3_000, 2_000);
        let s = stats(&c).unwrap();
        assert!(s.written > 2, "a 6 MB transaction is written in pieces: {s:?}");
        // Pages it had spilled and changed again were written over in place, and SQLite then
        // rewrote the headers of its frames (their checksums) up to the commit's: all of it is
        // in the file the moment `COMMIT` returns.
        check(&copy_aside(&path, dir.path()), 3_000, 2_000);
        // A transaction that spills, then rolls back: its frames are in the file, never
        // committed; the next commit goes on from the last committed frame.
        {
            let tx = c.unchecked_transaction().unwrap();
            tx.execute("DELETE FROM t WHERE id % 2 = 0", []).unwrap();
            tx.execute("UPDATE t SET body = zeroblob(1500)", []).unwrap();
            tx.rollback().unwrap();
        }
        insert(&c, 3_000, 50, 2_000);
        check(&Connection::open(&path).unwrap(), 3_050, 2_000);
        check(&copy_aside(&path, dir.path()), 3_050, 2_000);
        check(&c, 3_050, 2_000);
        // Checkpointed and closed, the database alone holds everything.
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
        drop(c);
        check(&Connection::open(&path).unwrap(), 3_050, 2_000);
    }

    #[test]
    fn a_commit_whose_write_fails_is_rolled_back_and_the_next_one_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let c = gathering(&path);
        insert(&c, 0, 10, 1_000);
        let wal = wal_of(&c).unwrap();
        // SAFETY: an open file of ours; this thread is the only one using `c`.
        unsafe { gathered(wal).fail_next_flush = true };
        let tx = c.unchecked_transaction().unwrap();
        tx.execute("INSERT INTO t (id, body) VALUES (10, x'00')", []).unwrap();
        let err = tx.commit().unwrap_err();
        assert_eq!(err.sqlite_error_code(), Some(rusqlite::ErrorCode::DiskFull), "{err}");
        // Nothing of it stayed; the connection goes on.
        assert!(c.is_autocommit());
        check(&c, 10, 1_000);
        insert(&c, 10, 5, 1_000);
        check(&Connection::open(&path).unwrap(), 15, 1_000);
        check(&copy_aside(&path, dir.path()), 15, 1_000);
    }

    #[test]
    fn bytes_that_fail_to_be_written_for_a_read_fail_the_file_from_then_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let c = gathering(&path);
        insert(&c, 0, 10, 1_000);
        let wal = wal_of(&c).unwrap();
        // SAFETY: calls the methods of an open file of ours directly, as SQLite would, on this
        // thread (the only one using `c`). The frame written is past every committed one.
        unsafe {
            let methods = &*(*wal).pMethods;
            let mut size = 0i64;
            assert_eq!(methods.xFileSize.unwrap()(wal, &mut size), ffi::SQLITE_OK);
            // Half a frame (a header that ends no commit) stays gathered...
            let header = [0u8; 24];
            assert_eq!(methods.xWrite.unwrap()(wal, header.as_ptr().cast(), 24, size), ffi::SQLITE_OK);
            assert!(!gathered(wal).bytes.is_empty());
            // ...and cannot be written when a read needs it: the read fails, and so does every
            // later call, though nothing is gathered any more.
            gathered(wal).fail_next_flush = true;
            let mut buf = [0u8; 32];
            assert_eq!(methods.xRead.unwrap()(wal, buf.as_mut_ptr().cast(), 32, 0), ffi::SQLITE_FULL);
            assert!(gathered(wal).bytes.is_empty());
            assert_eq!(methods.xRead.unwrap()(wal, buf.as_mut_ptr().cast(), 32, 0), ffi::SQLITE_FULL);
            assert_eq!(methods.xSync.unwrap()(wal, ffi::SQLITE_SYNC_NORMAL), ffi::SQLITE_FULL);
        }
        let tx = c.unchecked_transaction().unwrap();
        tx.execute("INSERT INTO t (id, body) VALUES (10, x'00')", []).unwrap();
        assert!(tx.commit().is_err(), "no commit while the WAL has failed");
        drop(c);
        // Opened again, the committed rows are all there.
        check(&Connection::open(&path).unwrap(), 10, 1_000);
    }

    #[test]
    fn only_the_wal_is_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        let c = gathering(&dir.path().join("g.db"));
        let mut main: *mut ffi::sqlite3_file = std::ptr::null_mut();
        // SAFETY: reads the main database file's pointer, owned by `c`.
        let methods = unsafe {
            let rc = ffi::sqlite3_file_control(c.handle(), c"main".as_ptr(), ffi::SQLITE_FCNTL_FILE_POINTER, (&raw mut main).cast());
            assert_eq!(rc, ffi::SQLITE_OK);
            (*main).pMethods
        };
        assert!(!std::ptr::eq(methods, &METHODS), "the database file is the default VFS's own");
        assert!(stats(&c).is_some());
        // A plain connection's WAL is not ours.
        let plain = Connection::open(dir.path().join("g.db")).unwrap();
        plain.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)).unwrap();
        assert!(stats(&plain).is_none());
    }
}
