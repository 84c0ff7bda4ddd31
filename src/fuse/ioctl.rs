//! The pmfs ioctl: extent maps for `pmfs layout` and direct-mapping leases for
//! `pmfs::dax` (protocol in `crate::device::dax`); and FITRIM.
//!
//! FUSE carries ioctl arguments of a fixed size (the size encoded in the command), so
//! replies are paged: a request names the first extent it wants. A lease belongs to the
//! file handle that took it and ends when that handle is released.

use crate::device::dax::{
    ENTRIES_PER_PAGE, ENTRY_UNWRITTEN, IOCTL_SIZE, MAP_FLAG_LEASE, MAP_MAGIC, MapEntry, MapReply,
    MapRequest,
};
use crate::error::Error;
use crate::fs::{Fs, MappedExtent};
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

/// Leases per file handle, and the extent lists of live leases (for paging).
#[derive(Debug, Default)]
pub struct LeaseTable {
    by_fh: Mutex<HashMap<u64, Vec<u64>>>,
    extents: Mutex<HashMap<u64, Vec<MapEntry>>>,
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
        let (lease, all) = if req.lease != 0 {
            let ext = self.extents.lock();
            let owned = self
                .by_fh
                .lock()
                .get(&fh)
                .is_some_and(|v| v.contains(&req.lease));
            match ext.get(&req.lease) {
                Some(v) if owned => (req.lease, v.clone()),
                _ => return Err(Error::Invalid),
            }
        } else if req.flags & MAP_FLAG_LEASE != 0 {
            let (lease, exts) = fs.map_direct(ino, req.offset, req.len)?;
            let entries: Vec<MapEntry> = exts.iter().map(entry).collect();
            self.by_fh.lock().entry(fh).or_default().push(lease);
            self.extents.lock().insert(lease, entries.clone());
            (lease, entries)
        } else {
            let end = req.offset.saturating_add(req.len);
            let exts = fs.layout(ino)?;
            let entries = exts
                .iter()
                .filter(|e| e.file_offset < end && e.file_offset + e.len > req.offset)
                .map(entry)
                .collect();
            (0, entries)
        };
        let start = (req.start as usize).min(all.len());
        let page = &all[start..(start + ENTRIES_PER_PAGE).min(all.len())];
        let reply = MapReply {
            magic: MAP_MAGIC,
            count: page.len() as u32,
            total: all.len() as u32,
            pad: 0,
            lease,
            reserved: 0,
        };
        let mut out = Vec::with_capacity(IOCTL_SIZE);
        out.extend_from_slice(reply.as_bytes());
        for e in page {
            out.extend_from_slice(e.as_bytes());
        }
        out.resize(IOCTL_SIZE, 0);
        Ok(out)
    }

    /// Ends every lease taken through `fh` (its release).
    pub fn release(&self, fs: &Fs, fh: u64) {
        let leases = self.by_fh.lock().remove(&fh).unwrap_or_default();
        for lease in leases {
            self.extents.lock().remove(&lease);
            if let Err(e) = fs.end_lease(lease) {
                log::error!("ending lease {lease}: {e}");
            }
        }
    }
}
