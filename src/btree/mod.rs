//! B+trees of one-block nodes on the device: the per-file extent maps and the directories.
//!
//! Keys are `u64`; leaf records carry a variable-length payload. A key is routed to the last
//! entry of an internal node whose key is <= it (or to entry 0).
//!
//! **The separator invariant** (docs/FORMAT.md states the same; [`TreeReader::validate`]
//! checks it). Every node covers a key range `[lo, hi)`: the root covers `[0, 2^64)`, and
//! child `k` of a node with entry keys `e_0 < e_1 < … < e_{n-1}` covers `[e_k, e_{k+1})`
//! (`e_n` being the node's own `hi`). Then:
//! - entry 0 of every internal node is keyed exactly the node's `lo`: 0 for the root and,
//!   recursively, for entry 0 of child 0 (the leftmost spine); the parent's key for it
//!   everywhere else;
//! - every entry key, and every leaf key, lies in the node's `[lo, hi)`, strictly increasing.
//!
//! Every writer keeps it: a split places its new right sibling, keyed by the sibling's first
//! key, at the index of the child that split + 1 (taken from the descent path, not searched
//! by key); removing a node's first child keeps the old first key in entry 0 and rekeys the
//! new first child's leftmost spine to it; a collapsing root's promoted child is rekeyed to
//! 0 down its leftmost spine; fsck's bulk builder keys the leftmost spine 0. Trees written
//! before this was enforced may hold a larger key in entry 0; an insert descending through
//! such a node lowers it to the node's `lo` (written in the same transaction).
//!
//! Reads (lookups, `floor` on every data request, scans) copy one node at a time into a
//! stack buffer and work on a validated view of it: no allocation per node or record, and no
//! reference into the shared mapping outlives a call. Changes decode the nodes on the path
//! (a leaf stays in its encoded form, so a record is inserted or removed by moving bytes),
//! change them and write them back whole through the transaction, so every change is
//! undo-logged. Deletion frees empty nodes and collapses a
//! root with one child; nodes are not merged otherwise (O(log n) stays true, space is
//! reclaimed when nodes empty).
//!
//! Every node read is validated (magic, kind, owner, level, record bounds, ordered keys,
//! child blocks inside the data area) and a descent's level decreases at every step, so a
//! damaged or hostile tree gives an error, never a loop or an out-of-bounds access. Node
//! validation alone still admits a DAG (one child under many entries, up to
//! `MAX_TREE_LEVEL` deep: ~254^8 paths), so every walk that visits more than one path is
//! bounded across nodes as well: the node walker (`validate`, `for_each_node`) refuses a
//! node reached twice, and `scan` refuses a key not above the previous one, an empty leaf
//! below the root, and more node reads than the device has blocks. A hostile tree costs at
//! most time proportional to the device size and memory proportional to the tree depth
//! (scan) or the device size (the node walker), then gives a `Corrupted` error.

use crate::device::Media;
use crate::error::{Error, Result};
use crate::format::node::{
    CAPACITY, NodeImage, NodeView as View, Records, encode_record, push_entry, record_header,
    route_by,
};
use crate::format::{
    BLOCK_SIZE, Geometry, INTERNAL_ENTRY, LEAF_RECORD_HEADER, MAX_TREE_LEVEL, TreeKind,
    blocks_to_bytes,
};
use crate::journal::Tx;
use std::collections::HashSet;

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

const BLOCK: usize = BLOCK_SIZE as usize;

/// The bytes of one node, copied out of the device: every read works on a private copy, never
/// on the shared mapping another thread may be changing.
type NodeBytes = [u8; BLOCK];

/// A node decoded for modification. A leaf keeps its records encoded, exactly as on the
/// device, so changing one record moves bytes instead of allocating a buffer per record.
#[derive(Clone, Debug)]
enum Body {
    Leaf { count: usize, bytes: Vec<u8> },
    Internal(Vec<(u64, u64)>),
}

#[derive(Clone, Debug)]
struct Node {
    level: u16,
    body: Body,
}

/// Where a key is in an encoded leaf: found at `offset` with a payload of `len` bytes, or
/// absent and to be inserted at `offset`.
enum Slot {
    Found { offset: usize, len: usize },
    Absent { offset: usize },
}

fn find_record(bytes: &[u8], key: u64) -> Slot {
    let mut offset = 0;
    while let Some((k, len)) = record_header(&bytes[offset.min(bytes.len())..]) {
        if k == key {
            return Slot::Found { offset, len };
        }
        if k > key {
            break;
        }
        offset += LEAF_RECORD_HEADER + len;
    }
    Slot::Absent { offset }
}

impl Node {
    fn from_view(v: &View<'_>) -> Self {
        let body = if v.is_leaf() {
            Body::Leaf {
                count: v.count,
                bytes: v.data.to_vec(),
            }
        } else {
            Body::Internal(v.entries().collect())
        };
        Node {
            level: v.level,
            body,
        }
    }

    fn encoded_len(&self) -> usize {
        match &self.body {
            Body::Leaf { bytes, .. } => bytes.len(),
            Body::Internal(e) => e.len() * INTERNAL_ENTRY,
        }
    }

    fn len(&self) -> usize {
        match &self.body {
            Body::Leaf { count, .. } => *count,
            Body::Internal(e) => e.len(),
        }
    }

    fn first_key(&self) -> Option<u64> {
        match &self.body {
            Body::Leaf { bytes, .. } => record_header(bytes).map(|(k, _)| k),
            Body::Internal(e) => e.first().map(|e| e.0),
        }
    }
}

fn route(entries: &[(u64, u64)], key: u64) -> usize {
    route_by(entries.len(), |i| entries[i].0, key)
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

    /// Copies node `block` into `buf` and validates it: header (magic, kind, owner, level),
    /// used bytes, every record or entry inside them, strictly increasing keys, children
    /// inside the data area. No allocation.
    fn view<'b>(
        &self,
        tree: &Tree,
        block: u64,
        level: Option<u16>,
        buf: &'b mut NodeBytes,
    ) -> Result<View<'b>> {
        if !self.geometry.is_data_range(block, 1) {
            return Err(self.corrupt(tree, format!("node block {block} outside the data area")));
        }
        self.media.read(blocks_to_bytes(block), buf)?;
        let buf: &'b NodeBytes = buf;
        let v = View::parse(buf, tree.kind, tree.owner, level)
            .map_err(|e| self.corrupt(tree, e.to_string()))?;
        if !v.is_leaf() {
            if let Some((_, child)) = v
                .entries()
                .find(|&(_, c)| !self.geometry.is_data_range(c, 1))
            {
                return Err(
                    self.corrupt(tree, format!("child block {child} outside the data area"))
                );
            }
        }
        Ok(v)
    }

    /// Reads a node decoded for modification.
    fn read_node(&self, tree: &Tree, block: u64, level: Option<u16>) -> Result<Node> {
        let mut buf = [0u8; BLOCK];
        let v = self.view(tree, block, level, &mut buf)?;
        Ok(Node::from_view(&v))
    }

    /// The payload stored under `key`.
    pub fn get(&self, tree: &Tree, key: u64) -> Result<Option<Vec<u8>>> {
        if tree.root == 0 {
            return Ok(None);
        }
        let mut buf = [0u8; BLOCK];
        let mut at = (tree.root, None);
        loop {
            let v = self.view(tree, at.0, at.1, &mut buf)?;
            if v.is_leaf() {
                return Ok(v
                    .records()
                    .find(|r| r.0 >= key)
                    .filter(|r| r.0 == key)
                    .map(|r| r.1.to_vec()));
            }
            at = (v.entry(v.route(key)).1, Some(v.level - 1));
        }
    }

    /// Calls `f(key, payload)` for every record with key >= `from`, in key order, until `f`
    /// returns false.
    ///
    /// Bounded on any tree, however hostile (see [`TreeReader::scan_budget`]): every key the
    /// walk reads must be greater than the one before it, across leaves too (so a subtree
    /// reached a second time, a DAG, ends the scan at its first repeated key, and so do
    /// leaves out of order), a leaf other than the root must hold a record (so a repeated
    /// subtree always repeats a key), and the walk reads at most as many nodes as the device
    /// has blocks. Each of these is a `Corrupted` error.
    pub fn scan(
        &self,
        tree: &Tree,
        from: u64,
        f: &mut dyn FnMut(u64, &[u8]) -> bool,
    ) -> Result<()> {
        if tree.root == 0 {
            return Ok(());
        }
        // Stack of (internal node entries, index of the child being visited, level): one
        // allocation per internal node visited, none per record.
        type Frame = (Vec<(u64, u64)>, usize, u16);
        let mut stack: Vec<Frame> = Vec::new();
        let mut buf = [0u8; BLOCK];
        let mut at = (tree.root, None);
        let mut first_leaf = true;
        let mut budget = self.scan_budget();
        // The last key read (skipped ones included).
        let mut last: Option<u64> = None;
        loop {
            budget = budget.checked_sub(1).ok_or_else(|| {
                self.corrupt(
                    tree,
                    format!(
                        "scan read more nodes than the device has blocks ({}): \
                         a node is reached more than once",
                        self.scan_budget()
                    ),
                )
            })?;
            let v = self.view(tree, at.0, at.1, &mut buf)?;
            if !v.is_leaf() {
                let i = if first_leaf { v.route(from) } else { 0 };
                let (_, child) = v.entry(i);
                at = (child, Some(v.level - 1));
                stack.push((v.entries().collect(), i, v.level));
                continue;
            }
            if v.count == 0 && !stack.is_empty() {
                return Err(self.corrupt(tree, format!("node {}: empty leaf", at.0)));
            }
            let skip = first_leaf;
            first_leaf = false;
            for (k, p) in v.records() {
                if let Some(l) = last.filter(|&l| k <= l) {
                    return Err(self.corrupt(
                        tree,
                        format!(
                            "node {}: key {k:#x} after {l:#x}: keys out of order across \
                             leaves (a misplaced or repeated subtree)",
                            at.0
                        ),
                    ));
                }
                last = Some(k);
                if skip && k < from {
                    continue;
                }
                if !f(k, p) {
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
                    at = (entries[*i].1, Some(*level - 1));
                    break;
                }
                stack.pop();
            }
        }
    }

    /// The most nodes one scan may read: the device's block count. A tree whose nodes are
    /// each reached once has fewer nodes than that, so only a tree that reaches a node more
    /// than once (a DAG or a cycle, which the key-order rule catches first unless its leaves
    /// are empty) can run out of it.
    fn scan_budget(&self) -> u64 {
        self.geometry.block_count
    }

    /// The record with the greatest key <= `key`.
    pub fn floor(&self, tree: &Tree, key: u64) -> Result<Option<(u64, Vec<u8>)>> {
        if tree.root == 0 {
            return Ok(None);
        }
        let mut buf = [0u8; BLOCK];
        let mut at = (tree.root, None);
        // Descend by routing; remember the nearest left sibling subtree for backtracking.
        let mut left_alt: Option<(u64, u16)> = None;
        loop {
            let v = self.view(tree, at.0, at.1, &mut buf)?;
            if !v.is_leaf() {
                let i = v.route(key);
                if i > 0 {
                    left_alt = Some((v.entry(i - 1).1, v.level - 1));
                }
                at = (v.entry(i).1, Some(v.level - 1));
                continue;
            }
            if let Some((k, p)) = v.records().take_while(|r| r.0 <= key).last() {
                return Ok(Some((k, p.to_vec())));
            }
            let Some((block, level)) = left_alt else {
                return Ok(None);
            };
            return self.last_in(tree, block, level);
        }
    }

    /// The greatest record of the subtree at `block`.
    fn last_in(&self, tree: &Tree, block: u64, level: u16) -> Result<Option<(u64, Vec<u8>)>> {
        let mut buf = [0u8; BLOCK];
        let mut at = (block, level);
        loop {
            let v = self.view(tree, at.0, Some(at.1), &mut buf)?;
            if v.is_leaf() {
                return Ok(v.records().last().map(|(k, p)| (k, p.to_vec())));
            }
            at = (v.entry(v.count - 1).1, v.level - 1);
        }
    }

    /// Calls `f(block, level)` for every node of the tree, parents before children, children
    /// in key order (for freeing). Each node is validated as it is read and none may be
    /// reached twice; key ranges are not checked (see [`TreeReader::validate`]), so a tree
    /// written before the separator invariant was enforced can still be freed.
    pub fn for_each_node(
        &self,
        tree: &Tree,
        f: &mut dyn FnMut(u64, u16) -> Result<()>,
    ) -> Result<()> {
        self.walk(tree, false, f)
    }

    /// Like [`TreeReader::for_each_node`], and checks the separator invariant of the module
    /// docs on every node: entry 0 keyed exactly the node's lower bound (0 on the leftmost
    /// spine), every entry and leaf key inside the node's range `[lo, hi)`, no empty leaf
    /// below the root (which `scan` refuses). The first
    /// violation is returned as a `Corrupted` error naming the node; `f` has been called for
    /// every node read until then. For fsck.
    pub fn validate(&self, tree: &Tree, f: &mut dyn FnMut(u64, u16) -> Result<()>) -> Result<()> {
        self.walk(tree, true, f)
    }

    /// The one tree walker. Bounded: every node is read once (a block reached twice is an
    /// error), levels decrease at every step, and blocks lie in the data area.
    fn walk(
        &self,
        tree: &Tree,
        ranges: bool,
        f: &mut dyn FnMut(u64, u16) -> Result<()>,
    ) -> Result<()> {
        if tree.root == 0 {
            return Ok(());
        }
        let mut seen: HashSet<u64> = HashSet::new();
        // (block, expected level, lo, hi); hi = None is 2^64.
        let mut stack: Vec<(u64, Option<u16>, u64, Option<u64>)> = vec![(tree.root, None, 0, None)];
        let mut buf = [0u8; BLOCK];
        let below = |k: u64, hi: Option<u64>| hi.is_none_or(|h| k < h);
        while let Some((block, level, lo, hi)) = stack.pop() {
            if !seen.insert(block) {
                return Err(self.corrupt(tree, format!("node {block} reached twice")));
            }
            let v = self.view(tree, block, level, &mut buf)?;
            f(block, v.level)?;
            let out_of_range = |what: &str, k: u64| {
                let hi = hi.map_or_else(|| "2^64".to_string(), |h| format!("{h:#x}"));
                self.corrupt(
                    tree,
                    format!("node {block}: {what} {k:#x} outside its range [{lo:#x}, {hi})"),
                )
            };
            if v.is_leaf() {
                if ranges {
                    if v.count == 0 && block != tree.root {
                        // No writer leaves one, and scans refuse it (see `scan`).
                        return Err(self.corrupt(tree, format!("node {block}: empty leaf")));
                    }
                    if let Some((k, _)) = v.records().find(|r| r.0 < lo || !below(r.0, hi)) {
                        return Err(out_of_range("key", k));
                    }
                }
                continue;
            }
            if ranges {
                let first = v.entry(0).0;
                if first != lo {
                    return Err(self.corrupt(
                        tree,
                        format!(
                            "node {block}: entry 0 keyed {first:#x}, not the node's lower bound {lo:#x}"
                        ),
                    ));
                }
                let last = v.entry(v.count - 1).0;
                if !below(last, hi) {
                    return Err(out_of_range("separator", last));
                }
            }
            let child_level = Some(v.level - 1);
            for i in (0..v.count).rev() {
                let (k, child) = v.entry(i);
                let child_hi = if i + 1 < v.count {
                    Some(v.entry(i + 1).0)
                } else {
                    hi
                };
                stack.push((child, child_level, k, child_hi));
            }
        }
        Ok(())
    }
}

/// Writes `node` at `block` through the transaction. `fresh` nodes were allocated by this
/// transaction, so their old contents need no undo record.
fn write_node(tx: &mut Tx<'_>, tree: &Tree, block: u64, node: &Node, fresh: bool) -> Result<()> {
    let mut entries = Vec::new();
    let body = match &node.body {
        Body::Leaf { bytes, .. } => bytes,
        Body::Internal(e) => {
            entries.reserve(e.len() * INTERNAL_ENTRY);
            for &(k, c) in e {
                push_entry(&mut entries, k, c);
            }
            &entries
        }
    };
    let image = NodeImage::new(tree.kind, tree.owner, node.level, node.len(), body)
        .ok_or_else(|| Error::corrupted("tree node", tree.owner, "node overflow"))?;
    let encoded = image.used();
    let off = blocks_to_bytes(block);
    if fresh {
        tx.write_new(off, encoded)?;
    } else {
        // Log the whole node once: later rewrites in the same transaction (a node filling
        // up record by record) then need no undo record of their own.
        tx.write_within(off, encoded, BLOCK_SIZE)?;
    }
    Ok(())
}

/// Splits an over-full node into two by bytes; returns the right half. A leaf splits at the
/// first record boundary where the left half reaches half of the bytes, keeping at least one
/// record on each side.
fn split(node: &mut Node) -> Node {
    let total = node.encoded_len();
    match &mut node.body {
        Body::Leaf { count, bytes } => {
            let last = count.saturating_sub(1);
            let mut acc = 0;
            let mut at = last;
            for (i, (_, p)) in Records::new(bytes).enumerate() {
                acc += LEAF_RECORD_HEADER + p.len();
                if acc >= total / 2 {
                    at = (i + 1).min(last);
                    break;
                }
            }
            let at = at.max(1);
            let byte_at: usize = Records::new(bytes)
                .take(at)
                .map(|(_, p)| LEAF_RECORD_HEADER + p.len())
                .sum();
            let right = bytes.split_off(byte_at);
            let right_count = count.saturating_sub(at);
            *count = at;
            Node {
                level: 0,
                body: Body::Leaf {
                    count: right_count,
                    bytes: right,
                },
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

/// One internal node on the way from the root to a leaf.
struct Step {
    block: u64,
    node: Node,
    /// Index of the child taken.
    index: usize,
    /// Entry 0 was rekeyed to the node's lower bound: the node must be written back.
    rekeyed: bool,
}

/// The internal nodes on the way from the root to the leaf for `key`, then the leaf's block
/// and node. The tree must not be empty.
type Path = Vec<Step>;

/// Sets entry 0 of an internal node to `lo`, the lower bound of the node's range, if it
/// differs (a tree written before the separator invariant was enforced). Returns whether it
/// changed; refuses when `lo` is not below entry 1 (the parent and the node disagree).
fn rekey_first(tree: &Tree, entries: &mut [(u64, u64)], lo: u64) -> Result<bool> {
    let Some(first) = entries.first().map(|e| e.0) else {
        return Ok(false);
    };
    if first == lo {
        return Ok(false);
    }
    if entries.get(1).is_some_and(|e| e.0 <= lo) {
        return Err(Error::corrupted(
            "tree node",
            tree.owner,
            format!(
                "entry 1 keyed {:#x}, not above the node's lower bound {lo:#x}",
                entries[1].0
            ),
        ));
    }
    entries[0].0 = lo;
    Ok(true)
}

/// Descends to the leaf for `key`, rekeying entry 0 of every node on the way to the node's
/// lower bound (see the module docs) so a split below it places its separator in order.
fn descend(r: &TreeReader<'_>, tree: &Tree, key: u64) -> Result<(Path, u64, Node)> {
    let mut path = Path::new();
    let mut block = tree.root;
    let mut lo = 0;
    let mut node = r.read_node(tree, block, None)?;
    while let Body::Internal(entries) = &mut node.body {
        let rekeyed = rekey_first(tree, entries, lo)?;
        let index = route(entries, key);
        let (child_lo, child) = entries[index];
        let level = node.level;
        path.push(Step {
            block,
            node,
            index,
            rekeyed,
        });
        block = child;
        lo = child_lo;
        node = r.read_node(tree, block, Some(level - 1))?;
    }
    Ok((path, block, node))
}

/// Rekeys entry 0 of the internal node at `block` and, down the leftmost spine below it, of
/// every internal node, to `lo`: the node's range now starts at `lo`. Stops at the first node
/// already keyed `lo` (the invariant holds below it) or at a leaf.
fn rekey_left_spine(
    tx: &mut Tx<'_>,
    r: &TreeReader<'_>,
    tree: &Tree,
    mut block: u64,
    mut level: Option<u16>,
    lo: u64,
) -> Result<()> {
    loop {
        let mut node = r.read_node(tree, block, level)?;
        let Body::Internal(entries) = &mut node.body else {
            return Ok(());
        };
        if !rekey_first(tree, entries, lo)? {
            return Ok(());
        }
        let child = entries[0].1;
        write_node(tx, tree, block, &node, false)?;
        block = child;
        level = Some(node.level - 1);
    }
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
            body: Body::Leaf {
                count: 1,
                bytes: encode_record(key, payload).collect(),
            },
        };
        write_node(tx, tree, block, &node, true)?;
        tree.root = block;
        return Ok(());
    }
    let (mut path, mut block, mut node) = descend(r, tree, key)?;
    if let Body::Leaf { count, bytes } = &mut node.body {
        match find_record(bytes, key) {
            Slot::Found { offset, len } => {
                bytes.splice(
                    offset..offset + LEAF_RECORD_HEADER + len,
                    encode_record(key, payload),
                );
            }
            Slot::Absent { offset } => {
                bytes.splice(offset..offset, encode_record(key, payload));
                *count += 1;
            }
        }
    }
    // Write back, splitting upwards while a node overflows.
    // (separator key, new right block, index of the child that split) for the parent.
    let mut pending: Option<(u64, u64, usize)> = None;
    loop {
        if let Some((sep, right_block, split_at)) = pending.take() {
            if let Body::Internal(entries) = &mut node.body {
                // The new sibling goes right after the child that split: the path says which
                // one. Searching by key instead would put it elsewhere whenever an entry key
                // is not a lower bound of its subtree. The separator must fall strictly
                // between the neighbours' keys, or the node would be written out of order.
                let ordered = entries.get(split_at).is_some_and(|e| e.0 < sep)
                    && entries.get(split_at + 1).is_none_or(|e| sep < e.0);
                if !ordered {
                    return Err(Error::corrupted(
                        "tree node",
                        tree.owner,
                        format!("separator {sep:#x} outside the range of child {split_at}"),
                    ));
                }
                entries.insert(split_at + 1, (sep, right_block));
            }
        }
        if node.encoded_len() <= CAPACITY {
            write_node(tx, tree, block, &node, false)?;
            // The nodes above took no separator, but one whose entry 0 the descent rekeyed
            // must be written too.
            for step in path.iter().filter(|s| s.rekeyed) {
                write_node(tx, tree, step.block, &step.node, false)?;
            }
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
            Some(step) => {
                pending = Some((sep, right_block, step.index));
                block = step.block;
                node = step.node;
            }
            None => {
                if node.level >= MAX_TREE_LEVEL {
                    return Err(Error::NoSpace);
                }
                // The new root covers every key: its entry 0 is keyed 0 (the old root's
                // entry 0, if internal, already is: the descent rekeyed it to its `lo`, 0).
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
        Body::Leaf { count, bytes } => match find_record(bytes, key) {
            Slot::Found { offset, len } => {
                let payload = offset + LEAF_RECORD_HEADER..offset + LEAF_RECORD_HEADER + len;
                let removed = bytes.get(payload).map(<[u8]>::to_vec).unwrap_or_default();
                bytes.drain(offset..offset + LEAF_RECORD_HEADER + len);
                *count -= 1;
                removed
            }
            Slot::Absent { .. } => return Ok(None),
        },
        Body::Internal(_) => return Ok(None),
    };
    // Free emptied nodes upwards. `first_gone` is set when the last node changed lost its
    // first child: its new first child then covers a wider range than before.
    let mut first_gone = false;
    loop {
        if node.len() > 0 || path.is_empty() {
            break;
        }
        alloc.free_node(tx, tree.owner, block)?;
        let Some(step) = path.pop() else {
            break;
        };
        let (i, mut pnode) = (step.index, step.node);
        if let Body::Internal(entries) = &mut pnode.body {
            let (removed_key, _) = entries.remove(i);
            // Entry 0's key is the lower bound of the whole node's range: keep it when the
            // first child goes, or keys below the new first key would route to a child
            // whose key is larger than they are.
            first_gone = i == 0;
            if first_gone {
                if let Some(first) = entries.first_mut() {
                    first.0 = removed_key;
                }
            }
        }
        block = step.block;
        node = pnode;
    }
    if node.len() == 0 {
        // The root itself is empty.
        alloc.free_node(tx, tree.owner, block)?;
        tree.root = 0;
        return Ok(Some(removed));
    }
    write_node(tx, tree, block, &node, false)?;
    if let (true, Body::Internal(entries)) = (first_gone, &node.body) {
        // The new first child's range now starts at this node's lower bound; if it is an
        // internal node, its entry 0 (and its leftmost spine's) still holds its old key.
        if let Some(&(lo, child)) = entries.first() {
            rekey_left_spine(tx, r, tree, child, Some(node.level - 1), lo)?;
        }
    }
    // Collapse a root with a single child. Each promoted child must sit one level below the
    // node it replaces, so a hostile chain of single-entry nodes (even one pointing back at
    // itself) ends in an error after at most MAX_TREE_LEVEL steps.
    let old_root = tree.root;
    let mut level = None;
    loop {
        let root = r.read_node(tree, tree.root, level)?;
        match root.body {
            Body::Internal(entries) if entries.len() == 1 => {
                alloc.free_node(tx, tree.owner, tree.root)?;
                tree.root = entries[0].1;
                level = Some(root.level - 1);
            }
            _ => break,
        }
    }
    if tree.root != old_root {
        // The promoted child covers every key now: its leftmost spine is keyed 0.
        rekey_left_spine(tx, r, tree, tree.root, None, 0)?;
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
