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
    is_memory_backed, size_text,
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
    let mut lease = 0;
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
            || (!out.is_empty() && reply.lease != lease)
        {
            return Err(invalid("inconsistent pmfs ioctl reply pages"));
        }
        lease = reply.lease;
        for i in 0..reply.count as usize {
            let at = i * size_of::<MapEntry>();
            let e = MapEntry::read_from_bytes(&rest[at..at + size_of::<MapEntry>()])
                .map_err(|_| invalid("malformed pmfs ioctl entry"))?;
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
}

// SAFETY: the mapping is plain shared memory owned by this value; it may move between
// threads. Access through `as_ptr` is the caller's responsibility, as with any mmap.
unsafe impl Send for DaxMapping {}

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
        )
    }

    /// Maps the entries of a map reply for `offset..offset + len`, once they are validated.
    fn from_entries(
        file: File,
        device: File,
        device_size: u64,
        offset: u64,
        len: u64,
        entries: &[MapEntry],
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
        let mut map_sync = true;
        for e in entries {
            // Cannot wrap: `validate_entries` checked `offset <= file_offset` and
            // `file_offset - offset + len <= span <= reserved`, all without overflow.
            let at = base.wrapping_add((e.file_offset - offset) as usize);
            let fixed = |flags: libc::c_int| {
                // SAFETY: `at..at + e.len` lies inside our reservation `base..base +
                // reserved` (`validate_entries` checked `file_offset - offset + len <= span
                // <= reserved` with checked arithmetic), which nothing else uses, so
                // MAP_FIXED replaces only our PROT_NONE pages; the device offset is a page
                // multiple inside the device, and `e.len` a positive page multiple.
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
