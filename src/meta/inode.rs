//! The inode table: 2 MiB chunks of 256-byte inode slots, found through the inode-table
//! directory block, each chunk ending in its own inode bitmap. An in-memory copy of the
//! bitmaps finds free inode numbers without scanning the table.

use crate::alloc::{AllocRequest, BlockAllocator};
use crate::device::Media;
use crate::error::{Error, Result};
use crate::format::bitmap;
use crate::format::{
    BLOCK_SIZE, CHUNK_BLOCKS, CHUNK_SIZE, FIRST_USER_INO, Geometry, INODE_BITMAP_OFFSET,
    INODE_BITMAP_SLOTS, INODE_SIZE, INODES_PER_CHUNK, ITABLE_DIR_ENTRIES, Inode,
    USABLE_INODES_PER_CHUNK, blocks_to_bytes,
};
use crate::journal::{Journal, Tx};
use crate::lockorder::{OrderedMutex, Rank};
use parking_lot::{Mutex, RwLock};
use std::sync::Arc;

const BITMAP_WORDS: usize = (INODES_PER_CHUNK / 64) as usize;

#[derive(Debug)]
struct FreeIndex {
    /// Per chunk: the committed inode bitmap (allocations show at once, frees after commit).
    bitmaps: Vec<[u64; BITMAP_WORDS]>,
    free_counts: Vec<u64>,
    /// Chunk to search first.
    hint: usize,
}

/// The inode table of a mounted file system.
#[derive(Debug)]
pub struct InodeTable {
    media: Arc<dyn Media>,
    geometry: Geometry,
    /// First block of each inode-table chunk, in table order.
    chunks: RwLock<Vec<u64>>,
    free: Arc<Mutex<FreeIndex>>,
    /// Serialises growth of the table (which commits a transaction of its own, so it is
    /// taken before any journal slot: [`InodeTable::reserve`] runs before the caller's
    /// transaction begins).
    grow_lock: OrderedMutex<()>,
}

/// An inode number taken from the free index but not yet recorded on the media. Given back
/// when dropped unused; [`InodeTable::allocate`] records it in a transaction.
#[derive(Debug)]
#[must_use]
pub struct InodeReservation<'a> {
    free: &'a Arc<Mutex<FreeIndex>>,
    ino: u64,
    chunk: usize,
    slot: u64,
    used: bool,
}

impl Drop for InodeReservation<'_> {
    fn drop(&mut self) {
        if !self.used {
            release_slot(self.free, self.chunk, self.slot);
        }
    }
}

/// The inode bitmap of a chunk with no inode in use: only the bitmap's own slots are set.
fn fresh_chunk_bitmap() -> [u64; BITMAP_WORDS] {
    let mut words = [0u64; BITMAP_WORDS];
    bitmap::set_range(&mut words, USABLE_INODES_PER_CHUNK, INODE_BITMAP_SLOTS);
    words
}

/// Returns an inode slot to the in-memory free index.
fn release_slot(free: &Mutex<FreeIndex>, chunk: usize, slot: u64) {
    let mut f = free.lock();
    bitmap::clear_range(&mut f.bitmaps[chunk], slot, 1);
    f.free_counts[chunk] += 1;
}

impl InodeTable {
    /// Loads the table directory and the chunk bitmaps (a few KiB per 8188 inodes).
    pub fn open(media: Arc<dyn Media>, geometry: Geometry) -> Result<Self> {
        let mut dir = vec![0u8; BLOCK_SIZE as usize];
        media.read(geometry.itable_dir_offset(), &mut dir)?;
        let mut chunks = Vec::new();
        let mut bitmaps = Vec::new();
        let mut free_counts = Vec::new();
        for (i, entry) in dir.chunks_exact(8).enumerate() {
            let block = u64::from_le_bytes(entry.try_into().map_err(|_| Error::Invalid)?);
            if block == 0 {
                break;
            }
            if block % CHUNK_BLOCKS != 0 || !geometry.is_data_range(block, CHUNK_BLOCKS) {
                return Err(Error::corrupted(
                    "inode table directory",
                    0,
                    format!("entry {i}: chunk at block {block} is not an aligned data chunk"),
                ));
            }
            if chunks.contains(&block) {
                return Err(Error::corrupted(
                    "inode table directory",
                    0,
                    format!("chunk {block} listed twice"),
                ));
            }
            let mut words = [0u64; BITMAP_WORDS];
            let mut raw = vec![0u8; BITMAP_WORDS * 8];
            media.read(blocks_to_bytes(block) + INODE_BITMAP_OFFSET, &mut raw)?;
            for (w, b) in words.iter_mut().zip(raw.chunks_exact(8)) {
                *w = u64::from_le_bytes(b.try_into().map_err(|_| Error::Invalid)?);
            }
            let used: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
            free_counts.push(INODES_PER_CHUNK.saturating_sub(used));
            bitmaps.push(words);
            chunks.push(block);
        }
        if chunks.is_empty() {
            return Err(Error::corrupted(
                "inode table directory",
                0,
                "no inode chunk",
            ));
        }
        Ok(Self {
            media,
            geometry,
            chunks: RwLock::new(chunks),
            free: Arc::new(Mutex::new(FreeIndex {
                bitmaps,
                free_counts,
                hint: 0,
            })),
            grow_lock: OrderedMutex::new(Rank::InodeGrow, ()),
        })
    }

    /// Byte offset of inode `ino`, or an error for numbers that are not inode slots.
    pub fn offset(&self, ino: u64) -> Result<u64> {
        let chunk = ino / INODES_PER_CHUNK;
        let slot = ino % INODES_PER_CHUNK;
        if ino == 0 || slot >= USABLE_INODES_PER_CHUNK {
            return Err(Error::NotFound);
        }
        let chunks = self.chunks.read();
        let block = *chunks.get(chunk as usize).ok_or(Error::NotFound)?;
        Ok(blocks_to_bytes(block) + slot * INODE_SIZE)
    }

    /// True when the inode's bit is set in the (committed) bitmap.
    pub fn is_allocated(&self, ino: u64) -> bool {
        let chunk = (ino / INODES_PER_CHUNK) as usize;
        let slot = ino % INODES_PER_CHUNK;
        let free = self.free.lock();
        free.bitmaps
            .get(chunk)
            .is_some_and(|b| bitmap::get(b, slot))
    }

    /// Reads and validates an inode in use.
    pub fn read(&self, ino: u64) -> Result<Inode> {
        let off = self.offset(ino)?;
        let mut buf = [0u8; INODE_SIZE as usize];
        self.media.read(off, &mut buf)?;
        let inode =
            Inode::decode(&buf).map_err(|e| Error::corrupted("inode", ino, e.to_string()))?;
        if inode.mode == 0 {
            return Err(Error::NotFound);
        }
        Ok(inode)
    }

    /// Reads a slot's old generation (0 for a never-used or unreadable slot).
    fn old_generation(&self, ino: u64) -> u64 {
        let Ok(off) = self.offset(ino) else { return 0 };
        let mut buf = [0u8; INODE_SIZE as usize];
        if self.media.read(off, &mut buf).is_err() {
            return 0;
        }
        Inode::decode(&buf).map(|i| i.generation).unwrap_or(0)
    }

    /// The generation a new inode in slot `ino` carries: one more than the slot's last, or,
    /// for a slot never used (a new chunk, perhaps one given back and grown again), the
    /// clock, so an (inode, generation) pair a file handle kept is never handed out again.
    pub fn next_generation(&self, ino: u64) -> u64 {
        match self.old_generation(ino) {
            0 => u64::try_from(super::now_ns()).unwrap_or(1).max(1),
            old => old.wrapping_add(1).max(1),
        }
    }

    /// Seals and stores an inode through the transaction.
    pub fn write(&self, tx: &mut Tx<'_>, ino: u64, inode: &mut Inode) -> Result<()> {
        inode.seal();
        let off = self.offset(ino)?;
        tx.write_struct(off, inode)?;
        Ok(())
    }

    /// Takes a free inode number, growing the table when it is full. Call it before the
    /// transaction that will use the number: growing commits a transaction of its own, and
    /// nothing may wait for a journal slot while holding one.
    pub fn reserve(
        &self,
        journal: &Journal,
        alloc: &Arc<BlockAllocator>,
    ) -> Result<InodeReservation<'_>> {
        loop {
            if let Some((ino, chunk, slot)) = self.take_free() {
                return Ok(InodeReservation {
                    free: &self.free,
                    ino,
                    chunk,
                    slot,
                    used: false,
                });
            }
            self.grow(journal, alloc)?;
        }
    }

    /// Records a reserved inode number as allocated in `tx`; returns it with the generation
    /// the new inode must carry. A rollback gives the number back.
    pub fn allocate(
        &self,
        tx: &mut Tx<'_>,
        mut reserved: InodeReservation<'_>,
    ) -> Result<(u64, u64)> {
        reserved.used = true;
        let (ino, chunk, slot) = (reserved.ino, reserved.chunk, reserved.slot);
        let free = Arc::clone(&self.free);
        tx.on_abort(move || release_slot(&free, chunk, slot));
        let block = self.chunks.read()[chunk];
        tx.set_bits(blocks_to_bytes(block) + INODE_BITMAP_OFFSET, slot, 1)?;
        let generation = self.next_generation(ino);
        Ok((ino, generation))
    }

    fn take_free(&self) -> Option<(u64, usize, u64)> {
        let mut f = self.free.lock();
        let n = f.bitmaps.len();
        for k in 0..n {
            let chunk = (f.hint + k) % n;
            if f.free_counts[chunk] == 0 {
                continue;
            }
            for w in 0..BITMAP_WORDS {
                let word = f.bitmaps[chunk][w];
                if word == u64::MAX {
                    continue;
                }
                let bit = u64::from((!word).trailing_zeros());
                let slot = w as u64 * 64 + bit;
                let ino = chunk as u64 * INODES_PER_CHUNK + slot;
                if slot >= USABLE_INODES_PER_CHUNK || ino < FIRST_USER_INO {
                    // mkfs sets these bits; a clear one means a damaged bitmap: never use it.
                    f.bitmaps[chunk][w] |= 1 << bit;
                    continue;
                }
                f.bitmaps[chunk][w] |= 1 << bit;
                f.free_counts[chunk] -= 1;
                f.hint = chunk;
                return Some((ino, chunk, slot));
            }
            f.free_counts[chunk] = 0;
        }
        None
    }

    /// Frees an inode number (its slot has been cleared by the caller in the same
    /// transaction). The number becomes reusable when the transaction commits.
    pub fn free(&self, tx: &mut Tx<'_>, ino: u64) -> Result<()> {
        let chunk = (ino / INODES_PER_CHUNK) as usize;
        let slot = ino % INODES_PER_CHUNK;
        let block = *self.chunks.read().get(chunk).ok_or(Error::NotFound)?;
        tx.clear_bits(blocks_to_bytes(block) + INODE_BITMAP_OFFSET, slot, 1)?;
        let free = Arc::clone(&self.free);
        tx.on_commit(move || {
            let mut f = free.lock();
            bitmap::clear_range(&mut f.bitmaps[chunk], slot, 1);
            f.free_counts[chunk] += 1;
        });
        Ok(())
    }

    /// Adds a chunk to the table, in its own transaction.
    fn grow(&self, journal: &Journal, alloc: &Arc<BlockAllocator>) -> Result<()> {
        let _g = self.grow_lock.lock();
        if self.free.lock().free_counts.iter().any(|&c| c > 0) {
            return Ok(()); // someone else grew it, or inodes were freed meanwhile
        }
        let n = self.chunks.read().len() as u64;
        if n >= ITABLE_DIR_ENTRIES {
            return Err(Error::NoInodes);
        }
        let mut tx = journal.begin();
        let request = AllocRequest {
            blocks: CHUNK_BLOCKS,
            min_blocks: CHUNK_BLOCKS,
            aligned: true,
            goal: None,
        };
        let range = alloc.allocate(&mut tx, request).map_err(|e| match e {
            crate::alloc::AllocError::NoSpace => Error::NoInodes,
            e => e.into(),
        })?;
        if range.start % CHUNK_BLOCKS != 0 || range.len != CHUNK_BLOCKS {
            return Err(Error::NoInodes); // dropping tx gives the blocks back
        }
        let chunk_off = blocks_to_bytes(range.start);
        self.media.zero_nt(chunk_off, CHUNK_SIZE)?;
        tx.note_data_written();
        tx.write(
            self.geometry.itable_dir_offset() + n * 8,
            &range.start.to_le_bytes(),
        )?;
        tx.set_bits(
            chunk_off + INODE_BITMAP_OFFSET,
            USABLE_INODES_PER_CHUNK,
            INODE_BITMAP_SLOTS,
        )?;
        tx.commit()?;
        let words = fresh_chunk_bitmap();
        self.chunks.write().push(range.start);
        let mut f = self.free.lock();
        f.bitmaps.push(words);
        f.free_counts.push(USABLE_INODES_PER_CHUNK);
        f.hint = f.bitmaps.len() - 1;
        Ok(())
    }

    /// Inodes in use (for statfs): the usable slots that are not free, less inode number 0
    /// (never an inode). The slots every chunk keeps for its own bitmap are not inodes.
    pub fn used(&self) -> u64 {
        let f = self.free.lock();
        (f.bitmaps.len() as u64 * USABLE_INODES_PER_CHUNK)
            .saturating_sub(f.free_counts.iter().sum::<u64>())
            .saturating_sub(1)
    }

    /// True when the last chunk of the table could be given back now (cheap: for callers
    /// deciding whether to call [`InodeTable::shrink`]).
    pub fn shrinkable(&self) -> bool {
        Self::shrink_candidate(&self.free.lock()).is_some()
    }

    /// The last chunk, when it may go: every inode in it is free (none allocated, none
    /// reserved), it is not the first chunk, and the chunks before it keep at least half a
    /// chunk of free inodes (so creates and deletes around a chunk boundary do not grow
    /// and shrink the table in turn).
    fn shrink_candidate(f: &FreeIndex) -> Option<usize> {
        let n = f.bitmaps.len();
        let last = n.checked_sub(1).filter(|&l| l > 0)?;
        let rest: u64 = f.free_counts[..last].iter().sum();
        (f.free_counts[last] == USABLE_INODES_PER_CHUNK && rest >= USABLE_INODES_PER_CHUNK / 2)
            .then_some(last)
    }

    /// Gives back trailing chunks whose inodes are all free, each in its own transaction
    /// (which may use the allocator's reserve: it gives space back). Takes the growth lock,
    /// so call it with no journal slot held.
    pub fn shrink(&self, journal: &Journal, alloc: &Arc<BlockAllocator>) -> Result<()> {
        let _g = self.grow_lock.lock();
        loop {
            let last = {
                let mut f = self.free.lock();
                let Some(last) = Self::shrink_candidate(&f) else {
                    return Ok(());
                };
                // Out of the index first: nobody may reserve an inode in it from now on.
                f.bitmaps[last] = [u64::MAX; BITMAP_WORDS];
                f.free_counts[last] = 0;
                last
            };
            let block = self.chunks.read()[last];
            let mut tx = journal.begin();
            tx.allow_reserve();
            let free = Arc::clone(&self.free);
            tx.on_abort(move || {
                let mut f = free.lock();
                f.bitmaps[last] = fresh_chunk_bitmap();
                f.free_counts[last] = USABLE_INODES_PER_CHUNK;
            });
            // The table ends at the first zero entry of its directory.
            tx.write(
                self.geometry.itable_dir_offset() + last as u64 * 8,
                &0u64.to_le_bytes(),
            )?;
            alloc.free(
                &mut tx,
                crate::alloc::BlockRange {
                    start: block,
                    len: CHUNK_BLOCKS,
                },
            )?;
            tx.commit()?;
            self.chunks.write().truncate(last);
            let mut f = self.free.lock();
            f.bitmaps.truncate(last);
            f.free_counts.truncate(last);
            f.hint = f.hint.min(last - 1);
        }
    }

    /// Inodes free in the table as it stands plus what the free space could still hold.
    pub fn capacity(&self, free_blocks: u64) -> u64 {
        let f = self.free.lock();
        let table = f.bitmaps.len() as u64 * USABLE_INODES_PER_CHUNK;
        let growable =
            (ITABLE_DIR_ENTRIES - f.bitmaps.len() as u64).min(free_blocks / CHUNK_BLOCKS);
        table + growable * USABLE_INODES_PER_CHUNK
    }

    /// Every allocated inode number (for the consistency checker).
    pub fn allocated(&self) -> Vec<u64> {
        let f = self.free.lock();
        let mut out = Vec::new();
        for (c, words) in f.bitmaps.iter().enumerate() {
            for (w, word) in words.iter().enumerate() {
                let mut bits = *word;
                while bits != 0 {
                    let b = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let slot = w as u64 * 64 + b;
                    let ino = c as u64 * INODES_PER_CHUNK + slot;
                    if slot < USABLE_INODES_PER_CHUNK && ino >= crate::format::ROOT_INO {
                        out.push(ino);
                    }
                }
            }
        }
        out
    }

    /// Blocks of each inode-table chunk (for the consistency checker).
    pub fn chunk_blocks(&self) -> Vec<u64> {
        self.chunks.read().clone()
    }
}
