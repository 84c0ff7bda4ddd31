//! B+tree nodes: the one codec of a node's bytes (docs/FORMAT.md, "NodeHeader"), shared by
//! the core's trees (`btree`) and the repair (`repair::tree`).
//!
//! One record iterator ([`RawRecords`]) checks each leaf record against the used bytes and
//! the key order; the strict parser ([`NodeView::parse`], for the core and the checker)
//! refuses a node at the first fault, the lenient one ([`parse_lenient`], for the repair)
//! keeps what came before it. One encoder ([`NodeImage`]) writes the header, records and
//! entries for both the core's node writes and the repair's bulk builder.

use super::{
    BLOCK_SIZE, FormatError, INTERNAL_ENTRY, LEAF_RECORD_HEADER, NodeHeader, TreeKind, check_node,
};
use zerocopy::{FromBytes, IntoBytes};

/// Size of the node header.
pub const HEADER: usize = size_of::<NodeHeader>();
/// Bytes available for records or entries in a node.
pub const CAPACITY: usize = BLOCK_SIZE as usize - HEADER;

/// Why a node does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeDamage {
    #[error("short node")]
    Short,
    #[error("{0}")]
    Header(String),
    #[error("used bytes beyond the node")]
    UsedBeyond,
    #[error("record beyond used bytes")]
    RecordBeyond,
    #[error("payload beyond used bytes")]
    PayloadBeyond,
    #[error("leaf keys out of order")]
    LeafOrder,
    #[error("leaf used bytes do not match its records")]
    LeafUsed,
    #[error("internal node size")]
    InternalSize,
    #[error("internal keys out of order")]
    InternalOrder,
}

impl From<FormatError> for NodeDamage {
    fn from(e: FormatError) -> Self {
        Self::Header(e.to_string())
    }
}

/// Decodes a leaf record header at the start of `rest`: (key, payload length).
pub fn record_header(rest: &[u8]) -> Option<(u64, usize)> {
    let key = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    let len = u16::from_le_bytes(rest.get(8..LEAF_RECORD_HEADER)?.try_into().ok()?);
    Some((key, usize::from(len)))
}

/// Encoded leaf records (`key u64, len u16, payload`) of bytes already checked by a parser:
/// stops at anything that does not parse.
#[derive(Clone, Copy, Debug)]
pub struct Records<'b> {
    rest: &'b [u8],
}

impl<'b> Records<'b> {
    pub fn new(bytes: &'b [u8]) -> Self {
        Self { rest: bytes }
    }
}

impl<'b> Iterator for Records<'b> {
    /// (key, payload)
    type Item = (u64, &'b [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let (key, len) = record_header(self.rest)?;
        let payload = self
            .rest
            .get(LEAF_RECORD_HEADER..LEAF_RECORD_HEADER + len)?;
        self.rest = self.rest.get(LEAF_RECORD_HEADER + len..)?;
        Some((key, payload))
    }
}

/// The one checking iterator over the `count` records of a leaf's used bytes: each record
/// must lie inside them and keys must strictly increase. It yields the first fault and then
/// ends; [`RawRecords::rest`] says how many bytes the records left over.
#[derive(Clone, Debug)]
pub struct RawRecords<'b> {
    data: &'b [u8],
    at: usize,
    left: usize,
    last: Option<u64>,
    failed: bool,
}

impl<'b> RawRecords<'b> {
    pub fn new(data: &'b [u8], count: usize) -> Self {
        Self {
            data,
            at: 0,
            left: count,
            last: None,
            failed: false,
        }
    }

    /// Bytes after the records read so far.
    pub fn rest(&self) -> usize {
        self.data.len() - self.at
    }
}

impl<'b> Iterator for RawRecords<'b> {
    type Item = Result<(u64, &'b [u8]), NodeDamage>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 || self.failed {
            return None;
        }
        self.left -= 1;
        let r = (|| {
            let (key, len) = self
                .data
                .get(self.at..)
                .and_then(record_header)
                .ok_or(NodeDamage::RecordBeyond)?;
            let start = self.at + LEAF_RECORD_HEADER;
            let p = self
                .data
                .get(start..start + len)
                .ok_or(NodeDamage::PayloadBeyond)?;
            if self.last.is_some_and(|k| k >= key) {
                return Err(NodeDamage::LeafOrder);
            }
            self.last = Some(key);
            self.at = start + len;
            Ok((key, p))
        })();
        self.failed = r.is_err();
        Some(r)
    }
}

/// Internal entry `i` of an internal node's used bytes: (key, child); (0, 0) past the end.
pub fn entry_at(data: &[u8], i: usize) -> (u64, u64) {
    let at = i * INTERNAL_ENTRY;
    let word = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    (word(at), word(at + 8))
}

/// Index of the child to follow for `key` among `count` increasing entry keys: the last
/// entry whose key is <= `key`, or 0.
pub fn route_by(count: usize, key_of: impl Fn(usize) -> u64, key: u64) -> usize {
    let (mut lo, mut hi) = (0, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if key_of(mid) <= key {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo.saturating_sub(1)
}

/// The header of the node in `buf`, checked against what the caller expects, and its used
/// bytes.
fn header(
    buf: &[u8],
    kind: TreeKind,
    owner: u64,
    level: Option<u16>,
) -> Result<(NodeHeader, &[u8]), NodeDamage> {
    let (h, rest) = NodeHeader::read_from_prefix(buf).map_err(|_| NodeDamage::Short)?;
    check_node(&h, kind, owner, level)?;
    let data = rest.get(..h.used as usize).ok_or(NodeDamage::UsedBeyond)?;
    Ok((h, data))
}

/// A node that passed the strict parse, borrowed from its bytes.
#[derive(Clone, Copy, Debug)]
pub struct NodeView<'b> {
    pub level: u16,
    pub count: usize,
    /// The used bytes after the header: records of a leaf, or entries of an internal node.
    pub data: &'b [u8],
}

impl<'b> NodeView<'b> {
    /// Parses a node strictly: header (magic, kind, owner, level, used), every record inside
    /// the used bytes and filling them exactly, strictly increasing keys; an internal node
    /// has `count` ≥ 1 whole entries. Child blocks are the caller's to check (they need the
    /// geometry).
    pub fn parse(
        buf: &'b [u8],
        kind: TreeKind,
        owner: u64,
        level: Option<u16>,
    ) -> Result<Self, NodeDamage> {
        let (h, data) = header(buf, kind, owner, level)?;
        let v = Self {
            level: h.level,
            count: usize::from(h.count),
            data,
        };
        if v.is_leaf() {
            let mut recs = RawRecords::new(data, v.count);
            for r in recs.by_ref() {
                r?;
            }
            if recs.rest() != 0 {
                return Err(NodeDamage::LeafUsed);
            }
        } else {
            if v.count * INTERNAL_ENTRY != data.len() || v.count == 0 {
                return Err(NodeDamage::InternalSize);
            }
            if (1..v.count).any(|i| v.entry(i - 1).0 >= v.entry(i).0) {
                return Err(NodeDamage::InternalOrder);
            }
        }
        Ok(v)
    }

    pub fn is_leaf(&self) -> bool {
        self.level == 0
    }

    /// The records of a leaf.
    pub fn records(&self) -> Records<'b> {
        Records::new(self.data)
    }

    /// Internal entry `i`: (key, child).
    pub fn entry(&self, i: usize) -> (u64, u64) {
        entry_at(self.data, i)
    }

    pub fn entries(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        (0..self.count).map(|i| self.entry(i))
    }

    /// The child to follow for `key`: the last entry whose key is <= `key`, or entry 0.
    pub fn route(&self, key: u64) -> usize {
        route_by(self.count, |i| self.entry(i).0, key)
    }
}

/// What a lenient parse keeps of a node.
#[derive(Debug)]
pub enum LenientBody {
    Leaf(Vec<(u64, Vec<u8>)>),
    Internal(Vec<(u64, u64)>),
}

/// Parses a node leniently, for the repair: a header or internal-node size that does not
/// check out is an error; a leaf that goes bad part-way keeps its records up to the fault,
/// and internal keys out of order are kept. Returns the level, the body and the first fault
/// (`None` for a node the strict parse accepts).
pub fn parse_lenient(
    buf: &[u8],
    kind: TreeKind,
    owner: u64,
    level: Option<u16>,
) -> Result<(u16, LenientBody, Option<NodeDamage>), NodeDamage> {
    let (h, data) = header(buf, kind, owner, level)?;
    let count = usize::from(h.count);
    if h.level == 0 {
        let mut recs = Vec::with_capacity(count);
        let mut it = RawRecords::new(data, count);
        for r in it.by_ref() {
            match r {
                Ok((k, p)) => recs.push((k, p.to_vec())),
                Err(e) => return Ok((0, LenientBody::Leaf(recs), Some(e))),
            }
        }
        let note = (it.rest() != 0).then_some(NodeDamage::LeafUsed);
        Ok((0, LenientBody::Leaf(recs), note))
    } else {
        if count == 0 || count * INTERNAL_ENTRY != data.len() {
            return Err(NodeDamage::InternalSize);
        }
        let entries: Vec<(u64, u64)> = (0..count).map(|i| entry_at(data, i)).collect();
        let note = entries
            .windows(2)
            .any(|w| w[0].0 >= w[1].0)
            .then_some(NodeDamage::InternalOrder);
        Ok((h.level, LenientBody::Internal(entries), note))
    }
}

/// Appends one encoded leaf record (a payload of at most `u16::MAX` bytes).
pub fn push_record(out: &mut Vec<u8>, key: u64, payload: &[u8]) {
    out.extend(encode_record(key, payload));
}

/// The bytes of one leaf record.
pub fn encode_record(key: u64, payload: &[u8]) -> impl Iterator<Item = u8> + '_ {
    debug_assert!(payload.len() <= usize::from(u16::MAX));
    let len = payload.len() as u16;
    key.to_le_bytes()
        .into_iter()
        .chain(len.to_le_bytes())
        .chain(payload.iter().copied())
}

/// Appends one internal entry.
pub fn push_entry(out: &mut Vec<u8>, key: u64, child: u64) {
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(&child.to_le_bytes());
}

/// The one node encoder: a whole block, header then body, the rest zero.
#[derive(Debug)]
pub struct NodeImage {
    bytes: Box<[u8; BLOCK_SIZE as usize]>,
    used: usize,
}

impl NodeImage {
    /// A node of `level` holding `count` records (leaf) or entries (internal) encoded in
    /// `body` (records by [`push_record`], entries by [`push_entry`]). `None` when they do
    /// not fit a node or `count` a u16.
    pub fn new(kind: TreeKind, owner: u64, level: u16, count: usize, body: &[u8]) -> Option<Self> {
        let mut h = NodeHeader::new(kind, level, owner);
        h.count = u16::try_from(count).ok()?;
        h.used = u32::try_from(body.len()).ok()?;
        let mut bytes = Box::new([0u8; BLOCK_SIZE as usize]);
        bytes
            .get_mut(HEADER..HEADER + body.len())?
            .copy_from_slice(body);
        bytes[..HEADER].copy_from_slice(h.as_bytes());
        Some(Self {
            bytes,
            used: HEADER + body.len(),
        })
    }

    /// The header and the used bytes (what a node write must store).
    pub fn used(&self) -> &[u8] {
        &self.bytes[..self.used]
    }

    /// The whole block.
    pub fn block(&self) -> &[u8] {
        &self.bytes[..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(records: &[(u64, &[u8])]) -> NodeImage {
        let mut body = Vec::new();
        for (k, p) in records {
            push_record(&mut body, *k, p);
        }
        NodeImage::new(TreeKind::Directory, 7, 0, records.len(), &body).unwrap()
    }

    #[test]
    fn encode_then_parse_both_ways() {
        let img = leaf(&[(1, b"a"), (5, b"bcd")]);
        let v = NodeView::parse(img.block(), TreeKind::Directory, 7, Some(0)).unwrap();
        assert_eq!(
            v.records().collect::<Vec<_>>(),
            [(1, &b"a"[..]), (5, &b"bcd"[..])]
        );
        let (lvl, body, note) = parse_lenient(img.block(), TreeKind::Directory, 7, None).unwrap();
        assert_eq!((lvl, note), (0, None));
        assert!(matches!(body, LenientBody::Leaf(r) if r.len() == 2));

        let mut body = Vec::new();
        push_entry(&mut body, 0, 100);
        push_entry(&mut body, 9, 101);
        let img = NodeImage::new(TreeKind::Extents, 3, 1, 2, &body).unwrap();
        let v = NodeView::parse(img.block(), TreeKind::Extents, 3, None).unwrap();
        assert_eq!(v.entries().collect::<Vec<_>>(), [(0, 100), (9, 101)]);
        assert!(NodeView::parse(img.block(), TreeKind::Directory, 3, None).is_err());
    }

    /// The strict parse's fault and the lenient parse's (body, fault) for one image.
    fn both(img: &NodeImage, kind: TreeKind, owner: u64) -> (NodeDamage, LenientBody, NodeDamage) {
        let strict = NodeView::parse(img.block(), kind, owner, None).unwrap_err();
        let (_, body, note) = parse_lenient(img.block(), kind, owner, None).unwrap();
        (strict, body, note.unwrap())
    }

    #[test]
    fn strict_refuses_what_lenient_salvages() {
        let img = leaf(&[(5, b"x"), (1, b"y"), (9, b"z")]);
        let (strict, body, note) = both(&img, TreeKind::Directory, 7);
        assert_eq!(
            (strict, note),
            (NodeDamage::LeafOrder, NodeDamage::LeafOrder)
        );
        assert!(matches!(body, LenientBody::Leaf(r) if r == [(5, b"x".to_vec())]));
        // A count larger than the records.
        let mut b = Vec::new();
        push_record(&mut b, 1, b"q");
        let img = NodeImage::new(TreeKind::Directory, 7, 0, 2, &b).unwrap();
        assert_eq!(
            NodeView::parse(img.block(), TreeKind::Directory, 7, None).unwrap_err(),
            NodeDamage::RecordBeyond
        );
        // Internal keys out of order: strict refuses, lenient keeps every entry.
        let mut body = Vec::new();
        push_entry(&mut body, 4, 100);
        push_entry(&mut body, 2, 101);
        let img = NodeImage::new(TreeKind::Extents, 3, 1, 2, &body).unwrap();
        let (strict, body, note) = both(&img, TreeKind::Extents, 3);
        assert_eq!(
            (strict, note),
            (NodeDamage::InternalOrder, NodeDamage::InternalOrder)
        );
        assert!(matches!(body, LenientBody::Internal(e) if e.len() == 2));
        assert!(NodeImage::new(TreeKind::Extents, 3, 0, 1, &[0; CAPACITY + 1]).is_none());
    }
}
