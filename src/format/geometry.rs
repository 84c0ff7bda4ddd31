//! Where the fixed regions sit on a device of a given size.

use super::{
    BLOCK_SIZE, CHUNK_BLOCKS, FLAT_ITABLE_CHUNKS, FormatError, ITABLE_DIR_ENTRIES,
    ITABLE_FANOUT_MAX, IncompatFeatures, MIN_DEVICE_SIZE, Superblock, blocks_to_bytes, space,
    space::REGION_BLOCKS,
};

/// First journal block: after the primary (block 0) and backup (block 1) superblocks.
pub const JOURNAL_START_BLOCK: u64 = 2;
/// Size of one journal slot: fits the largest transaction (a rename that splits B+tree nodes
/// on both sides logs well under 64 KiB; large truncates free extents with bit records).
pub const JOURNAL_SLOT_BLOCKS: u32 = 64;
/// Journal slots on devices of 1 GiB and more; fewer on smaller devices.
pub const JOURNAL_SLOTS_MAX: u32 = 16;
pub const JOURNAL_SLOTS_MIN: u32 = 4;

/// How the inode-table directory block finds the table's chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItableLayout {
    /// Versions 1 and 2: the directory's entries are the chunks (at most 512).
    Flat,
    /// `INODE_TABLE_TREE`: directory entry `i` is an indirect block whose first `fanout`
    /// entries are chunks `i * fanout ..`; chunk `k` is entry `k % fanout` of indirect
    /// block `k / fanout`.
    Tree { fanout: u64 },
}

impl ItableLayout {
    /// The layout mkfs writes.
    pub const DEFAULT: Self = Self::Tree {
        fanout: ITABLE_FANOUT_MAX,
    };

    /// Chunks the layout can address.
    pub fn max_chunks(self) -> u64 {
        match self {
            Self::Flat => FLAT_ITABLE_CHUNKS,
            Self::Tree { fanout } => ITABLE_DIR_ENTRIES * fanout,
        }
    }
}

/// The fixed layout of a file system, validated: every region lies inside the device and the
/// regions do not overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub block_count: u64,
    pub journal_start: u64,
    pub journal_slots: u32,
    pub journal_slot_blocks: u32,
    pub bitmap_start: u64,
    pub bitmap_blocks: u64,
    /// Blocks of the space summary, right after the bitmap (`space::summary_blocks`), or 0
    /// on a file system without [`IncompatFeatures::SPACE_SUMMARY`].
    pub summary_blocks: u64,
    pub itable_dir_block: u64,
    /// First block the allocator may hand out.
    pub meta_end: u64,
    /// How the inode table is indexed (from the features and `itable_fanout`).
    pub itable: ItableLayout,
}

impl Geometry {
    /// The layout mkfs writes on a device of `size` bytes (with the space summary).
    pub fn for_device_size(size: u64) -> Result<Self, FormatError> {
        Self::layout(size, true)
    }

    /// The layout of a device of `size` bytes, with or without the space summary (without:
    /// the layout of format versions 1 and 2).
    pub fn layout(size: u64, space_summary: bool) -> Result<Self, FormatError> {
        if size < MIN_DEVICE_SIZE {
            return Err(FormatError::TooSmall {
                size,
                min: MIN_DEVICE_SIZE,
            });
        }
        let block_count = size / BLOCK_SIZE;
        // One slot per 64 MiB up to the maximum: a 1 GiB device gets all 16.
        let journal_slots = u32::try_from(size >> 26)
            .unwrap_or(JOURNAL_SLOTS_MAX)
            .clamp(JOURNAL_SLOTS_MIN, JOURNAL_SLOTS_MAX);
        let journal_blocks = u64::from(journal_slots) * u64::from(JOURNAL_SLOT_BLOCKS);
        let bitmap_start = JOURNAL_START_BLOCK + journal_blocks;
        let bitmap_blocks = block_count.div_ceil(8 * BLOCK_SIZE);
        let summary_blocks = if space_summary {
            space::summary_blocks(block_count)
        } else {
            0
        };
        let itable_dir_block = bitmap_start + bitmap_blocks + summary_blocks;
        let g = Self {
            block_count,
            journal_start: JOURNAL_START_BLOCK,
            journal_slots,
            journal_slot_blocks: JOURNAL_SLOT_BLOCKS,
            bitmap_start,
            bitmap_blocks,
            summary_blocks,
            itable_dir_block,
            meta_end: itable_dir_block + 1,
            itable: ItableLayout::DEFAULT,
        };
        g.validate()?;
        Ok(g)
    }

    /// The layout a superblock describes, validated against the device size.
    pub fn from_superblock(sb: &Superblock, device_size: u64) -> Result<Self, FormatError> {
        if u64::from(sb.block_size) != BLOCK_SIZE || u64::from(sb.chunk_blocks) != CHUNK_BLOCKS {
            return Err(FormatError::corrupted(
                "superblock",
                format!(
                    "block size {} / chunk {} not supported",
                    sb.block_size, sb.chunk_blocks
                ),
            ));
        }
        let itable = if sb
            .incompat_features()
            .contains(IncompatFeatures::INODE_TABLE_TREE)
        {
            let fanout = u64::from(sb.itable_fanout);
            if !(1..=ITABLE_FANOUT_MAX).contains(&fanout) {
                return Err(FormatError::corrupted(
                    "superblock",
                    format!("inode-table fan-out {fanout} (must be 1 to {ITABLE_FANOUT_MAX})"),
                ));
            }
            ItableLayout::Tree { fanout }
        } else {
            ItableLayout::Flat
        };
        let g = Self {
            block_count: sb.block_count,
            journal_start: sb.journal_start,
            journal_slots: sb.journal_slots,
            journal_slot_blocks: sb.journal_slot_blocks,
            bitmap_start: sb.bitmap_start,
            bitmap_blocks: sb.bitmap_blocks,
            // The summary's place and size follow from the block count; the superblock
            // records only that it exists (and where the inode-table directory starts).
            summary_blocks: if sb.incompat & IncompatFeatures::SPACE_SUMMARY.bits() != 0 {
                space::summary_blocks(sb.block_count.min(1 << 40))
            } else {
                0
            },
            itable_dir_block: sb.itable_dir_block,
            meta_end: sb.meta_end,
            itable,
        };
        if blocks_to_bytes(g.block_count.min(u64::MAX >> 13)) > device_size {
            return Err(FormatError::corrupted(
                "superblock",
                format!(
                    "file system of {} blocks does not fit a device of {device_size} bytes (truncated image?)",
                    g.block_count
                ),
            ));
        }
        g.validate()?;
        Ok(g)
    }

    fn validate(&self) -> Result<(), FormatError> {
        let bad = |d: String| Err(FormatError::corrupted("superblock geometry", d));
        if self.block_count < MIN_DEVICE_SIZE / BLOCK_SIZE || self.block_count > (1 << 40) {
            return bad(format!("block count {}", self.block_count));
        }
        if self.journal_start != JOURNAL_START_BLOCK
            || !(1..=64).contains(&self.journal_slots)
            || !(16..=1024).contains(&self.journal_slot_blocks)
        {
            return bad("journal region".into());
        }
        let journal_end = self.journal_start
            + u64::from(self.journal_slots) * u64::from(self.journal_slot_blocks);
        if self.bitmap_start != journal_end
            || self.bitmap_blocks != self.block_count.div_ceil(8 * BLOCK_SIZE)
        {
            return bad("bitmap region".into());
        }
        if self.itable_dir_block != self.summary_start() + self.summary_blocks
            || self.meta_end != self.itable_dir_block + 1
            || self.meta_end + CHUNK_BLOCKS > self.block_count
        {
            return bad("metadata end".into());
        }
        Ok(())
    }

    pub fn size_bytes(&self) -> u64 {
        blocks_to_bytes(self.block_count)
    }

    /// Byte offset of journal slot `i`.
    pub fn slot_offset(&self, i: u32) -> u64 {
        blocks_to_bytes(self.journal_start + u64::from(i) * u64::from(self.journal_slot_blocks))
    }

    pub fn slot_size(&self) -> u64 {
        blocks_to_bytes(u64::from(self.journal_slot_blocks))
    }

    pub fn bitmap_offset(&self) -> u64 {
        blocks_to_bytes(self.bitmap_start)
    }

    /// First block of the space summary (right after the bitmap).
    pub fn summary_start(&self) -> u64 {
        self.bitmap_start + self.bitmap_blocks
    }

    /// Byte offset of the space summary.
    pub fn summary_offset(&self) -> u64 {
        blocks_to_bytes(self.summary_start())
    }

    /// 1 GiB regions of the device (a trailing partial one included).
    pub fn region_count(&self) -> u64 {
        self.block_count.div_ceil(space::REGION_BLOCKS)
    }

    /// Whether region `r` may be lazily initialised: it lies entirely inside the data area
    /// (no fixed metadata, no block past the end of the device), so an all-free bitmap of it
    /// is all zeros.
    pub fn region_is_lazy(&self, r: u64) -> bool {
        r.checked_mul(space::REGION_BLOCKS).is_some_and(|start| {
            start >= self.meta_end && start + space::REGION_BLOCKS <= self.block_count
        })
    }

    pub fn itable_dir_offset(&self) -> u64 {
        blocks_to_bytes(self.itable_dir_block)
    }

    /// Whole 2 MiB chunks on the device (a trailing partial chunk is not counted).
    pub fn chunk_count(&self) -> u64 {
        self.block_count / CHUNK_BLOCKS
    }

    /// Whole 1 GiB regions on the device (a trailing partial region is not counted; see
    /// [`Geometry::region_count`]).
    pub fn whole_region_count(&self) -> u64 {
        self.block_count / REGION_BLOCKS
    }

    /// Most regions the superblock's `huge_regions` may reserve: every whole region but
    /// region 0, which holds the fixed metadata.
    pub fn max_huge_regions(&self) -> u64 {
        self.whole_region_count().saturating_sub(1)
    }

    /// True when `first..first + len` is a block range the allocator may own.
    pub fn is_data_range(&self, first: u64, len: u64) -> bool {
        first >= self.meta_end
            && first
                .checked_add(len)
                .is_some_and(|end| end <= self.block_count)
    }
}
