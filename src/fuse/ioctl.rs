//! The pmfs ioctl: extent maps for `pmfs layout` and direct-mapping leases for
//! `pmfs::dax` (protocol in `crate::device::dax`).
//!
//! FUSE carries ioctl arguments of a fixed size (the size encoded in the command), so
//! replies are paged: a request names the first extent it wants. A lease belongs to the
//! file handle that took it and ends when that handle is released.

use crate::device::dax::{
    DIRECT_OP_STATE, DIRECT_OP_TOUCH, DirectReply, DirectRequest, ENTRIES_PER_PAGE,
    ENTRY_UNWRITTEN, IOCTL_SIZE, MAP_FLAG_LEASE, MAP_FLAG_PUBLISH, MAP_MAGIC, MapEntry, MapReply,
    MapRequest,
};
use crate::error::Error;
use crate::fs::{Fs, MappedExtent};
use parking_lot::Mutex;
use std::collections::HashMap;
use zerocopy::{FromBytes, IntoBytes};

/// Leases per file handle, and the extent lists of live leases (for paging) with the
/// layout generation they belong to (published leases; 0 otherwise).
#[derive(Debug, Default)]
pub struct LeaseTable {
    by_fh: Mutex<HashMap<u64, Vec<u64>>>,
    extents: Mutex<HashMap<u64, (u64, Vec<MapEntry>)>>,
}

/// What a [`LeaseTable::direct`] request did.
#[derive(Debug, PartialEq, Eq)]
pub enum DirectOutcome {
    /// Reply with these bytes.
    Reply(Vec<u8>),
    /// The file's data changed behind the kernel's back: drop its cached pages, then reply.
    Touched(Vec<u8>),
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
    pub fn direct(&self, fs: &Fs, ino: u64, fh: u64, input: &[u8]) -> Result<DirectOutcome, Error> {
        let (req, _) = DirectRequest::read_from_prefix(input).map_err(|_| Error::Invalid)?;
        if req.magic != MAP_MAGIC || !self.owns(fh, req.lease) {
            return Err(Error::Invalid);
        }
        let header = |slot: u32, path: &[u8]| {
            let reply = DirectReply {
                magic: MAP_MAGIC,
                slot,
                path_len: path.len() as u32,
                pad: 0,
            };
            let mut out = Vec::with_capacity(IOCTL_SIZE);
            out.extend_from_slice(reply.as_bytes());
            out.extend_from_slice(path);
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
                Ok(DirectOutcome::Reply(header(slot, path)))
            }
            DIRECT_OP_TOUCH => {
                fs.touch_data(ino)?;
                Ok(DirectOutcome::Touched(header(0, &[])))
            }
            _ => Err(Error::Invalid),
        }
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
