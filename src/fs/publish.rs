//! State published for direct-access clients (the preload library, `preload/`).
//!
//! A client that serves read(2)/write(2) of a file from a direct mapping must learn, before
//! every served call, the file's current size and whether its layout may have changed since
//! it mapped the extents. The daemon publishes both, per inode with a published lease, in
//! the shared state table of `crate::device::dax::StateTable` (a seqlock per slot):
//!
//! - [`Fs::lock_all`] (every operation that changes an inode write-locks its stripe through
//!   it) makes the slot of each locked inode that has one odd *before* the operation
//!   changes anything, and the dropped [`StripeGuards`] publish the inode's size (read back
//!   from the inode table) with a new generation *before* the locks drop, so before the
//!   operation's reply. A client whose copy saw the same even sequence before and after
//!   therefore raced no change at all.
//! - Every write-locked operation counts as a change (the generation moves even when
//!   nothing did): over-reporting costs a client a refresh, under-reporting would cost
//!   correctness.
//! - Slots are handed out when an inode's first published lease is taken and returned
//!   when its last one ends; the table's mutex is a leaf lock (taken under stripes, never
//!   held while taking another lock; the lease table's lock may be held around it).

use super::Fs;
use super::txn::StripeGuards;
use crate::device::dax::{PublishedState, STATE_SLOTS, StateTable};
use crate::error::{Error, Result};
use crate::format::MAX_FILE_BLOCKS;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where the table lives and who may read it; set by the daemon before the session.
#[derive(Debug)]
struct Config {
    path: PathBuf,
    like: Option<std::fs::Metadata>,
}

#[derive(Debug)]
struct Table {
    state: StateTable,
    /// Inode -> (slot, published leases on it).
    by_ino: HashMap<u64, (u32, u32)>,
    free: Vec<u32>,
}

/// The daemon's side of the state table.
#[derive(Debug, Default)]
pub(super) struct Publisher {
    config: Mutex<Option<Config>>,
    table: Mutex<Option<Table>>,
    /// Inodes with a slot: 0 lets [`Publisher::begin`] return at once.
    active: AtomicUsize,
}

/// The slots a [`StripeGuards`] publishes when dropped: (inode, slot).
pub(super) type Pending = Vec<(u64, u32)>;

impl Publisher {
    /// Marks the slots of `inos` (whose stripes the caller just write-locked) as changing.
    pub(super) fn begin(&self, inos: &[u64]) -> Pending {
        if self.active.load(Ordering::Acquire) == 0 {
            return Pending::new();
        }
        let table = self.table.lock();
        let Some(t) = table.as_ref() else {
            return Pending::new();
        };
        let mut pending = Pending::new();
        for &ino in inos {
            if let Some(&(slot, _)) = t.by_ino.get(&ino) {
                if !pending.contains(&(ino, slot)) {
                    t.state.begin(slot);
                    pending.push((ino, slot));
                }
            }
        }
        pending
    }

    /// Publishes the slots of `pending` with the sizes `size_of` reads back (before the
    /// table's lock is taken); a slot whose size cannot be read stays odd, so clients never
    /// serve from it again.
    pub(super) fn end(&self, pending: &Pending, state_of: impl Fn(u64) -> Option<PublishedState>) {
        let sizes: Vec<Option<PublishedState>> =
            pending.iter().map(|&(ino, _)| state_of(ino)).collect();
        let table = self.table.lock();
        let Some(t) = table.as_ref() else {
            return;
        };
        for (&(ino, slot), size) in pending.iter().zip(sizes) {
            // The slot may have been returned (the inode's last lease ended under these
            // locks) and handed to another inode meanwhile: publish only what is still ours.
            if t.by_ino.get(&ino).is_none_or(|&(s, _)| s != slot) {
                continue;
            }
            match size {
                Some(state) => {
                    t.state.publish(slot, ino, state);
                }
                None => log::error!(
                    "inode {ino}: cannot read it back to publish its state; direct clients \
                     stop serving it"
                ),
            }
        }
    }

    /// Waits (at most `limit`) until no client is inside a served store to `ino`, whose
    /// stripe the caller write-locked through [`Fs::lock_all`] (so its slot is odd already
    /// and no new store starts). Used before a change that forbids stores (chattr +i/+a): a
    /// store under way completes before it, none comes after. A client that died inside a
    /// store leaves a count that only the limit ends (logged).
    pub(super) fn wait_for_stores(&self, ino: u64, limit: std::time::Duration) {
        let start = std::time::Instant::now();
        loop {
            let busy = {
                let table = self.table.lock();
                table.as_ref().is_some_and(|t| {
                    t.by_ino
                        .get(&ino)
                        .is_some_and(|&(slot, _)| t.state.writers(slot) > 0)
                })
            };
            if !busy {
                return;
            }
            if start.elapsed() >= limit {
                log::warn!(
                    "inode {ino}: a direct client's store did not finish within {limit:?} \
                     (a client that died inside one?); changing the inode anyway"
                );
                return;
            }
            std::thread::yield_now();
        }
    }

    /// A slot for `ino` (in `state`), for a new published lease; returns (slot, generation).
    /// The caller holds `ino`'s stripe (read or write), so no change of it is under way.
    fn acquire(&self, ino: u64, state: PublishedState) -> Result<(u32, u64)> {
        let mut table = self.table.lock();
        if table.is_none() {
            let config = self.config.lock();
            let Some(c) = config.as_ref() else {
                return Err(Error::NotSupported);
            };
            let state = StateTable::create(&c.path, c.like.as_ref()).map_err(|e| {
                log::error!(
                    "creating the direct-access state table {}: {e}",
                    c.path.display()
                );
                Error::NotSupported
            })?;
            *table = Some(Table {
                state,
                by_ino: HashMap::new(),
                free: (0..STATE_SLOTS as u32).rev().collect(),
            });
        }
        let Some(t) = table.as_mut() else {
            return Err(Error::Internal("state table"));
        };
        if let Some((slot, users)) = t.by_ino.get_mut(&ino) {
            *users += 1;
            return Ok((*slot, t.state.generation(*slot)));
        }
        let slot = t.free.pop().ok_or(Error::NoSpace)?;
        t.state.reset_writers(slot);
        let generation = t.state.publish(slot, ino, state);
        t.by_ino.insert(ino, (slot, 1));
        self.active.fetch_add(1, Ordering::Release);
        Ok((slot, generation))
    }

    /// One published lease on `ino` ended; the last one returns its slot (emptied, with a
    /// new generation, so a client that still held it sees the change).
    fn release(&self, ino: u64) {
        let mut table = self.table.lock();
        let Some(t) = table.as_mut() else {
            return;
        };
        let Some((slot, users)) = t.by_ino.get_mut(&ino) else {
            return;
        };
        *users -= 1;
        if *users == 0 {
            let slot = *slot;
            t.by_ino.remove(&ino);
            t.state.publish(
                slot,
                0,
                PublishedState {
                    size: 0,
                    writes_allowed: false,
                },
            );
            t.free.push(slot);
            self.active.fetch_sub(1, Ordering::Release);
        }
    }

    /// The slot of `ino`, while it has one.
    fn slot(&self, ino: u64) -> Option<u32> {
        self.table
            .lock()
            .as_ref()?
            .by_ino
            .get(&ino)
            .map(|&(s, _)| s)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if self.table.get_mut().is_some() {
            if let Some(c) = self.config.get_mut() {
                let _ = std::fs::remove_file(&c.path);
            }
        }
    }
}

/// A published lease, as [`Fs::map_published`] returns it.
#[derive(Clone, Debug)]
pub struct PublishedLease {
    pub lease: u64,
    pub extents: Vec<super::MappedExtent>,
    /// The layout generation the extents belong to.
    pub generation: u64,
}

impl Fs {
    /// Lets clients take published leases: their state table will be created at `path`
    /// (when first needed; removed when the file system is dropped), with the owner and
    /// mode of `like` (the device).
    pub fn enable_published_leases(&self, path: PathBuf, like: Option<&Path>) {
        let like = like.and_then(|p| std::fs::metadata(p).ok());
        *self.publisher.config.lock() = Some(Config { path, like });
    }

    /// The state table's path and `ino`'s slot in it, while `ino` has published leases.
    pub fn published_slot(&self, ino: u64) -> Option<(u32, PathBuf)> {
        let slot = self.publisher.slot(ino)?;
        let path = self.publisher.config.lock().as_ref()?.path.clone();
        Some((slot, path))
    }

    /// Takes a published lease on regular file `ino` (or refreshes `refresh`, a published
    /// lease on it): lists every extent as it is (allocates nothing) under the inode's read
    /// lock, so no change is under way and the listing belongs to the generation returned.
    pub fn map_published(&self, ino: u64, refresh: Option<u64>) -> Result<PublishedLease> {
        self.check_writable()?;
        self.check_single_device()?;
        let _g = self.read_lock(ino);
        let i = self.inodes.read(ino)?;
        if !i.is_reg() {
            return Err(Error::Invalid);
        }
        let extents = self.layout_of(ino, &i, 0, MAX_FILE_BLOCKS)?;
        let (lease, generation) = match refresh {
            Some(lease) => {
                if !self.lease_is_published(lease, ino) {
                    return Err(Error::Invalid);
                }
                let slot = self.publisher.slot(ino).ok_or(Error::Invalid)?;
                let generation = self
                    .publisher
                    .table
                    .lock()
                    .as_ref()
                    .map_or(0, |t| t.state.generation(slot));
                (lease, generation)
            }
            None => {
                let (_, generation) = self.publisher.acquire(ino, published_state(&i))?;
                (self.new_lease(ino, true), generation)
            }
        };
        Ok(PublishedLease {
            lease,
            extents,
            generation,
        })
    }

    /// The layout generation `ino`'s slot holds now, while it has one. Under `ino`'s stripe
    /// write lock (its slot odd already) this is the generation clients last saw, and the
    /// operation's publication will make it one more.
    pub(super) fn published_generation(&self, ino: u64) -> Option<u64> {
        let table = self.publisher.table.lock();
        let t = table.as_ref()?;
        let &(slot, _) = t.by_ino.get(&ino)?;
        Some(t.state.generation(slot))
    }

    /// A direct client stored into `ino` through a published lease: stamps mtime and ctime
    /// with the current time, as the write path does.
    pub fn touch_data(&self, ino: u64) -> Result<()> {
        let now = super::SetAttr {
            mtime: Some(super::SetTime::Now),
            ..Default::default()
        };
        self.setattr(&super::Ctx::ROOT, ino, &now).map(|_| ())
    }

    /// Ends the published side of lease `id` on `ino` (called as the lease ends).
    pub(super) fn unpublish(&self, ino: u64) {
        self.publisher.release(ino);
    }

    /// Marks the published slots of `inos` as changing; the returned list is published when
    /// the caller's stripe guards drop.
    pub(super) fn publish_begin(&self, inos: &[u64]) -> Pending {
        self.publisher.begin(inos)
    }

    /// Publishes `pending` (see [`Publisher::end`]).
    pub(super) fn publish_end(&self, pending: &Pending) {
        if pending.is_empty() {
            return;
        }
        self.publisher.end(pending, |ino| {
            self.inodes.read(ino).ok().map(|i| published_state(&i))
        });
    }
}

/// What a direct client needs of inode `i`: its size, and whether it may serve overwrites
/// (not into an immutable or append-only file, whose writes pmfs refuses or confines to
/// the end of file, where a client never serves).
fn published_state(i: &crate::format::Inode) -> PublishedState {
    use crate::format::inode_flags::{APPEND, IMMUTABLE};
    PublishedState {
        size: i.size,
        writes_allowed: i.flags & (IMMUTABLE | APPEND) == 0,
    }
}

/// Publishes what a [`StripeGuards`] marked, as it drops.
pub(super) fn on_guards_drop(guards: &StripeGuards<'_>) {
    if let Some((fs, pending)) = guards.publication() {
        fs.publish_end(pending);
    }
}
