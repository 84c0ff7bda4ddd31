//! mmap(2) of tracked files: direct mappings of the file's extents on the device
//! ([`pmfs::dax::DaxMapping::map_for_program`]), and the bookkeeping that munmap, msync,
//! mremap, mprotect and fixed mappings over them need.
//!
//! Rules:
//! - Served: `MAP_SHARED` or `MAP_PRIVATE` (with at most `MAP_POPULATE`, `MAP_NORESERVE`,
//!   `MAP_NONBLOCK`), `PROT_READ` with or without `PROT_WRITE`, no address demanded
//!   (`MAP_FIXED*`), a page-aligned offset, the whole range inside the file's size rounded
//!   up to a page, an fd the kernel would allow the mapping on. A shared writable mapping
//!   has its holes and preallocated parts allocated by the daemon first (the lease ioctl);
//!   any other mapping is served only where the file is written already, so mapping never
//!   changes a file that is not written through the mapping. Anything else: the real mmap.
//! - The memory is the program's. [`SERVED`] knows which parts of each served mapping are
//!   still mapped (`live`): every munmap, shrinking mremap and fixed mapping the program
//!   makes through libc updates it under the same lock as the call itself, so msync only
//!   ever flushes pages that are mapped.
//! - A served mapping holds its lease (through a duplicate of the file's descriptor) until
//!   its last page is unmapped; with the program's own descriptors, that is the lease's
//!   end: the last unmap and close. A fork inherits mappings and descriptors (the lease
//!   stays held while either process maps or holds them); exec drops both.
//! - Shared writable mappings: msync persists the range (cache-line write-back, or msync
//!   of the device where it is page-cache backed) and stamps mtime/ctime and drops the
//!   kernel's cached pages of the file (the served-write touch); the last unmap stamps too.

use crate::{STATS, Tracked, count, debug};
use pmfs::dax::{DaxMapping, HandedMapping, Sharing};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

const PAGE: usize = 4096;

/// One mapping handed to the program.
#[derive(Debug)]
pub(crate) struct Served {
    pub(crate) handed: HandedMapping,
    /// The parts still mapped: sorted, disjoint, non-empty address ranges.
    live: Vec<(usize, usize)>,
    tracked: Arc<Tracked>,
    /// mprotect may add PROT_WRITE (the kernel would allow it on the real mapping).
    may_write: bool,
}

impl Served {
    /// Stores through it reach the file.
    fn stores_reach_file(&self) -> bool {
        self.handed.sharing() == Sharing::Shared && self.may_write
    }
}

/// The served mappings of this process.
static SERVED: Mutex<Vec<Served>> = Mutex::new(Vec::new());
/// How many there are (a munmap or fixed mapping skips the lock while there are none).
static SERVED_COUNT: AtomicUsize = AtomicUsize::new(0);
/// Set when [`SERVED`] could not be locked (held by a thread that did not survive a fork):
/// from then on no mmap is served and msync goes to the kernel for every range.
static BROKEN: AtomicBool = AtomicBool::new(false);

/// The served mappings, locked; `None` when the lock stays taken (see [`BROKEN`]).
pub(crate) fn served() -> Option<MutexGuard<'static, Vec<Served>>> {
    if BROKEN.load(Ordering::Relaxed) {
        return None;
    }
    for _ in 0..1_000_000 {
        match SERVED.try_lock() {
            Ok(g) => return Some(g),
            Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => std::thread::yield_now(),
        }
    }
    BROKEN.store(true, Ordering::Relaxed);
    None
}

fn page_up(n: usize) -> Option<usize> {
    n.checked_next_multiple_of(PAGE)
}

/// mmap of `fd`: `Some(address)` when served with a direct mapping.
pub(crate) fn mmap(
    fixed: bool,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: i64,
) -> Option<usize> {
    let t = crate::lookup(fd)?;
    // Served writes become visible to the kernel (and the new mapping) first.
    t.settle();
    let served = if fixed || BROKEN.load(Ordering::Relaxed) {
        None
    } else {
        map(&t, len, prot, flags, off)
    };
    if served.is_some() {
        // As the kernel's mmap does (file_accessed): a mapping counts as a read.
        t.mapped_for_reading();
    }
    count(
        if served.is_some() {
            &STATS.served_mmaps
        } else {
            &STATS.real_mmaps
        },
        1,
    );
    served
}

fn map(t: &Arc<Tracked>, len: usize, prot: i32, flags: i32, off: i64) -> Option<usize> {
    const MAP_TYPE: i32 = 0x0f;
    const ALLOWED: i32 = libc::MAP_POPULATE | libc::MAP_NORESERVE | libc::MAP_NONBLOCK;
    let sharing = match flags & MAP_TYPE {
        libc::MAP_SHARED => Sharing::Shared,
        libc::MAP_PRIVATE => Sharing::Private,
        _ => return None, // MAP_SHARED_VALIDATE (MAP_SYNC, ...) and the unknown
    };
    if flags & !(MAP_TYPE | ALLOWED) != 0
        || prot & libc::PROT_READ == 0
        || prot & !(libc::PROT_READ | libc::PROT_WRITE) != 0
        || !t.readable
    {
        return None;
    }
    let off = u64::try_from(off).ok().filter(|o| o % PAGE as u64 == 0)?;
    let end = off.checked_add(u64::try_from(page_up(len)?).ok()?)?;
    if len == 0 {
        return None;
    }
    // A shared mapping of a descriptor that may write (O_RDWR, no O_APPEND): the kernel
    // lets mprotect add PROT_WRITE later, so it is mapped with the holes allocated.
    let fd_may_write = t.writable && !t.unserved_status();
    let shared_writable = sharing == Sharing::Shared && fd_may_write;
    if sharing == Sharing::Shared && prot & libc::PROT_WRITE != 0 && !fd_may_write {
        return None; // the kernel's answer (EACCES), or an fd this library does not write
    }
    let (snap, view) = t.current()?;
    // Past the end of the file the kernel's rules (SIGBUS) apply: the real mapping.
    if end > snap.size.next_multiple_of(PAGE as u64) || off >= snap.size {
        return None;
    }
    if shared_writable && !snap.writes_allowed {
        return None; // immutable or append-only: the kernel refuses
    }
    // Mapping must not change a file that is not written through the mapping: a read-only
    // or private mapping is served only where the file is written already.
    if !shared_writable && !view.covers_written(off, snap.size.min(end) - off) {
        return None;
    }
    let handed =
        match DaxMapping::map_for_program(&t.file, &t.device, off, end - off, sharing, prot) {
            Ok(h) => h,
            Err(e) => {
                debug(format_args!(
                    "inode {}: mmap of {off}..{end} left to the kernel: {e}",
                    t.ino
                ));
                return None;
            }
        };
    let addr = handed.addr();
    let live = vec![(addr, addr + handed.len())];
    let Some(mut all) = served() else {
        handed.withdraw();
        return None;
    };
    all.push(Served {
        handed,
        live,
        tracked: Arc::clone(t),
        may_write: sharing == Sharing::Private || fd_may_write,
    });
    SERVED_COUNT.store(all.len(), Ordering::Relaxed);
    Some(addr)
}

/// `live` without `start..end`.
fn cut(live: &[(usize, usize)], start: usize, end: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(live.len() + 1);
    for &(a, b) in live {
        if b <= start || end <= a {
            out.push((a, b));
            continue;
        }
        if a < start {
            out.push((a, start));
        }
        if end < b {
            out.push((end, b));
        }
    }
    out
}

/// Removes `start..end` from the live parts of every served mapping; returns the mappings
/// left with nothing mapped (to be dropped once the lock is released).
fn forget(all: &mut Vec<Served>, start: usize, end: usize) -> Vec<Served> {
    for s in all.iter_mut() {
        s.live = cut(&s.live, start, end);
    }
    let (gone, kept) = std::mem::take(all)
        .into_iter()
        .partition(|s| s.live.is_empty());
    *all = kept;
    SERVED_COUNT.store(all.len(), Ordering::Relaxed);
    gone
}

/// A served mapping fully unmapped: stores through it are stamped, its lease hold ends.
fn ended(gone: Vec<Served>) {
    for s in gone {
        if s.stores_reach_file() {
            s.tracked.touch(crate::now_ns());
        }
    }
}

/// munmap(2) of `addr..addr + len`: `real` unmaps; served mappings forget the range.
pub(crate) fn munmap(addr: usize, len: usize, real: impl FnOnce() -> i32) -> i32 {
    if SERVED_COUNT.load(Ordering::Relaxed) == 0 {
        return real();
    }
    let Some(mut all) = served() else {
        return real();
    };
    let r = real();
    let gone = match (r, addr.checked_add(len).and_then(page_up)) {
        (0, Some(end)) => forget(&mut all, addr, end),
        _ => Vec::new(),
    };
    drop(all);
    ended(gone);
    r
}

/// After the program mapped `addr..addr + len` with MAP_FIXED (replacing what was there).
pub(crate) fn replaced(addr: usize, len: usize) {
    if SERVED_COUNT.load(Ordering::Relaxed) == 0 {
        return;
    }
    let (Some(mut all), Some(end)) = (served(), addr.checked_add(len).and_then(page_up)) else {
        return;
    };
    let gone = forget(&mut all, addr, end);
    drop(all);
    ended(gone);
}

fn overlaps(all: &[Served], start: usize, end: usize) -> bool {
    all.iter()
        .flat_map(|s| &s.live)
        .any(|&(a, b)| a < end && start < b)
}

/// mremap(2) of `old..old + old_len` to `new_len` (`flags`, `new_addr`), `real` doing the
/// call. A shrink in place of a served mapping is the real call, then the tail is
/// forgotten. Growing a whole served shared mapping with `MREMAP_MAYMOVE` (and no other
/// flag) maps the longer range afresh (the same blocks, so the same bytes) and unmaps the
/// old one with `unmap`. Any other growing or moving of a served mapping is refused with
/// `Err(ENOMEM)` (what the kernel answers when it cannot grow a mapping where it is). A
/// fixed target that lands on a served mapping is forgotten after the call.
pub(crate) fn mremap(
    old: usize,
    old_len: usize,
    new_len: usize,
    flags: i32,
    new_addr: usize,
    real: impl FnOnce() -> usize,
    unmap: impl FnOnce() -> i32,
) -> Result<usize, i32> {
    if SERVED_COUNT.load(Ordering::Relaxed) == 0 {
        return Ok(real());
    }
    let Some(mut all) = served() else {
        return Ok(real());
    };
    // old_len 0 (a duplicate of a shared mapping) names the page at `old`.
    let old_end = old.saturating_add(old_len.max(1));
    let involved = overlaps(&all, old, old_end);
    let moves = flags & (libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP) != 0;
    if involved && (moves || new_len == 0 || new_len > old_len) {
        let whole = all.iter().find(|s| {
            s.handed.addr() == old
                && page_up(old_len) == Some(s.handed.len())
                && s.live == [(old, old + s.handed.len())]
                && s.handed.sharing() == Sharing::Shared
        });
        let grow = whole.filter(|_| flags == libc::MREMAP_MAYMOVE && new_len > old_len);
        let Some(s) = grow else {
            return Err(libc::ENOMEM);
        };
        let (t, prot, off) = (Arc::clone(&s.tracked), s.handed.prot(), s.handed.offset());
        drop(all);
        let off = i64::try_from(off).map_err(|_| libc::ENOMEM)?;
        let addr = map(&t, new_len, prot, libc::MAP_SHARED, off).ok_or(libc::ENOMEM)?;
        count(&STATS.served_mmaps, 1);
        // The old mapping goes as munmap(2) would take it (its lease hold, its stamp).
        let _ = munmap(old, old_len, unmap);
        return Ok(addr);
    }
    let r = real();
    let mut gone = Vec::new();
    if r != libc::MAP_FAILED as usize {
        if involved
            && let (Some(from), Some(to)) =
                (old.checked_add(new_len).and_then(page_up), page_up(old_end))
        {
            gone = forget(&mut all, from, to);
        }
        if flags & libc::MREMAP_FIXED != 0
            && let Some(end) = new_addr.checked_add(new_len).and_then(page_up)
        {
            gone.extend(forget(&mut all, new_addr, end));
        }
    }
    drop(all);
    ended(gone);
    Ok(r)
}

/// mprotect(2): `Some(errno)` when it must be refused: adding PROT_WRITE to a served shared
/// mapping of a descriptor that cannot write (the kernel's EACCES), or PROT_EXEC to any
/// served mapping (its pages are the device's, not the file's).
pub(crate) fn mprotect_refused(addr: usize, len: usize, prot: i32) -> Option<i32> {
    if SERVED_COUNT.load(Ordering::Relaxed) == 0 || prot & (libc::PROT_WRITE | libc::PROT_EXEC) == 0
    {
        return None;
    }
    let all = served()?;
    let end = addr.saturating_add(len);
    let hit = all
        .iter()
        .filter(|s| s.live.iter().any(|&(a, b)| a < end && addr < b));
    for s in hit {
        if prot & libc::PROT_EXEC != 0 || !s.may_write {
            return Some(libc::EACCES);
        }
    }
    None
}

/// madvise(2): `Some(errno)` when it must be refused: `MADV_REMOVE` on a served mapping
/// would free the device's pages under pmfs instead of punching the file (EINVAL, the
/// kernel's answer for a mapping that cannot do it). Every other advice is the kernel's.
pub(crate) fn madvise_refused(addr: usize, len: usize, advice: i32) -> Option<i32> {
    if advice != libc::MADV_REMOVE || SERVED_COUNT.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let all = served()?;
    overlaps(&all, addr, addr.saturating_add(len)).then_some(libc::EINVAL)
}

/// One piece of an msync range: served (a mapping and the byte range relative to it) or
/// not (an address range for the real msync).
#[derive(Debug, PartialEq, Eq)]
enum Piece {
    Served { index: usize, at: usize, len: usize },
    Real { start: usize, end: usize },
}

/// Splits `start..end` into the parts that served mappings still map and the rest.
fn pieces(all: &[Served], start: usize, end: usize) -> Vec<Piece> {
    let mut hits: Vec<(usize, usize, usize)> = Vec::new(); // (from, to, index)
    for (index, s) in all.iter().enumerate() {
        for &(a, b) in &s.live {
            let (from, to) = (a.max(start), b.min(end));
            if from < to {
                hits.push((from, to, index));
            }
        }
    }
    hits.sort_unstable();
    let mut out = Vec::new();
    let mut at = start;
    for (from, to, index) in hits {
        if at < from {
            out.push(Piece::Real {
                start: at,
                end: from,
            });
        }
        out.push(Piece::Served {
            index,
            at: from - all[index].handed.addr(),
            len: to - from,
        });
        at = to;
    }
    if at < end {
        out.push(Piece::Real { start: at, end });
    }
    out
}

/// msync(2) of `addr..addr + len`: served parts are persisted here (`persist`, which may
/// only be given live parts of a served mapping) and stamped; the rest goes to `real`
/// (an address range). `None`: not involved with served mappings, the real call.
pub(crate) fn msync(
    addr: usize,
    len: usize,
    flags: i32,
    persist: impl Fn(&HandedMapping, usize, usize) -> std::io::Result<()>,
    real: impl Fn(usize, usize) -> i32,
) -> Option<Result<(), i32>> {
    if SERVED_COUNT.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let known = libc::MS_ASYNC | libc::MS_SYNC | libc::MS_INVALIDATE;
    let end = page_up(addr.checked_add(len)?)?;
    let all = served()?;
    if !overlaps(&all, addr, end) {
        return None;
    }
    if addr % PAGE != 0
        || flags & !known != 0
        || flags & (libc::MS_ASYNC | libc::MS_SYNC) == libc::MS_ASYNC | libc::MS_SYNC
    {
        return Some(Err(libc::EINVAL));
    }
    let mut touched = Vec::new();
    for p in pieces(&all, addr, end) {
        match p {
            Piece::Served { index, at, len } => {
                let s = &all[index];
                if let Err(e) = persist(&s.handed, at, len) {
                    return Some(Err(e.raw_os_error().unwrap_or(libc::EIO)));
                }
                if s.stores_reach_file() {
                    touched.push(Arc::clone(&s.tracked));
                }
            }
            Piece::Real { start, end } => {
                let r = real(start, end - start);
                if r != 0 {
                    return Some(Err(r));
                }
            }
        }
    }
    drop(all);
    for t in touched {
        t.touch(crate::now_ns());
    }
    Some(Ok(()))
}

/// fork: the forking thread holds [`SERVED`] across the fork, so the child never inherits
/// it taken by a thread that does not exist there.
pub(crate) fn fork_prepare() -> Option<MutexGuard<'static, Vec<Served>>> {
    served()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgetting_a_range_splits_live_parts() {
        let live = vec![(0x1000usize, 0x9000usize)];
        let live = cut(&live, 0x3000, 0x4000);
        assert_eq!(live, vec![(0x1000, 0x3000), (0x4000, 0x9000)]);
        let live = cut(&live, 0x0, 0x2000);
        assert_eq!(live, vec![(0x2000, 0x3000), (0x4000, 0x9000)]);
        assert_eq!(cut(&live, 0x9000, 0xa000), live, "past the end: unchanged");
        assert!(cut(&live, 0x2000, 0xa000).is_empty());
    }
}
