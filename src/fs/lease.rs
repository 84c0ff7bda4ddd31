//! Direct-mapping leases.
//!
//! A client that maps a file's device ranges into its own address space holds a lease on
//! the file. While any lease on an inode is held, blocks the inode gives up (truncate,
//! punch hole, unlink, relocation) are not freed: they are appended as extents to the
//! hidden deferred-free inode ([`DEFERRED_FREE_INO`]), so a mapped process can never reach
//! blocks another file now owns. When the inode's last lease ends they are freed. Leases do
//! not survive a remount: mount frees everything the deferred-free inode holds.
//!
//! Locking: a lease is taken and ended under the inode's stripe, so while an operation holds
//! an inode's stripe the inode's leased state cannot change, and the operation can declare
//! the deferred-free lock up front ([`Fs::free_locks`]). A deferred range is published to
//! the lease table only when the transaction that deferred it commits, so a rollback never
//! leaves a range that a lease end would free while the file still points at it.

use super::SHRINK_BATCH;
use super::data::STEP_RESERVE;
use super::extent;
use super::txn::{LockSet, MetaTx};
use super::{Fs, now_ns};
use crate::alloc::BlockRange;
use crate::error::{Error, Result};
use crate::format::{
    BLOCK_SIZE, CHUNK_BLOCKS, DEFERRED_FREE_INO, ExtentRecord, Inode, MAX_FILE_BLOCKS,
    blocks_to_bytes, extent_flags,
};
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
    /// Published leases ([`Fs::map_published`]): their end returns a state slot.
    published: std::collections::HashSet<u64>,
    /// Inode -> (live leases, deferred ranges as (key in the deferred inode, range)).
    per_inode: HashMap<u64, (u64, Vec<(u64, BlockRange)>)>,
}

impl Fs {
    /// True while a lease on `ino` lives. Stable while the caller holds `ino`'s stripe.
    pub(super) fn is_leased(&self, ino: u64) -> bool {
        self.leases
            .lock()
            .per_inode
            .get(&ino)
            .is_some_and(|(count, _)| *count > 0)
    }

    /// The locks a transaction needs that may free `ino`'s data blocks: the deferred-free
    /// lock when `ino` is leased (its frees are deferred) or is the deferred-free inode.
    pub(super) fn free_locks(&self, ino: u64) -> LockSet {
        LockSet {
            deferred: ino == DEFERRED_FREE_INO || self.is_leased(ino),
            ..LockSet::NONE
        }
    }

    /// Frees data blocks an inode gives up, or defers the free while the inode is leased.
    /// The caller holds `ino`'s stripe.
    pub(super) fn free_data(&self, tx: &mut MetaTx<'_>, ino: u64, range: BlockRange) -> Result<()> {
        if !self.is_leased(ino) {
            self.alloc.free(tx, range)?;
            return Ok(());
        }
        tx.require_deferred()?;
        // Record the blocks as owned by the deferred-free inode, so a crash frees them at
        // the next mount instead of leaking them. Keys are handed out from the inode's size,
        // under the deferred-free lock this transaction owns until it ends.
        let mut d = self.inodes.read(DEFERRED_FREE_INO)?;
        let key = d.size / BLOCK_SIZE;
        let r = self.reader();
        let nodes = self.nodes();
        let rec = ExtentRecord {
            file_block: key,
            dev_block: range.start,
            len: u32::try_from(range.len).map_err(|_| Error::Invalid)?,
            flags: 0,
        };
        extent::put(tx, &r, &nodes, DEFERRED_FREE_INO, &mut d, rec)?;
        d.blocks += range.len;
        d.size = blocks_to_bytes(key + range.len);
        self.inodes.write(tx, DEFERRED_FREE_INO, &mut d)?;
        // The lease table learns of the range only once the deferral is durable. The hook
        // runs before the transaction drops its locks, so the inode (whose stripe the
        // caller holds) is still leased.
        let leases = std::sync::Arc::clone(&self.leases);
        tx.on_commit(move || match leases.lock().per_inode.get_mut(&ino) {
            Some((_, v)) => v.push((key, range)),
            None => log::error!(
                "inode {ino}: lease gone before its deferred free committed; the blocks are \
                 freed at the next mount"
            ),
        });
        Ok(())
    }

    /// Maps `offset..offset + len` of a regular file for direct access and takes a lease.
    /// Holes and preallocated parts of the range are allocated and zeroed first, so stores
    /// through the mapping are never lost. The range is clamped to the file size (rounded
    /// up to whole blocks). Returns the lease id and the extents.
    pub fn map_direct(&self, ino: u64, offset: u64, len: u64) -> Result<(u64, Vec<MappedExtent>)> {
        self.check_writable()?;
        self.check_single_device()?;
        let g = self.lock_all(&[ino]);
        let mut i = self.inodes.read(ino)?;
        if !i.is_reg() {
            return Err(Error::Invalid);
        }
        let end = offset
            .saturating_add(len)
            .min(i.size.next_multiple_of(BLOCK_SIZE));
        let (fb, fe) = (offset / BLOCK_SIZE, end.div_ceil(BLOCK_SIZE));
        if fb < fe {
            // A long sparse or preallocated range is mapped one 2 MiB window at a time,
            // committing whenever the transaction runs low on journal space: every step
            // leaves the file consistent (zeroed blocks behind new extents).
            let mut tx = self.begin(&g, LockSet::NONE)?;
            let mut b = fb;
            // Mapping a range that is written already changes nothing (ctime included).
            let mut changed = false;
            while b < fe {
                if tx.remaining() < STEP_RESERVE {
                    self.inodes.write(&mut tx, ino, &mut i)?;
                    tx.commit()?;
                    tx = self.begin(&g, LockSet::NONE)?;
                }
                let w = fe.min((b / CHUNK_BLOCKS + 1) * CHUNK_BLOCKS);
                let pieces = self.map_for_write(&mut tx, ino, &mut i, b, w)?;
                for p in pieces.iter().filter(|p| p.fresh) {
                    changed = true;
                    self.media
                        .zero_nt(blocks_to_bytes(p.dev_block), blocks_to_bytes(p.len))?;
                }
                tx.note_data_written();
                b = w;
            }
            if changed {
                i.ctime_ns = now_ns();
            }
            if end > i.size {
                // The mapping shows the last block past the end of file: it must read as
                // zeros there (kept by every change since, the tail rule; images written
                // before it may hold old bytes).
                self.zero_eof_tail(ino, &i)?;
            }
            self.inodes.write(&mut tx, ino, &mut i)?;
            tx.commit()?;
        }
        let extents = self.layout_of(ino, &i, fb, fe)?;
        let id = self.new_lease(ino, false);
        drop(g);
        Ok((id, extents))
    }

    /// Records a new lease on `ino`; the caller holds `ino`'s stripe (read or write).
    pub(super) fn new_lease(&self, ino: u64, published: bool) -> u64 {
        let mut leases = self.leases.lock();
        leases.next_id += 1;
        let id = leases.next_id;
        leases.owners.insert(id, ino);
        if published {
            leases.published.insert(id);
        }
        leases.per_inode.entry(ino).or_default().0 += 1;
        id
    }

    /// True when `id` is a live published lease on `ino`.
    pub fn lease_is_published(&self, id: u64, ino: u64) -> bool {
        let leases = self.leases.lock();
        leases.published.contains(&id) && leases.owners.get(&id) == Some(&ino)
    }

    /// Ends a lease; when it was the inode's last, frees the blocks deferred meanwhile, in
    /// steps of at most [`SHRINK_BATCH`] ranges per transaction. A step that fails leaves
    /// its ranges (and the later ones) in the deferred-free inode, which the next mount
    /// frees.
    pub fn end_lease(&self, id: u64) -> Result<()> {
        let Some(ino) = self.leases.lock().owners.get(&id).copied() else {
            return Ok(());
        };
        // The inode's lock: no operation that might defer a free of its blocks runs while
        // the lease ends.
        let g = self.lock_all(&[ino]);
        let deferred = {
            let mut leases = self.leases.lock();
            if leases.owners.remove(&id).is_none() {
                return Ok(()); // ended meanwhile by another thread
            }
            if leases.published.remove(&id) {
                self.unpublish(ino);
            }
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
        if deferred.is_empty() || self.is_read_only() {
            return Ok(());
        }
        let r = self.reader();
        let nodes = self.nodes();
        for step in deferred.chunks(SHRINK_BATCH) {
            let mut tx = self.begin(&g, LockSet::DEFERRED.freeing())?;
            let mut d = self.inodes.read(DEFERRED_FREE_INO)?;
            for &(key, range) in step {
                extent::del(&mut tx, &r, &nodes, DEFERRED_FREE_INO, &mut d, key)?;
                self.alloc.free(&mut tx, range)?;
                d.blocks = d.blocks.saturating_sub(range.len);
            }
            if d.blocks == 0 && d.tree_root == 0 && d.inline_count == 0 {
                d.size = 0; // nothing deferred is left: keys start again from 0
            }
            self.inodes.write(&mut tx, DEFERRED_FREE_INO, &mut d)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Live leases (for tests and statistics).
    pub fn lease_count(&self) -> usize {
        self.leases.lock().owners.len()
    }

    /// At mount nothing is leased: free everything the deferred-free inode holds.
    pub(super) fn free_deferred_at_mount(&self) -> Result<()> {
        let g = self.lock_all(&[DEFERRED_FREE_INO]);
        self.punch_in_steps(&g, DEFERRED_FREE_INO, 0, u64::MAX, true)?;
        let mut tx = self.begin(&g, LockSet::DEFERRED.freeing())?;
        let mut d = self.inodes.read(DEFERRED_FREE_INO)?;
        if d.blocks == 0 && d.inline_count == 0 && d.tree_root == 0 {
            return Ok(());
        }
        self.truncate_blocks(&mut tx, DEFERRED_FREE_INO, &mut d, 0)?;
        d.size = 0;
        self.inodes.write(&mut tx, DEFERRED_FREE_INO, &mut d)?;
        tx.commit()?;
        Ok(())
    }

    /// The extents of file blocks `fb..fe`, as byte ranges (holes omitted, contiguous
    /// records merged).
    pub(super) fn layout_of(
        &self,
        ino: u64,
        i: &Inode,
        fb: u64,
        fe: u64,
    ) -> Result<Vec<MappedExtent>> {
        let r = self.reader();
        let mut out: Vec<MappedExtent> = Vec::new();
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
            if s >= t {
                continue;
            }
            let next = MappedExtent {
                file_offset: blocks_to_bytes(s),
                device_offset: blocks_to_bytes(e.dev_block + (s - e.file_block)),
                len: blocks_to_bytes(t - s),
                unwritten: e.flags & extent_flags::UNWRITTEN != 0,
            };
            // Records that continue each other in the file and on the device are one run
            // (mapping a preallocated region converts it 2 MiB at a time, in 512 records
            // per GiB): one entry, so a 1 GiB run maps, and shows, as the region it is.
            match out.last_mut() {
                Some(last)
                    if last.file_offset + last.len == next.file_offset
                        && last.device_offset + last.len == next.device_offset
                        && last.unwritten == next.unwritten =>
                {
                    last.len += next.len;
                }
                _ => out.push(next),
            }
        }
        Ok(out)
    }

    /// Direct mapping needs one device file: a client maps the device at an extent's device
    /// offset, and on a file system over several devices that offset is a logical one (the
    /// member and the offset in it would have to be handed out instead; not done yet).
    /// EOPNOTSUPP, said once in the log.
    pub(super) fn check_single_device(&self) -> Result<()> {
        if self.devices.is_none() {
            return Ok(());
        }
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            log::warn!(
                "direct mapping (pmfs::dax, the preload library) is refused: this file \
                 system spans several devices; reads and writes go through FUSE"
            );
        });
        Err(Error::NotSupported)
    }

    /// Every extent of a regular file (for `pmfs layout`).
    pub fn layout(&self, ino: u64) -> Result<Vec<MappedExtent>> {
        self.check_alive()?;
        let _g = self.read_lock(ino);
        let i = self.inodes.read(ino)?;
        if !i.is_reg() {
            return Err(Error::Invalid);
        }
        self.layout_of(ino, &i, 0, MAX_FILE_BLOCKS)
    }
}
