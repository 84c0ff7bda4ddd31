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
    let p = format!("{base}{sep}{}", String::from_utf8_lossy(name));
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
    /// Path (best known) of each inode reached from the root; for messages.
    pub paths: HashMap<u64, String>,
    /// The block bitmap the device should have: one bit per block (bit `b % 64` of word
    /// `b / 64`), set for every block some object references (and the bits past the end of
    /// the device). fsck rebuilds the on-media bitmap from it.
    pub referenced: Vec<u64>,
}

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

    /// Marks blocks as referenced by `owner`.
    fn mark(&mut self, first: u64, count: u64, owner: &str) {
        for b in first..first + count {
            if b >= self.refs.len() as u64 * 64 {
                self.problem(
                    ProblemKind::DoubleUse { block: b },
                    format!("block {b} of {owner} is outside the device"),
                );
                return;
            }
            if bitmap::get(&self.refs, b) {
                self.problem(
                    ProblemKind::DoubleUse { block: b },
                    format!("block {b} of {owner} is also used by another object"),
                );
                return;
            }
            bitmap::set(&mut self.refs, b);
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
    fn mark_tree(&mut self, tree: &Tree, owner: &str) -> bool {
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
}

/// The inodes the check read, in increasing inode order (the order the table lists them):
/// a sorted vector, found by binary search, which at millions of inodes takes half the
/// memory of a hash map of them and no time rehashing.
#[derive(Default)]
struct InodeMap(Vec<(u64, Inode)>);

impl InodeMap {
    fn get(&self, ino: &u64) -> Option<&Inode> {
        let at = self.0.binary_search_by_key(ino, |(k, _)| *k).ok()?;
        Some(&self.0[at].1)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn values(&self) -> impl Iterator<Item = &Inode> {
        self.0.iter().map(|(_, i)| i)
    }
}

/// Checks the file system on `media`. Returns an error only when the superblock or inode
/// table is too damaged to look further.
pub fn check(shared: &Arc<dyn Media>) -> Result<Report> {
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
    c.mark(0, geometry.meta_end, "fixed metadata");
    for (first, count) in crate::meta::devices::reserved_blocks(media, &sb)? {
        c.mark(first, count, "gap between devices and member header");
    }
    let table = InodeTable::open(Arc::clone(shared), geometry)?;
    for chunk in table.chunk_blocks() {
        c.mark(chunk, CHUNK_BLOCKS, "inode table");
    }
    for block in table.indirect_blocks() {
        c.mark(block, 1, "inode-table indirect block");
    }
    bitmap::set_range(
        &mut c.refs,
        geometry.block_count,
        words as u64 * 64 - geometry.block_count,
    );

    // Every allocated inode.
    let mut inodes = InodeMap::default();
    for ino in table.allocated()? {
        match table.read(ino) {
            Ok(i) => inodes.0.push((ino, i)),
            Err(e) => c.problem(ProblemKind::BadInode(ino), format!("inode {ino}: {e}")),
        }
    }
    c.report.inodes = inodes.len() as u64;

    // Orphans.
    let orphan_tree = Tree {
        kind: TreeKind::Directory,
        owner: NULL_INO,
        root: state.orphan_head,
    };
    let mut orphans = Vec::new();
    if c.mark_tree(&orphan_tree, "orphan list") {
        let _ = c.reader().scan(&orphan_tree, 0, &mut |k, _| {
            orphans.push(k);
            true
        });
    }
    let orphan_set: HashSet<u64> = orphans.iter().copied().collect();
    for &o in &orphans {
        match inodes.get(&o) {
            Some(i) if i.nlink == 0 && i.flags & inode_flags::ORPHAN != 0 => {}
            _ => c.problem(
                ProblemKind::Orphan(o),
                format!("orphan list names inode {o}, which is not an orphan"),
            ),
        }
    }

    // Version-2 features used by inodes (extents past 2^44 are added below).
    let mut used = IncompatFeatures::empty();
    for i in inodes.values() {
        if i.flags & inode_flags::ATTR_FLAGS != 0 {
            used |= IncompatFeatures::INODE_ATTR_FLAGS;
        }
        if i.size > V1_MAX_FILE_SIZE {
            used |= IncompatFeatures::LARGE_FILES;
        }
    }

    // Per-inode contents: extents, trees, xattrs, symlink blocks.
    for &(ino, i) in &inodes.0 {
        let owner = format!("inode {ino}");
        if i.is_reg() {
            let mut counted = 0u64;
            let exts = if i.flags & inode_flags::TREE != 0 {
                let t = Tree {
                    kind: TreeKind::Extents,
                    owner: ino,
                    root: i.tree_root,
                };
                c.mark_tree(&t, &owner);
                crate::meta::file_extents(media, &geometry, ino, &i)
            } else {
                crate::meta::file_extents(media, &geometry, ino, &i)
            };
            match exts {
                Ok(exts) => {
                    let mut prev_end = 0;
                    for e in exts {
                        if e.file_block < prev_end {
                            c.problem(
                                ProblemKind::BadTree(ino),
                                format!(
                                    "inode {ino}: extents overlap at file block {}",
                                    e.file_block
                                ),
                            );
                        }
                        prev_end = e.file_block + u64::from(e.len);
                        if prev_end > V1_MAX_FILE_SIZE / crate::format::BLOCK_SIZE {
                            used |= IncompatFeatures::LARGE_FILES;
                        }
                        c.mark(e.dev_block, u64::from(e.len), &owner);
                        counted += u64::from(e.len);
                    }
                }
                Err(e) => c.problem(ProblemKind::BadTree(ino), format!("inode {ino}: {e}")),
            }
            if counted != i.blocks {
                c.problem(
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
            c.report.directories += 1;
            let t = Tree {
                kind: TreeKind::Directory,
                owner: ino,
                root: i.tree_root,
            };
            c.mark_tree(&t, &owner);
        } else if i.is_symlink() && i.flags & inode_flags::INLINE_DATA == 0 {
            if geometry.is_data_range(i.tree_root, 1) {
                c.mark(i.tree_root, 1, &owner);
            } else {
                c.problem(
                    ProblemKind::BadInode(ino),
                    format!(
                        "inode {ino}: symlink block {} outside the data area",
                        i.tree_root
                    ),
                );
            }
        }
        if i.xattr_block != 0 {
            match crate::meta::load_xattrs(media, &geometry, ino, &i) {
                Ok(_) => c.mark(
                    i.xattr_block,
                    u64::from(i.xattr_blocks),
                    &format!("xattrs of inode {ino}"),
                ),
                Err(e) => c.problem(ProblemKind::BadInode(ino), format!("inode {ino}: {e}")),
            }
        }
        if i.nlink == 0 && !orphan_set.contains(&ino) {
            c.problem(
                ProblemKind::Orphan(ino),
                format!("inode {ino} has no links and is not on the orphan list"),
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
    let mut links: HashMap<u64, u32> = HashMap::new();
    let mut reached: HashMap<u64, ()> = HashMap::new();
    let mut queue = VecDeque::from([(ROOT_INO, String::new())]);
    reached.insert(ROOT_INO, ());
    c.report.paths.insert(ROOT_INO, "/".into());
    while let Some((dir, path)) = queue.pop_front() {
        let Some(d) = inodes.get(&dir).copied() else {
            c.problem(
                ProblemKind::BadInode(dir),
                format!("directory inode {dir} ({path}/) is not allocated"),
            );
            continue;
        };
        let t = Tree {
            kind: TreeKind::Directory,
            owner: dir,
            root: d.tree_root,
        };
        let mut entries = Vec::new();
        if let Err(e) = crate::meta::list_dir(&c.reader(), &t, &mut entries) {
            c.problem(
                ProblemKind::BadTree(dir),
                format!("directory {path}/ (inode {dir}): {e}"),
            );
        }
        let mut subdirs = 0u32;
        for (name, child, kind) in entries.iter().cloned() {
            let child_path = join_path(&path, &name);
            let Some(ci) = inodes.get(&child).copied() else {
                c.problem(
                    ProblemKind::BadEntry {
                        dir,
                        name: name.clone(),
                    },
                    format!("{child_path}: entry points to free or damaged inode {child}"),
                );
                continue;
            };
            if kind != crate::format::dirent::type_byte(ci.mode) {
                c.problem(
                    ProblemKind::BadEntry {
                        dir,
                        name: name.clone(),
                    },
                    format!("{child_path}: entry type does not match inode {child}"),
                );
            }
            *links.entry(child).or_default() += 1;
            if ci.is_dir() {
                subdirs += 1;
                if ci.parent != dir {
                    c.problem(
                        ProblemKind::BadParent { ino: child },
                        format!(
                            "{child_path}/: '..' is inode {} instead of {dir}",
                            ci.parent
                        ),
                    );
                }
                if reached.insert(child, ()).is_some() {
                    c.problem(
                        ProblemKind::BadEntry {
                            dir,
                            name: name.clone(),
                        },
                        format!("{child_path}/: directory reached twice (hard link or cycle)"),
                    );
                    continue;
                }
                c.report.paths.insert(child, child_path.clone());
                queue.push_back((child, child_path));
            } else if reached.insert(child, ()).is_none() {
                c.report.paths.insert(child, child_path);
            }
        }
        if d.size != entries.len() as u64 {
            c.problem(
                ProblemKind::DirSize {
                    ino: dir,
                    stored: d.size,
                    counted: entries.len() as u64,
                },
                format!(
                    "directory {path}/ (inode {dir}): size {} but {} entries",
                    d.size,
                    entries.len()
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
    for &(ino, i) in &inodes.0 {
        if ino == ROOT_INO || ino == DEFERRED_FREE_INO || orphan_set.contains(&ino) {
            continue;
        }
        if !reached.contains_key(&ino) {
            c.problem(
                ProblemKind::Unreachable(ino),
                format!("inode {ino} is allocated but not reachable from the root"),
            );
            continue;
        }
        if !i.is_dir() {
            let counted = links.get(&ino).copied().unwrap_or(0);
            if counted != i.nlink {
                let path = c.report.paths.get(&ino).cloned().unwrap_or_default();
                c.problem(
                    ProblemKind::LinkCount {
                        ino,
                        stored: i.nlink,
                        counted,
                    },
                    format!(
                        "{path} (inode {ino}): link count {} but {counted} entries",
                        i.nlink
                    ),
                );
            }
        }
    }

    // The bitmap must equal the referenced blocks. Uninitialised regions read as free (a
    // referenced block in one is "in use but marked free"); with a damaged summary, every
    // region is read as it is.
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
    c.report.referenced = std::mem::take(&mut c.refs);
    Ok(c.report)
}
