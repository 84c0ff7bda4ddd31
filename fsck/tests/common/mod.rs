//! A small file system with one object of every kind, and the damage classes fsck must
//! find and repair. Shared by fsck/tests/fsck_damage.rs (through the binary) and
//! tests/fsck_repair.rs (through `pmfs::repair`, on the in-memory device).
#![allow(dead_code, clippy::unwrap_used)]

use pmfs::device::{Media, RecordingDevice};
use pmfs::format::{ExtentRecord, Geometry, INODE_SIZE, Inode, SlotHeader, UndoHeader, checksum};
use pmfs::fs::{Ctx, Fs, MountOptions};
use pmfs::mkfs::{MkfsOptions, format};
use std::collections::HashMap;
use std::sync::Arc;
use zerocopy::{FromBytes, IntoBytes};

pub const MIB: u64 = 1 << 20;
pub const ROOT: u64 = 1;
const C: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 0,
};
const BLOCK: u64 = 4096;

/// A formatted, populated, cleanly unmounted image and where its objects are.
#[derive(Clone)]
pub struct Image {
    pub bytes: Vec<u8>,
    pub g: Geometry,
    /// Inode numbers by path.
    pub ino: HashMap<&'static str, u64>,
    /// Byte offset of each inode by number.
    pub inode_off: HashMap<u64, u64>,
    /// First block of inode-table chunk 0.
    pub chunk0: u64,
    /// A real orphan (unlinked while open).
    pub orphan: u64,
}

impl Image {
    pub fn inode(&self, path: &str) -> (u64, Inode) {
        let ino = self.ino[path];
        let off = self.inode_off[&ino] as usize;
        let i = Inode::read_from_bytes(&self.bytes[off..off + INODE_SIZE as usize]).unwrap();
        (ino, i)
    }

    /// Stores an inode (resealed when `seal`).
    pub fn put_inode(&mut self, ino: u64, mut i: Inode, seal: bool) {
        if seal {
            i.seal();
        }
        let off = self.inode_off[&ino] as usize;
        self.bytes[off..off + INODE_SIZE as usize].copy_from_slice(i.as_bytes());
    }

    pub fn u64_at(&self, off: u64) -> u64 {
        let o = off as usize;
        u64::from_le_bytes(self.bytes[o..o + 8].try_into().unwrap())
    }

    pub fn put_u64(&mut self, off: u64, v: u64) {
        let o = off as usize;
        self.bytes[o..o + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// (level, children) of the B+tree node at `block`.
    pub fn node(&self, block: u64) -> (u16, Vec<u64>) {
        let o = (block * BLOCK) as usize;
        let level = u16::from_le_bytes([self.bytes[o + 4], self.bytes[o + 5]]);
        let count = usize::from(u16::from_le_bytes([self.bytes[o + 6], self.bytes[o + 7]]));
        let mut children = Vec::new();
        if level > 0 {
            for k in 0..count {
                children.push(self.u64_at(block * BLOCK + 32 + 16 * k as u64 + 8));
            }
        }
        (level, children)
    }

    pub fn bit(&self, block: u64) -> bool {
        let off = self.g.bitmap_offset() + block / 64 * 8;
        self.u64_at(off) & (1 << (block % 64)) != 0
    }

    pub fn set_bit(&mut self, block: u64, on: bool) {
        let off = self.g.bitmap_offset() + block / 64 * 8;
        let w = self.u64_at(off);
        let m = 1u64 << (block % 64);
        self.put_u64(off, if on { w | m } else { w & !m });
    }

    /// Inline extents of a file without an extent tree.
    pub fn inline_extents(&self, path: &str) -> Vec<ExtentRecord> {
        let (_, i) = self.inode(path);
        (0..i.inline_count as usize)
            .map(|k| ExtentRecord::read_from_bytes(&i.inline[k * 24..k * 24 + 24]).unwrap())
            .collect()
    }

    /// Finds the directory-entry payload for `name` -> `ino` in the blocks of the image.
    pub fn find_entry(&self, ino: u64, name: &[u8]) -> usize {
        let mut pat = ino.to_le_bytes().to_vec();
        pat.push(0); // type byte, masked below
        pat.push(name.len() as u8);
        pat.extend_from_slice(name);
        let start = (self.g.meta_end * BLOCK) as usize;
        (start..self.bytes.len() - pat.len())
            .find(|&o| {
                self.bytes[o..o + 8] == pat[..8] && self.bytes[o + 9..o + pat.len()] == pat[9..]
            })
            .expect("entry not found")
    }

    /// Byte ranges holding metadata: superblocks and state record, journal slot headers and
    /// first records, the block bitmap, the inode-table directory, the used part of inode
    /// chunk 0 and its inode bitmap, and every node of the trees of the known inodes, the
    /// symlink block and the xattr area (the targets of the mutation tests).
    pub fn metadata_regions(&self) -> Vec<(u64, u64)> {
        let mut r = vec![(0, 2 * BLOCK)];
        for s in 0..self.g.journal_slots {
            r.push((self.g.slot_offset(s), 64 + 512));
        }
        r.push((self.g.bitmap_offset(), self.g.bitmap_blocks * BLOCK));
        r.push((self.g.itable_dir_offset(), BLOCK));
        let orphan_head = self.u64_at(2048 + 24);
        if orphan_head != 0 {
            r.push((orphan_head * BLOCK, BLOCK));
        }
        let max_ino = self.inode_off.keys().copied().max().unwrap_or(0).max(320);
        r.push((self.chunk0 * BLOCK, (max_ino + 1) * INODE_SIZE));
        r.push((
            self.chunk0 * BLOCK + pmfs::format::INODE_BITMAP_OFFSET,
            1024,
        ));
        let mut offs: Vec<u64> = self.inode_off.values().copied().collect();
        offs.sort_unstable();
        for off in offs {
            let i = Inode::read_from_bytes(&self.bytes[off as usize..(off + INODE_SIZE) as usize])
                .unwrap();
            if i.xattr_block != 0 {
                r.push((i.xattr_block * BLOCK, u64::from(i.xattr_blocks) * BLOCK));
            }
            if i.tree_root == 0 {
                continue;
            }
            if i.is_symlink() {
                r.push((i.tree_root * BLOCK, BLOCK));
                continue;
            }
            if !(i.is_dir() || i.flags & pmfs::format::inode_flags::TREE != 0) {
                continue;
            }
            let mut stack = vec![i.tree_root];
            while let Some(b) = stack.pop() {
                r.push((b * BLOCK, BLOCK));
                stack.extend(self.node(b).1);
            }
        }
        r
    }

    pub fn media(&self) -> Arc<dyn Media> {
        Arc::new(RecordingDevice::from_image(self.bytes.clone()))
    }
}

/// The attribute flags (chattr +ad) of `/a/file1` in the test file system.
pub const FILE1_FLAGS: u16 = pmfs::format::inode_flags::APPEND | pmfs::format::inode_flags::NODUMP;

/// The test file system: 64 MiB, with directories three deep, a file with an extent tree of
/// two levels (150 extents), a directory of 300 entries (several leaves), hard links, a long
/// symlink, an xattr, an orphan, and attribute flags ([`FILE1_FLAGS`]).
pub fn build() -> Image {
    build_sized(64 * MIB)
}

/// [`build`] on a device of `size` bytes (at least 16 MiB).
pub fn build_sized(size: u64) -> Image {
    let dev = Arc::new(RecordingDevice::new(size));
    format(dev.as_ref(), &MkfsOptions::default()).unwrap();
    let media: Arc<dyn Media> = dev.clone();
    let fs = Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap();
    let mut ino = HashMap::new();
    let a = fs.mkdir(&C, ROOT, b"a", 0o755).unwrap().ino;
    let b = fs.mkdir(&C, a, b"b", 0o755).unwrap().ino;
    let c = fs.mkdir(&C, b, b"c", 0o755).unwrap().ino;
    let file1 = fs.mknod(&C, a, b"file1", 0o100644, 0).unwrap().ino;
    fs.write(&C, file1, 0, &vec![0x5a; 3 * 4096]).unwrap();
    fs.link(file1, ROOT, b"hard").unwrap();
    let frag = fs.mknod(&C, ROOT, b"frag", 0o100644, 0).unwrap().ino;
    for k in 0..150u64 {
        fs.write(&C, frag, 2 * k * 4096, &[k as u8; 4096]).unwrap();
    }
    let big = fs.mkdir(&C, ROOT, b"big", 0o755).unwrap().ino;
    for k in 0..300 {
        fs.mknod(&C, big, format!("entry-{k:04}").as_bytes(), 0o100644, 0)
            .unwrap();
    }
    let link = fs.symlink(&C, c, b"link", &vec![b'x'; 300]).unwrap().ino;
    fs.setxattr(file1, b"user.note", b"hello", 0).unwrap();
    let gone = fs.mknod(&C, ROOT, b"gone", 0o100644, 0).unwrap().ino;
    fs.write(&C, gone, 0, b"still open").unwrap();
    fs.open(gone, libc::O_RDWR).unwrap();
    fs.unlink(ROOT, b"gone").unwrap();
    for (k, v) in [
        ("/a", a),
        ("/a/b", b),
        ("/a/b/c", c),
        ("/a/file1", file1),
        ("/frag", frag),
        ("/big", big),
        ("/a/b/c/link", link),
    ] {
        ino.insert(k, v);
    }
    let mut inode_off = HashMap::new();
    for v in ino.values().copied().chain([ROOT, gone]) {
        inode_off.insert(v, fs.inode_table().offset(v).unwrap());
    }
    ino.insert("/", ROOT);
    // Attribute flags, which the check must accept and the repair keep.
    fs.set_attr_flags(&C, file1, FILE1_FLAGS).unwrap();
    let g = *fs.geometry();
    let chunk0 = fs.inode_table().chunk_blocks()[0];
    fs.shutdown().unwrap();
    drop(fs);
    let report = pmfs::check::check(&media).unwrap();
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    Image {
        bytes: dev.snapshot(),
        g,
        ino,
        inode_off,
        chunk0,
        orphan: gone,
    }
}

/// A damage class: its name, what fsck -n must print (a substring of one line), and how to
/// inflict it.
pub struct Damage {
    pub name: &'static str,
    pub expect: &'static str,
    pub apply: fn(&mut Image),
    /// fsck cannot repair it: exit 8 (operational error) instead of 4 then 1.
    pub fatal: bool,
}

fn flip(img: &mut Image, off: u64, mask: u8) {
    img.bytes[off as usize] ^= mask;
}

fn superblock(img: &mut Image) {
    flip(img, 130, 0x10); // block_count: the checksum no longer matches
    flip(img, 60, 0x01); // the label
}

/// Both superblocks lack the attribute-flag feature that /a/file1's flags need (a
/// consistent superblock of version 3, with its inode-table feature: only the attribute
/// features are wrong).
fn missing_feature(img: &mut Image) {
    for at in [0usize, 4096] {
        let (mut sb, _) =
            pmfs::format::Superblock::read_from_prefix(&img.bytes[at..at + 256]).unwrap();
        // The version-2 features gone; the layout's features (inode table, space summary)
        // stay.
        let kept = pmfs::format::IncompatFeatures::HASHED_DIRS
            | pmfs::format::IncompatFeatures::INODE_TABLE_TREE
            | pmfs::format::IncompatFeatures::SPACE_SUMMARY;
        sb.incompat = kept.bits();
        sb.version = kept.version_needed();
        sb.seal();
        img.bytes[at..at + 256].copy_from_slice(sb.as_bytes());
    }
}

fn backup_superblock(img: &mut Image) {
    flip(img, 4096 + 8, 0x04);
}

fn inode_checksum(img: &mut Image) {
    let off = img.inode_off[&img.ino["/a/file1"]];
    flip(img, off + 40, 0x01); // mtime: only the checksum catches it
}

fn inode_garbage(img: &mut Image) {
    let off = img.inode_off[&img.ino["/a/b/c/link"]] as usize;
    for (k, b) in img.bytes[off..off + 256].iter_mut().enumerate() {
        *b = (k as u8).wrapping_mul(37).wrapping_add(11);
    }
}

fn dir_node(img: &mut Image) {
    let (_, i) = img.inode("/big");
    let (level, children) = img.node(i.tree_root);
    assert!(level > 0, "/big should have several leaves");
    flip(img, children[1] * BLOCK, 0xff); // a leaf's magic
}

fn extent_node(img: &mut Image) {
    let (_, i) = img.inode("/frag");
    let (level, children) = img.node(i.tree_root);
    assert!(level > 0, "/frag should have a two-level extent tree");
    flip(img, children[0] * BLOCK + 1, 0x20);
}

fn extent_cycle(img: &mut Image) {
    let (_, i) = img.inode("/frag");
    let (_, children) = img.node(i.tree_root);
    assert!(children.len() >= 2);
    // The second child pointer of the root points back at the root.
    img.put_u64(i.tree_root * BLOCK + 32 + 16 + 8, i.tree_root);
}

/// Counts that claim to be exact (`counts_valid` 1) and say region 0 is full.
fn space_summary_count(img: &mut Image) {
    let base = img.g.summary_offset() as usize;
    let valid = base + pmfs::format::space::COUNTS_VALID_OFFSET as usize;
    img.bytes[valid..valid + 8].copy_from_slice(&1u64.to_le_bytes());
    let entry = base + pmfs::format::space::SUMMARY_ENTRIES_OFFSET as usize;
    img.bytes[entry..entry + 8].copy_from_slice(&0u64.to_le_bytes());
}

/// A summary header that is not one.
fn space_summary_magic(img: &mut Image) {
    flip(img, img.g.summary_offset(), 0xff);
}

fn bitmap(img: &mut Image) {
    // A leaked block: the last free block of the device.
    let last = (img.g.meta_end..img.g.block_count)
        .rev()
        .find(|&b| !img.bit(b))
        .unwrap();
    img.set_bit(last, true);
    // A block in use marked free: the first data block of /a/file1.
    let e = img.inline_extents("/a/file1")[0];
    assert!(img.bit(e.dev_block));
    img.set_bit(e.dev_block, false);
}

fn journal_garbage(img: &mut Image) {
    let slot = img.g.slot_offset(1);
    let generation = img.u64_at(slot + 8);
    img.put_u64(slot + 8, generation | 1);
    if generation % 2 == 1 {
        img.put_u64(slot + 8, generation + 2);
    }
    for k in 0..200u64 {
        img.bytes[(slot + 64 + k) as usize] = (k as u8).wrapping_mul(91) ^ 0xa5;
    }
}

/// An open transaction whose first record is valid but targets the superblock (which no
/// transaction may touch): the journal is damaged, not just open.
fn journal_bad_target(img: &mut Image) {
    let slot = img.g.slot_offset(2);
    let generation = img.u64_at(slot + 8) + 1; // odd: open
    img.put_u64(slot + 8, generation);
    let payload = [0u8; 8];
    let mut h = UndoHeader {
        generation,
        target: 0,
        first: 0,
        len: 8,
        kind: 1,
        pad: 0,
        crc: 0,
        pad2: 0,
    };
    h.crc = pmfs::journal::record_crc(&h, &payload);
    let at = (slot + size_of::<SlotHeader>() as u64) as usize;
    img.bytes[at..at + 40].copy_from_slice(h.as_bytes());
    img.bytes[at + 40..at + 48].copy_from_slice(&payload);
}

/// An open transaction whose valid record rolls an inode back to a wrong link count.
fn journal_rollback(img: &mut Image) {
    let (ino, mut i) = img.inode("/a/file1");
    let off = img.inode_off[&ino];
    let slot = img.g.slot_offset(3);
    let generation = img.u64_at(slot + 8) + 1;
    img.put_u64(slot + 8, generation);
    // The "old" contents the undo record restores: the inode as it is (so the rollback is
    // harmless), while the in-place inode is changed as if the transaction had stored it.
    let old = i.as_bytes().to_vec();
    let mut h = UndoHeader {
        generation,
        target: off,
        first: 0,
        len: 256,
        kind: 1,
        pad: 0,
        crc: 0,
        pad2: 0,
    };
    let mut buf = h.as_bytes().to_vec();
    buf.extend_from_slice(&old);
    h.crc = checksum(&buf);
    let at = (slot + 64) as usize;
    img.bytes[at..at + 40].copy_from_slice(h.as_bytes());
    img.bytes[at + 40..at + 296].copy_from_slice(&old);
    i.nlink = 9;
    img.put_inode(ino, i, true);
}

fn extent_out_of_bounds(img: &mut Image) {
    let (ino, mut i) = img.inode("/a/file1");
    let mut e = ExtentRecord::read_from_bytes(&i.inline[..24]).unwrap();
    e.dev_block = img.g.block_count + 100;
    i.inline[..24].copy_from_slice(e.as_bytes());
    img.put_inode(ino, i, true);
}

fn extent_into_metadata(img: &mut Image) {
    let (ino, mut i) = img.inode("/a/file1");
    let mut e = ExtentRecord::read_from_bytes(&i.inline[..24]).unwrap();
    e.dev_block = img.chunk0 + 1; // inside the inode table
    i.inline[..24].copy_from_slice(e.as_bytes());
    img.put_inode(ino, i, true);
}

fn dir_cycle(img: &mut Image) {
    // /a/b/c gets an entry "up" pointing at /a, its grandparent's child: made by retargeting
    // the entry of the symlink /a/b/c/link.
    let link = img.ino["/a/b/c/link"];
    let a = img.ino["/a"];
    let at = img.find_entry(link, b"link");
    img.bytes[at..at + 8].copy_from_slice(&a.to_le_bytes());
    img.bytes[at + 8] = 4; // DT_DIR
}

fn link_count(img: &mut Image) {
    let (ino, mut i) = img.inode("/a/file1");
    i.nlink = 7;
    img.put_inode(ino, i, true);
    let (ino, mut i) = img.inode("/a/b");
    i.nlink = 5;
    i.size = 9;
    img.put_inode(ino, i, true);
}

fn block_count(img: &mut Image) {
    let (ino, mut i) = img.inode("/frag");
    i.blocks += 3;
    img.put_inode(ino, i, true);
}

fn orphan_not_orphan(img: &mut Image) {
    let o = img.orphan;
    let off = img.inode_off[&o] as usize;
    let mut i = Inode::read_from_bytes(&img.bytes[off..off + 256]).unwrap();
    i.nlink = 1;
    img.put_inode(o, i, true);
}

fn unreachable_dir(img: &mut Image) {
    // /a's entry in the root vanishes (renamed to a name whose hash does not match its key,
    // so it is malformed): /a and everything below it are unreachable.
    let a = img.ino["/a"];
    let at = img.find_entry(a, b"a");
    img.bytes[at + 10] = b'z';
}

fn dot_entry(img: &mut Image) {
    // /a/b's entry "c" renamed "." with the key of that name: a record every other rule
    // accepts. The core never stores "." or "..", and the one entry decoder refuses them, so
    // fsck reports the entry and its repair drops it (/a/b/c goes to lost+found).
    let c = img.ino["/a/b/c"];
    let at = img.find_entry(c, b"c");
    img.bytes[at + 10] = b'.';
    let key = pmfs::format::dirent::name_hash(b".") << 16;
    img.bytes[at - 10..at - 2].copy_from_slice(&key.to_le_bytes());
}

fn truncated(img: &mut Image) {
    img.bytes.truncate((40 * MIB) as usize);
}

fn not_pmfs(img: &mut Image) {
    img.bytes[0] ^= 0xff;
    img.bytes[4096] ^= 0xff;
}

pub fn damages() -> Vec<Damage> {
    let d = |name, expect, apply: fn(&mut Image)| Damage {
        name,
        expect,
        apply,
        fatal: false,
    };
    vec![
        d("superblock", "primary superblock", superblock),
        d("backup-superblock", "backup superblock", backup_superblock),
        d("inode-checksum", "checksum", inode_checksum),
        d("inode-garbage", "inode", inode_garbage),
        d("directory-node", "/big", dir_node),
        d("extent-node", "tree node", extent_node),
        d("extent-cycle", "inode", extent_cycle),
        d("bitmap", "marked free", bitmap),
        d(
            "space-summary-count",
            "region 0 counts 0 free blocks",
            space_summary_count,
        ),
        d("space-summary-magic", "space summary", space_summary_magic),
        d(
            "journal-garbage",
            "interrupted transaction",
            journal_garbage,
        ),
        d("journal-bad-target", "damaged record", journal_bad_target),
        d(
            "journal-rollback",
            "interrupted transaction",
            journal_rollback,
        ),
        d(
            "extent-out-of-bounds",
            "corrupted extent",
            extent_out_of_bounds,
        ),
        d("extent-into-metadata", "also used", extent_into_metadata),
        d("directory-cycle", "reached twice", dir_cycle),
        // The message names the file by its path (the first entry the walk finds for it).
        d("link-counts", "/hard (inode", link_count),
        d("block-count", "block count", block_count),
        d("orphan", "orphan", orphan_not_orphan),
        d("unreachable", "not reachable", unreachable_dir),
        d("dot-entry", "are not stored", dot_entry),
        d("missing-feature", "lacks the features", missing_feature),
        Damage {
            name: "truncated",
            expect: "truncated",
            apply: truncated,
            fatal: true,
        },
        Damage {
            name: "not-pmfs",
            expect: "not a pmfs file system (bad magic)",
            apply: not_pmfs,
            fatal: true,
        },
    ]
}

// ---------------------------------------------------------------------------------------
// Hostile trees: nodes that each pass per-node validation but together form a DAG (one
// child under every entry, `MAX_TREE_LEVEL` levels deep: ~254^7 root-to-leaf paths), leaves
// out of key order, or a cycle across levels. Written over the image built above.

/// Entries an internal node can hold.
pub const NODE_ENTRIES: usize = (BLOCK as usize - 32) / 16;

/// The trees a hostile shape can replace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The directory tree of /big (300 entries, two levels).
    Dir,
    /// The extent tree of /frag (150 extents, two levels).
    Extents,
    /// The orphan list (one orphan, a single leaf).
    Orphans,
}

/// The shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Levels 1..=MAX_TREE_LEVEL, every node's entries all pointing at the node below; the
    /// bottom is a real leaf of the tree.
    Dag,
    /// The same over an empty leaf (no key ever repeats).
    DagOfEmptyLeaves,
    /// Two leaves in the wrong order under one root (each node on its own is valid).
    OutOfOrder,
    /// A chain of internal nodes down to a real leaf, where every node's second entry points
    /// back at the top: a cycle across levels.
    Cycle,
}

impl Image {
    /// The first `n` free data blocks, marked used (so a mount never hands them out).
    pub fn take_blocks(&mut self, n: usize) -> Vec<u64> {
        let blocks: Vec<u64> = (self.g.meta_end..self.g.block_count)
            .filter(|&b| !self.bit(b))
            .take(n)
            .collect();
        assert_eq!(blocks.len(), n, "no room for the crafted nodes");
        for &b in &blocks {
            self.set_bit(b, true);
        }
        blocks
    }

    /// Writes a node: `entries` (key, child) for an internal node, or a leaf's encoded
    /// records (`count` of them in `leaf`).
    pub fn put_node(
        &mut self,
        block: u64,
        (kind, owner): (pmfs::format::TreeKind, u64),
        level: u16,
        entries: &[(u64, u64)],
        leaf: (u16, &[u8]),
    ) {
        let mut h = pmfs::format::NodeHeader::new(kind, level, owner);
        let mut body = Vec::new();
        if level > 0 {
            for (k, c) in entries {
                body.extend_from_slice(&k.to_le_bytes());
                body.extend_from_slice(&c.to_le_bytes());
            }
            h.count = entries.len() as u16;
        } else {
            body.extend_from_slice(leaf.1);
            h.count = leaf.0;
        }
        h.used = body.len() as u32;
        let o = (block * BLOCK) as usize;
        self.bytes[o..o + BLOCK as usize].fill(0);
        self.bytes[o..o + 32].copy_from_slice(h.as_bytes());
        self.bytes[o + 32..o + 32 + body.len()].copy_from_slice(&body);
    }

    /// (kind, owner, root) of a target tree.
    pub fn tree_of(&self, t: Target) -> (pmfs::format::TreeKind, u64, u64) {
        use pmfs::format::TreeKind;
        match t {
            Target::Dir => {
                let (ino, i) = self.inode("/big");
                (TreeKind::Directory, ino, i.tree_root)
            }
            Target::Extents => {
                let (ino, i) = self.inode("/frag");
                (TreeKind::Extents, ino, i.tree_root)
            }
            Target::Orphans => (
                TreeKind::Directory,
                pmfs::format::NULL_INO,
                self.state().orphan_head,
            ),
        }
    }

    fn state(&self) -> pmfs::format::FsState {
        let o = pmfs::format::STATE_OFFSET as usize;
        pmfs::format::FsState::read_from_bytes(&self.bytes[o..o + 64]).unwrap()
    }

    /// Points a target at a new root (the inode or the state record resealed).
    pub fn set_root(&mut self, t: Target, root: u64) {
        match t {
            Target::Dir | Target::Extents => {
                let path = if t == Target::Dir { "/big" } else { "/frag" };
                let (ino, mut i) = self.inode(path);
                i.tree_root = root;
                self.put_inode(ino, i, true);
            }
            Target::Orphans => {
                let mut st = self.state();
                st.orphan_head = root;
                st.seal();
                let o = pmfs::format::STATE_OFFSET as usize;
                self.bytes[o..o + 64].copy_from_slice(st.as_bytes());
            }
        }
    }

    /// The leftmost leaf of a target tree.
    pub fn first_leaf(&self, t: Target) -> u64 {
        let mut b = self.tree_of(t).2;
        loop {
            let (level, children) = self.node(b);
            if level == 0 {
                return b;
            }
            b = children[0];
        }
    }

    /// Replaces a target tree by a hostile shape.
    pub fn make_hostile(&mut self, t: Target, shape: Shape) {
        let (kind, owner, root) = self.tree_of(t);
        let id = (kind, owner);
        let top = pmfs::format::MAX_TREE_LEVEL;
        // Keys strictly increasing inside every node, entry 0 keyed 0.
        let keys = |n: usize| (0..n as u64).map(|j| j << 50);
        match shape {
            Shape::Dag | Shape::DagOfEmptyLeaves => {
                let blocks = self.take_blocks(usize::from(top) + 1);
                let mut below = if shape == Shape::Dag {
                    self.first_leaf(t)
                } else {
                    self.put_node(blocks[0], id, 0, &[], (0, &[]));
                    blocks[0]
                };
                for level in 1..=top {
                    let b = blocks[usize::from(level)];
                    let entries: Vec<(u64, u64)> = keys(NODE_ENTRIES).map(|k| (k, below)).collect();
                    self.put_node(b, id, level, &entries, (0, &[]));
                    below = b;
                }
                self.set_root(t, below);
            }
            Shape::OutOfOrder => {
                if t == Target::Orphans {
                    // One more leaf, keyed above the real orphan, placed first.
                    let b = self.take_blocks(2);
                    let mut rec = 1_000_000u64.to_le_bytes().to_vec();
                    rec.extend_from_slice(&0u16.to_le_bytes());
                    self.put_node(b[0], id, 0, &[], (1, &rec));
                    self.put_node(b[1], id, 1, &[(0, b[0]), (1 << 50, root)], (0, &[]));
                    self.set_root(t, b[1]);
                } else {
                    // Swap the root's first two children.
                    let (level, children) = self.node(root);
                    assert!(
                        level == 1 && children.len() >= 2,
                        "{t:?}: {level} {children:?}"
                    );
                    self.put_u64(root * BLOCK + 32 + 8, children[1]);
                    self.put_u64(root * BLOCK + 32 + 16 + 8, children[0]);
                }
            }
            Shape::Cycle => {
                let blocks = self.take_blocks(usize::from(top));
                let leaf = self.first_leaf(t);
                let top_block = blocks[usize::from(top) - 1];
                let mut below = leaf;
                for level in 1..=top {
                    let b = blocks[usize::from(level) - 1];
                    self.put_node(b, id, level, &[(0, below), (1 << 50, top_block)], (0, &[]));
                    below = b;
                }
                self.set_root(t, top_block);
            }
        }
    }
}

/// Runs `f` under a deadline: past it the whole test process aborts with a message (a hang
/// is a failure, never a CI timeout).
pub fn within<T>(what: &str, secs: u64, f: impl FnOnce() -> T) -> T {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let name = what.to_string();
    let dog = std::thread::spawn(move || {
        if rx.recv_timeout(std::time::Duration::from_secs(secs))
            == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        {
            eprintln!("{name}: still running after {secs} s: aborting");
            std::process::abort();
        }
    });
    let out = f();
    let _ = tx.send(());
    dog.join().unwrap();
    out
}

/// Peak resident memory of this process in KiB (VmHWM), after resetting it to the current
/// resident size where the kernel allows (`/proc/self/clear_refs`, 5).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
