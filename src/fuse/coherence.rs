//! Direct writes that stay coherent with shared mappings (`cache=direct`).
//!
//! Under `cache=direct` every open of a regular file gets `FOPEN_DIRECT_IO`: write(2) goes
//! to pmem without the page cache. Shared mappings still live in the page cache
//! (`FUSE_DIRECT_IO_ALLOW_MMAP`), and the kernel gives a direct write only this much
//! coherence with them (fs/fuse/file.c, `fuse_direct_io`): it writes back and invalidates
//! the pages of the write's range *before* it sends the WRITE. A store through a mapping
//! between that invalidation and the moment pmfs applies the write faults the page in
//! again, with the bytes from before the write; the store dirties it, and its writeback
//! (a whole page) later puts those old bytes back over the written ones. The daemon never
//! sees the invalidation, so it cannot keep that fill from happening. It repairs it
//! instead, before the write returns:
//!
//! 1. Every page-cache fill is a READ without `FUSE_READ_LOCKOWNER` (`fuse_read_folio`,
//!    `fuse_readahead`; direct reads always carry the lock owner, `fuse_send_read`). The
//!    first one marks the inode ([`MappedWrites::before_fill`]), before its bytes are read.
//! 2. A direct write to a marked inode runs under the inode's entry lock and keeps a copy of
//!    its bytes, *pending* ([`MappedWrites::guarded_write`]).
//! 3. Its reply waits for `notify_inval_inode` of its range. Invalidating a dirty page
//!    launders it (`fuse_launder_folio`: a writeback, waited for) and removes it, so every
//!    page that may have been filled with old bytes is written back and gone when the
//!    notification returns; later faults read the new bytes.
//! 4. A writeback (a WRITE with `FUSE_WRITE_CACHE`) that reaches a marked inode while
//!    writes are pending is applied, and then each pending write's bytes are applied again
//!    over it ([`MappedWrites::writeback`]): the page's stores outside the write survive,
//!    and inside it the write wins, as it may over stores that raced with it. Bytes of a
//!    range that was filled *after* the pending write was applied are left alone: that
//!    page held the new bytes, so what its writeback carries there are stores that came
//!    later.
//!
//! An inode never filled has no cached page, so its direct writes take none of these steps
//! (one atomic load). The mark is taken before a fill reads and tested after a write
//! has written, each under the inode's stripe lock (read, write), so a fill that read the
//! old bytes is always seen by the write ([`MappedWrites::may_be_cached`]). Marks last as
//! long as the daemon; an inode that was mapped once keeps paying for its direct writes.
//!
//! Lock order: an inode's entry lock ([`Rank::MappedWrites`]) comes before every lock of
//! the core, which the writes it guards take.

use crate::error::Result;
use crate::lockorder::{OrderedMutex, Rank};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The inodes whose pages the kernel may cache, and their direct writes still pending.
#[derive(Debug, Default)]
pub struct MappedWrites {
    /// Set by the first fill of any inode: until then no direct write looks at `inodes`.
    any_filled: AtomicBool,
    inodes: parking_lot::RwLock<HashMap<u64, Arc<OrderedMutex<Pending>>>>,
    next_id: AtomicU64,
}

/// The direct writes to one inode whose pages have not been invalidated yet.
#[derive(Debug, Default)]
pub struct Pending {
    writes: Vec<PendingWrite>,
}

#[derive(Debug)]
struct PendingWrite {
    id: u64,
    offset: u64,
    data: Box<[u8]>,
    /// Ranges filled into the page cache after this write was applied (they hold its
    /// bytes).
    refilled: Vec<Range<u64>>,
}

impl PendingWrite {
    fn range(&self) -> Range<u64> {
        self.offset..self.offset + self.data.len() as u64
    }

    /// The parts of `within` this write covers where a page may still hold the bytes from
    /// before it: its range minus what was refilled after it.
    fn stale_parts(&self, within: &Range<u64>) -> Vec<Range<u64>> {
        let mine = self.range();
        let mut parts: Vec<Range<u64>> =
            std::iter::once(mine.start.max(within.start)..mine.end.min(within.end)).collect();
        for fresh in &self.refilled {
            parts = parts
                .into_iter()
                .flat_map(|p| {
                    [
                        p.start..p.end.min(fresh.start),
                        p.start.max(fresh.end)..p.end,
                    ]
                })
                .filter(|p| p.start < p.end)
                .collect();
        }
        parts.retain(|p| p.start < p.end);
        parts
    }

    fn bytes(&self, part: &Range<u64>) -> &[u8] {
        let at = (part.start - self.offset) as usize;
        &self.data[at..at + (part.end - part.start) as usize]
    }
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// A direct write applied under its inode's entry lock, to be finished with
/// [`MappedWrites::finish`] once the kernel dropped the pages of `range`.
#[derive(Debug, PartialEq, Eq)]
pub struct Guarded {
    pub ino: u64,
    pub range: Range<u64>,
    id: u64,
}

impl MappedWrites {
    fn entry(&self, ino: u64) -> Option<Arc<OrderedMutex<Pending>>> {
        if !self.any_filled.load(Ordering::Acquire) {
            return None;
        }
        self.inodes.read().get(&ino).cloned()
    }

    /// A page-cache fill of `range` of `ino` is about to be read (call before reading).
    pub fn before_fill(&self, ino: u64, range: Range<u64>) {
        let entry = match self.entry(ino) {
            Some(e) => e,
            None => {
                let mut inodes = self.inodes.write();
                self.any_filled.store(true, Ordering::Release);
                let entry = inodes.entry(ino).or_insert_with(|| {
                    Arc::new(OrderedMutex::new(Rank::MappedWrites, Pending::default()))
                });
                Arc::clone(entry)
            }
        };
        let mut pending = entry.lock();
        for w in &mut pending.writes {
            if overlaps(&w.range(), &range) {
                w.refilled.push(range.clone());
            }
        }
    }

    /// True when the kernel may hold pages of `ino` (it was filled at least once). Asked
    /// after a direct write: a fill that read before the write marked the inode before it.
    pub fn may_be_cached(&self, ino: u64) -> bool {
        self.entry(ino).is_some()
    }

    /// Runs `write` (a direct write of `data` at `offset` to a marked inode) under the
    /// inode's entry lock. On success the bytes it wrote stay pending, and the returned
    /// [`Guarded`] must be passed to [`Self::finish`] after the pages of its range were
    /// invalidated; `None` if nothing was written or the inode is not marked.
    pub fn guarded_write(
        &self,
        ino: u64,
        offset: u64,
        data: &[u8],
        write: impl FnOnce() -> Result<u32>,
    ) -> Result<(u32, Option<Guarded>)> {
        let Some(entry) = self.entry(ino) else {
            return write().map(|n| (n, None));
        };
        let mut pending = entry.lock();
        let n = write()?;
        if n == 0 {
            return Ok((0, None));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let data: Box<[u8]> = data[..n as usize].into();
        let range = offset..offset + u64::from(n);
        pending.writes.push(PendingWrite {
            id,
            offset,
            data,
            refilled: Vec::new(),
        });
        Ok((n, Some(Guarded { ino, range, id })))
    }

    /// The pages of a guarded write's range are gone from the kernel: its bytes need no
    /// protection any more.
    pub fn finish(&self, done: &Guarded) {
        if let Some(entry) = self.entry(done.ino) {
            entry.lock().writes.retain(|w| w.id != done.id);
        }
    }

    /// Applies a page-cache writeback of `data` at `offset` with `write`, then applies again
    /// the bytes of every pending direct write that the written pages may hold stale (step
    /// 4 of the module's rule). Returns what the writeback itself wrote.
    pub fn writeback(
        &self,
        ino: u64,
        offset: u64,
        data: &[u8],
        mut write: impl FnMut(u64, &[u8]) -> Result<u32>,
    ) -> Result<u32> {
        let Some(entry) = self.entry(ino) else {
            return write(offset, data);
        };
        let pending = entry.lock();
        let n = write(offset, data)?;
        let written = offset..offset + u64::from(n);
        for w in &pending.writes {
            for part in w.stale_parts(&written) {
                if let Err(e) = write(part.start, w.bytes(&part)) {
                    log::warn!(
                        "inode {ino}: putting back {} bytes of a direct write at {} over a \
                         writeback: {e}",
                        part.end - part.start,
                        part.start
                    );
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A file as a byte vector, written the way the core writes.
    fn writer(file: &RefCell<Vec<u8>>) -> impl FnMut(u64, &[u8]) -> Result<u32> + '_ {
        move |at, bytes| {
            let mut f = file.borrow_mut();
            f[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
            Ok(bytes.len() as u32)
        }
    }

    #[test]
    fn an_inode_never_filled_takes_no_guard() {
        let m = MappedWrites::default();
        assert!(!m.may_be_cached(7));
        let (n, guard) = m.guarded_write(7, 0, b"abcd", || Ok(4)).unwrap();
        assert_eq!((n, guard), (4, None));
        m.before_fill(8, 0..4096);
        assert!(!m.may_be_cached(7));
        assert!(m.may_be_cached(8));
    }

    #[test]
    fn a_stale_writeback_during_a_pending_write_keeps_the_written_bytes() {
        let m = MappedWrites::default();
        let file = RefCell::new(vec![b'o'; 16]);
        // A fault filled the page with the old bytes; then the direct write landed.
        m.before_fill(1, 0..16);
        let mut w = writer(&file);
        let (_, guard) = m.guarded_write(1, 4, b"WWWW", || w(4, b"WWWW")).unwrap();
        let guard = guard.expect("a filled inode guards its writes");
        assert_eq!(guard.range, 4..8);
        // The stale page, with a store at byte 0, is written back whole.
        let mut page = vec![b'o'; 16];
        page[0] = b'S';
        m.writeback(1, 0, &page, writer(&file)).unwrap();
        assert_eq!(&file.borrow()[..], b"SoooWWWWoooooooo");
        // Once the pages were invalidated, a writeback is applied as it is.
        m.finish(&guard);
        m.writeback(1, 4, b"ssss", writer(&file)).unwrap();
        assert_eq!(&file.borrow()[..], b"Sooossssoooooooo");
    }

    #[test]
    fn a_range_refilled_after_the_write_keeps_its_later_stores() {
        let m = MappedWrites::default();
        let file = RefCell::new(vec![b'o'; 16]);
        m.before_fill(1, 0..16);
        let mut w = writer(&file);
        let (_, guard) = m
            .guarded_write(1, 2, b"WWWWWWWW", || w(2, b"WWWWWWWW"))
            .unwrap();
        let guard = guard.unwrap();
        // Bytes 8..16 were faulted in again after the write (they hold its bytes), and a
        // store changed byte 9 afterwards: that page's writeback is newer than the write.
        m.before_fill(1, 8..16);
        m.writeback(1, 8, b"WsoooooO", writer(&file)).unwrap();
        assert_eq!(&file.borrow()[..], b"ooWWWWWWWsoooooO");
        // A writeback of the page filled before the write still gets the write back.
        m.writeback(1, 0, b"SSoooooo", writer(&file)).unwrap();
        assert_eq!(&file.borrow()[..], b"SSWWWWWWWsoooooO");
        m.finish(&guard);
    }

    #[test]
    fn a_failed_write_leaves_nothing_pending() {
        let m = MappedWrites::default();
        let file = RefCell::new(vec![b'o'; 8]);
        m.before_fill(1, 0..8);
        let r = m.guarded_write(1, 0, b"WWWW", || Err(crate::error::Error::NoSpace));
        assert!(r.is_err());
        m.writeback(1, 0, b"ssssssss", writer(&file)).unwrap();
        assert_eq!(&file.borrow()[..], b"ssssssss");
    }
}
