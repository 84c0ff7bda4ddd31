//! Extended attributes: one contiguous area per inode (header + entries), rewritten
//! copy-on-write on every change, so a change is one pointer swap in the inode.
//!
//! Entry: name length (u8), value length (u32 LE), name, value.

use crate::device::Media;
use crate::error::{Error, Result};
use crate::format::{
    BLOCK_SIZE, Geometry, Inode, XATTR_AREA_MAX_BLOCKS, XATTR_MAGIC, XattrHeader, blocks_to_bytes,
    checksum,
};
use zerocopy::{FromBytes, IntoBytes};

const HEADER: usize = size_of::<XattrHeader>();

pub type Attrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Loads and validates the xattrs of an inode.
pub fn load(media: &dyn Media, geometry: &Geometry, ino: u64, inode: &Inode) -> Result<Attrs> {
    if inode.xattr_block == 0 {
        return Ok(Vec::new());
    }
    let bad = |d: &str| Error::corrupted("xattr area", ino, d.to_string());
    let blocks = u64::from(inode.xattr_blocks);
    if blocks == 0
        || blocks > u64::from(XATTR_AREA_MAX_BLOCKS)
        || !geometry.is_data_range(inode.xattr_block, blocks)
    {
        return Err(bad("area outside the data region"));
    }
    let mut buf = vec![0u8; blocks_to_bytes(blocks) as usize];
    media.read(blocks_to_bytes(inode.xattr_block), &mut buf)?;
    let (h, rest) = XattrHeader::read_from_prefix(&buf).map_err(|_| bad("short"))?;
    if h.magic != XATTR_MAGIC || h.owner != ino {
        return Err(bad("bad magic or owner"));
    }
    let data = rest
        .get(..h.used as usize)
        .ok_or_else(|| bad("used beyond area"))?;
    if checksum(data) != h.crc {
        return Err(bad("checksum mismatch"));
    }
    let mut out = Vec::new();
    let mut at = 0usize;
    for _ in 0..h.count {
        let nl = usize::from(*data.get(at).ok_or_else(|| bad("truncated entry"))?);
        let vl = data
            .get(at + 1..at + 5)
            .ok_or_else(|| bad("truncated entry"))?;
        let vl = u32::from_le_bytes(vl.try_into().map_err(|_| bad("entry"))?) as usize;
        let name = data
            .get(at + 5..at + 5 + nl)
            .ok_or_else(|| bad("name beyond area"))?;
        let value = data
            .get(at + 5 + nl..at + 5 + nl + vl)
            .ok_or_else(|| bad("value beyond area"))?;
        if nl == 0 {
            return Err(bad("empty name"));
        }
        out.push((name.to_vec(), value.to_vec()));
        at += 5 + nl + vl;
    }
    if at != data.len() {
        return Err(bad("used bytes do not match entries"));
    }
    Ok(out)
}

/// Encodes an xattr set into an area image (header included); `None` for an empty set.
pub fn encode(ino: u64, attrs: &Attrs) -> Result<Option<Vec<u8>>> {
    if attrs.is_empty() {
        return Ok(None);
    }
    let mut data = Vec::new();
    for (n, v) in attrs {
        data.push(u8::try_from(n.len()).map_err(|_| Error::Range)?);
        data.extend_from_slice(&(v.len() as u32).to_le_bytes());
        data.extend_from_slice(n);
        data.extend_from_slice(v);
    }
    let total = HEADER + data.len();
    if total as u64 > blocks_to_bytes(u64::from(XATTR_AREA_MAX_BLOCKS)) {
        return Err(Error::NoSpace);
    }
    let h = XattrHeader {
        magic: XATTR_MAGIC,
        count: attrs.len() as u32,
        used: data.len() as u32,
        crc: checksum(&data),
        owner: ino,
        reserved: 0,
    };
    let mut out = Vec::with_capacity(total.next_multiple_of(BLOCK_SIZE as usize));
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&data);
    out.resize(total.next_multiple_of(BLOCK_SIZE as usize), 0);
    Ok(Some(out))
}
