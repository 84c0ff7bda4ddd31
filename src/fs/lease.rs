//! Direct-mapping leases.
//!
//! A client that maps a file's device ranges into its own address space holds a lease on
//! the file. While any lease on an inode is held, blocks the inode gives up (truncate,
//! punch hole, unlink, relocation) are not freed: they are appended as extents to the
//! hidden deferred-free inode ([`DEFERRED_FREE_INO`]), so a mapped process can never reach
//! blocks another file now owns. When the inode's last lease ends they are freed. Leases do
//! not survive a remount: mount frees everything the deferred-free inode holds.

use super::extent;
use super::{Fs, now_ns};
use crate::alloc::BlockRange;
use crate::error::{Error, Result};
use crate::format::{
    BLOCK_SIZE, DEFERRED_FREE_INO, ExtentRecord, Inode, blocks_to_bytes, extent_flags,
};
use crate::journal::Tx;
use std::collections::HashMap;

/// One mapped range of a file: `len` bytes at file offset `file_offset` live at byte
/// `device_offset` of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedExtent {
    pub file_offset: u64,
    pub device_offset: u64,
    pub len: u64,
    /// Preallocated, reads as zeros (only in layout listings; mapping converts them).
    pub unwritten: bool,
}

/// Lease bookkeeping, in memory only.
#[derive(Debug, Default)]
pub(super) struct Leases {
    next_id: u64,
    /// Lease id -> inode.
    owners: HashMap<u64, u64>,
    /// Inode -> (live leases, deferred ranges as (key in the deferred inode, range)).
    per_inode: HashMap<u64, (u64, Vec<(u64, BlockRange)>)>,
    /// Next free key (file block) in the deferred-free inode.
    next_key: u64,
}

impl Fs {
    /// Frees data blocks an inode gives up, or defers the free while the inode is leased.
    pub(super) fn free_data(&self, tx: &mut Tx<'_>, ino: u64, range: BlockRange) -> Result<()> {
        let mut leases = self.leases.lock();
        let key = leases.next_key;
        let Some((count, deferred)) = leases.per_inode.get_mut(&ino) else {
            drop(leases);
            self.alloc.free(tx, range)?;
            return Ok(());
        };
        if *count == 0 {
            drop(leases);
            self.alloc.free(tx, range)?;
            return Ok(());
        }
        deferred.push((key, range));
        leases.next_key += range.len;
        drop(leases);
        // Record the blocks as owned by the deferred-free inode, so a crash frees them at
        // the next mount instead of leaking them.
        let _d = self.deferred_lock.lock();
        let mut d = self.inodes.read(DEFERRED_FREE_INO)?;
        let r = self.reader();
        let nodes = self.nodes();
        let rec = ExtentRecord {
            file_block: key,
            dev_block: range.start,
            len: range.len as u32,
            flags: 0,
        };
        extent::put(tx, &r, &nodes, DEFERRED_FREE_INO, &mut d, rec)?;
        d.blocks += range.len;
        d.size = d.size.max(blocks_to_bytes(key + range.len));
        self.inodes.write(tx, DEFERRED_FREE_INO, &mut d)?;
        // If this transaction rolls back, the blocks stay with their file: forget them.
        let leases = std::sync::Arc::clone(&self.leases);
        tx.on_abort(move || {
            if let Some((_, v)) = leases.lock().per_inode.get_mut(&ino) {
                v.retain(|(k, _)| *k != key);
            }
        });
        Ok(())
    }

    /// Maps `offset..offset + len` of a regular file for direct access and takes a lease.
    /// Holes and preallocated parts of the range are allocated and zeroed first, so stores
    /// through the mapping are never lost. The range is clamped to the file size (rounded
    /// up to whole blocks). Returns the lease id and the extents.
    pub fn map_direct(&self, ino: u64, offset: u64, len: u64) -> Result<(u64, Vec<MappedExtent>)> {
        self.check_writable()?;
        let _g = self.lock_all(&[ino]);
        let mut i = self.inodes.read(ino)?;
        if !i.is_reg() {
            return Err(Error::Invalid);
        }
        let end = offset
            .saturating_add(len)
            .min(i.size.next_multiple_of(BLOCK_SIZE));
        let (fb, fe) = (offset / BLOCK_SIZE, end.div_ceil(BLOCK_SIZE));
        if fb < fe {
            let mut tx = self.journal.begin();
            let pieces = self.map_for_write(&mut tx, ino, &mut i, fb, fe)?;
            for p in pieces.iter().filter(|p| p.fresh) {
                self.media
                    .zero_nt(blocks_to_bytes(p.dev_block), blocks_to_bytes(p.len))?;
            }
            tx.note_data_written();
            i.ctime_ns = now_ns();
            self.inodes.write(&mut tx, ino, &mut i)?;
            tx.commit()?;
        }
        let extents = self.layout_of(ino, &i, fb, fe)?;
        let mut leases = self.leases.lock();
        leases.next_id += 1;
        let id = leases.next_id;
        leases.owners.insert(id, ino);
        leases.per_inode.entry(ino).or_default().0 += 1;
        Ok((id, extents))
    }

    /// Ends a lease; when it was the inode's last, frees the blocks deferred meanwhile.
    pub fn end_lease(&self, id: u64) -> Result<()> {
        let deferred = {
            let mut leases = self.leases.lock();
            let Some(ino) = leases.owners.remove(&id) else {
                return Ok(());
            };
            let last = match leases.per_inode.get_mut(&ino) {
                Some((count, _)) => {
                    *count = count.saturating_sub(1);
                    *count == 0
                }
                None => false,
            };
            if !last {
                return Ok(());
            }
            leases
                .per_inode
                .remove(&ino)
                .map(|(_, d)| d)
                .unwrap_or_default()
        };
        if deferred.is_empty() || self.options.read_only {
            return Ok(());
        }
        let _d = self.deferred_lock.lock();
        let mut d = self.inodes.read(DEFERRED_FREE_INO)?;
        let r = self.reader();
        let nodes = self.nodes();
        let mut tx = self.journal.begin();
        for (key, range) in deferred {
            extent::del(&mut tx, &r, &nodes, DEFERRED_FREE_INO, &mut d, key)?;
            self.alloc.free(&mut tx, range)?;
            d.blocks = d.blocks.saturating_sub(range.len);
        }
        self.inodes.write(&mut tx, DEFERRED_FREE_INO, &mut d)?;
        tx.commit()?;
        Ok(())
    }

    /// Live leases (for tests and statistics).
    pub fn lease_count(&self) -> usize {
        self.leases.lock().owners.len()
    }

    /// At mount nothing is leased: free everything the deferred-free inode holds.
    pub(super) fn free_deferred_at_mount(&self) -> Result<()> {
        let _d = self.deferred_lock.lock();
        let mut d = self.inodes.read(DEFERRED_FREE_INO)?;
        if d.blocks == 0 && d.inline_count == 0 && d.tree_root == 0 {
            return Ok(());
        }
        let mut tx = self.journal.begin();
        self.truncate_blocks(&mut tx, DEFERRED_FREE_INO, &mut d, 0)?;
        d.size = 0;
        self.inodes.write(&mut tx, DEFERRED_FREE_INO, &mut d)?;
        tx.commit()?;
        Ok(())
    }

    /// The extents of file blocks `fb..fe`, as byte ranges (holes omitted).
    pub(super) fn layout_of(
        &self,
        ino: u64,
        i: &Inode,
        fb: u64,
        fe: u64,
    ) -> Result<Vec<MappedExtent>> {
        let r = self.reader();
        let mut out = Vec::new();
        let mut all = Vec::new();
        if let Some(e) = extent::covering(&r, ino, i, fb)? {
            all.push(e);
        }
        extent::scan(&r, ino, i, fb + 1, &mut |e| {
            if e.file_block >= fe {
                return false;
            }
            all.push(e);
            true
        })?;
        for e in all {
            let s = fb.max(e.file_block);
            let t = fe.min(e.file_block + u64::from(e.len));
            if s < t {
                out.push(MappedExtent {
                    file_offset: blocks_to_bytes(s),
                    device_offset: blocks_to_bytes(e.dev_block + (s - e.file_block)),
                    len: blocks_to_bytes(t - s),
                    unwritten: e.flags & extent_flags::UNWRITTEN != 0,
                });
            }
        }
        Ok(out)
    }

    /// Every extent of a regular file (for `pmfs layout`).
    pub fn layout(&self, ino: u64) -> Result<Vec<MappedExtent>> {
        let _g = self.read_lock(ino);
        let i = self.inodes.read(ino)?;
        if !i.is_reg() {
            return Err(Error::Invalid);
        }
        self.layout_of(ino, &i, 0, u64::MAX >> 13)
    }
}
