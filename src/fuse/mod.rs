//! The FUSE adapter: [`PmfsFuse`] implements [`fuser::Filesystem`] on top of [`Fs`].
//!
//! The adapter is thin on purpose. It turns requests into core calls and core results into
//! replies, and it owns the protocol decisions:
//! - what to negotiate at INIT ([`PmfsFuse::init`]): readdirplus, parallel directory
//!   operations, export support, direct I/O with shared mmap, large requests; never remote
//!   locking (the kernel's local locking is right for a file system only this kernel changes)
//!   and never io_uring (fuser 0.18 cannot serve it);
//! - how long the kernel may cache answers: a day for entries, attributes and negative
//!   entries, because every change to a pmfs goes through this mount;
//! - how files are opened ([`CacheMode`]);
//! - the parts of POSIX ACLs the kernel leaves to the file system ([`acl`]).
//!
//! Every error reply goes through [`errno`], which uses [`Error::errno`], the one mapping.

pub mod acl;
pub mod attr;
pub mod coherence;
pub mod fusermount;
pub mod ioctl;
pub mod kernel_mount;
pub mod mountinfo;
pub mod options;
pub mod spin;

use crate::error::{Error, Result};
use crate::format::file_type;
use crate::fs::{Attr, Ctx, Fs, SetAttr};
use acl::Acl;
use attr::{file_attr, kind, nanos, negative_attr, set_time};
use coherence::{Guarded, MappedWrites};
use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, PollEvents,
    PollFlags, PollNotifier, RenameFlags, ReplyAttr, ReplyBmap, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen,
    ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

/// How long the kernel may cache entries, attributes and negative entries. Only this mount
/// changes the file system, and the kernel updates or drops its cache on every change it
/// makes itself, so the timeout only bounds memory, never staleness.
pub const TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Background requests (readahead, async direct I/O) the kernel may have in flight.
const MAX_BACKGROUND: u16 = 64;

/// How file data meets the kernel page cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// `FOPEN_DIRECT_IO` for every open: no page cache; pmem is the cache. Each read is
    /// answered from a copy of the mapping's bytes, each write(2) goes straight to pmem;
    /// shared mmap still works through `FUSE_DIRECT_IO_ALLOW_MMAP`, and direct writes to a
    /// file whose pages the kernel may cache wait for those pages to be invalidated, so
    /// that write(2) and stores through a shared mapping never undo each other
    /// ([`coherence`]).
    #[default]
    Direct,
    /// Ordinary page-cache I/O with `FOPEN_KEEP_CACHE` (nothing changes a file behind the
    /// kernel's back, so its cache stays valid across opens), write-through: every write(2)
    /// is durable when it returns.
    Page,
    /// `Page` plus the kernel's writeback cache (`FUSE_WRITEBACK_CACHE`): write(2)
    /// completes in memory and the kernel writes pages back in large requests; written data
    /// is durable after fsync, msync, sync or unmount, as on a disk file system. Costs
    /// requests on metadata-heavy work: a FLUSH at every close and a SETATTR of the times
    /// the kernel kept.
    Writeback,
}

impl CacheMode {
    /// The `cache=` option's value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Page => "page",
            Self::Writeback => "writeback",
        }
    }
}

/// A pmfs served through FUSE.
#[derive(Debug)]
pub struct PmfsFuse {
    fs: Fs,
    cache: CacheMode,
    /// The kernel offered zero-message opendir: answer OPENDIR with ENOSYS once and it stops
    /// sending OPENDIR/RELEASEDIR (directories need no open state here).
    no_opendir: bool,
    /// `FUSE_POSIX_ACL` (with `FUSE_DONT_MASK`) was negotiated: the kernel enforces ACLs and
    /// this adapter keeps modes and ACLs in step and applies default ACLs or the umask.
    acl: bool,
    /// `-o noacl`: never negotiate `FUSE_POSIX_ACL`, and refuse the ACL xattrs (the kernel
    /// would otherwise pass them through unenforced, as it does for a FUSE daemon without
    /// ACL support mounted in the initial user namespace).
    no_acls: bool,
    /// Set when `destroy` marked the file system clean.
    clean: Arc<AtomicBool>,
    /// File handles: one per open, so direct-mapping leases end with their open.
    next_fh: AtomicU64,
    leases: ioctl::LeaseTable,
    /// The session's notifier, set once the session exists (see `notifier_slot`).
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// Switches the session threads between polling and sleeping (`spin=`); `None` = never
    /// poll.
    poller: Option<Arc<spin::Poller>>,
    /// The user the daemon runs as: the mount's owner, who may shut it down as root may.
    owner_uid: u32,
    /// `cache=direct`: the inodes the kernel may cache pages of, and their pending writes.
    mapped: Arc<MappedWrites>,
    /// The thread that invalidates the pages of guarded direct writes and then replies to
    /// them (started at the first one; see [`PmfsFuse::reply_after_invalidation`]).
    invalidator: std::sync::OnceLock<mpsc::Sender<Invalidation>>,
}

/// A guarded direct write's reply, waiting for the kernel to drop the pages of its range.
/// A reply that waits for the kernel to drop cached pages, sent from the invalidation
/// thread ([`PmfsFuse::reply_after_invalidation`]).
enum Invalidation {
    /// A guarded direct write: the pages of its range, then its guard ends.
    Write { write: Guarded, reply: ReplyWrite },
    /// A direct client's PMFS_IOC_DIRECT call that changed the file's data behind the
    /// kernel (stores, allocation, extension): all its pages, then `data` is the reply.
    Ioctl {
        ino: u64,
        data: Vec<u8>,
        reply: ReplyIoctl,
    },
}

fn range_len(r: &std::ops::Range<u64>) -> u32 {
    // A write's range: at most one request long.
    u32::try_from(r.end - r.start).unwrap_or(u32::MAX)
}

/// FS_IOC_SHUTDOWN (XFS_IOC_GOINGDOWN): `_IOR('X', 125, __u32)`.
const FS_IOC_SHUTDOWN: u32 = 0x8004_587d;

/// The reply to an error: logs it (debug; damage also at warn) and maps it to errno.
fn errno(op: &str, ino: u64, e: &Error) -> Errno {
    let code = e.errno();
    log::debug!("{op} (inode {ino}): {e}");
    if code == libc::EIO {
        log::warn!("{op} (inode {ino}): {e}");
    }
    Errno::from_i32(code)
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn entry(reply: ReplyEntry, a: &Attr) {
    reply.entry(&TTL, &file_attr(a), Generation(a.generation));
}

impl PmfsFuse {
    pub fn new(fs: Fs, cache: CacheMode) -> Self {
        Self {
            fs,
            cache,
            no_opendir: false,
            acl: false,
            no_acls: false,
            clean: Arc::new(AtomicBool::new(false)),
            next_fh: AtomicU64::new(1),
            leases: ioctl::LeaseTable::default(),
            notifier: Arc::new(std::sync::OnceLock::new()),
            poller: None,
            owner_uid: nix::unistd::geteuid().as_raw(),
            mapped: Arc::default(),
            invalidator: std::sync::OnceLock::new(),
        }
    }

    /// `-o acl` (true, the default) or `-o noacl` (false); before the session starts.
    pub fn set_acls(&mut self, on: bool) {
        self.no_acls = !on;
    }

    /// EOPNOTSUPP for an ACL xattr under `-o noacl`, as a kernel file system mounted
    /// with noacl answers.
    fn refuse_acl_xattr(&self, name: &[u8]) -> Result<()> {
        if self.no_acls && (name == acl::ACCESS || name == acl::DEFAULT) {
            Err(Error::NotSupported)
        } else {
            Ok(())
        }
    }

    /// Polls `/dev/fuse` for `window` after each request instead of sleeping (see [`spin`]);
    /// the daemon attaches the returned poller to the session.
    pub fn poll_for(&mut self, window: Duration, threads: usize) -> Arc<spin::Poller> {
        let poller = spin::Poller::new(window, threads);
        self.poller = Some(Arc::clone(&poller));
        poller
    }

    /// Every request handler starts here.
    #[inline]
    fn begin(&self) {
        if let Some(p) = &self.poller {
            p.request();
        }
    }

    /// Where the daemon puts the session's notifier after creating the session.
    pub fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        Arc::clone(&self.notifier)
    }

    /// True when a data change by this caller will clear set-user/group-ID bits: the
    /// kernel must then be told that its cached attributes are stale (under
    /// HANDLE_KILLPRIV_V2 it leaves the clearing to the daemon, and a WRITE or FALLOCATE
    /// reply carries no attributes).
    fn clears_privs(&self, req: &Request, ino: u64) -> bool {
        req.uid() != 0 && self.fs.getattr(ino).is_ok_and(|a| a.mode & 0o6000 != 0)
    }

    /// Invalidates the kernel's cached attributes of `ino` (not its page cache).
    fn attrs_changed(&self, ino: u64) {
        if let Some(n) = self.notifier.get() {
            if let Err(e) = n.inval_inode(INodeNo(ino), -1, 0) {
                log::debug!("invalidating attributes of inode {ino}: {e}");
            }
        }
    }

    fn new_fh(&self) -> FileHandle {
        FileHandle(self.next_fh.fetch_add(1, Ordering::Relaxed))
    }

    /// The core below.
    pub fn fs(&self) -> &Fs {
        &self.fs
    }

    /// A flag that turns true once the session ended and the file system was marked clean
    /// (`Fs::shutdown` succeeded). The daemon reads it after the session to choose its exit
    /// status.
    pub fn clean_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.clean)
    }

    /// The open flags of a regular file (the same for every access mode).
    ///
    /// `cache=direct` gives every open direct I/O (`FOPEN_DIRECT_IO`), writable ones too:
    /// [`coherence`] keeps their writes and stores through shared mappings from undoing
    /// each other, which a write through the page cache would get from the page lock, at
    /// the cost of copying every written byte into the page cache. Without `FOPEN_KEEP_CACHE` each open drops
    /// the cached pages of the file, which stores through a direct mapping ([`crate::dax`])
    /// may have made stale.
    fn fopen_flags(&self) -> FopenFlags {
        // No FLUSH on close: flush has nothing to do (every write is durable on reply, and
        // locks are the kernel's own), so it would only be a round trip.
        let common = FopenFlags::FOPEN_NOFLUSH;
        match self.cache {
            CacheMode::Direct => common | FopenFlags::FOPEN_DIRECT_IO,
            CacheMode::Page | CacheMode::Writeback => common | FopenFlags::FOPEN_KEEP_CACHE,
        }
    }

    /// Replies to a guarded direct write once the kernel dropped the pages of its range
    /// (step 3 of [`coherence`]), or to a direct client's call once the kernel dropped the
    /// pages of its file. The invalidation locks each cached page: it may launder dirty
    /// pages, and it waits for pages that reads or faults hold locked while their READ
    /// waits for this daemon, so it runs on a thread of its own, never on a session thread
    /// (with every session thread inside one, nothing serves those READs: xfstests
    /// generic/095 hung so under the preload library).
    fn reply_after_invalidation(&self, job: Invalidation) {
        let Some(notifier) = self.notifier.get() else {
            // No session (a test driving the adapter directly): no kernel caches pages.
            Self::finish_invalidation(&self.mapped, job);
            return;
        };
        let queue = self.invalidator.get_or_init(|| {
            let (queue, jobs) = mpsc::channel::<Invalidation>();
            let (notifier, mapped) = (notifier.clone(), Arc::clone(&self.mapped));
            let spawned = std::thread::Builder::new()
                .name("pmfs-inval".into())
                .spawn(move || {
                    for job in jobs {
                        let (ino, start, len) = match &job {
                            Invalidation::Write { write, .. } => (
                                write.ino,
                                write.range.start as i64,
                                i64::from(range_len(&write.range)),
                            ),
                            Invalidation::Ioctl { ino, .. } => (*ino, 0, 0),
                        };
                        if let Err(e) = notifier.inval_inode(INodeNo(ino), start, len) {
                            // ENOENT: the kernel has forgotten the inode, and its pages.
                            log::debug!("invalidating pages of inode {ino}: {e}");
                        }
                        Self::finish_invalidation(&mapped, job);
                    }
                });
            if let Err(e) = spawned {
                log::error!("starting the page invalidation thread: {e}");
            }
            queue
        });
        if let Err(mpsc::SendError(job)) = queue.send(job) {
            // The thread could not start: the change is made, its pages may be stale.
            log::error!("a change not followed by a page invalidation");
            Self::finish_invalidation(&self.mapped, job);
        }
    }

    /// The rest of an invalidation's job, once the pages are gone: the reply.
    fn finish_invalidation(mapped: &coherence::MappedWrites, job: Invalidation) {
        match job {
            Invalidation::Write { write, reply } => {
                mapped.finish(&write);
                reply.written(range_len(&write.range));
            }
            Invalidation::Ioctl { data, reply, .. } => reply.ioctl(0, &data),
        }
    }

    /// A direct write under `cache=direct` (steps 2 and 3 of [`coherence`]): guarded if
    /// the kernel may cache pages of the inode, which is asked after the write, so that a
    /// fill racing with it is seen; the write is then made again under the guard, over any
    /// writeback of a stale page that came in between.
    fn direct_write(
        &self,
        ino: u64,
        offset: u64,
        data: &[u8],
        write: impl Fn(u64, &[u8]) -> Result<u32>,
    ) -> Result<(u32, Option<Guarded>)> {
        if !self.mapped.may_be_cached(ino) {
            let n = write(offset, data)?;
            if !self.mapped.may_be_cached(ino) {
                return Ok((n, None));
            }
        }
        self.mapped
            .guarded_write(ino, offset, data, || write(offset, data))
    }

    /// Answers a lookup-like request; on failure to reply nothing is counted twice: the core
    /// counted the reference only on success.
    fn reply_entry(&self, op: &str, ino: u64, r: Result<Attr>, reply: ReplyEntry) {
        match r {
            Ok(a) => entry(reply, &a),
            Err(e) => reply.error(errno(op, ino, &e)),
        }
    }
}

impl PmfsFuse {
    /// Creates an inode with `make(mode)` the way POSIX wants it under `parent`: with the
    /// parent's default ACL applied (and inherited by directories), or else the umask.
    fn create_node(
        &self,
        parent: u64,
        mode: u32,
        umask: u32,
        make: impl FnOnce(u32) -> Result<Attr>,
    ) -> Result<Attr> {
        if !self.acl {
            // Without FUSE_DONT_MASK the kernel applied the umask already; again is harmless.
            return make(mode & !(umask & 0o777));
        }
        let default = match self.fs.getxattr(parent, acl::DEFAULT) {
            Ok(v) => Acl::parse(&v).map(|a| (a, v)),
            Err(Error::NoAttr) => None,
            Err(e) => return Err(e),
        };
        let Some((default, default_raw)) = default else {
            return make(mode & !(umask & 0o777));
        };
        let (mode, access) = default.inherit(mode);
        let a = make(mode)?;
        let is_dir = a.file_type() == file_type::S_IFDIR;
        let mut set: Vec<(&[u8], Vec<u8>)> = Vec::new();
        if let Some(access) = access {
            set.push((acl::ACCESS, access.encode()));
        }
        if is_dir {
            set.push((acl::DEFAULT, default_raw));
        }
        for (name, value) in &set {
            if let Err(e) = self.fs.setxattr(a.ino, name, value, 0) {
                // The inode stays (its mode already as restrictive as the ACL's mask); the
                // kernel gets the error and never the entry, so give back its reference.
                self.fs.forget(a.ino, 1);
                return Err(e);
            }
        }
        if set.is_empty() {
            Ok(a)
        } else {
            self.fs.getattr(a.ino)
        }
    }

    /// chmod on an inode with an access ACL: the ACL follows the new mode.
    fn chmod_acl(&self, a: Attr) -> Result<Attr> {
        let mut access = match self.fs.getxattr(a.ino, acl::ACCESS) {
            Ok(v) => match Acl::parse(&v) {
                Some(acl) => acl,
                None => return Ok(a),
            },
            Err(Error::NoAttr) => return Ok(a),
            Err(e) => return Err(e),
        };
        access.chmod(a.mode);
        self.fs.setxattr(a.ino, acl::ACCESS, &access.encode(), 0)?;
        self.fs.getattr(a.ino)
    }

    /// setfacl: stores the access ACL (or drops it when the mode says it all) and brings the
    /// mode in step, clearing set-group-ID when the caller is neither in the file's group nor
    /// root (what FUSE_SETXATTR_ACL_KILL_SGID would say, which fuser 0.18 cannot receive).
    fn set_access_acl(&self, req: &Request, ino: u64, value: &[u8], flags: i32) -> Result<()> {
        let new = Acl::parse(value).ok_or(Error::Invalid)?;
        let cur = self.fs.getattr(ino)?;
        let mut mode = new.apply_to_mode(cur.mode);
        if mode & 0o2000 != 0 && !in_group_or_root(req, cur.gid) {
            mode &= !0o2000;
        }
        if new.equivalent_mode().is_some() {
            match self.fs.removexattr(ino, acl::ACCESS) {
                Ok(()) | Err(Error::NoAttr) => {}
                Err(e) => return Err(e),
            }
        } else {
            self.fs.setxattr(ino, acl::ACCESS, value, flags)?;
        }
        if mode != cur.mode {
            let s = SetAttr {
                mode: Some(mode),
                ..SetAttr::default()
            };
            self.fs.setattr(&ctx(req), ino, &s)?;
        }
        Ok(())
    }
}

/// True if the caller is root or belongs to group `gid` (primary or supplementary, as
/// /proc/PID/status lists them).
fn in_group_or_root(req: &Request, gid: u32) -> bool {
    if req.uid() == 0 || req.gid() == gid {
        return true;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", req.pid())) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
}

/// Asks for `flag` if the kernel offers it; logs what it lacks.
fn want(config: &mut KernelConfig, flag: InitFlags) {
    if let Err(missing) = config.add_capabilities(flag) {
        log::debug!("kernel lacks {missing:?}; going without it");
    }
}

impl Filesystem for PmfsFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Deliberately absent: FUSE_POSIX_LOCKS and FUSE_FLOCK_LOCKS (the kernel locks locally,
        // which is right: no other node shares this file system); FUSE_OVER_IO_URING (fuser
        // 0.18 has no io_uring loop); FUSE_SETXATTR_EXT (fuser 0.18 does not pass the bits it adds to
        // SETXATTR); FUSE_ATOMIC_O_TRUNC (its FUSE_OPEN_KILL_SUIDGID bit is not passed
        // either, so truncation stays a SETATTR); FUSE_PASSTHROUGH (it maps offset X of a
        // file to offset X of a backing file, which pmfs's layout is not).
        for flag in [
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_EXPORT_SUPPORT,
            // Without FUSE_READDIRPLUS_AUTO the kernel asks for attributes with every batch,
            // not only the first: `find -ls` and `rm -rf` then need no LOOKUP per entry.
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_MAX_PAGES,
            // The daemon clears set-user/group-ID on write, truncate, fallocate and chown
            // (`Fs::write`, `Fs::setattr`) without the kernel's flag bits, which fuser 0.18
            // does not pass: the rule is the kernel's, applied to the caller's uid and primary
            // gid. In return the kernel sets SB_NOSEC, so a write no longer costs a GETXATTR
            // of security.capability first (the kernel still checks it once after each
            // attribute refresh, and after any security.* xattr is set).
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        ] {
            want(config, flag);
        }
        match self.cache {
            CacheMode::Direct => want(config, InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP),
            CacheMode::Page => {}
            // fsync, msync, sync and unmount write dirty pages back before they ask the
            // daemon, and every WRITE is durable on reply, so they stay real operations.
            CacheMode::Writeback => want(config, InitFlags::FUSE_WRITEBACK_CACHE),
        }
        // POSIX ACLs: the kernel enforces them (the mount has default_permissions); the
        // umask becomes ours to apply, since a default ACL replaces it.
        self.acl = !self.no_acls
            && config
                .add_capabilities(InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK)
                .is_ok();
        self.no_opendir = config
            .capabilities()
            .contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        // fuser's default max_write is its buffer size (16 MiB); the kernel clamps it to
        // fs.fuse.max_pages_limit pages (1 MiB by default), so raising that sysctl is enough
        // to get larger requests.
        if let Err(n) = config.set_max_background(MAX_BACKGROUND) {
            log::debug!("max_background {MAX_BACKGROUND} refused; kernel suggests {n}");
        }
        log::debug!(
            "FUSE ABI {:?}; kernel capabilities {:?}",
            config.kernel_abi(),
            config.capabilities()
        );
        Ok(())
    }

    fn destroy(&mut self) {
        match self.fs.shutdown() {
            Ok(()) => self.clean.store(true, Ordering::SeqCst),
            Err(e) => log::error!("unmount: marking the file system clean failed: {e}"),
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.begin();
        match self.fs.lookup(parent.0, name.as_bytes()) {
            Ok(a) => entry(reply, &a),
            Err(Error::NotFound) => {
                // A negative entry the kernel may cache as long as positive ones.
                reply.entry(&TTL, &negative_attr(), Generation(0));
            }
            Err(e) => reply.error(errno("lookup", parent.0, &e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.begin();
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.begin();
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno("getattr", ino.0, &e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.begin();
        let s = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            ctime: ctime.map(nanos),
        };
        let r = self.fs.setattr(&ctx(req), ino.0, &s).and_then(|a| {
            if self.acl && mode.is_some() {
                self.chmod_acl(a)
            } else {
                Ok(a)
            }
        });
        match r {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno("setattr", ino.0, &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.begin();
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno("readlink", ino.0, &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.begin();
        let r = self.create_node(parent.0, mode, umask, |mode| {
            self.fs
                .mknod(&ctx(req), parent.0, name.as_bytes(), mode, rdev)
        });
        self.reply_entry("mknod", parent.0, r, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.begin();
        let r = self.create_node(parent.0, mode, umask, |mode| {
            self.fs.mkdir(&ctx(req), parent.0, name.as_bytes(), mode)
        });
        self.reply_entry("mkdir", parent.0, r, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.begin();
        match self.fs.unlink(parent.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("unlink", parent.0, &e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.begin();
        match self.fs.rmdir(parent.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("rmdir", parent.0, &e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.begin();
        let r = self.fs.symlink(
            &ctx(req),
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
        );
        self.reply_entry("symlink", parent.0, r, reply);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.begin();
        match self.fs.rename(
            &ctx(req),
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.bits(),
        ) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("rename", parent.0, &e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.begin();
        let r = self.fs.link(ino.0, newparent.0, newname.as_bytes());
        self.reply_entry("link", ino.0, r, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.begin();
        match self.fs.open(ino.0, flags.0) {
            Ok(_) => reply.opened(self.new_fh(), self.fopen_flags()),
            Err(e) => reply.error(errno("open", ino.0, &e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.begin();
        // Under cache=direct only page-cache fills come without a lock owner (coherence).
        if self.cache == CacheMode::Direct && lock_owner.is_none() {
            self.mapped
                .before_fill(ino.0, offset..offset.saturating_add(u64::from(size)));
        }
        // The core hands over a copy of the bytes (fuser's reply takes a `&[u8]`, and the
        // mapping is never lent out as one); reply from inside the callback.
        let mut reply = Some(reply);
        let r = self.fs.read(ino.0, offset, size, &mut |data| {
            if let Some(reply) = reply.take() {
                reply.data(data);
            }
        });
        if let Some(reply) = reply.take() {
            match r {
                Err(e) => reply.error(errno("read", ino.0, &e)),
                // The core promises one callback on success; an empty reply if it ever
                // does not, rather than fuser's EIO for a dropped reply.
                Ok(()) => reply.data(&[]),
            }
        } else if let Err(e) = r {
            log::warn!("read (inode {ino}): error after the reply was sent: {e}");
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.begin();
        let ino = ino.0;
        let kills = self.clears_privs(req, ino);
        let ctx = ctx(req);
        let write = |at: u64, bytes: &[u8]| self.fs.write(&ctx, ino, at, bytes);
        let r = if self.cache != CacheMode::Direct {
            write(offset, data).map(|n| (n, None))
        } else if write_flags.contains(WriteFlags::FUSE_WRITE_CACHE) {
            self.mapped
                .writeback(ino, offset, data, write)
                .map(|n| (n, None))
        } else {
            self.direct_write(ino, offset, data, write)
        };
        match r {
            Ok((n, guarded)) => {
                if kills {
                    self.attrs_changed(ino);
                }
                match guarded {
                    Some(write) => {
                        self.reply_after_invalidation(Invalidation::Write { write, reply })
                    }
                    None => reply.written(n),
                }
            }
            Err(e) => reply.error(errno("write", ino, &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.begin();
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.begin();
        // Direct mappings taken through this open end with it: their deferred frees run now.
        self.leases.release(&self.fs, fh.0);
        self.fs.release(ino.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.begin();
        match self.fs.fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fsync", ino.0, &e)),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.begin();
        if self.no_opendir {
            // Zero-message opendir: the kernel takes ENOSYS as "never ask again".
            reply.error(Errno::ENOSYS);
        } else {
            reply.opened(FileHandle(0), FopenFlags::empty());
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.begin();
        // Offsets are the core's cookies, passed through unchanged both ways.
        let r = self
            .fs
            .readdir(ino.0, offset as i64, &mut |child, next, ftype, name| {
                reply.add(
                    INodeNo(child),
                    next as u64,
                    kind(u32::from(ftype)),
                    OsStr::from_bytes(name),
                )
            });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("readdir", ino.0, &e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.begin();
        let r = self
            .fs
            .readdirplus(ino.0, offset as i64, &mut |a, next, name| {
                reply.add(
                    INodeNo(a.ino),
                    next as u64,
                    OsStr::from_bytes(name),
                    &TTL,
                    &file_attr(a),
                    Generation(a.generation),
                )
            });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("readdirplus", ino.0, &e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.begin();
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.begin();
        match self.fs.fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fsyncdir", ino.0, &e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.begin();
        let s = self.fs.statfs();
        // bavail leaves out the reserve that keeps deletes working on a full device.
        reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
        );
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.begin();
        let r = if let Err(e) = self.refuse_acl_xattr(name.as_bytes()) {
            Err(e)
        } else if self.acl && name.as_bytes() == acl::ACCESS {
            self.set_access_acl(req, ino.0, value, flags)
        } else {
            self.fs.setxattr(ino.0, name.as_bytes(), value, flags)
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("setxattr", ino.0, &e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.begin();
        let r = self
            .refuse_acl_xattr(name.as_bytes())
            .and_then(|()| self.fs.getxattr(ino.0, name.as_bytes()));
        match r {
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(errno("getxattr", ino.0, &e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.begin();
        match self.fs.listxattr(ino.0) {
            Ok(v) if self.no_acls => {
                // ACLs set under an earlier `acl` mount stay on the media, unseen.
                let kept: Vec<u8> = v
                    .split_inclusive(|&b| b == 0)
                    .filter(|n| {
                        let name = n.strip_suffix(&[0]).unwrap_or(n);
                        self.refuse_acl_xattr(name).is_ok()
                    })
                    .flatten()
                    .copied()
                    .collect();
                xattr_reply(reply, &kept, size)
            }
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(errno("listxattr", ino.0, &e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.begin();
        let r = self
            .refuse_acl_xattr(name.as_bytes())
            .and_then(|()| self.fs.removexattr(ino.0, name.as_bytes()));
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("removexattr", ino.0, &e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        self.begin();
        // The mount uses default_permissions, so the kernel checks permissions itself and
        // does not normally ask; if it does, the kernel's verdict stands.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.begin();
        let mode = (mode & !u32::from(file_type::S_IFMT)) | u32::from(file_type::S_IFREG);
        let r = self.create_node(parent.0, mode, umask, |mode| {
            self.fs.mknod(&ctx(req), parent.0, name.as_bytes(), mode, 0)
        });
        let a = match r {
            Ok(a) => a,
            Err(e) => return reply.error(errno("create", parent.0, &e)),
        };
        match self.fs.open(a.ino, flags) {
            Ok(_) => reply.created(
                &TTL,
                &file_attr(&a),
                Generation(a.generation),
                self.new_fh(),
                self.fopen_flags(),
            ),
            Err(e) => {
                // The kernel never learns of the entry: give back the reference mknod counted.
                self.fs.forget(a.ino, 1);
                reply.error(errno("create", a.ino, &e));
            }
        }
    }

    fn bmap(&self, _req: &Request, _ino: INodeNo, _blocksize: u32, _idx: u64, reply: ReplyBmap) {
        self.begin();
        reply.error(Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        self.begin();
        if cmd == FS_IOC_SHUTDOWN {
            // As XFS, only the administrator may stop the file system, and so may the user
            // who mounted it (who may as well unmount it or stop the daemon). The flags
            // (flush first or not) make no difference: every reply was durable already.
            // FUSE passes no input for this _IOR command, so they are not even seen.
            if req.uid() != 0 && req.uid() != self.owner_uid {
                return reply.error(Errno::from_i32(libc::EPERM));
            }
            log::warn!(
                "FS_IOC_SHUTDOWN by pid {}: the file system stops",
                req.pid()
            );
            self.fs.shut_down();
            return reply.ioctl(0, &[]);
        }
        if cmd == ioctl::FITRIM {
            // As ext4: discarding is for the administrator (CAP_SYS_ADMIN there; FUSE shows
            // only the caller's uid).
            if req.uid() != 0 {
                return reply.error(Errno::from_i32(libc::EPERM));
            }
            return match ioctl::fitrim(&self.fs, in_data) {
                Ok(data) => reply.ioctl(0, &data),
                Err(e) => reply.error(errno("FITRIM", ino.0, &e)),
            };
        }
        if let Some(attr_ioctl) = ioctl::AttrIoctl::from_cmd(cmd) {
            return match attr_ioctl.serve(&self.fs, &ctx(req), ino.0, in_data, out_size) {
                Ok(data) => {
                    if matches!(
                        attr_ioctl,
                        ioctl::AttrIoctl::SetFlags | ioctl::AttrIoctl::FsSetXattr
                    ) {
                        // The change moved ctime: the kernel's cached attributes are stale.
                        self.attrs_changed(ino.0);
                    }
                    reply.ioctl(0, &data)
                }
                Err(e) => reply.error(errno("ioctl", ino.0, &e)),
            };
        }
        // Otherwise only pmfs's own map/layout ioctl; FS_IOC_FIEMAP and the rest never
        // reach FUSE or are not ours.
        if out_size as usize != crate::device::dax::IOCTL_SIZE {
            return reply.error(Errno::from_i32(libc::ENOTTY));
        }
        if cmd == crate::device::dax::PMFS_IOC_DIRECT {
            return match self
                .leases
                .direct(&self.fs, &ctx(req), ino.0, fh.0, in_data)
            {
                Ok(ioctl::DirectOutcome::Reply(data)) => reply.ioctl(0, &data),
                Ok(ioctl::DirectOutcome::Touched(data)) => {
                    self.reply_after_invalidation(Invalidation::Ioctl {
                        ino: ino.0,
                        data,
                        reply,
                    });
                }
                Ok(ioctl::DirectOutcome::AttrsChanged(data)) => {
                    // Attributes only: no page is locked, so no session thread can wait.
                    self.attrs_changed(ino.0);
                    reply.ioctl(0, &data)
                }
                Err(e) => reply.error(errno("ioctl", ino.0, &e)),
            };
        }
        if cmd != crate::device::dax::PMFS_IOC_MAP {
            return reply.error(Errno::from_i32(libc::ENOTTY));
        }
        match self.leases.handle(&self.fs, ino.0, fh.0, in_data) {
            Ok(data) => reply.ioctl(0, &data),
            Err(e) => reply.error(errno("ioctl", ino.0, &e)),
        }
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        self.begin();
        // ENOSYS once makes the kernel report files as always ready, which they are.
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.begin();
        let kills = self.clears_privs(req, ino.0);
        match self.fs.fallocate(&ctx(req), ino.0, offset, length, mode) {
            Ok(()) => {
                if kills {
                    self.attrs_changed(ino.0);
                }
                reply.ok()
            }
            Err(e) => reply.error(errno("fallocate", ino.0, &e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.begin();
        match self.fs.lseek(ino.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno("lseek", ino.0, &e)),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.begin();
        match self
            .fs
            .copy_file_range(&ctx(req), ino_in.0, offset_in, ino_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno("copy_file_range", ino_out.0, &e)),
        }
    }
}

/// Answers GETXATTR/LISTXATTR: the size when asked for it (`size` 0), the bytes when they
/// fit, ERANGE when they do not.
fn xattr_reply(reply: ReplyXattr, value: &[u8], size: u32) {
    let Ok(len) = u32::try_from(value.len()) else {
        return reply.error(Errno::from_i32(libc::E2BIG));
    };
    if size == 0 {
        reply.size(len);
    } else if len <= size {
        reply.data(value);
    } else {
        reply.error(Errno::from_i32(libc::ERANGE));
    }
}
