//! Directories: a B+tree per directory keyed by name hash.
//!
//! Key = (46-bit FNV-1a hash of the name) << 16 | collision sequence (< 2^62, so the cookie
//! key + 3 fits an i64). Lookup scans the
//! (almost always one-entry) key range of the hash; insert takes the first free sequence.
//! A key never changes while its entry exists, so readdir cookies (key + 3, after "." = 1
//! and ".." = 2) stay valid while the directory changes: no entry is skipped or returned
//! twice.

use crate::btree::{self, NodeAllocator, Tree, TreeReader};
use crate::error::{Error, Result};
use crate::format::TreeKind;
use crate::format::dirent::{self, NameError};
use crate::journal::Tx;

pub use crate::format::dirent::{DirEntry, name_hash};

/// Checks a name from a user: the format's rule for a stored name
/// ([`dirent::check_name`]: 1..=255 bytes, no '/' or NUL, not "." or "..").
pub fn check_name(name: &[u8]) -> Result<()> {
    dirent::check_name(name).map_err(|e| match e {
        NameError::TooLong => Error::NameTooLong,
        _ => Error::Invalid,
    })
}

fn decode(dir: u64, key: u64, p: &[u8]) -> Result<DirEntry> {
    DirEntry::decode(key, p)
        .map_err(|why| Error::corrupted("directory entry", dir, format!("key {key:#x}: {why}")))
}

pub fn tree(dir: u64, root: u64) -> Tree {
    Tree {
        kind: TreeKind::Directory,
        owner: dir,
        root,
    }
}

/// Finds `name` in the directory tree.
pub fn lookup(r: &TreeReader<'_>, t: &Tree, name: &[u8]) -> Result<Option<DirEntry>> {
    let h = name_hash(name);
    let mut found = None;
    let mut err = None;
    r.scan(t, h << 16, &mut |k, p| {
        if k >> 16 != h {
            return false;
        }
        match decode(t.owner, k, p) {
            Ok(e) if e.name == name => {
                found = Some(e);
                false
            }
            Ok(_) => true,
            Err(e) => {
                err = Some(e);
                false
            }
        }
    })?;
    match err {
        Some(e) => Err(e),
        None => Ok(found),
    }
}

/// Adds an entry (the caller checked that `name` is absent). Returns its key.
pub fn insert(
    tx: &mut Tx<'_>,
    r: &TreeReader<'_>,
    alloc: &dyn NodeAllocator,
    t: &mut Tree,
    name: &[u8],
    ino: u64,
    kind: u8,
) -> Result<u64> {
    let h = name_hash(name);
    let mut next_seq = 0u64;
    r.scan(t, h << 16, &mut |k, _| {
        if k >> 16 != h || k & 0xffff != next_seq {
            return false;
        }
        next_seq += 1;
        true
    })?;
    if next_seq > 0xffff {
        return Err(Error::NoSpace);
    }
    let key = h << 16 | next_seq;
    btree::insert(tx, r, alloc, t, key, &dirent::payload(ino, kind, name))?;
    Ok(key)
}

/// Replaces the inode an existing entry points to (rename over an existing name).
pub fn replace(
    tx: &mut Tx<'_>,
    r: &TreeReader<'_>,
    alloc: &dyn NodeAllocator,
    t: &mut Tree,
    entry: &DirEntry,
    ino: u64,
    kind: u8,
) -> Result<()> {
    btree::insert(
        tx,
        r,
        alloc,
        t,
        entry.key,
        &dirent::payload(ino, kind, &entry.name),
    )
}

/// Removes the entry with `key`.
pub fn remove(
    tx: &mut Tx<'_>,
    r: &TreeReader<'_>,
    alloc: &dyn NodeAllocator,
    t: &mut Tree,
    key: u64,
) -> Result<()> {
    btree::remove(tx, r, alloc, t, key)?;
    Ok(())
}

/// Calls `f` for entries with key >= `from` in key order until it returns false.
pub fn list(
    r: &TreeReader<'_>,
    t: &Tree,
    from: u64,
    f: &mut dyn FnMut(DirEntry) -> bool,
) -> Result<()> {
    let mut err = None;
    r.scan(t, from, &mut |k, p| match decode(t.owner, k, p) {
        Ok(e) => f(e),
        Err(e) => {
            err = Some(e);
            false
        }
    })?;
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
