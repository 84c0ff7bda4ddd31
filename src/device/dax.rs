//! DAX-style direct mapping of pmfs files, for applications (`pmfs::dax`).
//!
//! A FUSE file cannot be DAX-mapped by the kernel, so pmfs does it in user space: an ioctl on
//! an open pmfs file asks the daemon for the file's extents (allocating and zeroing holes in
//! the range) and takes a lease on them; [`DaxMapping::map`] then maps those ranges of the
//! device itself into one contiguous virtual range of the caller, each 2 MiB-aligned extent
//! at a 2 MiB-aligned address so the kernel can use huge (PMD) mappings. Loads and stores
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
//!
//! The ioctl protocol is defined here ([`MapRequest`], [`MapReply`]) and served by the FUSE
//! adapter.

use super::PersistenceMode;
use super::mmap::{arch, cpu_flush_mode, is_memory_backed};
use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
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
/// Reply entry flag: the extent is preallocated (reads as zeros).
pub const ENTRY_UNWRITTEN: u32 = 1;

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
    pub reserved: u64,
}

/// Entries that fit one reply page.
pub const ENTRIES_PER_PAGE: usize = (IOCTL_SIZE - size_of::<MapReply>()) / size_of::<MapEntry>();

/// Issues the pmfs map ioctl on `file`, following pages; returns (lease, extents).
pub fn query(file: &File, flags: u32, offset: u64, len: u64) -> io::Result<(u64, Vec<MapEntry>)> {
    let mut lease = 0;
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
        let (reply, rest) = MapReply::read_from_prefix(&buf)
            .map_err(|_| io::Error::other("short pmfs ioctl reply"))?;
        if reply.magic != MAP_MAGIC || reply.count as usize > ENTRIES_PER_PAGE {
            return Err(io::Error::other("malformed pmfs ioctl reply"));
        }
        lease = reply.lease;
        for i in 0..reply.count as usize {
            let at = i * size_of::<MapEntry>();
            let e = MapEntry::read_from_bytes(&rest[at..at + size_of::<MapEntry>()])
                .map_err(|_| io::Error::other("malformed pmfs ioctl entry"))?;
            out.push(e);
        }
        if reply.count == 0 || out.len() >= reply.total as usize {
            return Ok((lease, out));
        }
    }
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
}

// SAFETY: the mapping is plain shared memory owned by this value; it may move between
// threads. Access through `as_ptr` is the caller's responsibility, as with any mmap.
unsafe impl Send for DaxMapping {}

const HUGE: usize = 2 << 20;

impl DaxMapping {
    /// Maps `offset..offset + len` of `file` (offset 4 KiB-aligned; the range is clamped to
    /// the file size rounded up to 4 KiB). Holes in the range are allocated and zeroed first.
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
        let device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(device_path)?;
        let (_lease, entries) = query(file, MAP_FLAG_LEASE, offset, len)?;
        let file = file.try_clone()?;
        let span = entries
            .iter()
            .map(|e| e.file_offset + e.len - offset)
            .max()
            .unwrap_or(0) as usize;
        if span == 0 {
            return Err(io::Error::other("nothing to map (empty range or file)"));
        }
        let reserved = span.next_multiple_of(HUGE);
        // SAFETY: an anonymous PROT_NONE reservation at an address of the kernel's choice
        // cannot alias anything.
        let raw = unsafe {
            libc::mmap(
                ptr::null_mut(),
                reserved + HUGE,
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
        let pad = (HUGE - raw as usize % HUGE) % HUGE;
        let base = raw.wrapping_add(pad);
        let unmap = |p: *mut u8, n: usize| {
            if n > 0 {
                // SAFETY: `p..p + n` is part of our own reservation or mapping.
                unsafe { libc::munmap(p.cast::<c_void>(), n) };
            }
        };
        unmap(raw, pad);
        unmap(base.wrapping_add(reserved), HUGE - pad);
        let mut map_sync = true;
        for e in &entries {
            let at = base.wrapping_add((e.file_offset - offset) as usize);
            let fixed = |flags: libc::c_int| {
                // SAFETY: `at..at + e.len` lies inside our reservation (`file_offset - offset
                // + len <= span <= reserved`), which nothing else uses; MAP_FIXED replaces
                // only our PROT_NONE pages with the device range.
                unsafe {
                    libc::mmap(
                        at.cast::<c_void>(),
                        e.len as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        flags | libc::MAP_FIXED,
                        device.as_raw_fd(),
                        e.device_offset as libc::off_t,
                    )
                }
            };
            let mut got = fixed(libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC);
            if got == libc::MAP_FAILED {
                map_sync = false;
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
        // SAFETY: the range was checked to lie inside the live mapping; the source is a
        // separate Rust slice, so the regions cannot overlap.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), self.base.as_ptr().add(at), data.len()) };
        Ok(())
    }

    /// Copies bytes at `at` of the mapping into `buf`.
    pub fn read(&self, at: usize, buf: &mut [u8]) -> io::Result<()> {
        self.check(at, buf.len())?;
        // SAFETY: as in `write`, the source range lies inside the live mapping.
        unsafe {
            ptr::copy_nonoverlapping(self.base.as_ptr().add(at), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    fn check(&self, at: usize, n: usize) -> io::Result<()> {
        if at.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
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
        let mut line = at / 64 * 64;
        while line < at + n {
            // SAFETY: `line` lies inside the live mapping and the mode was detected on this
            // CPU.
            unsafe { arch::flush_line(self.mode, self.base.as_ptr().add(line)) };
            line += 64;
        }
        arch::sfence();
        Ok(())
    }
}

impl Drop for DaxMapping {
    fn drop(&mut self) {
        // SAFETY: `base..base + reserved` is exactly our reservation (device mappings and
        // the PROT_NONE rest); nobody else maps into it.
        unsafe { libc::munmap(self.base.as_ptr().cast::<c_void>(), self.reserved) };
    }
}

fn is_dax(device: &File) -> bool {
    device.metadata().is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_char_device()
    })
}
