//! The mapped device: a regular file, a `/dev/pmemN` block device or a `/dev/daxN.M`
//! character device, mapped `MAP_SHARED` at a 2 MiB-aligned address (at a 1 GiB-aligned one
//! for an image on a hugetlbfs mount with 1 GiB pages, see below).
//!
//! Most of the crate's `unsafe` lives in this file (the rest is the client side of direct
//! mapping, `dax.rs`). Every access to the mapping goes through raw pointers after a bounds
//! check ([`check_range`] / [`check_word`]), and no reference (`&[u8]`, `&mut [u8]`) into the
//! mapping is ever made, because other processes may map and store into the same bytes: bytes
//! go in and out by `ptr::copy` (memmove), by non-temporal stores from a buffer checked not to
//! overlap the mapping, or by 8-byte atomics.
//!
//! **What a concurrent store can do to us.** Another process storing into bytes we copy is
//! outside the Rust abstract machine, as with any `MAP_SHARED` memory: the copy is made from a
//! raw pointer the compiler knows nothing about, so it cannot assume the bytes stay put, and
//! the result can only be a torn snapshot (every bit pattern is a valid `u8`), exactly as
//! `read(2)` racing a `write(2)`. Inside the daemon, two threads copy the same bytes at once
//! only if two files share a block, which a consistent image never has (fsck checks it; mount
//! does not): the bytes may tear then too, and nothing else depends on them.
//!
//! **Opening.** A device is opened exclusively: `O_EXCL` for block devices (the kernel then
//! refuses a second exclusive opener and a mounted device), a non-blocking `flock(LOCK_EX)`
//! for image files and device-DAX nodes. The lock is exclusive for read-only opens too, so
//! `fsck -n` refuses a device that a daemon has open (and two read-only opens exclude each
//! other as well: a shared lock for read-only opens would let `fsck -n` run under a mounted
//! file system, whose metadata changes under its feet). The lock lives as long as the file
//! descriptor, which the [`Device`] keeps until it is dropped.
//!
//! **Persistence.** The mapping is tried with `MAP_SHARED_VALIDATE | MAP_SYNC` first (granted
//! on device-DAX and on files of a DAX file system), then plain `MAP_SHARED`. The mode follows:
//! - CPU flush ([`PersistenceMode::Clwb`], `ClflushOpt` or `Clflush`, whichever the CPU has)
//!   when `MAP_SYNC` was granted, for device-DAX, and for files on memory-backed file systems
//!   (tmpfs, hugetlbfs: `/dev/shm`), where the page cache *is* the memory and the CPU-flush
//!   path of real pmem can be exercised as is. `flush` write-backs cache lines, `fence` is an
//!   SFENCE, `write_nt`/`zero_nt` use non-temporal stores.
//! - msync ([`PersistenceMode::Msync`]) for files on disk-backed file systems and for
//!   `/dev/pmemN` without DAX, whose mappings go through the page cache. There is no cheap
//!   "start write-back" in this mode, so `flush` itself does the whole work: an
//!   `msync(MS_SYNC)` of the page-aligned range, which returns once the pages are on the
//!   media. `fence` is then only a compiler fence (everything flushed is already durable).
//!   Callers that flush many small ranges pay one system call per flush; that is the price
//!   of running on a disk, not on pmem.
//!
//! **hugetlbfs images.** An image in a hugetlbfs mount is memory backed by huge pages (2 MiB
//! or 1 GiB, the mount's `pagesize=`; `statfs.f_bsize` tells which), so the CPU-flush mode
//! applies as on tmpfs, and `sync_all` does no msync (hugetlbfs has no write-back: its fsync
//! is a no-op). The kernel refuses everything that is not whole huge pages, so the device
//! layer keeps to them: the image size must be a multiple of the page size (checked at open
//! and by [`create_image`], which says what size to use), the mapping starts at an address
//! aligned to the page size, and the image's pages are allocated by `fallocate`, which
//! fails when too few huge pages are reserved (the error says how to reserve them).
//! hugetlbfs has no `write(2)`: nothing here writes through the file, only through the
//! mapping.

use super::{
    CACHE_LINE, DeviceError, Media, PersistenceMode, RESERVE_CHUNK, check_range, check_word,
    chunks_inside, chunks_touching,
};
use std::ffi::c_void;
use std::fmt;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU64, Ordering, compiler_fence};
use std::time::{Duration, Instant};

/// Granularity of sizes and of msync ranges.
const PAGE: u64 = 4096;
/// Alignment of the mapping (a PMD entry on x86-64).
const HUGE_ALIGN: usize = 2 << 20;
/// Interval between two attempts while waiting for a busy device.
const BUSY_RETRY: Duration = Duration::from_millis(20);
/// `statfs.f_type` of tmpfs (`/dev/shm`).
const TMPFS_MAGIC: u64 = 0x0102_1994;
/// `statfs.f_type` of hugetlbfs.
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;
/// Where the kernel counts huge pages of each size (`hugepages-<kB>kB/nr_hugepages`).
const HUGEPAGES_SYSFS: &str = "/sys/kernel/mm/hugepages";
/// `ioctl` returning the size of a block device in bytes (`_IOR(0x12, 114, size_t)`).
const BLKGETSIZE64: libc::Ioctl = libc::_IOR::<u64>(0x12, 114);

const NOT_A_DEVICE: &str = "not a regular file, block device or DAX device";

/// How to open a device.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Map read-only (fsck -n, `-o ro`); every store returns `DeviceError::ReadOnly`.
    pub read_only: bool,
    /// Wait up to this long for another opener's exclusive lock before failing with
    /// `DeviceError::Busy` (a remount racing the old daemon's exit).
    pub wait_busy: Option<Duration>,
}

/// What a [`Device`] was opened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// An image file (on tmpfs, on a DAX file system, or on an ordinary disk).
    RegularFile,
    /// A block device such as `/dev/pmemN`.
    BlockDevice,
    /// A device-DAX character device such as `/dev/dax0.0`.
    DaxDevice,
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RegularFile => "regular file",
            Self::BlockDevice => "block device",
            Self::DaxDevice => "DAX device",
        })
    }
}

/// A device mapped into memory.
#[derive(Debug)]
pub struct Device {
    /// Start of the mapping (2 MiB-aligned when the reservation trick worked, which it
    /// always does on Linux; see [`Device::mapping_is_huge_aligned`]).
    base: NonNull<u8>,
    /// Length of the device and of the mapping; fits in `usize` (checked at open).
    size: u64,
    /// Keeps the exclusive lock (flock or O_EXCL) until the device is dropped; `reserve`
    /// and `discard` allocate and punch through it.
    file: File,
    path: PathBuf,
    kind: DeviceKind,
    read_only: bool,
    map_sync: bool,
    mode: PersistenceMode,
    /// The image file had holes when opened (`st_blocks * 512 < size`).
    sparse: bool,
    /// For a sparse image opened read-write: what is known of its backing store.
    backing: Option<SparseBacking>,
    /// Page size of the hugetlbfs mount holding the image, if it is in one.
    hugetlb_page: Option<u64>,
}

/// What is known about the backing store of a sparse image, one bit per [`RESERVE_CHUNK`]
/// of the file (the last chunk may be short). A chunk whose `backed` bit is set was
/// allocated by `reserve` since the open (stores into it cannot fault for want of space); a
/// chunk whose `punched` bit is set was punched by `discard` since the open (nothing to
/// give back). Both clear: unknown (the state of every chunk at open). Both set: never.
///
/// Reserving and discarding one chunk at the same time is excluded by the callers: the
/// allocator reserves only chunks it handed out and discards only chunks it holds free.
#[derive(Debug)]
struct SparseBacking {
    backed: Box<[AtomicU64]>,
    punched: Box<[AtomicU64]>,
    /// The log has said once that the backing store is full.
    said_full: std::sync::atomic::AtomicBool,
}

impl SparseBacking {
    fn new(chunks: u64) -> Self {
        let words = || {
            (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect()
        };
        Self {
            backed: words(),
            punched: words(),
            said_full: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn test(bits: &[AtomicU64], c: u64) -> bool {
        bits.get((c / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (c % 64)) != 0)
    }

    fn set(bits: &[AtomicU64], c: u64, on: bool) {
        if let Some(w) = bits.get((c / 64) as usize) {
            if on {
                w.fetch_or(1 << (c % 64), Ordering::AcqRel);
            } else {
                w.fetch_and(!(1 << (c % 64)), Ordering::AcqRel);
            }
        }
    }

    fn is_backed(&self, c: u64) -> bool {
        Self::test(&self.backed, c)
    }

    fn is_punched(&self, c: u64) -> bool {
        Self::test(&self.punched, c)
    }

    fn mark_backed(&self, chunks: std::ops::Range<u64>) {
        for c in chunks {
            Self::set(&self.punched, c, false);
            Self::set(&self.backed, c, true);
        }
    }

    /// Forgets that `chunks` are backed; called before they are punched, so a punch that
    /// fails half-way leaves them unknown (reserved again on reuse), never falsely backed.
    fn forget(&self, chunks: std::ops::Range<u64>) {
        for c in chunks {
            Self::set(&self.backed, c, false);
        }
    }

    fn mark_punched(&self, chunks: std::ops::Range<u64>) {
        for c in chunks {
            Self::set(&self.punched, c, true);
        }
    }
}

// SAFETY: `Device` owns its mapping (unmapped only in `Drop`) and every access through
// `base` is a bounds-checked copy, atomic or cache-line flush that is sound from any thread;
// the raw pointer is what makes the type `!Send` by default, not any thread affinity.
unsafe impl Send for Device {}
// SAFETY: every method of `&Device` touches the mapping only through raw pointers, after a
// bounds check: `ptr::copy` into and out of it, non-temporal stores from buffers that do not
// overlap it, 8-byte atomics on aligned words, flushes and fences. None of them creates a
// reference into the mapping or keeps a pointer past the call, so no `&Device` method asserts
// anything about bytes another thread (or process) may be storing into; what such a store
// does to a concurrent copy is described in the module docs (a torn snapshot). The atomic
// words are the exception that needs callers' help: see `word` and the `Media` docs.
unsafe impl Sync for Device {}

fn io_error(path: &Path, source: io::Error) -> DeviceError {
    DeviceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn unsupported(path: &Path, reason: impl Into<String>) -> DeviceError {
    DeviceError::Unsupported {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Device {
    /// Opens and maps `path` exclusively (see the module docs). With `opts.wait_busy`, a
    /// device held by another opener is retried every 20 ms until the time is up.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self, DeviceError> {
        let deadline = opts.wait_busy.map(|d| Instant::now() + d);
        loop {
            match Self::try_open(path, opts) {
                Err(DeviceError::Busy(p)) => {
                    let now = Instant::now();
                    match deadline {
                        Some(deadline) if now < deadline => {
                            std::thread::sleep(BUSY_RETRY.min(deadline - now));
                        }
                        _ => return Err(DeviceError::Busy(p)),
                    }
                }
                other => return other,
            }
        }
    }

    fn try_open(path: &Path, opts: &OpenOptions) -> Result<Self, DeviceError> {
        // Look before opening: opening a FIFO would block, a directory cannot be mapped.
        let meta = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
        let kind = classify(path, &meta)?;
        let mut oo = std::fs::OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if kind == DeviceKind::BlockDevice {
            oo.custom_flags(libc::O_EXCL);
        }
        let file = match oo.open(path) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(DeviceError::Busy(path.to_path_buf()));
            }
            Err(e) => return Err(io_error(path, e)),
        };
        let fmeta = file.metadata().map_err(|e| io_error(path, e))?;
        if fmeta.dev() != meta.dev() || fmeta.ino() != meta.ino() {
            return Err(unsupported(path, "replaced while being opened"));
        }
        if kind != DeviceKind::BlockDevice {
            lock_exclusive(path, &file)?;
        }
        let size = match kind {
            DeviceKind::RegularFile => fmeta.len(),
            DeviceKind::BlockDevice => block_device_size(path, &file)?,
            DeviceKind::DaxDevice => dax_size(path, fmeta.rdev())?,
        };
        if size == 0 {
            return Err(unsupported(
                path,
                format!("the {kind} is empty (size 0): nothing to map"),
            ));
        }
        if size % PAGE != 0 {
            return Err(unsupported(
                path,
                format!("size {size} bytes is not a multiple of {PAGE}"),
            ));
        }
        let hugetlb_page = match kind {
            DeviceKind::RegularFile => hugetlb_page_size(&file),
            _ => None,
        };
        if let Some(page) = hugetlb_page {
            check_hugetlb_size(path, size, page)?;
        }
        // Device-DAX refuses mappings that are not aligned to its own alignment (2 MiB by
        // default, 1 GiB on some namespaces), hugetlbfs those not aligned to its page size;
        // everything else gets 2 MiB.
        let align = match (kind, hugetlb_page) {
            (DeviceKind::DaxDevice, _) => dax_align(fmeta.rdev()),
            (_, Some(page)) => huge_align_for(page),
            _ => HUGE_ALIGN,
        };
        let len = usize::try_from(size)
            .ok()
            .filter(|l| l.checked_add(align).is_some())
            .ok_or_else(|| unsupported(path, format!("size {size} bytes is too large to map")))?;
        let (base, map_sync) = map(&file, len, align, opts.read_only).map_err(|e| {
            match hugetlb_page {
                // A MAP_SHARED mapping of hugetlbfs pages not yet allocated (an image made
                // with truncate, not fallocate) reserves them, and fails when too few are.
                Some(page) if e.raw_os_error() == Some(libc::ENOMEM) => {
                    HugetlbBudget::now(&file, page).shortage(path, size / page)
                }
                _ => io_error(path, e),
            }
        })?;
        let memory_backed = kind == DeviceKind::RegularFile && is_memory_backed(&file);
        let mode = match cpu_flush_mode() {
            Some(m) if map_sync || kind == DeviceKind::DaxDevice || memory_backed => m,
            _ => PersistenceMode::Msync,
        };
        // st_blocks counts 512-byte units whatever the file system's block size. An image
        // made sparse stays sparse once full (every block allocated): `mkfs --sparse` marks it.
        let sparse = kind == DeviceKind::RegularFile
            && (fmeta.blocks().saturating_mul(512) < size || marked_sparse(&file));
        let backing =
            (sparse && !opts.read_only).then(|| SparseBacking::new(size.div_ceil(RESERVE_CHUNK)));
        Ok(Self {
            base,
            size,
            file,
            path: path.to_path_buf(),
            kind,
            read_only: opts.read_only,
            map_sync,
            mode,
            sparse,
            backing,
            hugetlb_page,
        })
    }

    /// Whether the device is an image file that had holes when it was opened (made with
    /// `mkfs.pmfs --sparse`, or copied sparse): its stores need space that the file system
    /// holding it may not have, so everything that hands out space reserves it first
    /// ([`Media::reserve`]).
    pub fn is_sparse(&self) -> bool {
        self.sparse
    }

    /// `fallocate(mode)` of `offset..offset + len` of the image file, retried on EINTR.
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> Result<(), DeviceError> {
        // Both fit: `offset + len <= size`, and `size` was checked to fit `usize` and an
        // off_t (a file's length) at open.
        let (off, n) = (offset as libc::off_t, len as libc::off_t);
        loop {
            // SAFETY: fallocate only reads the descriptor number, which `self.file` keeps
            // open; it changes the file's allocation, never memory of ours.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOSPC) => return Err(DeviceError::NoSpace(self.path.clone())),
                _ => return Err(self.io(e)),
            }
        }
    }

    /// True when the file system holding the image says `offset..offset + len` has no hole
    /// (SEEK_HOLE), so reserving it would allocate nothing: a mount of an image with
    /// gigabytes in use then skips a fallocate that walks every page of them (2-3 s for
    /// 3 GiB on tmpfs; the seek takes a few tens of ms). Trusted only when the file system
    /// reports a hole past the range: one that reports none (the generic answer of a file
    /// system without hole support is "data up to the end") gets the fallocate, as before.
    fn allocated_already(&self, offset: u64, len: u64) -> bool {
        let (Ok(off), Ok(end)) = (i64::try_from(offset), i64::try_from(offset + len)) else {
            return false;
        };
        let size = i64::try_from(self.size).unwrap_or(i64::MAX);
        nix::unistd::lseek(&self.file, off, nix::unistd::Whence::SeekHole)
            .is_ok_and(|hole| hole >= end && hole < size)
    }

    /// The byte range of `chunks`, clamped to the device.
    fn chunk_bytes(&self, chunks: &std::ops::Range<u64>) -> (u64, u64) {
        let start = chunks.start * RESERVE_CHUNK;
        let end = (chunks.end * RESERVE_CHUNK).min(self.size);
        (start, end - start)
    }

    /// Maximal runs of consecutive chunks of `chunks` for which `pick` holds.
    fn runs(
        chunks: std::ops::Range<u64>,
        pick: impl Fn(u64) -> bool,
    ) -> impl Iterator<Item = std::ops::Range<u64>> {
        let end = chunks.end;
        let mut c = chunks.start;
        std::iter::from_fn(move || {
            while c < end && !pick(c) {
                c += 1;
            }
            let start = c;
            while c < end && pick(c) {
                c += 1;
            }
            (start < c).then_some(start..c)
        })
    }

    /// The page size of the hugetlbfs mount holding the image (2 MiB or 1 GiB), or `None`
    /// when the device is not a file on hugetlbfs.
    pub fn hugetlb_page_size(&self) -> Option<u64> {
        self.hugetlb_page
    }

    /// The path the device was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the kernel granted `MAP_SYNC` (true direct access: no page cache between
    /// the mapping and the media, so CPU flushes suffice).
    pub fn map_sync(&self) -> bool {
        self.map_sync
    }

    /// What the device is.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// Whether the device was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the mapping starts on a 2 MiB boundary (so that huge-page mappings of
    /// 2 MiB-aligned extents are possible).
    pub fn mapping_is_huge_aligned(&self) -> bool {
        self.base.as_ptr() as usize % HUGE_ALIGN == 0
    }

    /// Address of byte `offset` of the mapping; callers check `offset <= size` first.
    fn at(&self, offset: u64) -> *mut u8 {
        self.base.as_ptr().wrapping_add(offset as usize)
    }

    fn writable(&self) -> Result<(), DeviceError> {
        if self.read_only {
            Err(DeviceError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn io(&self, e: io::Error) -> DeviceError {
        io_error(&self.path, e)
    }

    /// The range of whole lines (`unit` = cache line or page) that cover `offset..offset +
    /// len`, at least the unit containing `offset` (as the recording device models a flush
    /// of length 0), clamped to the device. Callers check the range first.
    fn covering(&self, offset: u64, len: u64, unit: u64) -> (u64, u64) {
        let start = offset / unit * unit;
        let end = offset.saturating_add(len.max(1));
        let end = end.div_ceil(unit).saturating_mul(unit).min(self.size);
        (start, end)
    }

    /// Writes back every cache line of `offset..offset + len` (CPU-flush modes).
    fn flush_lines(&self, offset: u64, len: u64) {
        let (start, end) = self.covering(offset, len, CACHE_LINE);
        let mut line = start;
        while line < end {
            // SAFETY: `line < end <= size`, so the line lies inside the live mapping, and the
            // mode is a CPU-flush mode detected on this CPU.
            unsafe { arch::flush_line(self.mode, self.at(line)) };
            line += CACHE_LINE;
        }
    }

    /// `msync(MS_SYNC)` of the pages covering `offset..offset + len`.
    fn msync(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let (start, end) = self.covering(offset, len, PAGE);
        if start >= end {
            return Ok(());
        }
        // SAFETY: `start` is page-aligned and `start..end` lies inside our mapping (end is
        // clamped to the size); msync does not touch memory contents on our side.
        let r = unsafe {
            libc::msync(
                self.at(start).cast::<c_void>(),
                (end - start) as usize,
                libc::MS_SYNC,
            )
        };
        if r != 0 {
            return Err(self.io(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Makes a range written with ordinary stores durable after the next fence.
    fn persist_range(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        if self.mode == PersistenceMode::Msync {
            self.msync(offset, len)
        } else {
            self.flush_lines(offset, len);
            Ok(())
        }
    }

    /// Copies `data` to `offset` with ordinary stores. The range must be checked.
    fn copy_in(&self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        // SAFETY: the caller checked `offset..offset + data.len()` against the size, so the
        // destination lies inside our live, writable mapping, and `data` is valid for reads
        // of its length. `ptr::copy` is a memmove: it is correct even if `data` overlapped
        // the destination (no reference into the mapping is ever handed out, so a caller
        // cannot make it, but the copy does not depend on that).
        unsafe { ptr::copy(data.as_ptr(), self.at(offset), data.len()) };
    }

    /// Zeroes `len` bytes at `offset` with ordinary stores. The range must be checked.
    fn zero_in(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        // SAFETY: the caller checked `offset..offset + len` against the size, so the range
        // lies inside our live, writable mapping.
        unsafe { ptr::write_bytes(self.at(offset), 0, len as usize) };
    }

    /// Shared body of `write_nt` (`data` is `Some`) and `zero_nt` (`data` is `None`).
    fn store_nt(&self, offset: u64, data: Option<&[u8]>, len: u64) -> Result<(), DeviceError> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let plain = |off: u64, n: u64| {
            let rel = (off - offset) as usize;
            match data {
                Some(d) => self.copy_in(off, &d[rel..rel + n as usize]),
                None => self.zero_in(off, n),
            }
        };
        if self.mode == PersistenceMode::Msync {
            plain(offset, len);
            return self.msync(offset, len);
        }
        // Unaligned head and tail: ordinary stores plus a flush; the 16-byte-aligned middle:
        // non-temporal stores, which bypass the cache and need only the next fence.
        let (head, body, tail) = nt_split(self.at(offset) as usize, len);
        if head > 0 {
            plain(offset, head);
            self.flush_lines(offset, head);
        }
        if body > 0 {
            let dst = self.at(offset + head);
            match data {
                Some(d) if self.overlaps_mapping(d) => {
                    // The non-temporal copy runs forwards and needs disjoint ranges; a
                    // source inside the mapping (impossible through safe code, since no
                    // reference into it is handed out) gets a memmove and a flush instead.
                    let off = offset + head;
                    plain(off, body);
                    self.flush_lines(off, body);
                }
                Some(d) => {
                    let src = &d[head as usize..(head + body) as usize];
                    // SAFETY: `dst..dst + body` lies inside the mapping (range checked
                    // above), is 16-byte aligned by the choice of `head`, `body` is a
                    // multiple of 16, `src` is a slice of exactly `body` bytes, and `d`
                    // (hence `src`) does not overlap the mapping (checked by the arm above).
                    unsafe { arch::stream_copy(dst, src.as_ptr(), body as usize) };
                }
                // SAFETY: as above, `dst..dst + body` is inside the mapping, 16-aligned and a
                // multiple of 16 bytes long.
                None => unsafe { arch::stream_zero(dst, body as usize) },
            }
        }
        if tail > 0 {
            let off = offset + head + body;
            plain(off, tail);
            self.flush_lines(off, tail);
        }
        Ok(())
    }

    /// Whether `data` shares any byte with the mapping.
    fn overlaps_mapping(&self, data: &[u8]) -> bool {
        let start = data.as_ptr() as usize;
        let end = start + data.len();
        let base = self.base.as_ptr() as usize;
        start < base + self.size as usize && base < end
    }

    /// The 8-byte word at `offset` as an atomic, used for one operation and then dropped.
    fn word(&self, offset: u64) -> Result<&AtomicU64, DeviceError> {
        check_word(offset, self.size)?;
        // SAFETY: `offset` is 8-aligned and `offset + 8 <= size` (check_word) and the mapping
        // is page-aligned, so the pointer is valid and aligned for a u64 while `self` lives.
        // `from_ptr` also requires that no non-atomic access to the word races this atomic
        // one. That is not something this type can see: it holds because the crate uses the
        // atomic methods only on block-bitmap words and journal slot generations, and copies
        // those regions with `read`/`write` only while no transaction runs (mkfs, fsck, the
        // allocator's load and recovery at mount; the `Media` docs state the rule), while
        // file data, the only bytes other processes map, lies in the data area, which
        // validated extents never leave. A crafted image cannot move either region: their
        // places come from the validated geometry.
        Ok(unsafe { AtomicU64::from_ptr(self.at(offset).cast::<u64>()) })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: `base..base + size` is the mapping created in `open` and owned by this
        // value; `&mut self` means no method is running, and no reference or pointer into
        // the mapping is ever handed out, so nothing can use it afterwards.
        let r = unsafe { libc::munmap(self.base.as_ptr().cast::<c_void>(), self.size as usize) };
        if r != 0 {
            log::warn!(
                "{}: munmap failed: {}",
                self.path.display(),
                io::Error::last_os_error()
            );
        }
        // The file descriptor, and with it the flock or O_EXCL claim, is closed next.
    }
}

impl Media for Device {
    fn size(&self) -> u64 {
        self.size
    }

    fn persistence(&self) -> PersistenceMode {
        self.mode
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        check_range(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        // SAFETY: `offset..offset + buf.len()` lies inside the live mapping (checked above)
        // and `buf` is valid for writes of its length. The copy is a memmove (`ptr::copy`),
        // correct even if `buf` overlapped the source. Bytes that other processes (or, on a
        // cross-linked image, other threads) store meanwhile can only make the copy a torn
        // snapshot (see the module docs); the copy is from a raw pointer, so the compiler
        // assumes nothing about those bytes.
        unsafe { ptr::copy(self.at(offset), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.writable()?;
        check_range(offset, data.len() as u64, self.size)?;
        self.copy_in(offset, data);
        Ok(())
    }

    fn write_nt(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.store_nt(offset, Some(data), data.len() as u64)
    }

    fn zero_nt(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.store_nt(offset, None, len)
    }

    fn flush(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(offset, len, self.size)?;
        if self.read_only {
            return Ok(());
        }
        self.persist_range(offset, len)
    }

    fn fence(&self) {
        if self.mode == PersistenceMode::Msync {
            // Every flush was a synchronous msync: nothing is left in flight.
            compiler_fence(Ordering::SeqCst);
        } else {
            arch::sfence();
        }
    }

    fn load_u64(&self, offset: u64) -> Result<u64, DeviceError> {
        Ok(self.word(offset)?.load(Ordering::SeqCst))
    }

    fn store_u64(&self, offset: u64, value: u64) -> Result<(), DeviceError> {
        self.writable()?;
        self.word(offset)?.store(value, Ordering::SeqCst);
        Ok(())
    }

    fn fetch_or_u64(&self, offset: u64, mask: u64) -> Result<u64, DeviceError> {
        self.writable()?;
        Ok(self.word(offset)?.fetch_or(mask, Ordering::SeqCst))
    }

    fn fetch_and_u64(&self, offset: u64, mask: u64) -> Result<u64, DeviceError> {
        self.writable()?;
        Ok(self.word(offset)?.fetch_and(mask, Ordering::SeqCst))
    }

    fn sync_all(&self) -> Result<(), DeviceError> {
        if self.read_only {
            return Ok(());
        }
        // Device-DAX has no page cache and no fsync (msync answers EINVAL), and hugetlbfs
        // has no write-back (its fsync does nothing): their stores are durable, as far as
        // they can be, once flushed and fenced.
        if self.kind != DeviceKind::DaxDevice && self.hugetlb_page.is_none() {
            self.msync(0, self.size)?;
        }
        self.fence();
        Ok(())
    }

    fn reserve(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(offset, len, self.size)?;
        let Some(backing) = &self.backing else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        // Mode 0 allocates the holes of the range and leaves allocated blocks (and their
        // bytes) alone; the file already has its size, so nothing else changes. Two threads
        // reserving one chunk at once both allocate it: harmless, it is idempotent.
        for run in Self::runs(chunks_touching(offset, len), |c| !backing.is_backed(c)) {
            let (start, n) = self.chunk_bytes(&run);
            if self.allocated_already(start, n) {
                backing.mark_backed(run);
                continue;
            }
            if let Err(e) = self.fallocate(0, start, n) {
                if matches!(e, DeviceError::NoSpace(_))
                    && !backing.said_full.swap(true, Ordering::Relaxed)
                {
                    log::warn!(
                        "{}: the file system holding this sparse image is full: writes that \
                         need new space fail with ENOSPC although pmfs has free blocks",
                        self.path.display()
                    );
                }
                return Err(e);
            }
            backing.mark_backed(run);
        }
        Ok(())
    }

    fn can_discard(&self) -> bool {
        self.backing.is_some()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<u64, DeviceError> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        let Some(backing) = &self.backing else {
            return Err(DeviceError::NoDiscard);
        };
        let chunks = chunks_inside(offset, len, self.size);
        // Chunks punched since the open are holes already: no system call for them.
        for run in Self::runs(chunks.clone(), |c| !backing.is_punched(c)) {
            let (start, n) = self.chunk_bytes(&run);
            backing.forget(run.clone());
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start,
                n,
            )?;
            backing.mark_punched(run);
        }
        Ok(if chunks.is_empty() {
            0
        } else {
            self.chunk_bytes(&chunks).1
        })
    }
}

/// The kind of device `meta` describes, or why it cannot be used.
fn classify(path: &Path, meta: &std::fs::Metadata) -> Result<DeviceKind, DeviceError> {
    let ft = meta.file_type();
    if ft.is_file() {
        Ok(DeviceKind::RegularFile)
    } else if ft.is_block_device() {
        Ok(DeviceKind::BlockDevice)
    } else if ft.is_char_device() {
        // Only device-DAX character devices can be mapped as pmem; check with sysfs here
        // rather than after opening an arbitrary device node.
        dax_size(path, meta.rdev()).map(|_| DeviceKind::DaxDevice)
    } else if ft.is_dir() {
        Err(unsupported(path, format!("is a directory: {NOT_A_DEVICE}")))
    } else {
        Err(unsupported(path, NOT_A_DEVICE))
    }
}

/// Size of a device-DAX character device, from `/sys/dev/char/MAJ:MIN/size`.
pub(super) fn dax_size(path: &Path, rdev: u64) -> Result<u64, DeviceError> {
    let sys = PathBuf::from(format!(
        "/sys/dev/char/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ));
    let not_dax = || {
        unsupported(
            path,
            format!("character device but not DAX: {NOT_A_DEVICE}"),
        )
    };
    if let Ok(subsystem) = std::fs::read_link(sys.join("subsystem")) {
        if subsystem.file_name().is_some_and(|n| n != "dax") {
            return Err(not_dax());
        }
    }
    let text = std::fs::read_to_string(sys.join("size")).map_err(|_| not_dax())?;
    text.trim().parse::<u64>().map_err(|_| {
        unsupported(
            path,
            format!("unreadable DAX device size {:?} in sysfs", text.trim()),
        )
    })
}

/// Mapping alignment a device-DAX device demands (`/sys/dev/char/MAJ:MIN/align`), at least
/// 2 MiB; 2 MiB where sysfs does not say.
fn dax_align(rdev: u64) -> usize {
    let file = format!(
        "/sys/dev/char/{}:{}/align",
        libc::major(rdev),
        libc::minor(rdev)
    );
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| t.trim().parse::<usize>().ok())
        .filter(|a| a.is_power_of_two())
        .map_or(HUGE_ALIGN, |a| a.max(HUGE_ALIGN))
}

/// Size of a block device (`BLKGETSIZE64`).
pub(super) fn block_device_size(path: &Path, file: &File) -> Result<u64, DeviceError> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r != 0 {
        return Err(io_error(path, io::Error::last_os_error()));
    }
    Ok(size)
}

/// Takes the non-blocking exclusive flock that marks a device as in use.
fn lock_exclusive(path: &Path, file: &File) -> Result<(), DeviceError> {
    loop {
        // SAFETY: flock only reads the descriptor number, which `file` keeps open.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Err(DeviceError::Busy(path.to_path_buf())),
            _ => return Err(io_error(path, e)),
        }
    }
}

/// `statfs` of the file system holding `file`, if fstatfs works.
fn fs_stat(file: &File) -> Option<libc::statfs> {
    let mut st = MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs fills the statfs buffer it is given, which is a live local of the
    // right type.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: fstatfs succeeded, so it initialised the buffer (which was zeroed anyway, and
    // all-zero bytes are a valid `statfs`).
    Some(unsafe { st.assume_init() })
}

/// `statfs.f_type` of the file system holding `file`, if fstatfs works.
fn fs_magic(file: &File) -> Option<u64> {
    // `f_type` is signed on some targets; the magic numbers are 32-bit.
    #[allow(clippy::unnecessary_cast)]
    fs_stat(file).map(|st| st.f_type as u64 & 0xffff_ffff)
}

/// The page size of the hugetlbfs mount holding `file` (its `statfs.f_bsize`: 2 MiB or
/// 1 GiB on x86-64), or `None` when `file` is not on hugetlbfs.
pub(super) fn hugetlb_page_size(file: &File) -> Option<u64> {
    let st = fs_stat(file)?;
    #[allow(clippy::unnecessary_cast)]
    let (magic, page) = (st.f_type as u64 & 0xffff_ffff, st.f_bsize as u64);
    // The kernel reports the huge page size; anything else would not be hugetlbfs.
    (magic == HUGETLBFS_MAGIC && page.is_power_of_two() && page >= PAGE).then_some(page)
}

/// The mapping alignment for hugetlbfs pages of `page` bytes: the page itself (the kernel
/// refuses a `MAP_FIXED` address that is not page-aligned), at least 2 MiB.
pub(super) fn huge_align_for(page: u64) -> usize {
    usize::try_from(page).map_or(HUGE_ALIGN, |p| p.max(HUGE_ALIGN))
}

/// `bytes` for people: "1 GiB", "64 MiB", else a byte count.
pub(super) fn size_text(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if bytes >= GIB && bytes % GIB == 0 {
        format!("{} GiB", bytes / GIB)
    } else if bytes >= MIB && bytes % MIB == 0 {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// `bytes` as a `mkfs.pmfs --size` argument ("2G", "64M"); `bytes` is a multiple of 2 MiB.
fn size_arg(bytes: u64) -> String {
    if bytes % (1 << 30) == 0 {
        format!("{}G", bytes >> 30)
    } else {
        format!("{}M", bytes >> 20)
    }
}

/// Refuses an image size that is not whole hugetlbfs pages of `page` bytes (the kernel maps
/// and allocates only whole pages), naming the sizes that would do.
fn check_hugetlb_size(path: &Path, size: u64, page: u64) -> Result<(), DeviceError> {
    if size % page == 0 {
        return Ok(());
    }
    let up = size.div_ceil(page).saturating_mul(page);
    let down = size / page * page;
    let choice = if down == 0 {
        format!("--size {}", size_arg(up))
    } else {
        format!("--size {} or {}", size_arg(down), size_arg(up))
    };
    Err(unsupported(
        path,
        format!(
            "image size {} is not a multiple of the hugetlbfs page size {}: hugetlbfs holds \
             whole pages only; use {choice}",
            size_text(size),
            size_text(page)
        ),
    ))
}

/// The huge pages a hugetlbfs image can still get, counted before an allocation is tried
/// (a failed `fallocate` keeps the pages it got until the file goes, so counting afterwards
/// would blame the image for itself).
#[derive(Debug)]
struct HugetlbBudget {
    page: u64,
    /// `hugepages-<kB>kB` in sysfs: where the pages of this size are reserved.
    sysfs_dir: String,
    /// The mount's `size=` limit in pages and how many of them are free (statfs counts
    /// them only when the mount has a limit).
    mount_limit: Option<(u64, u64)>,
    /// Pages of this size reserved in the system, and how many of them are free.
    reserved: Option<(u64, u64)>,
}

impl HugetlbBudget {
    fn now(file: &File, page: u64) -> Self {
        let sysfs_dir = format!("{HUGEPAGES_SYSFS}/hugepages-{}kB", page / 1024);
        let count = |name: &str| {
            std::fs::read_to_string(format!("{sysfs_dir}/{name}"))
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
        };
        #[allow(clippy::unnecessary_cast)]
        let mount_limit = fs_stat(file)
            .map(|st| (st.f_blocks as u64, st.f_bfree as u64))
            .filter(|&(blocks, _)| blocks > 0);
        let reserved = count("nr_hugepages").zip(count("free_hugepages"));
        Self {
            page,
            sysfs_dir,
            mount_limit,
            reserved,
        }
    }

    /// The error for an image whose `missing` pages the kernel could not allocate: too few
    /// huge pages reserved, or the mount's `size=` limit reached. Says which, and what to do.
    fn shortage(&self, path: &Path, missing: u64) -> DeviceError {
        let dir = &self.sysfs_dir;
        let what = format!(
            "not enough {} huge pages for the image ({missing} needed)",
            size_text(self.page)
        );
        // Either limit, or both, can be what stopped the allocation: name each that is short.
        let mut fixes = Vec::new();
        if let Some((blocks, free)) = self.mount_limit.filter(|&(_, free)| free < missing) {
            fixes.push(format!(
                "the hugetlbfs mount's size= limit allows {blocks}, {free} of them free \
                 (remount it with a larger size=)"
            ));
        }
        if let Some((total, free)) = self.reserved.filter(|&(_, free)| free < missing) {
            fixes.push(format!(
                "{free} of the {total} reserved are free (reserve more: `echo {} > \
                 {dir}/nr_hugepages` as root)",
                total + missing - free
            ));
        }
        if fixes.is_empty() {
            fixes.push(format!("reserve more in {dir}/nr_hugepages (as root)"));
        }
        let reason = format!("{what}: {}", fixes.join("; "));
        unsupported(path, reason)
    }
}

/// Whether `file` lives on a memory-backed file system (tmpfs, hugetlbfs).
pub(super) fn is_memory_backed(file: &File) -> bool {
    matches!(fs_magic(file), Some(TMPFS_MAGIC | HUGETLBFS_MAGIC))
}

/// The CPU-flush mode this CPU supports, or `None` where there is none (non-x86).
pub(super) fn cpu_flush_mode() -> Option<PersistenceMode> {
    arch::detect()
}

/// Maps `len` bytes of `file` shared at an address aligned to `align` (a power of two, at
/// least 2 MiB); returns the address and whether `MAP_SYNC` was granted.
///
/// An anonymous `PROT_NONE` reservation of `len + align` bytes is made first, the file is
/// mapped `MAP_FIXED` over its aligned part, and the slack on both sides is unmapped.
fn map(file: &File, len: usize, align: usize, read_only: bool) -> io::Result<(NonNull<u8>, bool)> {
    let total = len + align;
    // SAFETY: an anonymous, inaccessible reservation at an address of the kernel's choice
    // cannot alias anything.
    let reserved = unsafe {
        libc::mmap(
            ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if reserved == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = reserved.cast::<u8>();
    let pad = (align - base as usize % align) % align;
    let aligned = base.wrapping_add(pad);
    let prot = if read_only {
        libc::PROT_READ
    } else {
        libc::PROT_READ | libc::PROT_WRITE
    };
    let fixed = |flags: libc::c_int| {
        // SAFETY: `aligned..aligned + len` lies inside our own PROT_NONE reservation
        // (`pad + len <= total`), which nothing else uses, so MAP_FIXED replaces only it.
        unsafe {
            libc::mmap(
                aligned.cast::<c_void>(),
                len,
                prot,
                flags | libc::MAP_FIXED,
                file.as_raw_fd(),
                0,
            )
        }
    };
    let mut map_sync = true;
    let mut got = fixed(libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC);
    if got == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) {
            map_sync = false;
            got = fixed(libc::MAP_SHARED);
        }
    }
    let unmap = |p: *mut u8, n: usize| {
        if n > 0 {
            // SAFETY: `p..p + n` is a part of our reservation that holds no device mapping
            // (or, on failure, the whole reservation); unmapping it frees only our pages.
            unsafe { libc::munmap(p.cast::<c_void>(), n) };
        }
    };
    if got == libc::MAP_FAILED || got != aligned.cast::<c_void>() {
        let e = io::Error::last_os_error();
        unmap(base, total);
        return Err(e);
    }
    unmap(base, pad);
    unmap(aligned.wrapping_add(len), total - pad - len);
    NonNull::new(aligned)
        .map(|p| (p, map_sync))
        .ok_or_else(|| io::Error::other("mmap returned a null address"))
}

/// Creates `path` as an image file of `size` bytes, or grows an existing one, and allocates
/// its space (fallocate) so a full file system below can never raise SIGBUS later.
///
/// An existing image larger than `size` is refused, never shrunk. The image is locked while
/// it is being prepared, so a mounted image (whose daemon holds the lock) is refused as busy.
pub fn create_image(path: &Path, size: u64) -> Result<(), DeviceError> {
    prepare_image(path, size, true)
}

/// As [`create_image`], but allocates nothing: a new image is all hole, a grown one gets a
/// hole at its end (`mkfs.pmfs --sparse`). The file system holding it may then run out of
/// space while pmfs writes; pmfs reserves space before it hands it out
/// ([`Media::reserve`]), so that shows as ENOSPC, never as SIGBUS.
/// The extended attribute `mkfs.pmfs --sparse` puts on an image file: the image is meant to
/// be sparse even when every block of it is allocated (after the file system was full), so
/// its space stays reserved chunk by chunk and FITRIM may punch its free chunks. A
/// preallocated image (mkfs without `--sparse`) has it removed, and FITRIM leaves it alone.
const SPARSE_XATTR: &std::ffi::CStr = c"user.pmfs.sparse";

/// Sets (or removes) [`SPARSE_XATTR`] on `file`. Best effort: on a file system without user
/// xattrs an image is sparse only while it has holes, as before the mark existed.
fn mark_sparse(file: &File, on: bool) {
    let fd = file.as_raw_fd();
    // SAFETY: the name is a NUL-terminated constant and the value a 1-byte static slice,
    // both valid for the call; the calls only read them and act on the descriptor `file`
    // keeps open.
    let r = unsafe {
        if on {
            libc::fsetxattr(fd, SPARSE_XATTR.as_ptr(), b"1".as_ptr().cast(), 1, 0)
        } else {
            libc::fremovexattr(fd, SPARSE_XATTR.as_ptr())
        }
    };
    if r != 0 {
        log::debug!(
            "image mark {}: {}",
            SPARSE_XATTR.to_string_lossy(),
            io::Error::last_os_error()
        );
    }
}

/// True when `file` carries [`SPARSE_XATTR`].
fn marked_sparse(file: &File) -> bool {
    // SAFETY: a NULL buffer of size 0 asks only for the value's length; the name is a
    // NUL-terminated constant; the descriptor is open for the call.
    let r = unsafe { libc::fgetxattr(file.as_raw_fd(), SPARSE_XATTR.as_ptr(), ptr::null_mut(), 0) };
    r >= 0
}

pub fn create_sparse_image(path: &Path, size: u64) -> Result<(), DeviceError> {
    prepare_image(path, size, false)
}

fn prepare_image(path: &Path, size: u64, allocate: bool) -> Result<(), DeviceError> {
    if size == 0 || size % PAGE != 0 {
        return Err(unsupported(
            path,
            format!("image size {size} bytes is not a positive multiple of {PAGE}"),
        ));
    }
    let len = libc::off_t::try_from(size)
        .map_err(|_| unsupported(path, format!("image size {size} bytes is too large")))?;
    // Refuse device nodes, directories and FIFOs before opening (a FIFO would block).
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => {
            return Err(unsupported(
                path,
                "not a regular file: only image files can be created or grown",
            ));
        }
        _ => {}
    }
    let mut oo = std::fs::OpenOptions::new();
    oo.read(true).write(true).mode(0o644);
    let (file, created) = match oo.clone().create_new(true).open(path) {
        Ok(f) => (f, true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            (oo.open(path).map_err(|e| io_error(path, e))?, false)
        }
        Err(e) => return Err(io_error(path, e)),
    };
    let result = allocate_image(path, &file, size, len, allocate);
    if result.is_err() && created {
        drop(file);
        let _ = std::fs::remove_file(path);
    }
    result
}

fn allocate_image(
    path: &Path,
    file: &File,
    size: u64,
    len: libc::off_t,
    allocate: bool,
) -> Result<(), DeviceError> {
    lock_exclusive(path, file)?;
    let meta = file.metadata().map_err(|e| io_error(path, e))?;
    if !meta.is_file() {
        return Err(unsupported(
            path,
            "not a regular file: only image files can be created or grown",
        ));
    }
    if meta.len() > size {
        return Err(unsupported(
            path,
            "image is larger than --size; refusing to shrink",
        ));
    }
    let hugetlb_page = hugetlb_page_size(file);
    if let Some(page) = hugetlb_page {
        check_hugetlb_size(path, size, page)?;
    }
    if !allocate {
        if hugetlb_page.is_some() {
            // A missing huge page is a SIGBUS at the first store: nothing to gain.
            return Err(unsupported(
                path,
                "an image on hugetlbfs cannot be sparse (its pages must all be there before \
                 pmfs stores into them): format it without --sparse",
            ));
        }
        // Grows the file with a hole; an existing image keeps what it has allocated.
        if meta.len() < size {
            file.set_len(size).map_err(|e| io_error(path, e))?;
        }
        mark_sparse(file, true);
        return file.sync_all().map_err(|e| io_error(path, e));
    }
    mark_sparse(file, false);
    let budget = hugetlb_page.map(|page| HugetlbBudget::now(file, page));
    let no_space = || {
        if let Some(budget) = &budget {
            // The pages the fallocate had still to find (the image may hold some already).
            let missing = (size - (meta.blocks() * 512).min(size)) / budget.page;
            return budget.shortage(path, missing);
        }
        io_error(
            path,
            io::Error::new(
                io::Error::from_raw_os_error(libc::ENOSPC).kind(),
                format!("no space for an image of {size} bytes"),
            ),
        )
    };
    // SAFETY: fallocate only reads the descriptor number, which `file` keeps open.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if r != 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOSPC) => return Err(no_space()),
            Some(libc::ENOMEM) if hugetlb_page.is_some() => return Err(no_space()),
            Some(libc::EOPNOTSUPP) => {
                // SAFETY: as above; glibc emulates the allocation by writing to the file.
                let r = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
                match r {
                    0 => {}
                    libc::ENOSPC => return Err(no_space()),
                    errno => return Err(io_error(path, io::Error::from_raw_os_error(errno))),
                }
            }
            _ => return Err(io_error(path, e)),
        }
    }
    // hugetlbfs has no write-back: its pages are the image already.
    if hugetlb_page.is_some() {
        return Ok(());
    }
    file.sync_all().map_err(|e| io_error(path, e))
}

/// How a non-temporal store of `len` bytes at address `addr` splits: an unaligned head and
/// tail (ordinary stores plus flushes) around a 16-byte-aligned body of whole 16-byte units
/// (non-temporal stores, durable at the next fence). Returns (head, body, tail).
pub(super) fn nt_split(addr: usize, len: u64) -> (u64, u64, u64) {
    let head = (((16 - addr % 16) % 16) as u64).min(len);
    let body = (len - head) / 16 * 16;
    (head, body, len - head - body)
}

#[cfg(target_arch = "x86_64")]
pub(super) mod arch {
    //! x86-64 cache-line write-back, store fence and non-temporal stores.

    use super::PersistenceMode;
    use std::arch::asm;
    use std::arch::x86_64::{
        __cpuid, __cpuid_count, __m128i, _mm_loadu_si128, _mm_setzero_si128, _mm_sfence,
        _mm_stream_si128,
    };

    /// The best cache-line write-back instruction of this CPU (CPUID).
    pub(super) fn detect() -> Option<PersistenceMode> {
        // The cpuid intrinsics became safe functions in Rust 1.87; the crate supports 1.85.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is read only when leaf 0 says it
        // exists.
        let (leaf1, leaf7) = unsafe {
            let l7 = if __cpuid(0).eax >= 7 {
                __cpuid_count(7, 0).ebx
            } else {
                0
            };
            (__cpuid(1).edx, l7)
        };
        if leaf7 & (1 << 24) != 0 {
            Some(PersistenceMode::Clwb)
        } else if leaf7 & (1 << 23) != 0 {
            Some(PersistenceMode::ClflushOpt)
        } else if leaf1 & (1 << 19) != 0 {
            Some(PersistenceMode::Clflush)
        } else {
            None
        }
    }

    /// Writes back the cache line holding `p` with the instruction `mode` names.
    ///
    /// # Safety
    /// `p` must point into a live mapping of ours, and `mode` must have come from
    /// [`detect`] (the instruction exists on this CPU).
    pub(in crate::device) unsafe fn flush_line(mode: PersistenceMode, p: *const u8) {
        match mode {
            // SAFETY: the caller guarantees CLWB exists and `p` is mapped; CLWB writes a line
            // back without changing memory contents.
            PersistenceMode::Clwb => unsafe {
                asm!("clwb [{0}]", in(reg) p, options(nostack, preserves_flags));
            },
            // SAFETY: as above, for CLFLUSHOPT.
            PersistenceMode::ClflushOpt => unsafe {
                asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags));
            },
            // SAFETY: as above, for CLFLUSH (SSE2, present on every x86-64 CPU).
            PersistenceMode::Clflush => unsafe {
                asm!("clflush [{0}]", in(reg) p, options(nostack, preserves_flags));
            },
            PersistenceMode::Msync | PersistenceMode::Recorded => {}
        }
    }

    /// Waits until earlier flushes and non-temporal stores are globally visible (durable on
    /// pmem with ADR).
    pub(in crate::device) fn sfence() {
        // SAFETY: SFENCE (SSE) exists on every x86-64 CPU and has no memory effects beyond
        // ordering.
        unsafe { _mm_sfence() };
    }

    /// Copies `len` bytes from `src` to `dst` with 16-byte non-temporal stores.
    ///
    /// # Safety
    /// `dst..dst + len` must be writable and 16-byte aligned, `src..src + len` readable,
    /// the two must not overlap, and `len` must be a multiple of 16.
    pub(in crate::device) unsafe fn stream_copy(dst: *mut u8, src: *const u8, len: usize) {
        let mut i = 0;
        while i < len {
            // SAFETY: `i + 16 <= len`, so both 16-byte accesses are inside the ranges the
            // caller vouches for; the load is unaligned-tolerant, the store is aligned.
            unsafe {
                let v = _mm_loadu_si128(src.add(i).cast::<__m128i>());
                _mm_stream_si128(dst.add(i).cast::<__m128i>(), v);
            }
            i += 16;
        }
    }

    /// Zeroes `len` bytes at `dst` with 16-byte non-temporal stores.
    ///
    /// # Safety
    /// `dst..dst + len` must be writable and 16-byte aligned, `len` a multiple of 16.
    pub(super) unsafe fn stream_zero(dst: *mut u8, len: usize) {
        let mut i = 0;
        while i < len {
            // SAFETY: `i + 16 <= len`: the aligned 16-byte store is inside the caller's range.
            unsafe { _mm_stream_si128(dst.add(i).cast::<__m128i>(), _mm_setzero_si128()) };
            i += 16;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) mod arch {
    //! No CPU-flush path off x86-64: `detect` returns `None`, so every device runs in msync
    //! mode and the other functions are never reached with a CPU-flush mode.

    use super::PersistenceMode;

    pub(super) fn detect() -> Option<PersistenceMode> {
        None
    }

    /// # Safety
    /// Never unsafe here (does nothing); kept `unsafe` to match the x86-64 version.
    pub(in crate::device) unsafe fn flush_line(_mode: PersistenceMode, _p: *const u8) {}

    pub(in crate::device) fn sfence() {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// # Safety
    /// As on x86-64: valid, non-overlapping ranges of `len` bytes.
    pub(in crate::device) unsafe fn stream_copy(dst: *mut u8, src: *const u8, len: usize) {
        // SAFETY: the caller vouches for both ranges.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
    }

    /// # Safety
    /// As on x86-64: a valid range of `len` bytes.
    pub(super) unsafe fn stream_zero(dst: *mut u8, len: usize) {
        // SAFETY: the caller vouches for the range.
        unsafe { std::ptr::write_bytes(dst, 0, len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tempfile::NamedTempFile;

    const MIB: u64 = 1 << 20;

    /// An image of `size` bytes in /dev/shm (tmpfs).
    fn shm_image(size: u64) -> NamedTempFile {
        let tmp = NamedTempFile::new_in("/dev/shm").unwrap();
        create_image(tmp.path(), size).unwrap();
        tmp
    }

    fn open_rw(path: &Path) -> Result<Device, DeviceError> {
        Device::open(path, &OpenOptions::default())
    }

    #[test]
    fn create_then_open() {
        let img = shm_image(4 * MIB);
        assert_eq!(std::fs::metadata(img.path()).unwrap().len(), 4 * MIB);
        let d = open_rw(img.path()).unwrap();
        assert_eq!(d.size(), 4 * MIB);
        assert_eq!(d.kind(), DeviceKind::RegularFile);
        assert_eq!(d.path(), img.path());
        assert!(!d.is_read_only());
        assert!(!d.map_sync(), "tmpfs does not grant MAP_SYNC");
    }

    #[test]
    fn create_image_grows_but_never_shrinks() {
        let img = shm_image(4 * MIB);
        create_image(img.path(), 8 * MIB).unwrap();
        assert_eq!(std::fs::metadata(img.path()).unwrap().len(), 8 * MIB);
        // Same size again is fine (and allocates any holes).
        create_image(img.path(), 8 * MIB).unwrap();
        let e = create_image(img.path(), 4 * MIB).unwrap_err();
        assert!(matches!(e, DeviceError::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("refusing to shrink"), "{e}");
        assert_eq!(std::fs::metadata(img.path()).unwrap().len(), 8 * MIB);
        let e = create_image(img.path(), 8 * MIB + 100).unwrap_err();
        assert!(matches!(e, DeviceError::Unsupported { .. }), "{e}");
    }

    #[test]
    fn create_image_makes_a_new_file() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = dir.path().join("img");
        create_image(&path, 2 * MIB).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 2 * MIB);
        // Space is allocated, not sparse.
        assert!(meta.blocks() * 512 >= 2 * MIB, "{} blocks", meta.blocks());
        // A mounted image (lock held) is refused as busy.
        let _d = open_rw(&path).unwrap();
        let e = create_image(&path, 4 * MIB).unwrap_err();
        assert!(matches!(e, DeviceError::Busy(_)), "{e}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * MIB);
    }

    #[test]
    fn sparse_images_reserve_and_discard_whole_chunks() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = dir.path().join("sparse");
        create_sparse_image(&path, 9 * MIB).unwrap();
        let blocks = || std::fs::metadata(&path).unwrap().blocks() * 512;
        assert_eq!(blocks(), 0);
        let d = open_rw(&path).unwrap();
        assert!(d.is_sparse() && d.can_discard());
        // A reservation backs whole chunks; the short last chunk too.
        d.reserve(3 * MIB, 10).unwrap();
        assert_eq!(blocks(), 2 * MIB);
        d.reserve(8 * MIB + 4096, 4096).unwrap();
        assert_eq!(blocks(), 3 * MIB);
        d.write(3 * MIB, b"kept").unwrap();
        // Discard punches only the chunks wholly inside the range, and counts them all.
        assert_eq!(d.discard(MIB, 3 * MIB).unwrap(), 2 * MIB);
        assert_eq!(blocks(), MIB);
        assert_eq!(d.discard(8 * MIB, MIB).unwrap(), MIB);
        assert_eq!(blocks(), 0);
        // A punched chunk reads as zeros. (On tmpfs the read fault allocates the page: a
        // hole of a shared mapping is backed even when only read. pmfs never reads free
        // space, the only space that is ever a hole.)
        let mut b = [1u8; 4];
        d.read(3 * MIB, &mut b).unwrap();
        assert_eq!(b, [0; 4]);
        // Reserved again after the punch.
        d.reserve(2 * MIB, 1).unwrap();
        assert_eq!(blocks(), 2 * MIB);
        assert!(matches!(
            d.reserve(9 * MIB, 1),
            Err(DeviceError::OutOfBounds { .. })
        ));
        drop(d);
        // Read-only: nothing to reserve or discard.
        let ro = OpenOptions {
            read_only: true,
            wait_busy: None,
        };
        let d = Device::open(&path, &ro).unwrap();
        assert!(d.is_sparse() && !d.can_discard());
        drop(d);
        // A preallocated image keeps its allocation.
        create_image(&path, 9 * MIB).unwrap();
        let d = open_rw(&path).unwrap();
        assert!(!d.is_sparse() && !d.can_discard());
        assert!(matches!(d.discard(0, 2 * MIB), Err(DeviceError::NoDiscard)));
        d.reserve(0, 9 * MIB).unwrap();
    }

    /// At a new open nothing is known of the backing: a range the file system reports
    /// without holes is taken as backed without a fallocate, and a hole punched from
    /// outside inside a range (`cp --sparse=always` of an image does that to zero pages)
    /// is allocated again by the reservation.
    #[test]
    fn reserve_after_reopen_fills_the_holes_and_only_them() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = dir.path().join("sparse");
        create_sparse_image(&path, 9 * MIB).unwrap();
        let blocks = || std::fs::metadata(&path).unwrap().blocks() * 512;
        let d = open_rw(&path).unwrap();
        d.reserve(0, 4 * MIB).unwrap();
        assert_eq!(blocks(), 4 * MIB);
        // tmpfs reports pages allocated but never written as holes (safe: they are
        // reserved again); written ones are data.
        d.write(0, &vec![7u8; (4 * MIB) as usize]).unwrap();
        assert!(d.allocated_already(0, 4 * MIB));
        assert!(
            !d.allocated_already(0, 5 * MIB),
            "5 MiB reaches the hole after 4 MiB"
        );
        drop(d);
        // A 64 KiB hole inside the reserved range, made behind pmfs's back.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // SAFETY: fallocate only reads the descriptor, which `f` keeps open.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                MIB as libc::off_t,
                65536,
            )
        };
        assert_eq!(r, 0);
        drop(f);
        assert_eq!(blocks(), 4 * MIB - 65536);
        let d = open_rw(&path).unwrap();
        assert!(!d.allocated_already(0, 4 * MIB));
        d.reserve(0, 4 * MIB).unwrap();
        assert_eq!(blocks(), 4 * MIB, "the hole is allocated again");
        // A range without holes: backed, no fallocate needed; nothing past it allocated.
        d.reserve(2 * MIB, 2 * MIB).unwrap();
        assert_eq!(blocks(), 4 * MIB);
    }

    #[test]
    fn write_read_roundtrip_and_persisted_in_file() {
        let img = shm_image(4 * MIB);
        let d = open_rw(img.path()).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        d.write(12_345, &data).unwrap();
        d.flush(12_345, data.len() as u64).unwrap();
        d.fence();
        let mut back = vec![0; data.len()];
        d.read(12_345, &mut back).unwrap();
        assert_eq!(back, data);
        // Flushes of length 0 and at the very end are accepted.
        d.flush(0, 0).unwrap();
        d.flush(4 * MIB, 0).unwrap();
        d.flush(4 * MIB - 1, 1).unwrap();
        d.sync_all().unwrap();
        drop(d);
        // The mapping was shared: the bytes are in the file.
        let file = std::fs::read(img.path()).unwrap();
        assert_eq!(&file[12_345..12_345 + data.len()], &data[..]);
        // And a new mapping sees them.
        let d = open_rw(img.path()).unwrap();
        let mut back = vec![0; data.len()];
        d.read(12_345, &mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn atomics() {
        let img = shm_image(2 * MIB);
        let d = open_rw(img.path()).unwrap();
        d.store_u64(64, 0xf0f0).unwrap();
        assert_eq!(d.load_u64(64).unwrap(), 0xf0f0);
        assert_eq!(d.fetch_or_u64(64, 0x0f).unwrap(), 0xf0f0);
        assert_eq!(d.fetch_and_u64(64, 0xff).unwrap(), 0xf0ff);
        assert_eq!(d.load_u64(64).unwrap(), 0xff);
        let mut b = [0u8; 8];
        d.read(64, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0xff);
        assert!(matches!(d.load_u64(12), Err(DeviceError::Misaligned(12))));
        assert!(matches!(
            d.store_u64(2 * MIB, 1),
            Err(DeviceError::OutOfBounds { .. })
        ));
        // Concurrent fetch_or from many threads loses no bit.
        let d = Arc::new(d);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let d = Arc::clone(&d);
                std::thread::spawn(move || {
                    for bit in 0..8 {
                        d.fetch_or_u64(128, 1 << (t * 8 + bit)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(d.load_u64(128).unwrap(), u64::MAX);
    }

    #[test]
    fn out_of_bounds_is_an_error() {
        let img = shm_image(2 * MIB);
        let d = open_rw(img.path()).unwrap();
        let size = d.size();
        let oob = |r: Result<(), DeviceError>| matches!(r, Err(DeviceError::OutOfBounds { .. }));
        assert!(oob(d.read(size - 4, &mut [0; 8])));
        assert!(oob(d.read(u64::MAX, &mut [0; 2])));
        assert!(oob(d.write(size, &[1])));
        assert!(oob(d.write_nt(size - 15, &[1; 16])));
        assert!(oob(d.zero_nt(size - 15, 16)));
        assert!(oob(d.flush(size, 1)));
        assert!(matches!(
            d.load_u64(size),
            Err(DeviceError::OutOfBounds { .. })
        ));
        // Exactly the last bytes are fine.
        d.write(size - 8, &[9; 8]).unwrap();
        assert_eq!(d.load_u64(size - 8).unwrap(), 0x0909_0909_0909_0909);
        d.read(size, &mut []).unwrap();
    }

    #[test]
    fn mapping_is_2mib_aligned() {
        for size in [4096, 2 * MIB, 6 * MIB + 4096] {
            let img = shm_image(size);
            let d = open_rw(img.path()).unwrap();
            assert!(d.mapping_is_huge_aligned(), "size {size}");
            assert_eq!(d.base.as_ptr() as usize % HUGE_ALIGN, 0);
        }
    }

    #[test]
    fn second_open_is_busy() {
        let img = shm_image(2 * MIB);
        let _d = open_rw(img.path()).unwrap();
        let e = open_rw(img.path()).unwrap_err();
        assert!(matches!(e, DeviceError::Busy(_)), "{e}");
        assert!(
            e.to_string()
                .contains("device is busy: already mounted or in use"),
            "{e}"
        );
        // A read-only opener (fsck -n) is refused too.
        let ro = OpenOptions {
            read_only: true,
            wait_busy: None,
        };
        assert!(matches!(
            Device::open(img.path(), &ro),
            Err(DeviceError::Busy(_))
        ));
        // A short wait gives up.
        let wait = OpenOptions {
            read_only: false,
            wait_busy: Some(Duration::from_millis(60)),
        };
        let t = Instant::now();
        assert!(matches!(
            Device::open(img.path(), &wait),
            Err(DeviceError::Busy(_))
        ));
        assert!(t.elapsed() >= Duration::from_millis(60));
    }

    #[test]
    fn wait_busy_succeeds_once_the_holder_is_dropped() {
        let img = shm_image(2 * MIB);
        let d = open_rw(img.path()).unwrap();
        d.write(0, b"held").unwrap();
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            drop(d);
        });
        let wait = OpenOptions {
            read_only: false,
            wait_busy: Some(Duration::from_secs(10)),
        };
        let t = Instant::now();
        let d2 = Device::open(img.path(), &wait).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(100));
        holder.join().unwrap();
        let mut b = [0u8; 4];
        d2.read(0, &mut b).unwrap();
        assert_eq!(&b, b"held");
    }

    #[test]
    fn read_only_open_refuses_stores() {
        let img = shm_image(2 * MIB);
        {
            let d = open_rw(img.path()).unwrap();
            d.write(100, b"hello").unwrap();
        }
        let ro = OpenOptions {
            read_only: true,
            wait_busy: None,
        };
        let d = Device::open(img.path(), &ro).unwrap();
        assert!(d.is_read_only());
        let ro_err = |r: Result<(), DeviceError>| matches!(r, Err(DeviceError::ReadOnly));
        assert!(ro_err(d.write(0, &[1])));
        assert!(ro_err(d.write_nt(0, &[1; 64])));
        assert!(ro_err(d.zero_nt(0, 64)));
        assert!(ro_err(d.store_u64(0, 1)));
        assert!(matches!(d.fetch_or_u64(0, 1), Err(DeviceError::ReadOnly)));
        assert!(matches!(d.fetch_and_u64(0, 1), Err(DeviceError::ReadOnly)));
        let mut b = [0u8; 5];
        d.read(100, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert_eq!(d.load_u64(0).unwrap(), 0);
        d.flush(0, 64).unwrap();
        d.fence();
        d.sync_all().unwrap();
        // A read-write opener is refused while the read-only one holds the device.
        assert!(matches!(open_rw(img.path()), Err(DeviceError::Busy(_))));
    }

    #[test]
    fn shm_gets_a_cpu_flush_mode() {
        let img = shm_image(2 * MIB);
        let d = open_rw(img.path()).unwrap();
        let mode = d.persistence();
        assert!(
            matches!(
                mode,
                PersistenceMode::Clwb | PersistenceMode::ClflushOpt | PersistenceMode::Clflush
            ),
            "{mode}"
        );
        assert_eq!(Some(mode), cpu_flush_mode());
    }

    #[test]
    fn disk_backed_file_gets_msync() {
        let tmp = NamedTempFile::new_in("/tmp").unwrap();
        create_image(tmp.path(), 2 * MIB).unwrap();
        let d = open_rw(tmp.path()).unwrap();
        // /tmp is ext4 on the machine this was written on; where /tmp is tmpfs (or another
        // memory-backed file system) the file legitimately gets a CPU-flush mode, so the
        // assertion is skipped there.
        if !is_memory_backed(tmp.as_file()) && !d.map_sync() {
            assert_eq!(d.persistence(), PersistenceMode::Msync);
        }
        // The msync path works either way.
        d.write(5000, &[7; 3000]).unwrap();
        d.flush(5000, 3000).unwrap();
        d.fence();
        d.write_nt(10_001, &[8; 5000]).unwrap();
        d.zero_nt(12_000, 100).unwrap();
        d.fence();
        d.sync_all().unwrap();
        let mut b = vec![0; 5000];
        d.read(10_001, &mut b).unwrap();
        assert!(b[..1999].iter().all(|&x| x == 8));
        assert!(b[1999..2099].iter().all(|&x| x == 0));
        assert!(b[2099..].iter().all(|&x| x == 8));
    }

    #[test]
    fn write_nt_and_zero_nt_roundtrip() {
        let img = shm_image(2 * MIB);
        let d = open_rw(img.path()).unwrap();
        let mut model = vec![0u8; 2 * MIB as usize];
        d.write(0, &vec![0xaa; 1 << 20]).unwrap();
        model[..1 << 20].fill(0xaa);
        let cases: [(u64, usize); 8] = [
            (0, 0),
            (3, 5),
            (16, 16),
            (7, 100),
            (4096, 65_536),
            (65_537, 33_333),
            (200_000, 15),
            (2 * MIB - 17, 17),
        ];
        for (i, &(off, len)) in cases.iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|j| (j * 31 + i) as u8 | 1).collect();
            d.write_nt(off, &data).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        d.fence();
        for &(off, len) in &[(1u64, 30u64), (4096 + 100, 1000), (65_537, 48)] {
            d.zero_nt(off, len).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        }
        d.fence();
        let mut back = vec![0u8; model.len()];
        d.read(0, &mut back).unwrap();
        assert!(back == model, "device differs from the model");
    }

    #[test]
    fn hugetlb_sizes_must_be_whole_pages() {
        let path = Path::new("/hugetlb/img");
        let gib = 1024 * MIB;
        check_hugetlb_size(path, 2 * gib, gib).unwrap();
        check_hugetlb_size(path, 64 * MIB, 2 * MIB).unwrap();
        let e = check_hugetlb_size(path, 100 * MIB, gib).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/hugetlb/img: image size 100 MiB is not a multiple of the hugetlbfs page size \
             1 GiB: hugetlbfs holds whole pages only; use --size 1G"
        );
        let e = check_hugetlb_size(path, 65 * MIB, 2 * MIB).unwrap_err();
        assert!(e.to_string().ends_with("use --size 64M or 66M"), "{e}");
        let e = check_hugetlb_size(path, 3 * gib + 4096, gib).unwrap_err();
        assert!(e.to_string().ends_with("use --size 3G or 4G"), "{e}");
    }

    #[test]
    fn tmpfs_is_not_hugetlbfs() {
        let img = shm_image(2 * MIB);
        assert_eq!(hugetlb_page_size(img.as_file()), None);
        assert_eq!(open_rw(img.path()).unwrap().hugetlb_page_size(), None);
    }

    #[test]
    fn unsupported_files() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let e = open_rw(dir.path()).unwrap_err();
        assert!(matches!(e, DeviceError::Unsupported { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("not a regular file, block device or DAX device"),
            "{e}"
        );
        // An empty file.
        let empty = NamedTempFile::new_in("/dev/shm").unwrap();
        let e = open_rw(empty.path()).unwrap_err();
        assert!(matches!(e, DeviceError::Unsupported { .. }), "{e}");
        // A size that is not a multiple of 4096.
        let odd = NamedTempFile::new_in("/dev/shm").unwrap();
        odd.as_file().set_len(4096 + 512).unwrap();
        let e = open_rw(odd.path()).unwrap_err();
        assert!(matches!(e, DeviceError::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("not a multiple of 4096"), "{e}");
        // A character device that is not DAX, and a FIFO (which must not block).
        let e = open_rw(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(e, DeviceError::Unsupported { .. }), "{e}");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_rw(&fifo).unwrap_err();
        assert!(matches!(e, DeviceError::Unsupported { .. }), "{e}");
        // A missing file is an I/O error.
        let e = open_rw(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, DeviceError::Io { .. }), "{e}");
    }
}
