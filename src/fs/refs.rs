//! The references the kernel holds on inodes: lookup counts (until FORGET) and opens.
//!
//! Lookup counts live in arrays of 32-bit counters, one array per inode-table chunk,
//! allocated when the chunk's first inode is looked up: 4 bytes per inode the kernel may
//! know (4 MiB for a million), no global lock on lookup and forget. Opens are few and sit
//! in a small map.

use super::Refs;
use crate::format::INODES_PER_CHUNK;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, Default)]
pub(super) struct RefTable {
    lookups: RwLock<Vec<Option<Box<[AtomicU32]>>>>,
    opens: Mutex<HashMap<u64, u64>>,
}

fn split(ino: u64) -> (usize, usize) {
    (
        (ino / INODES_PER_CHUNK) as usize,
        (ino % INODES_PER_CHUNK) as usize,
    )
}

impl RefTable {
    fn with_counter<R>(&self, ino: u64, f: impl FnOnce(&AtomicU32) -> R) -> Option<R> {
        let (page, slot) = split(ino);
        let pages = self.lookups.read();
        pages.get(page)?.as_ref().map(|p| f(&p[slot]))
    }

    pub(super) fn add_lookup(&self, ino: u64) {
        if self
            .with_counter(ino, |c| c.fetch_add(1, Ordering::AcqRel))
            .is_some()
        {
            return;
        }
        let (page, slot) = split(ino);
        let mut pages = self.lookups.write();
        if pages.len() <= page {
            pages.resize_with(page + 1, || None);
        }
        let p = pages[page]
            .get_or_insert_with(|| (0..INODES_PER_CHUNK).map(|_| AtomicU32::new(0)).collect());
        p[slot].fetch_add(1, Ordering::AcqRel);
    }

    /// Drops `n` lookups; true when nothing references the inode any more.
    pub(super) fn forget(&self, ino: u64, n: u64) -> bool {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let left = self.with_counter(ino, |c| {
            let prev = c
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                    Some(v.saturating_sub(n))
                })
                .unwrap_or(0);
            prev.saturating_sub(n)
        });
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
            lookups: u64::from(
                self.with_counter(ino, |c| c.load(Ordering::Acquire))
                    .unwrap_or(0),
            ),
            opens: self.opens.lock().get(&ino).copied().unwrap_or(0),
        }
    }
}
