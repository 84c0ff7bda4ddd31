//! B+trees of one-block nodes on the device: the per-file extent maps and the directories.
//!
//! Keys are `u64`; leaf records carry a variable-length payload. An internal entry holds a
//! lower bound of every key in its child's subtree, and the entries of a node are strictly
//! increasing: a key is routed to the last entry whose key is <= it. The leftmost entry of
//! every level is keyed 0, so every key has a child; a split inserts the new right sibling,
//! keyed by its first key, right after the child that split. Nodes are decoded into memory, changed there and written back whole through the
//! transaction, so every change is undo-logged. Deletion frees empty nodes and collapses a
//! root with one child; nodes are not merged otherwise (O(log n) stays true, space is
//! reclaimed when nodes empty).
//!
//! Every node read is validated (magic, kind, owner, level, record bounds, ordered keys,
//! child blocks inside the data area) and a descent's level decreases at every step, so a
//! damaged or hostile tree gives an error, never a loop or an out-of-bounds access.

use crate::device::Media;
use crate::error::{Error, Result};
use crate::format::{
    BLOCK_SIZE, Geometry, INTERNAL_ENTRY, LEAF_RECORD_HEADER, MAX_TREE_LEVEL, NodeHeader, TreeKind,
    blocks_to_bytes, check_node,
};
use crate::journal::Tx;
use zerocopy::{FromBytes, IntoBytes};

const HEADER: usize = size_of::<NodeHeader>();
/// Bytes available for records or entries in a node.
const CAPACITY: usize = BLOCK_SIZE as usize - HEADER;
/// Largest payload of a leaf record.
pub const MAX_PAYLOAD: usize = 512;

/// Where tree nodes come from: the file system's block allocator.
pub trait NodeAllocator {
    /// Allocates one block for a node of the tree owned by `owner`.
    fn alloc_node(&self, tx: &mut Tx<'_>, owner: u64) -> Result<u64>;
    /// Frees a node block.
    fn free_node(&self, tx: &mut Tx<'_>, owner: u64, block: u64) -> Result<()>;
}

/// A tree: its kind, owning inode and root block (0 = empty). Changes to `root` must be
/// stored by the caller (in the owning inode) in the same transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tree {
    pub kind: TreeKind,
    pub owner: u64,
    pub root: u64,
}

#[derive(Clone, Debug)]
enum Body {
    Leaf(Vec<(u64, Vec<u8>)>),
    Internal(Vec<(u64, u64)>),
}

#[derive(Clone, Debug)]
struct Node {
    level: u16,
    body: Body,
}

impl Node {
    fn encoded_len(&self) -> usize {
        match &self.body {
            Body::Leaf(r) => r.iter().map(|(_, p)| LEAF_RECORD_HEADER + p.len()).sum(),
            Body::Internal(e) => e.len() * INTERNAL_ENTRY,
        }
    }

    fn len(&self) -> usize {
        match &self.body {
            Body::Leaf(r) => r.len(),
            Body::Internal(e) => e.len(),
        }
    }

    fn first_key(&self) -> Option<u64> {
        match &self.body {
            Body::Leaf(r) => r.first().map(|r| r.0),
            Body::Internal(e) => e.first().map(|e| e.0),
        }
    }
}

/// Index of the child to follow for `key`: the last entry whose key is <= `key`, or 0.
fn route(entries: &[(u64, u64)], key: u64) -> usize {
    entries.partition_point(|e| e.0 <= key).saturating_sub(1)
}

/// Read access to trees on one device.
#[derive(Clone, Copy, Debug)]
pub struct TreeReader<'a> {
    pub media: &'a dyn Media,
    pub geometry: &'a Geometry,
}

impl<'a> TreeReader<'a> {
    pub fn new(media: &'a dyn Media, geometry: &'a Geometry) -> Self {
        Self { media, geometry }
    }

    fn corrupt(&self, tree: &Tree, detail: impl Into<String>) -> Error {
        Error::corrupted("tree node", tree.owner, detail)
    }

    fn read_node(&self, tree: &Tree, block: u64, level: Option<u16>) -> Result<Node> {
        if !self.geometry.is_data_range(block, 1) {
            return Err(self.corrupt(tree, format!("node block {block} outside the data area")));
        }
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        self.media.read(blocks_to_bytes(block), &mut buf)?;
        let (h, rest) =
            NodeHeader::read_from_prefix(&buf).map_err(|_| self.corrupt(tree, "short node"))?;
        check_node(&h, tree.kind, tree.owner, level)
            .map_err(|e| self.corrupt(tree, e.to_string()))?;
        let used = h.used as usize;
        let data = rest
            .get(..used)
            .ok_or_else(|| self.corrupt(tree, "used beyond node"))?;
        let count = usize::from(h.count);
        let body = if h.level == 0 {
            let mut recs = Vec::with_capacity(count);
            let mut at = 0usize;
            for _ in 0..count {
                let hdr = data
                    .get(at..at + LEAF_RECORD_HEADER)
                    .ok_or_else(|| self.corrupt(tree, "record beyond used bytes"))?;
                let key =
                    u64::from_le_bytes(hdr[..8].try_into().map_err(|_| self.corrupt(tree, "key"))?);
                let len = usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
                let p = data
                    .get(at + LEAF_RECORD_HEADER..at + LEAF_RECORD_HEADER + len)
                    .ok_or_else(|| self.corrupt(tree, "payload beyond used bytes"))?;
                if recs.last().is_some_and(|(k, _): &(u64, Vec<u8>)| *k >= key) {
                    return Err(self.corrupt(tree, "leaf keys out of order"));
                }
                recs.push((key, p.to_vec()));
                at += LEAF_RECORD_HEADER + len;
            }
            if at != used {
                return Err(self.corrupt(tree, "leaf used bytes do not match records"));
            }
            Body::Leaf(recs)
        } else {
            if count * INTERNAL_ENTRY != used || count == 0 {
                return Err(self.corrupt(tree, "internal node size"));
            }
            let mut entries = Vec::with_capacity(count);
            for c in data.chunks_exact(INTERNAL_ENTRY) {
                let key =
                    u64::from_le_bytes(c[..8].try_into().map_err(|_| self.corrupt(tree, "key"))?);
                let child =
                    u64::from_le_bytes(c[8..].try_into().map_err(|_| self.corrupt(tree, "child"))?);
                if entries.last().is_some_and(|(k, _): &(u64, u64)| *k >= key) {
                    return Err(self.corrupt(tree, "internal keys out of order"));
                }
                if !self.geometry.is_data_range(child, 1) {
                    return Err(
                        self.corrupt(tree, format!("child block {child} outside the data area"))
                    );
                }
                entries.push((key, child));
            }
            Body::Internal(entries)
        };
        Ok(Node {
            level: h.level,
            body,
        })
    }

    fn read_root(&self, tree: &Tree) -> Result<Option<Node>> {
        if tree.root == 0 {
            return Ok(None);
        }
        self.read_node(tree, tree.root, None).map(Some)
    }

    /// The payload stored under `key`.
    pub fn get(&self, tree: &Tree, key: u64) -> Result<Option<Vec<u8>>> {
        let mut found = None;
        self.scan(tree, key, &mut |k, p| {
            if k == key {
                found = Some(p.to_vec());
            }
            false
        })?;
        Ok(found)
    }

    /// Calls `f(key, payload)` for every record with key >= `from`, in key order, until `f`
    /// returns false.
    pub fn scan(
        &self,
        tree: &Tree,
        from: u64,
        f: &mut dyn FnMut(u64, &[u8]) -> bool,
    ) -> Result<()> {
        let Some(root) = self.read_root(tree)? else {
            return Ok(());
        };
        // Stack of (internal node entries, index of the child being visited, level).
        type Frame = (Vec<(u64, u64)>, usize, u16);
        let mut stack: Vec<Frame> = Vec::new();
        let mut node = root;
        let mut first_leaf = true;
        loop {
            match node.body {
                Body::Internal(entries) => {
                    let i = if first_leaf { route(&entries, from) } else { 0 };
                    let child = entries[i].1;
                    let level = node.level;
                    stack.push((entries, i, level));
                    node = self.read_node(tree, child, Some(level - 1))?;
                }
                Body::Leaf(recs) => {
                    let start = if first_leaf {
                        recs.partition_point(|r| r.0 < from)
                    } else {
                        0
                    };
                    first_leaf = false;
                    for (k, p) in &recs[start..] {
                        if !f(*k, p) {
                            return Ok(());
                        }
                    }
                    // Climb to the next unvisited sibling.
                    loop {
                        let Some((entries, i, level)) = stack.last_mut() else {
                            return Ok(());
                        };
                        if *i + 1 < entries.len() {
                            *i += 1;
                            let (child, level) = (entries[*i].1, *level);
                            node = self.read_node(tree, child, Some(level - 1))?;
                            break;
                        }
                        stack.pop();
                    }
                }
            }
        }
    }

    /// The record with the greatest key <= `key`.
    pub fn floor(&self, tree: &Tree, key: u64) -> Result<Option<(u64, Vec<u8>)>> {
        let Some(mut node) = self.read_root(tree)? else {
            return Ok(None);
        };
        // Descend by routing; remember the nearest left sibling subtree for backtracking.
        let mut left_alt: Option<(u64, u16)> = None;
        loop {
            match node.body {
                Body::Internal(entries) => {
                    let i = route(&entries, key);
                    if i > 0 {
                        left_alt = Some((entries[i - 1].1, node.level - 1));
                    }
                    node = self.read_node(tree, entries[i].1, Some(node.level - 1))?;
                }
                Body::Leaf(recs) => {
                    let i = recs.partition_point(|r| r.0 <= key);
                    if i > 0 {
                        let (k, p) = &recs[i - 1];
                        return Ok(Some((*k, p.clone())));
                    }
                    let Some((block, level)) = left_alt else {
                        return Ok(None);
                    };
                    return self.last_in(tree, block, level);
                }
            }
        }
    }

    /// The greatest record of the subtree at `block`.
    fn last_in(&self, tree: &Tree, block: u64, level: u16) -> Result<Option<(u64, Vec<u8>)>> {
        let mut node = self.read_node(tree, block, Some(level))?;
        loop {
            match node.body {
                Body::Internal(entries) => {
                    let child = entries[entries.len() - 1].1;
                    node = self.read_node(tree, child, Some(node.level - 1))?;
                }
                Body::Leaf(recs) => return Ok(recs.last().cloned()),
            }
        }
    }

    /// Calls `f(block, level)` for every node of the tree (for freeing and for fsck).
    pub fn for_each_node(
        &self,
        tree: &Tree,
        f: &mut dyn FnMut(u64, u16) -> Result<()>,
    ) -> Result<()> {
        fn walk(
            r: &TreeReader<'_>,
            tree: &Tree,
            block: u64,
            level: Option<u16>,
            f: &mut dyn FnMut(u64, u16) -> Result<()>,
        ) -> Result<()> {
            let node = r.read_node(tree, block, level)?;
            f(block, node.level)?;
            if let Body::Internal(entries) = node.body {
                for (_, child) in entries {
                    walk(r, tree, child, Some(node.level - 1), f)?;
                }
            }
            Ok(())
        }
        if tree.root != 0 {
            walk(self, tree, tree.root, None, f)?;
        }
        Ok(())
    }
}

/// Writes `node` at `block` through the transaction. `fresh` nodes were allocated by this
/// transaction, so their old contents need no undo record.
fn write_node(tx: &mut Tx<'_>, tree: &Tree, block: u64, node: &Node, fresh: bool) -> Result<()> {
    let mut buf = Vec::with_capacity(BLOCK_SIZE as usize);
    let mut h = NodeHeader::new(tree.kind, node.level, tree.owner);
    h.count = u16::try_from(node.len())
        .map_err(|_| Error::corrupted("tree node", tree.owner, "count"))?;
    h.used = u32::try_from(node.encoded_len())
        .map_err(|_| Error::corrupted("tree node", tree.owner, "used"))?;
    buf.extend_from_slice(h.as_bytes());
    match &node.body {
        Body::Leaf(recs) => {
            for (k, p) in recs {
                buf.extend_from_slice(&k.to_le_bytes());
                buf.extend_from_slice(&(p.len() as u16).to_le_bytes());
                buf.extend_from_slice(p);
            }
        }
        Body::Internal(entries) => {
            for (k, c) in entries {
                buf.extend_from_slice(&k.to_le_bytes());
                buf.extend_from_slice(&c.to_le_bytes());
            }
        }
    }
    debug_assert!(buf.len() <= BLOCK_SIZE as usize);
    let off = blocks_to_bytes(block);
    if fresh {
        tx.write_new(off, &buf)?;
    } else {
        // Log the whole node once: later rewrites in the same transaction (a node filling
        // up record by record) then need no undo record of their own.
        tx.write_within(off, &buf, BLOCK_SIZE)?;
    }
    Ok(())
}

/// Splits an over-full node into two by bytes; returns the right half.
fn split(node: &mut Node) -> Node {
    let total = node.encoded_len();
    match &mut node.body {
        Body::Leaf(recs) => {
            let mut acc = 0;
            let mut at = recs.len() - 1;
            for (i, (_, p)) in recs.iter().enumerate() {
                acc += LEAF_RECORD_HEADER + p.len();
                if acc >= total / 2 {
                    at = (i + 1).min(recs.len() - 1);
                    break;
                }
            }
            let right = recs.split_off(at.max(1));
            Node {
                level: 0,
                body: Body::Leaf(right),
            }
        }
        Body::Internal(entries) => {
            let right = entries.split_off(entries.len() / 2);
            Node {
                level: node.level,
                body: Body::Internal(right),
            }
        }
    }
}

/// The internal nodes on the way from the root to the leaf for `key` (block, node, index of
/// the child taken), then the leaf's block and node. The tree must not be empty.
type Path = Vec<(u64, Node, usize)>;

fn descend(r: &TreeReader<'_>, tree: &Tree, key: u64) -> Result<(Path, u64, Node)> {
    let mut path = Path::new();
    let mut block = tree.root;
    let mut node = r.read_node(tree, block, None)?;
    while let Body::Internal(entries) = &node.body {
        let i = route(entries, key);
        let child = entries[i].1;
        let level = node.level;
        path.push((block, node, i));
        block = child;
        node = r.read_node(tree, block, Some(level - 1))?;
    }
    Ok((path, block, node))
}

/// Inserts or replaces `key`. Updates `tree.root` when the root changes.
pub fn insert(
    tx: &mut Tx<'_>,
    r: &TreeReader<'_>,
    alloc: &dyn NodeAllocator,
    tree: &mut Tree,
    key: u64,
    payload: &[u8],
) -> Result<()> {
    if payload.len() > MAX_PAYLOAD {
        return Err(Error::Invalid);
    }
    if tree.root == 0 {
        let block = alloc.alloc_node(tx, tree.owner)?;
        let node = Node {
            level: 0,
            body: Body::Leaf(vec![(key, payload.to_vec())]),
        };
        write_node(tx, tree, block, &node, true)?;
        tree.root = block;
        return Ok(());
    }
    let (mut path, mut block, mut node) = descend(r, tree, key)?;
    if let Body::Leaf(recs) = &mut node.body {
        match recs.binary_search_by_key(&key, |r| r.0) {
            Ok(i) => recs[i].1 = payload.to_vec(),
            Err(i) => recs.insert(i, (key, payload.to_vec())),
        }
    }
    // Write back, splitting upwards while a node overflows.
    let mut pending: Option<(u64, u64)> = None; // (separator key, new right block) for the parent
    loop {
        if let Some((sep, right_block)) = pending.take() {
            if let Body::Internal(entries) = &mut node.body {
                let i = entries.partition_point(|e| e.0 <= sep);
                entries.insert(i, (sep, right_block));
            }
        }
        if node.encoded_len() <= CAPACITY {
            write_node(tx, tree, block, &node, false)?;
            // Keep the parent's separator for this child exact when its first key dropped
            // below it (only matters for entry 0, which routing ignores): nothing to do.
            return Ok(());
        }
        let right = split(&mut node);
        let right_block = alloc.alloc_node(tx, tree.owner)?;
        write_node(tx, tree, block, &node, false)?;
        write_node(tx, tree, right_block, &right, true)?;
        let sep = right
            .first_key()
            .ok_or_else(|| Error::corrupted("tree node", tree.owner, "empty split"))?;
        match path.pop() {
            Some((pblock, pnode, _)) => {
                pending = Some((sep, right_block));
                block = pblock;
                node = pnode;
            }
            None => {
                if node.level >= MAX_TREE_LEVEL {
                    return Err(Error::NoSpace);
                }
                // The leftmost child of every level is keyed 0: it must take any key
                // smaller than all others, so its key may never be a real minimum that a
                // later, smaller key would undercut.
                let left_key = 0;
                let new_root = Node {
                    level: node.level + 1,
                    body: Body::Internal(vec![(left_key, block), (sep, right_block)]),
                };
                let root_block = alloc.alloc_node(tx, tree.owner)?;
                write_node(tx, tree, root_block, &new_root, true)?;
                tree.root = root_block;
                return Ok(());
            }
        }
    }
}

/// Removes `key`; returns its payload if it was present. Updates `tree.root`.
pub fn remove(
    tx: &mut Tx<'_>,
    r: &TreeReader<'_>,
    alloc: &dyn NodeAllocator,
    tree: &mut Tree,
    key: u64,
) -> Result<Option<Vec<u8>>> {
    if tree.root == 0 {
        return Ok(None);
    }
    let (mut path, mut block, mut node) = descend(r, tree, key)?;
    let removed = match &mut node.body {
        Body::Leaf(recs) => match recs.binary_search_by_key(&key, |r| r.0) {
            Ok(i) => recs.remove(i).1,
            Err(_) => return Ok(None),
        },
        Body::Internal(_) => return Ok(None),
    };
    // Free emptied nodes upwards.
    loop {
        if node.len() > 0 || path.is_empty() {
            break;
        }
        alloc.free_node(tx, tree.owner, block)?;
        let Some((pblock, mut pnode, i)) = path.pop() else {
            break;
        };
        if let Body::Internal(entries) = &mut pnode.body {
            let (removed_key, _) = entries.remove(i);
            // Entry 0's key is the lower bound of the whole node's range: keep it when the
            // first child goes, or keys below the new first key would route to a child
            // whose key is larger than they are.
            if i == 0 {
                if let Some(first) = entries.first_mut() {
                    first.0 = removed_key;
                }
            }
        }
        block = pblock;
        node = pnode;
    }
    if node.len() == 0 {
        // The root itself is empty.
        alloc.free_node(tx, tree.owner, block)?;
        tree.root = 0;
        return Ok(Some(removed));
    }
    write_node(tx, tree, block, &node, false)?;
    // Collapse a root with a single child.
    loop {
        let root = r.read_node(tree, tree.root, None)?;
        match root.body {
            Body::Internal(entries) if entries.len() == 1 => {
                alloc.free_node(tx, tree.owner, tree.root)?;
                tree.root = entries[0].1;
            }
            _ => break,
        }
    }
    Ok(Some(removed))
}

/// Frees every node of the tree; `tree.root` becomes 0.
pub fn destroy(
    tx: &mut Tx<'_>,
    r: &TreeReader<'_>,
    alloc: &dyn NodeAllocator,
    tree: &mut Tree,
) -> Result<()> {
    let mut blocks = Vec::new();
    r.for_each_node(tree, &mut |b, _| {
        blocks.push(b);
        Ok(())
    })?;
    for b in blocks {
        alloc.free_node(tx, tree.owner, b)?;
    }
    tree.root = 0;
    Ok(())
}

#[cfg(test)]
mod tests;
