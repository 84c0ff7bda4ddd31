//! Reading and writing the space summary (`format::space`) and the bitmap it governs: the
//! one place that knows which bitmap words may be read (those of initialised regions) and
//! what the others mean (all free). The allocator, mkfs, fsck's check and its repair use it.

use crate::device::{DeviceError, Media};
use crate::format::bitmap as bits;
use crate::format::space::{
    COUNTS_VALID_OFFSET, REGION_BITMAP_BYTES, REGION_BLOCKS, RegionEntry, SUMMARY_ENTRIES_OFFSET,
    SummaryHeader,
};
use crate::format::{BLOCK_SIZE, FormatError, Geometry, blocks_to_bytes};
use zerocopy::IntoBytes;

/// Words of the bitmap that cover one region.
pub const REGION_WORDS: usize = (REGION_BLOCKS / 64) as usize;

/// The space summary as read from the media, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpaceSummary {
    /// Every count is exact (written at a clean unmount).
    pub counts_valid: bool,
    pub regions: Vec<RegionEntry>,
}

/// Blocks of region `r` (the last one may be short).
pub fn region_blocks(g: &Geometry, r: u64) -> u64 {
    let start = r * REGION_BLOCKS;
    (start + REGION_BLOCKS)
        .min(g.block_count)
        .saturating_sub(start)
}

impl SpaceSummary {
    /// Reads the summary of `g`; `Ok(None)` for a file system without one (format version 2
    /// and older: every region is initialised and no count is known). Any value out of
    /// range is an error naming the region.
    pub fn read(media: &dyn Media, g: &Geometry) -> Result<Option<Self>, FormatError> {
        if g.summary_blocks == 0 {
            return Ok(None);
        }
        let regions = g.region_count();
        let mut buf = vec![0u8; (SUMMARY_ENTRIES_OFFSET + regions * 8) as usize];
        media
            .read(g.summary_offset(), &mut buf)
            .map_err(|e| FormatError::corrupted("space summary", e.to_string()))?;
        let header = SummaryHeader::decode(&buf, regions)?;
        let entries = bits::le_words(buf.get(SUMMARY_ENTRIES_OFFSET as usize..).unwrap_or(&[]))
            .enumerate()
            .map(|(r, w)| {
                let r = r as u64;
                RegionEntry::decode(w, region_blocks(g, r), g.region_is_lazy(r)).map_err(|d| {
                    FormatError::corrupted("space summary", format!("region {r}: {d}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Self {
            counts_valid: header.counts_valid == 1,
            regions: entries,
        }))
    }

    /// Whether region `r` is uninitialised.
    pub fn is_uninit(&self, r: u64) -> bool {
        self.regions.get(r as usize).is_some_and(|e| e.uninit)
    }
}

/// Byte offset of entry `r` of the summary.
pub fn entry_offset(g: &Geometry, r: u64) -> u64 {
    g.summary_offset() + SUMMARY_ENTRIES_OFFSET + r * 8
}

/// Byte range of the bitmap that covers region `r`.
pub fn region_bitmap_range(g: &Geometry, r: u64) -> (u64, u64) {
    let start = r * REGION_BITMAP_BYTES;
    let len = REGION_BITMAP_BYTES.min(blocks_to_bytes(g.bitmap_blocks).saturating_sub(start));
    (g.bitmap_offset() + start, len)
}

/// Reads the bitmap words of region `r` (set bit = allocated): all zero (free) when the
/// region is uninitialised, without reading the media.
pub fn read_region_words(
    media: &dyn Media,
    g: &Geometry,
    summary: Option<&SpaceSummary>,
    r: u64,
) -> Result<Vec<u64>, DeviceError> {
    let (offset, len) = region_bitmap_range(g, r);
    if summary.is_some_and(|s| s.is_uninit(r)) {
        return Ok(vec![0; (len / 8) as usize]);
    }
    let mut buf = vec![0u8; len as usize];
    media.read(offset, &mut buf)?;
    Ok(bits::le_words(&buf).collect())
}

/// The whole bitmap as bytes in the on-media layout, uninitialised regions as zeros (free):
/// what fsck compares with the blocks it finds referenced.
pub fn read_bitmap_bytes(
    media: &dyn Media,
    g: &Geometry,
    summary: Option<&SpaceSummary>,
) -> Result<Vec<u8>, DeviceError> {
    let mut out = vec![0u8; blocks_to_bytes(g.bitmap_blocks) as usize];
    for r in 0..g.region_count() {
        let (offset, len) = region_bitmap_range(g, r);
        if summary.is_some_and(|s| s.is_uninit(r)) {
            continue;
        }
        let at = (offset - g.bitmap_offset()) as usize;
        if let Some(piece) = out.get_mut(at..at + len as usize) {
            media.read(offset, piece)?;
        }
    }
    Ok(out)
}

/// The byte ranges of the fixed metadata that hold something: everything below `meta_end`
/// but the bitmap of uninitialised regions, coalesced. What a sparse image must back before
/// mkfs or a mount stores into it (a store into a hole of a full file system raises SIGBUS),
/// without backing the bitmap of a 16 TiB device nobody has used yet.
pub fn metadata_in_use(g: &Geometry, is_uninit: impl Fn(u64) -> bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut push = |offset: u64, len: u64| match out.last_mut() {
        Some((o, l)) if *o + *l == offset => *l += len,
        _ if len > 0 => out.push((offset, len)),
        _ => {}
    };
    push(0, g.bitmap_offset());
    for r in 0..g.region_count() {
        if !is_uninit(r) {
            let (offset, len) = region_bitmap_range(g, r);
            push(offset, len);
        }
    }
    push(
        g.summary_offset(),
        blocks_to_bytes(g.meta_end - g.summary_start()),
    );
    out
}

/// Writes a whole summary: the header and every entry, then fences. `counts_valid` goes in
/// last, after the entries are durable, so a crash leaves either the old header (whose
/// `counts_valid` the caller cleared first, see [`set_counts_valid`]) or a complete summary.
pub fn write_summary(
    media: &dyn Media,
    g: &Geometry,
    entries: &[RegionEntry],
    counts_valid: bool,
) -> Result<(), DeviceError> {
    let bytes = summary_bytes(entries, false);
    let len = bytes.len() as u64;
    media.write(g.summary_offset(), &bytes)?;
    media.flush(g.summary_offset(), len)?;
    media.fence();
    set_counts_valid(media, g, counts_valid)
}

/// The bytes of a whole summary (header and entries, zero-padded to whole blocks).
pub fn summary_bytes(entries: &[RegionEntry], counts_valid: bool) -> Vec<u8> {
    let header = SummaryHeader::new(entries.len() as u64, counts_valid);
    let mut bytes = header.as_bytes().to_vec();
    for e in entries {
        bytes.extend_from_slice(&e.encode().to_le_bytes());
    }
    let len = (bytes.len() as u64).next_multiple_of(BLOCK_SIZE);
    bytes.resize(len as usize, 0);
    bytes
}

/// Stores the header's `counts_valid` (one 8-byte store), flushed and fenced.
pub fn set_counts_valid(media: &dyn Media, g: &Geometry, valid: bool) -> Result<(), DeviceError> {
    let at = g.summary_offset() + COUNTS_VALID_OFFSET;
    media.store_u64(at, u64::from(valid))?;
    media.flush(at, 8)?;
    media.fence();
    Ok(())
}

/// Free blocks of region `r` according to its bitmap words `words` (set bit = allocated;
/// blocks below `meta_end` and past `block_count` are not free whatever the bits say).
pub fn free_in_region(g: &Geometry, r: u64, words: &[u64]) -> u32 {
    let first = r * REGION_BLOCKS;
    let end = (first + REGION_BLOCKS).min(g.block_count);
    let lo = g.meta_end.max(first);
    if lo >= end {
        return 0;
    }
    let words_in_range = (lo - first) / 64..(end - first).div_ceil(64);
    words_in_range
        .map(|wi| {
            let word_start = first + wi * 64;
            let mask = bits::word_mask(
                lo.max(word_start) - word_start,
                end.min(word_start + 64) - word_start,
            );
            let word = words.get(wi as usize).copied().unwrap_or(u64::MAX);
            (!word & mask).count_ones()
        })
        .sum()
}

/// Initialises uninitialised region `r`: backs its part of the bitmap (sparse images),
/// zeroes it (all free: an uninitialised region holds no block), fences, and only then
/// clears the region's flag (one 8-byte store of the entry, flushed, fenced). A crash
/// between the two leaves the flag set over a zeroed bitmap, which means the same (all
/// free): the next initialisation simply does it again. The entry's count is all free.
pub fn initialise_region(media: &dyn Media, g: &Geometry, r: u64) -> Result<(), DeviceError> {
    let (offset, len) = region_bitmap_range(g, r);
    media.reserve(offset, len)?;
    media.zero_nt(offset, len)?;
    media.fence();
    let entry = RegionEntry {
        uninit: false,
        free: region_blocks(g, r) as u32,
    };
    let at = entry_offset(g, r);
    media.store_u64(at, entry.encode())?;
    media.flush(at, 8)?;
    media.fence();
    Ok(())
}

/// The entries a summary should hold for the bitmap `bitmap` (bytes in the on-media layout,
/// uninitialised regions as zeros): the flags of `summary` (none when it is absent or
/// damaged), every count recomputed.
pub fn entries_for_bitmap(
    g: &Geometry,
    summary: Option<&SpaceSummary>,
    bitmap: &[u8],
) -> Vec<RegionEntry> {
    (0..g.region_count())
        .map(|r| {
            let (offset, len) = region_bitmap_range(g, r);
            let at = (offset - g.bitmap_offset()) as usize;
            let words: Vec<u64> = bitmap
                .get(at..at + len as usize)
                .map(|b| bits::le_words(b).collect())
                .unwrap_or_default();
            RegionEntry {
                uninit: summary.is_some_and(|s| s.is_uninit(r)),
                free: free_in_region(g, r, &words),
            }
        })
        .collect()
}
