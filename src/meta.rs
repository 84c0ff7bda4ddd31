//! Readers of the fixed metadata (superblocks and the state record), below the POSIX core:
//! the core's mount, fsck's check and its repair all read the device through these.

use crate::device::Media;
use crate::error::Result;
use crate::format::{
    BACKUP_SUPERBLOCK_OFFSET, FsState, Geometry, STATE_OFFSET, SUPERBLOCK_OFFSET, Superblock,
};

fn superblock_at(media: &dyn Media, offset: u64) -> Result<(Superblock, Geometry)> {
    let mut buf = vec![0u8; size_of::<Superblock>()];
    media.read(offset, &mut buf)?;
    let sb = Superblock::decode(&buf)?;
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

/// Reads and validates the state record.
pub fn read_state(media: &dyn Media) -> Result<FsState> {
    let mut buf = vec![0u8; size_of::<FsState>()];
    media.read(STATE_OFFSET, &mut buf)?;
    Ok(FsState::decode(&buf)?)
}
