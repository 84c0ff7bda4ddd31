//! The huge-page-aware index (WineFS-like), the default policy.
//!
//! Free space is kept in two kinds of places:
//! - the **pool**: a bit set over 2 MiB chunks, one bit per chunk whose 512 blocks are all
//!   free. Large requests take contiguous runs of pool chunks (first fit from low addresses);
//!   small requests split one pool chunk at a time, taken from the high end, so that runs of
//!   whole chunks stay long.
//! - **arenas**: the small chunks. A chunk becomes small when it is first split (or at open,
//!   when it is partly used); each small chunk is owned by exactly one arena, which keeps its
//!   512-bit free map. Threads pick their arena by a thread-local number, so small
//!   allocations from different threads take different locks. A small chunk whose blocks are
//!   all free again goes back to the pool.
//!
//! - **1 GiB regions** (what one PUD entry maps): the pool counts its chunks per region, and
//!   keeps whole regions (all 512 chunks in the pool) whole as long as it can: small
//!   requests split a chunk of a region that is already broken, large requests take runs
//!   inside broken regions first, and only requests for whole regions
//!   ([`HugeIndex::take_regions`]) or a pool with nothing else left break a whole one.
//!
//! Which structure holds a chunk is recorded in `owner[chunk]`: [`POOL`], [`NONE`] (every
//! block allocated, no structure holds it: it was taken whole, or was full at open) or an
//! arena number. Invariants (checked by [`HugeIndex::snapshot`]):
//! - `owner[c] == POOL` ⇔ bit `c` of the pool is set ⇔ the chunk is whole, inside the data
//!   area, and all its blocks are free.
//! - `owner[c] == k` ⇔ arena `k` holds `c`; its map has a set bit exactly for each free
//!   block, never for a block below `meta_end` or at/after `block_count`; it has 0..512
//!   free blocks (512 only transiently, under the arena lock).
//! - `owner[c] == NONE` ⇔ no structure holds `c` and all its blocks are allocated.
//! - `free_blocks` = pool chunks × 512 + free blocks of every arena whenever no operation
//!   is running; while one runs it may be higher, never lower (blocks are counted before
//!   they become visible and uncounted after they are taken), so it never wraps.
//!
//! Locking: `owner[c]` changes away from `POOL` only under the pool lock, away from arena
//! `k` only under arena `k`'s lock (and the pool lock, when it goes to the pool), and away
//! from `NONE` by a compare-exchange made while holding the lock of the destination. A reader
//! loads `owner[c]`, locks what it names, and re-checks. Lock order: at most one arena, then
//! the pool; the consistency snapshot takes every arena in ascending order, then the pool.

use super::bits;
use super::{BlockRange, REGION_CHUNKS};
use crate::device::DeviceError;
use crate::format::CHUNK_BLOCKS;
use parking_lot::{Mutex, MutexGuard};
use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// `owner` value: the chunk is whole and free, in the pool.
const POOL: u32 = u32::MAX;
/// `owner` value: the chunk is fully allocated and held by no structure.
const NONE: u32 = u32::MAX - 1;
/// Words of a chunk's free map.
const CHUNK_WORDS: usize = (CHUNK_BLOCKS / 64) as usize;

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// A number per thread, handed out in order of first use: the thread's arena is this
    /// number modulo the arena count, so up to that many threads never share an arena.
    static THREAD_NO: usize = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
}

/// A chunk set aside for small allocations.
#[derive(Clone, Debug)]
struct SmallChunk {
    /// Set bit = free block.
    map: [u64; CHUNK_WORDS],
    /// Number of set bits of `map`.
    free: u32,
    /// Longest run of set bits of `map` (lets searches skip chunks cheaply).
    max_run: u32,
}

impl SmallChunk {
    fn from_map(map: [u64; CHUNK_WORDS]) -> Self {
        let mut c = Self {
            map,
            free: 0,
            max_run: 0,
        };
        c.refresh();
        c
    }

    fn refresh(&mut self) {
        self.free = self.map.iter().map(|w| w.count_ones()).sum();
        self.max_run = bits::longest_run(&self.map, 0, CHUNK_BLOCKS) as u32;
    }

    fn take(&mut self, off: u64, len: u64) {
        debug_assert!(bits::all_set(&self.map, off, len));
        bits::clear_range(&mut self.map, off, len);
        self.refresh();
    }

    fn give(&mut self, off: u64, len: u64) {
        bits::set_range(&mut self.map, off, len);
        self.refresh();
    }
}

/// One shard of the small-block space.
#[derive(Debug, Default)]
struct Arena {
    chunks: HashMap<u64, SmallChunk>,
    /// Chunks of `chunks` with at least one free block, in address order.
    avail: BTreeSet<u64>,
}

impl Arena {
    fn insert(&mut self, c: u64, chunk: SmallChunk) {
        if chunk.free > 0 {
            self.avail.insert(c);
        }
        self.chunks.insert(c, chunk);
    }

    fn sync_avail(&mut self, c: u64) {
        match self.chunks.get(&c) {
            Some(ch) if ch.free > 0 => {
                self.avail.insert(c);
            }
            _ => {
                self.avail.remove(&c);
            }
        }
    }

    /// Takes `len` blocks at offset `off` of chunk `c` (they must be free).
    fn take_in(&mut self, c: u64, off: u64, len: u64) {
        if let Some(ch) = self.chunks.get_mut(&c) {
            ch.take(off, len);
        }
        self.sync_avail(c);
    }

    /// Takes the first run of `n` free blocks (lowest chunk first); returns its first block.
    fn take_fit(&mut self, n: u64) -> Option<u64> {
        let (c, off) = self.avail.iter().find_map(|&c| {
            let ch = self.chunks.get(&c)?;
            if u64::from(ch.max_run) < n {
                return None;
            }
            let (off, _) = bits::find_run(&ch.map, 0, CHUNK_BLOCKS, n, n)?;
            Some((c, off))
        })?;
        self.take_in(c, off, n);
        Some(c * CHUNK_BLOCKS + off)
    }

    /// The longest free run of the arena: (chunk, offset, length).
    fn best(&self) -> Option<(u64, u64, u64)> {
        let (c, ch) = self
            .avail
            .iter()
            .filter_map(|c| self.chunks.get(c).map(|ch| (*c, ch)))
            .max_by_key(|(c, ch)| (ch.max_run, std::cmp::Reverse(*c)))?;
        let run = u64::from(ch.max_run);
        let (off, len) = bits::find_run(&ch.map, 0, CHUNK_BLOCKS, run, run)?;
        Some((c, off, len))
    }
}

/// The whole free chunks.
///
/// Invariant: `region_free[g]` is the number of pool chunks in 1 GiB region `g` (chunks
/// `g * REGION_CHUNKS..`); `broken` holds exactly the regions with some but not all of their
/// chunks in the pool (a trailing partial region is never whole); `whole` counts the regions
/// with all of them.
#[derive(Debug)]
struct Pool {
    /// Set bit = chunk in the pool.
    map: Vec<u64>,
    /// Number of set bits.
    count: u64,
    /// Whole chunks on the device (a trailing partial chunk is never in the pool).
    chunks: u64,
    /// No chunk below `low` is in the pool.
    low: u64,
    /// No chunk at or above `high` is in the pool.
    high: u64,
    /// Pool chunks of each 1 GiB region.
    region_free: Vec<u32>,
    /// Regions partly in the pool, in address order: where medium and small requests go.
    broken: BTreeSet<u64>,
    /// Regions entirely in the pool.
    whole: u64,
    /// Regions from this one on are reserved for 1 GiB extents (mkfs `--huge-regions`):
    /// requests for less than a region use them only when the rest of the pool cannot serve
    /// the request. `region_free.len()` when nothing is reserved.
    reserved_from: u64,
    /// Regions a sequentially growing file is filling from their start (at most
    /// [`MAX_STREAMS`], oldest first): other requests leave them alone while other space
    /// exists, so the file's next chunks stay free right after its end. In memory only: a
    /// region leaves the list when it is full, entirely free again, or pushed out by newer
    /// streams.
    streams: std::collections::VecDeque<u64>,
}

/// Regions filled by growing files that the pool steers other requests around.
const MAX_STREAMS: usize = 8;

impl Pool {
    fn new(chunks: u64) -> Self {
        Self {
            map: vec![0; chunks.div_ceil(64) as usize],
            count: 0,
            chunks,
            low: chunks,
            high: 0,
            region_free: vec![0; chunks.div_ceil(REGION_CHUNKS) as usize],
            broken: BTreeSet::new(),
            whole: 0,
            reserved_from: chunks.div_ceil(REGION_CHUNKS),
            streams: std::collections::VecDeque::new(),
        }
    }

    /// Whole regions of the device (a trailing partial one is not a region).
    fn region_count(&self) -> u64 {
        self.chunks / REGION_CHUNKS
    }

    fn is_stream(&self, g: u64) -> bool {
        self.streams.contains(&g)
    }

    fn is_reserved(&self, g: u64) -> bool {
        g >= self.reserved_from && g < self.region_count()
    }

    /// Chunk ranges in the order requests for less than a region use them: the unreserved
    /// regions, the trailing partial region (never a 1 GiB region), then the reserved
    /// regions (the last of the three).
    fn classes(&self) -> [(u64, u64); 3] {
        let regions_end = self.region_count() * REGION_CHUNKS;
        let split = (self.reserved_from * REGION_CHUNKS).min(regions_end);
        [(0, split), (regions_end, self.chunks), (split, regions_end)]
    }

    fn contains(&self, c: u64) -> bool {
        bits::get(&self.map, c)
    }

    /// Records that `len` chunks from `c` (all in one region) entered (`added`) or left the
    /// pool.
    fn count_region(&mut self, c: u64, len: u64, added: bool) {
        let g = c / REGION_CHUNKS;
        let Some(free) = self.region_free.get_mut(g as usize) else {
            return;
        };
        let was_whole = u64::from(*free) == REGION_CHUNKS;
        if added {
            *free += len as u32;
        } else {
            *free -= len as u32;
        }
        let now = u64::from(*free);
        if now == 0 || now == REGION_CHUNKS {
            self.broken.remove(&g);
            self.streams.retain(|&s| s != g);
        } else {
            self.broken.insert(g);
        }
        match (was_whole, now == REGION_CHUNKS) {
            (false, true) => self.whole += 1,
            (true, false) => self.whole -= 1,
            _ => {}
        }
    }

    /// Clears the pool bits of `c..c + len` (all set) and counts them out.
    fn clear_run(&mut self, c: u64, len: u64) {
        bits::clear_range(&mut self.map, c, len);
        self.count -= len;
        let mut pos = c;
        while pos < c + len {
            let region_end = (pos / REGION_CHUNKS + 1) * REGION_CHUNKS;
            let n = region_end.min(c + len) - pos;
            self.count_region(pos, n, false);
            pos += n;
        }
    }

    fn is_whole_region(&self, g: u64) -> bool {
        self.region_free
            .get(g as usize)
            .is_some_and(|&f| u64::from(f) == REGION_CHUNKS)
    }

    /// Puts every chunk of region `g` (all whole data chunks, none in the pool yet) in the
    /// pool in one step.
    fn insert_region(&mut self, g: u64) {
        let first = g * REGION_CHUNKS;
        if first + REGION_CHUNKS > self.chunks || bits::any_set(&self.map, first, REGION_CHUNKS) {
            return;
        }
        bits::set_range(&mut self.map, first, REGION_CHUNKS);
        self.count += REGION_CHUNKS;
        self.low = self.low.min(first);
        self.high = self.high.max(first + REGION_CHUNKS);
        self.count_region(first, REGION_CHUNKS, true);
    }

    fn insert(&mut self, c: u64) {
        if c < self.chunks && !self.contains(c) {
            bits::set_range(&mut self.map, c, 1);
            self.count += 1;
            self.low = self.low.min(c);
            self.high = self.high.max(c + 1);
            self.count_region(c, 1, true);
        }
    }

    fn remove(&mut self, c: u64) -> bool {
        if !self.contains(c) {
            return false;
        }
        self.clear_run(c, 1);
        true
    }

    /// First run of `want` chunks, else the longest run of at least `min`: (first, length
    /// taken). Removes them. The unreserved part of the device comes first, the reserved
    /// regions only when it has no run of `min`; inside each, runs in broken regions come
    /// first (the first of `want`, else the longest of at least `min` there), then runs from
    /// the first whole region on, then any run (one in a growing file's region, or one across
    /// region boundaries). So whole 1 GiB regions stay whole, and growing files find their
    /// next chunks free, while other space can serve the request.
    /// Only with `use_reserved` are the reserved regions used at all.
    /// With `within`, only chunks `within.0..within.1` are considered (the member of a
    /// file system over several devices that the request prefers).
    fn take_run(
        &mut self,
        want: u64,
        min: u64,
        use_reserved: bool,
        within: Option<(u64, u64)>,
    ) -> Option<(u64, u64)> {
        self.low = bits::next_set(&self.map, self.low, self.chunks).unwrap_or(self.chunks);
        let classes = self.classes();
        let classes = if use_reserved {
            &classes[..]
        } else {
            &classes[..2]
        };
        let (lo, hi) = within.unwrap_or((0, self.chunks));
        let (c, len) = classes.iter().find_map(|&(from, to)| {
            self.find_run_in(from.max(self.low).max(lo), to.min(hi), want, min)
        })?;
        let len = len.min(want);
        self.clear_run(c, len);
        Some((c, len))
    }

    /// See [`Pool::take_run`]: the run it takes among chunks `from..to`, not removed.
    fn find_run_in(&self, from: u64, to: u64, want: u64, min: u64) -> Option<(u64, u64)> {
        if from >= to {
            return None;
        }
        let mut best: Option<(u64, u64)> = None;
        for &g in self
            .broken
            .range(from / REGION_CHUNKS..to.div_ceil(REGION_CHUNKS))
        {
            if self.is_stream(g) {
                continue;
            }
            let r_from = (g * REGION_CHUNKS).max(from);
            let r_to = ((g + 1) * REGION_CHUNKS).min(to);
            if let Some((c, len)) = bits::find_run(&self.map, r_from, r_to, want, min) {
                if best.is_none_or(|(_, l)| len > l) {
                    best = Some((c, len));
                }
                if len >= want {
                    break;
                }
            }
        }
        if best.is_some() {
            return best;
        }
        let first_whole = (from.div_ceil(REGION_CHUNKS)..to / REGION_CHUNKS)
            .find(|&g| self.is_whole_region(g))
            .and_then(|g| bits::find_run(&self.map, g * REGION_CHUNKS, to, want, min));
        first_whole.or_else(|| bits::find_run(&self.map, from, to, want, min))
    }

    /// The first whole region, reserved ones first (they exist for 1 GiB extents).
    fn first_whole_region(&self) -> Option<u64> {
        if self.whole == 0 {
            return None;
        }
        (self.reserved_from..self.region_count())
            .chain(self.low / REGION_CHUNKS..self.reserved_from.min(self.region_count()))
            .find(|&g| self.is_whole_region(g))
    }

    /// The first run of up to `want` whole 1 GiB regions (reserved ones first, then the
    /// lowest address): (first chunk, chunks taken). Removes them.
    fn take_regions(&mut self, want: u64) -> Option<(u64, u64)> {
        if want == 0 {
            return None;
        }
        let first = self.first_whole_region()?;
        let mut n = 1;
        while n < want && self.is_whole_region(first + n) {
            n += 1;
        }
        let (c, len) = (first * REGION_CHUNKS, n * REGION_CHUNKS);
        self.clear_run(c, len);
        Some((c, len))
    }

    /// The first `chunks` chunks (at most a region) of a whole region, chosen as
    /// [`Pool::take_regions`] does, for a file that grows sequentially: the region becomes
    /// a stream region, filled from its start as the file grows. Removes them.
    fn take_stream_start(&mut self, chunks: u64) -> Option<u64> {
        if chunks == 0 || chunks > REGION_CHUNKS {
            return None;
        }
        let g = self.first_whole_region()?;
        let c = g * REGION_CHUNKS;
        self.clear_run(c, chunks);
        if chunks < REGION_CHUNKS {
            if self.streams.len() >= MAX_STREAMS {
                self.streams.pop_front();
            }
            self.streams.push_back(g);
        }
        Some(c)
    }

    /// A chunk to split for small requests, removed: in the unreserved part of the device,
    /// the highest chunk of a broken region, else the highest chunk outside growing files'
    /// regions, else the highest chunk; then the same in the reserved regions, only with
    /// `use_reserved` (the caller found no other free space).
    fn take_last(&mut self, use_reserved: bool) -> Option<u64> {
        let classes = self.classes();
        let classes = if use_reserved {
            &classes[..]
        } else {
            &classes[..2]
        };
        let found = classes
            .iter()
            .find_map(|&(from, to)| self.last_in(from, to));
        let c = found?;
        self.remove(c);
        Some(c)
    }

    /// See [`Pool::take_last`]: its choice among chunks `from..to`, not removed.
    fn last_in(&self, from: u64, to: u64) -> Option<u64> {
        let to = to.min(self.high);
        if from >= to {
            return None;
        }
        let in_range = |c: &u64| *c >= from;
        let in_broken = self
            .broken
            .range(from / REGION_CHUNKS..to.div_ceil(REGION_CHUNKS))
            .rev()
            .filter(|&&g| !self.is_stream(g))
            .find_map(|&g| {
                let end = ((g + 1) * REGION_CHUNKS).min(to);
                bits::prev_set(&self.map, end).filter(|&c| c >= (g * REGION_CHUNKS).max(from))
            });
        if in_broken.is_some() {
            return in_broken;
        }
        // Skip the growing files' regions (at most MAX_STREAMS of them) from the top.
        let mut end = to;
        while let Some(c) = bits::prev_set(&self.map, end).filter(in_range) {
            let g = c / REGION_CHUNKS;
            if !self.is_stream(g) {
                return Some(c);
            }
            end = g * REGION_CHUNKS;
        }
        bits::prev_set(&self.map, to).filter(in_range)
    }
}

/// Cache-line padding, so that arenas' locks do not share a line.
#[derive(Debug)]
#[repr(align(128))]
struct Padded<T>(T);

/// Who holds the chunks of one 1 GiB region. The per-chunk words exist only once the
/// region is loaded or touched: a region that was entirely free or entirely used at open
/// costs no memory until an allocation or a free reaches it, so the index of a large,
/// mostly empty device stays small. Until then every chunk of the region is `default`.
#[derive(Debug)]
struct RegionOwners {
    default: u32,
    chunks: OnceLock<Box<[AtomicU32]>>,
}

/// The huge-page-aware in-memory index of free blocks.
#[derive(Debug)]
pub(super) struct HugeIndex {
    block_count: u64,
    meta_end: u64,
    /// Chunks on the device, a trailing partial one included.
    n_chunks: u64,
    /// Who holds each chunk, per region (see the module doc and [`RegionOwners`]).
    owners: Box<[RegionOwners]>,
    pool: Mutex<Pool>,
    arenas: Box<[Padded<Mutex<Arena>>]>,
    free_blocks: AtomicU64,
    /// Arena that the next partly used chunk found at open goes to (round robin).
    next_arena: usize,
}

impl HugeIndex {
    /// An index in which nothing is free yet: the caller then declares each region entirely
    /// free ([`Self::add_free_region`]), loads it from its bitmap words
    /// ([`Self::load_region`]), or leaves it entirely used. Regions must be given in
    /// ascending order (partly used chunks go to the arenas round robin, in address order).
    pub(super) fn new(block_count: u64, meta_end: u64, arenas: usize) -> Self {
        let n_chunks = block_count.div_ceil(CHUNK_BLOCKS);
        let arenas = arenas.clamp(1, NONE as usize - 1);
        let owners = (0..n_chunks.div_ceil(REGION_CHUNKS))
            .map(|_| RegionOwners {
                default: NONE,
                chunks: OnceLock::new(),
            })
            .collect();
        Self {
            block_count,
            meta_end,
            n_chunks,
            owners,
            pool: Mutex::new(Pool::new(block_count / CHUNK_BLOCKS)),
            arenas: (0..arenas)
                .map(|_| Padded(Mutex::new(Arena::default())))
                .collect(),
            free_blocks: AtomicU64::new(0),
            next_arena: 0,
        }
    }

    /// The index of a whole-device bitmap `persistent` (set bit = allocated), every region
    /// loaded from it.
    #[cfg(test)]
    pub(super) fn build(
        persistent: &[u64],
        block_count: u64,
        meta_end: u64,
        arenas: usize,
    ) -> Self {
        let mut h = Self::new(block_count, meta_end, arenas);
        let words = (REGION_CHUNKS * CHUNK_BLOCKS / 64) as usize;
        for g in 0..h.owners.len() {
            let from = (g * words).min(persistent.len());
            let to = (from + words).min(persistent.len());
            h.load_region(g as u64, persistent.get(from..to).unwrap_or(&[]));
        }
        h
    }

    /// Chunks of region `g`.
    fn region_chunks(&self, g: u64) -> std::ops::Range<u64> {
        let first = g * REGION_CHUNKS;
        first.min(self.n_chunks)..(first + REGION_CHUNKS).min(self.n_chunks)
    }

    /// Declares region `g` entirely free: all its chunks whole and in the pool, without
    /// per-chunk state. Only for a region of whole data chunks (`Geometry::region_is_lazy`).
    pub(super) fn add_free_region(&mut self, g: u64) {
        let chunks = self.region_chunks(g);
        let whole_data = chunks.start * CHUNK_BLOCKS >= self.meta_end
            && chunks.end * CHUNK_BLOCKS <= self.block_count
            && chunks.end - chunks.start == REGION_CHUNKS;
        let Some(region) = self.owners.get_mut(g as usize) else {
            return;
        };
        if !whole_data || region.chunks.get().is_some() {
            debug_assert!(false, "region {g} cannot be declared free");
            return;
        }
        region.default = POOL;
        self.pool.get_mut().insert_region(g);
        *self.free_blocks.get_mut() += REGION_CHUNKS * CHUNK_BLOCKS;
    }

    /// Loads region `g` from its bitmap words `persistent` (set bit = allocated; words past
    /// its end count as allocated). Blocks below `meta_end` and at or past `block_count` are
    /// allocated whatever the bitmap says.
    pub(super) fn load_region(&mut self, g: u64, persistent: &[u64]) {
        let chunks = self.region_chunks(g);
        let arenas = self.arenas.len();
        let mut owner = Vec::with_capacity((chunks.end - chunks.start) as usize);
        let mut free = 0u64;
        for c in chunks.clone() {
            let mut map = [0u64; CHUNK_WORDS];
            let base = c as usize * CHUNK_WORDS;
            let base_in_region = (c - chunks.start) as usize * CHUNK_WORDS;
            for (i, m) in map.iter_mut().enumerate() {
                let wi = (base + i) as u64;
                let p = persistent
                    .get(base_in_region + i)
                    .copied()
                    .unwrap_or(u64::MAX);
                *m = !p & valid_mask(wi, self.meta_end, self.block_count);
            }
            if map.iter().all(|&w| w == u64::MAX) {
                self.pool.get_mut().insert(c);
                owner.push(AtomicU32::new(POOL));
                free += CHUNK_BLOCKS;
            } else if map.iter().all(|&w| w == 0) {
                owner.push(AtomicU32::new(NONE));
            } else {
                let chunk = SmallChunk::from_map(map);
                free += u64::from(chunk.free);
                let k = self.next_arena % arenas;
                self.next_arena += 1;
                if let Some(a) = self.arenas.get_mut(k) {
                    a.0.get_mut().insert(c, chunk);
                }
                owner.push(AtomicU32::new(k as u32));
            }
        }
        if let Some(region) = self.owners.get_mut(g as usize) {
            region.chunks = OnceLock::from(owner.into_boxed_slice());
        }
        *self.free_blocks.get_mut() += free;
    }

    /// The owner word of chunk `c`, created (for its whole region, from the region's
    /// default) on first use.
    fn owner(&self, c: u64) -> Option<&AtomicU32> {
        let g = c / REGION_CHUNKS;
        let region = self.owners.get(g as usize)?;
        let words = region.chunks.get_or_init(|| {
            let chunks = self.region_chunks(g);
            (chunks.start..chunks.end)
                .map(|_| AtomicU32::new(region.default))
                .collect()
        });
        words.get((c % REGION_CHUNKS) as usize)
    }

    /// The owner of chunk `c` at the moment of the call, without creating its region's
    /// words (a region without them is still all `default`: only a change creates them).
    fn owner_value(&self, c: u64) -> Option<u32> {
        let region = self.owners.get((c / REGION_CHUNKS) as usize)?;
        match region.chunks.get() {
            Some(words) => words
                .get((c % REGION_CHUNKS) as usize)
                .map(|o| o.load(Ordering::Acquire)),
            None => (c < self.n_chunks).then_some(region.default),
        }
    }

    /// Free blocks of region `g` (for the space summary). Call it only while no
    /// allocation or free is running.
    pub(super) fn region_free_blocks(&self, g: u64) -> u64 {
        let Some(region) = self.owners.get(g as usize) else {
            return 0;
        };
        if region.chunks.get().is_none() {
            return if region.default == POOL {
                REGION_CHUNKS * CHUNK_BLOCKS
            } else {
                0
            };
        }
        self.region_chunks(g)
            .map(|c| match self.owner_value(c) {
                Some(POOL) => CHUNK_BLOCKS,
                Some(NONE) | None => 0,
                Some(k) => self
                    .arena(k as usize)
                    .and_then(|a| a.chunks.get(&c).map(|ch| u64::from(ch.free)))
                    .unwrap_or(0),
            })
            .sum()
    }

    /// Runs of consecutive chunks from `from` on that are not whole and free (see
    /// [`super::BlockAllocator::used_chunk_runs`]); regions without per-chunk state are
    /// taken whole, in one step.
    pub(super) fn used_chunk_runs(&self, from: u64) -> Vec<std::ops::Range<u64>> {
        let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
        let mut push = |r: std::ops::Range<u64>| match runs.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => runs.push(r),
        };
        for (g, region) in self.owners.iter().enumerate() {
            let chunks = self.region_chunks(g as u64);
            let chunks = chunks.start.max(from)..chunks.end;
            if chunks.is_empty() {
                continue;
            }
            if region.chunks.get().is_none() {
                if region.default != POOL {
                    push(chunks);
                }
                continue;
            }
            for c in chunks.filter(|&c| self.owner_value(c) != Some(POOL)) {
                push(c..c + 1);
            }
        }
        runs
    }

    pub(super) fn free_blocks(&self) -> u64 {
        self.free_blocks.load(Ordering::Relaxed)
    }

    pub(super) fn free_chunks(&self) -> u64 {
        self.pool.lock().count
    }

    /// See [`super::BlockAllocator::trim`]: the pool lock is the one every take of a pool
    /// chunk holds (a chunk leaves the pool only under it).
    pub(super) fn trim(
        &self,
        chunks: std::ops::Range<u64>,
        min: u64,
        discard: &mut dyn FnMut(std::ops::Range<u64>) -> Result<u64, DeviceError>,
    ) -> Result<u64, DeviceError> {
        super::trim_free_chunks(
            || self.pool.lock(),
            |pool: &MutexGuard<'_, Pool>, c| c < pool.chunks && pool.contains(c),
            chunks,
            min,
            discard,
        )
    }

    /// Whole 1 GiB regions in the pool.
    pub(super) fn free_regions(&self) -> u64 {
        self.pool.lock().whole
    }

    /// Takes up to `want` whole, 1 GiB-aligned regions from the pool (the first run of them,
    /// lowest address first), or `None` when no region is whole.
    pub(super) fn take_regions(&self, want: u64) -> Option<BlockRange> {
        let mut pool = self.pool.lock();
        let (c, len) = pool.take_regions(want)?;
        Some(self.claim(pool, c, len))
    }

    /// Takes the first `chunks` chunks (at most a region) of a whole free region for a file
    /// that grows sequentially (see [`Pool::take_stream_start`]), or `None` when no region
    /// is whole.
    pub(super) fn take_stream_start(&self, chunks: u64) -> Option<BlockRange> {
        let mut pool = self.pool.lock();
        let c = pool.take_stream_start(chunks)?;
        Some(self.claim(pool, c, chunks))
    }

    /// Reserves the last `regions` whole regions of the device for 1 GiB extents (see
    /// [`Pool::reserved_from`]); more than the device has reserves all of them.
    pub(super) fn reserve_regions(&self, regions: u64) {
        let mut pool = self.pool.lock();
        pool.reserved_from = pool.region_count().saturating_sub(regions);
    }

    /// Regions reserved for 1 GiB extents.
    pub(super) fn reserved_regions(&self) -> u64 {
        let pool = self.pool.lock();
        pool.region_count().saturating_sub(pool.reserved_from)
    }

    pub(super) fn arena_count(&self) -> usize {
        self.arenas.len()
    }

    fn my_arena(&self) -> usize {
        THREAD_NO.with(|n| *n) % self.arenas.len()
    }

    fn arena(&self, k: usize) -> Option<MutexGuard<'_, Arena>> {
        self.arenas.get(k).map(|a| a.0.lock())
    }

    fn taken(&self, n: u64) {
        self.free_blocks.fetch_sub(n, Ordering::Relaxed);
    }

    fn returned(&self, n: u64) {
        self.free_blocks.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes free blocks out of the index for a request (`1 <= min <= n <= block_count`).
    /// `within`: chunks `within.0..within.1` are preferred for requests of 2 MiB and more
    /// (whole chunks from there first, then anywhere as without it); smaller requests
    /// ignore it (they are served from the thread's arena wherever its chunks are).
    pub(super) fn take(
        &self,
        n: u64,
        min: u64,
        aligned: bool,
        goal: Option<u64>,
        within: Option<(u64, u64)>,
    ) -> Option<BlockRange> {
        let large = n >= CHUNK_BLOCKS;
        if let Some(start) = goal.and_then(|g| g.checked_add(1)) {
            let whole_only = aligned && large;
            if !whole_only || start % CHUNK_BLOCKS == 0 {
                let max = if whole_only {
                    n / CHUNK_BLOCKS * CHUNK_BLOCKS
                } else {
                    n
                };
                let got = self.take_at(start, max, whole_only);
                let r = BlockRange { start, len: got };
                if got >= min {
                    return Some(r);
                }
                if got > 0 {
                    self.release(r);
                }
            }
        }
        if large {
            within
                .and_then(|w| self.take_large_from_pool(n, min, false, Some(w)))
                .or_else(|| self.take_large(n, min))
        } else {
            self.take_small(n, min)
        }
    }

    /// Takes the free blocks starting exactly at `start`, up to `max` of them; a whole pool
    /// chunk is taken only entirely (never split here), and with `whole_only` nothing else
    /// is. Returns how many it took (a contiguous run from `start`).
    fn take_at(&self, start: u64, max: u64, whole_only: bool) -> u64 {
        if start < self.meta_end || start >= self.block_count {
            return 0;
        }
        let end = start.saturating_add(max).min(self.block_count);
        let mut pos = start;
        while pos < end {
            let c = pos / CHUNK_BLOCKS;
            let cs = c * CHUNK_BLOCKS;
            let ce = (cs + CHUNK_BLOCKS).min(end);
            let Some(owner) = self.owner(c) else {
                break;
            };
            let got = loop {
                let o = owner.load(Ordering::Acquire);
                match o {
                    NONE => break 0,
                    POOL => {
                        if pos != cs || end - pos < CHUNK_BLOCKS {
                            break 0;
                        }
                        let mut pool = self.pool.lock();
                        if owner.load(Ordering::Acquire) != POOL {
                            continue;
                        }
                        // Extending in place never enters a whole region (it stays whole
                        // for 1 GiB extents) nor a reserved one from outside it.
                        let g = c / REGION_CHUNKS;
                        if c % REGION_CHUNKS == 0
                            && (pool.is_whole_region(g) || pool.is_reserved(g))
                        {
                            break 0;
                        }
                        if !pool.remove(c) {
                            log::error!("allocator: chunk {c} marked free but not in the pool");
                            break 0;
                        }
                        owner.store(NONE, Ordering::Release);
                        break CHUNK_BLOCKS;
                    }
                    k => {
                        if whole_only {
                            break 0;
                        }
                        let Some(mut a) = self.arena(k as usize) else {
                            break 0;
                        };
                        if owner.load(Ordering::Acquire) != k {
                            continue;
                        }
                        let Some(ch) = a.chunks.get(&c) else {
                            break 0;
                        };
                        let run = bits::next_clear(&ch.map, pos - cs, ce - cs) - (pos - cs);
                        if run > 0 {
                            a.take_in(c, pos - cs, run);
                        }
                        break run;
                    }
                }
            };
            self.taken(got);
            pos += got;
            if got == 0 || pos < ce {
                break;
            }
        }
        pos - start
    }

    /// Requests of 2 MiB and more: whole chunks from the unreserved pool, else the largest
    /// small runs, else whole chunks of the reserved regions.
    fn take_large(&self, n: u64, min: u64) -> Option<BlockRange> {
        self.take_large_from_pool(n, min, false, None)
            .or_else(|| self.take_best_small(n, min))
            .or_else(|| self.take_large_from_pool(n, min, true, None))
    }

    /// Whole chunks for [`HugeIndex::take_large`] (the reserved regions only with
    /// `use_reserved`).
    fn take_large_from_pool(
        &self,
        n: u64,
        min: u64,
        use_reserved: bool,
        within: Option<(u64, u64)>,
    ) -> Option<BlockRange> {
        let whole = n / CHUNK_BLOCKS;
        if min <= whole * CHUNK_BLOCKS {
            self.take_pool_run(
                whole,
                min.div_ceil(CHUNK_BLOCKS).max(1),
                use_reserved,
                within,
            )
        } else {
            let r = self.take_pool_run(
                n.div_ceil(CHUNK_BLOCKS),
                min.div_ceil(CHUNK_BLOCKS),
                use_reserved,
                within,
            )?;
            // The caller needs more than the whole chunks of its request in one piece: give
            // back the tail of the last chunk (it becomes a small chunk).
            let len = r.len.min(n);
            if r.len > len {
                self.release(BlockRange {
                    start: r.start + len,
                    len: r.len - len,
                });
            }
            Some(BlockRange {
                start: r.start,
                len,
            })
        }
    }

    fn take_pool_run(
        &self,
        want: u64,
        min: u64,
        use_reserved: bool,
        within: Option<(u64, u64)>,
    ) -> Option<BlockRange> {
        let mut pool = self.pool.lock();
        let (c, len) = pool.take_run(want, min, use_reserved, within)?;
        Some(self.claim(pool, c, len))
    }

    /// Chunks `c..c + len`, just taken out of `pool` (its lock still held): no longer the
    /// pool's once the lock drops, and counted as taken.
    fn claim(&self, pool: MutexGuard<'_, Pool>, c: u64, len: u64) -> BlockRange {
        for i in c..c + len {
            if let Some(o) = self.owner(i) {
                o.store(NONE, Ordering::Release);
            }
        }
        drop(pool);
        self.taken(len * CHUNK_BLOCKS);
        BlockRange {
            start: c * CHUNK_BLOCKS,
            len: len * CHUNK_BLOCKS,
        }
    }

    /// Requests below 2 MiB: a run of `n` in the thread's arena (its lock only: the common
    /// case), else in another arena, else a fresh chunk split off the pool into the thread's
    /// arena, else the longest run anywhere (at least `min`).
    fn take_small(&self, n: u64, min: u64) -> Option<BlockRange> {
        let k = self.my_arena();
        let fit = |start| Some(BlockRange { start, len: n });
        if let Some(start) = self.arena(k).and_then(|mut a| a.take_fit(n)) {
            self.taken(n);
            return fit(start);
        }
        // Other arenas: first those that are not busy, then (before splitting a chunk,
        // which costs a whole free chunk for good) the busy ones too.
        let count = self.arenas.len();
        let mut busy = Vec::new();
        for i in 1..count {
            let j = (k + i) % count;
            let Some(slot) = self.arenas.get(j) else {
                continue;
            };
            match slot.0.try_lock() {
                Some(mut a) => {
                    if let Some(start) = a.take_fit(n) {
                        drop(a);
                        self.taken(n);
                        return fit(start);
                    }
                }
                None => busy.push(j),
            }
        }
        for j in busy {
            if let Some(start) = self.arena(j).and_then(|mut a| a.take_fit(n)) {
                self.taken(n);
                return fit(start);
            }
        }
        if let Some(mut a) = self.arena(k) {
            if let Some(start) = a.take_fit(n) {
                self.taken(n);
                return fit(start);
            }
            if let Some(start) = self.split_for_small(&mut a, k, n, false) {
                return fit(start);
            }
        }
        // The reserved regions only when no other free space can serve the request.
        if let Some(r) = self.take_best_small(n, min) {
            return Some(r);
        }
        let mut a = self.arena(k)?;
        self.split_for_small(&mut a, k, n, true).and_then(fit)
    }

    /// Splits a pool chunk (see [`Pool::take_last`]) into arena `k` (`a`, locked) and takes
    /// its first `n` blocks: their first block.
    fn split_for_small(&self, a: &mut Arena, k: usize, n: u64, use_reserved: bool) -> Option<u64> {
        let c = {
            let mut pool = self.pool.lock();
            let c = pool.take_last(use_reserved)?;
            if let Some(o) = self.owner(c) {
                o.store(k as u32, Ordering::Release);
            }
            c
        };
        a.insert(c, SmallChunk::from_map([u64::MAX; CHUNK_WORDS]));
        a.take_in(c, 0, n);
        self.taken(n);
        Some(c * CHUNK_BLOCKS)
    }

    /// The longest free run of the small chunks, if at least `min` (capped at `n`).
    fn take_best_small(&self, n: u64, min: u64) -> Option<BlockRange> {
        for _attempt in 0..4 {
            let mut best: Option<(usize, u64)> = None;
            for (j, slot) in self.arenas.iter().enumerate() {
                let mut a = slot.0.lock();
                let Some((c, off, len)) = a.best() else {
                    continue;
                };
                if len >= n {
                    a.take_in(c, off, n);
                    drop(a);
                    self.taken(n);
                    return Some(BlockRange {
                        start: c * CHUNK_BLOCKS + off,
                        len: n,
                    });
                }
                if len >= min && best.is_none_or(|(_, l)| len > l) {
                    best = Some((j, len));
                }
            }
            let (j, _) = best?;
            let mut a = self.arena(j)?;
            if let Some((c, off, len)) = a.best().filter(|&(_, _, len)| len >= min) {
                let len = len.min(n);
                a.take_in(c, off, len);
                drop(a);
                self.taken(len);
                return Some(BlockRange {
                    start: c * CHUNK_BLOCKS + off,
                    len,
                });
            }
            // Someone took it meanwhile: look again.
        }
        None
    }

    /// Returns a range to the index (a committed free, or a rolled-back allocation). The
    /// range must be allocated in the index; blocks that are not are left alone and logged.
    pub(super) fn release(&self, r: BlockRange) {
        let end = r.start.saturating_add(r.len).min(self.block_count);
        let mut pos = r.start.max(self.meta_end);
        while pos < end {
            let c = pos / CHUNK_BLOCKS;
            let ce = ((c + 1) * CHUNK_BLOCKS).min(end);
            self.release_segment(c, pos - c * CHUNK_BLOCKS, ce - pos);
            pos = ce;
        }
    }

    fn release_segment(&self, c: u64, off: u64, len: u64) {
        let Some(owner) = self.owner(c) else {
            return;
        };
        let whole = off == 0 && len == CHUNK_BLOCKS;
        loop {
            match owner.load(Ordering::Acquire) {
                POOL => {
                    log::error!(
                        "allocator: release of free blocks {}..{} (chunk already free)",
                        c * CHUNK_BLOCKS + off,
                        c * CHUNK_BLOCKS + off + len
                    );
                    return;
                }
                NONE if whole => {
                    let mut pool = self.pool.lock();
                    if owner
                        .compare_exchange(NONE, POOL, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue;
                    }
                    // Count before the blocks can be taken again: the counter never
                    // drops below what the index holds, so it never wraps.
                    self.returned(CHUNK_BLOCKS);
                    pool.insert(c);
                    return;
                }
                NONE => {
                    let k = self.my_arena();
                    let Some(mut a) = self.arena(k) else {
                        return;
                    };
                    if owner
                        .compare_exchange(NONE, k as u32, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue;
                    }
                    a.insert(c, SmallChunk::from_map([0; CHUNK_WORDS]));
                    self.give_locked(&mut a, c, off, len);
                    return;
                }
                k => {
                    let Some(mut a) = self.arena(k as usize) else {
                        return;
                    };
                    if owner.load(Ordering::Acquire) != k {
                        continue;
                    }
                    self.give_locked(&mut a, c, off, len);
                    return;
                }
            }
        }
    }

    /// Marks blocks of a small chunk free, under its arena's lock; a chunk that becomes
    /// entirely free goes back to the pool.
    fn give_locked(&self, a: &mut Arena, c: u64, off: u64, len: u64) {
        let Some(ch) = a.chunks.get_mut(&c) else {
            log::error!("allocator: chunk {c} not found in its arena");
            return;
        };
        if !bits::all_clear(&ch.map, off, len) {
            log::error!(
                "allocator: release of free blocks in {}..{}",
                c * CHUNK_BLOCKS + off,
                c * CHUNK_BLOCKS + off + len
            );
            return;
        }
        ch.give(off, len);
        self.returned(len);
        if u64::from(ch.free) == CHUNK_BLOCKS {
            a.chunks.remove(&c);
            a.avail.remove(&c);
            let mut pool = self.pool.lock();
            if let Some(o) = self.owner(c) {
                o.store(POOL, Ordering::Release);
            }
            pool.insert(c);
        } else {
            a.sync_avail(c);
        }
    }

    /// The free map of the whole device (set bit = free; `block_count.div_ceil(64)` words),
    /// after checking the index's own invariants. Takes every lock: call it only while no
    /// allocation or free is running.
    pub(super) fn snapshot(&self) -> Result<Vec<u64>, String> {
        let arenas: Vec<_> = self.arenas.iter().map(|a| a.0.lock()).collect();
        let pool = self.pool.lock();
        let mut out = vec![0u64; self.block_count.div_ceil(64) as usize];
        let mut free = 0u64;
        let mut held = 0usize;
        for c in 0..self.n_chunks {
            let o = self.owner_value(c).unwrap_or(NONE);
            let in_pool = pool.contains(c);
            if (o == POOL) != in_pool {
                return Err(format!("chunk {c}: owner {o:#x} but in pool: {in_pool}"));
            }
            for (k, a) in arenas.iter().enumerate() {
                if a.chunks.contains_key(&c) != (o == k as u32) {
                    return Err(format!("chunk {c}: owner {o:#x}, arena {k} disagrees"));
                }
            }
            let base = c * CHUNK_BLOCKS;
            let map = match o {
                POOL => {
                    if base < self.meta_end || base + CHUNK_BLOCKS > self.block_count {
                        return Err(format!("chunk {c} in the pool is not a whole data chunk"));
                    }
                    [u64::MAX; CHUNK_WORDS]
                }
                NONE => [0; CHUNK_WORDS],
                k => {
                    let ch = arenas
                        .get(k as usize)
                        .and_then(|a| a.chunks.get(&c))
                        .ok_or_else(|| format!("chunk {c}: no arena {k}"))?;
                    let check = SmallChunk::from_map(ch.map);
                    if check.free != ch.free || check.max_run != ch.max_run {
                        return Err(format!("chunk {c}: stale free count or run length"));
                    }
                    if u64::from(ch.free) == CHUNK_BLOCKS {
                        return Err(format!("chunk {c}: entirely free but not in the pool"));
                    }
                    let in_avail = arenas.get(k as usize).is_some_and(|a| a.avail.contains(&c));
                    if in_avail != (ch.free > 0) {
                        return Err(format!("chunk {c}: avail set out of date"));
                    }
                    held += 1;
                    ch.map
                }
            };
            for (i, &w) in map.iter().enumerate() {
                let wi = base / 64 + i as u64;
                if w & !valid_mask(wi, self.meta_end, self.block_count) != 0 {
                    return Err(format!("chunk {c}: free bits outside the data area"));
                }
                if let Some(x) = out.get_mut(wi as usize) {
                    *x = w;
                }
                free += u64::from(w.count_ones());
            }
        }
        if held != arenas.iter().map(|a| a.chunks.len()).sum::<usize>() {
            return Err("an arena holds a chunk it does not own".into());
        }
        if pool.count
            != bits::runs(&pool.map, 0, pool.chunks)
                .map(|(_, l)| l)
                .sum::<u64>()
        {
            return Err("pool count out of date".into());
        }
        let mut whole = 0;
        for (g, &f) in pool.region_free.iter().enumerate() {
            let g = g as u64;
            let from = g * REGION_CHUNKS;
            let to = (from + REGION_CHUNKS).min(pool.chunks);
            let in_pool = bits::runs(&pool.map, from, to).map(|(_, l)| l).sum::<u64>();
            if u64::from(f) != in_pool {
                return Err(format!(
                    "region {g}: counted {f} pool chunks, holds {in_pool}"
                ));
            }
            let partial = in_pool > 0 && in_pool < REGION_CHUNKS;
            if pool.broken.contains(&g) != partial {
                return Err(format!("region {g}: broken set out of date"));
            }
            whole += u64::from(in_pool == REGION_CHUNKS);
        }
        if whole != pool.whole {
            return Err(format!(
                "{} whole regions counted, {whole} held",
                pool.whole
            ));
        }
        let counted = self.free_blocks();
        if free != counted {
            return Err(format!("free block counter {counted}, index holds {free}"));
        }
        Ok(out)
    }
}

/// Bits of word `wi` that are data blocks: `meta_end <= b < block_count`.
pub(super) fn valid_mask(wi: u64, meta_end: u64, block_count: u64) -> u64 {
    let lo = meta_end.max(wi * 64);
    let hi = block_count.min(wi * 64 + 64);
    if lo >= hi {
        0
    } else {
        bits::word_mask(lo - wi * 64, hi - wi * 64)
    }
}
