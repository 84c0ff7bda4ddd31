//! `libpmfs_direct.so`: `LD_PRELOAD=libpmfs_direct.so program` serves read(2)/pread(2)/
//! readv(2) and overwriting write(2)/pwrite(2) of files on pmfs mounts straight from a direct
//! mapping of the device, with no FUSE round trip, and answers mmap(2) of them with direct
//! mappings of their extents (`maps.rs`). Everything else, and every call it cannot
//! prove safe to serve, goes to the real libc function unchanged (README: "Direct access for
//! unmodified programs").
//!
//! Layout of the crate: this file holds the logic (which fds are tracked, what a served call
//! does) and `maps.rs` that of mappings, in safe code; `sys.rs` holds every `unsafe` line: the exported interposers, the
//! `dlsym(RTLD_NEXT)` look-ups of the real functions, raw buffers, errno, the constructor.
//!
//! How it decides (per call, in this order):
//! - An fd is *tracked* when it was opened (open/openat/creat and their 64/_2 variants)
//!   through this library on a pmfs mount whose device the caller can open read-write, and
//!   the daemon granted a published lease ([`pmfs::dax::MAP_FLAG_PUBLISH`]): the file's
//!   extents as they are (nothing allocated) plus a slot in the daemon's state table
//!   ([`pmfs::dax::StateTable`]) where the daemon publishes the file's size and layout
//!   generation under a seqlock. dup/dup2/dup3/fcntl(F_DUPFD*) share the tracking;
//!   close/close_range/closefrom/fclose end it.
//! - A served read snapshots the slot (sequence even, slot still this inode), checks that its
//!   extents belong to the published generation (else refreshes them with one ioctl),
//!   clamps to the published size, copies from written extents only, then checks that the
//!   sequence did not move. Any doubt: the real call.
//! - A served write additionally needs an fd opened for writing without O_APPEND, O_DIRECT
//!   or O_SYNC and a file without set-user/group-ID bits. It stores with non-temporal
//!   stores and persists before returning; if the sequence moved meanwhile it writes the
//!   same bytes again through the real call.
//!   - A range on written extents inside the size is stored into as it is.
//!   - An append (a range ending past the size) of a file of 2 MiB or more that is not in
//!     written blocks is first made written blocks by the daemon, ahead of the write
//!     (ALLOCATE, up to 64 MiB; [`View::allocation_window`]), and the view refreshed; it is
//!     stored past the end of file, then made part of the file by the daemon (EXTEND) only
//!     if the layout generation is still the one stored at; else the real call writes it
//!     again. Writes into holes or preallocated space inside the file are the kernel's.
//! - read(2)/write(2) use the file offset (lseek, serve, lseek): only while no fork happened
//!   since the open (a forked child shares the offset) and no other thread of this process is
//!   inside a served read/write of the same open file.

mod maps;
mod sys;

use pmfs::dax::{
    DIRECT_ALLOCATE_MAX, DaxMapping, ENTRY_UNWRITTEN, MapEntry, StateSnapshot, StateTable,
};
use pmfs::format::CHUNK_SIZE;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// fds at or above this are never tracked.
const MAX_FDS: usize = 1 << 16;

/// `statfs.f_type` of FUSE file systems.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Served writes stamp mtime/ctime at most this long after the last stamp; under
/// strictatime, served reads stamp atime at most this often.
const TOUCH_INTERVAL: Duration = Duration::from_secs(1);

/// relatime updates an access time older than this at the next read, changed file or not.
const ATIME_DAY: Duration = Duration::from_secs(24 * 3600);

/// The tracked open files, by fd. Readers only ever `try_read` (never block: safe in a
/// signal handler and after a fork that happened while another thread held a slot).
static FILES: [RwLock<Option<Arc<Tracked>>>; MAX_FDS] = [const { RwLock::new(None) }; MAX_FDS];

/// Incremented before every fork (pthread_atfork): an open file tracked before a fork shares
/// its offset with the child, so read(2)/write(2) on it are no longer served.
static FORKS: AtomicU64 = AtomicU64::new(0);

/// Set when a tracking slot could not be updated (its lock stayed taken, e.g. by a thread
/// that did not survive a fork): from then on nothing is served.
static BROKEN: AtomicBool = AtomicBool::new(false);

/// Counters printed at exit with `PMFS_DIRECT_STATS=1`.
#[derive(Debug, Default)]
struct Stats {
    tracked: AtomicU64,
    untracked: AtomicU64,
    served_reads: AtomicU64,
    served_read_bytes: AtomicU64,
    served_writes: AtomicU64,
    served_write_bytes: AtomicU64,
    real_reads: AtomicU64,
    real_writes: AtomicU64,
    refreshes: AtomicU64,
    allocations: AtomicU64,
    extensions: AtomicU64,
    touches: AtomicU64,
    atime_stamps: AtomicU64,
    served_mmaps: AtomicU64,
    real_mmaps: AtomicU64,
}

static STATS: Stats = Stats {
    tracked: AtomicU64::new(0),
    untracked: AtomicU64::new(0),
    served_reads: AtomicU64::new(0),
    served_read_bytes: AtomicU64::new(0),
    served_writes: AtomicU64::new(0),
    served_write_bytes: AtomicU64::new(0),
    real_reads: AtomicU64::new(0),
    real_writes: AtomicU64::new(0),
    refreshes: AtomicU64::new(0),
    allocations: AtomicU64::new(0),
    extensions: AtomicU64::new(0),
    touches: AtomicU64::new(0),
    atime_stamps: AtomicU64::new(0),
    served_mmaps: AtomicU64::new(0),
    real_mmaps: AtomicU64::new(0),
};

fn count(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// `PMFS_DIRECT_DEBUG=1`: one line on stderr for each pmfs file left untracked.
static DEBUG: AtomicBool = AtomicBool::new(false);
/// `PMFS_DIRECT_STATS=1`: counters on stderr at exit; `PMFS_DIRECT_STATS=/path`: appended
/// to that file (stderr may be closed by then: GNU programs close it in their own atexit).
static SHOW_STATS: AtomicBool = AtomicBool::new(false);
static STATS_FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
/// fds at or above this are not tracked: a quarter of the open-file limit when the library
/// loaded, so that the descriptors tracking adds (three per tracked open: the lease holder,
/// the mapping's duplicate and the device) leave the program its own share of the limit.
static TRACK_BELOW: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(MAX_FDS);
/// `PMFS_DIRECT=0`: track nothing (every call goes to libc).
static DISABLED: AtomicBool = AtomicBool::new(false);

/// Reads the environment once, from the library's constructor.
fn init() {
    let on = |name: &str| std::env::var_os(name).is_some_and(|v| v == "1");
    DEBUG.store(on("PMFS_DIRECT_DEBUG"), Ordering::Relaxed);
    SHOW_STATS.store(on("PMFS_DIRECT_STATS"), Ordering::Relaxed);
    if let Some(p) =
        std::env::var_os("PMFS_DIRECT_STATS").filter(|p| p.as_encoded_bytes().starts_with(b"/"))
    {
        SHOW_STATS.store(true, Ordering::Relaxed);
        let _ = STATS_FILE.set(PathBuf::from(p));
    }
    DISABLED.store(
        std::env::var_os("PMFS_DIRECT").is_some_and(|v| v == "0"),
        Ordering::Relaxed,
    );
    let quarter = sys::open_file_limit().map_or(MAX_FDS, |l| (l / 4) as usize);
    TRACK_BELOW.store(quarter.min(MAX_FDS), Ordering::Relaxed);
}

/// At exit: the counters, where `PMFS_DIRECT_STATS` asks, if this process met a pmfs file.
fn report_stats() {
    let Some(line) = stats_line() else {
        return;
    };
    match STATS_FILE.get() {
        Some(path) => {
            use std::io::Write;
            let _ = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
        }
        None => sys::stderr_line(&line),
    }
}

fn stats_line() -> Option<String> {
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let s = &STATS;
    if !SHOW_STATS.load(Ordering::Relaxed) || g(&s.tracked) + g(&s.untracked) == 0 {
        return None;
    }
    Some(format!(
        "pmfs-direct: pid {} tracked {} untracked {} served_reads {} served_read_bytes {} \
         served_writes {} served_write_bytes {} real_reads {} real_writes {} refreshes {} \
         allocations {} extensions {} touches {} atime_stamps {} served_mmaps {} \
         real_mmaps {}\n",
        std::process::id(),
        g(&s.tracked),
        g(&s.untracked),
        g(&s.served_reads),
        g(&s.served_read_bytes),
        g(&s.served_writes),
        g(&s.served_write_bytes),
        g(&s.real_reads),
        g(&s.real_writes),
        g(&s.refreshes),
        g(&s.allocations),
        g(&s.extensions),
        g(&s.touches),
        g(&s.atime_stamps),
        g(&s.served_mmaps),
        g(&s.real_mmaps),
    ))
}

/// The extents of a published lease and their mapping, for one layout generation.
#[derive(Debug)]
struct View {
    mapping: Option<DaxMapping>,
    entries: Vec<MapEntry>,
    /// The layout generation the extents belong to. Moves only from G to G + 1, in place,
    /// after this client's own EXTEND at G succeeded: the daemon then guarantees the layout
    /// is unchanged and the generation is G + 1 ([`pmfs::dax::DIRECT_OP_EXTEND`]).
    generation: AtomicU64,
    /// Calls served from this view: its refresh paid off once they reach
    /// [`REFRESH_PAYS_OFF`].
    served: AtomicU64,
}

impl View {
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Copies file bytes `off..off + buf.len()` (inside the file's size) into `buf`: written
    /// extents from the mapping, holes and unwritten extents as zeros (what they read as).
    fn read_into(&self, off: u64, buf: &mut [u8]) -> Option<()> {
        let end = off.checked_add(buf.len() as u64)?;
        let first = self
            .entries
            .partition_point(|e| e.file_offset.saturating_add(e.len) <= off);
        let mut at = off;
        for e in self.entries[first..]
            .iter()
            .take_while(|e| e.file_offset < end)
        {
            let start = e.file_offset.max(at);
            let stop = e.file_offset.saturating_add(e.len).min(end);
            let gap = usize::try_from(start - at).ok()?;
            let rel = usize::try_from(at - off).ok()?;
            buf[rel..rel + gap].fill(0);
            let piece = &mut buf[rel + gap..usize::try_from(stop - off).ok()?];
            if e.flags & ENTRY_UNWRITTEN != 0 {
                piece.fill(0);
            } else {
                self.mapping
                    .as_ref()?
                    .read(usize::try_from(start).ok()?, piece)
                    .ok()?;
            }
            at = stop;
        }
        let rel = usize::try_from(at - off).ok()?;
        buf[rel..].fill(0);
        Some(())
    }

    /// Where file bytes `off..end` live on the device, as (device offset, length) pieces;
    /// `None` unless they all lie in written extents.
    fn device_pieces(&self, off: u64, end: u64) -> Option<Vec<(u64, u64)>> {
        if end <= off || !self.covers_written(off, end - off) {
            return None;
        }
        let first = self
            .entries
            .partition_point(|e| e.file_offset.saturating_add(e.len) <= off);
        let mut out = Vec::new();
        for e in self.entries[first..]
            .iter()
            .take_while(|e| e.file_offset < end)
        {
            let from = e.file_offset.max(off);
            let to = e.file_offset.saturating_add(e.len).min(end);
            out.push((e.device_offset + (from - e.file_offset), to - from));
        }
        Some(out)
    }

    /// What to allocate ahead of an append `off..end` (ending past the end of file) that is
    /// not all in written blocks, in a file of `size` (at least 2 MiB): `from..to`, from
    /// the write's first byte (so no hole the kernel's write would leave is allocated) on
    /// past the end by as much as the file holds (2 to 64 MiB, up to a 2 MiB chunk
    /// boundary, at most [`pmfs::dax::DIRECT_ALLOCATE_MAX`] in all): a file growing by
    /// small writes costs one allocation and refresh per doubling, then one per 64 MiB.
    ///
    /// `None`, the write is the kernel's:
    /// - a write inside the file (into a hole or preallocated space): allocating more than
    ///   its own blocks would change what SEEK_HOLE/SEEK_DATA and FIEMAP show (xfstests
    ///   generic/285 and 436 saw it), and its own blocks alone cost an allocation and a
    ///   refresh per write, more than the kernel's one round trip;
    /// - a write that leaves a gap past the chunk holding the end of file (a sparse file);
    /// - a file with blocks past the chunk holding its end of file (fallocate(2) with
    ///   KEEP_SIZE): the daemon gives back what is left past the end when the file is
    ///   closed, and those are the program's to keep.
    fn allocation_window(&self, off: u64, end: u64, size: u64) -> Option<(u64, u64)> {
        let chunk_up = |x: u64| x.checked_next_multiple_of(CHUNK_SIZE);
        let eof_chunk_end = chunk_up(size)?;
        let mapped_end = self
            .entries
            .last()
            .map_or(0, |e| e.file_offset.saturating_add(e.len));
        if end <= size || off > eof_chunk_end || mapped_end > eof_chunk_end {
            return None;
        }
        let want = end.max(off.saturating_add(size.clamp(CHUNK_SIZE, DIRECT_ALLOCATE_MAX)));
        let to = chunk_up(want)?.min(off.saturating_add(DIRECT_ALLOCATE_MAX));
        (to >= end).then_some((off, to))
    }

    /// True when file bytes `off..off + n` (n > 0) all lie in written extents.
    fn covers_written(&self, off: u64, n: u64) -> bool {
        let end = off.saturating_add(n);
        let mut at = off;
        let first = self
            .entries
            .partition_point(|e| e.file_offset.saturating_add(e.len) <= off);
        for e in &self.entries[first..] {
            if e.file_offset > at || e.flags & ENTRY_UNWRITTEN != 0 {
                return false;
            }
            at = e.file_offset.saturating_add(e.len);
            if at >= end {
                return true;
            }
        }
        false
    }
}

/// One open file description that this library serves.
#[derive(Debug)]
struct Tracked {
    /// Our duplicate of the descriptor: for refresh and touch ioctls (the user's fd number
    /// may be closed or reused behind us; this one is checked against `dev`/`ino` first).
    file: File,
    dev: u64,
    ino: u64,
    device: PathBuf,
    state: Arc<StateTable>,
    slot: u32,
    lease: u64,
    readable: bool,
    /// Opened for writing, on a file without set-user/group-ID bits.
    writable: bool,
    /// The description's status flags (O_APPEND, O_DIRECT, O_SYNC), kept by F_SETFL.
    status: AtomicI32,
    /// [`FORKS`] when opened.
    forks: u64,
    view: RwLock<Arc<View>>,
    refreshing: Mutex<()>,
    /// Held by the append under way ([`Tracked::write_at`]).
    appends: AppendLock,
    /// An extension by this process is under way: the daemon may have published the
    /// generation it makes before the view moved to it ([`Tracked::extend`]).
    extending: AtomicBool,
    /// A served read(2)/write(2) of this description is moving its offset.
    offset_busy: AtomicBool,
    /// Served writes not yet stamped (mtime/ctime) and not yet shown to the kernel.
    dirty: AtomicBool,
    /// When the last stamp was asked for (ns since the library's epoch; 0: never).
    last_touch: AtomicU64,
    /// When served reads last asked for an access-time update (ns; 0: never), and at which
    /// generation of the file ([`Tracked::accessed`]).
    accessed_ns: AtomicU64,
    accessed_generation: AtomicU64,
    /// The daemon said every read updates the access time (strictatime).
    strict_atime: AtomicBool,
    /// No refresh before this time (ns since the library's epoch): see [`Tracked::view_for`].
    refresh_after: AtomicU64,
    /// The current refresh back-off (ns).
    backoff: AtomicU64,
    /// Refreshes in a row whose views did not pay off.
    unpaid_refreshes: AtomicU64,
}

/// A lock that never blocks for long: [`AppendLock::lock`] spins (yielding) for at most
/// [`APPEND_WAIT`], then gives up, so a signal handler that appends while the thread it
/// interrupted holds the lock falls back to the real call instead of deadlocking.
#[derive(Debug, Default)]
struct AppendLock(AtomicBool);

/// The longest an append waits for another one of the same open file.
const APPEND_WAIT: Duration = Duration::from_millis(20);

impl AppendLock {
    fn lock(&self) -> Option<AppendGuard<'_>> {
        let start = std::time::Instant::now();
        while self
            .0
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            if start.elapsed() >= APPEND_WAIT {
                return None;
            }
            std::thread::yield_now();
        }
        Some(AppendGuard(&self.0))
    }
}

struct AppendGuard<'a>(&'a AtomicBool);

impl Drop for AppendGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Longest back-off between refreshes that served nothing.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// First back-off after a refresh that did not pay off.
const MIN_BACKOFF: Duration = Duration::from_millis(1);
/// A refresh pays off when the view it made serves this many calls. Processes writing at
/// random into one new file alternate writes into holes (the kernel's; each moves the
/// generation) with overwrites of blocks written before (served after a refresh): with a
/// threshold of one call and no cost bound, four fio processes sharing a file refreshed
/// views of thousands of extents for nearly every write and fell to 0.1 kIOPS
/// (bench/RESULTS.md, session 6).
const REFRESH_PAYS_OFF: u64 = 16;
/// Refreshes in a row that may fail to pay off before the back-off starts: a file that
/// another process changes now and then is still served at once after each change.
const UNPAID_REFRESHES_TOLERATED: u64 = 16;
/// After a refresh, none for this long per extent it listed: about 8 times what listing
/// and mapping one extent costs (an ioctl per 64, an mmap per run), so refreshing takes at
/// most about a ninth of the time however often the file changes.
const REFRESH_WAIT_PER_EXTENT: Duration = Duration::from_micros(16);

/// Monotonic nanoseconds, from a fixed start (never 0 once running).
fn now_ns() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    (start.elapsed().as_nanos() as u64).saturating_add(1)
}

impl Tracked {
    fn unserved_status(&self) -> bool {
        self.status.load(Ordering::Relaxed) & (libc::O_APPEND | libc::O_DIRECT | libc::O_SYNC) != 0
    }

    /// The view for `snap`'s generation: the current one, or a refreshed one (whose
    /// generation may be newer).
    fn view_for(&self, snap: &StateSnapshot) -> Option<Arc<View>> {
        let mut current = Arc::clone(&*self.view.try_read().ok()?);
        if current.generation() == snap.generation {
            return Some(current);
        }
        // Our own extension, published by the daemon but not yet moved into the view, is
        // no change of the layout: wait for it (bounded) instead of refreshing.
        if snap.generation == current.generation() + 1 && self.extending.load(Ordering::Acquire) {
            let start = std::time::Instant::now();
            while self.extending.load(Ordering::Acquire)
                && start.elapsed() < Duration::from_millis(10)
            {
                std::thread::yield_now();
            }
            current = Arc::clone(&*self.view.try_read().ok()?);
            if current.generation() == snap.generation {
                return Some(current);
            }
        }
        // A file that changes through the mount between every few calls (appends, writes
        // into holes, another process writing) would cost a refresh (an ioctl per 64
        // extents, an mmap per run, the munmap of the old view) for every call or two it
        // then serves: after a refresh that served fewer than REFRESH_PAYS_OFF calls, back
        // off (doubling up to MAX_BACKOFF) and leave calls to the kernel meanwhile.
        let now = now_ns();
        if now < self.refresh_after.load(Ordering::Relaxed) {
            return None;
        }
        let unpaid = if current.served.load(Ordering::Relaxed) >= REFRESH_PAYS_OFF {
            0
        } else {
            self.unpaid_refreshes
                .load(Ordering::Relaxed)
                .saturating_add(1)
        };
        self.unpaid_refreshes.store(unpaid, Ordering::Relaxed);
        let backoff = if unpaid <= UNPAID_REFRESHES_TOLERATED {
            0
        } else {
            (self.backoff.load(Ordering::Relaxed) * 2)
                .clamp(MIN_BACKOFF.as_nanos() as u64, MAX_BACKOFF.as_nanos() as u64)
        };
        self.backoff.store(backoff, Ordering::Relaxed);
        self.refresh_after.store(now + backoff, Ordering::Relaxed);
        drop(current);
        self.refresh()
    }

    /// Replaces the view with one of the lease's extents now (one thread at a time: `None`
    /// while another refreshes, or when the daemon refused).
    fn refresh(&self) -> Option<Arc<View>> {
        let _one = self.refreshing.try_lock().ok()?;
        // Our descriptor must still be the file we track (the program may have closed or
        // replaced that fd number behind us).
        let meta = self.file.metadata().ok()?;
        if meta.dev() != self.dev || meta.ino() != self.ino {
            return None;
        }
        let mapped = DaxMapping::map_published(&self.file, &self.device, self.lease);
        // A refresh costs an ioctl per 64 extents and an mmap per run: a view of thousands
        // of extents takes milliseconds. Whatever the views serve, the next refresh waits
        // REFRESH_WAIT_PER_EXTENT per extent of this one (a few microseconds for a small
        // file, so changes by another process are still served at once after each).
        if let Ok(p) = &mapped {
            let wait =
                (p.entries.len() as u64).saturating_mul(REFRESH_WAIT_PER_EXTENT.as_nanos() as u64);
            self.refresh_after
                .fetch_max(now_ns().saturating_add(wait), Ordering::Relaxed);
        }
        let p = match mapped {
            Ok(p) => p,
            Err(e) => {
                debug(format_args!(
                    "inode {}: refreshing the mapping failed: {e}",
                    self.ino
                ));
                return None;
            }
        };
        count(&STATS.refreshes, 1);
        let fresh = Arc::new(View {
            mapping: p.mapping,
            entries: p.entries,
            generation: AtomicU64::new(p.generation),
            served: AtomicU64::new(0),
        });
        *self.view.try_write().ok()? = Arc::clone(&fresh);
        Some(fresh)
    }

    /// A snapshot of the published state and the view of its generation: a refresh may
    /// return a newer generation than the snapshot that asked for it (the daemon changed
    /// the file meanwhile), so snapshot again a few times.
    fn current(&self) -> Option<(StateSnapshot, Arc<View>)> {
        for _ in 0..3 {
            let snap = self.snapshot()?;
            let view = self.view_for(&snap)?;
            if view.generation() == snap.generation {
                return Some((snap, view));
            }
        }
        None
    }

    /// A snapshot of this file's published state once the change under way (if any) is
    /// published: the daemon's changes are short, so this waits at most a few
    /// milliseconds (bounded: `None` after that).
    fn settled_snapshot(&self) -> Option<StateSnapshot> {
        let start = std::time::Instant::now();
        loop {
            if let Some(snap) = self.snapshot() {
                return Some(snap);
            }
            if start.elapsed() > Duration::from_millis(100) {
                return None;
            }
            std::thread::yield_now();
        }
    }

    /// A snapshot of this file's published state, if it may be served from.
    fn snapshot(&self) -> Option<StateSnapshot> {
        let snap = self.state.snapshot(self.slot)?;
        (snap.ino == self.ino).then_some(snap)
    }

    /// Serves a read of `buf.len()` bytes at `off`; `None`: use the real call.
    fn read_at(&self, buf: &mut [u8], off: u64) -> Option<usize> {
        if !self.readable {
            return None;
        }
        let (snap, view) = self.current()?;
        let n = snap.size.saturating_sub(off).min(buf.len() as u64);
        if n > 0 {
            view.read_into(off, &mut buf[..n as usize])?;
        }
        if !self.state.unchanged(self.slot, snap.seq) {
            return None;
        }
        self.accessed(snap.generation);
        view.served.fetch_add(1, Ordering::Relaxed);
        count(&STATS.served_reads, 1);
        count(&STATS.served_read_bytes, n);
        Some(n as usize)
    }

    /// Serves a write of `data` at `off`; `None`: use the real call (and nothing was
    /// stored, or what was stored is stored again by it, or lies past the end of file where
    /// nothing shows it).
    fn write_at(&self, data: &[u8], off: u64) -> Option<usize> {
        if !self.writable || self.unserved_status() || data.is_empty() {
            return None;
        }
        let end = off.checked_add(data.len() as u64)?;
        // Appends of this open file are made one at a time, from the allocation to the
        // extension: each moves the layout generation, so interleaved ones would make each
        // other's extensions fail (and go through the kernel, moving it again).
        let published = self.snapshot()?;
        let _one_append = if end > published.size {
            Some(self.appends.lock()?)
        } else {
            None
        };
        self.allocate_for(off, end, &published)?;
        // A store under way from before the snapshot that allows it until it is done: a
        // chattr +i/+a waits for it ([`StateTable::writer_enter`]). The ioctls before and
        // after stay outside: the daemon waits for stores while it holds the inode's lock.
        self.state.writer_enter(self.slot);
        let stored = self.store_at(data, off);
        self.state.writer_leave(self.slot);
        let (snap, view) = stored?;
        if end > snap.size {
            // An append: what was stored lies past the end of file until the daemon
            // extends it, which it does only at the generation stored at (so nothing
            // changed the file's blocks in between); else the real call writes it all.
            self.extend(&view, snap.generation, off, end)?;
        } else if !self.state.unchanged(self.slot, snap.seq)
            && !self.store_stands(&view, off, data.len())
        {
            // The daemon changed the file meanwhile and moved these blocks (or could not
            // be asked): the real call stores the same bytes wherever they live now.
            return None;
        } else {
            self.stored();
        }
        view.served.fetch_add(1, Ordering::Relaxed);
        count(&STATS.served_writes, 1);
        count(&STATS.served_write_bytes, data.len() as u64);
        Some(data.len())
    }

    /// Before a write of `off..end`: when the view at hand does not have it all in written
    /// blocks and it is an append, asks the daemon to make it written blocks ahead of the
    /// write ([`pmfs::dax::DIRECT_OP_ALLOCATE`]; see [`View::allocation_window`]) and
    /// refreshes the view. `None`: the write is the kernel's.
    fn allocate_for(&self, off: u64, end: u64, published: &StateSnapshot) -> Option<()> {
        let at_hand = Arc::clone(&*self.view.try_read().ok()?);
        if at_hand.covers_written(off, end - off) {
            return Some(());
        }
        // Files under 2 MiB are the kernel's to fill: one write round trip is cheaper than
        // an allocation, a refresh and an extension, and the daemon places a small file's
        // blocks (then moves them into one aligned chunk when it passes 2 MiB).
        if !published.writes_allowed || published.size < CHUNK_SIZE {
            return None;
        }
        let (from, to) = at_hand.allocation_window(off, end, published.size)?;
        drop(at_hand);
        match pmfs::dax::direct_allocate(&self.file, self.lease, from, to - from) {
            Ok(_) => count(&STATS.allocations, 1),
            Err(e) => {
                debug(format_args!(
                    "inode {}: allocating {from}..{to} failed: {e}",
                    self.ino
                ));
                return None;
            }
        }
        self.refresh()?.covers_written(off, end - off).then_some(())
    }

    /// After an append stored `off..end` into blocks past the end of file at layout
    /// `generation` (of `view`): asks the daemon to make them part of the file
    /// ([`pmfs::dax::DIRECT_OP_EXTEND`]; it also stamps mtime and ctime). On success the
    /// layout did not change and the view moves to the next generation in place, serving on
    /// without a refresh.
    ///
    /// The generation must be the one the store was decided at, not the view's now: an
    /// extension zeroes the gap between the old end of file and its range, so another
    /// thread's append beyond ours, extended first, zeroed our stored bytes; the daemon
    /// then refuses ours (the generation moved) and the real call writes them again.
    fn extend(&self, view: &View, generation: u64, off: u64, end: u64) -> Option<()> {
        self.extending.store(true, Ordering::Release);
        let extended = pmfs::dax::direct_extend(&self.file, self.lease, off, end - off, generation);
        if extended.is_ok() {
            // Only one extension at `generation` succeeds, and only extensions move a view.
            let _ = view.generation.compare_exchange(
                generation,
                generation + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
        self.extending.store(false, Ordering::Release);
        if let Err(e) = extended {
            debug(format_args!(
                "inode {}: extending to {end} failed: {e}",
                self.ino
            ));
            return None;
        }
        count(&STATS.extensions, 1);
        Some(())
    }

    /// After a store into `stored_in` raced a change of the file: true when the store is in
    /// the file, i.e. the file's blocks for `off..off + n` (inside its size) are still the
    /// ones stored into. While this lease lives the file's blocks are never handed to it
    /// again once it gave them up (frees are deferred), so the same blocks now were the
    /// file's all along. Whatever the change was, the write came first (a change that
    /// forbids writes, chattr +i/+a, waited for the store: `StateTable::writer_enter`).
    fn store_stands(&self, stored_in: &View, off: u64, n: usize) -> bool {
        let Some(snap) = self.settled_snapshot() else {
            return false;
        };
        let Some((now, view)) = self.current() else {
            return false;
        };
        let end = off.saturating_add(n as u64);
        now.generation >= snap.generation
            && end <= now.size
            && view
                .device_pieces(off, end)
                .is_some_and(|p| stored_in.device_pieces(off, end) == Some(p))
    }

    /// The store of a served write: checks that it may be served and stores; returns the
    /// snapshot it was decided on (`None`: nothing was stored). Stores past the end of file
    /// are left for [`Tracked::extend`] to make part of it.
    fn store_at(&self, data: &[u8], off: u64) -> Option<(StateSnapshot, Arc<View>)> {
        let n = data.len() as u64;
        // Writes to immutable or append-only files (chattr +i/+a) are the kernel's, which
        // pmfs refuses; so are those the view at hand does not have in written blocks (the
        // allocation ahead did not happen or did not cover them): no refresh for them.
        let published = self.snapshot()?;
        if !published.writes_allowed || !self.view.try_read().ok()?.covers_written(off, n) {
            return None;
        }
        let (snap, view) = self.current()?;
        if !snap.writes_allowed || !view.covers_written(off, n) {
            return None;
        }
        let at = usize::try_from(off).ok()?;
        view.mapping.as_ref()?.write_persist(at, data).ok()?;
        Some((snap, view))
    }

    /// After a served read of the file at `generation`: asks the daemon to update the
    /// access time as a read through the mount would ([`pmfs::dax::DIRECT_OP_ACCESSED`]),
    /// at the first served read of this open file, at the first after the file changed
    /// (a write makes relatime's update due again), and under strictatime at most once a
    /// second after that (else once a day, relatime's other rule).
    fn accessed(&self, generation: u64) {
        let now = now_ns();
        let last = self.accessed_ns.load(Ordering::Relaxed);
        let every = if self.strict_atime.load(Ordering::Relaxed) {
            TOUCH_INTERVAL
        } else {
            ATIME_DAY
        };
        if last != 0
            && self.accessed_generation.load(Ordering::Relaxed) == generation
            && now.saturating_sub(last) < every.as_nanos() as u64
        {
            return;
        }
        self.accessed_generation
            .store(generation, Ordering::Relaxed);
        self.accessed_ns.store(now, Ordering::Relaxed);
        count(&STATS.atime_stamps, 1);
        match pmfs::dax::direct_accessed(&self.file, self.lease) {
            Ok(strict) => self.strict_atime.store(strict, Ordering::Relaxed),
            Err(e) => debug(format_args!(
                "inode {}: updating the access time failed: {e}",
                self.ino
            )),
        }
    }

    /// After a served mmap: the access time is updated as for a served read (the kernel's
    /// mmap updates it too).
    pub(crate) fn mapped_for_reading(&self) {
        if let Some(snap) = self.snapshot() {
            self.accessed(snap.generation);
        }
    }

    /// After a served write: the first one after a quiet second is stamped at once, later
    /// ones at the next served write a second after the last stamp, or at the next
    /// fsync/close/unserved call ([`Tracked::settle`]).
    fn stored(&self) {
        let now = now_ns();
        let last = self.last_touch.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) >= TOUCH_INTERVAL.as_nanos() as u64 {
            self.touch(now);
        } else {
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// Stamps the served writes so far (mtime/ctime, kernel cache) if any are unstamped.
    fn settle(&self) {
        if self.dirty.load(Ordering::Acquire) {
            self.touch(now_ns());
        }
    }

    fn touch(&self, now: u64) {
        self.dirty.store(false, Ordering::Release);
        self.last_touch.store(now, Ordering::Relaxed);
        count(&STATS.touches, 1);
        if let Err(e) =
            pmfs::dax::direct_request(&self.file, pmfs::dax::DIRECT_OP_TOUCH, self.lease)
        {
            debug(format_args!(
                "inode {}: stamping mtime failed: {e}",
                self.ino
            ));
        }
    }
}

fn debug(what: std::fmt::Arguments<'_>) {
    if DEBUG.load(Ordering::Relaxed) {
        sys::stderr_line(&format!("pmfs-direct: {what}\n"));
    }
}

/// The tracking of `fd`, if any.
fn lookup(fd: i32) -> Option<Arc<Tracked>> {
    if BROKEN.load(Ordering::Relaxed) {
        return None;
    }
    let slot = FILES.get(usize::try_from(fd).ok()?)?;
    slot.try_read().ok()?.clone()
}

/// Replaces the tracking of `fd` (the previous one is settled and dropped).
fn set(fd: i32, t: Option<Arc<Tracked>>) {
    let Some(slot) = usize::try_from(fd).ok().and_then(|i| FILES.get(i)) else {
        return;
    };
    // Writers hold a slot for one swap; a lock that stays taken belongs to a thread that
    // is gone (a fork) or that this thread interrupted (a signal handler): stop serving.
    let mut spins = 0u32;
    let old = loop {
        match slot.try_write() {
            Ok(mut g) => break std::mem::replace(&mut *g, t),
            Err(_) if spins < 1_000_000 => {
                spins += 1;
                std::thread::yield_now();
            }
            Err(_) => {
                BROKEN.store(true, Ordering::Relaxed);
                return;
            }
        }
    };
    if let Some(old) = old {
        old.settle();
    }
}

/// State tables opened so far, by path.
static TABLES: Mutex<Vec<(PathBuf, Arc<StateTable>)>> = Mutex::new(Vec::new());

fn state_table(path: &Path) -> std::io::Result<Arc<StateTable>> {
    let mut tables = TABLES
        .lock()
        .map_err(|_| std::io::Error::other("poisoned"))?;
    if let Some((_, t)) = tables.iter().find(|(p, _)| p == path) {
        return Ok(Arc::clone(t));
    }
    let t = Arc::new(StateTable::open(path)?);
    tables.push((path.to_path_buf(), Arc::clone(&t)));
    Ok(t)
}

/// After a successful open of `fd` with `flags`: tracks it if it is a pmfs file we may map.
fn opened(fd: i32, flags: i32) {
    set(fd, None); // an fd number reused behind our back starts untracked
    if DISABLED.load(Ordering::Relaxed)
        || flags & libc::O_PATH != 0
        || usize::try_from(fd).is_ok_and(|i| i >= TRACK_BELOW.load(Ordering::Relaxed))
    {
        return;
    }
    if sys::fstatfs_type(fd) != Some(FUSE_SUPER_MAGIC) {
        return;
    }
    match track(fd, flags) {
        Ok(t) => {
            count(&STATS.tracked, 1);
            set(fd, Some(Arc::new(t)));
        }
        Err(e) => {
            count(&STATS.untracked, 1);
            debug(format_args!("fd {fd} left to the kernel: {e}"));
        }
    }
}

fn track(fd: i32, flags: i32) -> std::io::Result<Tracked> {
    let file = sys::dup_cloexec(fd)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    // The mount's source in /proc/self/mountinfo; the ioctls below prove it is pmfs.
    let device = pmfs::dax::device_of(&file)?;
    let p = DaxMapping::map_published(&file, &device, 0)?;
    let (slot, path) = pmfs::dax::published_state(&file, p.lease)?;
    let state = state_table(&path)?;
    let access = flags & libc::O_ACCMODE;
    Ok(Tracked {
        dev: meta.dev(),
        ino: meta.ino(),
        device,
        state,
        slot,
        lease: p.lease,
        readable: access == libc::O_RDONLY || access == libc::O_RDWR,
        writable: (access == libc::O_WRONLY || access == libc::O_RDWR) && meta.mode() & 0o6000 == 0,
        status: AtomicI32::new(flags),
        forks: FORKS.load(Ordering::Acquire),
        view: RwLock::new(Arc::new(View {
            mapping: p.mapping,
            entries: p.entries,
            generation: AtomicU64::new(p.generation),
            // The first refresh is never backed off.
            served: AtomicU64::new(REFRESH_PAYS_OFF),
        })),
        refreshing: Mutex::new(()),
        appends: AppendLock::default(),
        extending: AtomicBool::new(false),
        offset_busy: AtomicBool::new(false),
        dirty: AtomicBool::new(false),
        last_touch: AtomicU64::new(0),
        accessed_ns: AtomicU64::new(0),
        accessed_generation: AtomicU64::new(0),
        strict_atime: AtomicBool::new(false),
        refresh_after: AtomicU64::new(0),
        backoff: AtomicU64::new(0),
        unpaid_refreshes: AtomicU64::new(0),
        file,
    })
}

/// pread/pread64: `Some(n)` when served.
fn pread(fd: i32, buf: &mut [u8], off: i64) -> Option<usize> {
    let t = lookup(fd)?;
    let r = t.read_at(buf, u64::try_from(off).ok()?);
    if r.is_none() {
        t.settle();
        count(&STATS.real_reads, 1);
    }
    r
}

/// pwrite/pwrite64: `Some(n)` when served.
fn pwrite(fd: i32, data: &[u8], off: i64) -> Option<usize> {
    let t = lookup(fd)?;
    let r = t.write_at(data, u64::try_from(off).ok()?);
    if r.is_none() {
        t.settle();
        count(&STATS.real_writes, 1);
    }
    r
}

/// read/write at the file offset: lseek, serve, lseek. `io` serves at an offset.
fn at_offset(
    fd: i32,
    write: bool,
    io: impl FnOnce(&Tracked, u64) -> Option<usize>,
) -> Option<usize> {
    let t = lookup(fd)?;
    let served = (|| {
        if t.forks != FORKS.load(Ordering::Acquire)
            || t.offset_busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        let r = (|| {
            let cur = u64::try_from(sys::lseek(fd, 0, libc::SEEK_CUR)?).ok()?;
            let n = io(&t, cur)?;
            if n > 0 {
                sys::lseek(fd, i64::try_from(cur + n as u64).ok()?, libc::SEEK_SET)?;
            }
            Some(n)
        })();
        t.offset_busy.store(false, Ordering::Release);
        r
    })();
    if served.is_none() {
        t.settle();
        count(
            if write {
                &STATS.real_writes
            } else {
                &STATS.real_reads
            },
            1,
        );
    }
    served
}

fn read(fd: i32, buf: &mut [u8]) -> Option<usize> {
    at_offset(fd, false, |t, off| t.read_at(buf, off))
}

fn write(fd: i32, data: &[u8]) -> Option<usize> {
    at_offset(fd, true, |t, off| t.write_at(data, off))
}

/// readv/preadv: serves the buffers in turn; stops at the end of the file or at the first
/// buffer it cannot serve (a short count, or `None` when that is the first one).
fn readv_at(t: &Tracked, bufs: &mut [&mut [u8]], off: u64) -> Option<usize> {
    let mut total = 0usize;
    for b in bufs.iter_mut() {
        match t.read_at(b, off + total as u64) {
            Some(n) => {
                total += n;
                if n < b.len() {
                    break;
                }
            }
            None if total == 0 => return None,
            None => break,
        }
    }
    Some(total)
}

fn readv(fd: i32, bufs: &mut [&mut [u8]]) -> Option<usize> {
    at_offset(fd, false, |t, off| readv_at(t, bufs, off))
}

fn preadv(fd: i32, bufs: &mut [&mut [u8]], off: i64) -> Option<usize> {
    let t = lookup(fd)?;
    let r = readv_at(&t, bufs, u64::try_from(off).ok()?);
    if r.is_none() {
        t.settle();
        count(&STATS.real_reads, 1);
    }
    r
}

/// Before a call this library does not serve on `fd` (fsync, mmap, writev, ...): stamps
/// served writes so that the kernel and the daemon see them first.
fn settle(fd: i32) {
    if let Some(t) = lookup(fd) {
        t.settle();
    }
}

/// After `new` became a duplicate of `old` (dup, dup2, dup3, F_DUPFD).
fn duplicated(old: i32, new: i32) {
    if old != new {
        set(new, lookup(old));
    }
}

/// Before `fd` is closed.
fn closing(fd: i32) {
    set(fd, None);
}

/// Before fds `first..=last` are closed.
fn closing_range(first: u32, last: u32) {
    let last = (last as usize).min(MAX_FDS - 1);
    for (fd, slot) in FILES.iter().enumerate().take(last + 1).skip(first as usize) {
        if slot.try_read().is_ok_and(|g| g.is_some()) {
            set(fd as i32, None);
        }
    }
}

/// After F_SETFL set the status flags of `fd`'s description.
fn status_set(fd: i32, flags: i32) {
    if let Some(t) = lookup(fd) {
        let keep = t.status.load(Ordering::Relaxed) & libc::O_ACCMODE;
        t.status.store(keep | flags, Ordering::Relaxed);
    }
}

/// pthread_atfork's prepare handler.
fn forking() {
    FORKS.fetch_add(1, Ordering::AcqRel);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view of `entries` without a mapping (enough for every decision but a copy).
    fn view(entries: Vec<MapEntry>) -> View {
        View {
            mapping: None,
            entries,
            generation: AtomicU64::new(1),
            served: AtomicU64::new(0),
        }
    }

    fn entry(file_offset: u64, len: u64, flags: u32) -> MapEntry {
        MapEntry {
            file_offset,
            device_offset: file_offset,
            len,
            flags,
            pad: 0,
        }
    }

    #[test]
    fn holes_and_unwritten_extents_read_as_zeros() {
        let v = view(vec![entry(8192, 4096, ENTRY_UNWRITTEN)]);
        let mut buf = vec![7u8; 20000];
        v.read_into(100, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // A written extent needs the mapping: without one the read is refused.
        let v = view(vec![entry(8192, 4096, 0)]);
        assert!(v.read_into(100, &mut buf).is_none());
        assert!(v.read_into(0, &mut buf[..8192]).is_some(), "all hole");
    }

    #[test]
    fn only_written_extents_are_overwritten() {
        let v = view(vec![
            entry(0, 8192, 0),
            entry(8192, 4096, 0),
            // a hole at 12288..16384
            entry(16384, 4096, ENTRY_UNWRITTEN),
            entry(20480, 4096, 0),
        ]);
        assert!(v.covers_written(0, 1));
        assert!(v.covers_written(100, 12188), "two adjacent written extents");
        assert!(!v.covers_written(100, 12189), "runs into the hole");
        assert!(!v.covers_written(12288, 1), "inside the hole");
        assert!(!v.covers_written(16384, 10), "unwritten");
        assert!(v.covers_written(20480, 4096));
        assert!(!v.covers_written(20480, 4097), "past the last extent");
        assert!(!v.covers_written(1 << 40, 1));
    }

    #[test]
    fn only_appends_are_allocated_ahead() {
        const M: u64 = 1 << 20;
        let laid_out = view(vec![
            entry(0, 4 * M, 0),
            entry(4 * M, 96 * M, ENTRY_UNWRITTEN),
        ]);
        assert_eq!(
            laid_out.allocation_window(5 * M, 5 * M + 4096, 100 * M),
            None,
            "preallocated space inside the file: the kernel's"
        );
        let sparse = view(vec![entry(0, 4 * M, 0)]);
        assert_eq!(
            sparse.allocation_window(10 * M + 5, 10 * M + 4096, 100 * M),
            None,
            "a hole inside the file: the kernel's"
        );
        assert_eq!(
            sparse.allocation_window(3 * M + 1, 3 * M + 101, 3 * M + 1),
            Some((3 * M + 1, 8 * M)),
            "an append: from its first byte, ahead by the file's size, to a chunk boundary"
        );
        assert_eq!(
            sparse.allocation_window(3 * M - 10, 3 * M + 10, 3 * M),
            Some((3 * M - 10, 6 * M)),
            "an append that starts inside the file"
        );
        assert_eq!(
            sparse.allocation_window(4 * M - 1, 4 * M, 3 * M),
            Some((4 * M - 1, 8 * M)),
            "a gap inside the chunk holding the end of file"
        );
        assert_eq!(
            sparse.allocation_window(4 * M + 1, 4 * M + 2, 3 * M),
            None,
            "a gap past it: a sparse file, the kernel's"
        );
        let large = view(vec![entry(0, 200 * M, 0)]);
        assert_eq!(
            large.allocation_window(200 * M, 200 * M + 1, 200 * M),
            Some((200 * M, 264 * M)),
            "a large file: 64 MiB ahead"
        );
        assert_eq!(
            large.allocation_window(200 * M, 270 * M, 200 * M),
            None,
            "more than one allocation can make"
        );
        let kept = view(vec![
            entry(0, 4 * M, 0),
            entry(4 * M, 16 * M, ENTRY_UNWRITTEN),
        ]);
        assert_eq!(
            kept.allocation_window(3 * M, 3 * M + 10, 3 * M),
            None,
            "space preallocated past the end (KEEP_SIZE) is the program's: no trimming it"
        );
    }

    #[test]
    fn device_pieces_name_the_blocks_of_a_written_range() {
        let at = |file_offset, device_offset, len| MapEntry {
            file_offset,
            device_offset,
            len,
            flags: 0,
            pad: 0,
        };
        let v = view(vec![at(0, 1 << 20, 8192), at(8192, 4 << 20, 4096)]);
        assert_eq!(
            v.device_pieces(100, 8200),
            Some(vec![((1 << 20) + 100, 8092), (4 << 20, 8)])
        );
        assert_eq!(v.device_pieces(8192, 12288), Some(vec![(4 << 20, 4096)]));
        assert_eq!(v.device_pieces(8192, 12289), None, "past the last extent");
        assert_eq!(v.device_pieces(5, 5), None, "empty");
    }
}
