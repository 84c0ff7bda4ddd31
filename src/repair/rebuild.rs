//! The object-level repair: every inode, extent map, directory and link count, walked the way
//! the checker walks them but leniently, turned into a plan, and written back through journal
//! transactions.
//!
//! Order of the walk (the same order in which the checker claims blocks, so that when two
//! objects claim one block the same one wins in both):
//! 1. claim the fixed metadata and the inode-table chunks;
//! 2. decode every allocated inode: valid, salvageable (only the checksum is wrong and every
//!    field is plausible: the checksum is recomputed), or damaged (cleared);
//! 3. the orphan list: orphans are freed (as mount would), entries naming non-orphans dropped;
//! 4. contents of each inode in inode order: extent maps, directory trees, symlink blocks,
//!    xattr areas; a piece that is invalid or claimed by an earlier object is dropped and the
//!    map or tree is rebuilt from what is left;
//! 5. the namespace from the root: entries that point nowhere, to damaged inodes, or to a
//!    directory already reached (a second link to a directory, or a cycle) are removed, wrong
//!    types and `..` fixed;
//! 6. inodes not reached are freed when they have no links, else moved to /lost+found
//!    (created if missing) under the name `#INO`: for a directory, the topmost unreachable
//!    ancestor is moved, so whole subtrees stay together;
//! 7. link counts, directory sizes and block counts are set from what was counted.
//!
//! Then the writes, each a transaction: freed inodes, then each changed inode together with
//! its rebuilt tree (new nodes are written to blocks no object claims, and their bitmap bits
//! set in the same transaction, so a crash leaves the old or the new tree, never a mix).

use super::bits::Bits;
use super::tree;
use super::{Action, Class, RepairMode};
use crate::device::Media;
use crate::error::{Error, Result};
use crate::format::dirent::{self, DirEntry as Entry, name_hash};
use crate::format::space::REGION_BLOCKS;
use crate::format::{
    CHUNK_BLOCKS, DEFERRED_FREE_INO, ExtentRecord, FIRST_USER_INO, FsState, Geometry,
    INLINE_EXTENTS, INODE_BITMAP_OFFSET, INODE_INLINE_LEN, INODE_SIZE, INODES_PER_CHUNK, Inode,
    MAX_FILE_SIZE, NULL_INO, ROOT_INO, STATE_OFFSET, TreeKind, USABLE_INODES_PER_CHUNK,
    blocks_to_bytes, file_type, inode_flags,
};
use crate::journal::{Journal, Tx};
use crate::meta::InodeTable;
use crate::meta::read_state;
use crate::meta::space::{self, SpaceSummary};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use zerocopy::{FromBytes, IntoBytes};

/// Name of the directory unreachable inodes are moved to.
pub const LOST_FOUND: &[u8] = b"lost+found";

fn type_byte(i: &Inode) -> u8 {
    dirent::type_byte(i.mode)
}

fn type_name(i: &Inode) -> &'static str {
    match i.file_type() {
        file_type::S_IFDIR => "directory",
        file_type::S_IFREG => "regular file",
        file_type::S_IFLNK => "symlink",
        file_type::S_IFCHR => "character device",
        file_type::S_IFBLK => "block device",
        file_type::S_IFIFO => "fifo",
        _ => "socket",
    }
}

/// Every field of an inode that failed to decode is plausible (only its checksum is wrong).
fn plausible(i: &Inode) -> bool {
    i.mode != 0
        && file_type::is_valid(i.mode)
        && i.flags & !inode_flags::ALL == 0
        && i.size <= MAX_FILE_SIZE
        && i.inline_count as usize <= INODE_INLINE_LEN
}

#[derive(Debug)]
struct Item {
    inode: Inode,
    /// The inode must be written.
    dirty: bool,
    /// A regular file whose extent map is rewritten with these extents.
    new_map: Option<Vec<ExtentRecord>>,
    /// Directories: the entries as they will be.
    entries: Vec<Entry>,
    /// The directory tree is rewritten from `entries`.
    rebuild_dir: bool,
    /// Created by the repair: its inode bit must be set.
    created: bool,
}

impl Item {
    fn new(inode: Inode) -> Self {
        Self {
            inode,
            dirty: false,
            new_map: None,
            entries: Vec::new(),
            rebuild_dir: false,
            created: false,
        }
    }
}

pub(super) struct Rebuild<'a> {
    media: &'a Arc<dyn Media>,
    g: Geometry,
    mode: &'a RepairMode,
    table: InodeTable,
    claimed: Bits,
    items: BTreeMap<u64, Item>,
    /// Inodes to free, with the generation their empty slot keeps.
    free: BTreeMap<u64, u64>,
    /// Damaged inodes that may not be cleared: their blocks are unknown, so nothing may be
    /// allocated while they exist.
    untouchable: HashSet<u64>,
    orphans: std::collections::BTreeSet<u64>,
    reset_orphans: bool,
    reached: HashSet<u64>,
    links: HashMap<u64, u32>,
    dir_paths: HashMap<u64, String>,
    actions: &'a mut Vec<Action>,
    /// Allocation cursor for new tree nodes.
    cursor: u64,
    /// Keys and names of directories that gained entries (lost+found, the root).
    added: HashMap<u64, (HashSet<u64>, HashSet<Vec<u8>>)>,
}

impl<'a> Rebuild<'a> {
    pub(super) fn new(
        media: &'a Arc<dyn Media>,
        g: Geometry,
        mode: &'a RepairMode,
        actions: &'a mut Vec<Action>,
    ) -> Result<Self> {
        let table = InodeTable::open(Arc::clone(media), g)?;
        Ok(Self {
            media,
            g,
            mode,
            table,
            claimed: Bits::new(g.block_count),
            items: BTreeMap::new(),
            free: BTreeMap::new(),
            untouchable: HashSet::new(),
            orphans: std::collections::BTreeSet::new(),
            reset_orphans: false,
            reached: HashSet::new(),
            links: HashMap::new(),
            dir_paths: HashMap::new(),
            actions,
            cursor: g.meta_end,
            added: HashMap::new(),
        })
    }

    fn allow(&self, c: Class) -> bool {
        self.mode.allows(c) || (c == Class::Checksums && self.mode.allows(Class::Inodes))
    }

    fn act(&mut self, class: Class, message: String) {
        self.actions.push(Action { class, message });
    }

    /// Path of an inode for messages.
    fn path_of(&self, dir: u64, name: &[u8]) -> String {
        let base = self.dir_paths.get(&dir).map_or("?", String::as_str);
        crate::check::join_path(base, name)
    }

    pub(super) fn run(mut self) -> Result<()> {
        self.claim_fixed()?;
        self.decode_inodes()?;
        self.reserved_inodes()?;
        self.orphan_list()?;
        let inos: Vec<u64> = self.items.keys().copied().collect();
        for ino in inos {
            self.contents(ino)?;
        }
        self.namespace();
        self.unreachable()?;
        self.counts();
        self.write()
    }

    fn claim_fixed(&mut self) -> Result<()> {
        self.claimed.set_range(0, self.g.meta_end);
        // Several devices: the gaps between members and the member headers.
        let (sb, _) = crate::meta::read_superblock(self.media.as_ref())?;
        for (first, count) in crate::meta::devices::reserved_blocks(self.media.as_ref(), &sb)? {
            self.claimed.set_range(first, count);
        }
        for c in self.table.chunk_blocks() {
            self.claimed.set_range(c, CHUNK_BLOCKS);
        }
        for b in self.table.indirect_blocks() {
            self.claimed.set_range(b, 1);
        }
        let end = self.claimed.len();
        self.claimed
            .set_range(self.g.block_count, end - self.g.block_count);
        Ok(())
    }

    fn raw_inode(&self, ino: u64) -> Result<[u8; INODE_SIZE as usize]> {
        let mut raw = [0u8; INODE_SIZE as usize];
        self.media.read(self.table.offset(ino)?, &mut raw)?;
        Ok(raw)
    }

    /// The generation an inode the repair creates in slot `ino` gets: the core's rule
    /// (`InodeTable::next_generation`).
    fn next_generation(&self, ino: u64) -> u64 {
        self.table.next_generation(ino)
    }

    fn decode_inodes(&mut self) -> Result<()> {
        for ino in self.table.allocated()? {
            let raw = self.raw_inode(ino)?;
            let Ok(loose) = Inode::read_from_bytes(&raw) else {
                continue;
            };
            match Inode::decode(&raw) {
                Ok(i) if i.mode != 0 => {
                    self.items.insert(ino, Item::new(i));
                }
                Ok(i) => {
                    if self.allow(Class::Inodes) {
                        self.free.insert(ino, i.generation);
                        self.act(
                            Class::Inodes,
                            format!("inode {ino}: marked in use but its slot is empty: freed"),
                        );
                    } else {
                        self.untouchable.insert(ino);
                    }
                }
                Err(e) if plausible(&loose) && self.allow(Class::Checksums) => {
                    let mut item = Item::new(loose);
                    item.dirty = true;
                    self.items.insert(ino, item);
                    self.act(
                        Class::Checksums,
                        format!("inode {ino}: {e}: every field is plausible: checksum recomputed"),
                    );
                }
                Err(e) => {
                    if self.allow(Class::Inodes) {
                        self.free.insert(ino, loose.generation);
                        self.act(
                            Class::Inodes,
                            format!("inode {ino}: damaged ({e}): cleared"),
                        );
                    } else {
                        self.untouchable.insert(ino);
                    }
                }
            }
        }
        Ok(())
    }

    /// The root must be a directory and the deferred-free inode a regular file.
    fn reserved_inodes(&mut self) -> Result<()> {
        let root_ok = self.items.get(&ROOT_INO).is_some_and(|i| i.inode.is_dir());
        if !root_ok && self.allow(Class::Inodes) {
            // Keep the old directory tree when it is still a directory tree of inode 1.
            let raw = self.raw_inode(ROOT_INO)?;
            let old_root = Inode::read_from_bytes(&raw).map_or(0, |i| i.tree_root);
            let w = tree::walk(
                self.media.as_ref(),
                &self.g,
                TreeKind::Directory,
                ROOT_INO,
                old_root,
                &self.claimed,
            )?;
            let keep = w.damage.is_none() && !w.nodes.is_empty();
            let mut i = new_dir_inode(0o755, ROOT_INO, self.next_generation(ROOT_INO));
            if keep {
                i.tree_root = old_root;
            }
            self.free.remove(&ROOT_INO);
            self.untouchable.remove(&ROOT_INO);
            let mut item = Item::new(i);
            item.dirty = true;
            item.created = !self.table.is_allocated(ROOT_INO);
            self.items.insert(ROOT_INO, item);
            self.act(
                Class::Inodes,
                if keep {
                    "root directory inode damaged: rebuilt around its directory tree".into()
                } else {
                    "root directory inode damaged: recreated empty (its files go to /lost+found)"
                        .into()
                },
            );
        }
        let deferred_ok = self
            .items
            .get(&DEFERRED_FREE_INO)
            .is_some_and(|i| i.inode.is_reg());
        if !deferred_ok && self.allow(Class::Inodes) {
            let i = Inode::new(
                file_type::S_IFREG,
                1,
                crate::meta::now_ns(),
                self.next_generation(DEFERRED_FREE_INO),
            );
            self.free.remove(&DEFERRED_FREE_INO);
            self.untouchable.remove(&DEFERRED_FREE_INO);
            let mut item = Item::new(i);
            item.dirty = true;
            item.created = !self.table.is_allocated(DEFERRED_FREE_INO);
            self.items.insert(DEFERRED_FREE_INO, item);
            self.act(
                Class::Inodes,
                format!("reserved inode {DEFERRED_FREE_INO} damaged: recreated"),
            );
        }
        Ok(())
    }

    fn orphan_list(&mut self) -> Result<()> {
        let st = read_state(self.media.as_ref())?;
        let w = tree::walk(
            self.media.as_ref(),
            &self.g,
            TreeKind::Directory,
            NULL_INO,
            st.orphan_head,
            &self.claimed,
        )?;
        self.orphans = w.records.iter().map(|(k, _)| *k).collect();
        if !self.allow(Class::Orphans) {
            for &b in &w.nodes {
                self.claimed.set(b);
            }
            return Ok(());
        }
        if st.orphan_head != 0 {
            self.reset_orphans = true;
            if let Some(why) = &w.damage {
                self.act(
                    Class::Orphans,
                    format!("orphan list damaged ({why}): rebuilt"),
                );
            }
        }
        let orphans = self.orphans.clone();
        for o in orphans {
            match self.items.get_mut(&o) {
                Some(it) if it.inode.nlink == 0 && o != ROOT_INO && o != DEFERRED_FREE_INO => {
                    let g = it.inode.generation;
                    self.items.remove(&o);
                    self.free.insert(o, g);
                    self.act(
                        Class::Orphans,
                        format!("orphan inode {o} (unlinked while open): freed"),
                    );
                }
                Some(it) => {
                    if it.inode.flags & inode_flags::ORPHAN != 0 {
                        it.inode.flags &= !inode_flags::ORPHAN;
                        it.dirty = true;
                    }
                    self.act(
                        Class::Orphans,
                        format!(
                            "orphan list names inode {o}, which has links: removed from the list"
                        ),
                    );
                }
                None => self.act(
                    Class::Orphans,
                    format!(
                        "orphan list names inode {o}, which is not in use: removed from the list"
                    ),
                ),
            }
        }
        self.orphans.clear();
        Ok(())
    }

    fn contents(&mut self, ino: u64) -> Result<()> {
        let Some(inode) = self.items.get(&ino).map(|i| i.inode) else {
            return Ok(());
        };
        if inode.is_reg() {
            self.file_map(ino, &inode)?;
        } else if inode.is_dir() {
            self.dir_tree(ino, &inode)?;
        } else if inode.is_symlink() && inode.flags & inode_flags::INLINE_DATA == 0 {
            let b = inode.tree_root;
            if self.g.is_data_range(b, 1) && !self.claimed.get(b) {
                self.claimed.set(b);
            } else if self.allow(Class::Inodes) {
                self.items.remove(&ino);
                self.free.insert(ino, inode.generation);
                self.act(
                    Class::Inodes,
                    format!("symlink inode {ino}: target block {b} is invalid or in use: cleared"),
                );
                return Ok(());
            }
        }
        if inode.xattr_block != 0 {
            let n = u64::from(inode.xattr_blocks);
            let ok = crate::meta::load_xattrs(self.media.as_ref(), &self.g, ino, &inode).is_ok()
                && !self.claimed.any(inode.xattr_block, n);
            if ok {
                self.claimed.set_range(inode.xattr_block, n);
            } else if self.allow(Class::Inodes) {
                if let Some(it) = self.items.get_mut(&ino) {
                    it.inode.xattr_block = 0;
                    it.inode.xattr_blocks = 0;
                    it.dirty = true;
                }
                self.act(
                    Class::Inodes,
                    format!(
                        "inode {ino}: extended-attribute area (blocks {}..{}) damaged or in use: dropped",
                        inode.xattr_block,
                        inode.xattr_block.saturating_add(n)
                    ),
                );
            }
        }
        Ok(())
    }

    fn file_map(&mut self, ino: u64, inode: &Inode) -> Result<()> {
        let mut damage: Option<String> = None;
        let mut raw: Vec<(Option<u64>, ExtentRecord)> = Vec::new();
        if inode.flags & inode_flags::TREE != 0 {
            let w = tree::walk(
                self.media.as_ref(),
                &self.g,
                TreeKind::Extents,
                ino,
                inode.tree_root,
                &self.claimed,
            )?;
            for &b in &w.nodes {
                self.claimed.set(b);
            }
            damage = w.damage;
            for (k, p) in w.records {
                match ExtentRecord::read_from_bytes(&p) {
                    Ok(r) => raw.push((Some(k), r)),
                    Err(_) => {
                        damage.get_or_insert_with(|| format!("record {k:#x} has the wrong size"));
                    }
                }
            }
        } else {
            let n = inode.inline_count as usize;
            if n > INLINE_EXTENTS {
                damage = Some(format!("{n} inline extents"));
            }
            raw.extend(inode.inline_extents().map(|r| (None, r)));
        }
        let mut kept: Vec<ExtentRecord> = Vec::with_capacity(raw.len());
        let mut prev_end = 0u64;
        for (key, r) in raw {
            let len = u64::from(r.len);
            let valid = match key {
                Some(k) => r.validate_keyed(k, &self.g),
                None => r.validate(&self.g),
            };
            let why = if let Err(d) = valid {
                Some(d.to_string())
            } else if r.file_block < prev_end {
                Some("overlapping extents".into())
            } else if self.claimed.any(r.dev_block, len) {
                Some("an extent on blocks another object uses".into())
            } else {
                None
            };
            match why {
                Some(w) => {
                    damage.get_or_insert_with(|| {
                        format!(
                            "{w}: file block {}, device blocks {}..{}",
                            r.file_block,
                            r.dev_block,
                            r.dev_block.saturating_add(len)
                        )
                    });
                }
                None => {
                    self.claimed.set_range(r.dev_block, len);
                    prev_end = r.file_block + len;
                    kept.push(r);
                }
            }
        }
        let counted: u64 = kept.iter().map(|e| u64::from(e.len)).sum();
        let Some(it) = self.items.get_mut(&ino) else {
            return Ok(());
        };
        let mut msgs = Vec::new();
        if let Some(why) = damage {
            if self.mode.allows(Class::Trees) {
                msgs.push((
                    Class::Trees,
                    format!(
                        "inode {ino}: extent map damaged ({why}): rebuilt with the {} valid extents ({counted} blocks)",
                        kept.len()
                    ),
                ));
                it.new_map = Some(kept);
                it.dirty = true;
            }
        }
        if counted != it.inode.blocks && self.mode.allows(Class::Counts) {
            msgs.push((
                Class::Counts,
                format!(
                    "inode {ino}: block count {} set to {counted}",
                    it.inode.blocks
                ),
            ));
            it.inode.blocks = counted;
            it.dirty = true;
        }
        for (c, m) in msgs {
            self.act(c, m);
        }
        Ok(())
    }

    fn dir_tree(&mut self, ino: u64, inode: &Inode) -> Result<()> {
        let w = tree::walk(
            self.media.as_ref(),
            &self.g,
            TreeKind::Directory,
            ino,
            inode.tree_root,
            &self.claimed,
        )?;
        for &b in &w.nodes {
            self.claimed.set(b);
        }
        let total = w.records.len();
        let mut entries = Vec::with_capacity(total);
        let mut names: HashSet<Vec<u8>> = HashSet::new();
        for (k, p) in &w.records {
            if let Ok(e) = Entry::decode(*k, p) {
                if names.insert(e.name.clone()) {
                    entries.push(e);
                }
            }
        }
        let malformed = total - entries.len();
        let mut msgs = Vec::new();
        let mut rebuild = false;
        if let Some(why) = &w.damage {
            if self.mode.allows(Class::Trees) {
                rebuild = true;
                msgs.push((
                    Class::Trees,
                    format!(
                        "directory inode {ino}: tree damaged ({why}): rebuilt with the {} readable entries",
                        entries.len()
                    ),
                ));
            }
        }
        if malformed > 0 && self.mode.allows(Class::Entries) {
            rebuild = true;
            msgs.push((
                Class::Entries,
                format!(
                    "directory inode {ino}: {malformed} malformed or duplicate entries removed"
                ),
            ));
        }
        if let Some(it) = self.items.get_mut(&ino) {
            it.entries = entries;
            it.rebuild_dir |= rebuild;
        }
        for (c, m) in msgs {
            self.act(c, m);
        }
        Ok(())
    }

    /// Breadth-first walk from `start` (already reached), fixing entries as it goes.
    fn visit(&mut self, start: u64) {
        let mut queue = VecDeque::from([start]);
        while let Some(dir) = queue.pop_front() {
            let Some(entries) = self
                .items
                .get_mut(&dir)
                .map(|d| std::mem::take(&mut d.entries))
            else {
                continue;
            };
            let mut kept = Vec::with_capacity(entries.len());
            let mut changed = false;
            for mut e in entries {
                let path = self.path_of(dir, &e.name);
                let target = self.items.get(&e.ino).map(|t| t.inode);
                let Some(t) = target else {
                    if self.untouchable.contains(&e.ino) || !self.mode.allows(Class::Entries) {
                        kept.push(e);
                        continue;
                    }
                    changed = true;
                    self.act(
                        Class::Entries,
                        format!(
                            "{path}: entry points to free or damaged inode {}: removed",
                            e.ino
                        ),
                    );
                    continue;
                };
                if e.kind != type_byte(&t) && self.mode.allows(Class::Entries) {
                    changed = true;
                    self.act(
                        Class::Entries,
                        format!(
                            "{path}: entry type {} does not match inode {} ({}): fixed",
                            e.kind,
                            e.ino,
                            type_name(&t)
                        ),
                    );
                    e.kind = type_byte(&t);
                }
                if t.is_dir() {
                    if self.reached.contains(&e.ino) {
                        if self.mode.allows(Class::Entries) {
                            changed = true;
                            self.act(
                                Class::Entries,
                                format!(
                                    "{path}: second link to directory inode {} (hard link or cycle): removed",
                                    e.ino
                                ),
                            );
                            continue;
                        }
                        kept.push(e);
                        continue;
                    }
                    self.reached.insert(e.ino);
                    self.dir_paths.insert(e.ino, path.clone());
                    if t.parent != dir && self.mode.allows(Class::Counts) {
                        self.act(
                            Class::Counts,
                            format!("{path}/: '..' was inode {}: set to {dir}", t.parent),
                        );
                        if let Some(c) = self.items.get_mut(&e.ino) {
                            c.inode.parent = dir;
                            c.dirty = true;
                        }
                    }
                    queue.push_back(e.ino);
                } else {
                    self.reached.insert(e.ino);
                    *self.links.entry(e.ino).or_default() += 1;
                }
                kept.push(e);
            }
            if let Some(d) = self.items.get_mut(&dir) {
                d.entries = kept;
                d.rebuild_dir |= changed;
            }
        }
    }

    fn namespace(&mut self) {
        if !self.items.contains_key(&ROOT_INO) {
            return;
        }
        self.reached.insert(ROOT_INO);
        self.dir_paths.insert(ROOT_INO, "/".into());
        if let Some(r) = self.items.get_mut(&ROOT_INO) {
            if r.inode.parent != ROOT_INO && self.mode.allows(Class::Counts) {
                r.inode.parent = ROOT_INO;
                r.dirty = true;
            }
        }
        self.visit(ROOT_INO);
    }

    /// A free inode number for a new directory.
    fn free_ino(&self) -> Option<u64> {
        let chunks = self.table.chunk_blocks().len() as u64;
        (FIRST_USER_INO..chunks * INODES_PER_CHUNK).find(|&ino| {
            ino % INODES_PER_CHUNK < USABLE_INODES_PER_CHUNK
                && !self.table.is_allocated(ino)
                && !self.free.contains_key(&ino)
                && !self.items.contains_key(&ino)
        })
    }

    /// /lost+found: the existing one, or a new one.
    fn lost_found(&mut self) -> Option<u64> {
        let root = self.items.get(&ROOT_INO)?;
        if let Some(e) = root.entries.iter().find(|e| e.name == LOST_FOUND) {
            let ok = self.items.get(&e.ino).is_some_and(|t| t.inode.is_dir());
            return if ok && self.reached.contains(&e.ino) {
                Some(e.ino)
            } else {
                self.act(
                    Class::LostFound,
                    "cannot use /lost+found: the name is taken by something other than a directory"
                        .into(),
                );
                None
            };
        }
        let Some(ino) = self.free_ino() else {
            self.act(
                Class::LostFound,
                "cannot create /lost+found: the inode table is full".into(),
            );
            return None;
        };
        let mut item = Item::new(new_dir_inode(0o700, ROOT_INO, self.next_generation(ino)));
        item.dirty = true;
        item.created = true;
        item.rebuild_dir = true;
        self.items.insert(ino, item);
        self.add_entry(ROOT_INO, LOST_FOUND.to_vec(), ino, type_byte_dir());
        self.reached.insert(ino);
        self.dir_paths.insert(ino, "/lost+found".into());
        self.act(
            Class::LostFound,
            format!("/lost+found created (inode {ino})"),
        );
        Some(ino)
    }

    /// Adds an entry to a directory's plan (the key takes the first free collision number).
    /// Entries are appended; the write phase sorts them.
    fn add_entry(&mut self, dir: u64, name: Vec<u8>, ino: u64, kind: u8) -> Option<u64> {
        let d = self.items.get_mut(&dir)?;
        let index = self.added.entry(dir).or_insert_with(|| {
            (
                d.entries.iter().map(|e| e.key).collect(),
                d.entries.iter().map(|e| e.name.clone()).collect(),
            )
        });
        if index.1.contains(&name) {
            return None;
        }
        let h = name_hash(&name);
        let seq = (0..=0xffffu64).find(|s| !index.0.contains(&(h << 16 | s)))?;
        let key = h << 16 | seq;
        index.0.insert(key);
        index.1.insert(name.clone());
        // The directory grows by one entry (and one link for a subdirectory) as a matter of
        // course: not a count to report as fixed.
        d.inode.size += 1;
        if kind == type_byte_dir() {
            d.inode.nlink = d.inode.nlink.saturating_add(1);
        }
        d.dirty = true;
        d.entries.push(Entry {
            key,
            ino,
            kind,
            name,
        });
        d.rebuild_dir = true;
        Some(key)
    }

    /// True when directory `dir` has an entry called `name`.
    fn has_name(&mut self, dir: u64, name: &[u8]) -> bool {
        if let Some((_, names)) = self.added.get(&dir) {
            return names.contains(name);
        }
        self.items
            .get(&dir)
            .is_some_and(|d| d.entries.iter().any(|e| e.name == name))
    }

    fn unreachable(&mut self) -> Result<()> {
        if !self.items.contains_key(&ROOT_INO) {
            return Ok(());
        }
        let lost: Vec<u64> = self
            .items
            .keys()
            .copied()
            .filter(|&i| {
                i != ROOT_INO
                    && i != DEFERRED_FREE_INO
                    && !self.reached.contains(&i)
                    && !self.orphans.contains(&i)
            })
            .collect();
        let mut to_move = Vec::new();
        for ino in lost {
            let Some(i) = self.items.get(&ino).map(|it| it.inode) else {
                continue;
            };
            if i.nlink == 0 {
                if self.allow(Class::Orphans) {
                    self.items.remove(&ino);
                    self.free.insert(ino, i.generation);
                    self.act(
                        Class::Orphans,
                        format!("inode {ino} has no links and is not on the orphan list: freed"),
                    );
                }
                continue;
            }
            to_move.push(ino);
        }
        if to_move.is_empty() || !self.allow(Class::LostFound) {
            return Ok(());
        }
        let Some(lf) = self.lost_found() else {
            return Ok(());
        };
        // Directories first, each as its topmost unreachable ancestor.
        for &ino in &to_move {
            if self.reached.contains(&ino)
                || !self.items.get(&ino).is_some_and(|i| i.inode.is_dir())
            {
                continue;
            }
            let mut top = ino;
            let mut seen = HashSet::from([ino]);
            while let Some(p) = self.items.get(&top).map(|i| i.inode.parent) {
                let up = self
                    .items
                    .get(&p)
                    .is_some_and(|pi| pi.inode.is_dir() && !self.reached.contains(&p));
                if !up || !seen.insert(p) {
                    break;
                }
                top = p;
            }
            self.attach(lf, top);
        }
        for &ino in &to_move {
            if !self.reached.contains(&ino) {
                self.attach(lf, ino);
            }
        }
        Ok(())
    }

    /// Moves an unreachable inode into /lost+found as `#INO`.
    fn attach(&mut self, lf: u64, ino: u64) {
        let Some(i) = self.items.get(&ino).map(|it| it.inode) else {
            return;
        };
        let mut name = format!("#{ino}").into_bytes();
        let mut n = 0;
        while self.has_name(lf, &name) {
            n += 1;
            name = format!("#{ino}.{n}").into_bytes();
        }
        let shown = String::from_utf8_lossy(&name).into_owned();
        if self.add_entry(lf, name, ino, type_byte(&i)).is_none() {
            return;
        }
        self.reached.insert(ino);
        self.act(
            Class::LostFound,
            format!(
                "inode {ino} ({}, {}) was not reachable from the root: moved to /lost+found/{shown}",
                type_name(&i),
                if i.is_dir() {
                    let n = self.items.get(&ino).map_or(0, |d| d.entries.len());
                    format!("{n} entries")
                } else {
                    format!("{} bytes", i.size)
                }
            ),
        );
        if i.is_dir() {
            let path = format!("/lost+found/{shown}");
            self.dir_paths.insert(ino, path);
            if let Some(it) = self.items.get_mut(&ino) {
                if it.inode.parent != lf {
                    it.inode.parent = lf;
                    it.dirty = true;
                }
            }
            self.visit(ino);
        } else {
            *self.links.entry(ino).or_default() += 1;
        }
    }

    fn counts(&mut self) {
        if !self.mode.allows(Class::Counts) {
            return;
        }
        let mut msgs = Vec::new();
        let dirs: HashSet<u64> = self
            .items
            .iter()
            .filter(|(_, i)| i.inode.is_dir())
            .map(|(&k, _)| k)
            .collect();
        for (&ino, it) in self.items.iter_mut() {
            if !self.reached.contains(&ino) {
                continue;
            }
            let path = self
                .dir_paths
                .get(&ino)
                .map_or_else(|| format!("inode {ino}"), |p| format!("{p} (inode {ino})"));
            if it.inode.is_dir() {
                let size = it.entries.len() as u64;
                let subdirs = it.entries.iter().filter(|e| dirs.contains(&e.ino)).count();
                let nlink = 2 + u32::try_from(subdirs).unwrap_or(u32::MAX - 2);
                if it.inode.size != size {
                    msgs.push(format!(
                        "directory {path}: size {} set to {size}",
                        it.inode.size
                    ));
                    it.inode.size = size;
                    it.dirty = true;
                }
                if it.inode.nlink != nlink {
                    msgs.push(format!(
                        "directory {path}: link count {} set to {nlink}",
                        it.inode.nlink
                    ));
                    it.inode.nlink = nlink;
                    it.dirty = true;
                }
            } else if ino != DEFERRED_FREE_INO {
                let counted = self.links.get(&ino).copied().unwrap_or(0);
                if counted > 0 && it.inode.nlink != counted {
                    msgs.push(format!(
                        "{path}: link count {} set to {counted}",
                        it.inode.nlink
                    ));
                    it.inode.nlink = counted;
                    it.dirty = true;
                }
                if counted > 0 && it.inode.flags & inode_flags::ORPHAN != 0 {
                    it.inode.flags &= !inode_flags::ORPHAN;
                    it.dirty = true;
                }
            }
        }
        for m in msgs {
            self.act(Class::Counts, m);
        }
    }

    /// Hands out a block no object claims, for a new tree node, reserved first (a sparse
    /// image's hole would raise SIGBUS at the first store on a full backing store).
    fn alloc_block(
        media: &dyn Media,
        claimed: &mut Bits,
        cursor: &mut u64,
        g: &Geometry,
    ) -> Result<u64> {
        let b = claimed
            .next_clear(*cursor, g.block_count)
            .or_else(|| claimed.next_clear(g.meta_end, g.block_count))
            .ok_or(Error::NoSpace)?;
        media.reserve(blocks_to_bytes(b), blocks_to_bytes(1))?;
        claimed.set(b);
        *cursor = b + 1;
        Ok(b)
    }

    fn write(mut self) -> Result<()> {
        let (journal, _) = Journal::open(Arc::clone(self.media), self.g)?;
        let bitmap = self.g.bitmap_offset();
        // New tree nodes change the bitmap: the summary's counts go stale first (the bitmap
        // step or the final mark-clean rewrites them), and a node landing in a region that
        // was never initialised initialises it before its bit is set.
        let mut summary = SpaceSummary::read(self.media.as_ref(), &self.g)
            .ok()
            .flatten();
        // 1. Freed inodes.
        for (&ino, &generation) in &self.free {
            let mut tx = journal.begin();
            let mut e = Inode::empty();
            e.generation = generation;
            self.table.write(&mut tx, ino, &mut e)?;
            if self.table.is_allocated(ino) {
                self.table.free(&mut tx, ino)?;
            }
            tx.commit()?;
        }
        // 2. Changed inodes with their rebuilt trees.
        let can_alloc = self.untouchable.is_empty();
        let inos: Vec<u64> = self.items.keys().copied().collect();
        for ino in inos {
            let Some(mut it) = self.items.remove(&ino) else {
                continue;
            };
            if !(it.dirty || it.rebuild_dir || it.new_map.is_some() || it.created) {
                continue;
            }
            let mut built = tree::Built::default();
            let needs_nodes = it.rebuild_dir && !it.entries.is_empty()
                || it
                    .new_map
                    .as_ref()
                    .is_some_and(|m| m.len() > INLINE_EXTENTS);
            if needs_nodes && !can_alloc {
                self.actions.push(Action {
                    class: Class::Trees,
                    message: format!(
                        "inode {ino}: tree not rewritten: damaged inodes that may not be cleared hold unknown blocks"
                    ),
                });
                it.rebuild_dir = false;
                it.new_map = None;
            }
            let (claimed, cursor, g) = (&mut self.claimed, &mut self.cursor, self.g);
            let media = self.media.as_ref();
            let mut alloc = || Self::alloc_block(media, claimed, cursor, &g);
            if let Some(map) = it.new_map.take() {
                if map.len() <= INLINE_EXTENTS {
                    it.inode.set_inline_extents(&map);
                    it.inode.flags &= !inode_flags::TREE;
                    it.inode.tree_root = 0;
                } else {
                    let recs: Vec<(u64, Vec<u8>)> = map
                        .iter()
                        .map(|r| (r.file_block, r.as_bytes().to_vec()))
                        .collect();
                    built = tree::build(TreeKind::Extents, ino, &recs, &mut alloc)?;
                    it.inode.set_inline_extents(&[]);
                    it.inode.flags |= inode_flags::TREE;
                    it.inode.tree_root = built.root;
                }
            } else if it.rebuild_dir {
                it.entries.sort_unstable_by_key(|e| e.key);
                let recs: Vec<(u64, Vec<u8>)> =
                    it.entries.iter().map(|e| (e.key, e.payload())).collect();
                built = tree::build(TreeKind::Directory, ino, &recs, &mut alloc)?;
                it.inode.tree_root = built.root;
            }
            let mut tx = journal.begin();
            let mut blocks: Vec<u64> = Vec::with_capacity(built.nodes.len());
            for (b, img) in &built.nodes {
                tx.write_new(blocks_to_bytes(*b), img)?;
                blocks.push(*b);
            }
            if let Some(s) = summary.as_mut().filter(|_| !blocks.is_empty()) {
                if s.counts_valid {
                    space::set_counts_valid(self.media.as_ref(), &self.g, false)?;
                    s.counts_valid = false;
                }
                for &b in &blocks {
                    let r = b / REGION_BLOCKS;
                    if let Some(e) = s.regions.get_mut(r as usize).filter(|e| e.uninit) {
                        space::initialise_region(self.media.as_ref(), &self.g, r)?;
                        e.uninit = false;
                    }
                }
            }
            set_clear_bits(self.media.as_ref(), &mut tx, bitmap, &mut blocks)?;
            if it.created && !self.table.is_allocated(ino) {
                let chunk = self
                    .table
                    .chunk_blocks()
                    .get((ino / INODES_PER_CHUNK) as usize)
                    .copied()
                    .ok_or(Error::NotFound)?;
                tx.set_bits(
                    blocks_to_bytes(chunk) + INODE_BITMAP_OFFSET,
                    ino % INODES_PER_CHUNK,
                    1,
                )?;
            }
            self.table.write(&mut tx, ino, &mut it.inode)?;
            tx.commit()?;
        }
        // 3. The orphan list.
        if self.reset_orphans {
            let mut st: FsState = read_state(self.media.as_ref())?;
            st.orphan_head = 0;
            st.seal();
            let mut tx = journal.begin();
            tx.write_struct(STATE_OFFSET, &st)?;
            tx.commit()?;
        }
        Ok(())
    }
}

fn type_byte_dir() -> u8 {
    dirent::type_byte(file_type::S_IFDIR)
}

fn new_dir_inode(perm: u16, parent: u64, generation: u64) -> Inode {
    let mut i = Inode::new(
        file_type::S_IFDIR | perm,
        2,
        crate::meta::now_ns(),
        generation,
    );
    i.parent = parent;
    i
}

/// Sets, in `tx`, the bitmap bits of `blocks` that are clear on the media (bits already set
/// stay as they are: undoing a set of an already-set bit would clear it).
fn set_clear_bits(
    media: &dyn Media,
    tx: &mut Tx<'_>,
    bitmap: u64,
    blocks: &mut [u64],
) -> Result<()> {
    blocks.sort_unstable();
    let mut run: Option<(u64, u64)> = None;
    for &b in blocks.iter() {
        let word = media.load_u64(bitmap + b / 64 * 8)?;
        if word & (1 << (b % 64)) != 0 {
            continue;
        }
        run = match run {
            Some((f, n)) if f + n == b => Some((f, n + 1)),
            Some((f, n)) => {
                tx.set_bits(bitmap, f, n)?;
                Some((b, 1))
            }
            None => Some((b, 1)),
        };
    }
    if let Some((f, n)) = run {
        tx.set_bits(bitmap, f, n)?;
    }
    Ok(())
}
