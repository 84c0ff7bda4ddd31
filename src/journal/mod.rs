//! Undo-logged metadata transactions.
//!
//! [`Tx`] is the only way to change metadata. Before a transaction stores into a byte range
//! for the first time, it appends the range's old contents to its journal slot as an undo
//! record and makes the record durable; only then does the new value go in place. Bitmaps are
//! changed with logical records ("these bits were set", "these bits were cleared") and atomic
//! read-modify-write of their words, so transactions that share a bitmap word commute.
//!
//! Commit: flush every range the transaction stored into, fence, store the slot's generation
//! plus one (an 8-byte store: the commit point), flush, fence. A crash before the commit point
//! leaves an odd generation in the slot, and recovery (at open) rolls the records back in
//! reverse order. Recovery is idempotent, so a crash during recovery is harmless.
//!
//! The isolation rule that makes byte-range undo safe under concurrency: a range a
//! transaction has logged stays its own until it commits. The layers above hold the lock of
//! every object they change (inode, directory, the state record) from before the first store
//! until after `commit` returns; bits are owned by whoever allocated or is freeing them.
//!
//! Slots are per transaction, not per thread: `Journal::begin` takes a free slot (waiting if
//! all are busy), so threads never serialise on one log. A slot is a lock, the last in the
//! global order ([`crate::lockorder`]): a thread holding one never waits for another.
//!
//! Fail-stop: when a commit or a rollback fails (the device refused a store or a flush), the
//! slot is in an unknown state. The journal is then *poisoned*: that slot is never used
//! again, neither hook of the failed transaction runs (blocks it allocated stay allocated in
//! memory, blocks it freed stay unusable: at worst a leak that the next mount's recovery or
//! fsck settles, never a block handed out twice), and every later transaction fails with
//! [`JournalError::Poisoned`] at its first store. The file system above turns that into a
//! read-only mount; the next mount's recovery rolls back whatever the slot still holds.

use crate::device::{DeviceError, Media};
use crate::format::bitmap::{byte_span as bit_span, try_for_each_media_word as for_each_word};
use crate::format::{
    FormatError, Geometry, SLOT_MAGIC, STATE_OFFSET, SlotHeader, UndoHeader, UndoKind,
};
use crate::lockorder::{Rank, Ranked};
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Offset of the generation word inside a slot.
const GENERATION_OFFSET: u64 = std::mem::offset_of!(SlotHeader, generation) as u64;
/// Offset of the first record inside a slot.
const RECORDS_OFFSET: u64 = size_of::<SlotHeader>() as u64;
const RECORD_HEADER: u64 = size_of::<UndoHeader>() as u64;

/// Errors of the journal layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The transaction's undo records do not fit its slot. The transaction is rolled back.
    #[error("transaction too large for a journal slot")]
    TooLarge,
    /// An earlier commit or rollback failed: the journal accepts no more transactions
    /// until the file system is mounted again.
    #[error("the journal stopped after a failed commit or rollback (remount to recover)")]
    Poisoned,
    /// The file system was shut down on request (FS_IOC_SHUTDOWN): nothing changes any
    /// more until it is mounted again.
    #[error("the file system was shut down")]
    ShutDown,
}

/// What recovery found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Slots that held an uncommitted transaction.
    pub rolled_back: usize,
    /// Undo records applied.
    pub records_undone: usize,
}

#[derive(Debug)]
struct Slot {
    index: u32,
    offset: u64,
    /// The generation stored in the slot header (even: idle).
    generation: u64,
}

/// The journal: a set of slots, each holding at most one open transaction.
#[derive(Debug)]
pub struct Journal {
    media: Arc<dyn Media>,
    geometry: Geometry,
    free: Mutex<Vec<Slot>>,
    available: Condvar,
    /// Set once a commit or rollback failed (see the module docs); never cleared.
    poisoned: AtomicBool,
    /// Set by [`Journal::shut_down`]: the stop was asked for, not caused by a failure.
    shut_down: AtomicBool,
}

impl Journal {
    /// Opens the journal, rolling back every transaction a crash left open.
    pub fn open(
        media: Arc<dyn Media>,
        geometry: Geometry,
    ) -> Result<(Self, RecoveryReport), JournalError> {
        let report = recover(media.as_ref(), &geometry)?;
        let mut free = Vec::with_capacity(geometry.journal_slots as usize);
        for i in (0..geometry.journal_slots).rev() {
            let offset = geometry.slot_offset(i);
            let header = read_slot_header(media.as_ref(), &geometry, i)?;
            free.push(Slot {
                index: i,
                offset,
                generation: header.generation,
            });
        }
        Ok((
            Self {
                media,
                geometry,
                free: Mutex::new(free),
                available: Condvar::new(),
                poisoned: AtomicBool::new(false),
                shut_down: AtomicBool::new(false),
            },
            report,
        ))
    }

    pub fn media(&self) -> &Arc<dyn Media> {
        &self.media
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Starts a transaction. Nothing is written until its first store. Waits while every
    /// slot is busy, so the caller must hold no slot (checked in debug builds). On a
    /// poisoned journal it returns at once a transaction whose every store fails.
    pub fn begin(&self) -> Tx<'_> {
        self.begin_ranked(Ranked::acquire(Rank::Slot))
    }

    /// As [`Journal::begin`], for tests of the journal itself that interleave two
    /// transactions on one thread on purpose: the slot is not recorded in the lock order.
    /// It waits like `begin` when no slot is free, so never call it with every slot taken.
    #[doc(hidden)]
    pub fn begin_interleaved_for_test(&self) -> Tx<'_> {
        self.begin_ranked(Ranked::untracked())
    }

    fn begin_ranked(&self, rank: Ranked) -> Tx<'_> {
        let mut free = self.free.lock();
        let slot = loop {
            if self.is_poisoned() {
                break None;
            }
            if let Some(s) = free.pop() {
                break Some(s);
            }
            self.available.wait(&mut free);
        };
        drop(free);
        Tx {
            journal: self,
            _rank: rank,
            slot,
            cursor: RECORDS_OFFSET,
            open: false,
            logged: Vec::new(),
            dirty: Vec::new(),
            data_written: false,
            on_commit: Vec::new(),
            on_abort: Vec::new(),
            may_use_reserve: false,
        }
    }

    fn release(&self, slot: Slot) {
        self.free.lock().push(slot);
        self.available.notify_one();
    }

    /// True once a commit or rollback has failed.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Stops the journal for good (the slot that failed is not given back).
    fn poison(&self, slot: Option<&Slot>, what: &str, e: &JournalError) {
        if !self.poisoned.swap(true, Ordering::AcqRel) {
            log::error!(
                "journal: {what} of the transaction in slot {} failed ({e}); \
                 no more changes are accepted: unmount, then mount again (recovery finishes \
                 the rollback) or run fsck.pmfs",
                slot.map_or(u32::MAX, |s| s.index)
            );
        }
        // Wake every waiter: they must see the poison instead of waiting for this slot.
        let _free = self.free.lock();
        self.available.notify_all();
    }

    /// Stops the journal on request (FS_IOC_SHUTDOWN): every later store fails with
    /// [`JournalError::ShutDown`]. A transaction in flight fails at its next store and rolls
    /// back (or commits, if it was committing); what committed stays committed.
    pub fn shut_down(&self) {
        self.shut_down.store(true, Ordering::Release);
        if !self.poisoned.swap(true, Ordering::AcqRel) {
            log::warn!("journal: shut down on request; no more changes until the next mount");
        }
        let _free = self.free.lock();
        self.available.notify_all();
    }

    /// True once [`Journal::shut_down`] was called.
    pub fn is_shut_down(&self) -> bool {
        self.shut_down.load(Ordering::Acquire)
    }

    /// The error a stopped journal gives.
    fn stopped(&self) -> JournalError {
        if self.is_shut_down() {
            JournalError::ShutDown
        } else {
            JournalError::Poisoned
        }
    }

    /// Test hook: poisons the journal as a failed commit would.
    #[doc(hidden)]
    pub fn poison_for_test(&self) {
        self.poison(None, "a test", &JournalError::Poisoned);
    }
}

type Hook<'j> = Box<dyn FnOnce() + Send + 'j>;

/// A metadata transaction: all of its stores survive a crash, or none does.
///
/// Dropping a `Tx` without calling [`Tx::commit`] rolls it back.
pub struct Tx<'j> {
    journal: &'j Journal,
    /// This thread holds a slot (dropped after the slot is released or leaked).
    _rank: Ranked,
    /// `None` on a poisoned journal, and after commit or a failed commit.
    slot: Option<Slot>,
    /// Offset of the next record inside the slot.
    cursor: u64,
    /// The slot's generation is odd on the media (a record has been written).
    open: bool,
    /// Byte ranges already undo-logged in this transaction.
    logged: Vec<(u64, u64)>,
    /// Byte ranges stored into, to flush at commit.
    dirty: Vec<(u64, u64)>,
    /// File data was written outside the journal and must be fenced by commit.
    data_written: bool,
    on_commit: Vec<Hook<'j>>,
    on_abort: Vec<Hook<'j>>,
    /// Allocations in this transaction may use the blocks held in reserve (it exists to
    /// give space back).
    may_use_reserve: bool,
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("slot", &self.slot.as_ref().map(|s| s.index))
            .field("cursor", &self.cursor)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl<'j> Tx<'j> {
    pub fn media(&self) -> &'j Arc<dyn Media> {
        &self.journal.media
    }

    /// Stores `data` at `offset`, undo-logging the old contents first.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), JournalError> {
        self.log_bytes(offset, data.len() as u64)?;
        self.journal.media.write(offset, data)?;
        self.dirty.push((offset, data.len() as u64));
        Ok(())
    }

    /// Stores `data` at `offset`, undo-logging the whole `span` bytes from `offset` first
    /// (once per transaction). For objects rewritten several times in one transaction with
    /// a growing length (B+tree nodes): logging the whole object the first time lets every
    /// later rewrite skip its undo record.
    pub fn write_within(
        &mut self,
        offset: u64,
        data: &[u8],
        span: u64,
    ) -> Result<(), JournalError> {
        self.log_bytes(offset, span.max(data.len() as u64))?;
        self.journal.media.write(offset, data)?;
        self.dirty.push((offset, data.len() as u64));
        Ok(())
    }

    /// Stores `data` at `offset` without an undo record. Only for blocks this transaction
    /// allocated: if it rolls back they return to the free pool, so their old contents do not
    /// matter. The range is still flushed at commit.
    pub fn write_new(&mut self, offset: u64, data: &[u8]) -> Result<(), JournalError> {
        self.journal.media.write(offset, data)?;
        self.dirty.push((offset, data.len() as u64));
        Ok(())
    }

    /// Stores the bytes of a format structure at `offset`.
    pub fn write_struct<T: IntoBytes + Immutable>(
        &mut self,
        offset: u64,
        value: &T,
    ) -> Result<(), JournalError> {
        self.write(offset, value.as_bytes())
    }

    /// Zeroes `len` bytes at `offset`, undo-logged.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), JournalError> {
        let zeros = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
        self.write(offset, &zeros)
    }

    /// Sets bits `first..first + count` of the bitmap at byte offset `base`. The caller owns
    /// those bits (they were clear, and nobody else may change them until this commits).
    pub fn set_bits(&mut self, base: u64, first: u64, count: u64) -> Result<(), JournalError> {
        self.bit_record(UndoKind::SetBits, base, first, count)?;
        for_each_word(base, first, count, |word, mask| {
            self.journal.media.fetch_or_u64(word, mask).map(drop)
        })?;
        Ok(())
    }

    /// Clears bits `first..first + count` of the bitmap at byte offset `base`.
    pub fn clear_bits(&mut self, base: u64, first: u64, count: u64) -> Result<(), JournalError> {
        self.bit_record(UndoKind::ClearBits, base, first, count)?;
        for_each_word(base, first, count, |word, mask| {
            self.journal.media.fetch_and_u64(word, !mask).map(drop)
        })?;
        Ok(())
    }

    /// Records that file data was written with `write_nt` (or written and flushed) outside
    /// the journal: commit's fence makes it durable before the metadata that exposes it.
    pub fn note_data_written(&mut self) {
        self.data_written = true;
    }

    /// Runs `f` after the transaction has committed (e.g. returning freed blocks to the
    /// allocator: they must not be reused before the free is durable).
    pub fn on_commit(&mut self, f: impl FnOnce() + Send + 'j) {
        self.on_commit.push(Box::new(f));
    }

    /// Runs `f` if the transaction is rolled back (e.g. returning blocks it allocated).
    pub fn on_abort(&mut self, f: impl FnOnce() + Send + 'j) {
        self.on_abort.push(Box::new(f));
    }

    /// Marks the transaction as one that gives space back: the allocator lets it use the
    /// blocks it holds in reserve (for the tree nodes an unlink or a truncate may need).
    pub fn allow_reserve(&mut self) {
        self.may_use_reserve = true;
    }

    /// True when [`Tx::allow_reserve`] was called.
    pub fn may_use_reserve(&self) -> bool {
        self.may_use_reserve
    }

    /// Bytes left in the transaction's journal slot for undo records (0 on a poisoned
    /// journal). Loops that change an unbounded number of objects commit and begin again
    /// before this runs low.
    pub fn remaining(&self) -> u64 {
        if self.slot.is_none() {
            return 0;
        }
        self.journal
            .geometry
            .slot_size()
            .saturating_sub(self.cursor)
    }

    /// True when the transaction has stored nothing yet.
    pub fn is_empty(&self) -> bool {
        !self.open
    }

    /// Makes the transaction durable. On error the transaction is rolled back; an error of
    /// the device itself (a failed flush or store, not a full slot) also poisons the
    /// journal, because the commit point may or may not be durable.
    pub fn commit(mut self) -> Result<(), JournalError> {
        if self.slot.is_none() {
            self.on_abort.clear();
            self.on_commit.clear();
            return Err(self.journal.stopped());
        }
        match self.commit_inner() {
            Ok(()) => {
                if let Some(slot) = self.slot.take() {
                    self.journal.release(slot);
                }
                for f in std::mem::take(&mut self.on_commit) {
                    f();
                }
                self.on_abort.clear();
                Ok(())
            }
            Err(e) => {
                // Roll back what can be rolled back, then stop: the slot is never reused
                // and neither hook runs (see the module docs).
                let rolled_back = self.rollback();
                if let Err(re) = &rolled_back {
                    log::error!("journal: rollback after a failed commit failed too: {re}");
                }
                self.journal.poison(self.slot.as_ref(), "commit", &e);
                self.slot = None;
                self.on_abort.clear();
                self.on_commit.clear();
                Err(e)
            }
        }
    }

    fn commit_inner(&mut self) -> Result<(), JournalError> {
        let media = &self.journal.media;
        if !self.open {
            if self.data_written {
                media.fence();
            }
            return Ok(());
        }
        // Flush each dirty byte once: objects rewritten in one transaction appear many times.
        self.dirty.sort_unstable();
        let mut run: Option<(u64, u64)> = None;
        for &(off, len) in &self.dirty {
            match run {
                Some((s, e)) if off <= e => run = Some((s, e.max(off + len))),
                Some((s, e)) => {
                    media.flush(s, e - s)?;
                    run = Some((off, off + len));
                }
                None => run = Some((off, off + len)),
            }
        }
        if let Some((s, e)) = run {
            media.flush(s, e - s)?;
        }
        media.fence();
        let slot = self
            .slot
            .as_mut()
            .ok_or_else(|| FormatError::corrupted("journal", "transaction without a slot"))?;
        slot.generation = close_slot(media.as_ref(), slot.offset, slot.generation)?;
        self.open = false;
        Ok(())
    }

    /// Makes sure the slot is open (odd generation) before the first record.
    fn ensure_open(&mut self) -> Result<&mut Slot, JournalError> {
        let media = &self.journal.media;
        let journal = self.journal;
        let slot = self.slot.as_mut().ok_or_else(|| journal.stopped())?;
        if !self.open {
            let opened = slot.generation.checked_add(1).ok_or_else(|| {
                FormatError::corrupted("journal", "slot generation at its maximum")
            })?;
            // No fence here: the first record's fence makes this store durable before any
            // in-place store of the transaction.
            media.store_u64(slot.offset + GENERATION_OFFSET, opened)?;
            slot.generation = opened;
            // Open from here on: if the flush fails, the rollback closes the slot again (or
            // fails too and poisons the journal); the slot never goes back half-open.
            self.open = true;
            media.flush(slot.offset + GENERATION_OFFSET, 8)?;
        }
        Ok(slot)
    }

    fn log_bytes(&mut self, offset: u64, len: u64) -> Result<(), JournalError> {
        if len == 0
            || self
                .logged
                .iter()
                .any(|&(o, l)| o <= offset && offset + len <= o + l)
        {
            return Ok(());
        }
        let mut old = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
        self.journal.media.read(offset, &mut old)?;
        self.append(UndoKind::Bytes, offset, 0, len, &old)?;
        self.logged.push((offset, len));
        Ok(())
    }

    fn bit_record(
        &mut self,
        kind: UndoKind,
        base: u64,
        first: u64,
        count: u64,
    ) -> Result<(), JournalError> {
        if count == 0 {
            return Ok(());
        }
        self.append(kind, base, first, count, &[])?;
        let (start, bytes) = bit_span(base, first, count);
        self.dirty.push((start, bytes));
        Ok(())
    }

    /// Appends one record and makes it durable.
    fn append(
        &mut self,
        kind: UndoKind,
        target: u64,
        first: u64,
        len: u64,
        payload: &[u8],
    ) -> Result<(), JournalError> {
        let slot_size = self.journal.geometry.slot_size();
        let total = (RECORD_HEADER + payload.len() as u64).next_multiple_of(8);
        let len32 = u32::try_from(len).map_err(|_| JournalError::TooLarge)?;
        if self.cursor + total > slot_size {
            return Err(JournalError::TooLarge);
        }
        let cursor = self.cursor;
        let slot = self.ensure_open()?;
        let (generation, slot_offset) = (slot.generation, slot.offset);
        let mut header = UndoHeader {
            generation,
            target,
            first,
            len: len32,
            kind: kind as u16,
            pad: 0,
            crc: 0,
            pad2: 0,
        };
        header.crc = record_crc(&header, payload);
        let mut buf = Vec::with_capacity(total as usize);
        buf.extend_from_slice(header.as_bytes());
        buf.extend_from_slice(payload);
        buf.resize(total as usize, 0);
        let media = &self.journal.media;
        let at = slot_offset + cursor;
        media.write(at, &buf)?;
        media.flush(at, total)?;
        media.fence();
        self.cursor += total;
        Ok(())
    }

    fn rollback(&mut self) -> Result<(), JournalError> {
        let Some(slot) = self.slot.as_mut() else {
            return Ok(());
        };
        if self.open {
            let media = self.journal.media.as_ref();
            let records =
                scan_records(media, &self.journal.geometry, slot.offset, slot.generation)?;
            undo_records(media, &records)?;
            slot.generation = close_slot(media, slot.offset, slot.generation)?;
            self.open = false;
        }
        Ok(())
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.slot.is_none() {
            return;
        }
        if let Err(e) = self.rollback() {
            // The media refused the undo (it was validated when logged, so this means the
            // device itself failed). The slot stays open on the media, where the next
            // mount's recovery finishes the rollback; in memory it is never reused, and the
            // abort hooks do not run: what they would give back may still be in use.
            self.journal.poison(self.slot.as_ref(), "rollback", &e);
            self.slot = None;
            self.on_abort.clear();
            return;
        }
        if let Some(slot) = self.slot.take() {
            self.journal.release(slot);
        }
        for f in std::mem::take(&mut self.on_abort) {
            f();
        }
    }
}

/// Checksum of an undo record: the low 32 bits of XXH3-64 over the header (checksum field
/// zeroed) and the payload.
///
/// Not CRC32C, on purpose: CRC32C is linear, and a payload that embeds a sealed structure
/// (an inode: 252 bytes followed by their CRC32C) adds the same constant to any CRC32C taken
/// over it, whatever the inode says. A torn record holding an older, equally valid inode
/// image then passed the check and recovery restored the wrong inode (found by the
/// power-failure tests, tests/crash_power.rs).
pub fn record_crc(header: &UndoHeader, payload: &[u8]) -> u32 {
    let mut h = *header;
    h.crc = 0;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(h.as_bytes());
    hasher.update(payload);
    hasher.digest() as u32
}

/// A validated undo record.
#[derive(Debug)]
struct Record {
    kind: UndoKind,
    target: u64,
    first: u64,
    len: u64,
    payload: Vec<u8>,
}

fn read_slot_header(
    media: &dyn Media,
    geometry: &Geometry,
    index: u32,
) -> Result<SlotHeader, JournalError> {
    let mut buf = [0u8; size_of::<SlotHeader>()];
    media.read(geometry.slot_offset(index), &mut buf)?;
    let header = SlotHeader::read_from_bytes(&buf)
        .map_err(|_| FormatError::corrupted("journal slot", "short header"))?;
    if header.magic != SLOT_MAGIC || header.slot_index != index {
        return Err(FormatError::corrupted(
            "journal slot",
            format!("slot {index}: bad magic or index"),
        )
        .into());
    }
    Ok(header)
}

/// True when an undo target lies where transactions may store: the state record, or the
/// bitmap and everything after it.
fn target_allowed(geometry: &Geometry, target: u64, len: u64) -> bool {
    let Some(end) = target.checked_add(len) else {
        return false;
    };
    let state = STATE_OFFSET..STATE_OFFSET + size_of::<crate::format::FsState>() as u64;
    (state.contains(&target) && end <= state.end)
        || (target >= geometry.bitmap_offset() && end <= geometry.size_bytes())
}

/// Reads the valid records of an open slot, in the order they were written.
fn scan_records(
    media: &dyn Media,
    geometry: &Geometry,
    slot_offset: u64,
    generation: u64,
) -> Result<Vec<Record>, JournalError> {
    let (records, damage) = scan_records_lenient(media, geometry, slot_offset, generation)?;
    match damage {
        Some(d) => Err(FormatError::corrupted("journal record", d).into()),
        None => Ok(records),
    }
}

/// As [`scan_records`], but a record that is valid yet points outside what the journal
/// covers ends the scan instead of failing it: returns the records before it and what was
/// wrong (fsck rolls back what it can).
fn scan_records_lenient(
    media: &dyn Media,
    geometry: &Geometry,
    slot_offset: u64,
    generation: u64,
) -> Result<(Vec<Record>, Option<String>), JournalError> {
    let slot_size = geometry.slot_size();
    let mut cursor = RECORDS_OFFSET;
    let mut out = Vec::new();
    while cursor + RECORD_HEADER <= slot_size {
        let mut hb = [0u8; size_of::<UndoHeader>()];
        media.read(slot_offset + cursor, &mut hb)?;
        let Ok(h) = UndoHeader::read_from_bytes(&hb) else {
            break;
        };
        if h.generation != generation {
            break;
        }
        let Some(kind) = UndoKind::from_u16(h.kind) else {
            break;
        };
        let payload_len = if kind == UndoKind::Bytes {
            u64::from(h.len)
        } else {
            0
        };
        let total = (RECORD_HEADER + payload_len).next_multiple_of(8);
        if cursor + total > slot_size {
            break;
        }
        let mut payload = vec![0u8; payload_len as usize];
        media.read(slot_offset + cursor + RECORD_HEADER, &mut payload)?;
        if record_crc(&h, &payload) != h.crc {
            // A torn record: it was being written when the crash came, so its in-place store
            // never happened. Everything before it is valid.
            break;
        }
        let span = match kind {
            UndoKind::Bytes => (h.target, u64::from(h.len)),
            _ if h.len == 0 || h.first.checked_add(u64::from(h.len)).is_none() => {
                return Ok((out, Some("a bit record with an empty range".into())));
            }
            _ => bit_span(h.target, h.first, u64::from(h.len)),
        };
        if h.target % 8 != 0 && kind != UndoKind::Bytes || !target_allowed(geometry, span.0, span.1)
        {
            return Ok((
                out,
                Some(format!(
                    "a record targets {:#x}+{}, outside the metadata the journal covers",
                    span.0, span.1
                )),
            ));
        }
        out.push(Record {
            kind,
            target: h.target,
            first: h.first,
            len: u64::from(h.len),
            payload,
        });
        cursor += total;
    }
    Ok((out, None))
}

/// Applies undo records in reverse order and flushes what they touched (no fence).
fn undo_records(media: &dyn Media, records: &[Record]) -> Result<(), JournalError> {
    for r in records.iter().rev() {
        match r.kind {
            UndoKind::Bytes => {
                media.write(r.target, &r.payload)?;
                media.flush(r.target, r.len)?;
            }
            UndoKind::SetBits => {
                for_each_word(r.target, r.first, r.len, |w, m| {
                    media.fetch_and_u64(w, !m).map(drop)
                })?;
            }
            UndoKind::ClearBits => {
                for_each_word(r.target, r.first, r.len, |w, m| {
                    media.fetch_or_u64(w, m).map(drop)
                })?;
            }
        }
        if r.kind != UndoKind::Bytes {
            let (s, l) = bit_span(r.target, r.first, r.len);
            media.flush(s, l)?;
        }
    }
    media.fence();
    Ok(())
}

/// Stores the slot's next (even) generation, the commit or rollback point, and makes it
/// durable; returns it.
fn close_slot(media: &dyn Media, slot_offset: u64, generation: u64) -> Result<u64, JournalError> {
    let next = generation + 1;
    media.store_u64(slot_offset + GENERATION_OFFSET, next)?;
    media.flush(slot_offset + GENERATION_OFFSET, 8)?;
    media.fence();
    Ok(next)
}

/// Rolls back every open transaction. Idempotent: a crash in the middle is repaired by
/// running it again.
pub fn recover(media: &dyn Media, geometry: &Geometry) -> Result<RecoveryReport, JournalError> {
    let mut report = RecoveryReport::default();
    for i in 0..geometry.journal_slots {
        let header = read_slot_header(media, geometry, i)?;
        if header.generation % 2 == 0 {
            continue;
        }
        let offset = geometry.slot_offset(i);
        let records = scan_records(media, geometry, offset, header.generation)?;
        undo_records(media, &records)?;
        close_slot(media, offset, header.generation)?;
        report.rolled_back += 1;
        report.records_undone += records.len();
    }
    Ok(report)
}

/// Writes empty slot headers (generation 0) and zeroes every slot: the journal of a fresh
/// file system (a stale record of an earlier file system must never match a generation a
/// new transaction will use). Flushed, not fenced (the caller fences once for everything).
pub fn format_slots(media: &dyn Media, geometry: &Geometry) -> Result<(), JournalError> {
    for i in 0..geometry.journal_slots {
        let offset = geometry.slot_offset(i);
        let mut block = vec![0u8; geometry.slot_size() as usize];
        let header = SlotHeader {
            magic: SLOT_MAGIC,
            generation: 0,
            slot_index: i,
            pad: 0,
            reserved: [0; 40],
        };
        block[..size_of::<SlotHeader>()].copy_from_slice(header.as_bytes());
        media.write(offset, &block)?;
        media.flush(offset, block.len() as u64)?;
    }
    Ok(())
}

/// What an open slot holds: its valid undo records, and why the scan stopped early if a
/// record was damaged (for fsck).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenSlot {
    pub slot: u32,
    pub records: usize,
    pub damage: Option<String>,
}

/// The open transaction of slot `index`, if any: its generation, slot offset, and the
/// lenient scan of its records.
type OpenRecords = (u64, u64, Vec<Record>, Option<String>);

fn open_records(
    media: &dyn Media,
    geometry: &Geometry,
    index: u32,
) -> Result<Option<OpenRecords>, JournalError> {
    let header = read_slot_header(media, geometry, index)?;
    if header.generation % 2 == 0 {
        return Ok(None);
    }
    let offset = geometry.slot_offset(index);
    let (records, damage) = scan_records_lenient(media, geometry, offset, header.generation)?;
    Ok(Some((header.generation, offset, records, damage)))
}

/// Scans slot `index` without changing anything; `None` when it holds no open transaction.
pub fn inspect_slot(
    media: &dyn Media,
    geometry: &Geometry,
    index: u32,
) -> Result<Option<OpenSlot>, JournalError> {
    Ok(
        open_records(media, geometry, index)?.map(|(_, _, records, damage)| OpenSlot {
            slot: index,
            records: records.len(),
            damage,
        }),
    )
}

/// Rolls back the open transaction of slot `index` as far as its records are valid (the
/// records before a damaged one), then closes the slot: fsck's repair of a journal that
/// recovery refuses.
pub fn rollback_slot_lenient(
    media: &dyn Media,
    geometry: &Geometry,
    index: u32,
) -> Result<Option<OpenSlot>, JournalError> {
    let Some((generation, offset, records, damage)) = open_records(media, geometry, index)? else {
        return Ok(None);
    };
    undo_records(media, &records)?;
    close_slot(media, offset, generation)?;
    Ok(Some(OpenSlot {
        slot: index,
        records: records.len(),
        damage,
    }))
}

/// Open transactions a crash left behind, without changing anything (for `fsck -n`):
/// (slot, number of valid records).
pub fn pending(media: &dyn Media, geometry: &Geometry) -> Result<Vec<(u32, usize)>, JournalError> {
    let mut out = Vec::new();
    for i in 0..geometry.journal_slots {
        let header = read_slot_header(media, geometry, i)?;
        if header.generation % 2 == 1 {
            let n =
                scan_records(media, geometry, geometry.slot_offset(i), header.generation)?.len();
            out.push((i, n));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
