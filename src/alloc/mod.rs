//! The block allocator: which 4 KiB blocks are free, and a 2 MiB-aware policy for handing
//! them out.
//!
//! **Persistent truth** is the block bitmap at [`Geometry::bitmap_offset`]: one bit per block,
//! bit `b` is bit `b % 64` of the little-endian `u64` word `b / 64`, set = allocated. Blocks
//! `0..meta_end` and every bit at or past `block_count` are always set. The bitmap changes only
//! through journal transactions ([`Tx::set_bits`], [`Tx::clear_bits`]).
//!
//! **The space summary** (`format::space`, on file systems of format version 3) says per
//! 1 GiB region whether its part of the bitmap is still uninitialised (never written: all
//! free) and, after a clean unmount, how many blocks of it are free. [`BlockAllocator::open`]
//! reads it and, for the huge-aware policy, reads the bitmap words only of the regions that
//! are partly used (or of every initialised region when the counts are stale): a region
//! entirely free enters the pool whole and one entirely used is left out, both without any
//! per-chunk state, so mount time and memory follow what is used, not the device size.
//! Invariants of the summary, kept here:
//! - A region's bitmap is written (zeroed, flushed, fenced) and only then its uninitialised
//!   flag cleared (one 8-byte store, flushed, fenced), before the first block of the region
//!   is handed out ([`BlockAllocator::claim`]); the flag never comes back. A crash anywhere
//!   leaves a region either flagged (all free: true) or initialised with an all-free bitmap.
//! - The counts are marked stale (one 8-byte store, flushed, fenced) before the first change
//!   of the bitmap a mount makes, and written, then marked valid, at a clean unmount
//!   ([`BlockAllocator::write_summary`]).
//!
//! **The in-memory index** is built at [`BlockAllocator::open`], and then kept in step with
//! the bitmap. Invariants:
//! - A block is free in the index only if its bit is clear and the clear is committed. So
//!   [`BlockAllocator::free`] clears the bits at once but returns the blocks to the index only
//!   from a [`Tx::on_commit`] hook: a block freed by a transaction that may still roll back is
//!   never handed out.
//! - A block leaves the index before its bit is set: [`BlockAllocator::allocate`] takes it,
//!   then sets the bit in its transaction, and an [`Tx::on_abort`] hook returns it if the
//!   transaction rolls back (the rollback clears the bit first).
//! - Hence no block is ever handed out twice, and while no transaction is in flight the index
//!   equals the bitmap ([`BlockAllocator::check_against_bitmap`]).
//!
//! **Policies** ([`AllocPolicy`]): `HugeAware` (default, WineFS-like, see `huge.rs`) keeps free
//! space in whole 2 MiB chunks for large requests and packs small requests into chunks set
//! aside for them, sharded into per-thread arenas, and keeps whole 1 GiB regions free for
//! [`BlockAllocator::allocate_regions`] as long as other space serves the rest; `FirstFit`
//! is a naive first fit over the whole bitmap for comparison (it has no regions).

use crate::format::bitmap as bits;
mod first_fit;
mod huge;
#[cfg(test)]
mod tests;

use crate::device::{DeviceError, Media};
use crate::format::space::RegionEntry;
use crate::format::{BLOCK_SIZE, CHUNK_BLOCKS, Geometry};
use crate::journal::{JournalError, Tx};
use crate::meta::space::{self, SpaceSummary};
use first_fit::FirstFitIndex;
use huge::HugeIndex;
use parking_lot::Mutex;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub use crate::format::space::{REGION_BLOCKS, REGION_CHUNKS, REGION_SIZE};

/// Errors of the allocator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AllocError {
    /// No free run of at least the requested minimum length.
    #[error("no space left on device")]
    NoSpace,
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A request the allocator refuses: a free of blocks that are not allocated or lie outside
    /// the data area, an empty request. Nothing was changed.
    #[error("corrupted: {0}")]
    Corrupted(String),
}

/// A run of blocks `start..start + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockRange {
    pub start: u64,
    pub len: u64,
}

impl BlockRange {
    /// One past the last block.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// What to allocate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocRequest {
    /// Blocks wanted (at most this many are returned).
    pub blocks: u64,
    /// Accept a shorter run down to this many (clamped to `1..=blocks`).
    pub min_blocks: u64,
    /// Want whole 2 MiB-aligned chunks (meaningful for multiples of `CHUNK_BLOCKS`): the
    /// result is aligned while whole free chunks remain; after that, the largest small runs.
    pub aligned: bool,
    /// Prefer the blocks right after this one (extending a file in place).
    pub goal: Option<u64>,
}

impl AllocRequest {
    /// Exactly `blocks` contiguous blocks, anywhere.
    pub fn exact(blocks: u64) -> Self {
        Self {
            blocks,
            min_blocks: blocks,
            aligned: false,
            goal: None,
        }
    }
}

/// How the allocator chooses blocks, fixed at open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AllocPolicy {
    /// WineFS-like: whole aligned chunks for 2 MiB multiples, small requests packed into
    /// chunks set aside for them, per-thread arenas.
    #[default]
    HugeAware,
    /// First fit over the whole bitmap, ignoring alignment, one lock (for comparison).
    FirstFit,
}

enum Index {
    Huge(HugeIndex),
    FirstFit(FirstFitIndex),
}

impl Index {
    fn release(&self, r: BlockRange) {
        match self {
            Self::Huge(h) => h.release(r),
            Self::FirstFit(f) => f.release(r),
        }
    }
}

/// Whole free chunks FITRIM discards under one hold of the allocator's lock (16 MiB: a
/// few milliseconds of punching, which allocations of whole chunks wait for).
const TRIM_BATCH_CHUNKS: u64 = 8;

/// Hands the free chunks of `chunks` to `discard` in runs of consecutive free chunks, each
/// run of at least `min` chunks (a run cut by a batch boundary continues), at most
/// [`TRIM_BATCH_CHUNKS`] per call, each call made while holding the lock `lock` returns: the
/// lock every allocation of a whole free chunk takes, so no chunk is handed out while it is
/// being discarded. `is_free` tells, under that lock, whether a chunk is whole and free.
/// Returns the sum of what `discard` returned.
fn trim_free_chunks<G>(
    lock: impl Fn() -> G,
    is_free: impl Fn(&G, u64) -> bool,
    chunks: std::ops::Range<u64>,
    min: u64,
    discard: &mut dyn FnMut(std::ops::Range<u64>) -> Result<u64, DeviceError>,
) -> Result<u64, DeviceError> {
    let mut total = 0;
    let mut pos = chunks.start;
    // Where the previous batch stopped inside a run long enough to trim.
    let mut run_goes_on = None;
    while pos < chunks.end {
        let guard = lock();
        let Some(start) = (pos..chunks.end).find(|&c| is_free(&guard, c)) else {
            break;
        };
        let end = (start..chunks.end)
            .find(|&c| !is_free(&guard, c))
            .unwrap_or(chunks.end);
        if end - start < min && run_goes_on != Some(start) {
            pos = end;
            run_goes_on = None;
            continue;
        }
        let stop = end.min(start + TRIM_BATCH_CHUNKS);
        total += discard(start..stop)?;
        drop(guard);
        run_goes_on = (stop < end).then_some(stop);
        pos = stop;
    }
    Ok(total)
}

/// The block allocator of one mounted file system. Shared as an `Arc`; every method takes
/// `&self` and may be called from any number of threads.
pub struct BlockAllocator {
    /// Shared with the transactions' commit and abort hooks.
    index: Arc<Index>,
    geometry: Geometry,
    policy: AllocPolicy,
    /// Free blocks only transactions that give space back may take
    /// ([`Tx::allow_reserve`]): the tree nodes of an unlink or a truncate on a full file
    /// system. 0 unless the file system sets one.
    reserve: AtomicU64,
    lazy: Lazy,
}

impl fmt::Debug for BlockAllocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockAllocator")
            .field("policy", &self.policy)
            .field("block_count", &self.geometry.block_count)
            .field("meta_end", &self.geometry.meta_end)
            .field("free_blocks", &self.free_blocks())
            .finish_non_exhaustive()
    }
}

/// Arenas of the huge-aware policy: two per CPU, so threads rarely share one.
fn default_arenas() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get() * 2)
}

/// The whole bitmap as words (set bit = allocated), uninitialised regions as free.
fn read_bitmap(
    media: &dyn Media,
    g: &Geometry,
    summary: Option<&SpaceSummary>,
) -> Result<Vec<u64>, DeviceError> {
    let mut out = Vec::with_capacity((g.bitmap_blocks * BLOCK_SIZE / 8) as usize);
    for r in 0..g.region_count() {
        out.extend(space::read_region_words(media, g, summary, r)?);
    }
    Ok(out)
}

/// What the allocator knows of the space summary while mounted.
#[derive(Debug, Default)]
struct Lazy {
    /// Per region: its bitmap is still uninitialised (empty without a summary).
    uninit: Box<[AtomicBool]>,
    /// Held while a region is initialised (a leaf of the lock order: held across device
    /// stores, never while waiting for another lock).
    init_lock: Mutex<()>,
    /// The summary's counts were marked stale in this mount (false again after
    /// [`BlockAllocator::write_summary`]).
    counts_stale: AtomicBool,
}

impl Lazy {
    fn is_uninit(&self, r: u64) -> bool {
        self.uninit
            .get(r as usize)
            .is_some_and(|u| u.load(Ordering::Acquire))
    }

    /// Regions that blocks `range` touch.
    fn regions(range: BlockRange) -> std::ops::Range<u64> {
        range.start / REGION_BLOCKS..range.end().div_ceil(REGION_BLOCKS)
    }
}

impl BlockAllocator {
    /// Opens the allocator with the default (huge-aware) policy: reads the bitmap once and
    /// builds the in-memory index.
    pub fn open(media: &dyn Media, geometry: &Geometry) -> Result<Arc<Self>, AllocError> {
        Self::open_with_policy(media, geometry, AllocPolicy::default())
    }

    /// Opens the allocator with `policy`.
    pub fn open_with_policy(
        media: &dyn Media,
        geometry: &Geometry,
        policy: AllocPolicy,
    ) -> Result<Arc<Self>, AllocError> {
        Self::open_with_arenas(media, geometry, policy, default_arenas())
    }

    /// Opens the allocator with `policy` and, for the huge-aware policy, `arenas` small-block
    /// arenas (clamped to at least 1).
    pub fn open_with_arenas(
        media: &dyn Media,
        geometry: &Geometry,
        policy: AllocPolicy,
        arenas: usize,
    ) -> Result<Arc<Self>, AllocError> {
        let g = *geometry;
        if !g.is_data_range(g.meta_end, 0) || g.bitmap_blocks * BLOCK_SIZE * 8 < g.block_count {
            return Err(AllocError::Corrupted(
                "geometry: bitmap smaller than the device".into(),
            ));
        }
        let summary =
            SpaceSummary::read(media, &g).map_err(|e| AllocError::Corrupted(e.to_string()))?;
        let summary = summary.as_ref();
        let index = match policy {
            AllocPolicy::HugeAware => {
                let mut h = HugeIndex::new(g.block_count, g.meta_end, arenas);
                for r in 0..g.region_count() {
                    let entry = summary.and_then(|s| s.regions.get(r as usize));
                    let counted = entry.filter(|_| summary.is_some_and(|s| s.counts_valid));
                    let free = counted.map(|e| u64::from(e.free));
                    if entry.is_some_and(|e| e.uninit)
                        || (g.region_is_lazy(r) && free == Some(REGION_BLOCKS))
                    {
                        h.add_free_region(r);
                    } else if g.region_is_lazy(r) && free == Some(0) {
                        // Entirely used: nothing to hold.
                    } else {
                        h.load_region(r, &space::read_region_words(media, &g, summary, r)?);
                    }
                }
                Index::Huge(h)
            }
            AllocPolicy::FirstFit => {
                let words = read_bitmap(media, &g, summary)?;
                Index::FirstFit(FirstFitIndex::build(&words, g.block_count, g.meta_end))
            }
        };
        let uninit = (0..g.region_count())
            .map(|r| AtomicBool::new(summary.is_some_and(|s| s.is_uninit(r))))
            .collect();
        Ok(Arc::new(Self {
            index: Arc::new(index),
            geometry: g,
            policy,
            reserve: AtomicU64::new(0),
            lazy: Lazy {
                uninit,
                ..Lazy::default()
            },
        }))
    }

    /// Marks the space summary's counts stale, once per mount, before the first change of
    /// the bitmap (a crash from here on must not leave counts that claim to be exact).
    fn mark_counts_stale(&self, media: &dyn Media) -> Result<(), DeviceError> {
        if self.geometry.summary_blocks == 0 || self.lazy.counts_stale.load(Ordering::Acquire) {
            return Ok(());
        }
        let _held = self.lazy.init_lock.lock();
        if !self.lazy.counts_stale.load(Ordering::Acquire) {
            space::set_counts_valid(media, &self.geometry, false)?;
            self.lazy.counts_stale.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Initialises the uninitialised regions among those `range` touches
    /// ([`space::initialise_region`]), once each, before any of their blocks is handed out.
    fn initialise_regions(&self, media: &dyn Media, range: BlockRange) -> Result<(), DeviceError> {
        let g = &self.geometry;
        for r in Lazy::regions(range) {
            if !self.lazy.is_uninit(r) {
                continue;
            }
            let _held = self.lazy.init_lock.lock();
            if !self.lazy.is_uninit(r) {
                continue;
            }
            space::initialise_region(media, g, r)?;
            if let Some(u) = self.lazy.uninit.get(r as usize) {
                u.store(false, Ordering::Release);
            }
        }
        Ok(())
    }

    /// Writes the space summary with the exact free count of every region and marks it
    /// valid (a clean unmount). Call it only once no allocation or free can run any more
    /// in this mount, after the last transaction has committed.
    pub fn write_summary(&self, media: &dyn Media) -> Result<(), DeviceError> {
        let g = &self.geometry;
        if g.summary_blocks == 0 {
            return Ok(());
        }
        let entries: Vec<RegionEntry> = (0..g.region_count())
            .map(|r| RegionEntry {
                uninit: self.lazy.is_uninit(r),
                free: self.region_free_blocks(r) as u32,
            })
            .collect();
        space::set_counts_valid(media, g, false)?;
        space::write_summary(media, g, &entries, true)?;
        self.lazy.counts_stale.store(false, Ordering::Release);
        Ok(())
    }

    /// Free blocks of region `r` in the index.
    fn region_free_blocks(&self, r: u64) -> u64 {
        match self.index.as_ref() {
            Index::Huge(h) => h.region_free_blocks(r),
            Index::FirstFit(f) => f.free_in(r * REGION_BLOCKS, REGION_BLOCKS),
        }
    }

    /// Whether region `r`'s bitmap is still uninitialised.
    pub fn region_is_uninit(&self, r: u64) -> bool {
        self.lazy.is_uninit(r)
    }

    /// Holds `blocks` free blocks back from every allocation of a transaction that does not
    /// give space back (see [`Tx::allow_reserve`]).
    pub fn set_reserve(&self, blocks: u64) {
        self.reserve.store(blocks, Ordering::Relaxed);
    }

    /// Blocks held in reserve.
    pub fn reserve(&self) -> u64 {
        self.reserve.load(Ordering::Relaxed)
    }

    pub fn policy(&self) -> AllocPolicy {
        self.policy
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Small-block arenas (1 for the first-fit policy).
    pub fn arena_count(&self) -> usize {
        match self.index.as_ref() {
            Index::Huge(h) => h.arena_count(),
            Index::FirstFit(_) => 1,
        }
    }

    /// Allocates a run of `min_blocks..=blocks` blocks in `tx`: takes it out of the index at
    /// once, sets its bits in the bitmap through `tx`, and gives it back to the index if `tx`
    /// rolls back. Returns [`AllocError::NoSpace`] when no run of `min_blocks` is free.
    pub fn allocate(&self, tx: &mut Tx<'_>, req: AllocRequest) -> Result<BlockRange, AllocError> {
        self.allocate_within(tx, req, None)
    }

    /// As [`BlockAllocator::allocate`], preferring blocks `within.0..within.1` (the member of
    /// a file system over several devices on the writing thread's NUMA node) for requests
    /// of whole 2 MiB chunks and more; anywhere else when that range has no room. Smaller
    /// requests, and the first-fit policy, ignore the preference.
    pub fn allocate_within(
        &self,
        tx: &mut Tx<'_>,
        req: AllocRequest,
        within: Option<(u64, u64)>,
    ) -> Result<BlockRange, AllocError> {
        if req.blocks == 0 {
            return Err(AllocError::Corrupted("allocation of zero blocks".into()));
        }
        let n = req.blocks.min(self.data_blocks());
        let min = req.min_blocks.clamp(1, n);
        if req.min_blocks > n {
            return Err(AllocError::NoSpace);
        }
        let got = match self.index.as_ref() {
            Index::Huge(h) => {
                let chunks = within.map(|(a, b)| (a.div_ceil(CHUNK_BLOCKS), b / CHUNK_BLOCKS));
                h.take(n, min, req.aligned, req.goal, chunks)
            }
            Index::FirstFit(f) => f.take(n, min, req.goal),
        }
        .ok_or(AllocError::NoSpace)?;
        debug_assert!(got.len >= min && got.len <= n);
        self.claim(tx, got)
    }

    /// Allocates whole free 1 GiB regions in `tx`: up to `blocks` blocks (rounded down to
    /// whole regions, at least one), 1 GiB-aligned, as [`BlockAllocator::allocate`] does for
    /// other requests. [`AllocError::NoSpace`] when no region is entirely free (and always
    /// under the first-fit policy, which keeps no regions): the caller then asks for 2 MiB
    /// chunks instead.
    pub fn allocate_regions(&self, tx: &mut Tx<'_>, blocks: u64) -> Result<BlockRange, AllocError> {
        let Index::Huge(h) = self.index.as_ref() else {
            return Err(AllocError::NoSpace);
        };
        let want = (blocks / REGION_BLOCKS).max(1);
        let got = h.take_regions(want).ok_or(AllocError::NoSpace)?;
        debug_assert!(got.start % REGION_BLOCKS == 0 && got.len % REGION_BLOCKS == 0);
        self.claim(tx, got)
    }

    /// Allocates the first `blocks` blocks (whole 2 MiB chunks, at most a region) of a whole
    /// free 1 GiB region in `tx`, for a file that grows sequentially: until the region is
    /// full, other requests leave the blocks after them free while other space exists, so
    /// the file can extend in place ([`AllocRequest::goal`]) into one 1 GiB-aligned extent.
    /// [`AllocError::NoSpace`] when no region is entirely free (always under the first-fit
    /// policy).
    pub fn allocate_stream_start(
        &self,
        tx: &mut Tx<'_>,
        blocks: u64,
    ) -> Result<BlockRange, AllocError> {
        let Index::Huge(h) = self.index.as_ref() else {
            return Err(AllocError::NoSpace);
        };
        if blocks == 0 || blocks % CHUNK_BLOCKS != 0 || blocks > REGION_BLOCKS {
            return Err(AllocError::Corrupted(format!(
                "stream start of {blocks} blocks (not whole chunks of one region)"
            )));
        }
        let got = h
            .take_stream_start(blocks / CHUNK_BLOCKS)
            .ok_or(AllocError::NoSpace)?;
        self.claim(tx, got)
    }

    /// Reserves the last `regions` whole 1 GiB regions of the device for 1 GiB extents (the
    /// superblock's `huge_regions`): requests for less than a region (small blocks, 2 MiB
    /// chunks, extending in place) take their blocks only when no other free space can serve
    /// them; requests for whole regions and growing files' regions take reserved regions
    /// first. The rule is one of preference, never ENOSPC: a full unreserved part spills
    /// into the reserved regions. No effect under the first-fit policy.
    pub fn reserve_regions(&self, regions: u64) {
        if let Index::Huge(h) = self.index.as_ref() {
            h.reserve_regions(regions);
        }
    }

    /// Regions reserved by [`BlockAllocator::reserve_regions`] (0 for the first-fit policy).
    pub fn reserved_regions(&self) -> u64 {
        match self.index.as_ref() {
            Index::Huge(h) => h.reserved_regions(),
            Index::FirstFit(_) => 0,
        }
    }

    /// Makes blocks just taken out of the index `tx`'s: checks the reserve, sets their bits,
    /// and gives them back to the index if `tx` rolls back.
    fn claim(&self, tx: &mut Tx<'_>, got: BlockRange) -> Result<BlockRange, AllocError> {
        // The reserve: an ordinary allocation that leaves fewer free blocks than the
        // reserve gives its blocks back. (Taking first and checking after makes concurrent
        // allocations fail together rather than overdraw the reserve.)
        if !tx.may_use_reserve() && self.free_blocks() < self.reserve() {
            self.index.release(got);
            return Err(AllocError::NoSpace);
        }
        // A sparse image gets the backing store of the blocks now, before anything can
        // store into them (a store into a hole of a full file system would raise SIGBUS).
        // This is the one place blocks are handed out, so file data, extent and directory
        // nodes and inode-table chunks are all covered; the fixed metadata was reserved at
        // mkfs and at mount. A failure is ENOSPC for the caller, whose transaction rolls
        // back; the blocks go back to the index untouched.
        let media = tx.media();
        if let Err(e) = media
            .reserve(got.start * BLOCK_SIZE, got.len * BLOCK_SIZE)
            .and_then(|()| self.mark_counts_stale(media.as_ref()))
            .and_then(|()| self.initialise_regions(media.as_ref(), got))
        {
            self.index.release(got);
            return Err(match e {
                DeviceError::NoSpace(_) => AllocError::NoSpace,
                other => AllocError::Device(other),
            });
        }
        // Register the give-back before touching the bitmap: whatever happens from here,
        // a rollback returns the blocks (the rollback undoes the bits first).
        let index = Arc::clone(&self.index);
        tx.on_abort(move || index.release(got));
        tx.set_bits(self.geometry.bitmap_offset(), got.start, got.len)?;
        Ok(got)
    }

    /// Frees `range` in `tx`: clears its bits at once; the blocks become allocatable again
    /// only when `tx` commits. Refuses ([`AllocError::Corrupted`]) a range outside the data
    /// area or with a block that is not allocated in the bitmap.
    pub fn free(&self, tx: &mut Tx<'_>, range: BlockRange) -> Result<(), AllocError> {
        let g = &self.geometry;
        if range.len == 0 || !g.is_data_range(range.start, range.len) {
            return Err(AllocError::Corrupted(format!(
                "free of blocks {}+{} outside the data area {}..{}",
                range.start, range.len, g.meta_end, g.block_count
            )));
        }
        if let Some(r) = Lazy::regions(range).find(|&r| self.lazy.is_uninit(r)) {
            return Err(AllocError::Corrupted(format!(
                "free of blocks {}+{}: region {r} holds no allocated block (uninitialised)",
                range.start, range.len
            )));
        }
        let media = tx.media();
        self.mark_counts_stale(media.as_ref())?;
        let base = g.bitmap_offset();
        let mut bad = None;
        let mut err = None;
        bits::for_each_word(range.start, range.len, |w, mask| {
            if bad.is_some() || err.is_some() {
                return;
            }
            match media.load_u64(base + w as u64 * 8) {
                Ok(word) if word & mask != mask => {
                    bad = Some(w as u64 * 64 + u64::from((!word & mask).trailing_zeros()));
                }
                Ok(_) => {}
                Err(e) => err = Some(e),
            }
        });
        if let Some(e) = err {
            return Err(e.into());
        }
        if let Some(b) = bad {
            return Err(AllocError::Corrupted(format!(
                "free of blocks {}+{}: block {b} is not allocated",
                range.start, range.len
            )));
        }
        tx.clear_bits(base, range.start, range.len)?;
        let index = Arc::clone(&self.index);
        tx.on_commit(move || index.release(range));
        Ok(())
    }

    /// Free blocks in the index (what statfs reports): whole free chunks and the free blocks
    /// of small chunks. Frees of uncommitted transactions are not counted.
    pub fn free_blocks(&self) -> u64 {
        match self.index.as_ref() {
            Index::Huge(h) => h.free_blocks(),
            Index::FirstFit(f) => f.free_blocks(),
        }
    }

    /// Blocks the allocator manages: `block_count - meta_end`.
    pub fn data_blocks(&self) -> u64 {
        self.geometry.block_count - self.geometry.meta_end
    }

    /// FITRIM: hands every run of at least `min_chunks` whole free 2 MiB chunks among
    /// `chunks` (chunk numbers) to `discard`, holding the allocator's chunk lock during each
    /// call (at most [`TRIM_BATCH_CHUNKS`] chunks a call), so that none of them is handed
    /// out while it is discarded. Free blocks in chunks that are partly used are left alone.
    /// Returns the sum of what `discard` returned.
    ///
    /// The lock is a leaf of the lock order (src/lockorder.rs): it is held while `discard`
    /// runs a system call, never while waiting for another lock, and the caller holds no
    /// ranked lock and no journal slot.
    pub fn trim(
        &self,
        chunks: std::ops::Range<u64>,
        min_chunks: u64,
        discard: &mut dyn FnMut(std::ops::Range<u64>) -> Result<u64, DeviceError>,
    ) -> Result<u64, DeviceError> {
        let min = min_chunks.max(1);
        match self.index.as_ref() {
            Index::Huge(h) => h.trim(chunks, min, discard),
            Index::FirstFit(f) => f.trim(chunks, min, discard),
        }
    }

    /// Runs of consecutive 2 MiB chunks that hold at least one allocated block (the fixed
    /// metadata's chunks included): what a mount of a sparse image reserves, so that no
    /// store into a block in use can fault for want of backing store.
    pub fn used_chunk_runs(&self) -> Vec<std::ops::Range<u64>> {
        // From the chunk that holds `meta_end`: the fixed metadata below it is backed
        // separately (`meta::space::metadata_in_use`), the bitmap of unused regions not at all.
        let from = self.geometry.meta_end / CHUNK_BLOCKS;
        let chunks = self.geometry.block_count.div_ceil(CHUNK_BLOCKS);
        let f = match self.index.as_ref() {
            Index::Huge(h) => return h.used_chunk_runs(from),
            Index::FirstFit(f) => f,
        };
        let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
        for c in (from..chunks).filter(|&c| !f.chunk_is_free(c)) {
            match runs.last_mut() {
                Some(r) if r.end == c => r.end = c + 1,
                _ => runs.push(c..c + 1),
            }
        }
        runs
    }

    /// Whole, 2 MiB-aligned chunks whose blocks are all free.
    pub fn free_chunks(&self) -> u64 {
        match self.index.as_ref() {
            Index::Huge(h) => h.free_chunks(),
            Index::FirstFit(f) => f.free_chunks(),
        }
    }

    /// Whole, 1 GiB-aligned regions whose blocks are all free (0 for the first-fit policy).
    pub fn free_regions(&self) -> u64 {
        match self.index.as_ref() {
            Index::Huge(h) => h.free_regions(),
            Index::FirstFit(_) => 0,
        }
    }

    /// Checks that the index equals the persistent bitmap (and the index's own invariants).
    /// Valid only while no transaction that allocates or frees is in flight.
    pub fn check_against_bitmap(&self, media: &dyn Media) -> Result<(), String> {
        let g = &self.geometry;
        let free = match self.index.as_ref() {
            Index::Huge(h) => h.snapshot()?,
            Index::FirstFit(f) => f.snapshot()?,
        };
        let summary = SpaceSummary::read(media, g).map_err(|e| e.to_string())?;
        for r in 0..g.region_count() {
            if summary.as_ref().is_some_and(|s| s.is_uninit(r)) != self.lazy.is_uninit(r) {
                return Err(format!(
                    "region {r}: uninitialised flag differs from the summary"
                ));
            }
        }
        let disk = read_bitmap(media, g, summary.as_ref())
            .map_err(|e| format!("reading the bitmap: {e}"))?;
        for (wi, &d) in disk.iter().enumerate() {
            let expect = !free.get(wi).copied().unwrap_or(0);
            if d != expect {
                let diff = d ^ expect;
                let b = wi as u64 * 64 + u64::from(diff.trailing_zeros());
                let on_disk = if d & (diff & diff.wrapping_neg()) != 0 {
                    "allocated"
                } else {
                    "free"
                };
                return Err(format!(
                    "block {b}: {on_disk} in the bitmap, the opposite in the index \
                     (meta_end {}, block_count {}, chunk {})",
                    g.meta_end,
                    g.block_count,
                    b / CHUNK_BLOCKS
                ));
            }
        }
        Ok(())
    }
}

/// Helpers for tests (also the integration tests under `tests/`): a fresh file system image
/// on a [`RecordingDevice`](crate::device::RecordingDevice) with only what the allocator
/// needs (journal slots and bitmap).
#[doc(hidden)]
pub mod test_support {
    use super::*;
    use crate::device::RecordingDevice;
    use crate::journal::{Journal, format_slots};

    /// A device with formatted journal slots and a fresh bitmap, and its journal.
    #[derive(Debug)]
    pub struct TestFs {
        pub dev: Arc<RecordingDevice>,
        pub geometry: Geometry,
        pub journal: Journal,
    }

    /// Writes the bitmap of an empty file system: everything free but `0..meta_end` and the
    /// bits past `block_count`; and, with a space summary, the summary as mkfs writes it:
    /// every region that may be uninitialised is (its bitmap words are then filled with
    /// garbage, to show that nothing reads them), the counts not valid.
    pub fn write_fresh_bitmap(media: &dyn Media, g: &Geometry) -> Result<(), DeviceError> {
        let words = g.bitmap_blocks * BLOCK_SIZE / 8;
        let mut bytes = Vec::with_capacity((words * 8) as usize);
        for wi in 0..words {
            let region = wi * 64 / REGION_BLOCKS;
            let w = if g.summary_blocks > 0 && g.region_is_lazy(region) {
                0x5a5a_5a5a_5a5a_5a5a
            } else {
                !huge::valid_mask(wi, g.meta_end, g.block_count)
            };
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        media.write(g.bitmap_offset(), &bytes)?;
        media.flush(g.bitmap_offset(), bytes.len() as u64)?;
        media.fence();
        if g.summary_blocks > 0 {
            let entries: Vec<RegionEntry> = (0..g.region_count())
                .map(|r| {
                    if g.region_is_lazy(r) {
                        RegionEntry::fresh_uninit()
                    } else {
                        let d = space::region_blocks(g, r);
                        let meta = g.meta_end.saturating_sub(r * REGION_BLOCKS).min(d);
                        RegionEntry {
                            uninit: false,
                            free: (d - meta) as u32,
                        }
                    }
                })
                .collect();
            space::write_summary(media, g, &entries, false)?;
        }
        Ok(())
    }

    /// A fresh test file system of `size` bytes (64 MiB is the usual).
    pub fn fresh(size: u64) -> Result<TestFs, AllocError> {
        let g =
            Geometry::for_device_size(size).map_err(|e| AllocError::Corrupted(e.to_string()))?;
        let dev = Arc::new(RecordingDevice::new(size));
        format_slots(dev.as_ref(), &g)?;
        write_fresh_bitmap(dev.as_ref(), &g)?;
        let media: Arc<dyn Media> = dev.clone();
        let (journal, _) = Journal::open(media, g)?;
        Ok(TestFs {
            dev,
            geometry: g,
            journal,
        })
    }
}
