//! The inode table: 2 MiB chunks of 256-byte inode slots, each chunk ending in its own inode
//! bitmap, found through the inode-table directory block: directly (versions 1 and 2, at
//! most 512 chunks) or through indirect blocks of chunk pointers (`INODE_TABLE_TREE`, up
//! to 512 x 512 chunks).
//!
//! The on-media bitmaps are the truth. In memory the table keeps, per chunk, its block and
//! (once known) its count of free slots, plus the few inode numbers whose bit is about to
//! change (reserved, or freed by a transaction that has not committed). A chunk's bitmap is
//! read the first time its count is needed, so opening the table reads only the pointers.

use crate::alloc::{AllocRequest, BlockAllocator, BlockRange};
use crate::device::Media;
use crate::error::{Error, Result};
use crate::format::{
    BLOCK_SIZE, CHUNK_BLOCKS, CHUNK_SIZE, FIRST_USER_INO, Geometry, INODE_BITMAP_OFFSET,
    INODE_BITMAP_SLOTS, INODE_SIZE, INODES_PER_CHUNK, ITABLE_DIR_ENTRIES, Inode, ItableLayout,
    USABLE_INODES_PER_CHUNK, blocks_to_bytes,
};
use crate::journal::{Journal, Tx};
use crate::lockorder::{OrderedMutex, Rank};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

const BITMAP_WORDS: u64 = INODES_PER_CHUNK / 64;
/// A chunk whose bitmap has not been read yet.
const UNKNOWN: u32 = u32::MAX;

/// Where a pointer of the inode table sits, for messages and for the repair that cuts the
/// table there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointerAt {
    /// Entry `entry` of the directory block.
    Dir { entry: u64 },
    /// Entry `entry` of the indirect block that directory entry `dir_entry` names.
    Indirect { dir_entry: u64, entry: u64 },
}

/// The first pointer of the table that is not valid, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointerFault {
    pub at: PointerAt,
    pub detail: String,
}

impl std::fmt::Display for PointerFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.at {
            PointerAt::Dir { entry } => write!(f, "directory entry {entry}: {}", self.detail),
            PointerAt::Indirect { dir_entry, entry } => write!(
                f,
                "indirect block {dir_entry}, entry {entry}: {}",
                self.detail
            ),
        }
    }
}

/// The blocks the inode table is made of, as its pointers say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TablePointers {
    /// First block of each chunk, in table order (chunk `k` holds inodes `k * 8192 ..`).
    pub chunks: Vec<u64>,
    /// The indirect blocks, in directory order (empty for the flat layout).
    pub indirect: Vec<u64>,
}

impl TablePointers {
    /// Reads the pointers of the table: the directory block and, in the tree layout, its
    /// indirect blocks (at most 513 block reads). Stops at the first pointer that is not
    /// valid and returns the valid prefix with the fault, so the core can refuse the table
    /// and the repair can cut it there. A pointer is valid when it lies in the data area
    /// (a chunk: a whole aligned chunk), names no block another pointer names, and no
    /// chunk holds an indirect block. The table ends at its first zero pointer; in the tree
    /// layout every indirect block but the last is full and none is empty.
    pub fn read(media: &dyn Media, g: &Geometry) -> Result<(Self, Option<PointerFault>)> {
        let dir = read_u64s(media, g.itable_dir_offset())?;
        let mut out = Self::default();
        let mut chunk_set = HashSet::new();
        // Chunk-aligned starts of the chunks that hold an indirect block.
        let mut indirect_chunks = HashSet::new();
        let fault = |at, detail: String| Some(PointerFault { at, detail });
        let check_chunk = |block: u64, chunk_set: &HashSet<u64>, ind: &HashSet<u64>| {
            if block % CHUNK_BLOCKS != 0 || !g.is_data_range(block, CHUNK_BLOCKS) {
                Some(format!(
                    "block {block} is not an aligned chunk of the data area"
                ))
            } else if chunk_set.contains(&block) {
                Some(format!("chunk {block} is listed twice"))
            } else if ind.contains(&block) {
                Some(format!(
                    "chunk {block} holds an indirect block of the table"
                ))
            } else {
                None
            }
        };
        match g.itable {
            ItableLayout::Flat => {
                for (entry, &block) in dir.iter().enumerate() {
                    if block == 0 {
                        break;
                    }
                    if let Some(why) = check_chunk(block, &chunk_set, &indirect_chunks) {
                        let at = PointerAt::Dir {
                            entry: entry as u64,
                        };
                        return Ok((out, fault(at, why)));
                    }
                    chunk_set.insert(block);
                    out.chunks.push(block);
                }
            }
            ItableLayout::Tree { fanout } => {
                let mut last_full = true;
                for (i, &ind) in dir.iter().enumerate() {
                    let dir_entry = i as u64;
                    if ind == 0 {
                        break;
                    }
                    let at = PointerAt::Dir { entry: dir_entry };
                    if !last_full {
                        let why = "follows an indirect block that is not full".to_string();
                        return Ok((out, fault(at, why)));
                    }
                    let why = if !g.is_data_range(ind, 1) {
                        Some(format!("block {ind} is not in the data area"))
                    } else if out.indirect.contains(&ind) {
                        Some(format!("indirect block {ind} is listed twice"))
                    } else if chunk_set.contains(&(ind - ind % CHUNK_BLOCKS)) {
                        Some(format!("indirect block {ind} lies in an inode-table chunk"))
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        return Ok((out, fault(at, why)));
                    }
                    let entries = read_u64s(media, blocks_to_bytes(ind))?;
                    if entries[0] == 0 {
                        let at = PointerAt::Indirect {
                            dir_entry,
                            entry: 0,
                        };
                        return Ok((out, fault(at, format!("indirect block {ind} is empty"))));
                    }
                    indirect_chunks.insert(ind - ind % CHUNK_BLOCKS);
                    out.indirect.push(ind);
                    for (j, &block) in entries.iter().take(fanout as usize).enumerate() {
                        if block == 0 {
                            last_full = false;
                            break;
                        }
                        if let Some(why) = check_chunk(block, &chunk_set, &indirect_chunks) {
                            let at = PointerAt::Indirect {
                                dir_entry,
                                entry: j as u64,
                            };
                            return Ok((out, fault(at, why)));
                        }
                        chunk_set.insert(block);
                        out.chunks.push(block);
                    }
                }
            }
        }
        Ok((out, None))
    }

    /// Byte offset of the pointer to chunk `k` (which may not exist yet), or `None` past
    /// what the layout addresses or when chunk `k` needs an indirect block not yet there.
    fn pointer_offset(&self, g: &Geometry, k: u64) -> Option<u64> {
        match g.itable {
            ItableLayout::Flat => (k < ITABLE_DIR_ENTRIES).then(|| g.itable_dir_offset() + k * 8),
            ItableLayout::Tree { fanout } => {
                let ind = *self.indirect.get(usize::try_from(k / fanout).ok()?)?;
                Some(blocks_to_bytes(ind) + (k % fanout) * 8)
            }
        }
    }
}

/// One block of little-endian u64 entries.
fn read_u64s(media: &dyn Media, offset: u64) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; BLOCK_SIZE as usize];
    media.read(offset, &mut raw)?;
    Ok(raw
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .collect())
}

/// Which bits of word `w` of a chunk's bitmap are slots that may ever be handed out: not
/// the bitmap's own slots, and in chunk 0 not inodes 0..3 (mkfs sets those bits; a clear
/// one means a damaged bitmap, and such a slot is never used).
fn usable_mask(chunk: u64, w: u64) -> u64 {
    let first = w * 64;
    let mut mask = u64::MAX;
    if first + 64 > USABLE_INODES_PER_CHUNK {
        let usable = USABLE_INODES_PER_CHUNK.saturating_sub(first);
        mask = if usable == 0 {
            0
        } else {
            u64::MAX >> (64 - usable)
        };
    }
    if chunk == 0 && w == 0 {
        mask &= !((1u64 << FIRST_USER_INO) - 1);
    }
    mask
}

/// Byte offset of the bitmap word of chunk `block` that holds `slot`.
fn bitmap_word_offset(block: u64, slot: u64) -> u64 {
    blocks_to_bytes(block) + INODE_BITMAP_OFFSET + slot / 64 * 8
}

/// The in-memory side of the free-inode search.
#[derive(Debug, Default)]
struct FreeIndex {
    /// Per chunk: its slots that are free on the media and not held, or [`UNKNOWN`] until
    /// its bitmap is first read.
    free: Vec<u32>,
    /// Every chunk below this one has a known count (the next chunk to read).
    cursor: usize,
    /// Chunks with a known count above 0, lowest first (new inodes go to the lowest, which
    /// keeps the end of the table empty for shrinking).
    with_free: BTreeSet<u64>,
    /// Sum of the known counts.
    known_free: u64,
    /// Inode numbers whose bit on the media does not yet say what they are: reserved (bit
    /// clear, or set by a transaction that has not committed), or freed by a transaction
    /// that has not committed (bit cleared, the slot not yet reusable). Held numbers are
    /// never handed out; there are at most a few per running transaction.
    held: HashSet<u64>,
}

impl FreeIndex {
    fn add_free(&mut self, chunk: usize, n: u32) {
        if let Some(c) = self.free.get_mut(chunk).filter(|c| **c != UNKNOWN) {
            *c += n;
            self.known_free += u64::from(n);
            if *c > 0 {
                self.with_free.insert(chunk as u64);
            }
        }
    }

    fn take_one(&mut self, chunk: usize) {
        let c = &mut self.free[chunk];
        *c -= 1;
        self.known_free -= 1;
        if *c == 0 {
            self.with_free.remove(&(chunk as u64));
        }
    }

    /// Gives back a held number whose bit is clear on the media (a reservation not used,
    /// or the allocation of a rolled-back transaction).
    fn release(&mut self, ino: u64) {
        if self.held.remove(&ino) {
            self.add_free((ino / INODES_PER_CHUNK) as usize, 1);
        }
    }
}

/// The inode table of a mounted file system.
#[derive(Debug)]
pub struct InodeTable {
    media: Arc<dyn Media>,
    geometry: Geometry,
    pointers: RwLock<TablePointers>,
    /// Lock order: `free` may be held while taking `pointers` for reading, never the other
    /// way round.
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
    used: bool,
}

impl Drop for InodeReservation<'_> {
    fn drop(&mut self) {
        if !self.used {
            self.free.lock().release(self.ino);
        }
    }
}

impl InodeTable {
    /// Reads the table's pointers (the directory block and its indirect blocks: no chunk
    /// bitmap is read here) and refuses a table whose pointers are not valid.
    pub fn open(media: Arc<dyn Media>, geometry: Geometry) -> Result<Self> {
        let (pointers, fault) = TablePointers::read(media.as_ref(), &geometry)?;
        if let Some(fault) = fault {
            return Err(Error::corrupted(
                "inode table directory",
                0,
                fault.to_string(),
            ));
        }
        if pointers.chunks.is_empty() {
            return Err(Error::corrupted(
                "inode table directory",
                0,
                "no inode chunk",
            ));
        }
        let free = FreeIndex {
            free: vec![UNKNOWN; pointers.chunks.len()],
            ..FreeIndex::default()
        };
        Ok(Self {
            media,
            geometry,
            pointers: RwLock::new(pointers),
            free: Arc::new(Mutex::new(free)),
            grow_lock: OrderedMutex::new(Rank::InodeGrow, ()),
        })
    }

    fn chunk_block(&self, chunk: usize) -> Option<u64> {
        self.pointers.read().chunks.get(chunk).copied()
    }

    /// Reads chunk `chunk`'s bitmap and records its count of free slots, if not known yet.
    fn load(&self, f: &mut FreeIndex, chunk: usize) -> Result<()> {
        if f.free.get(chunk) != Some(&UNKNOWN) {
            return Ok(());
        }
        let block = self.chunk_block(chunk).ok_or(Error::NotFound)?;
        let mut count = 0u32;
        for w in 0..BITMAP_WORDS {
            let word = self
                .media
                .load_u64(blocks_to_bytes(block) + INODE_BITMAP_OFFSET + w * 8)?;
            count += (!word & usable_mask(chunk as u64, w)).count_ones();
        }
        // Held numbers whose bit is clear are not free (reserved or being freed).
        for &ino in &f.held {
            if ino / INODES_PER_CHUNK == chunk as u64 && !self.bit_on_media(ino)? {
                count = count.saturating_sub(1);
            }
        }
        f.free[chunk] = 0;
        f.add_free(chunk, count);
        Ok(())
    }

    /// Reads the bitmap of the next chunk whose count is unknown; false when every count is
    /// known.
    fn load_next(&self, f: &mut FreeIndex) -> Result<bool> {
        while f.cursor < f.free.len() && f.free[f.cursor] != UNKNOWN {
            f.cursor += 1;
        }
        if f.cursor == f.free.len() {
            return Ok(false);
        }
        let c = f.cursor;
        self.load(f, c)?;
        Ok(true)
    }

    fn load_all(&self, f: &mut FreeIndex) -> Result<()> {
        while self.load_next(f)? {}
        Ok(())
    }

    /// The inode's bit in its chunk's bitmap on the media.
    fn bit_on_media(&self, ino: u64) -> Result<bool> {
        let chunk = (ino / INODES_PER_CHUNK) as usize;
        let slot = ino % INODES_PER_CHUNK;
        let block = self.chunk_block(chunk).ok_or(Error::NotFound)?;
        let word = self.media.load_u64(bitmap_word_offset(block, slot))?;
        Ok(word & (1 << (slot % 64)) != 0)
    }

    /// Byte offset of inode `ino`, or an error for numbers that are not inode slots.
    pub fn offset(&self, ino: u64) -> Result<u64> {
        let chunk = ino / INODES_PER_CHUNK;
        let slot = ino % INODES_PER_CHUNK;
        if ino == 0 || slot >= USABLE_INODES_PER_CHUNK {
            return Err(Error::NotFound);
        }
        let block = self
            .chunk_block(usize::try_from(chunk).map_err(|_| Error::NotFound)?)
            .ok_or(Error::NotFound)?;
        Ok(blocks_to_bytes(block) + slot * INODE_SIZE)
    }

    /// True when the inode is in use or about to be: its bit is set on the media, or it is
    /// reserved, or a transaction that has not committed frees it.
    pub fn is_allocated(&self, ino: u64) -> bool {
        if ino % INODES_PER_CHUNK >= USABLE_INODES_PER_CHUNK {
            return false;
        }
        let free = self.free.lock();
        free.held.contains(&ino) || self.bit_on_media(ino).unwrap_or(false)
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
            if let Some(ino) = self.take_free()? {
                return Ok(InodeReservation {
                    free: &self.free,
                    ino,
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
        let ino = reserved.ino;
        let free = Arc::clone(&self.free);
        // The rollback clears the bit before the abort hooks run.
        tx.on_abort(move || free.lock().release(ino));
        let free = Arc::clone(&self.free);
        tx.on_commit(move || {
            free.lock().held.remove(&ino);
        });
        let block = self
            .chunk_block((ino / INODES_PER_CHUNK) as usize)
            .ok_or(Error::NotFound)?;
        tx.set_bits(
            blocks_to_bytes(block) + INODE_BITMAP_OFFSET,
            ino % INODES_PER_CHUNK,
            1,
        )?;
        let generation = self.next_generation(ino);
        Ok((ino, generation))
    }

    /// The lowest free inode number of the lowest chunk known to have one, reading the
    /// bitmap of the next unread chunk when no known chunk has one; `None` when every
    /// chunk is full. O(log chunks) plus one 1 KiB bitmap read.
    fn take_free(&self) -> Result<Option<u64>> {
        let mut f = self.free.lock();
        loop {
            let Some(&chunk) = f.with_free.first() else {
                if self.load_next(&mut f)? {
                    continue;
                }
                return Ok(None);
            };
            let block = self.chunk_block(chunk as usize).ok_or(Error::NotFound)?;
            for w in 0..BITMAP_WORDS {
                let word = self
                    .media
                    .load_u64(blocks_to_bytes(block) + INODE_BITMAP_OFFSET + w * 8)?;
                let mut candidates = !word & usable_mask(chunk, w);
                while candidates != 0 {
                    let bit = u64::from(candidates.trailing_zeros());
                    candidates &= candidates - 1;
                    let ino = chunk * INODES_PER_CHUNK + w * 64 + bit;
                    if f.held.insert(ino) {
                        f.take_one(chunk as usize);
                        return Ok(Some(ino));
                    }
                }
            }
            // The count said free slots, the bitmap has none: count it as full (a bitmap
            // changed behind the table's back is fsck's to repair).
            f.known_free -= u64::from(f.free[chunk as usize]);
            f.free[chunk as usize] = 0;
            f.with_free.remove(&chunk);
        }
    }

    /// Frees an inode number (its slot has been cleared by the caller in the same
    /// transaction). The number becomes reusable when the transaction commits.
    pub fn free(&self, tx: &mut Tx<'_>, ino: u64) -> Result<()> {
        let block = self
            .chunk_block((ino / INODES_PER_CHUNK) as usize)
            .ok_or(Error::NotFound)?;
        // Held before its bit clears, so no search sees it free before the commit.
        self.free.lock().held.insert(ino);
        let free = Arc::clone(&self.free);
        tx.on_abort(move || {
            free.lock().held.remove(&ino);
        });
        let free = Arc::clone(&self.free);
        tx.on_commit(move || free.lock().release(ino));
        tx.clear_bits(
            blocks_to_bytes(block) + INODE_BITMAP_OFFSET,
            ino % INODES_PER_CHUNK,
            1,
        )?;
        Ok(())
    }

    /// Adds a chunk to the table, in its own transaction: the chunk, zeroed, and its
    /// pointer; in the tree layout, when the chunk is the first of an indirect block, also
    /// a new indirect block and the directory entry naming it.
    fn grow(&self, journal: &Journal, alloc: &Arc<BlockAllocator>) -> Result<()> {
        let _g = self.grow_lock.lock();
        {
            let f = self.free.lock();
            if !f.with_free.is_empty() || f.free.contains(&UNKNOWN) {
                return Ok(()); // someone else grew it, or inodes were freed meanwhile
            }
        }
        let n = self.pointers.read().chunks.len() as u64;
        if n >= self.geometry.itable.max_chunks() {
            return Err(Error::NoInodes);
        }
        let mut tx = journal.begin();
        let no_space = |e| match e {
            crate::alloc::AllocError::NoSpace => Error::NoInodes,
            e => e.into(),
        };
        let request = AllocRequest {
            blocks: CHUNK_BLOCKS,
            min_blocks: CHUNK_BLOCKS,
            aligned: true,
            goal: None,
        };
        let range = alloc.allocate(&mut tx, request).map_err(no_space)?;
        if range.start % CHUNK_BLOCKS != 0 || range.len != CHUNK_BLOCKS {
            return Err(Error::NoInodes); // dropping tx gives the blocks back
        }
        let chunk_off = blocks_to_bytes(range.start);
        self.media.zero_nt(chunk_off, CHUNK_SIZE)?;
        tx.note_data_written();
        let mut new_indirect = None;
        let pointer = match self.geometry.itable {
            ItableLayout::Tree { fanout } if n % fanout == 0 => {
                let request = AllocRequest {
                    blocks: 1,
                    min_blocks: 1,
                    aligned: false,
                    goal: None,
                };
                let ind = alloc.allocate(&mut tx, request).map_err(no_space)?.start;
                let mut image = vec![0u8; BLOCK_SIZE as usize];
                image[..8].copy_from_slice(&range.start.to_le_bytes());
                tx.write_new(blocks_to_bytes(ind), &image)?;
                new_indirect = Some(ind);
                self.geometry.itable_dir_offset() + (n / fanout) * 8
            }
            _ => self
                .pointers
                .read()
                .pointer_offset(&self.geometry, n)
                .ok_or(Error::NoInodes)?,
        };
        let value = new_indirect.unwrap_or(range.start);
        tx.write(pointer, &value.to_le_bytes())?;
        tx.set_bits(
            chunk_off + INODE_BITMAP_OFFSET,
            USABLE_INODES_PER_CHUNK,
            INODE_BITMAP_SLOTS,
        )?;
        tx.commit()?;
        {
            let mut p = self.pointers.write();
            p.chunks.push(range.start);
            p.indirect.extend(new_indirect);
        }
        let mut f = self.free.lock();
        f.free.push(0);
        f.add_free(n as usize, USABLE_INODES_PER_CHUNK as u32);
        Ok(())
    }

    /// Inodes in use (for statfs): the usable slots that are not free, less inode number 0
    /// (never an inode). The slots every chunk keeps for its own bitmap are not inodes. The
    /// first call reads the bitmap of every chunk not read yet (1 KiB each).
    pub fn used(&self) -> Result<u64> {
        let mut f = self.free.lock();
        self.load_all(&mut f)?;
        Ok((f.free.len() as u64 * USABLE_INODES_PER_CHUNK)
            .saturating_sub(f.known_free)
            .saturating_sub(1))
    }

    /// True when the last chunk of the table could be given back now (cheap after the
    /// first call: for callers deciding whether to call [`InodeTable::shrink`]).
    pub fn shrinkable(&self) -> bool {
        let mut f = self.free.lock();
        self.shrink_candidate(&mut f).ok().flatten().is_some()
    }

    /// The last chunk, when it may go: every inode in it is free (none allocated, none
    /// reserved), it is not the first chunk, and the chunks before it keep at least half a
    /// chunk of free inodes (so creates and deletes around a chunk boundary do not grow
    /// and shrink the table in turn). Reads the last chunk's bitmap, and those of earlier
    /// chunks only until half a chunk of free inodes is found.
    fn shrink_candidate(&self, f: &mut FreeIndex) -> Result<Option<usize>> {
        let Some(last) = f.free.len().checked_sub(1).filter(|&l| l > 0) else {
            return Ok(None);
        };
        self.load(f, last)?;
        if u64::from(f.free[last]) != USABLE_INODES_PER_CHUNK {
            return Ok(None);
        }
        let enough =
            |f: &FreeIndex| f.known_free - USABLE_INODES_PER_CHUNK >= USABLE_INODES_PER_CHUNK / 2;
        while !enough(f) && self.load_next(f)? {}
        Ok(enough(f).then_some(last))
    }

    /// Gives back trailing chunks whose inodes are all free, each in its own transaction
    /// (which may use the allocator's reserve: it gives space back), with the indirect
    /// block that held only that chunk. Takes the growth lock, so call it with no journal
    /// slot held.
    pub fn shrink(&self, journal: &Journal, alloc: &Arc<BlockAllocator>) -> Result<()> {
        let _g = self.grow_lock.lock();
        loop {
            let last = {
                let mut f = self.free.lock();
                let Some(last) = self.shrink_candidate(&mut f)? else {
                    return Ok(());
                };
                // Out of the index first: nobody may reserve an inode in it from now on.
                f.free[last] = 0;
                f.known_free -= USABLE_INODES_PER_CHUNK;
                f.with_free.remove(&(last as u64));
                last
            };
            let (block, pointer, emptied_indirect) = {
                let p = self.pointers.read();
                let k = last as u64;
                let pointer = p.pointer_offset(&self.geometry, k).ok_or(Error::NotFound)?;
                let emptied = match self.geometry.itable {
                    ItableLayout::Tree { fanout } if k % fanout == 0 => p
                        .indirect
                        .get((k / fanout) as usize)
                        .map(|&b| (k / fanout, b)),
                    _ => None,
                };
                (p.chunks[last], pointer, emptied)
            };
            let mut tx = journal.begin();
            tx.allow_reserve();
            let free = Arc::clone(&self.free);
            tx.on_abort(move || {
                let mut f = free.lock();
                f.add_free(last, USABLE_INODES_PER_CHUNK as u32);
            });
            // The table ends at its first zero pointer.
            tx.write(pointer, &0u64.to_le_bytes())?;
            alloc.free(
                &mut tx,
                BlockRange {
                    start: block,
                    len: CHUNK_BLOCKS,
                },
            )?;
            if let Some((dir_entry, ind)) = emptied_indirect {
                tx.write(
                    self.geometry.itable_dir_offset() + dir_entry * 8,
                    &0u64.to_le_bytes(),
                )?;
                alloc.free(&mut tx, BlockRange { start: ind, len: 1 })?;
            }
            tx.commit()?;
            {
                let mut p = self.pointers.write();
                p.chunks.truncate(last);
                if emptied_indirect.is_some() {
                    p.indirect.pop();
                }
            }
            let mut f = self.free.lock();
            f.free.truncate(last);
            f.cursor = f.cursor.min(last);
        }
    }

    /// Inodes the table holds now plus what the free space could still hold, capped by
    /// what the layout addresses (a chunk per 512 free blocks, less the indirect blocks
    /// those chunks would need).
    pub fn capacity(&self, free_blocks: u64) -> u64 {
        let n = self.pointers.read().chunks.len() as u64;
        let room = self.geometry.itable.max_chunks().saturating_sub(n);
        let indirect = match self.geometry.itable {
            ItableLayout::Tree { fanout } => (free_blocks / CHUNK_BLOCKS).div_ceil(fanout),
            ItableLayout::Flat => 0,
        };
        let growable = room.min(free_blocks.saturating_sub(indirect) / CHUNK_BLOCKS);
        (n + growable) * USABLE_INODES_PER_CHUNK
    }

    /// Every inode number whose bit is set on the media (for the repair, which runs on an
    /// unmounted device).
    pub fn allocated(&self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        for chunk in 0..self.chunk_count() {
            self.allocated_in_chunk(chunk, &mut out)?;
        }
        Ok(out)
    }

    /// Chunks in the table.
    pub fn chunk_count(&self) -> usize {
        self.pointers.read().chunks.len()
    }

    /// Appends to `out` the inode numbers of chunk `chunk` whose bit is set on the media, in
    /// increasing order (the consistency checker walks the table a chunk at a time, so it
    /// never holds the list of every inode).
    pub fn allocated_in_chunk(&self, chunk: usize, out: &mut Vec<u64>) -> Result<()> {
        let block = self.chunk_block(chunk).ok_or(Error::NotFound)?;
        let mut raw = [0u8; (BITMAP_WORDS * 8) as usize];
        self.media
            .read(blocks_to_bytes(block) + INODE_BITMAP_OFFSET, &mut raw)?;
        for (w, bytes) in raw.chunks_exact(8).enumerate() {
            let mut bits = u64::from_le_bytes(bytes.try_into().unwrap_or_default());
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let slot = w as u64 * 64 + b;
                let ino = chunk as u64 * INODES_PER_CHUNK + slot;
                if slot < USABLE_INODES_PER_CHUNK && ino >= crate::format::ROOT_INO {
                    out.push(ino);
                }
            }
        }
        Ok(())
    }

    /// Blocks of each inode-table chunk (for the consistency checker).
    pub fn chunk_blocks(&self) -> Vec<u64> {
        self.pointers.read().chunks.clone()
    }

    /// The indirect blocks of the table, one block each (for the consistency checker).
    pub fn indirect_blocks(&self) -> Vec<u64> {
        self.pointers.read().indirect.clone()
    }

    /// Test hook: counts every chunk as full in memory (the media is unchanged), so the next
    /// reservation grows the table as it would once every chunk had filled, without
    /// creating 8188 inodes per chunk first.
    #[cfg(test)]
    pub(crate) fn count_chunks_full_for_test(&self) {
        let mut f = self.free.lock();
        let n = f.free.len();
        f.free = vec![0; n];
        f.cursor = n;
        f.with_free.clear();
        f.known_free = 0;
    }
}
