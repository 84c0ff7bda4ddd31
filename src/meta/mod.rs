//! The metadata objects below the POSIX core: readers of the fixed metadata (superblocks and
//! the state record), the inode table, extent maps, directories and xattr areas. The core
//! (src/fs), fsck's check and its repair all read and change them through these modules;
//! check and repair need nothing of the POSIX core.

pub mod devices;
pub mod dir;
pub mod extent;
pub mod inode;
pub mod space;
pub mod xattr;

pub use dir::{check_name, name_hash};
pub use inode::InodeTable;

use crate::btree::{Tree, TreeReader};
use crate::format::Inode;

use crate::device::Media;
use crate::error::Result;
use crate::format::{
    BACKUP_SUPERBLOCK_OFFSET, FormatError, FsState, Geometry, STATE_OFFSET, SUPERBLOCK_OFFSET,
    Superblock,
};

fn superblock_at(media: &dyn Media, offset: u64) -> Result<(Superblock, Geometry)> {
    let mut buf = vec![0u8; size_of::<Superblock>()];
    media.read(offset, &mut buf)?;
    let sb = Superblock::decode(&buf)?;
    if let Some(table) = devices::read_device_table(media, &sb)? {
        if table.end() > media.size() {
            return Err(FormatError::MissingMembers(table.count).into());
        }
    }
    let geometry = Geometry::from_superblock(&sb, media.size())?;
    Ok((sb, geometry))
}

/// Reads and validates the superblock and the geometry it describes.
pub fn read_superblock(media: &dyn Media) -> Result<(Superblock, Geometry)> {
    superblock_at(media, SUPERBLOCK_OFFSET)
}

/// Reads the backup superblock (fsck uses it when the primary is damaged).
pub fn read_backup_superblock(media: &dyn Media) -> Result<(Superblock, Geometry)> {
    superblock_at(media, BACKUP_SUPERBLOCK_OFFSET)
}

/// Writes a changed superblock (a new version or feature) in place of the current one: the
/// backup first, flushed and fenced, then the primary. A crash leaves a valid primary of
/// either version, or a torn primary beside a valid new backup (the mount then refuses
/// and names fsck.pmfs -y, which restores the primary from the backup). docs/FORMAT.md,
/// "Version 1 file systems".
pub fn upgrade_superblock(media: &dyn Media, sb: &Superblock) -> Result<()> {
    use zerocopy::IntoBytes;
    for offset in [BACKUP_SUPERBLOCK_OFFSET, SUPERBLOCK_OFFSET] {
        media.write(offset, sb.as_bytes())?;
        media.flush(offset, size_of::<Superblock>() as u64)?;
        media.fence();
    }
    Ok(())
}

/// Reads and validates the state record.
pub fn read_state(media: &dyn Media) -> Result<FsState> {
    let mut buf = vec![0u8; size_of::<FsState>()];
    media.read(STATE_OFFSET, &mut buf)?;
    Ok(FsState::decode(&buf)?)
}

/// The current time in nanoseconds since the Unix epoch (negative before it).
pub fn now_ns() -> i64 {
    let now = std::time::SystemTime::now();
    match now.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

/// Every extent of a regular file, validated (for the checker and `pmfs layout`).
pub fn file_extents(
    media: &dyn Media,
    geometry: &Geometry,
    ino: u64,
    inode: &Inode,
) -> Result<Vec<crate::format::ExtentRecord>> {
    extent::all(&TreeReader::new(media, geometry), ino, inode)
}

/// The xattrs of an inode, validated.
pub fn load_xattrs(
    media: &dyn Media,
    geometry: &Geometry,
    ino: u64,
    inode: &Inode,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    xattr::load(media, geometry, ino, inode)
}

/// Every entry of a directory tree as (name, inode, type byte), validated.
pub fn list_dir(r: &TreeReader<'_>, tree: &Tree, out: &mut Vec<(Vec<u8>, u64, u8)>) -> Result<()> {
    dir::list(r, tree, 0, &mut |e| {
        out.push((e.name, e.ino, e.kind));
        true
    })
}
