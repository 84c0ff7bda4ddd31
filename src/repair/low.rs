//! Low-level repairs that must come before a full check can run: the superblocks, the state
//! record, the journal and the inode-table directory. None of them can go through a journal
//! transaction (the journal itself may be what is broken, and superblocks are outside what
//! it covers), so each is a single store made durable with flush + fence, ordered so that a
//! crash in the middle leaves something the next run repairs the same way.

use super::{Class, Finding};
use crate::check::{Problem, ProblemKind};
use crate::device::Media;
use crate::error::{Error, Result};
use crate::format::{
    BACKUP_SUPERBLOCK_OFFSET, BLOCK_SIZE, FormatError, FsState, Geometry, INODE_SIZE, Inode,
    ItableLayout, ROOT_INO, SLOT_MAGIC, STATE_MAGIC, STATE_OFFSET, SUPERBLOCK_OFFSET, SlotHeader,
    Superblock, blocks_to_bytes,
};
use crate::meta::inode::{PointerAt, TablePointers};
use crate::meta::{read_backup_superblock, read_state, read_superblock};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

const SB_LEN: usize = size_of::<Superblock>();
const SLOT_HEADER: u64 = size_of::<SlotHeader>() as u64;

fn finding(out: &mut Vec<Finding>, kind: ProblemKind, class: Class, message: String, fixed: bool) {
    out.push(Finding {
        problem: Problem { kind, message },
        class,
        fixed,
    });
}

fn persist(media: &dyn Media, offset: u64, data: &[u8]) -> Result<()> {
    media.write(offset, data)?;
    media.flush(offset, data.len() as u64)?;
    media.fence();
    Ok(())
}

/// Checks (and where `allow` says so, repairs) everything a full check needs. Returns the
/// geometry, or an error when the device holds no usable pmfs at all. `Ok(None)` means a
/// problem that was not allowed to be repaired stops the check from going further.
pub(super) fn run(
    media: &dyn Media,
    allow: &dyn Fn(Class) -> bool,
    out: &mut Vec<Finding>,
) -> Result<Option<Geometry>> {
    let g = superblocks(media, allow, out)?;
    let Some(g) = g else { return Ok(None) };
    if !state_record(media, allow, out)? {
        return Ok(None);
    }
    if !journal(media, &g, allow, out)? {
        return Ok(None);
    }
    if !itable_dir(media, &g, allow, out)? {
        return Ok(None);
    }
    Ok(Some(g))
}

fn superblocks(
    media: &dyn Media,
    allow: &dyn Fn(Class) -> bool,
    out: &mut Vec<Finding>,
) -> Result<Option<Geometry>> {
    let mut primary = [0u8; SB_LEN];
    let mut backup = [0u8; SB_LEN];
    media.read(SUPERBLOCK_OFFSET, &mut primary)?;
    media.read(BACKUP_SUPERBLOCK_OFFSET, &mut backup)?;
    let p = read_superblock(media);
    let b = read_backup_superblock(media);
    let fix = allow(Class::Superblock);
    match (p, b) {
        (Ok((_, g)), Ok(_)) if primary == backup => Ok(Some(g)),
        (Ok((_, g)), b) => {
            let why = match b {
                Ok(_) => "differs from the primary".to_string(),
                Err(e) => format!("is damaged ({e})"),
            };
            finding(
                out,
                ProblemKind::Backup,
                Class::Superblock,
                format!("backup superblock (block 1) {why}: rewritten from the primary"),
                fix,
            );
            if fix {
                persist(media, BACKUP_SUPERBLOCK_OFFSET, &primary)?;
            }
            // The primary is good: the check can go on either way.
            Ok(Some(g))
        }
        (Err(pe), Ok((_, g))) => {
            finding(
                out,
                ProblemKind::Superblock,
                Class::Superblock,
                format!("primary superblock (block 0) is damaged ({pe}): restored from the backup"),
                fix,
            );
            if !fix {
                return Ok(None);
            }
            persist(media, SUPERBLOCK_OFFSET, &backup)?;
            Ok(Some(g))
        }
        (Err(pe), Err(be)) => {
            let bad_magic = |e: &Error| matches!(e, Error::Format(FormatError::BadMagic));
            if bad_magic(&pe) && bad_magic(&be) {
                return Err(pe);
            }
            // Name the primary's problem unless only its magic is gone.
            Err(if bad_magic(&pe) { be } else { pe })
        }
    }
}

fn state_record(
    media: &dyn Media,
    allow: &dyn Fn(Class) -> bool,
    out: &mut Vec<Finding>,
) -> Result<bool> {
    let e = match read_state(media) {
        Ok(_) => return Ok(true),
        Err(e) => e,
    };
    let fix = allow(Class::Superblock);
    finding(
        out,
        ProblemKind::StateRecord,
        Class::Superblock,
        format!(
            "state record (block 0, byte {STATE_OFFSET}) is damaged ({e}): rewritten, orphan list dropped"
        ),
        fix,
    );
    if !fix {
        return Ok(false);
    }
    let mut st = FsState::new_zeroed();
    st.magic = STATE_MAGIC;
    st.seal();
    persist(media, STATE_OFFSET, st.as_bytes())?;
    Ok(true)
}

fn journal(
    media: &dyn Media,
    g: &Geometry,
    allow: &dyn Fn(Class) -> bool,
    out: &mut Vec<Finding>,
) -> Result<bool> {
    let fix = allow(Class::Journal);
    let mut ready = true;
    for i in 0..g.journal_slots {
        let offset = g.slot_offset(i);
        let mut hb = [0u8; size_of::<SlotHeader>()];
        media.read(offset, &mut hb)?;
        let header = SlotHeader::read_from_bytes(&hb).ok();
        let good = header.is_some_and(|h| h.magic == SLOT_MAGIC && h.slot_index == i);
        if !good {
            finding(
                out,
                ProblemKind::JournalDamaged { slot: i },
                Class::Journal,
                format!(
                    "journal slot {i} (blocks {}..{}): header damaged: slot reset (an interrupted transaction in it cannot be rolled back)",
                    offset / BLOCK_SIZE,
                    (offset + g.slot_size()) / BLOCK_SIZE
                ),
                fix,
            );
            if !fix {
                ready = false;
                continue;
            }
            // Zero the records first, then write the header: a crash in between leaves a
            // slot with a bad header, which the next run resets the same way.
            media.zero_nt(offset + SLOT_HEADER, g.slot_size() - SLOT_HEADER)?;
            media.fence();
            let h = SlotHeader {
                magic: SLOT_MAGIC,
                generation: 0,
                slot_index: i,
                pad: 0,
                reserved: [0; 40],
            };
            persist(media, offset, h.as_bytes())?;
            continue;
        }
        let Some(h) = header else { continue };
        if h.generation % 2 == 0 {
            continue;
        }
        let Some(open) = crate::journal::inspect_slot(media, g, i)? else {
            continue;
        };
        let (kind, message) = match &open.damage {
            None => (
                ProblemKind::JournalOpen,
                format!(
                    "journal slot {i} holds an interrupted transaction ({} undo records): rolled back",
                    open.records
                ),
            ),
            Some(why) => (
                ProblemKind::JournalDamaged { slot: i },
                format!(
                    "journal slot {i} holds an interrupted transaction with a damaged record ({why}): the {} valid records before it rolled back",
                    open.records
                ),
            ),
        };
        finding(out, kind, Class::Journal, message, fix);
        if !fix {
            ready = false;
            continue;
        }
        crate::journal::rollback_slot_lenient(media, g, i)?;
    }
    // Whatever the loop did, the journal must now be one the mount path accepts.
    if ready {
        crate::journal::recover(media, g)?;
    }
    Ok(ready)
}

fn itable_dir(
    media: &dyn Media,
    g: &Geometry,
    allow: &dyn Fn(Class) -> bool,
    out: &mut Vec<Finding>,
) -> Result<bool> {
    let (table, fault) = TablePointers::read(media, g)?;
    let fix = allow(Class::Inodes);
    let Some(fault) = fault else {
        if !table.chunks.is_empty() {
            return Ok(true);
        }
        return restore_first_chunk(media, g, fix, out);
    };
    if table.chunks.is_empty() {
        return restore_first_chunk(media, g, fix, out);
    }
    let kept = table.chunks.len() as u64;
    let entry = match fault.at {
        PointerAt::Dir { entry } => entry,
        PointerAt::Indirect { dir_entry, .. } => dir_entry,
    };
    finding(
        out,
        ProblemKind::InodeTableDir { entry },
        Class::Inodes,
        format!(
            "inode table: {fault}: the table is cut there (inodes {} and up are lost)",
            kept * crate::format::INODES_PER_CHUNK
        ),
        fix,
    );
    if !fix {
        return Ok(false);
    }
    // Cut the table after its valid prefix: zero the pointers from the fault on (in an
    // indirect block, then the directory entries after it). A crash in between leaves a
    // prefix of the same table, which the next run cuts the same way.
    let dir_from = match fault.at {
        PointerAt::Dir { entry } => entry,
        PointerAt::Indirect { dir_entry, entry } => {
            if entry > 0 {
                let at = blocks_to_bytes(table.indirect[dir_entry as usize]) + entry * 8;
                persist(media, at, &vec![0u8; (BLOCK_SIZE - entry * 8) as usize])?;
                dir_entry + 1
            } else {
                dir_entry
            }
        }
    };
    let at = g.itable_dir_offset() + dir_from * 8;
    persist(media, at, &vec![0u8; (BLOCK_SIZE - dir_from * 8) as usize])?;
    Ok(true)
}

/// Entry 0 of the inode-table directory is gone: mkfs put chunk 0 at a known place; if the
/// root inode is there, point entry 0 back at it.
fn restore_first_chunk(
    media: &dyn Media,
    g: &Geometry,
    fix: bool,
    out: &mut Vec<Finding>,
) -> Result<bool> {
    let chunk = crate::mkfs::first_itable_chunk(g)?;
    let mut raw = [0u8; INODE_SIZE as usize];
    media.read(blocks_to_bytes(chunk) + ROOT_INO * INODE_SIZE, &mut raw)?;
    let root_ok = Inode::decode(&raw).is_ok_and(|i| i.is_dir());
    if !root_ok {
        return Err(Error::corrupted(
            "inode table directory",
            0,
            "entry 0 is invalid and no inode table was found where mkfs puts it",
        ));
    }
    finding(
        out,
        ProblemKind::InodeTableDir { entry: 0 },
        Class::Inodes,
        format!(
            "inode-table directory entry 0 is invalid: pointed back at chunk {chunk}, where the root inode is; later chunks dropped"
        ),
        fix,
    );
    if !fix {
        return Ok(false);
    }
    let mut dir = vec![0u8; BLOCK_SIZE as usize];
    dir[..8].copy_from_slice(&chunk.to_le_bytes());
    if let ItableLayout::Tree { .. } = g.itable {
        // mkfs's indirect block is never freed: make it hold chunk 0 alone again.
        let indirect = crate::mkfs::first_itable_indirect(g)?;
        persist(media, blocks_to_bytes(indirect), &dir)?;
        dir[..8].copy_from_slice(&indirect.to_le_bytes());
    }
    persist(media, g.itable_dir_offset(), &dir)?;
    Ok(true)
}
