//! DAX-style direct mapping of pmfs files, for applications (`pmfs::dax`).
//!
//! A FUSE file cannot be DAX-mapped by the kernel, so pmfs does it in user space: an ioctl on
//! an open pmfs file asks the daemon for the file's extents (allocating and zeroing holes in
//! the range) and takes a lease on them; [`DaxMapping::map`] then maps those ranges of the
//! device itself into one contiguous virtual range of the caller, each 2 MiB-aligned extent
//! at a 2 MiB-aligned address so the kernel can use huge (PMD) mappings, and a range with a
//! 1 GiB-aligned 1 GiB extent at a 1 GiB-aligned address (PUD mappings). Loads and stores
//! then reach pmem with no kernel and no daemon in the path.
//!
//! Rules:
//! - The mapping keeps a duplicate of the file descriptor open; the lease ends when the last
//!   descriptor of that open file is closed (the FUSE release). While the lease is held,
//!   pmfs never reuses the file's blocks, so a mapped process never sees another file's data.
//! - Size changes go through the file system (ftruncate, fallocate); map again afterwards.
//! - Direct mapping needs access to the device itself (read-write permission on the image or
//!   /dev/daxN.M), as device-DAX does.
//! - Coherence: with `cache=direct` mounts, read(2)/write(2) go straight to the same pmem, so
//!   both sides see each other's stores at once. With `cache=page`, the kernel page cache may
//!   hold stale copies: a reader through the mount can see old data until the cache drops it.
//! - Durability: [`DaxMapping::persist`] writes back cache lines (CLWB + SFENCE) on real pmem
//!   and memory-backed images, or msyncs on page-cache-backed devices.
//! - An image on hugetlbfs can be mapped only in whole huge pages: every extent of the range
//!   must start at a file offset and a device offset that are multiples of the mount's page
//!   size (2 MiB or 1 GiB) and be whole pages long; the mapping then starts at an address
//!   aligned to the page size, so the kernel maps it with PMD (2 MiB) or PUD (1 GiB) entries.
//!   A range with any other extent is refused (`ErrorKind::Unsupported`) rather than mapped
//!   with bytes of the page that belong to another file.
//!
//! The ioctl protocol is defined here ([`MapRequest`], [`MapReply`]) and served by the FUSE
//! adapter.

use super::PersistenceMode;
use super::mmap::{
    arch, block_device_size, cpu_flush_mode, dax_size, huge_align_for, hugetlb_page_size,
    is_memory_backed, nt_split, size_text,
};
use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::ptr::{self, NonNull};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of the ioctl argument (request in, reply out).
pub const IOCTL_SIZE: usize = 4096;
/// `_IOWR('p', 0x70, [u8; 4096])`: map a range (takes a lease) or list the layout.
pub const PMFS_IOC_MAP: u32 = ioc_rw(b'p', 0x70, IOCTL_SIZE as u32);
/// Magic of requests and replies.
pub const MAP_MAGIC: u32 = u32::from_le_bytes(*b"PMDX");
/// Request flag: allocate holes in the range and take a lease (else: layout only).
pub const MAP_FLAG_LEASE: u32 = 1;
/// Request flag, with [`MAP_FLAG_LEASE`]: a *published* lease for the preload library
/// (`preload/`): nothing is allocated, the extents are listed as they are (holes left out,
/// preallocated ones flagged [`ENTRY_UNWRITTEN`]), the reply's `generation` names the layout
/// they belong to, and the daemon publishes the file's size and layout generation in its
/// state table ([`StateTable`]) for as long as the lease lives. With `lease` set to a
/// published lease of the same open file and `start` 0, the request refreshes that lease's
/// extents instead of taking a new one.
pub const MAP_FLAG_PUBLISH: u32 = 2;
/// Reply entry flag: the extent is preallocated (reads as zeros).
pub const ENTRY_UNWRITTEN: u32 = 1;
/// `_IOWR('p', 0x71, [u8; 4096])`: requests about a published lease ([`DirectRequest`]).
pub const PMFS_IOC_DIRECT: u32 = ioc_rw(b'p', 0x71, IOCTL_SIZE as u32);
/// [`DirectRequest::op`]: where the lease's state is published ([`DirectReply`]).
pub const DIRECT_OP_STATE: u32 = 1;
/// [`DirectRequest::op`]: the holder stored into the file through its mapping: stamp mtime
/// and ctime with the current time and drop the kernel's cached pages of the file, so that
/// readers through the mount see the stores. Replies with a bare [`DirectReply`] header.
pub const DIRECT_OP_TOUCH: u32 = 2;
/// [`DirectRequest::op`]: make file bytes `offset..offset + len` written blocks the holder
/// may store into (holes allocated, preallocated extents converted; what lies inside the
/// file reads as zeros as before; at most 64 MiB), without changing the size. The layout
/// changes: the holder refreshes its lease. The daemon gives back what is left past the
/// end of file when the lease's open file is released. The reply's `path_len` is 0, and the
/// 8 bytes after its header hold the end of the range allocated (little-endian).
pub const DIRECT_OP_ALLOCATE: u32 = 3;
/// The most a [`DIRECT_OP_ALLOCATE`] allocates: the daemon allocates `offset..offset + len`
/// up to this length and replies with the end it reached.
pub const DIRECT_ALLOCATE_MAX: u64 = 64 << 20;
/// [`DirectRequest::op`]: the holder stored file bytes `offset..offset + len` into written
/// blocks (and persisted them) while the layout was at `generation`: make them part of the
/// file (size at least `offset + len`, mtime and ctime now, in one transaction). Fails with
/// ESTALE when the file changed since `generation` (the holder then writes the bytes through
/// the file system); on success the layout is unchanged and its generation is
/// `generation + 1`.
pub const DIRECT_OP_EXTEND: u32 = 4;
/// [`DirectRequest::op`]: the holder read the file through its mapping: update its access
/// time as a read through the file system would (the mount's relatime, strictatime or
/// noatime). The 8 bytes after the reply header (little-endian) are 1 when every read
/// updates it (strictatime), so the holder asks again for later reads, and 0 when only a
/// change of the file makes it due again (relatime: and a day passing; noatime: never).
pub const DIRECT_OP_ACCESSED: u32 = 5;

const fn ioc_rw(ty: u8, nr: u8, size: u32) -> u32 {
    // Linux _IOC: dir (2 bits: read|write = 3) << 30 | size << 16 | type << 8 | nr.
    (3 << 30) | (size << 16) | ((ty as u32) << 8) | nr as u32
}

/// The ioctl request (at the start of the 4 KiB argument).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MapRequest {
    pub magic: u32,
    pub flags: u32,
    /// Byte range to map (ignored for pages after the first of a lease).
    pub offset: u64,
    pub len: u64,
    /// 0 for a new request; the lease of an earlier reply to fetch more pages of it.
    pub lease: u64,
    /// First extent to return (paging).
    pub start: u32,
    pub pad: u32,
}

/// One extent of a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MapEntry {
    pub file_offset: u64,
    pub device_offset: u64,
    pub len: u64,
    pub flags: u32,
    pub pad: u32,
}

/// The ioctl reply header; up to [`ENTRIES_PER_PAGE`] entries follow it.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MapReply {
    pub magic: u32,
    /// Entries in this page.
    pub count: u32,
    /// Entries in all pages.
    pub total: u32,
    pub pad: u32,
    /// The lease (0 for layout requests).
    pub lease: u64,
    /// Published leases ([`MAP_FLAG_PUBLISH`]): the layout generation the extents belong to
    /// (compare with [`StateSnapshot::generation`]); 0 otherwise.
    pub generation: u64,
}

/// A [`PMFS_IOC_DIRECT`] request (at the start of the 4 KiB argument).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DirectRequest {
    pub magic: u32,
    /// One of the `DIRECT_OP_*` values.
    pub op: u32,
    /// A published lease of the open file the ioctl is issued on.
    pub lease: u64,
    /// [`DIRECT_OP_ALLOCATE`] and [`DIRECT_OP_EXTEND`]: the byte range (0 otherwise).
    pub offset: u64,
    pub len: u64,
    /// [`DIRECT_OP_EXTEND`]: the layout generation the stores were made in.
    pub generation: u64,
}

/// The reply to [`DIRECT_OP_STATE`]; the state table's path follows it (`path_len` bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DirectReply {
    pub magic: u32,
    /// The file's slot in the state table.
    pub slot: u32,
    pub path_len: u32,
    pub pad: u32,
}

/// Bytes of one slot of the state table.
pub const STATE_SLOT_SIZE: usize = 64;
/// Slots of the state table (one per inode with published leases).
pub const STATE_SLOTS: usize = 4096;
// Words of a slot (byte offsets in it).
const SLOT_SEQ: usize = 0;
const SLOT_INO: usize = 8;
const SLOT_SIZE: usize = 16;
const SLOT_GENERATION: usize = 24;
/// 1 when a client may serve overwrites (the inode is neither immutable nor append-only).
const SLOT_WRITES_ALLOWED: usize = 32;
/// Served writes under way: clients add 1 before the snapshot that allows a store and take
/// it off after the store ([`StateTable::writer_enter`]).
const SLOT_WRITERS: usize = 40;

/// One consistent reading of a slot of the state table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateSnapshot {
    /// The slot's sequence word when read: even (odd slots are never snapshotted).
    pub seq: u64,
    /// The inode the slot describes (0: a free slot).
    pub ino: u64,
    /// The file's size.
    pub size: u64,
    /// The layout generation: changes whenever anything about the file may have changed.
    pub generation: u64,
    /// Overwrites may be served: the inode is neither immutable nor append-only (chattr
    /// +i/+a), which the daemon enforces and a client serving stores must respect too.
    pub writes_allowed: bool,
}

/// What the daemon publishes of one inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishedState {
    pub size: u64,
    pub writes_allowed: bool,
}

/// The daemon's state table for published leases: a shared file of [`STATE_SLOTS`] slots,
/// each a seqlock over the size and layout generation of one inode.
///
/// Protocol (the daemon writes, clients read):
/// - Before an operation that changes an inode with a slot touches anything (under the
///   inode's stripe write lock), the daemon makes the slot's sequence word odd
///   ([`StateTable::begin`]); after the operation, before its locks drop and before its reply,
///   it stores the new size, increments the generation and makes the sequence even again
///   ([`StateTable::publish`]). An odd sequence that stays odd means the daemon could not
///   read the inode back: clients never serve from it.
/// - A client reads the sequence (even), the size and generation ([`StateTable::snapshot`]),
///   does its work, then checks that the sequence did not move ([`StateTable::unchanged`]);
///   if it moved, the work may have raced a change and is redone through the file system.
/// - A client about to store counts itself in the slot's writers word from before its
///   snapshot until the store is done ([`StateTable::writer_enter`]); a change that must not
///   be overtaken by stores (chattr +i/+a) waits, after [`StateTable::begin`], until the
///   count is 0 ([`StateTable::writers`]).
#[derive(Debug)]
pub struct StateTable {
    map: super::SharedFileMapping,
}

impl StateTable {
    /// Bytes of the table file.
    pub const LEN: u64 = (STATE_SLOTS * STATE_SLOT_SIZE) as u64;

    /// Creates the table file at `path` (which must not exist), with the owner and mode of
    /// `like` (the device: whoever may open the device read-write may read the table).
    pub fn create(path: &Path, like: Option<&std::fs::Metadata>) -> io::Result<Self> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.set_len(Self::LEN)?;
        if let Some(m) = like {
            std::os::unix::fs::fchown(&file, Some(m.uid()), Some(m.gid()))?;
            file.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o666))?;
        }
        Self::from_file(&file)
    }

    /// Opens an existing table file (a client).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Self::from_file(&file)
    }

    fn from_file(file: &File) -> io::Result<Self> {
        if file.metadata()?.len() != Self::LEN {
            return Err(invalid("pmfs state table has the wrong size"));
        }
        let map = super::SharedFileMapping::map(file)?;
        Ok(Self { map })
    }

    fn word(slot: u32, field: usize) -> Option<usize> {
        ((slot as usize) < STATE_SLOTS).then(|| slot as usize * STATE_SLOT_SIZE + field)
    }

    /// A consistent reading of `slot`, or `None` while the daemon changes it (or for a slot
    /// out of range).
    pub fn snapshot(&self, slot: u32) -> Option<StateSnapshot> {
        let seq = self.map.load_u64_acquire(Self::word(slot, SLOT_SEQ)?);
        if seq % 2 == 1 {
            return None;
        }
        let snap = StateSnapshot {
            seq,
            ino: self.map.load_u64_acquire(Self::word(slot, SLOT_INO)?),
            size: self.map.load_u64_acquire(Self::word(slot, SLOT_SIZE)?),
            generation: self
                .map
                .load_u64_acquire(Self::word(slot, SLOT_GENERATION)?),
            writes_allowed: self
                .map
                .load_u64_acquire(Self::word(slot, SLOT_WRITES_ALLOWED)?)
                == 1,
        };
        self.unchanged(slot, seq).then_some(snap)
    }

    /// True when `slot`'s sequence is still `seq`: nothing changed since the snapshot that
    /// read it. Every load made before this call (the client's copy included) is ordered
    /// before the sequence load.
    pub fn unchanged(&self, slot: u32, seq: u64) -> bool {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        Self::word(slot, SLOT_SEQ).is_some_and(|w| self.map.load_u64_acquire(w) == seq)
    }

    /// A client is about to snapshot `slot` for a store: counted until
    /// [`StateTable::writer_leave`]. The SeqCst increment and fence pair with those of
    /// [`StateTable::begin`] and [`StateTable::writers`]: either the daemon sees the count
    /// (and, for a change that waits for stores, waits) or the client's snapshot sees the
    /// odd sequence (and stores nothing).
    pub fn writer_enter(&self, slot: u32) {
        if let Some(w) = Self::word(slot, SLOT_WRITERS) {
            self.map.fetch_add_u64(w, 1);
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The store that [`StateTable::writer_enter`] announced is done.
    pub fn writer_leave(&self, slot: u32) {
        if let Some(w) = Self::word(slot, SLOT_WRITERS) {
            self.map.fetch_add_u64(w, u64::MAX); // - 1, wrapping
        }
    }

    /// Stores under way in `slot` (the daemon, after [`StateTable::begin`]).
    pub fn writers(&self, slot: u32) -> u64 {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Self::word(slot, SLOT_WRITERS).map_or(0, |w| self.map.load_u64_acquire(w))
    }

    /// A slot handed to a new inode starts with no writers (a client that died between
    /// enter and leave left its count behind).
    pub fn reset_writers(&self, slot: u32) {
        if let Some(w) = Self::word(slot, SLOT_WRITERS) {
            self.map.store_u64_release(w, 0);
        }
    }

    /// The daemon starts changing the inode of `slot`: the sequence turns odd.
    pub fn begin(&self, slot: u32) {
        let Some(w) = Self::word(slot, SLOT_SEQ) else {
            return;
        };
        let seq = self.map.load_u64_acquire(w);
        if seq % 2 == 0 {
            self.map.store_u64_release(w, seq + 1);
            // The stores of the change that follows must not become visible before the odd
            // sequence does.
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The daemon finished changing `slot`'s inode `ino`: publishes its `state`, a new
    /// generation, and an even sequence. Returns the new generation.
    pub fn publish(&self, slot: u32, ino: u64, state: PublishedState) -> u64 {
        let (Some(seq_w), Some(ino_w), Some(size_w), Some(gen_w), Some(writes_w)) = (
            Self::word(slot, SLOT_SEQ),
            Self::word(slot, SLOT_INO),
            Self::word(slot, SLOT_SIZE),
            Self::word(slot, SLOT_GENERATION),
            Self::word(slot, SLOT_WRITES_ALLOWED),
        ) else {
            return 0;
        };
        self.begin(slot); // a no-op when the change began it already
        let odd = self.map.load_u64_acquire(seq_w);
        let generation = self.map.load_u64_acquire(gen_w).wrapping_add(1);
        self.map.store_u64_release(ino_w, ino);
        self.map.store_u64_release(size_w, state.size);
        self.map
            .store_u64_release(writes_w, u64::from(state.writes_allowed));
        self.map.store_u64_release(gen_w, generation);
        self.map.store_u64_release(seq_w, odd.wrapping_add(1));
        generation
    }

    /// The generation `slot` holds now (the caller excludes changes to it).
    pub fn generation(&self, slot: u32) -> u64 {
        Self::word(slot, SLOT_GENERATION).map_or(0, |w| self.map.load_u64_acquire(w))
    }
}

/// Entries that fit one reply page.
pub const ENTRIES_PER_PAGE: usize = (IOCTL_SIZE - size_of::<MapReply>()) / size_of::<MapEntry>();

/// Issues the pmfs map ioctl on `file`, following pages; returns (lease, extents).
///
/// The reply comes from whatever FUSE server owns `file`: only its framing is checked here
/// (magic, counts that add up); [`DaxMapping::map`] validates the entries themselves.
pub fn query(file: &File, flags: u32, offset: u64, len: u64) -> io::Result<(u64, Vec<MapEntry>)> {
    query_bounded(file, flags, offset, len, u32::MAX as usize)
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// As [`query`], refusing a reply that announces more than `max_entries` entries (so a
/// hostile server cannot make us collect an arbitrary number of them).
fn query_bounded(
    file: &File,
    flags: u32,
    offset: u64,
    len: u64,
    max_entries: usize,
) -> io::Result<(u64, Vec<MapEntry>)> {
    query_paged(file, flags, offset, len, 0, max_entries).map(|(lease, _, v)| (lease, v))
}

/// As [`query_bounded`], starting from `lease` (0: a new lease; else a published lease to
/// refresh); returns (lease, generation, extents).
fn query_paged(
    file: &File,
    flags: u32,
    offset: u64,
    len: u64,
    mut lease: u64,
    max_entries: usize,
) -> io::Result<(u64, u64, Vec<MapEntry>)> {
    let mut generation = 0;
    let mut total = None;
    let mut out = Vec::new();
    loop {
        let req = MapRequest {
            magic: MAP_MAGIC,
            flags,
            offset,
            len,
            lease,
            start: out.len() as u32,
            pad: 0,
        };
        let mut buf = vec![0u8; IOCTL_SIZE];
        buf[..size_of::<MapRequest>()].copy_from_slice(req.as_bytes());
        // SAFETY: PMFS_IOC_MAP is an _IOWR ioctl of IOCTL_SIZE bytes, and `buf` is a live,
        // writable buffer of exactly that size for the duration of the call.
        let r = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                PMFS_IOC_MAP as libc::Ioctl,
                buf.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let (reply, rest) =
            MapReply::read_from_prefix(&buf).map_err(|_| invalid("short pmfs ioctl reply"))?;
        if reply.magic != MAP_MAGIC || reply.count as usize > ENTRIES_PER_PAGE {
            return Err(invalid("malformed pmfs ioctl reply"));
        }
        // Every page must announce the same total, and no page may go past it.
        let all = *total.get_or_insert(reply.total as usize);
        if all != reply.total as usize
            || all > max_entries
            || out.len() + reply.count as usize > all
            || (!out.is_empty() && (reply.lease != lease || reply.generation != generation))
        {
            return Err(invalid("inconsistent pmfs ioctl reply pages"));
        }
        lease = reply.lease;
        generation = reply.generation;
        for i in 0..reply.count as usize {
            let at = i * size_of::<MapEntry>();
            let e = MapEntry::read_from_bytes(&rest[at..at + size_of::<MapEntry>()])
                .map_err(|_| invalid("malformed pmfs ioctl entry"))?;
            out.push(e);
        }
        if reply.count == 0 || out.len() >= reply.total as usize {
            return Ok((lease, generation, out));
        }
    }
}

/// What [`DaxMapping::map_published`] returns.
#[derive(Debug)]
pub struct PublishedMapping {
    pub mapping: Option<DaxMapping>,
    pub entries: Vec<MapEntry>,
    pub lease: u64,
    pub generation: u64,
}

/// Issues [`PMFS_IOC_DIRECT`] `op` for `lease` on `file`; returns the reply header and the
/// bytes after it.
pub fn direct_request(file: &File, op: u32, lease: u64) -> io::Result<(DirectReply, Vec<u8>)> {
    direct_range_request(
        file,
        DirectRequest {
            magic: MAP_MAGIC,
            op,
            lease,
            offset: 0,
            len: 0,
            generation: 0,
        },
    )
}

/// [`DIRECT_OP_ALLOCATE`] of `offset..offset + len` through `lease`; returns the end of the
/// range the daemon allocated.
pub fn direct_allocate(file: &File, lease: u64, offset: u64, len: u64) -> io::Result<u64> {
    let (reply, rest) = direct_range_request(
        file,
        DirectRequest {
            magic: MAP_MAGIC,
            op: DIRECT_OP_ALLOCATE,
            lease,
            offset,
            len,
            generation: 0,
        },
    )?;
    let end = rest
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .filter(|&end| end > offset && reply.path_len == 0)
        .ok_or_else(|| invalid("malformed pmfs allocate reply"))?;
    Ok(end)
}

/// [`DIRECT_OP_ACCESSED`] through `lease`; returns true when every read updates the
/// access time (strictatime).
pub fn direct_accessed(file: &File, lease: u64) -> io::Result<bool> {
    let (reply, rest) = direct_request(file, DIRECT_OP_ACCESSED, lease)?;
    match rest.get(..8).filter(|_| reply.path_len == 0) {
        Some(b) => Ok(b[0] != 0),
        None => Err(invalid("malformed pmfs accessed reply")),
    }
}

/// [`DIRECT_OP_EXTEND`] of `offset..offset + len`, stored at layout `generation`.
pub fn direct_extend(
    file: &File,
    lease: u64,
    offset: u64,
    len: u64,
    generation: u64,
) -> io::Result<()> {
    direct_range_request(
        file,
        DirectRequest {
            magic: MAP_MAGIC,
            op: DIRECT_OP_EXTEND,
            lease,
            offset,
            len,
            generation,
        },
    )
    .map(|_| ())
}

fn direct_range_request(file: &File, req: DirectRequest) -> io::Result<(DirectReply, Vec<u8>)> {
    let mut buf = vec![0u8; IOCTL_SIZE];
    buf[..size_of::<DirectRequest>()].copy_from_slice(req.as_bytes());
    // SAFETY: PMFS_IOC_DIRECT is an _IOWR ioctl of IOCTL_SIZE bytes, and `buf` is a live,
    // writable buffer of exactly that size for the duration of the call.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            PMFS_IOC_DIRECT as libc::Ioctl,
            buf.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let (reply, rest) =
        DirectReply::read_from_prefix(&buf).map_err(|_| invalid("short pmfs ioctl reply"))?;
    if reply.magic != MAP_MAGIC {
        return Err(invalid("malformed pmfs ioctl reply"));
    }
    Ok((reply, rest.to_vec()))
}

/// Where the state of published leases of `file` lives: (slot, table path).
pub fn published_state(file: &File, lease: u64) -> io::Result<(u32, PathBuf)> {
    let (reply, rest) = direct_request(file, DIRECT_OP_STATE, lease)?;
    let path = rest
        .get(..reply.path_len as usize)
        .filter(|p| !p.is_empty() && !p.contains(&0))
        .ok_or_else(|| invalid("malformed pmfs state path"))?;
    use std::os::unix::ffi::OsStrExt;
    Ok((reply.slot, PathBuf::from(std::ffi::OsStr::from_bytes(path))))
}

/// The device a file's pmfs mount serves: the mount source in /proc/self/mountinfo of the
/// mount whose device number the file carries.
pub fn device_of(file: &File) -> io::Result<PathBuf> {
    let dev = file.metadata()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let want = format!("{major}:{minor}");
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.get(2) != Some(&want.as_str()) {
            continue;
        }
        let sep = fields.iter().position(|f| *f == "-");
        if let Some(source) = sep.and_then(|i| fields.get(i + 2)) {
            return Ok(PathBuf::from(source.replace("\\040", " ")));
        }
    }
    Err(io::Error::other(
        "not on a pmfs mount (no mount with this device number)",
    ))
}

/// Granularity of mappings: file offsets, device offsets and lengths are multiples of it.
const PAGE: u64 = 4096;

/// What a validated map reply needs: the bytes from the requested offset to the end of the
/// last entry (`span`), and the 2 MiB-rounded reservation that holds them (placed at an
/// address aligned to the mapping's alignment, which the reservation has room for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MapPlan {
    span: usize,
    reserved: usize,
}

/// Checks the entries of a map reply for `offset..offset + len` against what pmfs promises,
/// before anything is mapped `MAP_FIXED` at addresses computed from them: every length and
/// offset a positive multiple of 4 KiB, entries sorted by file offset and disjoint, none
/// before `offset` or past `offset + len` (rounded up to 4 KiB), every device range inside
/// a device of `device_size` bytes, all arithmetic checked. A reply that breaks any of this
/// comes from a broken or hostile server: `InvalidData`, never a mapping.
fn validate_entries(
    entries: &[MapEntry],
    offset: u64,
    len: u64,
    device_size: u64,
    align: usize,
) -> io::Result<MapPlan> {
    if offset % PAGE != 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // The server clamps the range to the file size rounded up to whole blocks.
    let limit = len
        .checked_next_multiple_of(PAGE)
        .unwrap_or(u64::MAX / PAGE * PAGE);
    let mut end = 0u64; // end of the previous entry, relative to `offset`
    for (i, e) in entries.iter().enumerate() {
        let bad = |why: &str| invalid(format!("pmfs map reply entry {i} {e:?}: {why}"));
        if e.len == 0 || e.len % PAGE != 0 {
            return Err(bad("length is not a positive multiple of 4096"));
        }
        if e.file_offset % PAGE != 0 || e.device_offset % PAGE != 0 {
            return Err(bad("offset is not a multiple of 4096"));
        }
        if e.flags & !ENTRY_UNWRITTEN != 0 {
            return Err(bad("unknown flags"));
        }
        let rel = e
            .file_offset
            .checked_sub(offset)
            .ok_or_else(|| bad("starts before the requested offset"))?;
        if rel < end {
            return Err(bad("not sorted, or overlaps the entry before it"));
        }
        end = rel
            .checked_add(e.len)
            .filter(|&x| x <= limit)
            .ok_or_else(|| bad("ends past the requested range"))?;
        let dev_end = e.device_offset.checked_add(e.len);
        if dev_end.is_none_or(|x| x > device_size)
            || libc::off_t::try_from(e.device_offset).is_err()
        {
            return Err(bad("device range outside the device"));
        }
    }
    if end == 0 {
        return Err(io::Error::other("nothing to map (empty range or file)"));
    }
    let too_big = || {
        invalid(format!(
            "pmfs map reply spans {end} bytes: too large to map"
        ))
    };
    let span = usize::try_from(end).map_err(|_| too_big())?;
    let reserved = span
        .checked_next_multiple_of(HUGE)
        .filter(|r| r.checked_add(align).is_some())
        .ok_or_else(too_big)?;
    Ok(MapPlan { span, reserved })
}

/// Refuses entries that hugetlbfs cannot map where they belong: it maps whole pages of
/// `page` bytes only, at page-aligned addresses and file offsets, so an extent must start
/// at a page multiple of the mapped range and of the device and be whole pages long (a
/// shorter one would expose the rest of its page, which holds other files' blocks).
/// The entries were validated first (`offset <= file_offset`).
fn check_whole_huge_pages(entries: &[MapEntry], offset: u64, page: u64) -> io::Result<()> {
    let misfit = entries.iter().find(|e| {
        (e.file_offset - offset) % page != 0 || e.device_offset % page != 0 || e.len % page != 0
    });
    let page_text = size_text(page);
    match misfit {
        None => Ok(()),
        Some(e) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "the device is a hugetlbfs image with {page_text} pages, which can be \
                 mapped only in whole pages: the extent at file offset {} (device offset {}, \
                 {} bytes) is not aligned to them; only ranges laid out in whole \
                 {page_text} extents can be mapped directly",
                e.file_offset, e.device_offset, e.len,
            ),
        )),
    }
}

/// Size in bytes of the device behind `device` (an image file, a block device or a
/// device-DAX node).
fn device_size(device: &File, path: &Path) -> io::Result<u64> {
    let meta = device.metadata()?;
    let ft = meta.file_type();
    let r = if ft.is_block_device() {
        block_device_size(path, device)
    } else if ft.is_char_device() {
        dax_size(path, meta.rdev())
    } else {
        return Ok(meta.len());
    };
    r.map_err(io::Error::other)
}

/// A direct mapping of a range of a pmfs file.
#[derive(Debug)]
pub struct DaxMapping {
    base: NonNull<u8>,
    /// Bytes reserved at `base` (the mapped range rounded up to 2 MiB).
    reserved: usize,
    len: usize,
    offset: u64,
    mode: PersistenceMode,
    /// Keeps the pmfs file open: the lease lives as long as this descriptor.
    _file: File,
    _device: File,
    huge_aligned: bool,
    /// The memory belongs to a program ([`HandedMapping`]): dropping leaves it mapped.
    handed: bool,
}

/// How [`DaxMapping::map_for_program`] maps the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// Stores reach the file (MAP_SHARED, MAP_SYNC where the device has it).
    Shared,
    /// Copy-on-write (MAP_PRIVATE): stores stay in the process, the file never sees them.
    Private,
}

// SAFETY: the mapping is plain shared memory owned by this value; it may move between
// threads. Access through `as_ptr` is the caller's responsibility, as with any mmap.
unsafe impl Send for DaxMapping {}

// SAFETY: every `&self` method only copies bytes into or out of the mapped shared memory
// through raw pointers (memmove, non-temporal stores, flushes) or reads immutable fields;
// concurrent calls from several threads are the same as concurrent stores by other
// processes, which the mapping tolerates by design (torn bytes, never undefined values).
unsafe impl Sync for DaxMapping {}

const HUGE: usize = 2 << 20;
/// What one PUD entry maps on x86-64.
const GIB: usize = 1 << 30;

impl DaxMapping {
    /// Maps `offset..offset + len` of `file` (offset 4 KiB-aligned; the range is clamped to
    /// the file size rounded up to 4 KiB). Holes in the range are allocated and zeroed first.
    ///
    /// The extents come from the file's FUSE server; a reply that is not what pmfs sends
    /// (see `validate_entries`) is refused with [`io::ErrorKind::InvalidData`] before
    /// anything is mapped.
    pub fn map(file: &File, offset: u64, len: u64) -> io::Result<Self> {
        if offset % 4096 != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let device_path = device_of(file)?;
        Self::map_with_device(file, &device_path, offset, len)
    }

    /// As [`DaxMapping::map`], with the device path given.
    pub fn map_with_device(
        file: &File,
        device_path: &Path,
        offset: u64,
        len: u64,
    ) -> io::Result<Self> {
        if offset % PAGE != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(device_path)?;
        let device_size = device_size(&device, device_path)?;
        // Disjoint entries of whole pages inside the range: at most one per page.
        let max_entries = usize::try_from(len.div_ceil(PAGE)).unwrap_or(usize::MAX);
        let (_lease, entries) = query_bounded(file, MAP_FLAG_LEASE, offset, len, max_entries)?;
        Self::from_entries(
            file.try_clone()?,
            device,
            device_size,
            offset,
            len,
            &entries,
            Sharing::Shared,
        )
    }

    /// Maps the entries of a map reply for `offset..offset + len`, once they are validated.
    /// [`Sharing::Private`] maps the device copy-on-write: stores stay in this process.
    fn from_entries(
        file: File,
        device: File,
        device_size: u64,
        offset: u64,
        len: u64,
        entries: &[MapEntry],
        sharing: Sharing,
    ) -> io::Result<Self> {
        // hugetlbfs maps its pages only at addresses aligned to them (1 GiB pages: a PUD
        // entry each). Elsewhere a range holding a 1 GiB extent at a 1 GiB-aligned place of
        // the file and of the device is mapped at a 1 GiB-aligned address, so the kernel can
        // use a PUD entry for it; everything else is aligned to 2 MiB for PMD mappings.
        let hugetlb_page = hugetlb_page_size(&device);
        let has_region = entries.iter().any(|e| {
            e.file_offset.wrapping_sub(offset) % GIB as u64 == 0
                && e.device_offset % GIB as u64 == 0
                && e.len >= GIB as u64
        });
        let align = match hugetlb_page {
            Some(page) => huge_align_for(page),
            None if has_region => GIB,
            None => HUGE,
        };
        let MapPlan { span, reserved } =
            validate_entries(entries, offset, len, device_size, align)?;
        if let Some(page) = hugetlb_page {
            check_whole_huge_pages(entries, offset, page)?;
        }
        // SAFETY: an anonymous PROT_NONE reservation at an address of the kernel's choice
        // cannot alias anything.
        let raw = unsafe {
            libc::mmap(
                ptr::null_mut(),
                reserved + align,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let raw = raw.cast::<u8>();
        let pad = (align - raw as usize % align) % align;
        let base = raw.wrapping_add(pad);
        let unmap = |p: *mut u8, n: usize| {
            if n > 0 {
                // SAFETY: `p..p + n` is part of our own reservation or mapping.
                unsafe { libc::munmap(p.cast::<c_void>(), n) };
            }
        };
        unmap(raw, pad);
        unmap(base.wrapping_add(reserved), align - pad);
        // Entries contiguous both in the file and on the device map as one range: one mmap
        // call and one VMA instead of one per extent. (file offset, device offset, length);
        // each run is the union of validated, sorted, disjoint entries, so the checks
        // `validate_entries` made of its entries hold for the run.
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        for e in entries {
            match runs.last_mut() {
                Some(r) if r.0 + r.2 == e.file_offset && r.1 + r.2 == e.device_offset => {
                    r.2 += e.len;
                }
                _ => runs.push((e.file_offset, e.device_offset, e.len)),
            }
        }
        let mut map_sync = true;
        for &(file_offset, device_offset, run_len) in &runs {
            // Cannot wrap: `validate_entries` checked `offset <= file_offset` and
            // `file_offset - offset + len <= span <= reserved`, all without overflow.
            let at = base.wrapping_add((file_offset - offset) as usize);
            let fixed = |flags: libc::c_int| {
                // SAFETY: `at..at + run_len` lies inside our reservation `base..base +
                // reserved` (`validate_entries` checked `file_offset - offset + len <= span
                // <= reserved` with checked arithmetic for every entry of the run), which
                // nothing else uses, so MAP_FIXED replaces only our PROT_NONE pages; the
                // device offset is a page multiple inside the device, and `run_len` a
                // positive page multiple.
                unsafe {
                    libc::mmap(
                        at.cast::<c_void>(),
                        run_len as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        flags | libc::MAP_FIXED,
                        device.as_raw_fd(),
                        device_offset as libc::off_t,
                    )
                }
            };
            // MAP_SYNC is tried until the device refuses it once (it is all or nothing);
            // a private mapping has nothing to make durable.
            let mut got = libc::MAP_FAILED;
            if sharing == Sharing::Private {
                map_sync = false;
                got = fixed(libc::MAP_PRIVATE);
            } else if map_sync {
                got = fixed(libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC);
                map_sync = got != libc::MAP_FAILED;
            }
            if got == libc::MAP_FAILED && sharing == Sharing::Shared {
                got = fixed(libc::MAP_SHARED);
            }
            if got == libc::MAP_FAILED {
                let err = io::Error::last_os_error();
                unmap(base, reserved);
                return Err(err);
            }
        }
        let mode = match cpu_flush_mode() {
            Some(m) if map_sync || is_memory_backed(&device) || is_dax(&device) => m,
            _ => PersistenceMode::Msync,
        };
        let huge_aligned = entries.iter().all(|e| {
            // `offset <= file_offset`: validated above.
            e.len as usize % HUGE != 0
                || ((e.file_offset - offset) as usize % HUGE == 0
                    && e.device_offset as usize % HUGE == 0)
        });
        Ok(Self {
            base: NonNull::new(base).ok_or_else(|| io::Error::other("null mapping"))?,
            reserved,
            len: span,
            offset,
            mode,
            _file: file,
            _device: device,
            huge_aligned,
            handed: false,
        })
    }

    /// Takes a published lease on all of `file` ([`MAP_FLAG_PUBLISH`], or refreshes the
    /// published lease `refresh` of the same open file) and maps its extents from the device
    /// at `device_path`. Returns the mapping (`None` for a file with no extents), the
    /// extents, the lease and the layout generation they belong to. Parts of the file that
    /// are holes stay unmapped (`PROT_NONE`), so only the listed extents may be touched.
    pub fn map_published(
        file: &File,
        device_path: &Path,
        refresh: u64,
    ) -> io::Result<PublishedMapping> {
        let device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(device_path)?;
        let device_size = device_size(&device, device_path)?;
        // Bounded by the device: disjoint extents of whole pages.
        let max_entries = usize::try_from(device_size / PAGE).unwrap_or(usize::MAX);
        let (lease, generation, entries) = query_paged(
            file,
            MAP_FLAG_LEASE | MAP_FLAG_PUBLISH,
            0,
            u64::MAX,
            refresh,
            max_entries,
        )?;
        let mapping = if entries.is_empty() {
            None
        } else {
            Some(Self::from_entries(
                file.try_clone()?,
                device,
                device_size,
                0,
                u64::MAX,
                &entries,
                Sharing::Shared,
            )?)
        };
        Ok(PublishedMapping {
            mapping,
            entries,
            lease,
            generation,
        })
    }

    /// A mapping of `offset..offset + len` of `file` for a program's own mmap (the preload
    /// library): a lease as [`DaxMapping::map`] takes (holes and preallocated parts of the
    /// range are allocated and zeroed first; the range must lie inside the file's size
    /// rounded up to 4 KiB), mapped with `sharing` and then protected with `prot`. The
    /// memory from [`HandedMapping::addr`] for `len` bytes (rounded up to 4 KiB) becomes the
    /// program's: it unmaps it with munmap(2), and dropping the [`HandedMapping`] only ends
    /// its hold on the lease. Refused (`InvalidData`) unless the extents cover the whole
    /// range, so no page of it is left unmapped.
    pub fn map_for_program(
        file: &File,
        device_path: &Path,
        offset: u64,
        len: u64,
        sharing: Sharing,
        prot: libc::c_int,
    ) -> io::Result<HandedMapping> {
        if offset % PAGE != 0 || len == 0 || prot & !(libc::PROT_READ | libc::PROT_WRITE) != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(device_path)?;
        let device_size = device_size(&device, device_path)?;
        let max_entries = usize::try_from(len.div_ceil(PAGE)).unwrap_or(usize::MAX);
        let (_lease, entries) = query_bounded(file, MAP_FLAG_LEASE, offset, len, max_entries)?;
        let want = len.next_multiple_of(PAGE);
        let mut covered = offset;
        for e in &entries {
            if e.file_offset != covered {
                break;
            }
            covered = covered.saturating_add(e.len);
        }
        if covered < offset.saturating_add(want) {
            return Err(invalid(format!(
                "pmfs map reply leaves part of {offset}..{} unmapped",
                offset.saturating_add(want)
            )));
        }
        let mut mapping = Self::from_entries(
            file.try_clone()?,
            device,
            device_size,
            offset,
            len,
            &entries,
            sharing,
        )?;
        let keep = usize::try_from(want).map_err(|_| invalid("mapping too long"))?;
        if keep > mapping.len {
            return Err(invalid("pmfs map reply shorter than the range"));
        }
        let base = mapping.base.as_ptr();
        if prot != libc::PROT_READ | libc::PROT_WRITE {
            // SAFETY: `base..base + keep` is part of our own live mapping (keep <= len <=
            // reserved); changing its protection touches nothing else.
            if unsafe { libc::mprotect(base.cast::<c_void>(), keep, prot) } != 0 {
                return Err(io::Error::last_os_error()); // dropping `mapping` unmaps it all
            }
        }
        // Our reservation past the program's range is ours to give back now; from here on
        // the rest is the program's.
        if mapping.reserved > keep {
            // SAFETY: `base + keep..base + reserved` is the tail of our own reservation
            // (device pages past the range and PROT_NONE padding), unused by anyone else.
            unsafe { libc::munmap(base.add(keep).cast::<c_void>(), mapping.reserved - keep) };
        }
        mapping.reserved = keep;
        mapping.len = keep;
        mapping.handed = true;
        Ok(HandedMapping {
            mapping,
            sharing,
            prot,
        })
    }

    /// Start of the mapping: file offset `offset()` is at this address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// File offset of the first mapped byte.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// How `persist` makes stores durable.
    pub fn persistence(&self) -> PersistenceMode {
        self.mode
    }

    /// True when every whole-2 MiB extent sits at a 2 MiB-aligned address and device offset.
    pub fn is_huge_aligned(&self) -> bool {
        self.huge_aligned
    }

    /// Copies `data` into the mapping at byte `at` (relative to the mapping).
    pub fn write(&self, at: usize, data: &[u8]) -> io::Result<()> {
        self.check(at, data.len())?;
        // SAFETY: the range was checked to lie inside the live mapping and `data` is valid
        // for reads of its length. `ptr::copy` is a memmove, so it stays correct if `data`
        // was made (by the caller, from `as_ptr`) over the mapping itself.
        unsafe { ptr::copy(data.as_ptr(), self.base.as_ptr().add(at), data.len()) };
        Ok(())
    }

    /// Copies bytes at `at` of the mapping into `buf`. Other processes (the daemon, other
    /// mappers) may store into the same bytes meanwhile: the copy is then a torn snapshot.
    pub fn read(&self, at: usize, buf: &mut [u8]) -> io::Result<()> {
        self.check(at, buf.len())?;
        // SAFETY: the source range lies inside the live mapping (checked), `buf` is valid for
        // writes of its length, and `ptr::copy` tolerates overlap. The mapping is shared
        // memory reached only through a raw pointer: concurrent stores by other processes
        // can tear the bytes copied, never invalidate them (any bit pattern is a `u8`).
        unsafe { ptr::copy(self.base.as_ptr().add(at), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn check(&self, at: usize, n: usize) -> io::Result<()> {
        if at.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    /// Stores `data` at byte `at` of the mapping and makes it durable before returning, as
    /// pmfs's own write path does: non-temporal stores for the 16-byte-aligned body, ordinary
    /// stores and cache-line flushes for the unaligned head and tail, then a fence (or one
    /// msync on page-cache-backed devices).
    pub fn write_persist(&self, at: usize, data: &[u8]) -> io::Result<()> {
        self.check(at, data.len())?;
        let mapped = self.base.as_ptr() as usize..self.base.as_ptr() as usize + self.reserved;
        let src = data.as_ptr() as usize..data.as_ptr() as usize + data.len();
        let overlaps = src.start < mapped.end && mapped.start < src.end;
        if self.mode == PersistenceMode::Msync || overlaps {
            // A source inside the mapping (a caller's mmap of this very file) needs a memmove.
            self.write(at, data)?;
            return self.persist(at, data.len());
        }
        // SAFETY: `at..at + len` lies inside the live mapping (checked).
        let dst = unsafe { self.base.as_ptr().add(at) };
        let (head, body, tail) = nt_split(dst as usize, data.len() as u64);
        let (head, body, tail) = (head as usize, body as usize, tail as usize);
        if head > 0 {
            self.write(at, &data[..head])?;
            self.flush_lines(at, head);
        }
        if body > 0 {
            // SAFETY: `dst + head..dst + head + body` lies inside the mapping, is 16-byte
            // aligned by the choice of `head` and `body` is a multiple of 16; the source is
            // `body` bytes of `data`, which does not overlap the mapping (checked above).
            unsafe { arch::stream_copy(dst.add(head), data[head..].as_ptr(), body) };
        }
        if tail > 0 {
            self.write(at + head + body, &data[head + body..])?;
            self.flush_lines(at + head + body, tail);
        }
        arch::sfence();
        Ok(())
    }

    /// Writes back the cache lines of `at..at + n` (inside the mapping; no fence).
    fn flush_lines(&self, at: usize, n: usize) {
        let mut line = at / 64 * 64;
        while line < at + n {
            // SAFETY: `line` lies inside the live mapping (the caller's range is) and the
            // mode was detected on this CPU.
            unsafe { arch::flush_line(self.mode, self.base.as_ptr().add(line)) };
            line += 64;
        }
    }

    /// Makes stores to `at..at + n` durable.
    pub fn persist(&self, at: usize, n: usize) -> io::Result<()> {
        self.check(at, n)?;
        if self.mode == PersistenceMode::Msync {
            let start = at / 4096 * 4096;
            let end = (at + n).next_multiple_of(4096).min(self.len);
            // SAFETY: the page-aligned range lies inside our mapping.
            let r = unsafe {
                libc::msync(
                    self.base.as_ptr().add(start).cast::<c_void>(),
                    end - start,
                    libc::MS_SYNC,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(());
        }
        self.flush_lines(at, n);
        arch::sfence();
        Ok(())
    }
}

impl Drop for DaxMapping {
    fn drop(&mut self) {
        if self.handed {
            return; // the program owns the memory (and unmaps it, or exits)
        }
        // SAFETY: `base..base + reserved` is exactly our reservation (device mappings and
        // the PROT_NONE rest); nobody else maps into it.
        unsafe { libc::munmap(self.base.as_ptr().cast::<c_void>(), self.reserved) };
    }
}

/// A direct mapping whose memory a program owns ([`DaxMapping::map_for_program`]). It
/// holds the lease (through its duplicate of the file's descriptor) until dropped; it never
/// unmaps the memory, which the program may have unmapped, in part or whole, already.
#[derive(Debug)]
pub struct HandedMapping {
    mapping: DaxMapping,
    sharing: Sharing,
    prot: libc::c_int,
}

impl HandedMapping {
    /// The address the program was given: file offset [`HandedMapping::offset`] is there.
    pub fn addr(&self) -> usize {
        self.mapping.base.as_ptr() as usize
    }

    /// Bytes handed over (a multiple of 4 KiB).
    pub fn len(&self) -> usize {
        self.mapping.len
    }

    pub fn is_empty(&self) -> bool {
        self.mapping.len == 0
    }

    /// File offset of the first byte.
    pub fn offset(&self) -> u64 {
        self.mapping.offset
    }

    pub fn sharing(&self) -> Sharing {
        self.sharing
    }

    /// The protection it was mapped with.
    pub fn prot(&self) -> libc::c_int {
        self.prot
    }

    /// True when every whole-2 MiB extent sits at a 2 MiB-aligned address and device offset.
    pub fn is_huge_aligned(&self) -> bool {
        self.mapping.huge_aligned
    }

    /// Unmaps a mapping that was never handed to the program after all (nobody else knows
    /// its address), ending its hold on the lease.
    pub fn withdraw(mut self) {
        self.mapping.handed = false; // its Drop unmaps the range, which is still ours
    }

    /// Makes stores to bytes `at..at + n` (relative to [`HandedMapping::addr`]) durable, as
    /// [`DaxMapping::persist`] does. A private mapping has nothing to persist.
    ///
    /// # Safety
    /// `at..at + n` must still be mapped as this value mapped it: the program must not have
    /// unmapped or replaced any page of it (a cache-line flush of an unmapped address
    /// faults).
    pub unsafe fn persist(&self, at: usize, n: usize) -> io::Result<()> {
        if self.sharing == Sharing::Private {
            return Ok(());
        }
        self.mapping.persist(at, n)
    }
}

fn is_dax(device: &File) -> bool {
    device
        .metadata()
        .is_ok_and(|m| m.file_type().is_char_device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;
    const DEV: u64 = 64 * MIB;

    fn entry(file_offset: u64, device_offset: u64, len: u64) -> MapEntry {
        MapEntry {
            file_offset,
            device_offset,
            len,
            flags: 0,
            pad: 0,
        }
    }

    #[track_caller]
    fn refused(entries: &[MapEntry], offset: u64, len: u64) {
        match validate_entries(entries, offset, len, DEV, HUGE) {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}"),
            Ok(plan) => panic!("accepted {entries:?} for {offset}+{len}: {plan:?}"),
        }
    }

    #[test]
    fn a_valid_reply_passes() {
        let off = 4 * MIB;
        let entries = [
            entry(off, 2 * MIB, 2 * MIB),
            entry(off + 2 * MIB, 10 * MIB, 4096),
            // A gap (a hole the server did not map) is fine.
            entry(off + 2 * MIB + 8192, DEV - 4096, 4096),
        ];
        let plan = validate_entries(&entries, off, 3 * MIB, DEV, HUGE).unwrap();
        assert_eq!(plan.span as u64, 2 * MIB + 3 * 4096);
        assert_eq!(plan.reserved as u64, 4 * MIB);
        // The last byte of the device and the end of the requested range (rounded up to
        // 4 KiB) are inside.
        let plan = validate_entries(&[entry(0, DEV - 8192, 8192)], 0, 5000, DEV, HUGE).unwrap();
        assert_eq!(plan.span, 8192);
        assert_eq!(plan.reserved as u64, 2 * MIB);
    }

    #[test]
    fn hugetlbfs_maps_only_whole_pages() {
        let page = 2 * MIB;
        let whole = [
            entry(4 * MIB, 2 * MIB, 4 * MIB),
            entry(8 * MIB, 10 * MIB, 2 * MIB),
        ];
        check_whole_huge_pages(&whole, 4 * MIB, page).unwrap();
        for bad in [
            entry(4 * MIB + 4096, 2 * MIB, 2 * MIB), // file offset inside a page
            entry(4 * MIB, 2 * MIB + 4096, 2 * MIB), // device offset inside a page
            entry(4 * MIB, 2 * MIB, 2 * MIB + 4096), // a page's tail belongs to others
        ] {
            let e = check_whole_huge_pages(&[whole[0], bad], 4 * MIB, page).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::Unsupported);
            assert!(e.to_string().contains("2 MiB pages"), "{e}");
        }
    }

    #[test]
    fn an_entry_before_the_requested_offset_is_refused() {
        // The old code computed `file_offset - offset`: this wrapped to 2^64 - 4 MiB and
        // MAP_FIXED went to `base - 4 MiB`, over whatever the caller had mapped there.
        refused(&[entry(0, 0, 2 * MIB)], 4 * MIB, 8 * MIB);
        refused(
            &[entry(4 * MIB, 0, 4096), entry(4096, 4096, 4096)],
            4 * MIB,
            8 * MIB,
        );
    }

    #[test]
    fn wrapping_arithmetic_is_refused() {
        let top = u64::MAX / PAGE * PAGE;
        // file_offset + len overflows.
        refused(&[entry(top, 0, 2 * PAGE)], 0, u64::MAX);
        // device_offset + len overflows.
        refused(&[entry(0, top, 2 * PAGE)], 0, u64::MAX);
        // A span that fits no reservation.
        refused(&[entry(top - PAGE, 0, PAGE)], 0, u64::MAX);
    }

    #[test]
    fn overlapping_or_unsorted_entries_are_refused() {
        refused(&[entry(0, 0, 8192), entry(4096, MIB, 4096)], 0, MIB);
        refused(&[entry(8192, 0, 4096), entry(0, MIB, 4096)], 0, MIB);
        refused(&[entry(0, 0, 4096), entry(0, MIB, 4096)], 0, MIB);
    }

    #[test]
    fn entries_outside_the_reservation_or_the_device_are_refused() {
        // Past the requested range (rounded up to 4 KiB), hence past the reservation the
        // request implies.
        refused(&[entry(0, 0, 8192)], 0, 4096);
        refused(&[entry(4096, 0, 4096)], 0, 4000);
        refused(&[entry(64 * MIB, 0, 4096)], 0, 2 * MIB);
        // Device ranges past the device.
        refused(&[entry(0, DEV, 4096)], 0, MIB);
        refused(&[entry(0, DEV - 4096, 8192)], 0, MIB);
    }

    #[test]
    fn misaligned_empty_or_flagged_entries_are_refused() {
        refused(&[entry(0, 0, 0)], 0, MIB);
        refused(&[entry(0, 0, 100)], 0, MIB);
        refused(&[entry(512, 0, 4096)], 0, MIB);
        refused(&[entry(0, 512, 4096)], 0, MIB);
        let mut e = entry(0, 0, 4096);
        e.flags = 0x80;
        refused(&[e], 0, MIB);
        // An empty reply maps nothing (not a hostile one, so not InvalidData).
        assert!(validate_entries(&[], 0, MIB, DEV, HUGE).is_err());
        // A misaligned request is the caller's error.
        let e = validate_entries(&[entry(4096, 0, 4096)], 100, MIB, DEV, HUGE).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }

    /// An image in /dev/shm standing in for the device, with a pattern written at `at`.
    fn device_image(at: u64, pattern: &[u8]) -> tempfile::NamedTempFile {
        let mut img = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
        img.as_file().set_len(DEV).unwrap();
        img.flush().unwrap();
        img.as_file().write_all_at(pattern, at).unwrap();
        img
    }

    fn open_rw(path: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn from_entries_maps_a_valid_reply_and_refuses_a_hostile_one() {
        let img = device_image(6 * MIB, b"device bytes");
        let file = tempfile::tempfile().unwrap();
        // Hostile: an entry before the requested offset. Refused before any mapping.
        let e = DaxMapping::from_entries(
            file.try_clone().unwrap(),
            open_rw(img.path()),
            DEV,
            4 * MIB,
            4 * MIB,
            &[entry(0, 6 * MIB, 2 * MIB)],
            Sharing::Shared,
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // Valid: file offset 4 MiB + 4 KiB maps device offset 6 MiB.
        let map = DaxMapping::from_entries(
            file,
            open_rw(img.path()),
            DEV,
            4 * MIB,
            4 * MIB,
            &[entry(4 * MIB + 4096, 6 * MIB, 2 * MIB)],
            Sharing::Shared,
        )
        .unwrap();
        assert_eq!(map.len() as u64, 2 * MIB + 4096);
        let mut got = [0u8; 12];
        map.read(4096, &mut got).unwrap();
        assert_eq!(&got, b"device bytes");
        map.write(4096, b"DEVICE").unwrap();
        map.persist(4096, 6).unwrap();
        drop(map);
        let mut back = [0u8; 12];
        img.as_file().read_exact_at(&mut back, 6 * MIB).unwrap();
        assert_eq!(&back, b"DEVICE bytes");
    }
}
