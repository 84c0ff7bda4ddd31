//! The file-system core: POSIX operations on inode numbers, with no FUSE types.
//!
//! Every mutating operation is one journal transaction, committed before it returns
//! (synchronous durability). Concurrency: inode numbers hash onto lock stripes; an operation
//! takes the stripes of every inode it changes, in ascending stripe order, then the global
//! locks it declared, then a journal slot ([`txn`]; the order is [`crate::lockorder`]'s), and
//! holds them all until after commit (the journal's isolation rule). Directory operations
//! that discover a child under the parent's lock re-check it after locking both.
//!
//! Kernel references: the lookup and open counts of an inode change under (at least) a
//! read lock of its stripe, and the code that frees an unreferenced inode reads them under
//! the write lock, so a reference is never taken on an inode that is being freed.

mod data;
#[cfg(test)]
mod failpoint;
mod flags;
mod lease;
mod ops;
mod publish;
mod refs;
mod txn;

pub use crate::meta::{
    InodeTable, check_name, file_extents, list_dir, load_xattrs, name_hash, now_ns,
    read_backup_superblock, read_state, read_superblock, upgrade_superblock,
};
use crate::meta::{dir, extent, xattr};
pub use lease::MappedExtent;
pub use ops::{LINK_MAX, RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT};
pub use publish::PublishedLease;

#[cfg(test)]
mod concurrency_tests;
#[cfg(test)]
mod itable_tests;
#[cfg(test)]
mod multidev_tests;
mod placement;
pub use placement::set_thread_node;
#[cfg(test)]
mod sparse_tests;
#[cfg(test)]
mod tests;

use crate::alloc::{AllocRequest, BlockAllocator, BlockRange};
use crate::btree::{self, NodeAllocator, Tree, TreeReader};
use crate::device::Media;
use crate::error::{Error, Result};
use crate::format::{
    BLOCK_SIZE, CHUNK_SIZE, FsState, Geometry, IncompatFeatures, Inode, NULL_INO, ROOT_INO,
    STATE_OFFSET, Superblock, TreeKind, file_type, inode_flags,
};
use crate::journal::{Journal, RecoveryReport, Tx};
use crate::lockorder::{OrderedMutex, Rank, Ranked};
use parking_lot::{Mutex, RwLock};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use txn::{LockSet, MetaTx, StripeGuards, StripeRead};

/// Lock stripes for inodes.
const STRIPES: usize = 1024;

/// Extents freed per transaction when an unlinked file is freed in steps (each costs a
/// bit record and a share of an extent-tree node in the undo log).
const SHRINK_BATCH: usize = 1024;

/// Free blocks held back per journal slot for transactions that give space back: an unlink
/// may add an orphan-tree node, a punch may split an extent, a deferred free adds extents
/// to the deferred-free inode — a few blocks each, at most one transaction per slot.
const RESERVE_PER_SLOT: u64 = 64;

/// Reserves ([`Media::reserve`]) the fixed metadata and every chunk that holds a block in
/// use, so that on a sparse image no store the mount makes into them can fault for want of
/// backing store (SIGBUS); from here on the allocator reserves each chunk it hands out.
/// Nothing to do (and no system call) on media that are not sparse images. Fails with
/// [`DeviceError::NoSpace`](crate::device::DeviceError::NoSpace) when the file system
/// holding the image is full.
fn reserve_space_in_use(media: &dyn Media, alloc: &BlockAllocator) -> Result<()> {
    for run in alloc.used_chunk_runs() {
        let start = run.start * CHUNK_SIZE;
        let end = (run.end * CHUNK_SIZE).min(media.size());
        media.reserve(start, end - start)?;
    }
    Ok(())
}

/// The reserve of a device: [`RESERVE_PER_SLOT`] per slot, at most 1% of the data blocks
/// (at least 16), so that a full file system can always be emptied.
fn reserve_blocks(geometry: &Geometry) -> u64 {
    let data = geometry.block_count.saturating_sub(geometry.meta_end);
    (u64::from(geometry.journal_slots) * RESERVE_PER_SLOT)
        .min(data / 100)
        .max(16)
}

/// When reads update atime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AtimeMode {
    /// Only when atime is older than mtime/ctime or a day old (the Linux default).
    #[default]
    Relatime,
    Noatime,
    Strictatime,
}

/// How to mount.
#[derive(Clone, Debug, Default)]
pub struct MountOptions {
    pub read_only: bool,
    pub atime: AtimeMode,
    /// Block allocation policy (`HugeAware` by default; `FirstFit` only for comparisons).
    pub alloc_policy: crate::alloc::AllocPolicy,
    /// Several devices: the NUMA node of each member, in order (sysfs's word where it has
    /// one, `pmfs::cli::open_members`); empty for the nodes the device table records.
    pub member_nodes: Vec<u32>,
}

/// Who is asking: the caller's credentials.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Ctx {
    pub const ROOT: Ctx = Ctx {
        uid: 0,
        gid: 0,
        pid: 0,
    };
}

/// File attributes, as getattr reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub generation: u64,
    pub size: u64,
    /// 512-byte units allocated.
    pub blocks: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub btime_ns: i64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
}

impl Attr {
    fn from_inode(ino: u64, i: &Inode) -> Self {
        Self {
            ino,
            generation: i.generation,
            size: i.size,
            blocks: i.blocks * (BLOCK_SIZE / 512),
            atime_ns: i.atime_ns,
            mtime_ns: i.mtime_ns,
            ctime_ns: i.ctime_ns,
            btime_ns: i.btime_ns,
            mode: u32::from(i.mode),
            nlink: i.nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: i.rdev as u32,
        }
    }

    pub fn file_type(&self) -> u16 {
        (self.mode as u16) & file_type::S_IFMT
    }
}

/// A time to set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(i64),
}

/// Attribute changes (setattr); `None` leaves a field alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<i64>,
}

/// statfs figures.
#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    /// Free blocks ordinary writes can use: `bfree` less the reserve that keeps deletes
    /// working on a full file system.
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// In-memory references the kernel holds on an inode.
#[derive(Clone, Copy, Debug, Default)]
struct Refs {
    lookups: u64,
    opens: u64,
}

/// A mounted pmfs.
#[derive(Debug)]
pub struct Fs {
    media: Arc<dyn Media>,
    geometry: Geometry,
    /// The superblock as on the media; changed only by [`Fs::require_features`] (a leaf
    /// lock: nothing is taken while it is held).
    superblock: Mutex<Superblock>,
    /// `superblock.incompat`, readable without the lock.
    incompat: AtomicU64,
    journal: Journal,
    alloc: Arc<BlockAllocator>,
    inodes: InodeTable,
    stripes: Vec<RwLock<()>>,
    refs: refs::RefTable,
    /// Guards the state record (orphan tree root, clean flag). Taken only by
    /// [`Fs::begin`], owned by the transaction until it ends.
    state: OrderedMutex<()>,
    /// Serialises renames between directories (the ancestry check must not race).
    rename_lock: OrderedMutex<()>,
    /// Direct-mapping leases and the frees they defer (a leaf lock).
    leases: Arc<Mutex<lease::Leases>>,
    /// The size and layout generation of inodes with published leases, for direct clients.
    publisher: publish::Publisher,
    /// Guards the deferred-free inode. Taken only by [`Fs::begin`].
    deferred_lock: OrderedMutex<()>,
    /// Unlinked files with many extents, to free in bounded steps once the unlink commits.
    pending_reaps: Mutex<Vec<u64>>,
    options: MountOptions,
    recovery: RecoveryReport,
    /// The device table of a file system over several devices (validated at mount).
    devices: Option<crate::format::devices::DeviceTable>,
    /// Which member new data of a thread goes to.
    placement: placement::Placement,
}

/// The block allocator seen as a source of B+tree nodes.
struct Nodes<'a>(&'a Arc<BlockAllocator>);

impl NodeAllocator for Nodes<'_> {
    fn alloc_node(&self, tx: &mut Tx<'_>, _owner: u64) -> Result<u64> {
        let r = self.0.allocate(
            tx,
            AllocRequest {
                blocks: 1,
                min_blocks: 1,
                aligned: false,
                goal: None,
            },
        )?;
        Ok(r.start)
    }

    fn free_node(&self, tx: &mut Tx<'_>, _owner: u64, block: u64) -> Result<()> {
        self.0.free(
            tx,
            BlockRange {
                start: block,
                len: 1,
            },
        )?;
        Ok(())
    }
}

impl Fs {
    /// Mounts the file system on `media`: validates the superblock, rolls back interrupted
    /// transactions, loads the allocator and inode table, and frees orphans.
    pub fn mount(media: Arc<dyn Media>, options: MountOptions) -> Result<Self> {
        let (superblock, geometry) = read_superblock(media.as_ref())?;
        // Validate the state record early (a clear error before recovery touches anything);
        // its contents are read again after recovery, which may roll them back.
        read_state(media.as_ref())?;
        let ro_unknown = superblock.ro_compat & !crate::format::RO_COMPAT_SUPPORTED.bits();
        if ro_unknown != 0 && !options.read_only {
            return Err(Error::ReadOnly);
        }
        if options.read_only {
            let pending = crate::journal::pending(media.as_ref(), &geometry)?;
            if !pending.is_empty() {
                return Err(Error::corrupted(
                    "journal",
                    0,
                    "the file system was not unmounted cleanly and needs recovery: mount it read-write once, or run fsck.pmfs -y",
                ));
            }
        }
        if !options.read_only {
            // Recovery stores into the journal and the fixed metadata: back them first (a
            // sparse image; the chunks in use follow once the allocator knows them).
            // Not the bitmap of regions never used: backing it is what the lazy bitmap saves.
            let summary = crate::meta::space::SpaceSummary::read(media.as_ref(), &geometry)?;
            let uninit = |r| summary.as_ref().is_some_and(|s| s.is_uninit(r));
            for (offset, len) in crate::meta::space::metadata_in_use(&geometry, uninit) {
                media.reserve(offset, len)?;
            }
        }
        let (journal, recovery) = Journal::open(Arc::clone(&media), geometry)?;
        let state = read_state(media.as_ref())?;
        let alloc =
            BlockAllocator::open_with_policy(media.as_ref(), &geometry, options.alloc_policy)?;
        alloc.set_reserve(reserve_blocks(&geometry));
        // More than the device can have is damage (fsck reports it): reserve what it can.
        alloc.reserve_regions(
            superblock
                .reserved_huge_regions()
                .min(geometry.max_huge_regions()),
        );
        if !options.read_only {
            reserve_space_in_use(media.as_ref(), &alloc)?;
        }
        let inodes = InodeTable::open(Arc::clone(&media), geometry)?;
        let devices = crate::meta::devices::read_device_table(media.as_ref(), &superblock)?;
        let placement = placement::Placement::new(devices.as_ref().map_or(Vec::new(), |t| {
            t.members()
                .iter()
                .enumerate()
                .map(|(k, e)| {
                    let node = options.member_nodes.get(k).copied().unwrap_or(e.node);
                    (node, e.base / BLOCK_SIZE, (e.base + e.size) / BLOCK_SIZE)
                })
                .collect()
        }));
        let fs = Self {
            media,
            geometry,
            incompat: AtomicU64::new(superblock.incompat),
            superblock: Mutex::new(superblock),
            journal,
            alloc,
            inodes,
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            refs: refs::RefTable::default(),
            state: OrderedMutex::new(Rank::State, ()),
            rename_lock: OrderedMutex::new(Rank::Rename, ()),
            leases: Arc::new(Mutex::new(lease::Leases::default())),
            publisher: publish::Publisher::default(),
            deferred_lock: OrderedMutex::new(Rank::Deferred, ()),
            pending_reaps: Mutex::new(Vec::new()),
            options,
            recovery,
            devices,
            placement,
        };
        let root = fs.inodes.read(ROOT_INO)?;
        if !root.is_dir() {
            return Err(Error::corrupted("root inode", ROOT_INO, "not a directory"));
        }
        if !fs.options.read_only {
            fs.free_all_orphans(&state)?;
            fs.free_deferred_at_mount()?;
            fs.inodes.shrink(&fs.journal, &fs.alloc)?;
            let none = StripeGuards::none();
            let mut tx = fs.begin(&none, LockSet::STATE)?;
            let mut st = read_state(fs.media.as_ref())?;
            st.clean = 0;
            st.mount_count += 1;
            st.last_mount_ns = now_ns();
            st.seal();
            tx.write_struct(STATE_OFFSET, &st)?;
            tx.commit()?;
        }
        Ok(fs)
    }

    /// Marks the file system clean and makes everything durable (unmount).
    pub fn shutdown(&self) -> Result<()> {
        if self.options.read_only || self.journal.is_shut_down() {
            // Shut down on request: stay as the shutdown left it (not marked clean); the
            // next mount recovers.
            return Ok(());
        }
        {
            let none = StripeGuards::none();
            let mut tx = self.begin(&none, LockSet::STATE)?;
            let mut st = read_state(self.media.as_ref())?;
            st.clean = 1;
            st.free_blocks = self.alloc.free_blocks();
            st.last_unmount_ns = now_ns();
            st.seal();
            tx.write_struct(STATE_OFFSET, &st)?;
            tx.commit()?;
        }
        // The last change of this mount is committed: the summary's counts are exact now.
        self.alloc.write_summary(self.media.as_ref())?;
        self.media.sync_all()?;
        Ok(())
    }

    pub fn superblock(&self) -> Superblock {
        *self.superblock.lock()
    }

    /// Makes sure the file system has `features` before something that needs them is
    /// stored: a version-1 file system becomes version 2 on its first use of a version-2
    /// feature (docs/FORMAT.md, "Version 1 file systems"). Call before the transaction that
    /// stores the flag or the size.
    fn require_features(&self, features: IncompatFeatures) -> Result<()> {
        if self.incompat.load(Ordering::Acquire) & features.bits() == features.bits() {
            return Ok(());
        }
        self.check_writable()?;
        let mut sb = self.superblock.lock();
        if sb.incompat & features.bits() == features.bits() {
            return Ok(());
        }
        let mut new = *sb;
        new.incompat |= features.bits();
        new.version = new.version.max(new.incompat_features().version_needed());
        new.seal();
        upgrade_superblock(self.media.as_ref(), &new)?;
        log::info!(
            "superblock: version {} -> {}, features {} added",
            sb.version,
            new.version,
            features.names()
        );
        *sb = new;
        self.incompat.store(new.incompat, Ordering::Release);
        Ok(())
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub fn media(&self) -> &Arc<dyn Media> {
        &self.media
    }

    pub fn allocator(&self) -> &Arc<BlockAllocator> {
        &self.alloc
    }

    pub fn inode_table(&self) -> &InodeTable {
        &self.inodes
    }

    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// True for a read-only mount, and once a failed commit stopped the journal.
    pub fn is_read_only(&self) -> bool {
        self.options.read_only || self.journal.is_poisoned()
    }

    /// The journal (tests use it to simulate a failed commit).
    #[doc(hidden)]
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    pub fn set_read_only(&mut self, ro: bool) {
        self.options.read_only = ro;
    }

    fn reader(&self) -> TreeReader<'_> {
        TreeReader::new(self.media.as_ref(), &self.geometry)
    }

    fn nodes(&self) -> Nodes<'_> {
        Nodes(&self.alloc)
    }

    fn stripe(ino: u64) -> usize {
        (ino % STRIPES as u64) as usize
    }

    fn read_lock(&self, ino: u64) -> StripeRead<'_> {
        let rank = Ranked::acquire(Rank::Stripes);
        StripeRead::new([Some(self.stripes[Self::stripe(ino)].read()), None], rank)
    }

    /// Read-locks the stripes of `a` and `b` in ascending order (a shared stripe once).
    fn read_lock_pair(&self, a: u64, b: u64) -> StripeRead<'_> {
        let rank = Ranked::acquire(Rank::Stripes);
        let (x, y) = (Self::stripe(a), Self::stripe(b));
        let (lo, hi) = (x.min(y), x.max(y));
        let first = self.stripes[lo].read();
        let second = (hi != lo).then(|| self.stripes[hi].read());
        StripeRead::new([Some(first), second], rank)
    }

    /// Write-locks the stripes of `inos` in ascending order (duplicates once).
    fn lock_all(&self, inos: &[u64]) -> StripeGuards<'_> {
        let (guards, rank) = self.write_stripes(inos);
        // Under the locks, before the caller changes anything.
        let pending = self.publish_begin(inos);
        StripeGuards::new(
            guards,
            rank,
            (!pending.is_empty()).then_some((self, pending)),
        )
    }

    /// [`Fs::lock_all`] for a change of nothing direct clients are told of (the access
    /// time alone): their views of the size and layout stay valid, so the change is not
    /// published and moves no generation (a served read that stamps the access time would
    /// otherwise have to refresh its view right after).
    fn lock_all_unpublished(&self, inos: &[u64]) -> StripeGuards<'_> {
        let (guards, rank) = self.write_stripes(inos);
        StripeGuards::new(guards, rank, None)
    }

    /// The write locks of the stripes of `inos`, taken in stripe order.
    fn write_stripes(&self, inos: &[u64]) -> (Vec<parking_lot::RwLockWriteGuard<'_, ()>>, Ranked) {
        let rank = Ranked::acquire(Rank::Stripes);
        let mut s: Vec<usize> = inos.iter().map(|&i| Self::stripe(i)).collect();
        s.sort_unstable();
        s.dedup();
        let guards = s.into_iter().map(|i| self.stripes[i].write()).collect();
        (guards, rank)
    }

    fn check_writable(&self) -> Result<()> {
        self.check_alive()?;
        if self.options.read_only || self.journal.is_poisoned() {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Fails every operation, reads included, once the file system was shut down on
    /// request ([`Fs::shut_down`]), as XFS and ext4 do.
    fn check_alive(&self) -> Result<()> {
        if self.journal.is_shut_down() {
            Err(crate::journal::JournalError::ShutDown.into())
        } else {
            Ok(())
        }
    }

    /// FS_IOC_SHUTDOWN: stops the file system until it is mounted again. Every reply
    /// already was durable, so there is nothing to flush: from now on every operation fails
    /// with EIO, and the next mount finds what committed (recovery rolls back whatever was
    /// in flight).
    pub fn shut_down(&self) {
        self.journal.shut_down();
    }

    /// Reads an inode in use.
    pub fn inode(&self, ino: u64) -> Result<Inode> {
        self.inodes.read(ino)
    }

    fn dir_inode(&self, ino: u64) -> Result<Inode> {
        let i = self.inodes.read(ino)?;
        if !i.is_dir() {
            return Err(Error::NotDir);
        }
        Ok(i)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        self.check_alive()?;
        let _g = self.read_lock(ino);
        Ok(Attr::from_inode(ino, &self.inodes.read(ino)?))
    }

    /// Notes one more kernel reference from a lookup/create reply.
    fn add_lookup(&self, ino: u64) {
        self.refs.add_lookup(ino);
    }

    /// FORGET: the kernel dropped `n` references.
    pub fn forget(&self, ino: u64, n: u64) {
        if self.refs.forget(ino, n) && !self.is_read_only() {
            if let Err(e) = self.reap(ino) {
                log::error!("inode {ino}: freeing unlinked inode failed: {e}");
            }
            self.give_back_inode_chunks();
        }
    }

    /// Returns trailing inode-table chunks that emptied to the free space (call with no
    /// locks held, after inodes were freed).
    pub(super) fn give_back_inode_chunks(&self) {
        if self.is_read_only() || !self.inodes.shrinkable() {
            return;
        }
        if let Err(e) = self.inodes.shrink(&self.journal, &self.alloc) {
            log::error!("giving back empty inode-table chunks failed: {e}");
        }
    }

    /// Opens an inode with open(2)'s `flags` (counts the open so an unlinked file keeps its
    /// data). The open is counted under the inode's lock, so a concurrent reap either sees
    /// it or has already freed the inode (and this open fails with NotFound). An open that
    /// could write an immutable file, or overwrite an append-only one, is EPERM.
    pub fn open(&self, ino: u64, flags: i32) -> Result<Attr> {
        self.check_alive()?;
        let _g = self.read_lock(ino);
        let i = self.inodes.read(ino)?;
        flags::may_open(&i, flags)?;
        let a = Attr::from_inode(ino, &i);
        #[cfg(test)]
        failpoint::hit("open.before_count")?;
        self.refs.open(ino);
        Ok(a)
    }

    /// Releases an open.
    pub fn release(&self, ino: u64) {
        if self.refs.release(ino) && !self.is_read_only() {
            if let Err(e) = self.reap(ino) {
                log::error!("inode {ino}: freeing unlinked inode failed: {e}");
            }
            self.give_back_inode_chunks();
        }
    }

    fn held(&self, ino: u64) -> Refs {
        self.refs.held(ino)
    }

    /// Frees what an unlinked inode still holds once nobody references it: its data when no
    /// open remains, the inode itself when the kernel has forgotten it too.
    fn reap(&self, ino: u64) -> Result<()> {
        if self.held(ino).opens > 0 {
            return Ok(());
        }
        self.shrink_orphan(ino)?;
        let g = self.lock_all(&[ino]);
        let Ok(mut inode) = self.inodes.read(ino) else {
            return Ok(());
        };
        if inode.nlink != 0 || inode.flags & inode_flags::ORPHAN == 0 {
            return Ok(());
        }
        let refs = self.held(ino);
        if refs.opens > 0 {
            return Ok(());
        }
        let mut tx = self.begin(
            &g,
            LockSet {
                state: true,
                deferred: self.is_leased(ino),
                frees: true,
            },
        )?;
        self.release_contents(&mut tx, ino, &mut inode)?;
        if refs.lookups == 0 {
            self.orphan_remove(&mut tx, ino)?;
            self.free_inode(&mut tx, ino, &mut inode)?;
        } else {
            self.inodes.write(&mut tx, ino, &mut inode)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Frees unlinked files queued by unlinks and renames (call with no locks held).
    pub(super) fn finish_pending_reaps(&self) {
        let inos = std::mem::take(&mut *self.pending_reaps.lock());
        for ino in inos {
            if let Err(e) = self.reap(ino) {
                log::error!("inode {ino}: freeing unlinked inode failed: {e}");
            }
        }
    }

    /// Frees the blocks of an unlinked regular file from the end, at most
    /// [`SHRINK_BATCH`] extents per transaction, until its extents fit the transaction that
    /// frees the rest. Each step is atomic and leaves a consistent (shorter) orphan; a crash
    /// in between is finished by the orphan scan at mount.
    fn shrink_orphan(&self, ino: u64) -> Result<()> {
        let g = self.lock_all(&[ino]);
        let Ok(i) = self.inodes.read(ino) else {
            return Ok(());
        };
        if i.nlink != 0 || !i.is_reg() {
            return Ok(());
        }
        self.punch_in_steps(&g, ino, 0, u64::MAX, true)
    }

    /// Frees data blocks, extent tree, xattrs and symlink block of an inode (in memory
    /// `inode` is updated; the caller stores or frees it).
    fn release_contents(&self, tx: &mut MetaTx<'_>, ino: u64, inode: &mut Inode) -> Result<()> {
        if inode.is_reg() || inode.is_symlink() && inode.flags & inode_flags::INLINE_DATA == 0 {
            if inode.is_symlink() {
                if inode.tree_root != 0 {
                    self.alloc.free(
                        tx,
                        BlockRange {
                            start: inode.tree_root,
                            len: 1,
                        },
                    )?;
                    inode.tree_root = 0;
                }
            } else {
                self.truncate_blocks(tx, ino, inode, 0)?;
            }
        }
        if inode.xattr_block != 0 {
            self.alloc.free(
                tx,
                BlockRange {
                    start: inode.xattr_block,
                    len: u64::from(inode.xattr_blocks),
                },
            )?;
            inode.xattr_block = 0;
            inode.xattr_blocks = 0;
        }
        inode.blocks = 0;
        Ok(())
    }

    /// Clears the slot (keeping its generation) and frees the inode number.
    fn free_inode(&self, tx: &mut Tx<'_>, ino: u64, inode: &mut Inode) -> Result<()> {
        let generation = inode.generation;
        *inode = Inode::empty();
        inode.generation = generation;
        self.inodes.write(tx, ino, inode)?;
        self.inodes.free(tx, ino)
    }

    fn orphan_tree(&self) -> Result<Tree> {
        let st = read_state(self.media.as_ref())?;
        Ok(Tree {
            kind: TreeKind::Directory,
            owner: NULL_INO,
            root: st.orphan_head,
        })
    }

    fn store_orphan_root(&self, tx: &mut Tx<'_>, root: u64) -> Result<()> {
        let mut st = read_state(self.media.as_ref())?;
        st.orphan_head = root;
        st.seal();
        tx.write_struct(STATE_OFFSET, &st)?;
        Ok(())
    }

    /// Adds an inode to the orphan tree (the transaction owns the state lock).
    fn orphan_add(&self, tx: &mut MetaTx<'_>, ino: u64) -> Result<()> {
        tx.require_state()?;
        let mut t = self.orphan_tree()?;
        btree::insert(tx, &self.reader(), &self.nodes(), &mut t, ino, &[])?;
        self.store_orphan_root(tx, t.root)
    }

    /// Removes an inode from the orphan tree (the transaction owns the state lock).
    fn orphan_remove(&self, tx: &mut MetaTx<'_>, ino: u64) -> Result<()> {
        tx.require_state()?;
        let mut t = self.orphan_tree()?;
        btree::remove(tx, &self.reader(), &self.nodes(), &mut t, ino)?;
        self.store_orphan_root(tx, t.root)
    }

    /// At mount: nobody references anything, so every orphan is freed.
    fn free_all_orphans(&self, state: &FsState) -> Result<()> {
        let t = Tree {
            kind: TreeKind::Directory,
            owner: NULL_INO,
            root: state.orphan_head,
        };
        let mut inos = Vec::new();
        self.reader().scan(&t, 0, &mut |k, _| {
            inos.push(k);
            true
        })?;
        for ino in inos {
            match self.free_orphan_at_mount(ino) {
                Ok(()) => {}
                // One damaged orphan must not keep the whole file system from mounting:
                // it stays on the list (its blocks stay in use) for fsck to repair.
                Err(e @ Error::Corrupted { .. }) => log::error!(
                    "orphan inode {ino} could not be freed ({e}); it stays on the orphan \
                     list until fsck.pmfs -y repairs it"
                ),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn free_orphan_at_mount(&self, ino: u64) -> Result<()> {
        self.shrink_orphan(ino)?;
        let g = self.lock_all(&[ino]);
        let mut tx = self.begin(&g, LockSet::STATE.freeing())?;
        if let Ok(mut inode) = self.inodes.read(ino) {
            if inode.nlink == 0 {
                self.release_contents(&mut tx, ino, &mut inode)?;
                self.free_inode(&mut tx, ino, &mut inode)?;
            }
        }
        self.orphan_remove(&mut tx, ino)?;
        tx.commit()
    }

    /// Orphans currently recorded (for fsck and tests).
    pub fn orphans(&self) -> Result<Vec<u64>> {
        let t = self.orphan_tree()?;
        let mut inos = Vec::new();
        self.reader().scan(&t, 0, &mut |k, _| {
            inos.push(k);
            true
        })?;
        Ok(inos)
    }

    /// FITRIM: hands the backing store of the free space in the device bytes
    /// `start..start + len` back to the file system holding a sparse image, in whole free
    /// 2 MiB chunks (runs of at least `minlen` bytes); free blocks of chunks that are partly
    /// in use stay. Returns the bytes discarded (every free byte of those chunks, as ext4
    /// and XFS count, whether or not it was backed before). Chunks discarded are allocated
    /// again when the allocator next hands them out ([`Media::reserve`]).
    ///
    /// [`Error::NotSupported`] on media that cannot hand space back (device-DAX, block
    /// devices, fully allocated images: there is nothing to give back without giving up
    /// the allocation made at mkfs); [`Error::Invalid`] for a start past the end, a length
    /// below one block, or a minimum larger than the device (as ext4).
    pub fn trim(&self, start: u64, len: u64, minlen: u64) -> Result<u64> {
        self.check_writable()?;
        if !self.media.can_discard() {
            return Err(Error::NotSupported);
        }
        let size = self.geometry.block_count * BLOCK_SIZE;
        if start >= size || len < BLOCK_SIZE || minlen > size {
            return Err(Error::Invalid);
        }
        let end = start.saturating_add(len).min(size);
        let chunks = start.div_ceil(CHUNK_SIZE)..end / CHUNK_SIZE;
        let media = self.media.as_ref();
        let trimmed = self.alloc.trim(
            chunks,
            minlen.div_ceil(CHUNK_SIZE),
            &mut |run: std::ops::Range<u64>| {
                media.discard(run.start * CHUNK_SIZE, (run.end - run.start) * CHUNK_SIZE)
            },
        )?;
        Ok(trimmed)
    }

    pub fn statfs(&self) -> StatFs {
        let free = self.alloc.free_blocks();
        // The first statfs reads the bitmap of every inode-table chunk (1 KiB each); a
        // bitmap the device cannot read counts as full.
        let used_inodes = self.inodes.used().unwrap_or_else(|e| {
            log::error!("counting inodes in use failed: {e}");
            self.inodes.capacity(0)
        });
        let capacity = self.inodes.capacity(free);
        // The gaps between members and their headers are allocated, but hold nothing.
        let layout_blocks: u64 = self
            .devices
            .as_ref()
            .map_or(0, |t| t.reserved_blocks().iter().map(|r| r.1).sum());
        StatFs {
            blocks: self.alloc.data_blocks().saturating_sub(layout_blocks),
            bfree: free,
            bavail: free.saturating_sub(self.alloc.reserve()),
            files: capacity.max(used_inodes),
            ffree: capacity.saturating_sub(used_inodes.min(capacity)),
            bsize: BLOCK_SIZE as u32,
            namelen: crate::format::NAME_MAX as u32,
        }
    }
}
