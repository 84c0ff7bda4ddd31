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
use crate::format::{DIRENT_FIXED, NAME_MAX, TreeKind};
use crate::journal::Tx;

/// A directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub key: u64,
    pub ino: u64,
    /// File type: S_IFMT bits >> 12.
    pub kind: u8,
    pub name: Vec<u8>,
}

/// Hash of a name: the top 46 bits of FNV-1a 64 (stable: part of the format).
pub fn name_hash(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h >> 18
}

/// Checks a name from a user: 1..=255 bytes, no '/' or NUL, not "." or "..".
pub fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(Error::NameTooLong);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(Error::Invalid);
    }
    Ok(())
}

fn encode(ino: u64, kind: u8, name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(DIRENT_FIXED + name.len());
    p.extend_from_slice(&ino.to_le_bytes());
    p.push(kind);
    p.push(name.len() as u8);
    p.extend_from_slice(name);
    p
}

fn decode(dir: u64, key: u64, p: &[u8]) -> Result<DirEntry> {
    let bad = || Error::corrupted("directory entry", dir, format!("key {key:#x}"));
    if p.len() < DIRENT_FIXED {
        return Err(bad());
    }
    let ino = u64::from_le_bytes(p[..8].try_into().map_err(|_| bad())?);
    let len = usize::from(p[9]);
    let name = p.get(DIRENT_FIXED..DIRENT_FIXED + len).ok_or_else(bad)?;
    if name.is_empty() || p.len() != DIRENT_FIXED + len || key >> 16 != name_hash(name) || ino == 0
    {
        return Err(bad());
    }
    Ok(DirEntry {
        key,
        ino,
        kind: p[8],
        name: name.to_vec(),
    })
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
    btree::insert(tx, r, alloc, t, key, &encode(ino, kind, name))?;
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
    btree::insert(tx, r, alloc, t, entry.key, &encode(ino, kind, &entry.name))
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
