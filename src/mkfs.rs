//! Formatting a device: writing the state of a fresh, empty file system.
//!
//! [`format`] writes exactly what a new file system needs (superblocks, state record, journal,
//! block bitmap, inode-table directory, the first inode-table chunk with the root and
//! deferred-free inodes) and never touches data blocks, so formatting takes the same few
//! milliseconds on a 16 MiB image as on a 64 GiB namespace.
//!
//! Crash safety: mkfs first destroys both old superblocks (and fences), then writes and fences
//! everything else, then the backup superblock, then the primary one. A crash at any point
//! leaves either no valid superblock at all, or a complete new file system.

use crate::device::{DeviceError, DeviceSet, Media, SetMember};
use crate::format::bitmap;
use crate::format::devices::{DEVICE_TABLE_OFFSET, DeviceTable, MAX_MEMBERS};
use crate::format::space::{REGION_BLOCKS, RegionEntry};
use crate::format::{
    BACKUP_SUPERBLOCK_OFFSET, BLOCK_SIZE, CHUNK_BLOCKS, COMPAT_SUPPORTED, DEFERRED_FREE_INO,
    FORMAT_VERSION, FormatError, FsState, Geometry, INCOMPAT_SUPPORTED, INODE_BITMAP_OFFSET,
    INODE_SIZE, INODES_PER_CHUNK, ITABLE_FANOUT_MAX, IncompatFeatures, Inode, ItableLayout,
    LABEL_LEN, MIN_DEVICE_SIZE, RO_COMPAT_SUPPORTED, ROOT_INO, STATE_MAGIC, STATE_OFFSET,
    SUPERBLOCK_MAGIC, SUPERBLOCK_OFFSET, Superblock, USABLE_INODES_PER_CHUNK, blocks_to_bytes,
    file_type, inode_flags,
};
use crate::meta::space;
use std::io::Read;
use zerocopy::{FromZeros, IntoBytes};

/// What to write.
#[derive(Clone, Debug, Default)]
pub struct MkfsOptions {
    /// Volume label: at most [`LABEL_LEN`] bytes of UTF-8, no NUL.
    pub label: String,
    /// The file system's UUID; `None` draws a random (version 4) one.
    pub uuid: Option<[u8; 16]>,
    /// Creation time, nanoseconds since the Unix epoch (see [`now_ns`]).
    pub now_ns: i64,
    /// Owner and permissions of the root directory.
    pub root: RootDir,
    /// Write the layout of format version 2: no space summary (the whole bitmap written)
    /// and a single-level inode table (for tests of older images; the tools never set it).
    pub version_2_layout: bool,
    /// Chunk pointers per inode-table indirect block; `None` for the format's
    /// [`ITABLE_FANOUT_MAX`]. Tests use a small one to reach a second indirect block on a
    /// small device with the same code and structures.
    pub itable_fanout: Option<u64>,
    /// 1 GiB regions to reserve for 1 GiB extents (the superblock's `huge_regions`).
    pub huge_regions: HugeRegions,
}

/// How many of the device's last whole 1 GiB regions to reserve for 1 GiB extents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugeRegions {
    /// This many regions (0: none).
    Count(u64),
    /// This percentage (0..=100) of the device's whole regions, rounded down.
    Percent(u8),
}

impl Default for HugeRegions {
    fn default() -> Self {
        Self::Count(0)
    }
}

impl HugeRegions {
    /// The number of regions this asks for on `geometry`; an explicit count above what
    /// the device can reserve (every whole region but region 0) is an error, a percentage
    /// is capped at it.
    pub fn resolve(self, geometry: &Geometry) -> Result<u64, MkfsError> {
        let max = geometry.max_huge_regions();
        match self {
            Self::Count(n) if n > max => Err(MkfsError::HugeRegions { asked: n, max }),
            Self::Count(n) => Ok(n),
            Self::Percent(p) if p > 100 => Err(MkfsError::HugeRegionsPercent(p)),
            Self::Percent(p) => Ok((geometry.whole_region_count() * u64::from(p) / 100).min(max)),
        }
    }
}

/// The root directory's owner and permission bits, as mke2fs's `-E root_owner=UID:GID`
/// (the inode has room for them: a format needs no new field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootDir {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits only (`0o7777` at most: set-id, sticky and rwx); the type is a
    /// directory.
    pub mode: u16,
}

/// Permission bits of a root directory nobody chose: `rwxr-xr-x`, as mke2fs.
pub const DEFAULT_ROOT_MODE: u16 = 0o755;

impl Default for RootDir {
    /// Owned by root, mode 0755.
    fn default() -> Self {
        Self {
            uid: 0,
            gid: 0,
            mode: DEFAULT_ROOT_MODE,
        }
    }
}

impl RootDir {
    /// The default owner for a format by the calling process: its real uid and gid when it
    /// is not root, so that a user can mount and fill the file system they made; 0:0 for
    /// root (mke2fs's behaviour up to 1.42, which issue 14 asks for).
    pub fn for_caller() -> Self {
        let uid = nix::unistd::getuid();
        if uid.is_root() {
            return Self::default();
        }
        Self {
            uid: uid.as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            mode: DEFAULT_ROOT_MODE,
        }
    }
}

/// What a format produced (or would produce on a device of a given geometry).
#[derive(Clone, Debug, PartialEq)]
pub struct MkfsSummary {
    /// Bytes covered by the file system (the device size rounded down to whole blocks).
    pub size_bytes: u64,
    pub block_count: u64,
    /// Whole 2 MiB chunks on the device.
    pub chunk_count: u64,
    /// Inode slots the format can address on this device: one inode-table chunk per
    /// directory entry, bounded by the 2 MiB chunks the device has room for.
    pub inode_capacity: u64,
    /// Inode slots in the first inode-table chunk (the table grows a chunk at a time).
    pub initial_inodes: u64,
    /// Blocks free after the format.
    pub free_blocks: u64,
    /// Bytes of metadata a fresh file system holds: the fixed regions plus the first
    /// inode-table chunk.
    pub metadata_bytes: u64,
    /// `metadata_bytes` as a percentage of `size_bytes`.
    pub metadata_percent: f64,
    pub uuid: [u8; 16],
    pub label: String,
    /// The root directory as written ([`summary_for`] assumes [`RootDir::default`]).
    pub root: RootDir,
    /// 1 GiB regions reserved for 1 GiB extents ([`summary_for`] assumes none).
    pub huge_regions: u64,
}

/// Why a format failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MkfsError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("label too long: at most {LABEL_LEN} bytes")]
    LabelTooLong,
    #[error("label contains a NUL byte")]
    LabelNul,
    #[error("root directory mode {0:#o} has bits outside 07777")]
    RootMode(u16),
    #[error(
        "--huge-regions {asked}: the device has room for at most {max} reserved 1 GiB \
         regions (its whole 1 GiB regions but the first, which holds the metadata)"
    )]
    HugeRegions { asked: u64, max: u64 },
    #[error("--huge-regions {0}%: a percentage is 0..100")]
    HugeRegionsPercent(u8),
    #[error(
        "the first device ({size} bytes) cannot hold the metadata of a file system of \
         {total} bytes (at least {need} bytes): give a larger first device"
    )]
    FirstMemberTooSmall { size: u64, total: u64, need: u64 },
    #[error("{0} devices: a file system spans at most {MAX_MEMBERS}")]
    TooManyMembers(usize),
}

pub use crate::meta::now_ns;

/// First block of the first inode-table chunk: the first 2 MiB-aligned chunk at or after
/// `meta_end`.
pub fn first_itable_chunk(geometry: &Geometry) -> Result<u64, FormatError> {
    let first = geometry.meta_end.next_multiple_of(CHUNK_BLOCKS);
    if first + CHUNK_BLOCKS > geometry.block_count {
        return Err(FormatError::TooSmall {
            size: geometry.size_bytes(),
            min: MIN_DEVICE_SIZE,
        });
    }
    Ok(first)
}

/// Whether mkfs leaves region `r` uninitialised: a region entirely in the data area
/// ([`Geometry::region_is_lazy`]) after the first inode-table chunk and indirect block
/// (`first_itable_chunk`, `first_itable_indirect`), so that nothing mkfs writes is in it.
pub fn region_starts_uninit(g: &Geometry, r: u64) -> Result<bool, FormatError> {
    let written_end = (first_itable_chunk(g)? + CHUNK_BLOCKS).max(first_itable_indirect(g)? + 1);
    Ok(g.region_is_lazy(r) && r * REGION_BLOCKS >= written_end)
}

/// The block mkfs gives the inode table's first indirect block: the first block after the
/// fixed metadata when chunk 0 leaves room before it, else the block after chunk 0. It is
/// never freed (chunk 0 never is), so the repair finds it here.
pub fn first_itable_indirect(geometry: &Geometry) -> Result<u64, FormatError> {
    let chunk0 = first_itable_chunk(geometry)?;
    let block = if geometry.meta_end < chunk0 {
        geometry.meta_end
    } else {
        chunk0 + CHUNK_BLOCKS
    };
    if block >= geometry.block_count {
        return Err(FormatError::TooSmall {
            size: geometry.size_bytes(),
            min: MIN_DEVICE_SIZE,
        });
    }
    Ok(block)
}

/// Checks a label and returns its on-media (NUL-padded) form.
pub fn encode_label(label: &str) -> Result<[u8; LABEL_LEN], MkfsError> {
    let bytes = label.as_bytes();
    if bytes.len() > LABEL_LEN {
        return Err(MkfsError::LabelTooLong);
    }
    if bytes.contains(&0) {
        return Err(MkfsError::LabelNul);
    }
    let mut out = [0u8; LABEL_LEN];
    out[..bytes.len()].copy_from_slice(bytes);
    Ok(out)
}

/// A random version-4 UUID, from /dev/urandom.
pub fn random_uuid() -> Result<[u8; 16], MkfsError> {
    let path = "/dev/urandom";
    let mut u = [0u8; 16];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut u))
        .map_err(|source| DeviceError::Io {
            path: path.into(),
            source,
        })?;
    u[6] = (u[6] & 0x0f) | 0x40; // version 4
    u[8] = (u[8] & 0x3f) | 0x80; // RFC 4122 variant
    Ok(u)
}

/// The summary of a format of `geometry`, computed without touching a device (so the figures
/// of any device size can be shown or tested). [`format`] returns exactly this, with the
/// root directory it was given.
pub fn summary_for(
    geometry: &Geometry,
    uuid: [u8; 16],
    label: &str,
) -> Result<MkfsSummary, FormatError> {
    let chunk0 = first_itable_chunk(geometry)?;
    first_itable_indirect(geometry)?;
    // The fixed regions, chunk 0 and the first indirect block.
    let metadata_blocks = geometry.meta_end + CHUNK_BLOCKS + 1;
    let itable_chunks =
        ((geometry.block_count - chunk0) / CHUNK_BLOCKS).min(geometry.itable.max_chunks());
    let size_bytes = geometry.size_bytes();
    let metadata_bytes = blocks_to_bytes(metadata_blocks);
    Ok(MkfsSummary {
        size_bytes,
        block_count: geometry.block_count,
        chunk_count: geometry.chunk_count(),
        inode_capacity: itable_chunks * USABLE_INODES_PER_CHUNK,
        initial_inodes: USABLE_INODES_PER_CHUNK,
        free_blocks: geometry.block_count - metadata_blocks,
        metadata_bytes,
        metadata_percent: metadata_bytes as f64 * 100.0 / size_bytes as f64,
        uuid,
        label: label.to_owned(),
        root: RootDir::default(),
        huge_regions: 0,
    })
}

/// The superblock mkfs writes (sealed).
fn superblock(
    g: &Geometry,
    uuid: [u8; 16],
    label: [u8; LABEL_LEN],
    now_ns: i64,
    huge_regions: u64,
) -> Superblock {
    let mut sb = Superblock::new_zeroed();
    sb.magic = SUPERBLOCK_MAGIC;
    sb.version = FORMAT_VERSION;
    sb.sb_size = size_of::<Superblock>() as u32;
    sb.compat = COMPAT_SUPPORTED.bits();
    sb.ro_compat = RO_COMPAT_SUPPORTED.bits();
    sb.incompat = INCOMPAT_SUPPORTED
        .difference(IncompatFeatures::MULTI_DEVICE)
        .bits();
    sb.uuid = uuid;
    sb.label = label;
    sb.block_size = BLOCK_SIZE as u32;
    sb.chunk_blocks = CHUNK_BLOCKS as u32;
    sb.block_count = g.block_count;
    sb.journal_start = g.journal_start;
    sb.journal_slots = g.journal_slots;
    sb.journal_slot_blocks = g.journal_slot_blocks;
    sb.bitmap_start = g.bitmap_start;
    sb.bitmap_blocks = g.bitmap_blocks;
    sb.itable_dir_block = g.itable_dir_block;
    sb.meta_end = g.meta_end;
    sb.created_ns = now_ns;
    if let ItableLayout::Tree { fanout } = g.itable {
        sb.itable_fanout = fanout as u32;
    }
    // At most the device's region count, which is below 2^22 (block_count <= 2^40).
    sb.huge_regions = u32::try_from(huge_regions).unwrap_or(u32::MAX);
    sb.seal();
    sb
}

/// A fresh inode (sealed).
fn new_inode(mode: u16, nlink: u32, parent: u64, now_ns: i64) -> Inode {
    let mut ino = Inode::new(mode, nlink, now_ns, 1);
    ino.parent = parent;
    ino.seal();
    ino
}

/// Cached stores whose ranges must be flushed before the next fence.
struct Writer<'a> {
    media: &'a dyn Media,
    dirty: Vec<(u64, u64)>,
}

impl Writer<'_> {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.media.write(offset, data)?;
        self.dirty.push((offset, data.len() as u64));
        Ok(())
    }

    /// Non-temporal zeroing: durable at the next fence without a flush.
    fn zero(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.media.zero_nt(offset, len)
    }

    /// Sets bits `first..first + count` of the bitmap at byte offset `base` (bit b is bit
    /// b % 8 of byte b / 8), read-modify-write, in pieces of at most 1 MiB.
    fn set_bits(&mut self, base: u64, first: u64, count: u64) -> Result<(), DeviceError> {
        const PIECE_BITS: u64 = 8 << 20;
        let end = first + count;
        let mut bit = first;
        while bit < end {
            let piece_end = end.min((bit / 8 * 8) + PIECE_BITS);
            let byte0 = bit / 8;
            let mut buf = vec![0u8; (piece_end.div_ceil(8) - byte0) as usize];
            self.media.read(base + byte0, &mut buf)?;
            bitmap::set_in_bytes(&mut buf, bit - byte0 * 8, piece_end - bit);
            self.write(base + byte0, &buf)?;
            bit = piece_end;
        }
        Ok(())
    }

    /// Flushes every cached store so far and fences.
    fn persist(&mut self) -> Result<(), DeviceError> {
        for (offset, len) in self.dirty.drain(..) {
            self.media.flush(offset, len)?;
        }
        self.media.fence();
        Ok(())
    }
}

/// Formats `media`: writes a fresh, empty file system over whatever it held.
pub fn format(media: &dyn Media, opts: &MkfsOptions) -> Result<MkfsSummary, MkfsError> {
    format_layout(media, opts, None)
}

/// One device of a multi-device format: the media and the NUMA node it is on
/// ([`crate::format::devices::NODE_UNKNOWN`] when unknown).
#[derive(Clone, Debug)]
pub struct MemberSpec {
    pub media: std::sync::Arc<dyn Media>,
    pub node: u32,
}

/// The logical layout of `members` ([`DeviceTable::build`]: each rounded down to 2 MiB, each
/// after the first at a 1 GiB boundary) and the [`DeviceSet`] that presents it.
pub fn device_set(members: &[MemberSpec]) -> Result<(DeviceTable, DeviceSet), MkfsError> {
    if members.len() > MAX_MEMBERS {
        return Err(MkfsError::TooManyMembers(members.len()));
    }
    let sizes: Vec<u64> = members.iter().map(|m| m.media.size()).collect();
    let nodes: Vec<u32> = members.iter().map(|m| m.node).collect();
    let table = DeviceTable::build(&sizes, &nodes)?;
    let set = DeviceSet::new(
        members
            .iter()
            .zip(table.members())
            .map(|(m, e)| SetMember {
                media: std::sync::Arc::clone(&m.media),
                base: e.base,
                len: e.size,
            })
            .collect(),
    )?;
    Ok((table, set))
}

/// Formats one file system over `members` (2 to [`MAX_MEMBERS`] devices, in order): member 0
/// holds every fixed structure as a single device does, plus the device table; every other
/// member gets its member header. Returns the summary and the set to mount.
pub fn format_devices(
    members: &[MemberSpec],
    opts: &MkfsOptions,
) -> Result<(MkfsSummary, DeviceSet), MkfsError> {
    let (table, set) = device_set(members)?;
    let summary = format_layout(&set, opts, Some(&table))?;
    Ok((summary, set))
}

/// Blocks of region `r` (`start..end`) that lie in one of `reserved`.
fn reserved_in(reserved: &[(u64, u64)], start: u64, end: u64) -> u64 {
    reserved
        .iter()
        .map(|&(first, count)| (first + count).clamp(start, end) - first.clamp(start, end))
        .sum()
}

fn format_layout(
    media: &dyn Media,
    opts: &MkfsOptions,
    table: Option<&DeviceTable>,
) -> Result<MkfsSummary, MkfsError> {
    let label = encode_label(&opts.label)?;
    if opts.root.mode & !0o7777 != 0 {
        return Err(MkfsError::RootMode(opts.root.mode));
    }
    let mut g = Geometry::layout(media.size(), !opts.version_2_layout)?;
    if opts.version_2_layout {
        g.itable = ItableLayout::Flat;
    }
    if let Some(fanout) = opts.itable_fanout {
        if !(1..=ITABLE_FANOUT_MAX).contains(&fanout) {
            return Err(MkfsError::Format(FormatError::corrupted(
                "mkfs options",
                format!("inode-table fan-out {fanout} (must be 1 to {ITABLE_FANOUT_MAX})"),
            )));
        }
        g.itable = ItableLayout::Tree { fanout };
    }
    let chunk0 = first_itable_chunk(&g)?;
    let indirect0 = match g.itable {
        ItableLayout::Tree { .. } => Some(first_itable_indirect(&g)?),
        ItableLayout::Flat => None,
    };
    // Several devices: everything mkfs writes but the member headers is on member 0.
    let reserved = table.map(DeviceTable::reserved_blocks).unwrap_or_default();
    if let Some(t) = table {
        let written_end = (chunk0 + CHUNK_BLOCKS).max(indirect0.unwrap_or(0) + 1);
        let size = t.members()[0].size;
        if blocks_to_bytes(written_end) > size {
            return Err(MkfsError::FirstMemberTooSmall {
                size,
                total: t.end(),
                need: blocks_to_bytes(written_end),
            });
        }
    }
    let uninit_regions: Vec<bool> = (0..g.region_count())
        .map(|r| {
            let (start, end) = (r * REGION_BLOCKS, (r + 1) * REGION_BLOCKS);
            Ok(g.summary_blocks > 0
                && region_starts_uninit(&g, r)?
                && reserved_in(&reserved, start, end) == 0)
        })
        .collect::<Result<_, FormatError>>()?;
    let uninit = |r: u64| uninit_regions[r as usize];
    let uuid = match opts.uuid {
        Some(u) => u,
        None => random_uuid()?,
    };
    let huge_regions = opts.huge_regions.resolve(&g)?;
    let mut summary = MkfsSummary {
        root: opts.root,
        huge_regions,
        ..summary_for(&g, uuid, &opts.label)?
    };
    summary.free_blocks -= reserved_in(&reserved, 0, g.block_count);
    let mut sb = superblock(&g, uuid, label, opts.now_ns, huge_regions);
    if table.is_some() {
        sb.incompat |= IncompatFeatures::MULTI_DEVICE.bits();
        sb.seal();
    }
    if opts.version_2_layout {
        sb.incompat &=
            !(IncompatFeatures::SPACE_SUMMARY | IncompatFeatures::INODE_TABLE_TREE).bits();
        sb.version = sb.incompat_features().version_needed();
        sb.seal();
    }
    let sb_len = size_of::<Superblock>() as u64;
    // A sparse image: back everything written below before the first store (a store into
    // a hole of a full file system raises SIGBUS).
    // (Not the bitmap of the regions left uninitialised: that is the point of them.)
    for (offset, len) in space::metadata_in_use(&g, uninit) {
        media.reserve(offset, len)?;
    }
    media.reserve(blocks_to_bytes(chunk0), blocks_to_bytes(CHUNK_BLOCKS))?;
    if let Some(indirect0) = indirect0 {
        media.reserve(blocks_to_bytes(indirect0), BLOCK_SIZE)?;
    }
    // Each member's first two blocks: its header, and zeros where a single-device file
    // system it held had its backup superblock (which must not be found there again).
    for e in table.map_or(&[][..], |t| &t.members()[1..]) {
        media.reserve(e.base, 2 * BLOCK_SIZE)?;
    }
    let mut w = Writer {
        media,
        dirty: Vec::new(),
    };

    // 1. Destroy the old superblocks first, so that a crash below can never leave an old
    //    superblock describing regions that are half overwritten.
    let zeros = [0u8; size_of::<Superblock>()];
    w.write(SUPERBLOCK_OFFSET, &zeros)?;
    w.write(BACKUP_SUPERBLOCK_OFFSET, &zeros)?;
    w.persist()?;

    // 2. Everything but the superblocks.
    // Block 0 after the superblock: zeros and the state record.
    let mut block0 = vec![0u8; (BLOCK_SIZE - sb_len) as usize];
    let mut state = FsState::new_zeroed();
    state.magic = STATE_MAGIC;
    state.clean = 1;
    state.free_blocks = summary.free_blocks;
    state.seal();
    let at = (STATE_OFFSET - sb_len) as usize;
    block0[at..at + size_of::<FsState>()].copy_from_slice(state.as_bytes());
    if let Some(t) = table {
        let at = (DEVICE_TABLE_OFFSET - sb_len) as usize;
        block0[at..at + size_of::<DeviceTable>()].copy_from_slice(t.as_bytes());
        for (k, e) in t.members().iter().enumerate().skip(1) {
            let mut block = vec![0u8; BLOCK_SIZE as usize];
            let header = t.member_header(uuid, k);
            block[..size_of_val(&header)].copy_from_slice(header.as_bytes());
            w.write(e.base, &block)?;
            w.zero(e.base + BLOCK_SIZE, size_of::<Superblock>() as u64)?;
        }
    }
    w.write(SUPERBLOCK_OFFSET + sb_len, &block0)?;
    // Block 1 after the backup superblock: zeros.
    w.zero(BACKUP_SUPERBLOCK_OFFSET + sb_len, BLOCK_SIZE - sb_len)?;

    // Journal: every slot zeroed as a whole, with an idle header (flushed here; the fence
    // of step 2 makes it durable with the rest).
    crate::journal::format_slots(media, &g).map_err(|e| match e {
        crate::journal::JournalError::Device(d) => MkfsError::Device(d),
        other => MkfsError::Format(crate::format::FormatError::corrupted(
            "journal",
            other.to_string(),
        )),
    })?;

    // Block bitmap: the fixed metadata, the first inode-table chunk and indirect block, and
    // the bits past the end of the device (so they can never be allocated) are set.
    // With the space summary, only the bitmap of the regions that hold those is written:
    // the others are marked uninitialised in the summary (all free, bitmap never read until
    // the allocator writes it), so mkfs writes the same few MiB on any device.
    let bitmap = g.bitmap_offset();
    let bitmap_bits = blocks_to_bytes(g.bitmap_blocks) * 8;
    for (offset, len) in space::metadata_in_use(&g, uninit) {
        let start = offset.max(bitmap);
        let end = (offset + len).min(bitmap + blocks_to_bytes(g.bitmap_blocks));
        if start < end {
            w.zero(start, end - start)?;
        }
    }
    w.set_bits(bitmap, 0, g.meta_end)?;
    w.set_bits(bitmap, chunk0, CHUNK_BLOCKS)?;
    if let Some(indirect0) = indirect0 {
        w.set_bits(bitmap, indirect0, 1)?;
    }
    for &(first, count) in &reserved {
        w.set_bits(bitmap, first, count)?;
    }
    w.set_bits(bitmap, g.block_count, bitmap_bits - g.block_count)?;
    if g.summary_blocks > 0 {
        let entries: Vec<RegionEntry> = (0..g.region_count())
            .map(|r| {
                if uninit(r) {
                    return RegionEntry::fresh_uninit();
                }
                let (start, end) = (r * REGION_BLOCKS, (r + 1) * REGION_BLOCKS);
                let data = space::region_blocks(&g, r)
                    - g.meta_end.clamp(start, end).saturating_sub(start);
                let itable = (chunk0 + CHUNK_BLOCKS).clamp(start, end) - chunk0.clamp(start, end)
                    + u64::from(indirect0.is_some_and(|b| (start..end).contains(&b)))
                    + reserved_in(&reserved, start, end);
                RegionEntry {
                    uninit: false,
                    free: (data - itable) as u32,
                }
            })
            .collect();
        // Exact counts: a fresh file system is as clean as a clean unmount leaves it.
        w.write(g.summary_offset(), &space::summary_bytes(&entries, true))?;
    }

    // Inode-table directory: entry 0 is the first indirect block, whose entry 0 is the
    // first chunk (in the version-2 layout, entry 0 is the first chunk).
    let mut dir = vec![0u8; BLOCK_SIZE as usize];
    dir[..8].copy_from_slice(&chunk0.to_le_bytes());
    if let Some(indirect0) = indirect0 {
        w.write(blocks_to_bytes(indirect0), &dir)?;
        dir[..8].copy_from_slice(&indirect0.to_le_bytes());
    }
    w.write(g.itable_dir_offset(), &dir)?;

    // First inode-table chunk: zeroed, its inode bitmap, the root and deferred-free inodes.
    let chunk = blocks_to_bytes(chunk0);
    w.zero(chunk, blocks_to_bytes(CHUNK_BLOCKS))?;
    let mut ibitmap = vec![0u8; (INODES_PER_CHUNK / 8) as usize];
    let reserved = [0, ROOT_INO, DEFERRED_FREE_INO];
    for slot in reserved
        .into_iter()
        .chain(USABLE_INODES_PER_CHUNK..INODES_PER_CHUNK)
    {
        bitmap::set_in_bytes(&mut ibitmap, slot, 1);
    }
    w.write(chunk + INODE_BITMAP_OFFSET, &ibitmap)?;
    let mut root = new_inode(
        file_type::S_IFDIR | opts.root.mode,
        2,
        ROOT_INO,
        opts.now_ns,
    );
    root.uid = opts.root.uid;
    root.gid = opts.root.gid;
    root.flags = inode_flags::TREE; // as every directory: its entries are in a B+tree
    root.seal();
    w.write(chunk + ROOT_INO * INODE_SIZE, root.as_bytes())?;
    let deferred = new_inode(file_type::S_IFREG, 1, 0, opts.now_ns);
    w.write(chunk + DEFERRED_FREE_INO * INODE_SIZE, deferred.as_bytes())?;
    w.persist()?;

    // 3. The backup superblock, then the primary one: the primary is the commit point.
    w.write(BACKUP_SUPERBLOCK_OFFSET, sb.as_bytes())?;
    w.persist()?;
    w.write(SUPERBLOCK_OFFSET, sb.as_bytes())?;
    w.persist()?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::RecordingDevice;
    use crate::format::{FIRST_USER_INO, MAX_INODES, SLOT_MAGIC, SlotHeader};

    const MIB: u64 = 1 << 20;
    const UUID: [u8; 16] = [7; 16];

    fn opts(label: &str) -> MkfsOptions {
        MkfsOptions {
            label: label.into(),
            uuid: Some(UUID),
            now_ns: 1_700_000_000_123_456_789,
            root: RootDir::default(),
            version_2_layout: false,
            itable_fanout: None,
            huge_regions: HugeRegions::default(),
        }
    }

    fn read(d: &dyn Media, offset: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0u8; len as usize];
        d.read(offset, &mut buf).unwrap();
        buf
    }

    fn superblock_at(d: &dyn Media, offset: u64) -> Result<Superblock, FormatError> {
        Superblock::decode(&read(d, offset, 256))
    }

    fn ones(bytes: &[u8]) -> u64 {
        bytes.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    fn bit(bytes: &[u8], b: u64) -> bool {
        bitmap::get_in_bytes(bytes, b)
    }

    /// Formats a device of `size` bytes and checks every structure mkfs writes.
    fn check_fresh(size: u64) {
        let d = RecordingDevice::new(size);
        // Garbage everywhere, to check that mkfs clears what it must.
        d.write(0, &vec![0xa5; (8 * MIB) as usize]).unwrap();
        let s = format(&d, &opts("test")).unwrap();
        let sb = superblock_at(&d, SUPERBLOCK_OFFSET).unwrap();
        let g = Geometry::from_superblock(&sb, d.size()).unwrap();
        assert_eq!(g, Geometry::for_device_size(size).unwrap());
        assert_eq!(sb.uuid, UUID);
        assert_eq!(sb.label_str(), "test");
        assert_eq!(sb.created_ns, opts("").now_ns);
        assert_eq!(sb.sb_size, 256);
        assert_eq!(read(&d, 0, 256), read(&d, BACKUP_SUPERBLOCK_OFFSET, 256));
        assert_eq!(s, summary_for(&g, UUID, "test").unwrap());

        let st = FsState::decode(&read(&d, STATE_OFFSET, 64)).unwrap();
        assert_eq!((st.clean, st.mount_count, st.orphan_head), (1, 0, 0));
        assert_eq!(st.free_blocks, s.free_blocks);
        assert_eq!(ones(&read(&d, 256, STATE_OFFSET - 256)), 0);
        // A single device has no device table: block 0 is what it was before MULTI_DEVICE.
        assert_eq!(sb.incompat & IncompatFeatures::MULTI_DEVICE.bits(), 0);
        assert_eq!(
            ones(&read(&d, STATE_OFFSET + 64, 4096 - STATE_OFFSET - 64)),
            0
        );
        assert_eq!(
            ones(&read(&d, BACKUP_SUPERBLOCK_OFFSET + 256, 4096 - 256)),
            0
        );

        for i in 0..g.journal_slots {
            let slot = read(&d, g.slot_offset(i), g.slot_size());
            let (h, _) = <SlotHeader as zerocopy::FromBytes>::read_from_prefix(&slot).unwrap();
            assert_eq!((h.magic, h.generation, h.slot_index), (SLOT_MAGIC, 0, i));
            assert_eq!(ones(&slot[64..]), 0, "slot {i} not zeroed");
        }

        // Block bitmap.
        let chunk0 = first_itable_chunk(&g).unwrap();
        assert_eq!(chunk0 % CHUNK_BLOCKS, 0);
        assert!(chunk0 >= g.meta_end && chunk0 < g.meta_end + CHUNK_BLOCKS);
        let bm = read(&d, g.bitmap_offset(), blocks_to_bytes(g.bitmap_blocks));
        let total_bits = bm.len() as u64 * 8;
        let padding = total_bits - g.block_count;
        let indirect0 = first_itable_indirect(&g).unwrap();
        assert!(indirect0 >= g.meta_end && !(chunk0..chunk0 + CHUNK_BLOCKS).contains(&indirect0));
        assert_eq!(ones(&bm), g.meta_end + CHUNK_BLOCKS + 1 + padding);
        assert_eq!(s.free_blocks, g.block_count - g.meta_end - CHUNK_BLOCKS - 1);
        assert!(bit(&bm, indirect0));
        assert!(bit(&bm, 0) && bit(&bm, g.meta_end - 1));
        assert!(bit(&bm, g.meta_end), "chunk 0 or the indirect block");
        assert!(bit(&bm, chunk0) && bit(&bm, chunk0 + CHUNK_BLOCKS - 1));
        assert_eq!(
            bit(&bm, chunk0 + CHUNK_BLOCKS),
            indirect0 == chunk0 + CHUNK_BLOCKS
        );
        assert!(!bit(&bm, g.block_count - 1));
        assert!((g.block_count..total_bits).all(|b| bit(&bm, b)));

        // Inode-table directory and its first indirect block.
        let dir = read(&d, g.itable_dir_offset(), BLOCK_SIZE);
        assert_eq!(dir[..8], indirect0.to_le_bytes());
        assert_eq!(ones(&dir[8..]), 0);
        let ind = read(&d, blocks_to_bytes(indirect0), BLOCK_SIZE);
        assert_eq!(ind[..8], chunk0.to_le_bytes());
        assert_eq!(ones(&ind[8..]), 0);

        // The inode chunk.
        let chunk = read(&d, blocks_to_bytes(chunk0), blocks_to_bytes(CHUNK_BLOCKS));
        let ibm = &chunk[INODE_BITMAP_OFFSET as usize..];
        assert_eq!(ibm.len(), 1024);
        assert_eq!(ones(ibm), 3 + 4);
        for b in [0, 1, 2, 8188, 8189, 8190, 8191] {
            assert!(bit(ibm, b), "inode bit {b}");
        }
        let slot = |i: u64| &chunk[(i * INODE_SIZE) as usize..((i + 1) * INODE_SIZE) as usize];
        let root = Inode::decode(slot(ROOT_INO)).unwrap();
        assert!(root.is_dir());
        assert_eq!(root.mode, file_type::S_IFDIR | 0o755);
        assert_eq!(
            (root.nlink, root.uid, root.gid, root.size, root.blocks),
            (2, 0, 0, 0, 0)
        );
        assert_eq!(
            (root.generation, root.parent, root.tree_root),
            (1, ROOT_INO, 0)
        );
        assert_eq!(root.mtime_ns, opts("").now_ns);
        assert_eq!(root.btime_ns, opts("").now_ns);
        let df = Inode::decode(slot(DEFERRED_FREE_INO)).unwrap();
        assert!(df.is_reg());
        assert_eq!(
            (df.mode, df.nlink, df.generation),
            (file_type::S_IFREG, 1, 1)
        );
        assert_eq!(ones(slot(0)), 0);
        for i in FIRST_USER_INO..USABLE_INODES_PER_CHUNK {
            assert_eq!(ones(slot(i)), 0, "inode {i}");
        }
    }

    #[test]
    fn fresh_file_system_16m() {
        check_fresh(16 * MIB);
    }

    #[test]
    fn odd_sized_device() {
        // Not a multiple of a bitmap word, nor even of a block.
        check_fresh(16 * MIB + 5 * BLOCK_SIZE + 100);
        check_fresh(40 * MIB + 3 * BLOCK_SIZE);
    }

    /// The consistency checker (the invariants fsck enforces) finds nothing to say about a
    /// fresh file system, and the core mounts it.
    #[test]
    fn fresh_file_system_is_consistent_and_mounts() {
        for size in [16 * MIB, 16 * MIB + 5 * BLOCK_SIZE + 100, 100 * MIB] {
            let d = std::sync::Arc::new(RecordingDevice::new(size));
            let s = format(d.as_ref(), &opts("")).unwrap();
            let media: std::sync::Arc<dyn Media> = d;
            let report = crate::check::check(&media).unwrap();
            assert!(report.problems.is_empty(), "{size}: {:#?}", report.problems);
            let fs = crate::fs::Fs::mount(media, crate::fs::MountOptions::default()).unwrap();
            assert!(s.free_blocks > 0);
            drop(fs);
        }
    }

    /// The root directory gets the owner and mode asked for, fsck finds it consistent, the
    /// core serves it; a mode with bits beyond 07777 is refused before anything is written.
    #[test]
    fn root_owner_and_mode() {
        let d = std::sync::Arc::new(RecordingDevice::new(16 * MIB));
        let root = RootDir {
            uid: 1000,
            gid: 4_000_000_000,
            mode: 0o1770,
        };
        let s = format(d.as_ref(), &MkfsOptions { root, ..opts("") }).unwrap();
        assert_eq!(s.root, root);
        let media: std::sync::Arc<dyn Media> = d;
        let report = crate::check::check(&media).unwrap();
        assert!(report.problems.is_empty(), "{:#?}", report.problems);
        let fs = crate::fs::Fs::mount(media, crate::fs::MountOptions::default()).unwrap();
        let attr = fs.getattr(ROOT_INO).unwrap();
        assert_eq!(
            (attr.uid, attr.gid, attr.mode),
            (1000, 4_000_000_000, u32::from(file_type::S_IFDIR | 0o1770))
        );
        drop(fs);

        let d = RecordingDevice::new(16 * MIB);
        let bad = RootDir {
            mode: 0o10755,
            ..RootDir::default()
        };
        assert!(matches!(
            format(
                &d,
                &MkfsOptions {
                    root: bad,
                    ..opts("")
                }
            ),
            Err(MkfsError::RootMode(0o10755))
        ));
        assert_eq!(ones(&d.snapshot()), 0);
    }

    #[test]
    fn too_small() {
        let d = RecordingDevice::new(8 * MIB);
        assert!(matches!(
            format(&d, &opts("")),
            Err(MkfsError::Format(FormatError::TooSmall { .. }))
        ));
    }

    #[test]
    fn flipped_bit_fails_the_checksum() {
        let d = RecordingDevice::new(16 * MIB);
        format(&d, &opts("flip")).unwrap();
        let mut sb = read(&d, 0, 256);
        sb[100] ^= 0x10; // in the label
        assert!(matches!(
            Superblock::decode(&sb),
            Err(FormatError::Checksum {
                what: "superblock",
                ..
            })
        ));
    }

    #[test]
    fn unknown_incompat_feature_is_refused() {
        let d = RecordingDevice::new(16 * MIB);
        format(&d, &opts("")).unwrap();
        let mut sb = superblock_at(&d, 0).unwrap();
        sb.incompat |= 1 << 40;
        sb.seal();
        assert!(matches!(
            Superblock::decode(sb.as_bytes()),
            Err(FormatError::UnknownIncompat(x)) if x == 1 << 40
        ));
    }

    #[test]
    fn labels() {
        let d = RecordingDevice::new(16 * MIB);
        let long = "x".repeat(65);
        assert!(matches!(
            format(&d, &opts(&long)),
            Err(MkfsError::LabelTooLong)
        ));
        assert!(matches!(
            format(&d, &opts("a\0b")),
            Err(MkfsError::LabelNul)
        ));
        // Nothing was written by a refused format.
        assert_eq!(ones(&d.snapshot()), 0);
        let max = "é".repeat(32);
        format(&d, &opts(&max)).unwrap();
        assert_eq!(superblock_at(&d, 0).unwrap().label_str(), max);
    }

    #[test]
    fn random_uuids_are_version_4() {
        let d = RecordingDevice::new(16 * MIB);
        let s = format(
            &d,
            &MkfsOptions {
                uuid: None,
                ..opts("")
            },
        )
        .unwrap();
        assert_eq!(superblock_at(&d, 0).unwrap().uuid, s.uuid);
        let other = random_uuid().unwrap();
        assert_ne!(s.uuid, other);
        for u in [s.uuid, other] {
            assert_eq!(u[6] >> 4, 4);
            assert_eq!(u[8] >> 6, 0b10);
        }
    }

    #[test]
    fn overhead_1g() {
        let d = RecordingDevice::new(1 << 30);
        let s = format(&d, &opts("")).unwrap();
        assert_eq!(s.block_count, 262_144);
        assert_eq!(s.chunk_count, 512);
        assert_eq!(s.initial_inodes, 8188);
        assert!(s.inode_capacity > 500 * 8188 && s.inode_capacity <= 512 * 8188);
        assert!(s.metadata_percent < 1.0, "{s:?}");
        assert!(superblock_at(&d, 0).is_ok());
    }

    #[test]
    fn overhead_64g() {
        let g = Geometry::for_device_size(64 << 30).unwrap();
        let s = summary_for(&g, UUID, "big").unwrap();
        assert_eq!(s.size_bytes, 64 << 30);
        assert_eq!(s.chunk_count, 32_768);
        // Every chunk after the metadata could hold inodes: no longer capped at 512.
        let chunk0 = first_itable_chunk(&g).unwrap() / CHUNK_BLOCKS;
        assert_eq!(
            s.inode_capacity,
            (32_768 - chunk0) * USABLE_INODES_PER_CHUNK
        );
        assert!(s.inode_capacity <= MAX_INODES);
        assert!(s.metadata_percent < 0.02, "{s:?}");
        assert_eq!(s.free_blocks, s.block_count - g.meta_end - CHUNK_BLOCKS - 1);
    }

    #[test]
    fn inode_capacity_is_bounded_by_the_device() {
        let g = Geometry::for_device_size(16 * MIB).unwrap();
        let s = summary_for(&g, UUID, "").unwrap();
        // 8 chunks; the first whole chunk after the metadata is chunk 1.
        assert_eq!(s.inode_capacity, 7 * USABLE_INODES_PER_CHUNK);
    }

    /// Formats over an existing file system while recording, and checks every crash state a
    /// power failure could leave: either the old file system untouched (but for its
    /// superblocks), or no valid superblock, or the complete new file system.
    #[test]
    fn crash_during_mkfs_never_leaves_a_half_file_system() {
        let d = RecordingDevice::new(16 * MIB);
        format(&d, &opts("old")).unwrap();
        let old = d.snapshot();
        d.start_recording();
        let new_uuid = [9; 16];
        format(
            &d,
            &MkfsOptions {
                uuid: Some(new_uuid),
                ..opts("new")
            },
        )
        .unwrap();
        let new = d.snapshot();
        let fences = d.fence_count();
        assert_eq!(fences, 4);
        let beyond_sbs = 2 * BLOCK_SIZE as usize;
        let (mut seen_none, mut seen_old, mut seen_new) = (false, false, false);
        for f in 0..=fences {
            let c = d.crash_images(f);
            let n = c.pending.len();
            let trials: u64 = if n <= 8 { 1 << n } else { 18 };
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            for trial in 0..trials {
                let img = c.image_with(|i| match (n <= 8, trial) {
                    (true, _) => trial & (1 << i) != 0,
                    (false, 0) => false,
                    (false, 1) => true,
                    (false, _) => {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state & 1 == 1
                    }
                });
                let dev = RecordingDevice::from_image(img.clone());
                match superblock_at(&dev, 0) {
                    Err(_) => seen_none = true,
                    Ok(sb) if sb.uuid == UUID => {
                        assert_eq!(f, 0, "old superblock valid after fence {f}");
                        seen_old = true;
                        // Only the backup superblock may have been cleared.
                        assert!(img[256..4096] == old[256..4096]);
                        assert!(img[beyond_sbs..] == old[beyond_sbs..]);
                    }
                    Ok(sb) => {
                        assert_eq!(sb.uuid, new_uuid);
                        assert!(img == new, "new superblock valid on an incomplete image");
                        seen_new = true;
                    }
                }
            }
        }
        assert!(seen_none && seen_old && seen_new);
    }
}
