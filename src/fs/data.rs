//! File data: reads served from the mapping, writes with the 2 MiB-aware allocation
//! policy, truncate, fallocate, SEEK_DATA/SEEK_HOLE, copy_file_range.
//!
//! Ordered-data rule: data goes into newly allocated blocks (non-temporal stores) before the
//! extent that exposes them is stored, and commit's fence makes both durable in that order.
//! Blocks past the end of file may hold stale bytes; whatever makes them visible (a write
//! past EOF, truncate up, fallocate that grows the size) zeroes them first ("zero on
//! expose"), so a file never shows another file's old data.

use super::SHRINK_BATCH;
use super::extent;
use super::flags;
use super::txn::{LockSet, MetaTx, StripeGuards};
use super::{AtimeMode, Ctx, Fs, now_ns};
use crate::alloc::{AllocError, AllocRequest, BlockRange, REGION_BLOCKS};
use crate::error::{Error, Result};
use crate::format::{
    BLOCK_SIZE, CHUNK_BLOCKS, CHUNK_SIZE, ExtentRecord, IncompatFeatures, Inode, MAX_FILE_BLOCKS,
    MAX_FILE_SIZE, V1_MAX_FILE_SIZE, blocks_to_bytes, extent_flags, inode_flags,
};
use crate::journal::Tx;

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;
const SEEK_DATA: i32 = 3;
const SEEK_HOLE: i32 = 4;
/// Journal space a loop keeps for one more step and its caller's final stores: below it,
/// the loop commits and begins a new transaction.
pub(super) const STEP_RESERVE: u64 = 96 * 1024;
/// A file that grows sequentially past this size moves its data so far to the start of a
/// whole free 1 GiB region and fills that region in place ([`Fs::start_region_stream`]):
/// large enough that few files pay the copy or claim a region, small enough that the copy
/// stays short (45-115 ms for the crossing write through FUSE on a 2-core VM, most of it
/// the first touch of the region's memory).
const STREAM_START: u64 = 32 << 20;
/// Writes of at least this many bytes use non-temporal stores.
const NT_THRESHOLD: usize = 256;

/// The most one [`Fs::allocate_for_client`] allocates (the protocol's limit, which direct
/// clients plan with): one transaction's worth of extents even in fragmented space, and
/// zeroing of at most this much preallocated space.
pub const CLIENT_ALLOCATE_MAX: u64 = crate::dax::DIRECT_ALLOCATE_MAX;

/// The moves a write (or a direct client's allocation) makes before mapping its blocks, so
/// that a growing file stays huge-mappable.
#[derive(Clone, Copy, Debug)]
struct GrowthMoves {
    /// The file grows past its first 2 MiB: move that into one aligned chunk.
    first_chunk: bool,
    /// Sequential growth (the range starts at or before the end of file) past
    /// [`STREAM_START`]: the file is likely to keep growing; give it a 1 GiB region.
    region_stream: bool,
}

impl GrowthMoves {
    fn plan(old_size: u64, offset: u64, end_off: u64) -> Self {
        Self {
            first_chunk: old_size <= CHUNK_SIZE && end_off > CHUNK_SIZE,
            region_stream: offset <= old_size && old_size <= STREAM_START && end_off > STREAM_START,
        }
    }

    /// Moving the first chunk or the stream's prefix frees the blocks it was written in,
    /// and a leased file's frees need the file-system-wide deferred-free lock: only those
    /// writes declare it (every other write to a leased file would queue on it behind the
    /// writes to every other leased file).
    fn locks(self, fs: &Fs, ino: u64) -> LockSet {
        if self.first_chunk || self.region_stream {
            fs.free_locks(ino)
        } else {
            LockSet::NONE
        }
    }
}

/// A run of file blocks backed by device blocks.
#[derive(Clone, Copy, Debug)]
pub(super) struct Piece {
    pub(super) fblock: u64,
    pub(super) dev_block: u64,
    pub(super) len: u64,
    /// Newly allocated (or converted from unwritten) by this write: bytes the write does not
    /// cover must be zeroed if they end up inside the file.
    pub(super) fresh: bool,
}

/// A change of a file's data by an unprivileged caller clears set-user-ID, and
/// set-group-ID when the group may execute or the caller is not in the file's group (the
/// kernel's setattr_should_drop_suidgid; FUSE passes only the primary group, so that is the
/// group checked).
pub(super) fn kill_privs(ctx: &Ctx, i: &mut Inode) {
    if ctx.uid != 0 && i.mode & 0o6000 != 0 {
        i.mode &= !0o4000;
        if i.mode & 0o010 != 0 || ctx.gid != i.gid {
            i.mode &= !0o2000;
        }
    }
}

fn end(e: &ExtentRecord) -> u64 {
    e.file_block + u64::from(e.len)
}

impl Fs {
    /// READ: calls `reply` once with the bytes, copied out of the mapping.
    pub fn read(
        &self,
        ino: u64,
        offset: u64,
        size: u32,
        reply: &mut dyn FnMut(&[u8]),
    ) -> Result<()> {
        self.check_alive()?;
        let atime_due = {
            let _g = self.read_lock(ino);
            let i = self.inodes.read(ino)?;
            if i.is_dir() {
                return Err(Error::IsDir);
            }
            let end_off = offset.saturating_add(u64::from(size)).min(i.size);
            if offset >= end_off {
                reply(&[]);
            } else {
                self.read_range(ino, &i, offset, end_off - offset, reply)?;
            }
            self.atime_due(&i)
        };
        if atime_due {
            self.update_atime(ino)?;
        }
        Ok(())
    }

    /// Stamps `ino`'s access time now if the mount's rule says a read makes it due.
    fn update_atime(&self, ino: u64) -> Result<()> {
        if self.is_read_only() {
            return Ok(());
        }
        let g = self.lock_all_unpublished(&[ino]);
        let mut i = self.inodes.read(ino)?;
        if self.atime_due(&i) {
            i.atime_ns = now_ns();
            let mut tx = self.begin(&g, LockSet::NONE)?;
            self.inodes.write(&mut tx, ino, &mut i)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// PMFS_IOC_DIRECT `ACCESSED` of a direct client: it read `ino` through its mapping;
    /// the access time is updated as [`Fs::read`] would. Returns true when every read
    /// updates it (strictatime), so the client asks again for its later reads.
    pub fn accessed_by_client(&self, ino: u64) -> Result<bool> {
        self.check_alive()?;
        let due = {
            let _g = self.read_lock(ino);
            let i = self.inodes.read(ino)?;
            if !i.is_reg() {
                return Err(Error::Invalid);
            }
            self.atime_due(&i)
        };
        if due {
            self.update_atime(ino)?;
        }
        Ok(self.options.atime == AtimeMode::Strictatime)
    }

    fn atime_due(&self, i: &Inode) -> bool {
        if flags::keeps_atime(i) {
            return false;
        }
        match self.options.atime {
            AtimeMode::Noatime => false,
            AtimeMode::Strictatime => true,
            AtimeMode::Relatime => {
                i.atime_ns <= i.mtime_ns
                    || i.atime_ns <= i.ctime_ns
                    || now_ns().saturating_sub(i.atime_ns) > 24 * 3600 * 1_000_000_000
            }
        }
    }

    fn read_range(
        &self,
        ino: u64,
        i: &Inode,
        offset: u64,
        len: u64,
        reply: &mut dyn FnMut(&[u8]),
    ) -> Result<()> {
        let r = self.reader();
        // Always a copy, even when one extent covers the range: the mapping is never lent
        // out as a `&[u8]` (see src/device/mod.rs), and fuser replies only from one.
        let mut buf = vec![0u8; len as usize];
        let mut pos = offset;
        while pos < offset + len {
            let b = pos / BLOCK_SIZE;
            let seg_end;
            match extent::covering(&r, ino, i, b)? {
                Some(e) => {
                    seg_end = blocks_to_bytes(end(&e)).min(offset + len);
                    if e.flags & extent_flags::UNWRITTEN == 0 {
                        let dev =
                            blocks_to_bytes(e.dev_block) + (pos - blocks_to_bytes(e.file_block));
                        let at = (pos - offset) as usize;
                        self.media
                            .read(dev, &mut buf[at..at + (seg_end - pos) as usize])?;
                    }
                }
                None => {
                    let next = extent::next_from(&r, ino, i, b)?
                        .map_or(u64::MAX, |e| blocks_to_bytes(e.file_block));
                    seg_end = next.min(offset + len);
                }
            }
            pos = seg_end;
        }
        reply(&buf);
        Ok(())
    }

    /// WRITE.
    pub fn write(&self, ctx: &Ctx, ino: u64, offset: u64, data: &[u8]) -> Result<u32> {
        self.check_writable()?;
        let len = data.len() as u64;
        let end_off = offset.checked_add(len).ok_or(Error::FileTooBig)?;
        if end_off > MAX_FILE_SIZE {
            return Err(Error::FileTooBig);
        }
        let g = self.lock_all(&[ino]);
        let mut i = self.inodes.read(ino)?;
        if !i.is_reg() {
            return Err(if i.is_dir() {
                Error::IsDir
            } else {
                Error::Invalid
            });
        }
        flags::may_write(&i, offset)?;
        if len == 0 {
            return Ok(0);
        }
        if end_off > V1_MAX_FILE_SIZE {
            self.require_features(IncompatFeatures::LARGE_FILES)?;
        }
        let old_size = i.size;
        let new_size = old_size.max(end_off);
        if offset > old_size {
            self.zero_allocated(ino, &i, old_size, offset)?;
        }
        let (mut tx, pieces) = self.begin_growing(&g, ino, &mut i, offset, end_off)?;
        // The end-of-file tail rule ([`Fs::zero_eof_tail`]): a write that moves the end of
        // file zeroes the rest of the block it ends in, fresh or not (a block past the old
        // end, kept from an earlier allocation, holds whatever was there).
        let tail = if new_size > old_size {
            new_size..new_size.next_multiple_of(BLOCK_SIZE)
        } else {
            0..0
        };
        for p in &pieces {
            let p_start = blocks_to_bytes(p.fblock);
            let p_end = blocks_to_bytes(p.fblock + p.len);
            let dev = blocks_to_bytes(p.dev_block);
            let (t_start, t_end) = (tail.start.max(p_start), tail.end.min(p_end));
            if t_start < t_end {
                self.media
                    .zero_nt(dev + (t_start - p_start), t_end - t_start)?;
            }
            let w_start = offset.max(p_start);
            let w_end = end_off.min(p_end);
            if w_start < w_end {
                let src = &data[(w_start - offset) as usize..(w_end - offset) as usize];
                self.store_data(dev + (w_start - p_start), src)?;
            }
            if p.fresh {
                // Zero what the write does not cover, up to the new end of file.
                let limit = new_size.min(p_end);
                if p_start < w_start.min(limit) {
                    self.media.zero_nt(dev, w_start.min(limit) - p_start)?;
                }
                if w_end.max(p_start) < limit {
                    let from = w_end.max(p_start);
                    self.media.zero_nt(dev + (from - p_start), limit - from)?;
                }
            }
        }
        tx.note_data_written();
        let now = now_ns();
        i.size = new_size;
        i.mtime_ns = now;
        i.ctime_ns = now;
        kill_privs(ctx, &mut i);
        self.inodes.write(&mut tx, ino, &mut i)?;
        tx.commit()?;
        Ok(data.len() as u32)
    }

    /// The transaction of a write (or a direct client's allocation) of `offset..end_off`
    /// to `ino` (locked by `g`): begins it with the locks its growth moves need, makes them,
    /// and maps the range's blocks (the pieces that back them).
    fn begin_growing<'a>(
        &'a self,
        g: &'a StripeGuards<'a>,
        ino: u64,
        i: &mut Inode,
        offset: u64,
        end_off: u64,
    ) -> Result<(MetaTx<'a>, Vec<Piece>)> {
        let old_size = i.size;
        let moves = GrowthMoves::plan(old_size, offset, end_off);
        let mut tx = self.begin(g, moves.locks(self, ino))?;
        if moves.first_chunk {
            self.relocate_first_chunk(&mut tx, ino, i, old_size)?;
        }
        if moves.region_stream {
            self.start_region_stream(&mut tx, ino, i, old_size)?;
        }
        let pieces = self.map_for_write(
            &mut tx,
            ino,
            i,
            offset / BLOCK_SIZE,
            end_off.div_ceil(BLOCK_SIZE),
        )?;
        Ok((tx, pieces))
    }

    /// PMFS_IOC_DIRECT `ALLOCATE` of a direct client (the preload library): makes file bytes
    /// `offset..offset + len` (at most [`CLIENT_ALLOCATE_MAX`] of them) written blocks, as a
    /// write of them would (the same placement and growth moves), without storing data or
    /// changing the size: holes are allocated and unwritten extents converted, the parts
    /// of both inside the file zeroed (they read as zeros before and after), the parts past
    /// the end of file left as they are (a later [`Fs::extend_for_client`] or write zeroes
    /// what it exposes). The client then stores into the blocks through its mapping.
    /// Returns the end of the range allocated.
    pub fn allocate_for_client(&self, ino: u64, offset: u64, len: u64) -> Result<u64> {
        self.check_writable()?;
        let len = len.min(CLIENT_ALLOCATE_MAX);
        let end_off = offset.checked_add(len).ok_or(Error::FileTooBig)?;
        if len == 0 {
            return Err(Error::Invalid);
        }
        if end_off > MAX_FILE_SIZE {
            return Err(Error::FileTooBig);
        }
        let g = self.lock_all(&[ino]);
        let mut i = self.inodes.read(ino)?;
        if !i.is_reg() {
            return Err(Error::Invalid);
        }
        flags::may_write(&i, offset)?;
        if end_off > V1_MAX_FILE_SIZE {
            self.require_features(IncompatFeatures::LARGE_FILES)?;
        }
        let size = i.size;
        let (mut tx, pieces) = self.begin_growing(&g, ino, &mut i, offset, end_off)?;
        for p in pieces.iter().filter(|p| p.fresh) {
            let p_start = blocks_to_bytes(p.fblock);
            // Up to the end of the block holding the end of file: the tail rule.
            let inside = blocks_to_bytes(p.fblock + p.len).min(size.next_multiple_of(BLOCK_SIZE));
            if p_start < inside {
                self.media
                    .zero_nt(blocks_to_bytes(p.dev_block), inside - p_start)?;
            }
        }
        tx.note_data_written();
        self.inodes.write(&mut tx, ino, &mut i)?;
        tx.commit()?;
        Ok(end_off)
    }

    /// PMFS_IOC_DIRECT `EXTEND` of a direct client: it stored file bytes `from..to` into
    /// written blocks through its mapping (and persisted them) while the file's layout was
    /// at `generation`; this makes them part of the file: zeroes what the end of file moving
    /// exposes before `from`, sets the size to at least `to` and stamps mtime and ctime, as
    /// the write of those bytes would, in one transaction. Refused with [`Error::Changed`]
    /// when the file changed since `generation` (the client then writes the same bytes
    /// through the file system), and with [`Error::Invalid`] when `from..to` is not all in
    /// written blocks.
    pub fn extend_for_client(
        &self,
        ctx: &Ctx,
        ino: u64,
        from: u64,
        to: u64,
        generation: u64,
    ) -> Result<()> {
        self.check_writable()?;
        if from >= to {
            return Err(Error::Invalid);
        }
        if to > MAX_FILE_SIZE {
            return Err(Error::FileTooBig);
        }
        let g = self.lock_all(&[ino]);
        if self.published_generation(ino) != Some(generation) {
            return Err(Error::Changed);
        }
        let mut i = self.inodes.read(ino)?;
        if !i.is_reg() {
            return Err(Error::Invalid);
        }
        flags::may_write(&i, from)?;
        let written: u64 = self
            .written_ranges(ino, &i, from, to)?
            .iter()
            .map(|&(_, n)| n)
            .sum();
        if written != to - from {
            return Err(Error::Invalid);
        }
        let mut tx = self.begin(&g, LockSet::NONE)?;
        if from > i.size {
            self.zero_allocated(ino, &i, i.size, from)?;
            tx.note_data_written();
        }
        let now = now_ns();
        if to > i.size {
            i.size = to;
            // The client's stores end at `to`; the rest of that block is whatever the
            // allocation found there.
            self.zero_eof_tail(ino, &i)?;
            tx.note_data_written();
        }
        i.mtime_ns = now;
        i.ctime_ns = now;
        kill_privs(ctx, &mut i);
        self.inodes.write(&mut tx, ino, &mut i)?;
        tx.commit()?;
        Ok(())
    }

    /// The last handle of a direct client that allocated up to `reserved_end` past the end
    /// of file ([`Fs::allocate_for_client`]) is gone: gives back the blocks past the end of
    /// file up to the 2 MiB chunk boundary after it, except the rest of the last chunk of a
    /// file of 2 MiB or more (which a write would have taken whole too). Times do not change: nothing the file
    /// shows did.
    pub fn trim_client_allocation(&self, ino: u64, reserved_end: u64) -> Result<()> {
        if self.is_read_only() {
            return Ok(());
        }
        let g = self.lock_all(&[ino]);
        let i = self.inodes.read(ino)?;
        if !i.is_reg() || i.nlink == 0 {
            return Ok(()); // an unlinked file gives everything back when it is deleted
        }
        let keep = if i.size >= CHUNK_SIZE {
            i.size.next_multiple_of(CHUNK_SIZE)
        } else {
            i.size.next_multiple_of(BLOCK_SIZE)
        } / BLOCK_SIZE;
        // Allocations past 2 MiB take whole chunks: the chunk holding the end goes too.
        let fe = (reserved_end.div_ceil(CHUNK_SIZE) * CHUNK_BLOCKS).min(MAX_FILE_BLOCKS);
        if keep >= fe {
            return Ok(());
        }
        self.punch_in_steps(&g, ino, keep, fe, false)?;
        let mut i = self.inodes.read(ino)?;
        let mut tx = self.begin(&g, self.free_locks(ino).freeing())?;
        self.punch_blocks(&mut tx, ino, &mut i, keep, fe)?;
        self.inodes.write(&mut tx, ino, &mut i)?;
        tx.commit()?;
        Ok(())
    }

    fn store_data(&self, dev: u64, src: &[u8]) -> Result<()> {
        if src.len() >= NT_THRESHOLD {
            self.media.write_nt(dev, src)?;
        } else {
            self.media.write(dev, src)?;
            self.media.flush(dev, src.len() as u64)?;
        }
        Ok(())
    }

    /// The end-of-file tail rule: the bytes of the block holding the end of file that lie
    /// past it are zero. A direct mapping's partial last page shows them (the preload
    /// library's mmap, `pmfs::dax`), and POSIX has a mapping read zeros past the end of
    /// file, as the page cache makes it. Every change that moves the end of file keeps the
    /// rule: writes and extensions zero the rest of the block they end in, truncates the
    /// rest of the block they cut, and a mapping zeroes it first (images from before the
    /// rule). Bytes in blocks wholly past the end of file are unconstrained: nothing maps
    /// or reads them, and whatever exposes them zeroes them first ([`Fs::zero_allocated`]).
    pub(super) fn zero_eof_tail(&self, ino: u64, i: &Inode) -> Result<()> {
        if i.size % BLOCK_SIZE != 0 {
            self.zero_allocated(ino, i, i.size, i.size.next_multiple_of(BLOCK_SIZE))?;
        }
        Ok(())
    }

    /// Zeroes bytes `from..to` of the file that sit in written extents (they may hold stale
    /// bytes past the old end of file).
    fn zero_allocated(&self, ino: u64, i: &Inode, from: u64, to: u64) -> Result<()> {
        for (dev, len) in self.written_ranges(ino, i, from, to)? {
            self.media.zero_nt(dev, len)?;
        }
        Ok(())
    }

    /// Where bytes `from..to` of the file that sit in written extents live on the device:
    /// (device offset, length) pieces.
    fn written_ranges(&self, ino: u64, i: &Inode, from: u64, to: u64) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        let r = self.reader();
        let fb = from / BLOCK_SIZE;
        let mut exts = Vec::new();
        if let Some(e) = extent::covering(&r, ino, i, fb)? {
            exts.push(e);
        }
        extent::scan(&r, ino, i, fb + 1, &mut |e| {
            if blocks_to_bytes(e.file_block) >= to {
                return false;
            }
            exts.push(e);
            true
        })?;
        for e in exts {
            if e.flags & extent_flags::UNWRITTEN != 0 {
                continue;
            }
            let s = from.max(blocks_to_bytes(e.file_block));
            let t = to.min(blocks_to_bytes(end(&e)));
            if s < t {
                out.push((
                    blocks_to_bytes(e.dev_block) + (s - blocks_to_bytes(e.file_block)),
                    t - s,
                ));
            }
        }
        Ok(out)
    }

    /// A file growing past 2 MiB moves its first 2 MiB (written in small blocks while it was
    /// small) into one aligned chunk, so the whole file can be mapped with huge pages. One
    /// 2 MiB copy per file, in the transaction of the write that crosses the boundary.
    /// Skipped (not an error) when no aligned chunk is free or chunk 0 holds preallocated
    /// space.
    fn relocate_first_chunk(
        &self,
        tx: &mut MetaTx<'_>,
        ino: u64,
        i: &mut Inode,
        old_size: u64,
    ) -> Result<()> {
        let req = AllocRequest {
            blocks: CHUNK_BLOCKS,
            min_blocks: CHUNK_BLOCKS,
            aligned: true,
            goal: None,
        };
        self.relocate_prefix(
            tx,
            ino,
            i,
            old_size,
            CHUNK_BLOCKS,
            CHUNK_BLOCKS,
            |fs, tx| match fs.alloc.allocate(tx, req) {
                Ok(c) if c.start % CHUNK_BLOCKS == 0 && c.len == CHUNK_BLOCKS => Ok(Some(c)),
                Ok(c) => {
                    fs.alloc.free(tx, c)?;
                    Ok(None)
                }
                Err(AllocError::NoSpace) => Ok(None),
                Err(e) => Err(e.into()),
            },
        )
    }

    /// A file growing sequentially past [`STREAM_START`] moves its first `STREAM_START`
    /// bytes (whole 2 MiB chunks placed wherever the pool had them) to the start of a whole
    /// free 1 GiB region, which it then fills in place as it grows (the allocator keeps the
    /// chunks after it free while other space exists): at 1 GiB its first GiB is one
    /// 1 GiB-aligned extent, PUD-mappable, and later GiBs take whole regions. One copy of
    /// `STREAM_START` bytes per file, in the transaction of the write that crosses it.
    /// Skipped (not an error) when no region is whole or the prefix holds preallocated space.
    fn start_region_stream(
        &self,
        tx: &mut MetaTx<'_>,
        ino: u64,
        i: &mut Inode,
        old_size: u64,
    ) -> Result<()> {
        if self.alloc.free_regions() == 0 {
            return Ok(());
        }
        let blocks = STREAM_START / BLOCK_SIZE;
        self.relocate_prefix(
            tx,
            ino,
            i,
            old_size,
            blocks,
            REGION_BLOCKS,
            |fs, tx| match fs.alloc.allocate_stream_start(tx, blocks) {
                Ok(r) => Ok(Some(r)),
                Err(AllocError::NoSpace) => Ok(None),
                Err(e) => Err(e.into()),
            },
        )
    }

    /// Moves file blocks `0..blocks` (a multiple of [`CHUNK_BLOCKS`]) into the one run
    /// `target` allocates, as one extent; bytes past `old_size` and holes read as zeros.
    /// Nothing happens when the prefix is empty, already one extent at a multiple of
    /// `align` blocks (where `target` would put it), holds an unwritten extent or one that
    /// reaches past it, or `target` finds no room (`Ok(None)`).
    #[expect(
        clippy::too_many_arguments,
        reason = "the prefix, its alignment and its target"
    )]
    fn relocate_prefix(
        &self,
        tx: &mut MetaTx<'_>,
        ino: u64,
        i: &mut Inode,
        old_size: u64,
        blocks: u64,
        align: u64,
        target: impl FnOnce(&Self, &mut MetaTx<'_>) -> Result<Option<BlockRange>>,
    ) -> Result<()> {
        let r = self.reader();
        let mut exts = Vec::new();
        extent::scan(&r, ino, i, 0, &mut |e| {
            if e.file_block >= blocks {
                return false;
            }
            exts.push(e);
            true
        })?;
        let already = matches!(exts.as_slice(), [e] if e.file_block == 0 && u64::from(e.len) == blocks && e.dev_block % align == 0);
        if exts.is_empty()
            || already
            || exts
                .iter()
                .any(|e| e.flags & extent_flags::UNWRITTEN != 0 || end(e) > blocks)
        {
            return Ok(());
        }
        let Some(dest) = target(self, tx)? else {
            return Ok(());
        };
        // One 2 MiB piece at a time: the buffer stays small whatever `blocks` is.
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        for piece in 0..blocks / CHUNK_BLOCKS {
            let (p_start, p_end) = (piece * CHUNK_BLOCKS, (piece + 1) * CHUNK_BLOCKS);
            buf.fill(0);
            for e in exts
                .iter()
                .filter(|e| e.file_block < p_end && end(e) > p_start)
            {
                let from = e.file_block.max(p_start);
                let to = end(e).min(p_end);
                let at = blocks_to_bytes(from - p_start) as usize;
                let n = blocks_to_bytes(to - from) as usize;
                self.media.read(
                    blocks_to_bytes(e.dev_block + (from - e.file_block)),
                    &mut buf[at..at + n],
                )?;
            }
            // Bytes past the old end of file may be stale: they become visible now.
            let keep = old_size.saturating_sub(blocks_to_bytes(p_start));
            let keep = (keep.min(CHUNK_SIZE)) as usize;
            buf[keep..].fill(0);
            self.media
                .write_nt(blocks_to_bytes(dest.start + p_start), &buf)?;
        }
        tx.note_data_written();
        let nodes = self.nodes();
        for e in &exts {
            extent::del(tx, &r, &nodes, ino, i, e.file_block)?;
            self.free_data(
                tx,
                ino,
                BlockRange {
                    start: e.dev_block,
                    len: u64::from(e.len),
                },
            )?;
            i.blocks = i.blocks.saturating_sub(u64::from(e.len));
        }
        extent::put(
            tx,
            &r,
            &nodes,
            ino,
            i,
            ExtentRecord {
                file_block: 0,
                dev_block: dest.start,
                len: blocks as u32,
                flags: 0,
            },
        )?;
        i.blocks += blocks;
        Ok(())
    }

    /// Zeroes bytes `from..to` (less than two blocks: the partial edges of a punched or
    /// zeroed range) through the journal, so the edges change atomically with the blocks
    /// the same operation unmaps.
    fn zero_in_file(&self, tx: &mut Tx<'_>, ino: u64, i: &Inode, from: u64, to: u64) -> Result<()> {
        let to = to.min(i.size);
        if from >= to {
            return Ok(());
        }
        let r = self.reader();
        let mut pos = from;
        while pos < to {
            let b = pos / BLOCK_SIZE;
            let seg_end = to.min(blocks_to_bytes(b + 1));
            if let Some(e) = extent::covering(&r, ino, i, b)? {
                if e.flags & extent_flags::UNWRITTEN == 0 {
                    let dev = blocks_to_bytes(e.dev_block) + (pos - blocks_to_bytes(e.file_block));
                    tx.zero(dev, seg_end - pos)?;
                }
            }
            pos = seg_end;
        }
        Ok(())
    }

    /// Makes file blocks `fb..fe` writable: returns the pieces that back them, allocating
    /// holes and converting unwritten extents.
    pub(super) fn map_for_write(
        &self,
        tx: &mut Tx<'_>,
        ino: u64,
        i: &mut Inode,
        fb: u64,
        fe: u64,
    ) -> Result<Vec<Piece>> {
        let mut pieces = Vec::new();
        let eof_block = i.size.div_ceil(BLOCK_SIZE);
        let mut b = fb;
        while b < fe {
            let r = self.reader();
            match extent::covering(&r, ino, i, b)? {
                Some(e) if e.flags & extent_flags::UNWRITTEN == 0 => {
                    let len = fe.min(end(&e)) - b;
                    pieces.push(Piece {
                        fblock: b,
                        dev_block: e.dev_block + (b - e.file_block),
                        len,
                        fresh: false,
                    });
                    b += len;
                }
                Some(e) => {
                    let mid_end = fe.min(end(&e));
                    self.split_unwritten(tx, ino, i, e, b, mid_end)?;
                    pieces.push(Piece {
                        fblock: b,
                        dev_block: e.dev_block + (b - e.file_block),
                        len: mid_end - b,
                        fresh: true,
                    });
                    b = mid_end;
                }
                None => {
                    let next = extent::next_from(&r, ino, i, b)?.map_or(u64::MAX, |e| e.file_block);
                    // Never let a small allocation in the first 2 MiB of the file straddle
                    // into the second: the part past it must be free to take an aligned
                    // chunk. (Holes further on are allocated whole chunks at a time.)
                    let hole_end = if b < CHUNK_BLOCKS {
                        fe.min(next).min(CHUNK_BLOCKS)
                    } else {
                        fe.min(next)
                    };
                    // The file grows contiguously: this write starts at or before the end of
                    // file and the hole lies at or after it.
                    let contiguous = fb <= eof_block && b >= eof_block;
                    let p = self.allocate_hole(tx, ino, i, b, hole_end, next, 0, contiguous)?;
                    b = p.fblock + p.len;
                    pieces.push(p);
                }
            }
        }
        Ok(pieces)
    }

    /// Marks `from..to` of the unwritten extent `e` written (splitting it).
    fn split_unwritten(
        &self,
        tx: &mut Tx<'_>,
        ino: u64,
        i: &mut Inode,
        e: ExtentRecord,
        from: u64,
        to: u64,
    ) -> Result<()> {
        let r = self.reader();
        let nodes = self.nodes();
        extent::del(tx, &r, &nodes, ino, i, e.file_block)?;
        let piece = |fb: u64, fe: u64, flags: u32| ExtentRecord {
            file_block: fb,
            dev_block: e.dev_block + (fb - e.file_block),
            len: (fe - fb) as u32,
            flags,
        };
        if e.file_block < from {
            extent::put(
                tx,
                &r,
                &nodes,
                ino,
                i,
                piece(e.file_block, from, extent_flags::UNWRITTEN),
            )?;
        }
        extent::put(tx, &r, &nodes, ino, i, piece(from, to, 0))?;
        if to < end(&e) {
            extent::put(
                tx,
                &r,
                &nodes,
                ino,
                i,
                piece(to, end(&e), extent_flags::UNWRITTEN),
            )?;
        }
        Ok(())
    }

    /// Allocates blocks for the hole starting at `b` (the write needs up to `want_end`; the
    /// hole itself ends at `next`). Returns the piece it mapped (it may start before `b`
    /// when a whole aligned chunk was taken, and may be shorter than asked).
    #[expect(clippy::too_many_arguments, reason = "hole geometry and extent flags")]
    fn allocate_hole(
        &self,
        tx: &mut Tx<'_>,
        ino: u64,
        i: &mut Inode,
        b: u64,
        want_end: u64,
        next: u64,
        flags: u32,
        contiguous: bool,
    ) -> Result<Piece> {
        let r = self.reader();
        let nodes = self.nodes();
        let prev = if b > 0 {
            extent::floor(&r, ino, i, b - 1)?
        } else {
            None
        };
        let chunk_start = b / CHUNK_BLOCKS * CHUNK_BLOCKS;
        let prev_end = prev.as_ref().map_or(0, end);
        // 1 GiB extents, as 2 MiB ones below, one level up: when the whole 1 GiB-aligned
        // file region is a hole and either this request alone covers a region or the file
        // grows contiguously past its first GiB, take whole free device regions, so the
        // file can be mapped with 1 GiB (PUD) pages. No free region: 2 MiB chunks.
        let region_start = b / REGION_BLOCKS * REGION_BLOCKS;
        let big_region = want_end - b >= REGION_BLOCKS || (b >= REGION_BLOCKS && contiguous);
        if big_region && prev_end <= region_start && next >= region_start + REGION_BLOCKS {
            let limit = next.min(MAX_FILE_SIZE / BLOCK_SIZE);
            // An extent's length is a u32 of blocks.
            let max_regions =
                ((limit - region_start) / REGION_BLOCKS).min(u64::from(u32::MAX) / REGION_BLOCKS);
            let regions = (want_end - region_start)
                .div_ceil(REGION_BLOCKS)
                .min(max_regions)
                .max(1);
            match self.alloc.allocate_regions(tx, regions * REGION_BLOCKS) {
                Ok(got) => {
                    return self.map_new(tx, ino, i, region_start, got, flags, None);
                }
                Err(AllocError::NoSpace) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Huge policy: the whole aligned file chunk is a hole, and either this request alone
        // covers 2 MiB, or the file grows contiguously (the hole starts at the end of file)
        // past its first 2 MiB. Small writes into holes inside a sparse file or far past its
        // end get small blocks: a 2 MiB chunk per scattered 4 KiB write filled devices under
        // fsstress.
        let big = want_end - b >= CHUNK_BLOCKS || (b >= CHUNK_BLOCKS && contiguous);
        if big && prev_end <= chunk_start && next >= chunk_start + CHUNK_BLOCKS {
            let chunks = (want_end - chunk_start).div_ceil(CHUNK_BLOCKS);
            let max_chunks = (next.min(MAX_FILE_BLOCKS) - chunk_start) / CHUNK_BLOCKS;
            let chunks = chunks.min(max_chunks).max(1);
            // A file filling a 1 GiB region in place (its device blocks sit at its file
            // blocks' offsets in a region, see start_region_stream) extends in place when
            // the chunks after its last one are free, and the extents merge: its region
            // stays 1 GiB-aligned. Other files take chunks where the pool has them
            // (extending them in place too fragmented free space under aging).
            let goal = prev
                .filter(|p| {
                    end(p) == chunk_start
                        && p.dev_block % REGION_BLOCKS == p.file_block % REGION_BLOCKS
                })
                .map(|p| p.dev_block + u64::from(p.len) - 1);
            let req = AllocRequest {
                blocks: chunks * CHUNK_BLOCKS,
                min_blocks: CHUNK_BLOCKS,
                aligned: true,
                goal,
            };
            // Several devices: the member of the writing thread's node first.
            let within = goal.is_none().then(|| self.placement.preferred()).flatten();
            match self.alloc.allocate_within(tx, req, within) {
                Ok(got) if got.start % CHUNK_BLOCKS == 0 && got.len % CHUNK_BLOCKS == 0 => {
                    // Merged only when extending in place (elsewhere records stay one per
                    // allocation, as the aging results were measured with).
                    let merge_with = prev.filter(|_| goal.is_some());
                    return self.map_new(tx, ino, i, chunk_start, got, flags, merge_with);
                }
                Ok(got) => {
                    // Not aligned after all (the pool ran out): keep what lies in the hole.
                    self.alloc.free(tx, got)?;
                }
                Err(AllocError::NoSpace) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let goal = prev
            .filter(|p| end(p) == b)
            .map(|p| p.dev_block + u64::from(p.len) - 1);
        let req = AllocRequest {
            blocks: want_end - b,
            min_blocks: 1,
            aligned: false,
            goal,
        };
        let got = self.alloc.allocate(tx, req).map_err(|e| match e {
            AllocError::NoSpace => Error::NoSpace,
            e => e.into(),
        })?;
        let _ = &nodes;
        self.map_new(tx, ino, i, b, got, flags, prev)
    }

    /// Maps newly allocated `got` at file block `fb`, merging with `prev` when contiguous.
    #[expect(clippy::too_many_arguments, reason = "extent fields")]
    fn map_new(
        &self,
        tx: &mut Tx<'_>,
        ino: u64,
        i: &mut Inode,
        fb: u64,
        got: BlockRange,
        flags: u32,
        prev: Option<ExtentRecord>,
    ) -> Result<Piece> {
        let r = self.reader();
        let nodes = self.nodes();
        i.blocks += got.len;
        let merge = prev.filter(|p| {
            end(p) == fb
                && p.dev_block + u64::from(p.len) == got.start
                && p.flags == flags
                && u64::from(p.len) + got.len <= u64::from(u32::MAX)
        });
        let rec = match merge {
            Some(p) => ExtentRecord {
                len: p.len + got.len as u32,
                ..p
            },
            None => ExtentRecord {
                file_block: fb,
                dev_block: got.start,
                len: got.len as u32,
                flags,
            },
        };
        extent::put(tx, &r, &nodes, ino, i, rec)?;
        Ok(Piece {
            fblock: fb,
            dev_block: got.start,
            len: got.len,
            fresh: true,
        })
    }

    /// Changes the size of a regular file (truncate), freeing blocks past the new end.
    pub(super) fn set_size(
        &self,
        tx: &mut MetaTx<'_>,
        ino: u64,
        i: &mut Inode,
        size: u64,
    ) -> Result<()> {
        if size > i.size {
            // Through the end of the new last block: the tail rule.
            self.zero_allocated(ino, i, i.size, size.next_multiple_of(BLOCK_SIZE))?;
            tx.note_data_written();
        } else if size < i.size {
            self.truncate_blocks(tx, ino, i, size)?;
            // The kept last block's bytes past the new end are zeroed once the truncate is
            // durable (before, a crash would keep the old size with those bytes gone), not
            // only at the next extension: a direct mapping of the last page (the preload
            // library's mmap, pmfs::dax) shows them, and a mapping's partial last page
            // must read as zeros past the end of file.
            let tail = self.written_ranges(ino, i, size, size.next_multiple_of(BLOCK_SIZE))?;
            if !tail.is_empty() {
                let media = std::sync::Arc::clone(&self.media);
                tx.on_commit(move || {
                    for (dev, len) in tail {
                        if let Err(e) = media.zero_nt(dev, len) {
                            log::error!("zeroing {len} bytes past the end of file at {dev}: {e}");
                        }
                    }
                });
            }
        }
        i.size = size;
        Ok(())
    }

    /// Frees every block past byte `size`.
    pub(super) fn truncate_blocks(
        &self,
        tx: &mut MetaTx<'_>,
        ino: u64,
        i: &mut Inode,
        size: u64,
    ) -> Result<()> {
        let keep = size.div_ceil(BLOCK_SIZE);
        self.punch_blocks(tx, ino, i, keep, u64::MAX)?;
        if keep == 0 {
            extent::destroy_map(tx, &self.reader(), &self.nodes(), ino, i)?;
        }
        Ok(())
    }

    /// Frees file blocks `fb..fe` of `ino` in bounded steps: while more than
    /// [`SHRINK_BATCH`] extents overlap the range, the last `SHRINK_BATCH` of them are freed
    /// in a transaction of their own, so the freed part is always a suffix of the range and
    /// every step leaves a consistent file. With `shrink` each step also lowers the size to
    /// where it cut (a truncate stopped half way by a crash leaves a shorter file, never a
    /// file that maps freed blocks). Returns once what is left fits one step, which the
    /// caller does in its own transaction. The caller holds `ino`'s stripe.
    ///
    /// This is the one driver for everything that may free an unbounded number of extents:
    /// truncate, punch hole, zero range, unlink (the orphan reaper) and the deferred-free
    /// inode at mount.
    pub(super) fn punch_in_steps(
        &self,
        g: &StripeGuards<'_>,
        ino: u64,
        fb: u64,
        mut fe: u64,
        shrink: bool,
    ) -> Result<()> {
        loop {
            let mut i = self.inodes.read(ino)?;
            if i.flags & inode_flags::TREE == 0 {
                return Ok(()); // extents inline in the inode: a handful
            }
            let starts = self.extent_starts(ino, &i, fb, fe)?;
            if starts.len() <= SHRINK_BATCH {
                return Ok(());
            }
            let cut = starts[starts.len() - SHRINK_BATCH].max(fb);
            let mut tx = self.begin(g, self.free_locks(ino).freeing())?;
            self.punch_blocks(&mut tx, ino, &mut i, cut, fe)?;
            if shrink {
                i.size = i.size.min(blocks_to_bytes(cut));
            }
            self.inodes.write(&mut tx, ino, &mut i)?;
            tx.commit()?;
            fe = cut;
        }
    }

    /// The first file block of every extent that overlaps blocks `fb..fe`, ascending.
    fn extent_starts(&self, ino: u64, i: &Inode, fb: u64, fe: u64) -> Result<Vec<u64>> {
        let r = self.reader();
        let mut starts = Vec::new();
        if fb > 0 {
            if let Some(e) = extent::covering(&r, ino, i, fb - 1)? {
                if end(&e) > fb {
                    starts.push(e.file_block);
                }
            }
        }
        extent::scan(&r, ino, i, fb, &mut |e| {
            if e.file_block >= fe {
                return false;
            }
            starts.push(e.file_block);
            true
        })?;
        Ok(starts)
    }

    /// Unmaps and frees file blocks `fb..fe`.
    fn punch_blocks(
        &self,
        tx: &mut MetaTx<'_>,
        ino: u64,
        i: &mut Inode,
        fb: u64,
        fe: u64,
    ) -> Result<()> {
        if fb >= fe {
            return Ok(());
        }
        let r = self.reader();
        let nodes = self.nodes();
        let mut hit = Vec::new();
        if fb > 0 {
            if let Some(e) = extent::covering(&r, ino, i, fb - 1)? {
                if end(&e) > fb {
                    hit.push(e);
                }
            }
        }
        extent::scan(&r, ino, i, fb, &mut |e| {
            if e.file_block >= fe {
                return false;
            }
            hit.push(e);
            true
        })?;
        for e in hit {
            let (s, t) = (fb.max(e.file_block), fe.min(end(&e)));
            extent::del(tx, &r, &nodes, ino, i, e.file_block)?;
            if e.file_block < s {
                extent::put(
                    tx,
                    &r,
                    &nodes,
                    ino,
                    i,
                    ExtentRecord {
                        len: (s - e.file_block) as u32,
                        ..e
                    },
                )?;
            }
            if t < end(&e) {
                let rec = ExtentRecord {
                    file_block: t,
                    dev_block: e.dev_block + (t - e.file_block),
                    len: (end(&e) - t) as u32,
                    flags: e.flags,
                };
                extent::put(tx, &r, &nodes, ino, i, rec)?;
            }
            let freed = BlockRange {
                start: e.dev_block + (s - e.file_block),
                len: t - s,
            };
            self.free_data(tx, ino, freed)?;
            i.blocks = i.blocks.saturating_sub(freed.len);
        }
        Ok(())
    }

    /// FALLOCATE: modes 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE[|KEEP_SIZE].
    pub fn fallocate(&self, ctx: &Ctx, ino: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        self.check_writable()?;
        let end_off = offset.checked_add(len).ok_or(Error::FileTooBig)?;
        if len == 0 {
            return Err(Error::Invalid);
        }
        if end_off > MAX_FILE_SIZE {
            return Err(Error::FileTooBig);
        }
        let known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0
            || (mode & FALLOC_FL_PUNCH_HOLE != 0 && mode & FALLOC_FL_KEEP_SIZE == 0)
        {
            return Err(Error::NotSupported);
        }
        let g = self.lock_all(&[ino]);
        let mut i = self.inodes.read(ino)?;
        if !i.is_reg() {
            return Err(if i.is_dir() {
                Error::IsDir
            } else {
                Error::NotSupported
            });
        }
        flags::may_fallocate(&i, mode)?;
        // Preallocation and zero range may store extents past 2^44 even with KEEP_SIZE;
        // only a punch stores none.
        if end_off > V1_MAX_FILE_SIZE && mode & FALLOC_FL_PUNCH_HOLE == 0 {
            self.require_features(IncompatFeatures::LARGE_FILES)?;
        }
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 {
            // A range over many extents is freed in steps first (each a consistent file
            // with a shorter part of the range punched); the edges and the rest go below.
            let (first_full, last_full) = (offset.div_ceil(BLOCK_SIZE), end_off / BLOCK_SIZE);
            if first_full < last_full {
                self.punch_in_steps(&g, ino, first_full, last_full, false)?;
                i = self.inodes.read(ino)?;
            }
        }
        // A punch gives space back (its extent splits may use the reserve); preallocation
        // and zero range allocate and must not.
        let locks = if mode & FALLOC_FL_PUNCH_HOLE != 0 {
            self.free_locks(ino).freeing()
        } else {
            self.free_locks(ino)
        };
        let mut tx = self.begin(&g, locks)?;
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 {
            // Zero the partial blocks at the edges, free the whole blocks inside.
            let first_full = offset.div_ceil(BLOCK_SIZE);
            let last_full = end_off / BLOCK_SIZE;
            if first_full > last_full {
                self.zero_in_file(&mut tx, ino, &i, offset, end_off)?;
            } else {
                self.zero_in_file(&mut tx, ino, &i, offset, blocks_to_bytes(first_full))?;
                self.zero_in_file(&mut tx, ino, &i, blocks_to_bytes(last_full), end_off)?;
                self.punch_blocks(&mut tx, ino, &mut i, first_full, last_full)?;
            }
        }
        if mode & FALLOC_FL_PUNCH_HOLE == 0 {
            // Preallocate the holes as unwritten extents.
            let (fb, fe) = (offset / BLOCK_SIZE, end_off.div_ceil(BLOCK_SIZE));
            let eof_block = i.size.div_ceil(BLOCK_SIZE);
            let mut b = fb;
            while b < fe {
                if tx.remaining() < STEP_RESERVE {
                    // Preallocation of a long range over fragmented space: commit what is
                    // mapped so far (unwritten extents, consistent) and go on in a new
                    // transaction, as ext4 and XFS do.
                    self.inodes.write(&mut tx, ino, &mut i)?;
                    tx.commit()?;
                    tx = self.begin(&g, locks)?;
                }
                let r = self.reader();
                match extent::covering(&r, ino, &i, b)? {
                    Some(e) => b = end(&e),
                    None => {
                        let next =
                            extent::next_from(&r, ino, &i, b)?.map_or(u64::MAX, |e| e.file_block);
                        let p = self.allocate_hole(
                            &mut tx,
                            ino,
                            &mut i,
                            b,
                            fe.min(next),
                            next,
                            extent_flags::UNWRITTEN,
                            fb <= eof_block && b >= eof_block,
                        )?;
                        b = p.fblock + p.len;
                    }
                }
            }
            if mode & FALLOC_FL_KEEP_SIZE == 0 && end_off > i.size {
                // Through the end of the new last block: the tail rule.
                self.zero_allocated(ino, &i, i.size, end_off.next_multiple_of(BLOCK_SIZE))?;
                tx.note_data_written();
                i.size = end_off;
            }
        }
        let now = now_ns();
        i.ctime_ns = now;
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 {
            i.mtime_ns = now;
        }
        kill_privs(ctx, &mut i);
        self.inodes.write(&mut tx, ino, &mut i)?;
        tx.commit()?;
        Ok(())
    }

    /// LSEEK with SEEK_DATA / SEEK_HOLE (others are answered by the kernel).
    pub fn lseek(&self, ino: u64, offset: i64, whence: i32) -> Result<i64> {
        self.check_alive()?;
        let _g = self.read_lock(ino);
        let i = self.inodes.read(ino)?;
        // lseek(2): SEEK_DATA/SEEK_HOLE at a negative offset or at/after the end is ENXIO.
        let off = u64::try_from(offset).map_err(|_| Error::NoSuchPosition)?;
        if off >= i.size {
            return Err(Error::NoSuchPosition);
        }
        let r = self.reader();
        let written = |e: &ExtentRecord| e.flags & extent_flags::UNWRITTEN == 0;
        match whence {
            SEEK_DATA => {
                let mut pos = None;
                if let Some(e) = extent::covering(&r, ino, &i, off / BLOCK_SIZE)? {
                    if written(&e) {
                        pos = Some(off);
                    }
                }
                if pos.is_none() {
                    extent::scan(&r, ino, &i, off / BLOCK_SIZE + 1, &mut |e| {
                        if written(&e) {
                            pos = Some(blocks_to_bytes(e.file_block));
                            return false;
                        }
                        true
                    })?;
                }
                match pos {
                    Some(p) if p < i.size => Ok(p as i64),
                    _ => Err(Error::NoSuchPosition),
                }
            }
            SEEK_HOLE => {
                let mut pos = off;
                loop {
                    match extent::covering(&r, ino, &i, pos / BLOCK_SIZE)? {
                        Some(e) if written(&e) => pos = blocks_to_bytes(end(&e)),
                        _ => break,
                    }
                    if pos >= i.size {
                        break;
                    }
                }
                Ok(pos.min(i.size) as i64)
            }
            _ => Err(Error::Invalid),
        }
    }

    /// FSYNC: every reply is already durable; in msync mode make the page cache of the
    /// mapping reach the media.
    pub fn fsync(&self, ino: u64) -> Result<()> {
        self.check_alive()?;
        let _ = self.getattr(ino)?;
        if self.media.persistence() == crate::device::PersistenceMode::Msync {
            self.media.sync_all()?;
        } else {
            self.media.fence();
        }
        Ok(())
    }

    /// COPY_FILE_RANGE: copies through a buffer, 1 MiB at a time.
    pub fn copy_file_range(
        &self,
        ctx: &Ctx,
        ino_in: u64,
        off_in: u64,
        ino_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<u32> {
        let len = len.min(u64::from(u32::MAX) & !(BLOCK_SIZE - 1));
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(1 << 20) as u32;
            let mut buf = Vec::new();
            self.read(ino_in, off_in + done, n, &mut |d| buf.extend_from_slice(d))?;
            if buf.is_empty() {
                break;
            }
            let w = self.write(ctx, ino_out, off_out + done, &buf)?;
            done += u64::from(w);
            if (w as usize) < buf.len() {
                break;
            }
        }
        Ok(done as u32)
    }
}
