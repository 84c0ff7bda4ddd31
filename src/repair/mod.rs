//! Repairing what the consistency checker ([`crate::check`]) finds: the engine of
//! `fsck.pmfs`.
//!
//! - [`diagnose`] is the read-only check fsck reports from. It runs the low-level repairs
//!   (superblock from its backup, journal rollback, ...) on a copy-on-write view
//!   ([`CowMedia`]) so the full check sees the file system as a repair would leave it, and
//!   never writes the device.
//! - [`repair`] fixes what it is allowed to ([`RepairMode`], by [`Class`]): first the
//!   low-level structures a mount needs (primary superblock restored from the backup or the
//!   backup from the primary, interrupted transactions rolled back, damaged journal slots
//!   reset, the state record and inode-table directory made valid), then every object (see
//!   `rebuild.rs`: inodes, extent maps, directory trees, entries, link counts, sizes, the
//!   orphan list, /lost+found), and last the block bitmap, rebuilt from the blocks the
//!   checker found referenced. It ends with a full check, returned in the outcome.
//!
//! Crash safety: object repairs are journal transactions (a rebuilt tree is written to
//! unclaimed blocks, and the inode switches to it in the same transaction that marks the
//! blocks in use), the bitmap is rewritten in transactions too, and the low-level repairs are
//! single stores ordered so that a crash leaves a state the next run repairs the same way. A
//! crash in the middle of a repair therefore never makes things worse; running fsck again
//! finishes the job.

use crate::format::bitmap as bits;
mod cow;
mod low;
mod rebuild;
pub(crate) mod tree;

pub use cow::CowMedia;
pub use rebuild::LOST_FOUND;

use crate::check::{Problem, ProblemKind, ProgressFn, Report, check, check_with_progress};
use crate::device::Media;
use crate::error::Result;
use crate::format::{Geometry, STATE_OFFSET};
use crate::journal::Journal;
use crate::meta::InodeTable;
use crate::meta::space::{self, SpaceSummary};
use crate::meta::{read_state, read_superblock};
use std::sync::Arc;

/// Classes of problems and of the repairs that fix them. fsck asks about (or allows) repairs
/// a class at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// The superblocks and the state record.
    Superblock,
    /// Interrupted transactions and damaged journal slots.
    Journal,
    /// Inodes whose only damage is a wrong checksum (the checksum is recomputed).
    Checksums,
    /// Damaged inodes (cleared), damaged xattr areas and inode-table entries (dropped).
    Inodes,
    /// Damaged extent maps and directory trees (rebuilt from what can still be read) and
    /// blocks claimed twice (the later claimant loses them).
    Trees,
    /// Directory entries that point nowhere, to damaged inodes or to a directory already
    /// linked (removed), and wrong entry types (fixed).
    Entries,
    /// Link counts, directory sizes, block counts and `..` pointers.
    Counts,
    /// The block bitmap (leaked blocks freed, blocks in use marked).
    Bitmap,
    /// The orphan list (orphans freed, entries that are no orphans dropped).
    Orphans,
    /// Inodes not reachable from the root (moved to /lost+found).
    LostFound,
}

impl Class {
    pub const ALL: [Class; 10] = [
        Class::Superblock,
        Class::Journal,
        Class::Checksums,
        Class::Inodes,
        Class::Trees,
        Class::Entries,
        Class::Counts,
        Class::Bitmap,
        Class::Orphans,
        Class::LostFound,
    ];

    /// What a repair of this class does, as a question's subject.
    pub fn describe(self) -> &'static str {
        match self {
            Class::Superblock => "restore damaged superblocks and the state record",
            Class::Journal => "roll back interrupted transactions and reset damaged journal slots",
            Class::Checksums => "recompute checksums of inodes that are otherwise valid",
            Class::Inodes => "clear damaged inodes and drop damaged xattr areas",
            Class::Trees => {
                "rebuild damaged extent maps and directory trees (dropping what cannot be read)"
            }
            Class::Entries => "remove or fix bad directory entries",
            Class::Counts => "fix link counts, directory sizes, block counts and '..' pointers",
            Class::Bitmap => "rebuild the block bitmap",
            Class::Orphans => "free orphaned inodes and clean the orphan list",
            Class::LostFound => "move unreachable files to /lost+found",
        }
    }

    /// Repairs that lose nothing a user could still reach: done by `fsck -p` without asking.
    pub fn preen_safe(self) -> bool {
        matches!(
            self,
            Class::Superblock
                | Class::Journal
                | Class::Checksums
                | Class::Counts
                | Class::Bitmap
                | Class::Orphans
        )
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// The class of repair a problem needs.
pub fn class_of(kind: &ProblemKind) -> Class {
    match kind {
        ProblemKind::Backup
        | ProblemKind::Superblock
        | ProblemKind::StateRecord
        | ProblemKind::MissingFeatures(_)
        | ProblemKind::HugeRegions { .. } => Class::Superblock,
        ProblemKind::JournalOpen | ProblemKind::JournalDamaged { .. } => Class::Journal,
        ProblemKind::BadInode(_) | ProblemKind::InodeTableDir { .. } => Class::Inodes,
        ProblemKind::BadTree(_) | ProblemKind::DoubleUse { .. } => Class::Trees,
        ProblemKind::BadEntry { .. } => Class::Entries,
        ProblemKind::LinkCount { .. }
        | ProblemKind::DirSize { .. }
        | ProblemKind::BlockCount { .. }
        | ProblemKind::BadParent { .. } => Class::Counts,
        ProblemKind::Leaked { .. }
        | ProblemKind::Unmarked { .. }
        | ProblemKind::SpaceSummary { .. } => Class::Bitmap,
        ProblemKind::Orphan(_) => Class::Orphans,
        ProblemKind::Unreachable(_) => Class::LostFound,
    }
}

/// Which classes of repairs [`repair`] may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RepairMode {
    allowed: u16,
}

impl RepairMode {
    /// Every repair (`fsck -y`).
    pub fn all() -> Self {
        Class::ALL.iter().fold(Self::none(), |m, &c| m.with(c))
    }

    /// Only repairs that lose nothing reachable (`fsck -p`): see [`Class::preen_safe`].
    pub fn preen() -> Self {
        Class::ALL
            .iter()
            .filter(|c| c.preen_safe())
            .fold(Self::none(), |m, &c| m.with(c))
    }

    /// No repairs.
    pub fn none() -> Self {
        Self { allowed: 0 }
    }

    /// This mode plus `class`.
    pub fn with(self, class: Class) -> Self {
        Self {
            allowed: self.allowed | class.bit(),
        }
    }

    pub fn allows(&self, class: Class) -> bool {
        self.allowed & class.bit() != 0
    }
}

/// One repair made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    pub class: Class,
    /// One line naming the object and what was done.
    pub message: String,
}

/// What [`repair`] did, and the check that followed.
#[derive(Clone, Debug, Default)]
pub struct RepairOutcome {
    pub actions: Vec<Action>,
    /// A full check after the repairs: what is left.
    pub report: Report,
}

impl RepairOutcome {
    /// True when the device was changed.
    pub fn changed(&self) -> bool {
        !self.actions.is_empty()
    }
}

/// A low-level problem, and whether it was repaired.
struct Finding {
    problem: Problem,
    class: Class,
    fixed: bool,
}

/// Checks the file system on `media` without changing it. Unlike [`check`], it copes with a
/// damaged primary superblock, state record, journal or inode-table directory: those are
/// reported as problems, and the rest of the check runs on a view where they are repaired.
/// Fails only when the device holds no usable pmfs (bad magic in both superblocks, both
/// superblocks damaged, a truncated image).
pub fn diagnose(media: &Arc<dyn Media>) -> Result<Report> {
    diagnose_with_progress(media, &mut |_, _, _| {})
}

/// [`diagnose`], telling `progress` how far the check is (see [`check_with_progress`]).
pub fn diagnose_with_progress(media: &Arc<dyn Media>, progress: ProgressFn<'_>) -> Result<Report> {
    let cow: Arc<dyn Media> = Arc::new(CowMedia::new(Arc::clone(media)));
    let mut findings = Vec::new();
    low::run(cow.as_ref(), &|_| true, &mut findings)?;
    let mut report = check_with_progress(&cow, progress)?;
    let mut problems: Vec<Problem> = findings.into_iter().map(|f| f.problem).collect();
    problems.append(&mut report.problems);
    report.problems = problems;
    Ok(report)
}

/// Repairs what `report` (from [`diagnose`] or [`check`]) found, as far as `mode` allows, and
/// checks again. See the module documentation for the order and crash safety.
pub fn repair(media: &Arc<dyn Media>, report: &Report, mode: RepairMode) -> Result<RepairOutcome> {
    let mut out = RepairOutcome::default();
    let mut findings = Vec::new();
    let geometry = low::run(media.as_ref(), &|c| mode.allows(c), &mut findings)?;
    out.actions
        .extend(findings.into_iter().filter(|f| f.fixed).map(|f| Action {
            class: f.class,
            message: f.problem.message,
        }));
    let Some(g) = geometry else {
        // A low-level problem that may not be repaired blocks everything else.
        out.report = diagnose(media)?;
        return Ok(out);
    };
    // The repairs below store into the fixed metadata: back it on a sparse image (new tree
    // nodes are reserved as they are handed out).
    media.reserve(0, g.meta_end * crate::format::BLOCK_SIZE)?;
    for p in &report.problems {
        if !mode.allows(Class::Superblock) {
            break;
        }
        let message = match p.kind {
            ProblemKind::MissingFeatures(bits) => add_features(media.as_ref(), bits)?,
            ProblemKind::HugeRegions { max, .. } => clamp_huge_regions(media.as_ref(), max)?,
            _ => continue,
        };
        out.actions.push(Action {
            class: Class::Superblock,
            message,
        });
    }
    let low_only = report.problems.iter().all(|p| {
        matches!(
            p.kind,
            ProblemKind::Backup
                | ProblemKind::Superblock
                | ProblemKind::StateRecord
                | ProblemKind::JournalOpen
                | ProblemKind::JournalDamaged { .. }
                | ProblemKind::MissingFeatures(_)
                | ProblemKind::HugeRegions { .. }
        )
    });
    if low_only {
        let r = check(media)?;
        if r.problems.is_empty() {
            out.report = r;
            return Ok(out);
        }
    }
    // Object repairs can uncover more (a cleared inode's entries, a rebuilt tree's leaked
    // nodes): a few passes, while they make progress.
    let mut last = Report::default();
    for _ in 0..3 {
        let before = out.actions.len();
        rebuild::Rebuild::new(media, g, &mode, &mut out.actions)?.run()?;
        last = match bitmap(media, &g, mode, &mut out.actions)? {
            Some(unchanged) => unchanged,
            None => check(media)?,
        };
        if last.problems.is_empty() || out.actions.len() == before {
            break;
        }
    }
    out.report = last;
    Ok(out)
}

/// Gives the superblock the incompatible features `bits` (and the version they need), as the
/// core does on first use; returns the action's message.
fn add_features(media: &dyn Media, bits: u64) -> Result<String> {
    let (mut sb, _) = read_superblock(media)?;
    let features = crate::format::IncompatFeatures::from_bits_retain(bits);
    sb.incompat |= bits;
    sb.version = sb.version.max(sb.incompat_features().version_needed());
    sb.seal();
    crate::meta::upgrade_superblock(media, &sb)?;
    Ok(format!(
        "superblock: features {} added (format version {})",
        features.names(),
        sb.version
    ))
}

/// Lowers the superblock's 1 GiB-region reservation to `max`, what the device can reserve
/// (the mount already reserved no more); returns the action's message.
fn clamp_huge_regions(media: &dyn Media, max: u64) -> Result<String> {
    let (mut sb, _) = read_superblock(media)?;
    let stored = sb.huge_regions;
    sb.huge_regions = u32::try_from(max).unwrap_or(u32::MAX);
    sb.seal();
    crate::meta::upgrade_superblock(media, &sb)?;
    Ok(format!(
        "superblock: huge_regions {stored} lowered to {max}, the 1 GiB regions the device can reserve"
    ))
}

/// Rewrites the block bitmap from the blocks the checker found referenced. While objects
/// whose blocks the checker cannot know remain (damaged inodes or trees, blocks claimed
/// twice), blocks are only marked, never freed. Returns the check it made when it changed
/// nothing (it is then the final state), `None` otherwise.
fn bitmap(
    media: &Arc<dyn Media>,
    g: &Geometry,
    mode: RepairMode,
    actions: &mut Vec<Action>,
) -> Result<Option<Report>> {
    if !mode.allows(Class::Bitmap) {
        return Ok(None);
    }
    let r = check(media)?;
    let partial = r.problems.iter().any(|p| {
        matches!(
            p.kind,
            ProblemKind::BadInode(_) | ProblemKind::BadTree(_) | ProblemKind::DoubleUse { .. }
        )
    });
    let words = r.referenced.len();
    // A damaged summary is rebuilt with every region initialised: their bitmap words are
    // then taken as they are, and rewritten below wherever they differ from the blocks in
    // use.
    let summary = SpaceSummary::read(media.as_ref(), g).ok().flatten();
    let summary_damaged = r
        .problems
        .iter()
        .any(|p| matches!(p.kind, ProblemKind::SpaceSummary { .. }));
    let mut disk = space::read_bitmap_bytes(media.as_ref(), g, summary.as_ref())?;
    disk.truncate(words * 8);
    // (word index, new value) of every word that changes.
    let mut changes: Vec<(usize, u64)> = Vec::new();
    let (mut marked, mut freed) = (0u64, 0u64);
    for (w, chunk) in disk.chunks_exact(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        let old = u64::from_le_bytes(b);
        let want = if partial {
            old | r.referenced[w]
        } else {
            r.referenced[w]
        };
        if want != old {
            marked += u64::from((want & !old).count_ones());
            freed += u64::from((old & !want).count_ones());
            changes.push((w, want));
        }
    }
    if changes.is_empty() && !summary_damaged {
        return Ok(Some(r));
    }
    // The counts are about to go stale; a region that must change is initialised first
    // (its words read as zeros above, which is what it then holds).
    if g.summary_blocks > 0 {
        space::set_counts_valid(media.as_ref(), g, false)?;
    }
    let mut summary = summary;
    if let Some(s) = summary.as_mut() {
        for &(w, _) in &changes {
            let region = (w as u64 * 64) / crate::format::space::REGION_BLOCKS;
            if let Some(e) = s.regions.get_mut(region as usize).filter(|e| e.uninit) {
                space::initialise_region(media.as_ref(), g, region)?;
                e.uninit = false;
            }
        }
    }
    let (journal, _) = Journal::open(Arc::clone(media), *g)?;
    // Runs of consecutive words, at most 4096 changed words (32 KiB) per transaction.
    let mut i = 0;
    while i < changes.len() {
        let mut tx = journal.begin();
        let end = (i + 4096).min(changes.len());
        while i < end {
            let start = i;
            while i + 1 < end && changes[i + 1].0 == changes[i].0 + 1 {
                i += 1;
            }
            let bytes: Vec<u8> = changes[start..=i]
                .iter()
                .flat_map(|(_, v)| v.to_le_bytes())
                .collect();
            tx.write(g.bitmap_offset() + changes[start].0 as u64 * 8, &bytes)?;
            i += 1;
        }
        tx.commit()?;
    }
    if g.summary_blocks > 0 {
        let bitmap = space::read_bitmap_bytes(media.as_ref(), g, summary.as_ref())?;
        let entries = space::entries_for_bitmap(g, summary.as_ref(), &bitmap);
        space::write_summary(media.as_ref(), g, &entries, true)?;
    }
    if changes.is_empty() {
        actions.push(Action {
            class: Class::Bitmap,
            message: "space summary rebuilt from the block bitmap".into(),
        });
        return Ok(None);
    }
    actions.push(Action {
        class: Class::Bitmap,
        message: format!(
            "block bitmap rebuilt: {marked} blocks in use marked, {freed} unused blocks freed{}",
            if partial {
                " (damaged objects remain: no block freed)"
            } else {
                ""
            }
        ),
    });
    Ok(None)
}

/// Figures for a one-line summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    /// The state record says the file system was unmounted cleanly.
    pub clean: bool,
    /// Journal slots holding an interrupted transaction.
    pub open_transactions: usize,
    pub inodes_used: u64,
    pub inodes_total: u64,
    pub blocks_used: u64,
    pub blocks_total: u64,
}

/// Reads the summary figures (fails like [`check`] on a damaged superblock or journal).
pub fn summary(media: &Arc<dyn Media>) -> Result<Summary> {
    let (_, g) = read_superblock(media.as_ref())?;
    let st = read_state(media.as_ref())?;
    let open_transactions = crate::journal::pending(media.as_ref(), &g)?.len();
    let table = InodeTable::open(Arc::clone(media), g)?;
    let inodes_used = table.allocated()?.len() as u64;
    let blocks_used = used_blocks(media.as_ref(), &g)?;
    let free = g.block_count - blocks_used.min(g.block_count);
    Ok(Summary {
        clean: st.clean == 1,
        open_transactions,
        inodes_used,
        inodes_total: table.capacity(free).max(inodes_used),
        blocks_used,
        blocks_total: g.block_count,
    })
}

/// The figures of a file system that needs no full check: marked clean, no interrupted
/// transaction, and superblocks, state record, journal and inode-table directory intact
/// (what fsck verifies before it reports "clean" without `-f`). `None` when a full check is
/// due.
pub fn quick_check(media: &Arc<dyn Media>) -> Result<Option<Summary>> {
    let cow: Arc<dyn Media> = Arc::new(CowMedia::new(Arc::clone(media)));
    let mut findings = Vec::new();
    if low::run(cow.as_ref(), &|_| false, &mut findings)?.is_none() || !findings.is_empty() {
        return Ok(None);
    }
    let s = summary(media)?;
    Ok((s.clean && s.open_transactions == 0).then_some(s))
}

/// Blocks set in the bitmap, below `block_count` (uninitialised regions are free).
fn used_blocks(media: &dyn Media, g: &Geometry) -> Result<u64> {
    let summary = SpaceSummary::read(media, g)?;
    let buf = space::read_bitmap_bytes(media, g, summary.as_ref())?;
    Ok(bits::count_set_in_bytes(&buf, g.block_count))
}

/// Marks the file system clean after a full check found nothing left to repair (the state
/// record's `clean` flag, with a fresh free-block count), so the next fsck without `-f`
/// does not check it again. Returns whether anything changed.
pub fn mark_clean(media: &Arc<dyn Media>) -> Result<bool> {
    let (_, g) = read_superblock(media.as_ref())?;
    let mut st = read_state(media.as_ref())?;
    let free = g.block_count - used_blocks(media.as_ref(), &g)?.min(g.block_count);
    // The check found the bitmap right: exact counts let the next mount skip it.
    let summary = SpaceSummary::read(media.as_ref(), &g)?;
    let stale_counts = summary.as_ref().is_some_and(|s| !s.counts_valid);
    if let Some(s) = summary.as_ref().filter(|_| stale_counts) {
        let bitmap = space::read_bitmap_bytes(media.as_ref(), &g, Some(s))?;
        let entries = space::entries_for_bitmap(&g, Some(s), &bitmap);
        space::write_summary(media.as_ref(), &g, &entries, true)?;
    }
    if st.clean == 1 && st.free_blocks == free && !stale_counts {
        return Ok(false);
    }
    st.clean = 1;
    st.free_blocks = free;
    st.seal();
    let (journal, _) = Journal::open(Arc::clone(media), g)?;
    let mut tx = journal.begin();
    tx.write_struct(STATE_OFFSET, &st)?;
    tx.commit()?;
    Ok(true)
}
