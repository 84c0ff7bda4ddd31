//! The read-only consistency checker: every invariant the format states, checked on an
//! unmounted (or quiescent) device. fsck.pmfs reports and repairs from its findings; the
//! test suites run it after every scenario.
//!
//! Invariants checked:
//! - superblock, backup and state record decode; the journal has no open transaction;
//! - every allocated inode decodes (checksum, type, flags) and, unless it is an orphan or a
//!   reserved inode, is reachable from the root;
//! - extents lie in the data area, do not overlap each other or any other object, and their
//!   block count matches the inode's;
//! - directory entries point to allocated inodes of the type they claim, `..` (the parent
//!   field) matches the directory holding a subdirectory, directory sizes and link counts
//!   are right, and there is no directory cycle;
//! - every tree (directories, extent trees, the orphan list) is well formed: nodes decode,
//!   none is reached twice, and the separator invariant of `btree` holds;
//! - every non-directory's link count equals the entries naming it; nlink 0 only on orphans;
//! - the block bitmap equals the set of blocks referenced (no leak, no double use);
//! - the superblock has the features the inodes use (attribute flags, files or extents past
//!   2^44 bytes), which keep an older pmfs from taking them for damage.

use crate::btree::{Tree, TreeReader};
use crate::device::Media;
use crate::error::Result;
use crate::format::bitmap;
use crate::format::{
    CHUNK_BLOCKS, DEFERRED_FREE_INO, Geometry, IncompatFeatures, Inode, NULL_INO, ROOT_INO,
    TreeKind, V1_MAX_FILE_SIZE, inode_flags,
};
use crate::meta::InodeTable;
use crate::meta::space::{self, SpaceSummary};
use crate::meta::{read_state, read_superblock};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// Longest path kept for messages (PATH_MAX). A deeper path keeps its last part after "…",
/// so the memory the checker and repair spend on paths grows with the number of inodes, not
/// with the depth of the directory tree times its size (a chain of 10,000 directories with
/// long names would otherwise hold gigabytes of paths).
pub const MESSAGE_PATH_MAX: usize = 4096;

/// `base/name` for messages, at most [`MESSAGE_PATH_MAX`] bytes.
pub fn join_path(base: &str, name: &[u8]) -> String {
    let sep = if base.ends_with('/') { "" } else { "/" };
    cut_path(format!("{base}{sep}{}", String::from_utf8_lossy(name)))
}

/// `p`, or its last part after "…" when it is longer than [`MESSAGE_PATH_MAX`] bytes.
fn cut_path(p: String) -> String {
    if p.len() <= MESSAGE_PATH_MAX {
        return p;
    }
    let mut cut = p.len() - (MESSAGE_PATH_MAX - '…'.len_utf8());
    while !p.is_char_boundary(cut) {
        cut += 1;
    }
    format!("…{}", &p[cut..])
}

/// Kinds of damage, so fsck can pick a repair. (`MissingFeatures`: inodes use the
/// incompatible features of these bits, which the superblock does not have.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    Backup,
    JournalOpen,
    BadInode(u64),
    BadTree(u64),
    Unreachable(u64),
    LinkCount {
        ino: u64,
        stored: u32,
        counted: u32,
    },
    DirSize {
        ino: u64,
        stored: u64,
        counted: u64,
    },
    BlockCount {
        ino: u64,
        stored: u64,
        counted: u64,
    },
    BadEntry {
        dir: u64,
        name: Vec<u8>,
    },
    DoubleUse {
        block: u64,
    },
    Leaked {
        first: u64,
        count: u64,
    },
    Unmarked {
        first: u64,
        count: u64,
    },
    BadParent {
        ino: u64,
    },
    Orphan(u64),
    MissingFeatures(u64),
    /// The space summary is damaged, or (`region`) a count that claims to be exact differs
    /// from the bitmap.
    SpaceSummary {
        region: Option<u64>,
    },
    /// The superblock reserves more 1 GiB regions than the device can (`max`).
    HugeRegions {
        stored: u64,
        max: u64,
    },
    // Found by `repair::diagnose` before a check can run:
    Superblock,
    StateRecord,
    JournalDamaged {
        slot: u32,
    },
    InodeTableDir {
        entry: u64,
    },
}

/// One finding, with a one-line description naming the object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    pub message: String,
}

/// What the check found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub problems: Vec<Problem>,
    pub inodes: u64,
    pub directories: u64,
    pub used_blocks: u64,
    /// Path of each reachable non-directory inode a problem names, for messages (the paths
    /// of directories come from [`Report::path`]). Only these are kept: a path per inode
    /// would cost more memory than the rest of the check at millions of inodes.
    pub paths: HashMap<u64, String>,
    /// Where each directory reached from the root was found.
    dirs: DirNames,
    /// The block bitmap the device should have: one bit per block (bit `b % 64` of word
    /// `b / 64`), set for every block some object references (and the bits past the end of
    /// the device). fsck rebuilds the on-media bitmap from it.
    pub referenced: Vec<u64>,
}

impl Report {
    /// The path of inode `ino` for messages, when the check knows it: every directory
    /// reached from the root, and the non-directories that problems name. At most
    /// [`MESSAGE_PATH_MAX`] bytes (see [`join_path`]).
    pub fn path(&self, ino: u64) -> Option<String> {
        match self.paths.get(&ino) {
            Some(p) => Some(p.clone()),
            None => self.dirs.path(ino),
        }
    }
}

/// The directory tree as the walk found it: for each directory reached from the root (but
/// the root), the directory whose entry reached it first and that entry's name. Paths are
/// built from it when a message needs one, so the check keeps a name per directory instead
/// of a path per inode. The walk adds a directory only after its parent, so following
/// parents always ends at the root.
#[derive(Clone, Debug, Default)]
struct DirNames(HashMap<u64, (u64, Box<[u8]>)>);

impl DirNames {
    /// The path of directory `ino` ("/" for the root), or None when it was not reached.
    fn path(&self, ino: u64) -> Option<String> {
        if ino == ROOT_INO {
            return Some("/".into());
        }
        self.0.contains_key(&ino).then(|| self.base(ino))
    }

    /// The path of directory `dir` to join names to: "" for the root, so that
    /// `join_path(base, name)` is "/name". Only the last [`MESSAGE_PATH_MAX`] bytes are
    /// built, however deep the directory.
    fn base(&self, dir: u64) -> String {
        let mut parts: Vec<&[u8]> = Vec::new();
        let (mut at, mut len) = (dir, 0usize);
        while at != ROOT_INO && len <= MESSAGE_PATH_MAX {
            let Some((parent, name)) = self.0.get(&at) else {
                break;
            };
            parts.push(name);
            len += name.len() + 1;
            at = *parent;
        }
        let mut p = String::with_capacity(len);
        for name in parts.iter().rev() {
            p.push('/');
            p.push_str(&String::from_utf8_lossy(name));
        }
        cut_path(p)
    }
}

/// Per-inode state between the passes, one byte per inode-table slot: set bits of
/// [`PRESENT`] (the inode decoded), [`REACHED`] (an entry names it), [`ORPHAN_LISTED`]
/// (the orphan list names it) and the file type ([`TYPE_MASK`], `S_IFMT >> 12`).
const PRESENT: u8 = 0x80;
const REACHED: u8 = 0x40;
const ORPHAN_LISTED: u8 = 0x20;
const TYPE_MASK: u8 = 0x0f;
const DIR_TYPE: u8 = (crate::format::file_type::S_IFDIR >> 12) as u8;

/// What the walk needs of a directory inode.
#[derive(Clone, Copy, Debug)]
struct DirFacts {
    tree_root: u64,
    size: u64,
    nlink: u32,
    parent: u64,
}

/// Who owns blocks being marked, for messages: formatted only when one is written, so
/// marking costs no allocation.
#[derive(Clone, Copy, Debug)]
enum Owner<'s> {
    Named(&'s str),
    Inode(u64),
    Xattrs(u64),
}

impl std::fmt::Display for Owner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Named(s) => f.write_str(s),
            Owner::Inode(ino) => write!(f, "inode {ino}"),
            Owner::Xattrs(ino) => write!(f, "xattrs of inode {ino}"),
        }
    }
}

/// What the check is doing, for a progress display: `(phase, done, total)`, called at
/// least every few thousand units of work.
pub type ProgressFn<'p> = &'p mut dyn FnMut(&str, u64, u64);

/// How many directories the walk lists between two progress calls.
const DIRS_PER_PROGRESS: u64 = 256;

struct Checker<'a> {
    media: &'a dyn Media,
    geometry: Geometry,
    /// Referenced blocks (the bitmap the device should have).
    refs: Vec<u64>,
    report: Report,
}

impl Checker<'_> {
    fn problem(&mut self, kind: ProblemKind, message: String) {
        self.report.problems.push(Problem { kind, message });
    }

    /// Marks blocks as referenced by `owner`, up to the first that is outside the device
    /// or already referenced (a problem).
    fn mark(&mut self, first: u64, count: u64, owner: Owner<'_>) {
        let end = first.saturating_add(count);
        let device_end = self.refs.len() as u64 * 64;
        let clash = bitmap::next_set(&self.refs, first, end);
        let stop = clash.unwrap_or(end).min(device_end.max(first));
        bitmap::set_range(&mut self.refs, first, stop - first);
        if let Some(b) = clash.filter(|&b| b == stop) {
            self.problem(
                ProblemKind::DoubleUse { block: b },
                format!("block {b} of {owner} is also used by another object"),
            );
        } else if stop < end {
            self.problem(
                ProblemKind::DoubleUse { block: stop },
                format!("block {stop} of {owner} is outside the device"),
            );
        }
    }

    fn reader(&self) -> TreeReader<'_> {
        TreeReader::new(self.media, &self.geometry)
    }

    /// Marks the nodes of a tree and checks its structure: every node decodes, none is
    /// reached twice, and the separator invariant holds (entry 0 keyed by the node's lower
    /// bound, 0 on the leftmost spine; every key inside its node's range), so a misplaced
    /// separator, which makes keys invisible to lookups, is damage. The walk reads each node
    /// at most once, so it is bounded by the device size.
    fn mark_tree(&mut self, tree: &Tree, owner: Owner<'_>) -> bool {
        let mut nodes = Vec::new();
        let res = self.reader().validate(tree, &mut |b, _| {
            nodes.push(b);
            Ok(())
        });
        for b in nodes {
            self.mark(b, 1, owner);
        }
        match res {
            Ok(()) => true,
            Err(e) => {
                self.problem(ProblemKind::BadTree(tree.owner), format!("{owner}: {e}"));
                false
            }
        }
    }

    /// Checks what inode `ino` owns: extents, trees, xattrs, symlink block; adds the
    /// incompatible features it uses to `used`.
    fn check_contents(&mut self, ino: u64, i: &Inode, used: &mut IncompatFeatures) {
        let (media, geometry) = (self.media, self.geometry);
        let owner = Owner::Inode(ino);
        if i.flags & inode_flags::ATTR_FLAGS != 0 {
            *used |= IncompatFeatures::INODE_ATTR_FLAGS;
        }
        if i.size > V1_MAX_FILE_SIZE {
            *used |= IncompatFeatures::LARGE_FILES;
        }
        if i.is_reg() {
            let mut counted = 0u64;
            if i.flags & inode_flags::TREE != 0 {
                let t = Tree {
                    kind: TreeKind::Extents,
                    owner: ino,
                    root: i.tree_root,
                };
                self.mark_tree(&t, owner);
            }
            match crate::meta::file_extents(media, &geometry, ino, i) {
                Ok(exts) => {
                    let mut prev_end = 0;
                    for e in exts {
                        if e.file_block < prev_end {
                            self.problem(
                                ProblemKind::BadTree(ino),
                                format!(
                                    "inode {ino}: extents overlap at file block {}",
                                    e.file_block
                                ),
                            );
                        }
                        prev_end = e.file_block + u64::from(e.len);
                        if prev_end > V1_MAX_FILE_SIZE / crate::format::BLOCK_SIZE {
                            *used |= IncompatFeatures::LARGE_FILES;
                        }
                        self.mark(e.dev_block, u64::from(e.len), owner);
                        counted += u64::from(e.len);
                    }
                }
                Err(e) => self.problem(ProblemKind::BadTree(ino), format!("inode {ino}: {e}")),
            }
            if counted != i.blocks {
                self.problem(
                    ProblemKind::BlockCount {
                        ino,
                        stored: i.blocks,
                        counted,
                    },
                    format!(
                        "inode {ino}: block count {} but extents hold {counted}",
                        i.blocks
                    ),
                );
            }
        } else if i.is_dir() {
            let t = Tree {
                kind: TreeKind::Directory,
                owner: ino,
                root: i.tree_root,
            };
            self.mark_tree(&t, owner);
        } else if i.is_symlink() && i.flags & inode_flags::INLINE_DATA == 0 {
            if geometry.is_data_range(i.tree_root, 1) {
                self.mark(i.tree_root, 1, owner);
            } else {
                self.problem(
                    ProblemKind::BadInode(ino),
                    format!(
                        "inode {ino}: symlink block {} outside the data area",
                        i.tree_root
                    ),
                );
            }
        }
        if i.xattr_block != 0 {
            match crate::meta::load_xattrs(media, &geometry, ino, i) {
                Ok(_) => self.mark(i.xattr_block, u64::from(i.xattr_blocks), Owner::Xattrs(ino)),
                Err(e) => self.problem(ProblemKind::BadInode(ino), format!("inode {ino}: {e}")),
            }
        }
    }
}

/// The directory inodes the check read, in increasing inode order (the order the table
/// lists them), found by binary search.
#[derive(Default)]
struct DirMap(Vec<(u64, DirFacts)>);

impl DirMap {
    fn get(&self, ino: u64) -> Option<DirFacts> {
        let at = self.0.binary_search_by_key(&ino, |(k, _)| *k).ok()?;
        Some(self.0[at].1)
    }
}

/// Checks the file system on `media`. Returns an error only when the superblock or inode
/// table is too damaged to look further.
pub fn check(shared: &Arc<dyn Media>) -> Result<Report> {
    check_with_progress(shared, &mut |_, _, _| {})
}

/// [`check`], telling `progress` how far it is.
///
/// Memory: one byte and one u32 per inode-table slot, the block bitmap twice (the one
/// referenced and the one on the media, one bit per block each), a name and a few words
/// per directory, and the problems found; nothing else grows with the number of inodes.
pub fn check_with_progress(shared: &Arc<dyn Media>, progress: ProgressFn<'_>) -> Result<Report> {
    let media = shared.as_ref();
    let (sb, geometry) = read_superblock(media)?;
    let state = read_state(media)?;
    let words = geometry.block_count.div_ceil(64) as usize;
    let mut c = Checker {
        media,
        geometry,
        refs: vec![0; words],
        report: Report::default(),
    };
    match crate::meta::read_backup_superblock(media) {
        Ok((b, _)) if b.uuid == sb.uuid && b.block_count == sb.block_count => {}
        _ => c.problem(
            ProblemKind::Backup,
            "backup superblock is damaged or differs from the primary".into(),
        ),
    }
    let (stored, max) = (sb.reserved_huge_regions(), geometry.max_huge_regions());
    if stored > max {
        c.problem(
            ProblemKind::HugeRegions { stored, max },
            format!(
                "superblock reserves {stored} 1 GiB regions for 1 GiB extents (huge_regions), \
                 the device has room for {max}"
            ),
        );
    }
    if !crate::journal::pending(media, &geometry)?.is_empty() {
        c.problem(
            ProblemKind::JournalOpen,
            "journal holds an interrupted transaction (not yet recovered)".into(),
        );
    }
    // Fixed metadata, inode-table chunks, bits past the end of the device.
    c.mark(0, geometry.meta_end, Owner::Named("fixed metadata"));
    for (first, count) in crate::meta::devices::reserved_blocks(media, &sb)? {
        c.mark(
            first,
            count,
            Owner::Named("gap between devices and member header"),
        );
    }
    let table = InodeTable::open(Arc::clone(shared), geometry)?;
    for chunk in table.chunk_blocks() {
        c.mark(chunk, CHUNK_BLOCKS, Owner::Named("inode table"));
    }
    for block in table.indirect_blocks() {
        c.mark(block, 1, Owner::Named("inode-table indirect block"));
    }
    bitmap::set_range(
        &mut c.refs,
        geometry.block_count,
        words as u64 * 64 - geometry.block_count,
    );
    // The allocated inodes, counted for the progress display; the per-inode arrays reach
    // the highest allocated number only (a table of empty chunks costs nothing).
    let chunks = table.chunk_count();
    let (mut total, mut highest) = (0u64, ROOT_INO);
    let mut in_chunk = Vec::new();
    for chunk in 0..chunks {
        in_chunk.clear();
        table.allocated_in_chunk(chunk, &mut in_chunk)?;
        total += in_chunk.len() as u64;
        highest = highest.max(in_chunk.last().copied().unwrap_or(0));
    }
    let slots = usize::try_from(highest + 1)
        .map_err(|_| crate::error::Error::corrupted("inode table", 0, "too many chunks"))?;
    let mut facts = vec![0u8; slots];
    // Non-directories: the stored link count less the entries found so far (wrapping), so
    // one array holds what two would (the stored count is read again for a mismatch).
    let mut links_left = vec![0u32; slots];

    // The orphan list.
    let orphan_tree = Tree {
        kind: TreeKind::Directory,
        owner: NULL_INO,
        root: state.orphan_head,
    };
    let mut orphans = Vec::new();
    if c.mark_tree(&orphan_tree, Owner::Named("orphan list")) {
        let _ = c.reader().scan(&orphan_tree, 0, &mut |k, _| {
            orphans.push(k);
            true
        });
    }
    for &o in &orphans {
        if let Some(f) = usize::try_from(o).ok().and_then(|o| facts.get_mut(o)) {
            *f |= ORPHAN_LISTED;
        }
    }

    // Every allocated inode, a chunk at a time: it decodes, and what it owns is sound.
    let mut used = IncompatFeatures::empty();
    let mut dirs = DirMap::default();
    let mut done = 0u64;
    for chunk in 0..chunks {
        progress("inodes", done, total);
        in_chunk.clear();
        table.allocated_in_chunk(chunk, &mut in_chunk)?;
        done += in_chunk.len() as u64;
        for &ino in &in_chunk {
            let i = match table.read(ino) {
                Ok(i) => i,
                Err(e) => {
                    c.problem(ProblemKind::BadInode(ino), format!("inode {ino}: {e}"));
                    continue;
                }
            };
            c.report.inodes += 1;
            c.check_contents(ino, &i, &mut used);
            // Past `highest` only if the table changed since it was counted (a device in
            // use): such an inode is left out.
            let Some(f) = facts.get_mut(ino as usize) else {
                continue;
            };
            let listed = *f & ORPHAN_LISTED != 0;
            *f |= PRESENT | (crate::format::dirent::type_byte(i.mode) & TYPE_MASK);
            if listed && !(i.nlink == 0 && i.flags & inode_flags::ORPHAN != 0) {
                c.problem(
                    ProblemKind::Orphan(ino),
                    format!("orphan list names inode {ino}, which is not an orphan"),
                );
            }
            if i.nlink == 0 && !listed {
                c.problem(
                    ProblemKind::Orphan(ino),
                    format!("inode {ino} has no links and is not on the orphan list"),
                );
            }
            if i.is_dir() {
                c.report.directories += 1;
                let d = DirFacts {
                    tree_root: i.tree_root,
                    size: i.size,
                    nlink: i.nlink,
                    parent: i.parent,
                };
                dirs.0.push((ino, d));
            } else {
                links_left[ino as usize] = i.nlink; // same bound as `facts`
            }
        }
    }
    progress("inodes", done, total);
    for &o in &orphans {
        let present = usize::try_from(o)
            .ok()
            .and_then(|o| facts.get(o))
            .is_some_and(|f| f & PRESENT != 0);
        if !present {
            c.problem(
                ProblemKind::Orphan(o),
                format!("orphan list names inode {o}, which is not an orphan"),
            );
        }
    }
    let missing = used.difference(sb.incompat_features());
    if !missing.is_empty() {
        c.problem(
            ProblemKind::MissingFeatures(missing.bits()),
            format!(
                "superblock lacks the features {} that inodes use (an older pmfs would take \
                 those inodes for damage)",
                missing.names()
            ),
        );
    }

    // The tree from the root: entries, link counts, parents, reachability.
    let reader = TreeReader::new(media, &geometry);
    let mut names = DirNames::default();
    let mut queue = VecDeque::from([ROOT_INO]);
    if let Some(f) = facts.get_mut(ROOT_INO as usize) {
        *f |= REACHED;
    }
    let mut listed_dirs = 0u64;
    while let Some(dir) = queue.pop_front() {
        if listed_dirs % DIRS_PER_PROGRESS == 0 {
            progress("directories", listed_dirs, c.report.directories);
        }
        listed_dirs += 1;
        let Some(d) = dirs.get(dir) else {
            c.problem(
                ProblemKind::BadInode(dir),
                format!(
                    "directory inode {dir} ({}/) is not allocated",
                    names.base(dir)
                ),
            );
            continue;
        };
        let t = Tree {
            kind: TreeKind::Directory,
            owner: dir,
            root: d.tree_root,
        };
        // The directory's path, built for the first message that needs it.
        let mut base: Option<String> = None;
        let (mut entries, mut subdirs) = (0u64, 0u32);
        let listing = crate::meta::dir::list(&reader, &t, 0, &mut |e| {
            entries += 1;
            let child = e.ino;
            let child_path = |base: &mut Option<String>, names: &DirNames| {
                join_path(base.get_or_insert_with(|| names.base(dir)), &e.name)
            };
            let slot = usize::try_from(child).ok().filter(|&s| s < facts.len());
            let Some(slot) = slot.filter(|&s| facts[s] & PRESENT != 0) else {
                let p = child_path(&mut base, &names);
                c.problem(
                    ProblemKind::BadEntry {
                        dir,
                        name: e.name.clone(),
                    },
                    format!("{p}: entry points to free or damaged inode {child}"),
                );
                return true;
            };
            let kind = facts[slot] & TYPE_MASK;
            if e.kind != kind {
                let p = child_path(&mut base, &names);
                c.problem(
                    ProblemKind::BadEntry {
                        dir,
                        name: e.name.clone(),
                    },
                    format!("{p}: entry type does not match inode {child}"),
                );
            }
            if kind != DIR_TYPE {
                links_left[slot] = links_left[slot].wrapping_sub(1);
                facts[slot] |= REACHED;
                return true;
            }
            subdirs += 1;
            let parent = dirs.get(child).map_or(NULL_INO, |f| f.parent);
            if parent != dir {
                let p = child_path(&mut base, &names);
                c.problem(
                    ProblemKind::BadParent { ino: child },
                    format!("{p}/: '..' is inode {parent} instead of {dir}"),
                );
            }
            if facts[slot] & REACHED != 0 {
                let p = child_path(&mut base, &names);
                c.problem(
                    ProblemKind::BadEntry {
                        dir,
                        name: e.name.clone(),
                    },
                    format!("{p}/: directory reached twice (hard link or cycle)"),
                );
                return true;
            }
            facts[slot] |= REACHED;
            names.0.insert(child, (dir, e.name.into_boxed_slice()));
            queue.push_back(child);
            true
        });
        let path = base.unwrap_or_else(|| names.base(dir));
        if let Err(e) = listing {
            c.problem(
                ProblemKind::BadTree(dir),
                format!("directory {path}/ (inode {dir}): {e}"),
            );
        }
        if d.size != entries {
            c.problem(
                ProblemKind::DirSize {
                    ino: dir,
                    stored: d.size,
                    counted: entries,
                },
                format!(
                    "directory {path}/ (inode {dir}): size {} but {entries} entries",
                    d.size
                ),
            );
        }
        if d.nlink != 2 + subdirs {
            c.problem(
                ProblemKind::LinkCount {
                    ino: dir,
                    stored: d.nlink,
                    counted: 2 + subdirs,
                },
                format!(
                    "directory {path}/ (inode {dir}): link count {} should be {}",
                    d.nlink,
                    2 + subdirs
                ),
            );
        }
    }
    progress("directories", listed_dirs, c.report.directories);

    // Reachability and the link counts of non-directories. A wrong count's message names
    // the file's path, found below once every problem is known.
    let mut link_problems = Vec::new();
    for (slot, &f) in facts.iter().enumerate() {
        let ino = slot as u64;
        if f & PRESENT == 0 || ino == ROOT_INO || ino == DEFERRED_FREE_INO {
            continue;
        }
        if f & ORPHAN_LISTED != 0 {
            continue;
        }
        if f & REACHED == 0 {
            c.problem(
                ProblemKind::Unreachable(ino),
                format!("inode {ino} is allocated but not reachable from the root"),
            );
            continue;
        }
        if f & TYPE_MASK != DIR_TYPE && links_left[slot] != 0 {
            // It decoded in the first pass and the device is not written during a check.
            let stored = table.read(ino).map_or(0, |i| i.nlink);
            let counted = stored.wrapping_sub(links_left[slot]);
            link_problems.push(c.report.problems.len());
            c.problem(
                ProblemKind::LinkCount {
                    ino,
                    stored,
                    counted,
                },
                String::new(),
            );
        }
    }
    c.report.dirs = names;
    c.report.paths = file_paths(&reader, &c.report, &facts, &dirs);
    for at in link_problems {
        let p = &mut c.report.problems[at];
        if let ProblemKind::LinkCount {
            ino,
            stored,
            counted,
        } = p.kind
        {
            let path = c.report.paths.get(&ino).map_or("", String::as_str);
            p.message = format!("{path} (inode {ino}): link count {stored} but {counted} entries");
        }
    }

    // The bitmap must equal the referenced blocks. Uninitialised regions read as free (a
    // referenced block in one is "in use but marked free"); with a damaged summary, every
    // region is read as it is.
    progress("block bitmap", 0, geometry.block_count);
    let summary = match SpaceSummary::read(media, &geometry) {
        Ok(s) => s,
        Err(e) => {
            c.problem(ProblemKind::SpaceSummary { region: None }, e.to_string());
            None
        }
    };
    let on_media = space::read_bitmap_bytes(media, &geometry, summary.as_ref())?;
    if let Some(s) = summary.as_ref().filter(|s| s.counts_valid) {
        let counted = space::entries_for_bitmap(&geometry, Some(s), &on_media);
        for (r, (stored, counted)) in s.regions.iter().zip(&counted).enumerate() {
            if stored.free != counted.free {
                c.problem(
                    ProblemKind::SpaceSummary {
                        region: Some(r as u64),
                    },
                    format!(
                        "space summary: region {r} counts {} free blocks, its bitmap {}",
                        stored.free, counted.free
                    ),
                );
            }
        }
    }
    let mut run: Option<(bool, u64, u64)> = None; // (leaked?, first, count)
    let flush = |c: &mut Checker<'_>, run: Option<(bool, u64, u64)>| {
        if let Some((leaked, first, count)) = run {
            if leaked {
                c.problem(
                    ProblemKind::Leaked { first, count },
                    format!(
                        "blocks {first}..{} are marked used but belong to nothing",
                        first + count
                    ),
                );
            } else {
                c.problem(
                    ProblemKind::Unmarked { first, count },
                    format!(
                        "blocks {first}..{} are in use but marked free",
                        first + count
                    ),
                );
            }
        }
    };
    for (w, on_disk) in bitmap::le_words(&on_media).enumerate().take(words) {
        let want = c.refs[w];
        c.report.used_blocks += u64::from(want.count_ones());
        let mut diff = on_disk ^ want;
        while diff != 0 {
            let bit = u64::from(diff.trailing_zeros());
            diff &= diff - 1;
            let b = w as u64 * 64 + bit;
            let leaked = on_disk & (1 << bit) != 0;
            match run {
                Some((l, f, n)) if l == leaked && f + n == b => run = Some((l, f, n + 1)),
                other => {
                    flush(&mut c, other);
                    run = Some((leaked, b, 1));
                }
            }
        }
    }
    flush(&mut c, run);
    progress("block bitmap", geometry.block_count, geometry.block_count);
    c.report.referenced = std::mem::take(&mut c.refs);
    Ok(c.report)
}

/// The inode a problem is about, when it names one.
fn problem_inode(kind: &ProblemKind) -> Option<u64> {
    use ProblemKind as K;
    match kind {
        K::BadInode(i) | K::BadTree(i) | K::Orphan(i) => Some(*i),
        K::BlockCount { ino, .. } | K::LinkCount { ino, .. } | K::DirSize { ino, .. } => Some(*ino),
        _ => None,
    }
}

/// Paths of the reachable non-directories that problems name: a second walk of the
/// directories, done only when there are such problems, stopping once all are named. Each
/// gets the first entry found naming it.
fn file_paths(
    reader: &TreeReader<'_>,
    report: &Report,
    facts: &[u8],
    dirs: &DirMap,
) -> HashMap<u64, String> {
    let mut wanted: HashSet<u64> = report
        .problems
        .iter()
        .filter_map(|p| problem_inode(&p.kind))
        .filter(|&ino| {
            usize::try_from(ino)
                .ok()
                .and_then(|s| facts.get(s))
                .is_some_and(|f| f & REACHED != 0 && f & TYPE_MASK != DIR_TYPE)
        })
        .collect();
    let mut found = HashMap::new();
    let reached_dirs = std::iter::once(ROOT_INO).chain(report.dirs.0.keys().copied());
    for dir in reached_dirs {
        if wanted.is_empty() {
            break;
        }
        let Some(d) = dirs.get(dir) else {
            continue;
        };
        let t = Tree {
            kind: TreeKind::Directory,
            owner: dir,
            root: d.tree_root,
        };
        let _ = crate::meta::dir::list(reader, &t, 0, &mut |e| {
            if wanted.remove(&e.ino) {
                found.insert(e.ino, join_path(&report.dirs.base(dir), &e.name));
            }
            !wanted.is_empty()
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::RecordingDevice;
    use crate::fs::{Ctx, Fs, MountOptions};

    /// The progress callback sees each phase from 0 to its total, in order, and the totals
    /// are what the check counted.
    #[test]
    fn progress_counts_every_inode_and_directory() {
        let dev = Arc::new(RecordingDevice::new(32 << 20));
        crate::mkfs::format(dev.as_ref(), &crate::mkfs::MkfsOptions::default()).unwrap();
        let media: Arc<dyn Media> = dev;
        let fs = Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap();
        for d in 0..3 {
            let dir = fs
                .mkdir(&Ctx::ROOT, ROOT_INO, format!("d{d}").as_bytes(), 0o755)
                .unwrap()
                .ino;
            for f in 0..10 {
                let name = format!("f{f}");
                fs.mknod(&Ctx::ROOT, dir, name.as_bytes(), 0o100644, 0)
                    .unwrap();
            }
        }
        fs.shutdown().unwrap();
        drop(fs);
        let mut calls: Vec<(String, u64, u64)> = Vec::new();
        let report = check_with_progress(&media, &mut |phase, done, total| {
            calls.push((phase.to_string(), done, total));
        })
        .unwrap();
        assert!(report.problems.is_empty(), "{:#?}", report.problems);
        // The root, 3 directories, 30 files and the reserved deferred-free inode.
        assert_eq!((report.inodes, report.directories), (35, 4));
        let phases: Vec<&str> = calls.iter().map(|c| c.0.as_str()).collect();
        let mut order = phases.clone();
        order.dedup();
        assert_eq!(
            order,
            ["inodes", "directories", "block bitmap"],
            "{calls:?}"
        );
        for phase in ["inodes", "directories", "block bitmap"] {
            let seen: Vec<_> = calls.iter().filter(|c| c.0 == phase).collect();
            assert_eq!(seen[0].1, 0, "{phase} starts at 0: {calls:?}");
            assert!(seen.windows(2).all(|w| w[0].1 <= w[1].1), "{calls:?}");
            let last = seen.last().unwrap();
            assert_eq!(last.1, last.2, "{phase} ends at its total: {calls:?}");
        }
        let total = |phase: &str| calls.iter().find(|c| c.0 == phase).unwrap().2;
        assert_eq!(total("inodes"), report.inodes);
        assert_eq!(total("directories"), report.directories);
    }
}
