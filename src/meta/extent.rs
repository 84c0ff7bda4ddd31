//! A file's extent map: up to [`INLINE_EXTENTS`] records inline in the inode, then a B+tree
//! keyed by file block. Records are validated on every read.

use crate::btree::{self, NodeAllocator, Tree, TreeReader};
use crate::error::{Error, Result};
use crate::format::extent::ExtentDamage;
use crate::format::{ExtentRecord, INLINE_EXTENTS, Inode, TreeKind, inode_flags};
use crate::journal::Tx;
use zerocopy::IntoBytes;

pub fn tree(ino: u64, inode: &Inode) -> Tree {
    Tree {
        kind: TreeKind::Extents,
        owner: ino,
        root: inode.tree_root,
    }
}

fn is_tree(inode: &Inode) -> bool {
    inode.flags & inode_flags::TREE != 0
}

fn damaged(ino: u64, rec: &ExtentRecord, why: ExtentDamage) -> Error {
    Error::corrupted("extent", ino, format!("{why}: {rec:?}"))
}

fn inline(r: &TreeReader<'_>, ino: u64, inode: &Inode) -> Result<Vec<ExtentRecord>> {
    if inode.inline_count as usize > INLINE_EXTENTS {
        return Err(Error::corrupted("inode", ino, "too many inline extents"));
    }
    let mut out: Vec<ExtentRecord> = Vec::with_capacity(inode.inline_count as usize);
    for rec in inode.inline_extents() {
        rec.validate(r.geometry)
            .map_err(|why| damaged(ino, &rec, why))?;
        if out.last().is_some_and(|p| p.file_end() > rec.file_block) {
            return Err(Error::corrupted("inode", ino, "inline extents overlap"));
        }
        out.push(rec);
    }
    Ok(out)
}

fn set_inline(inode: &mut Inode, recs: &[ExtentRecord]) {
    inode.set_inline_extents(recs);
}

fn decode(r: &TreeReader<'_>, ino: u64, key: u64, p: &[u8]) -> Result<ExtentRecord> {
    ExtentRecord::from_leaf(key, p, r.geometry).map_err(|why| match why {
        ExtentDamage::Size => Error::corrupted("extent", ino, "record size"),
        why => Error::corrupted("extent", ino, format!("{why}: key {key:#x}")),
    })
}

/// The extent with the greatest file block <= `fblock`.
pub fn floor(
    r: &TreeReader<'_>,
    ino: u64,
    inode: &Inode,
    fblock: u64,
) -> Result<Option<ExtentRecord>> {
    if is_tree(inode) {
        match r.floor(&tree(ino, inode), fblock)? {
            Some((k, p)) => decode(r, ino, k, &p).map(Some),
            None => Ok(None),
        }
    } else {
        Ok(inline(r, ino, inode)?
            .into_iter()
            .rev()
            .find(|e| e.file_block <= fblock))
    }
}

/// The extent containing `fblock`, if any.
pub fn covering(
    r: &TreeReader<'_>,
    ino: u64,
    inode: &Inode,
    fblock: u64,
) -> Result<Option<ExtentRecord>> {
    Ok(floor(r, ino, inode, fblock)?.filter(|e| fblock < e.file_block + u64::from(e.len)))
}

/// Calls `f` for extents with file block >= `from` in order, until it returns false.
pub fn scan(
    r: &TreeReader<'_>,
    ino: u64,
    inode: &Inode,
    from: u64,
    f: &mut dyn FnMut(ExtentRecord) -> bool,
) -> Result<()> {
    if is_tree(inode) {
        let mut err = None;
        r.scan(
            &tree(ino, inode),
            from,
            &mut |k, p| match decode(r, ino, k, p) {
                Ok(e) => f(e),
                Err(e) => {
                    err = Some(e);
                    false
                }
            },
        )?;
        err.map_or(Ok(()), Err)
    } else {
        for e in inline(r, ino, inode)? {
            if e.file_block >= from && !f(e) {
                break;
            }
        }
        Ok(())
    }
}

/// The first extent starting at or after `from`.
pub fn next_from(
    r: &TreeReader<'_>,
    ino: u64,
    inode: &Inode,
    from: u64,
) -> Result<Option<ExtentRecord>> {
    let mut out = None;
    scan(r, ino, inode, from, &mut |e| {
        out = Some(e);
        false
    })?;
    Ok(out)
}

/// Every extent (fsck, layout listing, freeing).
pub fn all(r: &TreeReader<'_>, ino: u64, inode: &Inode) -> Result<Vec<ExtentRecord>> {
    let mut v = Vec::new();
    scan(r, ino, inode, 0, &mut |e| {
        v.push(e);
        true
    })?;
    Ok(v)
}

/// Inserts or replaces the extent starting at `rec.file_block`. The caller stores the inode.
pub fn put(
    tx: &mut Tx<'_>,
    r: &TreeReader<'_>,
    alloc: &dyn NodeAllocator,
    ino: u64,
    inode: &mut Inode,
    rec: ExtentRecord,
) -> Result<()> {
    if !is_tree(inode) {
        let mut recs = inline(r, ino, inode)?;
        match recs.binary_search_by_key(&rec.file_block, |e| e.file_block) {
            Ok(i) => recs[i] = rec,
            Err(i) => recs.insert(i, rec),
        }
        if recs.len() <= INLINE_EXTENTS {
            set_inline(inode, &recs);
            return Ok(());
        }
        // Move to a tree.
        let mut t = Tree {
            kind: TreeKind::Extents,
            owner: ino,
            root: 0,
        };
        for e in &recs {
            btree::insert(tx, r, alloc, &mut t, e.file_block, e.as_bytes())?;
        }
        set_inline(inode, &[]);
        inode.flags |= inode_flags::TREE;
        inode.tree_root = t.root;
        return Ok(());
    }
    let mut t = tree(ino, inode);
    btree::insert(tx, r, alloc, &mut t, rec.file_block, rec.as_bytes())?;
    inode.tree_root = t.root;
    Ok(())
}

/// Removes the extent starting at `fblock`.
pub fn del(
    tx: &mut Tx<'_>,
    r: &TreeReader<'_>,
    alloc: &dyn NodeAllocator,
    ino: u64,
    inode: &mut Inode,
    fblock: u64,
) -> Result<()> {
    if !is_tree(inode) {
        let mut recs = inline(r, ino, inode)?;
        recs.retain(|e| e.file_block != fblock);
        set_inline(inode, &recs);
        return Ok(());
    }
    let mut t = tree(ino, inode);
    btree::remove(tx, r, alloc, &mut t, fblock)?;
    inode.tree_root = t.root;
    Ok(())
}

/// Frees the tree nodes of the map (the caller frees the data blocks) and empties it.
pub fn destroy_map(
    tx: &mut Tx<'_>,
    r: &TreeReader<'_>,
    alloc: &dyn NodeAllocator,
    ino: u64,
    inode: &mut Inode,
) -> Result<()> {
    if is_tree(inode) {
        let mut t = tree(ino, inode);
        btree::destroy(tx, r, alloc, &mut t)?;
        inode.tree_root = 0;
        inode.flags &= !inode_flags::TREE;
    }
    set_inline(inode, &[]);
    Ok(())
}
