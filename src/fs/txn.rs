//! Metadata transactions of the core, and the locks they own.
//!
//! The journal's isolation rule ("a range a transaction logged stays its own until it
//! commits") is kept here, by construction:
//! - An operation write-locks the stripes of the inodes it changes ([`StripeGuards`]) and
//!   decides, under those locks, which global locks it needs ([`LockSet`]).
//! - [`Fs::begin`] takes those global locks, then the journal slot, in the global order of
//!   [`crate::lockorder`], and returns a [`MetaTx`] that *owns* them. The transaction
//!   borrows the stripe guards, so they cannot be released before it ends either.
//! - Helpers receive `&mut MetaTx` and never lock: code that changes the state record or the
//!   deferred-free inode asks the transaction for the lock ([`MetaTx::require_state`],
//!   [`MetaTx::require_deferred`]), which fails if the operation did not declare it.
//! - [`MetaTx::commit`] commits, runs the commit hooks, and only then drops the guards;
//!   dropping a `MetaTx` rolls the transaction back before it drops them.

use super::Fs;
use crate::error::{Error, Result};
use crate::journal::Tx;
use crate::lockorder::{OrderedGuard, Ranked};
use parking_lot::{RwLockReadGuard, RwLockWriteGuard};

/// The global locks a transaction needs besides its inodes' stripes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct LockSet {
    /// The state record: orphan tree root, clean flag (unlinks that orphan or free an
    /// inode, reaps, mount and unmount).
    pub state: bool,
    /// The deferred-free inode (frees of a leased inode's blocks, lease end, mount).
    pub deferred: bool,
    /// The transaction exists to give space back (unlink, rmdir, truncate, punch, reaps,
    /// lease ends): the tree nodes it may need come from the allocator's reserve, so a
    /// full file system can always be emptied. Never set for a transaction that allocates
    /// file data.
    pub frees: bool,
}

impl LockSet {
    pub const NONE: LockSet = LockSet {
        state: false,
        deferred: false,
        frees: false,
    };
    pub const STATE: LockSet = LockSet {
        state: true,
        ..LockSet::NONE
    };
    pub const DEFERRED: LockSet = LockSet {
        deferred: true,
        ..LockSet::NONE
    };

    /// The same locks, for a transaction that gives space back.
    pub const fn freeing(self) -> LockSet {
        LockSet {
            frees: true,
            ..self
        }
    }
}

/// Write locks on a set of inode stripes, taken in ascending order, each once.
///
/// The guards also carry the published state of the locked inodes that have some
/// ([`super::publish`]): marked as changing when locked, published again when dropped,
/// before the locks are released.
#[derive(Debug)]
pub(super) struct StripeGuards<'a> {
    publication: Option<(&'a Fs, super::publish::Pending)>,
    // Field order is drop order: the locks, then the rank (after `Drop::drop` published).
    _guards: Vec<RwLockWriteGuard<'a, ()>>,
    _rank: Option<Ranked>,
}

impl<'a> StripeGuards<'a> {
    pub(super) fn new(
        guards: Vec<RwLockWriteGuard<'a, ()>>,
        rank: Ranked,
        publication: Option<(&'a Fs, super::publish::Pending)>,
    ) -> Self {
        Self {
            publication,
            _guards: guards,
            _rank: Some(rank),
        }
    }

    /// No inode locks: for transactions that change no inode another thread can reach
    /// (mount, unmount, and the deferred-free inode at mount).
    pub(super) fn none() -> Self {
        Self {
            publication: None,
            _guards: Vec::new(),
            _rank: None,
        }
    }

    /// The file system and the slots to publish when these guards drop.
    pub(super) fn publication(&self) -> Option<(&'a Fs, &super::publish::Pending)> {
        self.publication.as_ref().map(|(fs, p)| (*fs, p))
    }
}

impl Drop for StripeGuards<'_> {
    fn drop(&mut self) {
        super::publish::on_guards_drop(self);
    }
}

/// Read locks on one or two inode stripes.
#[derive(Debug)]
pub(super) struct StripeRead<'a> {
    _guards: [Option<RwLockReadGuard<'a, ()>>; 2],
    _rank: Ranked,
}

impl<'a> StripeRead<'a> {
    pub(super) fn new(guards: [Option<RwLockReadGuard<'a, ()>>; 2], rank: Ranked) -> Self {
        Self {
            _guards: guards,
            _rank: rank,
        }
    }
}

/// A metadata transaction with the global locks it declared. Dereferences to the journal
/// transaction for stores.
#[derive(Debug)]
pub(super) struct MetaTx<'a> {
    // Field order is drop order: a transaction dropped without commit rolls back while its
    // locks are still held.
    tx: Tx<'a>,
    deferred: Option<OrderedGuard<'a, ()>>,
    state: Option<OrderedGuard<'a, ()>>,
    /// The stripes this transaction's inodes are locked by; they outlive it.
    _stripes: &'a StripeGuards<'a>,
}

impl<'a> MetaTx<'a> {
    /// Commits, then releases the global locks (the stripes are the caller's).
    pub(super) fn commit(self) -> Result<()> {
        let MetaTx {
            tx,
            deferred,
            state,
            _stripes,
        } = self;
        #[cfg(test)]
        if let Err(e) = super::failpoint::hit("commit") {
            drop(tx); // rolls back while the locks are still held
            drop(deferred);
            drop(state);
            return Err(e);
        }
        let result = tx.commit();
        drop(deferred);
        drop(state);
        result.map_err(Error::from)
    }

    /// Proof that this transaction owns the state-record lock.
    pub(super) fn require_state(&self) -> Result<()> {
        Self::require(self.state.is_some(), "the state-record lock")
    }

    /// Proof that this transaction owns the deferred-free lock.
    pub(super) fn require_deferred(&self) -> Result<()> {
        Self::require(self.deferred.is_some(), "the deferred-free lock")
    }

    fn require(held: bool, what: &'static str) -> Result<()> {
        debug_assert!(
            held,
            "transaction changes what {what} guards without holding it"
        );
        if held {
            Ok(())
        } else {
            Err(Error::Internal(what))
        }
    }
}

impl<'a> std::ops::Deref for MetaTx<'a> {
    type Target = Tx<'a>;
    fn deref(&self) -> &Tx<'a> {
        &self.tx
    }
}

impl std::ops::DerefMut for MetaTx<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

impl Fs {
    /// Starts a metadata transaction: takes the global locks `set` names, then a journal
    /// slot. `stripes` are the inode locks the caller took for it (in the order's first
    /// places); they must outlive the transaction.
    pub(super) fn begin<'a>(
        &'a self,
        stripes: &'a StripeGuards<'a>,
        set: LockSet,
    ) -> Result<MetaTx<'a>> {
        self.check_writable()?;
        let state = set.state.then(|| self.state.lock());
        let deferred = set.deferred.then(|| self.deferred_lock.lock());
        let mut tx = self.journal.begin();
        if set.frees {
            tx.allow_reserve();
        }
        Ok(MetaTx {
            tx,
            deferred,
            state,
            _stripes: stripes,
        })
    }
}
