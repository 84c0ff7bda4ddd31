//! The global lock order, and a debug-build check that every thread follows it.
//!
//! Every lock that a thread may hold while it waits for another one has a [`Rank`]. A
//! thread takes locks in strictly ascending rank and never takes a rank it already holds
//! (a set of inode stripes is taken in one call, sorted, and counts once):
//!
//! ```text
//! mapped-writes entry → rename lock → inode stripes → inode-table growth → state record
//!                     → deferred-free inode → journal slot
//! ```
//!
//! The first is the FUSE layer's: the entry lock of an inode whose pages the kernel may
//! cache, held across the core call of a direct write or a writeback to it
//! (`crate::fuse::coherence`).
//!
//! The journal slot is a lock too (a counting semaphore: `Journal::begin` waits while every
//! slot is busy), and it comes last: an operation takes every lock it needs *before* its
//! slot, and keeps them until its transaction has committed or rolled back. Nothing may
//! wait for a slot while holding one. Locks taken only while holding a slot and never
//! held while waiting for another lock (the allocator's arenas, the inode free index, the
//! lease and reference tables) are leaves and have no rank. FITRIM holds the allocator's
//! chunk lock (a leaf) without a slot, across a hole punch of the image file: a system
//! call, not a wait for another lock.
//!
//! In debug builds (tests, `cargo test` without `--release`) each ranked acquisition is
//! checked against the ranks the thread holds, and taking one out of order panics with
//! both names: a test that *could* deadlock fails at once, whether or not the schedule
//! that deadlocks happened. Release builds compile the check away.

use std::marker::PhantomData;

/// A place in the global lock order (lower ranks are taken first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rank {
    /// `fuse::coherence::MappedWrites`: one inode's pending direct writes.
    MappedWrites = 0,
    /// `Fs::rename_lock`: renames between directories.
    Rename = 1,
    /// The inode lock stripes (a sorted set of them, taken in one call).
    Stripes = 2,
    /// `InodeTable` growth (adds a chunk in a transaction of its own).
    InodeGrow = 3,
    /// The state record (orphan tree root, clean flag).
    State = 4,
    /// The deferred-free inode and the lease table's deferred lists.
    Deferred = 5,
    /// A journal slot: always the last.
    Slot = 6,
    /// Not in the order: a token that records nothing (the journal's own tests, which
    /// interleave two transactions on one thread on purpose).
    Untracked = 7,
}

#[cfg(debug_assertions)]
thread_local! {
    /// Bit `r` set: this thread holds a lock of rank `r`.
    static HELD: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// Proof that the current thread holds a lock of `rank`; clears it when dropped. Not
/// `Send`: a rank belongs to the thread that took it.
#[derive(Debug)]
#[must_use]
pub struct Ranked {
    #[cfg(debug_assertions)]
    rank: Rank,
    _thread_bound: PhantomData<*const ()>,
}

impl Ranked {
    /// Records that this thread is about to wait for a lock of `rank`. Panics in debug
    /// builds if the thread holds a lock of equal or higher rank (the order is broken).
    pub fn acquire(rank: Rank) -> Self {
        #[cfg(debug_assertions)]
        HELD.with(|h| {
            let held = h.get();
            let not_below = held & !((1u8 << rank as u8) - 1);
            assert!(
                not_below == 0,
                "lock order violated: taking {rank:?} while holding {:?} (order: {})",
                held_ranks(held),
                "mapped writes → rename → stripes → inode growth → state → deferred → slot",
            );
            h.set(held | 1 << rank as u8);
        });
        #[cfg(not(debug_assertions))]
        let _ = rank;
        Self {
            #[cfg(debug_assertions)]
            rank,
            _thread_bound: PhantomData,
        }
    }

    /// A token that records nothing (for the journal's own interleaving tests).
    pub fn untracked() -> Self {
        Self {
            #[cfg(debug_assertions)]
            rank: Rank::Untracked,
            _thread_bound: PhantomData,
        }
    }

    /// True when this thread holds a lock of `rank` (always true in release builds, where
    /// ranks are not tracked): for `debug_assert!`s in code that relies on a caller's lock.
    pub fn is_held(rank: Rank) -> bool {
        #[cfg(debug_assertions)]
        {
            HELD.with(|h| h.get() & (1 << rank as u8) != 0)
        }
        #[cfg(not(debug_assertions))]
        {
            let _ = rank;
            true
        }
    }
}

impl Drop for Ranked {
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        if self.rank != Rank::Untracked {
            HELD.with(|h| h.set(h.get() & !(1 << self.rank as u8)));
        }
    }
}

#[cfg(debug_assertions)]
fn held_ranks(held: u8) -> Vec<Rank> {
    [
        Rank::MappedWrites,
        Rank::Rename,
        Rank::Stripes,
        Rank::InodeGrow,
        Rank::State,
        Rank::Deferred,
        Rank::Slot,
    ]
    .into_iter()
    .filter(|r| held & (1 << *r as u8) != 0)
    .collect()
}

/// A mutex with a place in the lock order.
#[derive(Debug)]
pub struct OrderedMutex<T> {
    rank: Rank,
    inner: parking_lot::Mutex<T>,
}

/// The guard of an [`OrderedMutex`]: the lock, then the rank (released in that order).
#[derive(Debug)]
pub struct OrderedGuard<'a, T> {
    guard: parking_lot::MutexGuard<'a, T>,
    _rank: Ranked,
}

impl<T> OrderedMutex<T> {
    pub const fn new(rank: Rank, value: T) -> Self {
        Self {
            rank,
            inner: parking_lot::Mutex::new(value),
        }
    }

    pub fn lock(&self) -> OrderedGuard<'_, T> {
        let rank = Ranked::acquire(self.rank);
        OrderedGuard {
            guard: self.inner.lock(),
            _rank: rank,
        }
    }
}

impl<T> std::ops::Deref for OrderedGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> std::ops::DerefMut for OrderedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;

    #[test]
    fn ascending_ranks_are_allowed_and_released() {
        let a = Ranked::acquire(Rank::Stripes);
        let b = Ranked::acquire(Rank::State);
        let c = Ranked::acquire(Rank::Slot);
        assert!(Ranked::is_held(Rank::State));
        drop((c, b, a));
        assert!(!Ranked::is_held(Rank::State));
        // Released ranks may be taken again, in any order relative to before.
        let _s = Ranked::acquire(Rank::Slot);
    }

    #[test]
    #[should_panic(expected = "lock order violated: taking Slot while holding [Slot]")]
    fn a_second_slot_while_holding_one_panics() {
        let _a = Ranked::acquire(Rank::Slot);
        let _b = Ranked::acquire(Rank::Slot);
    }

    #[test]
    #[should_panic(expected = "lock order violated: taking State while holding [Slot]")]
    fn the_state_lock_after_a_slot_panics() {
        let _a = Ranked::acquire(Rank::Slot);
        let _b = Ranked::acquire(Rank::State);
    }
}
