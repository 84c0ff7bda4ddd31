//! The space summary (feature [`SPACE_SUMMARY`](super::IncompatFeatures::SPACE_SUMMARY)):
//! one 8-byte entry per 1 GiB region of the device, after a 64-byte header, in the blocks
//! right after the block bitmap (docs/FORMAT.md, "Space summary").
//!
//! It lets mkfs and mount do work independent of the device size:
//! - an entry with [`RegionEntry::uninit`] says the region's part of the bitmap was never
//!   written and every block of the region is free; its bitmap words are garbage (a
//!   /dev/dax device does not read as zero) and must not be read. The allocator writes them
//!   (all zero) and then clears the flag, before it hands out the region's first block.
//! - each entry's free-block count, and so the whole summary, is exact when the header's
//!   `counts_valid` is 1: written at a clean unmount, cleared before the first change of a
//!   read-write mount. A mount that finds it valid reads no bitmap word of a region that is
//!   entirely free or entirely used.
//!
//! The entries are changed with single 8-byte stores and are not checksummed, like the
//! bitmap they summarise; every value is range-checked on read ([`RegionEntry::decode`]).

use super::{BLOCK_SIZE, CHUNK_BLOCKS, FormatError};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of a region: what one PUD entry maps on x86-64, the unit of 1 GiB extents and of
/// the summary.
pub const REGION_SIZE: u64 = 1 << 30;
/// Blocks of a region.
pub const REGION_BLOCKS: u64 = REGION_SIZE / BLOCK_SIZE;
/// 2 MiB chunks of a region.
pub const REGION_CHUNKS: u64 = REGION_BLOCKS / CHUNK_BLOCKS;
/// Bytes of the block bitmap that cover one region.
pub const REGION_BITMAP_BYTES: u64 = REGION_BLOCKS / 8;

/// Magic of the space summary header: "PMFSSPAC".
pub const SUMMARY_MAGIC: u64 = u64::from_le_bytes(*b"PMFSSPAC");
/// Byte offset of entry 0 in the summary.
pub const SUMMARY_ENTRIES_OFFSET: u64 = size_of::<SummaryHeader>() as u64;
/// Byte offset of `counts_valid` in the summary.
pub const COUNTS_VALID_OFFSET: u64 = std::mem::offset_of!(SummaryHeader, counts_valid) as u64;

/// Blocks of the summary of a device of `block_count` blocks.
pub const fn summary_blocks(block_count: u64) -> u64 {
    (SUMMARY_ENTRIES_OFFSET + block_count.div_ceil(REGION_BLOCKS) * 8).div_ceil(BLOCK_SIZE)
}

/// The first 64 bytes of the summary.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SummaryHeader {
    /// [`SUMMARY_MAGIC`].
    pub magic: u64,
    /// 1 when every entry's count is exact (clean unmount), 0 when they may be stale.
    pub counts_valid: u64,
    /// Entries that follow: the device's regions, a trailing partial one included.
    pub regions: u64,
    pub reserved: [u8; 40],
}

const _: () = assert!(size_of::<SummaryHeader>() == 64);

impl SummaryHeader {
    pub fn new(regions: u64, counts_valid: bool) -> Self {
        Self {
            magic: SUMMARY_MAGIC,
            counts_valid: u64::from(counts_valid),
            regions,
            reserved: [0; 40],
        }
    }

    /// Decodes and validates the header of a summary of `regions` entries.
    pub fn decode(bytes: &[u8], regions: u64) -> Result<Self, FormatError> {
        let bad = |d: String| Err(FormatError::corrupted("space summary", d));
        let Ok((h, _)) = Self::read_from_prefix(bytes) else {
            return bad("short read".into());
        };
        if h.magic != SUMMARY_MAGIC {
            return bad(format!("bad magic {:#018x}", h.magic));
        }
        if h.counts_valid > 1 {
            return bad(format!("counts_valid is {}", h.counts_valid));
        }
        if h.regions != regions {
            return bad(format!("{} regions, the device has {regions}", h.regions));
        }
        Ok(h)
    }
}

/// One region's entry: bit 63 = uninitialised, bits 0..32 = free blocks; the rest zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionEntry {
    /// The region's bitmap words were never written: every block is free.
    pub uninit: bool,
    /// Free blocks of the region (exact only while the header's `counts_valid` is 1).
    pub free: u32,
}

/// Bit of [`RegionEntry::uninit`].
const UNINIT_BIT: u64 = 1 << 63;

impl RegionEntry {
    pub fn encode(self) -> u64 {
        u64::from(self.free) | if self.uninit { UNINIT_BIT } else { 0 }
    }

    /// Decodes the entry of a region of `region_blocks` blocks (a trailing region may be
    /// shorter); `lazy` says whether the region may be uninitialised
    /// ([`super::Geometry::region_is_lazy`]).
    pub fn decode(word: u64, region_blocks: u64, lazy: bool) -> Result<Self, String> {
        if word & !(UNINIT_BIT | u64::from(u32::MAX)) != 0 {
            return Err(format!("entry {word:#018x} has unknown bits"));
        }
        let e = Self {
            uninit: word & UNINIT_BIT != 0,
            free: word as u32,
        };
        if u64::from(e.free) > region_blocks {
            return Err(format!(
                "{} free blocks in a region of {region_blocks}",
                e.free
            ));
        }
        if e.uninit && !lazy {
            return Err("uninitialised, but the region holds metadata or ends the device".into());
        }
        if e.uninit && u64::from(e.free) != region_blocks {
            return Err(format!("uninitialised, but {} blocks free", e.free));
        }
        Ok(e)
    }

    /// The entry of a region mkfs leaves uninitialised.
    pub fn fresh_uninit() -> Self {
        Self {
            uninit: true,
            free: REGION_BLOCKS as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_hostile_values_are_refused() {
        let e = RegionEntry::fresh_uninit();
        assert_eq!(RegionEntry::decode(e.encode(), REGION_BLOCKS, true), Ok(e));
        let used = RegionEntry {
            uninit: false,
            free: 17,
        };
        assert_eq!(
            RegionEntry::decode(used.encode(), REGION_BLOCKS, false),
            Ok(used)
        );
        assert!(RegionEntry::decode(e.encode(), REGION_BLOCKS, false).is_err());
        assert!(RegionEntry::decode(1 << 40, REGION_BLOCKS, true).is_err());
        assert!(RegionEntry::decode(REGION_BLOCKS + 1, REGION_BLOCKS, true).is_err());
        assert!(RegionEntry::decode(UNINIT_BIT | 5, REGION_BLOCKS, true).is_err());
        assert!(RegionEntry::decode(u64::MAX, REGION_BLOCKS, true).is_err());
    }

    #[test]
    fn summary_size_follows_the_device() {
        // 16 MiB: one region, one block; 16 TiB: 16384 regions, 64 + 128 KiB = 33 blocks.
        assert_eq!(summary_blocks(4096), 1);
        assert_eq!(summary_blocks(1 << 32), 33);
        let h = SummaryHeader::new(3, true);
        assert!(SummaryHeader::decode(h.as_bytes(), 3).is_ok());
        assert!(SummaryHeader::decode(h.as_bytes(), 4).is_err());
        assert!(SummaryHeader::decode(&[0u8; 64], 3).is_err());
    }
}
