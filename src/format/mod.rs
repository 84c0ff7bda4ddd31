//! The on-media format: every structure pmfs stores, byte for byte.
//!
//! docs/FORMAT.md is the prose version of this module, and `tests/format_doc.rs` checks that
//! its byte maps agree with the offsets computed here. All structures are `#[repr(C)]`,
//! little-endian, with explicit padding, and are read with `zerocopy` (no pointer casts). Nothing
//! read from the device is trusted: every decoder here validates before returning.

pub mod bitmap;
pub mod devices;
pub mod dirent;
pub mod extent;
mod geometry;
pub mod node;
pub mod space;
mod structs;

pub use geometry::{Geometry, ItableLayout};
pub use structs::*;

use bitflags::bitflags;

#[cfg(not(target_endian = "little"))]
compile_error!(
    "pmfs stores its structures in native byte order and supports little-endian CPUs only"
);

/// Size of a block, the unit of allocation.
pub const BLOCK_SIZE: u64 = 4096;
/// log2 of [`BLOCK_SIZE`].
pub const BLOCK_SHIFT: u32 = 12;
/// Size of a huge chunk: the unit a PMD (2 MiB) page maps.
pub const CHUNK_SIZE: u64 = 2 << 20;
/// Blocks per huge chunk.
pub const CHUNK_BLOCKS: u64 = CHUNK_SIZE / BLOCK_SIZE;
/// 1 GiB regions: the unit of 1 GiB extents, of the space summary and of the superblock's
/// `huge_regions` reservation.
pub use space::{REGION_BLOCKS, REGION_SIZE};

/// Smallest device pmfs formats: the fixed metadata plus one inode-table chunk and room for
/// data must fit.
pub const MIN_DEVICE_SIZE: u64 = 16 << 20;

/// Superblock magic: "PMFS" + 0x00 + "SB" + 0x1a (the byte PNG uses to stop `type`).
pub const SUPERBLOCK_MAGIC: u64 = u64::from_le_bytes(*b"PMFS\0SB\x1a");
/// Magic of the mutable state record that follows the static superblock.
pub const STATE_MAGIC: u64 = u64::from_le_bytes(*b"PMFSSTAT");
/// Magic of a journal slot header.
pub const SLOT_MAGIC: u64 = u64::from_le_bytes(*b"PMFSJSLT");
/// Magic of a B+tree node.
pub const NODE_MAGIC: u32 = u32::from_le_bytes(*b"PMBT");
/// Magic of an xattr area.
pub const XATTR_MAGIC: u32 = u32::from_le_bytes(*b"PMXA");

/// Current format version. Bump together with docs/FORMAT.md's version table.
pub const FORMAT_VERSION: u32 = 3;

/// Oldest format version this implementation mounts (a version-1 file system becomes
/// version 2 when it first uses a version-2 feature: [`IncompatFeatures::V2`]; versions 1
/// and 2 keep their single-level inode table).
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// Format versions, oldest first: (version, what changed, when).
pub const FORMAT_VERSIONS: &[(u32, &str, &str)] = &[
    (1, "initial format", "2026-11"),
    (
        2,
        "inode attribute flags (chattr), files up to 2^63 - 1 bytes",
        "2026-12",
    ),
    (
        3,
        "two-level inode table (INODE_TABLE_TREE): up to 2^31 inode numbers; space summary \
         (SPACE_SUMMARY): lazily initialised bitmap regions and per-region free counts",
        "2026-12",
    ),
];

bitflags! {
    /// Features an implementation must understand to mount at all.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct IncompatFeatures: u64 {
        /// Directories are B+trees keyed by name hash (always set in version 1).
        const HASHED_DIRS = 1 << 0;
        /// Inodes may carry the attribute flags of chattr(1) (`inode_flags::ATTR_FLAGS`).
        const INODE_ATTR_FLAGS = 1 << 1;
        /// Files may be larger than 2^44 bytes (up to [`MAX_FILE_SIZE`], 2^63 - 1).
        const LARGE_FILES = 1 << 2;
        /// The inode-table directory points at indirect blocks of chunk pointers (two
        /// levels, [`ITABLE_FANOUT_MAX`] chunks each) instead of at chunks.
        const INODE_TABLE_TREE = 1 << 3;
        /// A space summary follows the block bitmap: per 1 GiB region, whether its bitmap
        /// is still uninitialised (all free, never written) and its free-block count
        /// ([`space`]).
        const SPACE_SUMMARY = 1 << 4;
        /// The file system spans several devices: a device table follows the state record
        /// in block 0 and every other member starts with a member header ([`devices`]).
        const MULTI_DEVICE = 1 << 5;
    }
    /// Features an implementation must understand to mount read-write.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RoCompatFeatures: u64 {
        /// Large files are kept in 2 MiB-aligned extents.
        const HUGE_EXTENTS = 1 << 0;
    }
    /// Features an older implementation may ignore.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct CompatFeatures: u64 {
        /// Reserved inode [`DEFERRED_FREE_INO`] holds blocks whose free waits for a lease.
        const DEFERRED_FREE = 1 << 0;
        /// The superblock's `huge_regions` holds the number of 1 GiB regions the
        /// allocator reserves for 1 GiB extents (an allocation preference: an older
        /// implementation that ignores it allocates correctly, only without it).
        const HUGE_REGIONS = 1 << 1;
    }
}

impl IncompatFeatures {
    /// The features of version 2: a file system that has one of them is version 2.
    pub const V2: Self = Self::INODE_ATTR_FLAGS.union(Self::LARGE_FILES);
    /// The features of version 3.
    pub const V3: Self = Self::INODE_TABLE_TREE
        .union(Self::SPACE_SUMMARY)
        .union(Self::MULTI_DEVICE);

    /// The oldest format version whose readers understand these features: what a superblock
    /// that has them says (an upgrade to a feature raises the version to this, never
    /// further, so a version-1 layout given a chattr flag becomes version 2).
    pub fn version_needed(self) -> u32 {
        if self.intersects(Self::V3) {
            3
        } else if self.intersects(Self::V2) {
            2
        } else {
            1
        }
    }

    /// The features' names, comma-separated (for messages).
    pub fn names(self) -> String {
        self.iter_names()
            .map(|(name, _)| name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Features this implementation understands; mkfs writes them all but
/// [`IncompatFeatures::MULTI_DEVICE`], which only a format over several devices has.
pub const INCOMPAT_SUPPORTED: IncompatFeatures = IncompatFeatures::HASHED_DIRS
    .union(IncompatFeatures::INODE_ATTR_FLAGS)
    .union(IncompatFeatures::LARGE_FILES)
    .union(IncompatFeatures::INODE_TABLE_TREE)
    .union(IncompatFeatures::SPACE_SUMMARY)
    .union(IncompatFeatures::MULTI_DEVICE);
pub const RO_COMPAT_SUPPORTED: RoCompatFeatures = RoCompatFeatures::HUGE_EXTENTS;
pub const COMPAT_SUPPORTED: CompatFeatures =
    CompatFeatures::DEFERRED_FREE.union(CompatFeatures::HUGE_REGIONS);

/// Inode number 0 is never valid.
pub const NULL_INO: u64 = 0;
/// The root directory (FUSE's root id is 1 too, so numbers need no translation).
pub const ROOT_INO: u64 = 1;
/// A hidden regular file that owns blocks whose free is deferred (direct-mapping leases).
pub const DEFERRED_FREE_INO: u64 = 2;
/// First inode number handed to users.
pub const FIRST_USER_INO: u64 = 3;

/// Size of an inode slot.
pub const INODE_SIZE: u64 = 256;
/// Inode slots per inode-table chunk (one 2 MiB chunk).
pub const INODES_PER_CHUNK: u64 = CHUNK_SIZE / INODE_SIZE;
/// The last slots of every inode-table chunk hold that chunk's inode bitmap
/// (1 bit per slot): 8192 bits = 1 KiB = 4 slots.
pub const INODE_BITMAP_SLOTS: u64 = INODES_PER_CHUNK / 8 / INODE_SIZE;
/// Slots of a chunk that hold inodes.
pub const USABLE_INODES_PER_CHUNK: u64 = INODES_PER_CHUNK - INODE_BITMAP_SLOTS;
/// Byte offset of the inode bitmap inside an inode-table chunk.
pub const INODE_BITMAP_OFFSET: u64 = USABLE_INODES_PER_CHUNK * INODE_SIZE;
/// Entries of the inode-table directory block (one block of little-endian u64 block
/// addresses; 0 = not yet allocated): chunks (versions 1 and 2), or indirect blocks of chunk
/// pointers ([`IncompatFeatures::INODE_TABLE_TREE`]).
pub const ITABLE_DIR_ENTRIES: u64 = BLOCK_SIZE / 8;
/// Chunk pointers an indirect block of the inode table holds at most (one block of u64s);
/// mkfs uses them all (`Superblock::itable_fanout`; tests format smaller fan-outs to reach
/// the second indirect block on a small device).
pub const ITABLE_FANOUT_MAX: u64 = BLOCK_SIZE / 8;
/// Chunks of a single-level (version 1 and 2) inode table.
pub const FLAT_ITABLE_CHUNKS: u64 = ITABLE_DIR_ENTRIES;
/// Largest number of inode numbers the format can address: 512 x 512 chunks (2^31).
pub const MAX_INODES: u64 = ITABLE_DIR_ENTRIES * ITABLE_FANOUT_MAX * INODES_PER_CHUNK;

/// Longest file name, in bytes.
pub const NAME_MAX: usize = 255;
/// Longest symlink target, in bytes (a symlink stores its target inline or in one block).
pub const SYMLINK_MAX: usize = BLOCK_SIZE as usize - 1;
/// Largest xattr value.
pub const XATTR_VALUE_MAX: usize = 64 * 1024;
/// Largest xattr area (all names and values of one inode), in blocks.
pub const XATTR_AREA_MAX_BLOCKS: u32 = 20;
/// Largest file size: 2^63 - 1, the largest `off_t` (and the kernel's `MAX_LFS_FILESIZE`,
/// the `s_maxbytes` of every FUSE mount). Sizes above [`V1_MAX_FILE_SIZE`] need
/// [`IncompatFeatures::LARGE_FILES`].
pub const MAX_FILE_SIZE: u64 = i64::MAX as u64;
/// File blocks of the largest file: every extent ends at or below this block.
pub const MAX_FILE_BLOCKS: u64 = MAX_FILE_SIZE.div_ceil(BLOCK_SIZE);
/// Largest file size of format version 1 (2^44, 16 TiB): version-1 readers refuse larger
/// sizes and extents beyond block 2^32 as damage.
pub const V1_MAX_FILE_SIZE: u64 = 1 << 44;

/// Converts blocks to bytes.
pub const fn blocks_to_bytes(blocks: u64) -> u64 {
    blocks << BLOCK_SHIFT
}

/// CRC32C (Castagnoli) of `bytes`: the checksum of every structure read at mount.
pub fn checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Checks a sealed structure: the checksum of `covered` (its bytes before the `crc` field)
/// must be `stored`; `what` names the structure in the error.
pub fn verify_checksum(what: &'static str, covered: &[u8], stored: u32) -> Result<(), FormatError> {
    let computed = checksum(covered);
    if computed != stored {
        return Err(FormatError::Checksum {
            what,
            stored,
            computed,
        });
    }
    Ok(())
}

/// Errors found while decoding or validating on-media structures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    #[error("not a pmfs file system (bad magic)")]
    BadMagic,
    #[error(
        "unsupported format version {0} (this pmfs reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})"
    )]
    UnsupportedVersion(u32),
    #[error("unknown incompatible features {0:#x}: this pmfs cannot mount it")]
    UnknownIncompat(u64),
    #[error("checksum mismatch in {what}: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("corrupted {what}: {detail}")]
    Corrupted { what: &'static str, detail: String },
    #[error(
        "the file system spans {0} devices and only its first was given: name the others \
         too (-o device=PATH for each)"
    )]
    MissingMembers(u32),
    #[error("device of {size} bytes is too small: pmfs needs at least {min} bytes")]
    TooSmall { size: u64, min: u64 },
}

impl FormatError {
    pub fn corrupted(what: &'static str, detail: impl Into<String>) -> Self {
        Self::Corrupted {
            what,
            detail: detail.into(),
        }
    }
}
