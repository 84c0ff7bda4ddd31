//! The ioctls pmfs serves: the inode attribute flags of chattr(1)/lsattr(1) (the
//! [`AttrIoctl`] commands), pmfs's own extent maps for `pmfs layout` and
//! direct-mapping leases for `pmfs::dax` (protocol in `crate::device::dax`), and FITRIM.
//!
//! FUSE carries ioctl arguments of a fixed size (the size encoded in the command), so
//! replies are paged: a request names the first extent it wants. A lease belongs to the
//! file handle that took it and ends when that handle is released.

use crate::device::dax::{
    DIRECT_OP_ACCESSED, DIRECT_OP_ALLOCATE, DIRECT_OP_EXTEND, DIRECT_OP_STATE, DIRECT_OP_TOUCH,
    DirectReply, DirectRequest, ENTRIES_PER_PAGE, ENTRY_UNWRITTEN, IOCTL_SIZE, MAP_FLAG_LEASE,
    MAP_FLAG_PUBLISH, MAP_MAGIC, MapEntry, MapReply, MapRequest,
};
use crate::error::Error;
use crate::format::inode_flags;
use crate::fs::{Ctx, Fs, MappedExtent};
use parking_lot::Mutex;
use std::collections::HashMap;
use zerocopy::{FromBytes, IntoBytes};

/// FITRIM: `_IOWR('X', 121, struct fstrim_range)`.
pub const FITRIM: u32 = 0xc018_5879;

/// `struct fstrim_range` of <linux/fs.h>: bytes of the device, and the reply's `len` is the
/// number of bytes trimmed.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, zerocopy::Immutable, zerocopy::KnownLayout)]
#[repr(C)]
pub struct FstrimRange {
    pub start: u64,
    pub len: u64,
    pub minlen: u64,
}

/// Serves one FITRIM call (the caller checked the privilege): trims and returns the
/// `fstrim_range` to copy back, with `len` the bytes trimmed.
pub fn fitrim(fs: &Fs, input: &[u8]) -> Result<Vec<u8>, Error> {
    let (mut range, _) = FstrimRange::read_from_prefix(input).map_err(|_| Error::Invalid)?;
    range.len = fs.trim(range.start, range.len, range.minlen)?;
    Ok(range.as_bytes().to_vec())
}

/// Leases per file handle, and the extent lists of live leases (for paging) with the
/// layout generation they belong to (published leases; 0 otherwise).
#[derive(Debug, Default)]
pub struct LeaseTable {
    by_fh: Mutex<HashMap<u64, Vec<u64>>>,
    extents: Mutex<HashMap<u64, (u64, Vec<MapEntry>)>>,
    /// Published leases whose holder allocated blocks ([`DIRECT_OP_ALLOCATE`]): lease ->
    /// (inode, end of the furthest range), trimmed back to the end of file at release.
    allocated: Mutex<HashMap<u64, (u64, u64)>>,
}

/// What a [`LeaseTable::direct`] request did.
#[derive(Debug, PartialEq, Eq)]
pub enum DirectOutcome {
    /// Reply with these bytes.
    Reply(Vec<u8>),
    /// The file's data changed behind the kernel's back: drop its cached pages, then reply.
    Touched(Vec<u8>),
    /// Only the file's attributes changed (the access time): drop the kernel's cached
    /// attributes, then reply.
    AttrsChanged(Vec<u8>),
}

fn entry(e: &MappedExtent) -> MapEntry {
    MapEntry {
        file_offset: e.file_offset,
        device_offset: e.device_offset,
        len: e.len,
        flags: if e.unwritten { ENTRY_UNWRITTEN } else { 0 },
        pad: 0,
    }
}

impl LeaseTable {
    /// Serves one PMFS_IOC_MAP call on `ino` through handle `fh`; returns the reply bytes.
    pub fn handle(&self, fs: &Fs, ino: u64, fh: u64, input: &[u8]) -> Result<Vec<u8>, Error> {
        let (req, _) = MapRequest::read_from_prefix(input).map_err(|_| Error::Invalid)?;
        if req.magic != MAP_MAGIC {
            return Err(Error::Invalid);
        }
        let publish = req.flags & MAP_FLAG_LEASE != 0 && req.flags & MAP_FLAG_PUBLISH != 0;
        let (lease, generation, all) = if publish && (req.lease == 0 || req.start == 0) {
            // A new published lease, or a refresh of one this handle owns.
            let refresh = (req.lease != 0).then_some(req.lease);
            if refresh.is_some() && !self.owns(fh, req.lease) {
                return Err(Error::Invalid);
            }
            let p = fs.map_published(ino, refresh)?;
            let entries: Vec<MapEntry> = p.extents.iter().map(entry).collect();
            if refresh.is_none() {
                self.by_fh.lock().entry(fh).or_default().push(p.lease);
            }
            self.extents
                .lock()
                .insert(p.lease, (p.generation, entries.clone()));
            (p.lease, p.generation, entries)
        } else if req.lease != 0 {
            let ext = self.extents.lock();
            let owned = self.owns(fh, req.lease);
            match ext.get(&req.lease) {
                Some((generation, v)) if owned => (req.lease, *generation, v.clone()),
                _ => return Err(Error::Invalid),
            }
        } else if req.flags & MAP_FLAG_LEASE != 0 {
            let (lease, exts) = fs.map_direct(ino, req.offset, req.len)?;
            let entries: Vec<MapEntry> = exts.iter().map(entry).collect();
            self.by_fh.lock().entry(fh).or_default().push(lease);
            self.extents.lock().insert(lease, (0, entries.clone()));
            (lease, 0, entries)
        } else {
            let end = req.offset.saturating_add(req.len);
            let exts = fs.layout(ino)?;
            let entries = exts
                .iter()
                .filter(|e| e.file_offset < end && e.file_offset + e.len > req.offset)
                .map(entry)
                .collect();
            (0, 0, entries)
        };
        let start = (req.start as usize).min(all.len());
        let page = &all[start..(start + ENTRIES_PER_PAGE).min(all.len())];
        let reply = MapReply {
            magic: MAP_MAGIC,
            count: page.len() as u32,
            total: all.len() as u32,
            pad: 0,
            lease,
            generation,
        };
        let mut out = Vec::with_capacity(IOCTL_SIZE);
        out.extend_from_slice(reply.as_bytes());
        for e in page {
            out.extend_from_slice(e.as_bytes());
        }
        out.resize(IOCTL_SIZE, 0);
        Ok(out)
    }

    fn owns(&self, fh: u64, lease: u64) -> bool {
        self.by_fh
            .lock()
            .get(&fh)
            .is_some_and(|v| v.contains(&lease))
    }

    /// Serves one PMFS_IOC_DIRECT call on `ino` through handle `fh`.
    pub fn direct(
        &self,
        fs: &Fs,
        ctx: &Ctx,
        ino: u64,
        fh: u64,
        input: &[u8],
    ) -> Result<DirectOutcome, Error> {
        let (req, _) = DirectRequest::read_from_prefix(input).map_err(|_| Error::Invalid)?;
        if req.magic != MAP_MAGIC || !self.owns(fh, req.lease) {
            return Err(Error::Invalid);
        }
        // The reply header, then `path` (`path_len` says how long), then `extra` (as the op
        // defines it).
        let header = |slot: u32, path: &[u8], extra: &[u8]| {
            let reply = DirectReply {
                magic: MAP_MAGIC,
                slot,
                path_len: path.len() as u32,
                pad: 0,
            };
            let mut out = Vec::with_capacity(IOCTL_SIZE);
            out.extend_from_slice(reply.as_bytes());
            out.extend_from_slice(path);
            out.extend_from_slice(extra);
            out.resize(IOCTL_SIZE, 0);
            out
        };
        match req.op {
            DIRECT_OP_STATE => {
                use std::os::unix::ffi::OsStrExt;
                let (slot, path) = fs.published_slot(ino).ok_or(Error::Invalid)?;
                let path = path.as_os_str().as_bytes();
                if path.len() > IOCTL_SIZE - size_of::<DirectReply>() {
                    return Err(Error::NameTooLong);
                }
                Ok(DirectOutcome::Reply(header(slot, path, &[])))
            }
            DIRECT_OP_TOUCH => {
                fs.touch_data(ino)?;
                Ok(DirectOutcome::Touched(header(0, &[], &[])))
            }
            DIRECT_OP_ALLOCATE => {
                if !fs.lease_is_published(req.lease, ino) {
                    return Err(Error::Invalid);
                }
                let end = fs.allocate_for_client(ino, req.offset, req.len)?;
                let mut allocated = self.allocated.lock();
                let furthest = allocated.entry(req.lease).or_insert((ino, 0));
                furthest.1 = furthest.1.max(end);
                drop(allocated);
                Ok(DirectOutcome::Touched(header(0, &[], &end.to_le_bytes())))
            }
            DIRECT_OP_EXTEND => {
                if !fs.lease_is_published(req.lease, ino) {
                    return Err(Error::Invalid);
                }
                let to = req.offset.checked_add(req.len).ok_or(Error::FileTooBig)?;
                fs.extend_for_client(ctx, ino, req.offset, to, req.generation)?;
                Ok(DirectOutcome::Touched(header(0, &[], &[])))
            }
            DIRECT_OP_ACCESSED => {
                if !fs.lease_is_published(req.lease, ino) {
                    return Err(Error::Invalid);
                }
                let strict = fs.accessed_by_client(ino)?;
                // The kernel's cached attributes hold the old access time.
                Ok(DirectOutcome::AttrsChanged(header(
                    0,
                    &[],
                    &u64::from(strict).to_le_bytes(),
                )))
            }
            _ => Err(Error::Invalid),
        }
    }

    /// Ends every lease taken through `fh` (its release).
    pub fn release(&self, fs: &Fs, fh: u64) {
        let leases = self.by_fh.lock().remove(&fh).unwrap_or_default();
        for lease in leases {
            self.extents.lock().remove(&lease);
            let allocated = self.allocated.lock().remove(&lease);
            if let Some((ino, end)) = allocated {
                if let Err(e) = fs.trim_client_allocation(ino, end) {
                    log::error!("inode {ino}: giving back blocks past the end of file: {e}");
                }
            }
            if let Err(e) = fs.end_lease(lease) {
                log::error!("ending lease {lease}: {e}");
            }
        }
    }
}

/// `FS_*_FL` bits of FS_IOC_GETFLAGS/SETFLAGS and the pmfs inode flag of each.
const FS_FLAGS: [(u32, u16); 7] = [
    (0x0000_0008, inode_flags::SYNC),      // FS_SYNC_FL
    (0x0000_0010, inode_flags::IMMUTABLE), // FS_IMMUTABLE_FL
    (0x0000_0020, inode_flags::APPEND),    // FS_APPEND_FL
    (0x0000_0040, inode_flags::NODUMP),    // FS_NODUMP_FL
    (0x0000_0080, inode_flags::NOATIME),   // FS_NOATIME_FL
    (0x0001_0000, inode_flags::DIRSYNC),   // FS_DIRSYNC_FL
    (0x0200_0000, inode_flags::DAX),       // FS_DAX_FL
];

/// `FS_XFLAG_*` bits of struct fsxattr and the pmfs inode flag of each (there is no
/// xflag for DIRSYNC: FS_IOC_FSSETXATTR leaves it as it is).
const FS_XFLAGS: [(u32, u16); 6] = [
    (0x0000_0008, inode_flags::IMMUTABLE), // FS_XFLAG_IMMUTABLE
    (0x0000_0010, inode_flags::APPEND),    // FS_XFLAG_APPEND
    (0x0000_0020, inode_flags::SYNC),      // FS_XFLAG_SYNC
    (0x0000_0040, inode_flags::NOATIME),   // FS_XFLAG_NOATIME
    (0x0000_0080, inode_flags::NODUMP),    // FS_XFLAG_NODUMP
    (0x0000_8000, inode_flags::DAX),       // FS_XFLAG_DAX
];

/// Inode flags as the bits of `table`.
fn to_bits(table: &[(u32, u16)], flags: u16) -> u32 {
    table
        .iter()
        .filter(|(_, f)| flags & f != 0)
        .fold(0, |acc, (bit, _)| acc | bit)
}

/// The bits of `table` as inode flags; `None` when a bit is not in `table` (EOPNOTSUPP, as
/// XFS answers a flag it does not have).
fn from_bits(table: &[(u32, u16)], bits: u32) -> Option<u16> {
    let known = table.iter().fold(0, |acc, (bit, _)| acc | bit);
    (bits & !known == 0).then(|| {
        table
            .iter()
            .filter(|(bit, _)| bits & bit != 0)
            .fold(0, |acc, (_, f)| acc | f)
    })
}

/// struct fsxattr of FS_IOC_FSGETXATTR/FSSETXATTR, 28 bytes.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, zerocopy::Immutable)]
#[repr(C)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

const _: () = assert!(size_of::<FsXattr>() == 28);

/// The inode-flag ioctls. The kernel sends them itself (fuse_fileattr_get/set, for
/// FS_IOC_GETFLAGS, SETFLAGS, FSGETXATTR, FSSETXATTR and the file_getattr/file_setattr
/// calls) with the 64-bit command numbers but an `int`, 4 bytes, of flags; the 32-bit
/// encodings (FS_IOC32_*) and 8-byte arguments are taken too, in case a kernel ever passes
/// them on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttrIoctl {
    GetFlags,
    SetFlags,
    FsGetXattr,
    FsSetXattr,
}

impl AttrIoctl {
    pub fn from_cmd(cmd: u32) -> Option<Self> {
        match cmd {
            // FS_IOC_GETFLAGS = _IOR('f', 1, long); FS_IOC32_GETFLAGS = _IOR('f', 1, int).
            0x8008_6601 | 0x8004_6601 => Some(Self::GetFlags),
            // FS_IOC_SETFLAGS = _IOW('f', 2, long); FS_IOC32_SETFLAGS = _IOW('f', 2, int).
            0x4008_6602 | 0x4004_6602 => Some(Self::SetFlags),
            // FS_IOC_FSGETXATTR = _IOR('X', 31, struct fsxattr).
            0x801c_581f => Some(Self::FsGetXattr),
            // FS_IOC_FSSETXATTR = _IOW('X', 32, struct fsxattr).
            0x401c_5820 => Some(Self::FsSetXattr),
            _ => None,
        }
    }

    /// Serves the ioctl on `ino`; returns the reply bytes (at most `out_size`).
    pub fn serve(
        self,
        fs: &Fs,
        ctx: &Ctx,
        ino: u64,
        input: &[u8],
        out_size: u32,
    ) -> Result<Vec<u8>, Error> {
        match self {
            Self::GetFlags => {
                if out_size < 4 {
                    return Err(Error::Invalid);
                }
                let bits = to_bits(&FS_FLAGS, fs.attr_flags(ino)?);
                // An int (4 bytes) or a long (8): the low bytes, little-endian, either way.
                let mut out = u64::from(bits).to_le_bytes().to_vec();
                out.truncate((out_size as usize).min(8));
                Ok(out)
            }
            Self::SetFlags => {
                let raw: [u8; 4] = input
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .ok_or(Error::Invalid)?;
                let flags =
                    from_bits(&FS_FLAGS, u32::from_le_bytes(raw)).ok_or(Error::NotSupported)?;
                fs.set_attr_flags(ctx, ino, flags)?;
                Ok(Vec::new())
            }
            Self::FsGetXattr => {
                if (out_size as usize) < size_of::<FsXattr>() {
                    return Err(Error::Invalid);
                }
                let x = FsXattr {
                    xflags: to_bits(&FS_XFLAGS, fs.attr_flags(ino)?),
                    ..FsXattr::default()
                };
                Ok(x.as_bytes().to_vec())
            }
            Self::FsSetXattr => {
                let (x, _) = FsXattr::read_from_prefix(input).map_err(|_| Error::Invalid)?;
                // No extent size hints and no projects (nextents is output only).
                if x.extsize != 0 || x.projid != 0 || x.cowextsize != 0 {
                    return Err(Error::NotSupported);
                }
                let flags = from_bits(&FS_XFLAGS, x.xflags).ok_or(Error::NotSupported)?;
                let kept = fs.attr_flags(ino)? & inode_flags::DIRSYNC;
                fs.set_attr_flags(ctx, ino, flags | kept)?;
                Ok(Vec::new())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_tables_map_both_ways_and_refuse_unknown_bits() {
        for table in [&FS_FLAGS[..], &FS_XFLAGS[..]] {
            let all = table.iter().fold(0, |acc, (_, f)| acc | f);
            assert_eq!(from_bits(table, to_bits(table, all)), Some(all));
            for &(bit, flag) in table {
                assert_eq!(to_bits(table, flag), bit);
                assert_eq!(from_bits(table, bit), Some(flag));
            }
        }
        // FS_COMPR_FL, FS_EXTENT_FL; FS_XFLAG_REALTIME, FS_XFLAG_EXTSIZE.
        for bit in [0x4, 0x8_0000] {
            assert_eq!(from_bits(&FS_FLAGS, bit), None);
        }
        for bit in [0x1, 0x800] {
            assert_eq!(from_bits(&FS_XFLAGS, bit), None);
        }
        // DIRSYNC has no xflag: FSSETXATTR keeps it (serve), FSGETXATTR cannot show it.
        assert_eq!(to_bits(&FS_XFLAGS, inode_flags::DIRSYNC), 0);
        assert_eq!(to_bits(&FS_FLAGS, inode_flags::ATTR_FLAGS).count_ones(), 7);
    }

    #[test]
    fn both_encodings_of_the_flag_ioctls_are_recognised() {
        assert_eq!(AttrIoctl::from_cmd(0x8008_6601), Some(AttrIoctl::GetFlags));
        assert_eq!(AttrIoctl::from_cmd(0x8004_6601), Some(AttrIoctl::GetFlags));
        assert_eq!(AttrIoctl::from_cmd(0x4008_6602), Some(AttrIoctl::SetFlags));
        assert_eq!(AttrIoctl::from_cmd(0x4004_6602), Some(AttrIoctl::SetFlags));
        assert_eq!(
            AttrIoctl::from_cmd(0x801c_581f),
            Some(AttrIoctl::FsGetXattr)
        );
        assert_eq!(
            AttrIoctl::from_cmd(0x401c_5820),
            Some(AttrIoctl::FsSetXattr)
        );
        assert_eq!(AttrIoctl::from_cmd(0x8004_587d), None); // FS_IOC_SHUTDOWN
    }
}
