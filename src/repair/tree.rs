//! B+trees as the repair sees them: a lenient walk that salvages every record it can read
//! from a damaged tree, and a bulk builder that writes a fresh tree from sorted records.
//!
//! The walk never trusts a node: each block must lie in the data area, be claimed by no other
//! object, be visited once, decode (header, bounds, key order) and sit exactly one level
//! below its parent; anything else drops that node's subtree and marks the tree damaged.
//! Records of nodes that decode are all kept (sorted, the first of equal keys winning), and a
//! tree that breaks the separator invariant (`btree::TreeReader::validate`) is damaged too,
//! so fsck rebuilds what its check reports.

use super::bits::Bits;
use crate::btree::{Tree, TreeReader};
use crate::device::Media;
use crate::error::{Error, Result};
use crate::format::node::{
    CAPACITY, LenientBody, NodeImage, parse_lenient, push_entry, push_record,
};
use crate::format::{
    BLOCK_SIZE, Geometry, INTERNAL_ENTRY, LEAF_RECORD_HEADER, MAX_TREE_LEVEL, TreeKind,
    blocks_to_bytes,
};
use std::collections::HashSet;
/// Fill leaves to this many bytes, leaving room for a few inserts before the first split.
const LEAF_FILL: usize = CAPACITY * 7 / 8;
/// Children per internal node when building.
const FANOUT: usize = CAPACITY / INTERNAL_ENTRY * 7 / 8;

/// What a lenient walk found.
#[derive(Debug, Default)]
pub(super) struct Walk {
    /// Blocks of the nodes that decoded, in visiting order.
    pub nodes: Vec<u64>,
    /// Leaf records in key order (out-of-order records are dropped).
    pub records: Vec<(u64, Vec<u8>)>,
    /// Why the tree is damaged (the first reason), or `None` when it is intact.
    pub damage: Option<String>,
}

impl Walk {
    fn damaged(&mut self, why: String) {
        if self.damage.is_none() {
            self.damage = Some(why);
        }
    }
}

/// Walks the tree at `root` leniently. `claimed` holds the blocks other objects own.
pub(super) fn walk(
    media: &dyn Media,
    g: &Geometry,
    kind: TreeKind,
    owner: u64,
    root: u64,
    claimed: &Bits,
) -> Result<Walk> {
    let mut w = Walk::default();
    if root == 0 {
        return Ok(w);
    }
    let mut seen: HashSet<u64> = HashSet::new();
    // Depth-first, children in order: (block, expected level).
    let mut stack: Vec<(u64, Option<u16>)> = vec![(root, None)];
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    while let Some((block, level)) = stack.pop() {
        if !g.is_data_range(block, 1) {
            w.damaged(format!("node block {block} outside the data area"));
            continue;
        }
        if claimed.get(block) {
            w.damaged(format!("node block {block} is also used by another object"));
            continue;
        }
        if !seen.insert(block) {
            w.damaged(format!("node block {block} reached twice (cycle)"));
            continue;
        }
        media.read(blocks_to_bytes(block), &mut buf)?;
        let (lvl, body, note) = match parse_lenient(&buf, kind, owner, level) {
            Ok(x) => x,
            Err(e) => {
                w.damaged(format!("node {block}: {e}"));
                continue;
            }
        };
        if let Some(n) = note {
            w.damaged(format!("node {block}: {n}"));
        }
        w.nodes.push(block);
        match body {
            LenientBody::Leaf(recs) => {
                if let (Some((prev, _)), Some((k, _))) = (w.records.last(), recs.first()) {
                    if *prev >= *k {
                        w.damaged(format!("node {block}: key {k:#x} out of order"));
                    }
                }
                // Kept even when out of order: a misplaced separator leaves whole leaves in
                // the wrong place, and their records are still this tree's. Sorted below.
                w.records.extend(recs);
            }
            LenientBody::Internal(entries) => {
                for &(_, child) in entries.iter().rev() {
                    stack.push((child, Some(lvl - 1)));
                }
            }
        }
    }
    if w.damage.is_some() {
        // Key order across leaves, first copy of a key wins.
        w.records.sort_by_key(|(k, _)| *k);
        w.records.dedup_by_key(|(k, _)| *k);
    } else if let Err(e) =
        TreeReader::new(media, g).validate(&Tree { kind, owner, root }, &mut |_, _| Ok(()))
    {
        // Every node decoded and the records are in order, but the separator invariant may
        // still be broken (a tree written by an older version): rebuild it.
        w.damaged(e.to_string());
    }
    Ok(w)
}

/// Encodes one node image.
fn node_image(
    kind: TreeKind,
    owner: u64,
    level: u16,
    count: usize,
    body: &[u8],
) -> Result<Vec<u8>> {
    NodeImage::new(kind, owner, level, count, body)
        .map(|n| n.block().to_vec())
        .ok_or_else(|| Error::corrupted("tree node", owner, "node overflow"))
}

/// A freshly built tree: its root and the node images to write at their blocks.
#[derive(Debug, Default)]
pub(crate) struct Built {
    pub root: u64,
    pub nodes: Vec<(u64, Vec<u8>)>,
}

/// Builds a tree bottom-up from records sorted by strictly increasing key. `alloc` hands out
/// blocks for the nodes. The tree satisfies the separator invariant of `btree`.
pub(crate) fn build(
    kind: TreeKind,
    owner: u64,
    records: &[(u64, Vec<u8>)],
    alloc: &mut dyn FnMut() -> Result<u64>,
) -> Result<Built> {
    let mut out = Built::default();
    if records.is_empty() {
        return Ok(out);
    }
    // Leaves.
    let mut level_nodes: Vec<(u64, u64)> = Vec::new(); // (first key, block)
    let mut body: Vec<u8> = Vec::new();
    let mut count = 0usize;
    let mut first_key = 0u64;
    // Writes the leaf in `body` and notes it for the level above.
    let mut leaf = |body: &mut Vec<u8>, count: &mut usize, first_key: u64| -> Result<()> {
        let block = alloc()?;
        out.nodes
            .push((block, node_image(kind, owner, 0, *count, body)?));
        level_nodes.push((first_key, block));
        body.clear();
        *count = 0;
        Ok(())
    };
    for (k, p) in records {
        let rec = LEAF_RECORD_HEADER + p.len();
        if rec > CAPACITY {
            return Err(Error::corrupted("tree record", owner, "payload too large"));
        }
        if count > 0 && body.len() + rec > LEAF_FILL {
            leaf(&mut body, &mut count, first_key)?;
        }
        if count == 0 {
            first_key = *k;
        }
        push_record(&mut body, *k, p);
        count += 1;
    }
    leaf(&mut body, &mut count, first_key)?;
    // Internal levels. Each node is keyed in its parent by its first key, which is also its
    // own entry 0, except on the leftmost spine: the tree covers every key, so the first
    // node of each level is keyed 0 (the separator invariant, btree's module docs). Keyed by
    // the minimum instead, keys inserted below it later would misplace a split.
    let mut level = 0u16;
    while level_nodes.len() > 1 {
        level += 1;
        if let Some(first) = level_nodes.first_mut() {
            first.0 = 0;
        }
        if level > MAX_TREE_LEVEL {
            return Err(Error::corrupted("tree", owner, "too deep"));
        }
        let mut next = Vec::new();
        for group in level_nodes.chunks(FANOUT) {
            let mut body = Vec::with_capacity(group.len() * INTERNAL_ENTRY);
            for &(k, b) in group {
                push_entry(&mut body, k, b);
            }
            let block = alloc()?;
            out.nodes
                .push((block, node_image(kind, owner, level, group.len(), &body)?));
            next.push((group[0].0, block));
        }
        level_nodes = next;
    }
    out.root = level_nodes[0].1;
    Ok(out)
}
