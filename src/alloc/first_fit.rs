//! The naive policy, for comparison: first fit over one in-memory copy of the bitmap,
//! ignoring 2 MiB alignment, under one lock.
//!
//! Invariant: `map` has a set bit exactly for each block that is free in the index (never a
//! block below `meta_end` or at/after `block_count`); `free_blocks` is its population count;
//! no bit below `low` is set.

use super::BlockRange;
use super::bits;
use super::huge::valid_mask;
use crate::device::DeviceError;
use crate::format::CHUNK_BLOCKS;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
struct State {
    /// Set bit = free block.
    map: Vec<u64>,
    /// No free block below `low`.
    low: u64,
}

#[derive(Debug)]
pub(super) struct FirstFitIndex {
    block_count: u64,
    meta_end: u64,
    state: Mutex<State>,
    free_blocks: AtomicU64,
}

impl FirstFitIndex {
    /// Builds the index from the persistent bitmap (set bit = allocated).
    pub(super) fn build(persistent: &[u64], block_count: u64, meta_end: u64) -> Self {
        let words = block_count.div_ceil(64) as usize;
        let map: Vec<u64> = (0..words)
            .map(|wi| {
                let p = persistent.get(wi).copied().unwrap_or(u64::MAX);
                !p & valid_mask(wi as u64, meta_end, block_count)
            })
            .collect();
        let free = map.iter().map(|w| u64::from(w.count_ones())).sum();
        Self {
            block_count,
            meta_end,
            state: Mutex::new(State { map, low: meta_end }),
            free_blocks: AtomicU64::new(free),
        }
    }

    pub(super) fn free_blocks(&self) -> u64 {
        self.free_blocks.load(Ordering::Relaxed)
    }

    /// Whole aligned chunks whose blocks are all free.
    pub(super) fn free_chunks(&self) -> u64 {
        let s = self.state.lock();
        let per = (CHUNK_BLOCKS / 64) as usize;
        let whole = (self.block_count / CHUNK_BLOCKS) as usize;
        s.map
            .chunks(per)
            .take(whole)
            .filter(|c| c.len() == per && c.iter().all(|&w| w == u64::MAX))
            .count() as u64
    }

    /// Free blocks among `start..start + len`.
    pub(super) fn free_in(&self, start: u64, len: u64) -> u64 {
        let s = self.state.lock();
        let end = start.saturating_add(len).min(self.block_count);
        bits::runs(&s.map, start, end).map(|(_, l)| l).sum()
    }

    /// Whether chunk `c` is whole and free, at the moment of the call.
    pub(super) fn chunk_is_free(&self, c: u64) -> bool {
        c < self.block_count / CHUNK_BLOCKS
            && bits::all_set(&self.state.lock().map, c * CHUNK_BLOCKS, CHUNK_BLOCKS)
    }

    /// See [`super::BlockAllocator::trim`]: under the one lock every take holds.
    pub(super) fn trim(
        &self,
        chunks: std::ops::Range<u64>,
        min: u64,
        discard: &mut dyn FnMut(std::ops::Range<u64>) -> Result<u64, DeviceError>,
    ) -> Result<u64, DeviceError> {
        let whole = self.block_count / CHUNK_BLOCKS;
        super::trim_free_chunks(
            || self.state.lock(),
            |s: &parking_lot::MutexGuard<'_, State>, c| {
                c < whole && bits::all_set(&s.map, c * CHUNK_BLOCKS, CHUNK_BLOCKS)
            },
            chunks,
            min,
            discard,
        )
    }

    /// Takes blocks for a request (`1 <= min <= n <= block_count`): the run after `goal`
    /// when at least `min` long, else the first run of `n`, else the longest of at least
    /// `min`.
    pub(super) fn take(&self, n: u64, min: u64, goal: Option<u64>) -> Option<BlockRange> {
        let mut s = self.state.lock();
        let goal = goal
            .and_then(|g| g.checked_add(1))
            .filter(|&start| start >= self.meta_end && start < self.block_count);
        if let Some(start) = goal {
            let end = start.saturating_add(n).min(self.block_count);
            let got = bits::next_clear(&s.map, start, end) - start;
            if got >= min {
                return Some(self.take_locked(&mut s, start, got));
            }
        }
        s.low = bits::next_set(&s.map, s.low, self.block_count).unwrap_or(self.block_count);
        let (start, len) = bits::find_run(&s.map, s.low, self.block_count, n, min)?;
        Some(self.take_locked(&mut s, start, len.min(n)))
    }

    fn take_locked(&self, s: &mut State, start: u64, len: u64) -> BlockRange {
        bits::clear_range(&mut s.map, start, len);
        self.free_blocks.fetch_sub(len, Ordering::Relaxed);
        BlockRange { start, len }
    }

    /// Returns a range to the index; blocks already free are left alone and logged.
    pub(super) fn release(&self, r: BlockRange) {
        let start = r.start.max(self.meta_end);
        let end = r.start.saturating_add(r.len).min(self.block_count);
        if start >= end {
            return;
        }
        let mut s = self.state.lock();
        if !bits::all_clear(&s.map, start, end - start) {
            log::error!("allocator: release of free blocks in {start}..{end}");
            return;
        }
        bits::set_range(&mut s.map, start, end - start);
        s.low = s.low.min(start);
        self.free_blocks.fetch_add(end - start, Ordering::Relaxed);
    }

    /// The free map (set bit = free), after checking the counter.
    pub(super) fn snapshot(&self) -> Result<Vec<u64>, String> {
        let s = self.state.lock();
        let free: u64 = s.map.iter().map(|w| u64::from(w.count_ones())).sum();
        if free != self.free_blocks() {
            return Err(format!(
                "free block counter {}, index holds {free}",
                self.free_blocks()
            ));
        }
        if bits::next_set(&s.map, 0, s.low).is_some() {
            return Err("first-fit low-water mark above a free block".into());
        }
        Ok(s.map.clone())
    }
}
