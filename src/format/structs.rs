//! The `#[repr(C)]` structures of the format. Offsets are documented in docs/FORMAT.md and
//! checked against these definitions by `tests/format_doc.rs`.

use super::{
    BLOCK_SIZE, FORMAT_VERSION, FormatError, INCOMPAT_SUPPORTED, IncompatFeatures, NODE_MAGIC,
    OLDEST_FORMAT_VERSION, STATE_MAGIC, SUPERBLOCK_MAGIC, checksum, verify_checksum,
};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// Byte offset of the primary superblock.
pub const SUPERBLOCK_OFFSET: u64 = 0;
/// Byte offset of the backup superblock (block 1).
pub const BACKUP_SUPERBLOCK_OFFSET: u64 = BLOCK_SIZE;
/// Byte offset of the mutable [`FsState`] record, in block 0 after the superblock.
pub const STATE_OFFSET: u64 = 2048;
/// Length of a label, in bytes (NUL-padded UTF-8).
pub const LABEL_LEN: usize = 64;

/// The static superblock: written at mkfs (and when the label changes), checksummed.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Superblock {
    pub magic: u64,
    pub version: u32,
    /// Size of this structure, for forward compatibility.
    pub sb_size: u32,
    pub compat: u64,
    pub ro_compat: u64,
    pub incompat: u64,
    pub uuid: [u8; 16],
    pub label: [u8; LABEL_LEN],
    pub block_size: u32,
    pub chunk_blocks: u32,
    /// Blocks on the device covered by the file system.
    pub block_count: u64,
    /// First block of the journal.
    pub journal_start: u64,
    pub journal_slots: u32,
    /// Size of one journal slot, in blocks.
    pub journal_slot_blocks: u32,
    pub bitmap_start: u64,
    pub bitmap_blocks: u64,
    /// Block holding the inode-table directory (chunk addresses).
    pub itable_dir_block: u64,
    /// First block after the fixed metadata; blocks before it are never allocated.
    pub meta_end: u64,
    pub created_ns: i64,
    /// With [`super::CompatFeatures::HUGE_REGIONS`]: how many of the device's last whole
    /// 1 GiB regions the allocator keeps for 1 GiB extents (mkfs `--huge-regions`); 0
    /// without the feature.
    pub huge_regions: u32,
    pub reserved: [u8; 52],
    /// Chunk pointers per inode-table indirect block (1..=512, mkfs writes 512); meaningful
    /// only with `INODE_TABLE_TREE` (0 before version 3). At the end of the reserved area
    /// so that later fields can grow from its start.
    pub itable_fanout: u32,
    /// CRC32C of the bytes before this field.
    pub crc: u32,
}

const _: () = assert!(size_of::<Superblock>() == 256);

impl Superblock {
    /// Seals the structure: recomputes its checksum.
    pub fn seal(&mut self) {
        self.crc = checksum(&self.as_bytes()[..Self::CRC_OFFSET]);
    }

    const CRC_OFFSET: usize = std::mem::offset_of!(Superblock, crc);

    /// Decodes and validates magic, checksum, version and incompatible features. Geometry is
    /// validated separately by [`super::Geometry::from_superblock`].
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let (sb, _) = Self::read_from_prefix(bytes)
            .map_err(|_| FormatError::corrupted("superblock", "short read"))?;
        if sb.magic != SUPERBLOCK_MAGIC {
            return Err(FormatError::BadMagic);
        }
        verify_checksum("superblock", &bytes[..Self::CRC_OFFSET], sb.crc)?;
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&sb.version) {
            return Err(FormatError::UnsupportedVersion(sb.version));
        }
        let unknown = sb.incompat & !INCOMPAT_SUPPORTED.bits();
        if unknown != 0 {
            return Err(FormatError::UnknownIncompat(unknown));
        }
        Ok(sb)
    }

    pub fn incompat_features(&self) -> IncompatFeatures {
        IncompatFeatures::from_bits_retain(self.incompat)
    }

    /// The 1 GiB regions reserved for 1 GiB extents: `huge_regions` when the superblock has
    /// [`super::CompatFeatures::HUGE_REGIONS`], else 0 (an older mkfs left the bytes zero;
    /// without the bit they mean nothing).
    pub fn reserved_huge_regions(&self) -> u64 {
        if self.compat & super::CompatFeatures::HUGE_REGIONS.bits() != 0 {
            u64::from(self.huge_regions)
        } else {
            0
        }
    }

    /// The label as text (lossy for invalid UTF-8, which mkfs never writes).
    pub fn label_str(&self) -> String {
        let end = self.label.iter().position(|&b| b == 0).unwrap_or(LABEL_LEN);
        String::from_utf8_lossy(&self.label[..end]).into_owned()
    }

    pub fn uuid_string(&self) -> String {
        format_uuid(&self.uuid)
    }
}

/// Formats a UUID in its canonical 8-4-4-4-12 form.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h = |r: std::ops::Range<usize>| u[r].iter().map(|b| format!("{b:02x}")).collect::<String>();
    format!(
        "{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

/// Parses a canonical UUID string.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 || s.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The mutable file-system state, at [`STATE_OFFSET`] of block 0 only. Changed inside journal
/// transactions (so always consistent after recovery) and checksummed.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FsState {
    pub magic: u64,
    /// 1 when the file system was unmounted cleanly; 0 while mounted read-write.
    pub clean: u32,
    pub pad: u32,
    pub mount_count: u64,
    /// Root block of the orphan tree (inodes unlinked while still referenced), or 0.
    pub orphan_head: u64,
    /// Free-block count saved at clean unmount (informational; mount recounts).
    pub free_blocks: u64,
    pub last_mount_ns: i64,
    pub last_unmount_ns: i64,
    pub reserved: [u8; 4],
    pub crc: u32,
}

const _: () = assert!(size_of::<FsState>() == 64);

impl FsState {
    const CRC_OFFSET: usize = std::mem::offset_of!(FsState, crc);

    pub fn seal(&mut self) {
        self.crc = checksum(&self.as_bytes()[..Self::CRC_OFFSET]);
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let (st, _) = Self::read_from_prefix(bytes)
            .map_err(|_| FormatError::corrupted("state record", "short read"))?;
        if st.magic != STATE_MAGIC {
            return Err(FormatError::corrupted("state record", "bad magic"));
        }
        verify_checksum("state record", &bytes[..Self::CRC_OFFSET], st.crc)?;
        Ok(st)
    }
}

/// Header of a journal slot (first 64 bytes of the slot).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SlotHeader {
    pub magic: u64,
    /// Transaction generation: odd while a transaction is open in this slot, even when idle.
    /// Stored with one atomic 8-byte store; this word is the commit point.
    pub generation: u64,
    pub slot_index: u32,
    pub pad: u32,
    pub reserved: [u8; 40],
}

const _: () = assert!(size_of::<SlotHeader>() == 64);

/// Kinds of undo records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum UndoKind {
    /// `len` old bytes at byte offset `target` follow the header.
    Bytes = 1,
    /// Bits `first..first + len` of the bitmap at byte offset `target` were set by the
    /// transaction: undo clears them.
    SetBits = 2,
    /// Bits were cleared by the transaction: undo sets them.
    ClearBits = 3,
}

impl UndoKind {
    pub fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::Bytes),
            2 => Some(Self::SetBits),
            3 => Some(Self::ClearBits),
            _ => None,
        }
    }
}

/// Header of one undo record in a journal slot. Records are 8-byte aligned and follow each
/// other from offset 64 of the slot; a record is valid when its generation equals the slot's
/// open generation and its checksum matches.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct UndoHeader {
    pub generation: u64,
    pub target: u64,
    /// First bit, for bit records; 0 for byte records.
    pub first: u64,
    /// Byte count (Bytes) or bit count (bit records).
    pub len: u32,
    pub kind: u16,
    pub pad: u16,
    /// CRC32C over this header with `crc` = 0, followed by the payload.
    pub crc: u32,
    pub pad2: u32,
}

const _: () = assert!(size_of::<UndoHeader>() == 40);

/// File types as stored in the top bits of `Inode::mode` (the POSIX S_IFMT values).
pub mod file_type {
    pub const S_IFMT: u16 = 0o170000;
    pub const S_IFSOCK: u16 = 0o140000;
    pub const S_IFLNK: u16 = 0o120000;
    pub const S_IFREG: u16 = 0o100000;
    pub const S_IFBLK: u16 = 0o060000;
    pub const S_IFDIR: u16 = 0o040000;
    pub const S_IFCHR: u16 = 0o020000;
    pub const S_IFIFO: u16 = 0o010000;

    /// True for the seven valid S_IFMT values.
    pub fn is_valid(mode: u16) -> bool {
        matches!(
            mode & S_IFMT,
            S_IFSOCK | S_IFLNK | S_IFREG | S_IFBLK | S_IFDIR | S_IFCHR | S_IFIFO
        )
    }
}

/// Inode flags.
pub mod inode_flags {
    /// The inode is on the orphan list (nlink 0, still open).
    pub const ORPHAN: u16 = 1 << 0;
    /// Extents (or directory entries) live in the B+tree at `tree_root`; otherwise a regular
    /// file's extents are inline.
    pub const TREE: u16 = 1 << 1;
    /// A symlink's target is stored inline (else in the block `tree_root`).
    pub const INLINE_DATA: u16 = 1 << 2;
    /// chattr +i: no change to the inode, its data or its entries (a directory's), no
    /// unlink or rename of it, no link to it. Only the flags may change, by root.
    pub const IMMUTABLE: u16 = 1 << 3;
    /// chattr +a: data may only be appended; no truncate, unlink, rename, link, xattr or
    /// attribute change. Directories: entries may be added, not removed.
    pub const APPEND: u16 = 1 << 4;
    /// chattr +A: reads do not update atime.
    pub const NOATIME: u16 = 1 << 5;
    /// chattr +d: dump(8) skips the file (stored and reported only).
    pub const NODUMP: u16 = 1 << 6;
    /// chattr +S: synchronous updates (every pmfs change already is durable on return).
    pub const SYNC: u16 = 1 << 7;
    /// chattr +D: synchronous directory updates (as `SYNC`: already so).
    pub const DIRSYNC: u16 = 1 << 8;
    /// chattr +x (FS_XFLAG_DAX): the per-inode DAX hint of XFS and ext4, stored and
    /// inherited only: FUSE cannot map a file's pmem pages into a process, and
    /// `pmfs::dax` maps any file directly whatever its flags.
    pub const DAX: u16 = 1 << 9;
    /// The attribute flags of chattr(1) (the `INODE_ATTR_FLAGS` feature).
    pub const ATTR_FLAGS: u16 = IMMUTABLE | APPEND | NOATIME | NODUMP | SYNC | DIRSYNC | DAX;
    /// Attribute flags a new inode takes from its directory (as ext4's inherited flags, and
    /// XFS's DAX): all but immutable and append-only; `DIRSYNC` only by directories.
    pub const INHERITED: u16 = NOATIME | NODUMP | SYNC | DIRSYNC | DAX;
    pub const ALL: u16 = ORPHAN | TREE | INLINE_DATA | ATTR_FLAGS;
}

/// Bytes of the inline area of an inode.
pub const INODE_INLINE_LEN: usize = 120;
/// Extents that fit inline.
pub const INLINE_EXTENTS: usize = INODE_INLINE_LEN / size_of::<ExtentRecord>();

/// An inode: 256 bytes in the inode table.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Inode {
    /// File type and permission bits; 0 for a free slot.
    pub mode: u16,
    pub flags: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Blocks owned by the inode (data, tree nodes, xattr area, symlink block).
    pub blocks: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub btime_ns: i64,
    /// Incremented at each reuse of the slot: (ino, generation) is unique over the file
    /// system's life.
    pub generation: u64,
    pub rdev: u64,
    /// Directories: the parent directory (the root is its own parent).
    pub parent: u64,
    /// First block of the xattr area, or 0.
    pub xattr_block: u64,
    pub xattr_blocks: u32,
    /// Inline extents in use, or the inline symlink length.
    pub inline_count: u32,
    /// Root block of the extent tree / directory tree / symlink block, or 0.
    pub tree_root: u64,
    pub orphan_next: u64,
    pub orphan_prev: u64,
    pub inline: [u8; INODE_INLINE_LEN],
    pub reserved: u32,
    pub crc: u32,
}

const _: () = assert!(size_of::<Inode>() == super::INODE_SIZE as usize);

impl Inode {
    const CRC_OFFSET: usize = std::mem::offset_of!(Inode, crc);

    pub fn seal(&mut self) {
        self.crc = checksum(&self.as_bytes()[..Self::CRC_OFFSET]);
    }

    /// A zeroed inode (free slot).
    pub fn empty() -> Self {
        Self::new_zeroed()
    }

    /// A new inode of `mode` with `nlink` links, all four timestamps `now_ns` and
    /// `generation`; every other field zero (unsealed). The one constructor of mkfs, the core
    /// and the repair.
    pub fn new(mode: u16, nlink: u32, now_ns: i64, generation: u64) -> Self {
        let mut i = Self::empty();
        i.mode = mode;
        i.nlink = nlink;
        i.atime_ns = now_ns;
        i.mtime_ns = now_ns;
        i.ctime_ns = now_ns;
        i.btime_ns = now_ns;
        i.generation = generation;
        i
    }

    /// Decodes an inode slot and checks its checksum and basic field validity.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let (ino, _) = Self::read_from_prefix(bytes)
            .map_err(|_| FormatError::corrupted("inode", "short read"))?;
        verify_checksum("inode", &bytes[..Self::CRC_OFFSET], ino.crc)?;
        if ino.mode != 0 && !file_type::is_valid(ino.mode) {
            return Err(FormatError::corrupted(
                "inode",
                format!("invalid mode {:o}", ino.mode),
            ));
        }
        if ino.flags & !inode_flags::ALL != 0 {
            return Err(FormatError::corrupted(
                "inode",
                format!("unknown flags {:#x}", ino.flags),
            ));
        }
        if ino.size > super::MAX_FILE_SIZE {
            return Err(FormatError::corrupted(
                "inode",
                format!("size {} too large", ino.size),
            ));
        }
        if ino.inline_count as usize > INODE_INLINE_LEN {
            return Err(FormatError::corrupted("inode", "inline count too large"));
        }
        Ok(ino)
    }

    pub fn file_type(&self) -> u16 {
        self.mode & file_type::S_IFMT
    }

    pub fn is_dir(&self) -> bool {
        self.file_type() == file_type::S_IFDIR
    }

    pub fn is_reg(&self) -> bool {
        self.file_type() == file_type::S_IFREG
    }

    pub fn is_symlink(&self) -> bool {
        self.file_type() == file_type::S_IFLNK
    }
}

/// Extent flags.
pub mod extent_flags {
    /// Preallocated: blocks are reserved but read as zeros until written.
    pub const UNWRITTEN: u32 = 1 << 0;
    pub const ALL: u32 = UNWRITTEN;
}

/// One extent: `len` blocks of the file starting at `file_block` live at `dev_block`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ExtentRecord {
    pub file_block: u64,
    pub dev_block: u64,
    pub len: u32,
    pub flags: u32,
}

const _: () = assert!(size_of::<ExtentRecord>() == 24);

/// B+tree kinds, stored in every node so a pointer into the wrong tree is caught.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum TreeKind {
    Extents = 1,
    Directory = 2,
}

/// Header of a B+tree node (one block).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct NodeHeader {
    pub magic: u32,
    /// 0 for leaves; children of a node at level n are at level n - 1.
    pub level: u16,
    /// Records in a leaf, children in an internal node.
    pub count: u16,
    /// Bytes of records in use after the header.
    pub used: u32,
    pub kind: u16,
    pub pad: u16,
    /// The inode whose tree this node belongs to.
    pub owner: u64,
    pub reserved: u64,
}

const _: () = assert!(size_of::<NodeHeader>() == 32);

impl NodeHeader {
    pub fn new(kind: TreeKind, level: u16, owner: u64) -> Self {
        Self {
            magic: NODE_MAGIC,
            level,
            count: 0,
            used: 0,
            kind: kind as u16,
            pad: 0,
            owner,
            reserved: 0,
        }
    }
}

/// Deepest B+tree the format allows (255 children per internal node makes 8 levels more
/// than any device can fill). Descents stop here, so a cyclic tree cannot loop.
pub const MAX_TREE_LEVEL: u16 = 8;

/// A leaf record: key (u64), payload length (u16), then the payload; records are packed.
pub const LEAF_RECORD_HEADER: usize = 10;
/// An internal-node entry: the smallest key of the child, then the child's block.
pub const INTERNAL_ENTRY: usize = 16;

/// Directory-entry payload in a directory leaf: inode number, file type (S_IFMT >> 12),
/// name length, then the name.
pub const DIRENT_FIXED: usize = 10;

/// Header of an inode's xattr area.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct XattrHeader {
    pub magic: u32,
    pub count: u32,
    /// Bytes of entries after the header.
    pub used: u32,
    /// CRC32C of the entries.
    pub crc: u32,
    /// The owning inode.
    pub owner: u64,
    pub reserved: u64,
}

const _: () = assert!(size_of::<XattrHeader>() == 32);

/// Checks a B+tree node header against what the caller expects.
pub fn check_node(
    h: &NodeHeader,
    kind: TreeKind,
    owner: u64,
    expect_level: Option<u16>,
) -> Result<(), FormatError> {
    if h.magic != NODE_MAGIC {
        return Err(FormatError::corrupted("tree node", "bad magic"));
    }
    if h.kind != kind as u16 {
        return Err(FormatError::corrupted(
            "tree node",
            format!("kind {} in a {kind:?} tree", h.kind),
        ));
    }
    if h.owner != owner {
        return Err(FormatError::corrupted(
            "tree node",
            format!("owned by inode {}, reached from inode {owner}", h.owner),
        ));
    }
    if h.level > MAX_TREE_LEVEL || expect_level.is_some_and(|l| l != h.level) {
        return Err(FormatError::corrupted(
            "tree node",
            format!("unexpected level {}", h.level),
        ));
    }
    if h.used as u64 > BLOCK_SIZE - size_of::<NodeHeader>() as u64 {
        return Err(FormatError::corrupted(
            "tree node",
            "used bytes exceed the node",
        ));
    }
    Ok(())
}
