//! The references the kernel holds on inodes: lookup counts (until FORGET) and opens.
//!
//! Lookup counts are kept per inode-table chunk. A chunk starts sparse: a small sorted list
//! of (slot, count), 8 bytes per inode the kernel knows, so a few lookups spread over many
//! chunks (`ls` of a directory whose entries were created among millions of other files)
//! cost bytes, not a 32 KiB array per chunk. Past [`SPARSE_MAX`] entries the chunk gets an
//! array of 32-bit counters (4 bytes per slot, 4 MiB for a million inodes), updated without
//! a lock. Opens are few and sit in a small map.

use super::Refs;
use crate::format::INODES_PER_CHUNK;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Inodes of one chunk kept in its sparse list before it gets an array: at this size the
/// list takes a quarter of the array's 32 KiB.
const SPARSE_MAX: usize = 1024;

/// The lookup counts of one chunk.
#[derive(Debug, Default)]
struct Page {
    /// Set once the chunk has had more than [`SPARSE_MAX`] inodes known at once; from then
    /// on every count lives here and `sparse` is empty.
    dense: OnceLock<Box<[AtomicU32]>>,
    /// (slot, count) sorted by slot, counts never 0. Changes, and the move to `dense`, are
    /// made under this lock, and a thread that took it checks `dense` again: a count is
    /// never in both places.
    sparse: Mutex<Vec<(u16, u32)>>,
}

impl Page {
    /// Adds `delta` (which may be negative; counts stop at 0) to the count of `slot` and
    /// returns the new count.
    fn add(&self, slot: usize, delta: i64) -> u32 {
        let apply = |v: u32| {
            u32::try_from((i64::from(v) + delta).clamp(0, i64::from(u32::MAX))).unwrap_or(0)
        };
        let on_dense = |d: &[AtomicU32]| {
            let prev = d[slot]
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(apply(v)))
                .unwrap_or(0);
            apply(prev)
        };
        if let Some(d) = self.dense.get() {
            return on_dense(d);
        }
        let mut sparse = self.sparse.lock();
        if let Some(d) = self.dense.get() {
            return on_dense(d);
        }
        let key = slot as u16;
        match sparse.binary_search_by_key(&key, |e| e.0) {
            Ok(at) => {
                let v = apply(sparse[at].1);
                if v == 0 {
                    sparse.remove(at);
                } else {
                    sparse[at].1 = v;
                }
                v
            }
            Err(at) => {
                let v = apply(0);
                if v == 0 {
                    return 0;
                }
                if sparse.len() < SPARSE_MAX {
                    sparse.insert(at, (key, v));
                    return v;
                }
                let d: Box<[AtomicU32]> =
                    (0..INODES_PER_CHUNK).map(|_| AtomicU32::new(0)).collect();
                for &(k, c) in sparse.iter() {
                    d[usize::from(k)].store(c, Ordering::Relaxed);
                }
                d[slot].store(v, Ordering::Relaxed);
                sparse.clear();
                sparse.shrink_to_fit();
                // Published under the lock: no sparse change can be under way.
                let _ = self.dense.set(d);
                v
            }
        }
    }

    fn get(&self, slot: usize) -> u32 {
        if let Some(d) = self.dense.get() {
            return d[slot].load(Ordering::Acquire);
        }
        let sparse = self.sparse.lock();
        if let Some(d) = self.dense.get() {
            return d[slot].load(Ordering::Acquire);
        }
        sparse
            .binary_search_by_key(&(slot as u16), |e| e.0)
            .map_or(0, |at| sparse[at].1)
    }
}

#[derive(Debug, Default)]
pub(super) struct RefTable {
    lookups: RwLock<Vec<Option<Box<Page>>>>,
    opens: Mutex<HashMap<u64, u64>>,
}

fn split(ino: u64) -> (usize, usize) {
    (
        (ino / INODES_PER_CHUNK) as usize,
        (ino % INODES_PER_CHUNK) as usize,
    )
}

impl RefTable {
    fn with_page<R>(&self, ino: u64, f: impl FnOnce(&Page, usize) -> R) -> Option<R> {
        let (page, slot) = split(ino);
        let pages = self.lookups.read();
        pages.get(page)?.as_ref().map(|p| f(p, slot))
    }

    pub(super) fn add_lookup(&self, ino: u64) {
        if self.with_page(ino, |p, slot| p.add(slot, 1)).is_some() {
            return;
        }
        let (page, slot) = split(ino);
        let mut pages = self.lookups.write();
        if pages.len() <= page {
            pages.resize_with(page + 1, || None);
        }
        pages[page].get_or_insert_with(Box::default).add(slot, 1);
    }

    /// Drops `n` lookups; true when nothing references the inode any more.
    pub(super) fn forget(&self, ino: u64, n: u64) -> bool {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        let left = self.with_page(ino, |p, slot| p.add(slot, -n));
        left == Some(0) && !self.opens.lock().contains_key(&ino)
    }

    pub(super) fn open(&self, ino: u64) {
        *self.opens.lock().entry(ino).or_default() += 1;
    }

    /// Drops an open; true when it was the last open.
    pub(super) fn release(&self, ino: u64) -> bool {
        let mut opens = self.opens.lock();
        match opens.get_mut(&ino) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                opens.remove(&ino);
                true
            }
        }
    }

    pub(super) fn held(&self, ino: u64) -> Refs {
        Refs {
            lookups: u64::from(self.with_page(ino, |p, slot| p.get(slot)).unwrap_or(0)),
            opens: self.opens.lock().get(&ino).copied().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts survive the move from the sparse list to the array, forgets drop them to 0
    /// (never below), and a chunk with few inodes known stays sparse.
    #[test]
    fn counts_across_the_move_to_an_array() {
        let t = RefTable::default();
        let chunk = 3 * INODES_PER_CHUNK;
        let known = SPARSE_MAX as u64 + 10;
        for s in 0..known {
            for _ in 0..=(s % 3) {
                t.add_lookup(chunk + s * 7 % INODES_PER_CHUNK);
            }
        }
        // One lookup in another chunk: a list of one entry, no array.
        t.add_lookup(5);
        let pages = t.lookups.read();
        assert!(pages[3].as_ref().unwrap().dense.get().is_some());
        assert!(pages[0].as_ref().unwrap().dense.get().is_none());
        drop(pages);
        for s in 0..known {
            let ino = chunk + s * 7 % INODES_PER_CHUNK;
            assert_eq!(t.held(ino).lookups, s % 3 + 1, "slot {s}");
        }
        assert_eq!(t.held(5).lookups, 1);
        assert_eq!(t.held(6).lookups, 0);
        assert!(!t.forget(chunk, 0), "a forget of nothing leaves the count");
        assert!(t.forget(chunk, 5), "a forget of more than held leaves 0");
        assert_eq!(t.held(chunk).lookups, 0);
        assert!(t.forget(5, 1));
        assert_eq!(t.lookups.read()[0].as_ref().unwrap().sparse.lock().len(), 0);
        t.open(5);
        t.add_lookup(5);
        assert!(!t.forget(5, 1), "still open");
    }

    /// Threads looking up and forgetting in one chunk while it moves to an array lose no
    /// count.
    #[test]
    fn concurrent_lookups_lose_nothing() {
        let t = std::sync::Arc::new(RefTable::default());
        let threads: Vec<_> = (0..4u64)
            .map(|k| {
                let t = std::sync::Arc::clone(&t);
                std::thread::spawn(move || {
                    for s in 0..2000u64 {
                        let ino = (s * 4 + k) % INODES_PER_CHUNK;
                        t.add_lookup(ino);
                        t.add_lookup(ino);
                        t.forget(ino, 1);
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        for ino in 0..8000u64 {
            assert_eq!(t.held(ino).lookups, 1, "inode {ino}");
        }
    }
}
