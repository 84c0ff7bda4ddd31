//! The device layer: the only code that touches the persistent-memory mapping.
//!
//! Everything above this module sees the device through the [`Media`] trait: copy in, copy out,
//! flush a range, fence, and 8-byte atomics. Nothing hands out a reference (`&[u8]`) into the
//! mapping, not even for the length of one call: other parties may store into the same bytes
//! at any time (direct-mapping clients, see docs/ARCHITECTURE.md), and a `&[u8]` would assert
//! that nobody does. Bytes leave the mapping only by copy (`read`), and every copy into or out
//! of the mapping is a `memmove` (`ptr::copy`), never a `memcpy` that assumes the two ranges
//! are disjoint. Reads are therefore answered from a copy (src/fs/data.rs): fuser 0.18 sends
//! a read reply only from a `&[u8]` (`ReplyData::data`), so handing the kernel the mapping
//! itself would need exactly the reference this layer refuses to make.
//!
//! Two implementations:
//! - [`Device`] (`mmap.rs`): a regular file, a `/dev/pmemN` block device or a `/dev/daxN.M`
//!   character device, mapped `MAP_SHARED` at a 2 MiB-aligned address (aligned to the page
//!   size for an image on hugetlbfs, which is used only through the mapping). The crate's `unsafe`
//!   lives in that file and in `dax.rs` (the client side of direct mapping).
//! - [`RecordingDevice`] (`recording.rs`): an in-memory image that logs every store, flush and
//!   fence, and rebuilds the images a power failure could leave. Tests and the crash harness
//!   run the same code on it.
//!
//! and two that compose others (`set.rs`): [`DeviceSet`], the members of a multi-device file
//! system in one logical address space, and [`Window`], a range of a media as a device.
//!
//! Persistence ladder (the contract every caller follows): **store** (`write`, `store_u64`,
//! `fetch_or_u64`, ...) makes bytes visible to other threads and processes at once; **flush**
//! (`flush`) starts writing the touched cache lines back to the persistence domain; **fence**
//! (`fence`) waits until every earlier flush and non-temporal store is durable. Only after a
//! fence is a store guaranteed to survive a power failure. Stores of 8 aligned bytes are atomic
//! with respect to power failure; nothing larger is.

#[allow(
    unsafe_code,
    reason = "the client mapping of device ranges (mmap, ioctl, cache-line flushes)"
)]
pub mod dax;
#[allow(
    unsafe_code,
    reason = "the one audited place that maps the device and touches it through raw pointers"
)]
mod mmap;
mod recording;
mod set;
#[allow(
    unsafe_code,
    reason = "volatile word access to a shared file mapping that others change meanwhile"
)]
mod shared;

pub use mmap::{Device, DeviceKind, OpenOptions, create_image, create_sparse_image};
pub use recording::{CrashImages, CrashLines, OverlayDevice, RecordingDevice};
pub use set::{DeviceSet, SetMember, Window};
pub use shared::SharedFileMapping;

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Size of a CPU cache line: the granularity of `flush` and of power-failure tearing.
pub const CACHE_LINE: u64 = 64;

/// Errors of the device layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}: device is busy: already mounted or in use")]
    Busy(PathBuf),
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    /// An access outside the device. Callers validate on-media values before use, so this is
    /// a second line of defence: it means a corrupted value slipped through, never UB.
    #[error("access out of bounds: offset {offset} length {len} on a device of {size} bytes")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    /// An 8-byte atomic access at an offset that is not 8-byte aligned.
    #[error("misaligned atomic access at offset {0}")]
    Misaligned(u64),
    /// A store to a device opened read-only.
    #[error("device is read-only")]
    ReadOnly,
    /// The file system holding a sparse image has no space left for the blocks asked for
    /// ([`Media::reserve`]): the file system above reports ENOSPC.
    #[error("{0}: no space left in the file system holding this sparse image")]
    NoSpace(PathBuf),
    /// A store into a range that was never reserved on a device that models a sparse image
    /// (the recording device of the tests): on a real sparse image that store could raise
    /// SIGBUS once the backing store is full.
    #[error("store at offset {0} into a hole that was never reserved")]
    NotReserved(u64),
    /// The device cannot hand space back ([`Media::discard`]): it is not a sparse image file.
    #[error("the device cannot hand space back: it is not a sparse image file")]
    NoDiscard,
}

/// How stores are made durable on this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PersistenceMode {
    /// CPU cache write-back: CLWB + SFENCE (real pmem with MAP_SYNC or devdax, and
    /// memory-backed emulation such as tmpfs and hugetlbfs, whose msync does nothing).
    Clwb,
    /// As `Clwb`, with CLFLUSHOPT on CPUs without CLWB.
    ClflushOpt,
    /// Plain CLFLUSH (serialising; oldest CPUs).
    Clflush,
    /// `msync(MS_SYNC)` of the dirty range: files on disk-backed file systems and `/dev/pmemN`
    /// without DAX, where the mapping goes through the page cache.
    Msync,
    /// The in-memory recording device of the tests.
    Recorded,
}

impl fmt::Display for PersistenceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Clwb => "cpu-flush (clwb+sfence)",
            Self::ClflushOpt => "cpu-flush (clflushopt+sfence)",
            Self::Clflush => "cpu-flush (clflush)",
            Self::Msync => "msync",
            Self::Recorded => "recorded (test device)",
        })
    }
}

/// Byte-addressable persistent media.
///
/// Offsets are byte offsets from the start of the device. Every method checks its range and
/// returns [`DeviceError::OutOfBounds`] rather than touching memory outside the device.
pub trait Media: Send + Sync + fmt::Debug {
    /// Size of the device in bytes.
    fn size(&self) -> u64;

    /// How this device makes stores durable.
    fn persistence(&self) -> PersistenceMode;

    /// Copies `buf.len()` bytes at `offset` out of the device.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;

    /// Stores `data` at `offset` through the cache. Durable only after `flush` and `fence`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError>;

    /// Stores `data` at `offset` with non-temporal stores (large copies of file data); durable
    /// after the next `fence`, without a `flush`.
    fn write_nt(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError>;

    /// Sets `len` bytes at `offset` to zero with non-temporal stores; durable after the next
    /// `fence`.
    fn zero_nt(&self, offset: u64, len: u64) -> Result<(), DeviceError>;

    /// Starts write-back of every cache line that overlaps `offset..offset + len`.
    fn flush(&self, offset: u64, len: u64) -> Result<(), DeviceError>;

    /// Waits until every earlier flush and non-temporal store is durable.
    fn fence(&self);

    /// Atomic 8-byte load; `offset` must be 8-aligned.
    ///
    /// The four atomic methods are for the words that threads change concurrently: the
    /// block-bitmap words and the journal slot generations. While more than one thread uses
    /// the device, such a word is accessed only through these methods; byte copies (`read`,
    /// `write`) of those regions are for times when no transaction runs (mkfs, fsck, the
    /// allocator's load and journal recovery at mount). File data never lies there: extents
    /// are validated to lie inside the data area before use.
    fn load_u64(&self, offset: u64) -> Result<u64, DeviceError>;

    /// Atomic 8-byte store (power-fail atomic); `offset` must be 8-aligned.
    fn store_u64(&self, offset: u64, value: u64) -> Result<(), DeviceError>;

    /// Atomic OR of an 8-byte word, returning the previous value.
    fn fetch_or_u64(&self, offset: u64, mask: u64) -> Result<u64, DeviceError>;

    /// Atomic AND of an 8-byte word, returning the previous value.
    fn fetch_and_u64(&self, offset: u64, mask: u64) -> Result<u64, DeviceError>;

    /// Makes everything written so far durable (used at unmount and by `fsync` in msync
    /// mode, where the page cache sits between us and the media).
    fn sync_all(&self) -> Result<(), DeviceError>;

    /// Makes sure the backing store holds every byte of `offset..offset + len`, so that no
    /// later store into the range can fail for want of space. Only a sparse image file has
    /// anything to do (it allocates the holes of the range, in whole [`RESERVE_CHUNK`]s of
    /// the file); a store into a hole of a mapped file whose file system is full raises
    /// SIGBUS, so everything that hands out space (mkfs, the mount, the block allocator)
    /// reserves it before the first store. Fails with [`DeviceError::NoSpace`] when the
    /// backing file system is full. Devices that are memory or pmem themselves (device-DAX,
    /// block devices, fully allocated images) have nothing to reserve.
    fn reserve(&self, offset: u64, len: u64) -> Result<(), DeviceError>;

    /// Whether [`Media::discard`] can hand space back (a sparse image file opened
    /// read-write).
    fn can_discard(&self) -> bool;

    /// Hands the backing store of the whole [`RESERVE_CHUNK`]s of `offset..offset + len`
    /// back to the file system holding the image (punches holes) and returns the bytes of
    /// those chunks, which are all hole now (as FITRIM counts: every free byte discarded,
    /// whether or not it was backed before). The range must hold no live data: its bytes
    /// read as zeros afterwards, and a later [`Media::reserve`] allocates them again.
    /// [`DeviceError::NoDiscard`] when [`Media::can_discard`] is false.
    fn discard(&self, offset: u64, len: u64) -> Result<u64, DeviceError>;
}

/// Granularity of [`Media::reserve`] and [`Media::discard`]: 2 MiB of the device, the
/// allocator's chunk, so one reservation covers whatever a chunk is split into.
pub const RESERVE_CHUNK: u64 = 2 << 20;

/// The [`RESERVE_CHUNK`]s that `offset..offset + len` (checked, `len > 0`) touches: what
/// [`Media::reserve`] backs.
pub(crate) fn chunks_touching(offset: u64, len: u64) -> std::ops::Range<u64> {
    offset / RESERVE_CHUNK..(offset + len).div_ceil(RESERVE_CHUNK)
}

/// The [`RESERVE_CHUNK`]s that lie wholly inside `offset..offset + len` (checked) of a
/// device of `size` bytes, the short last chunk included when the range reaches the end:
/// what [`Media::discard`] punches.
pub(crate) fn chunks_inside(offset: u64, len: u64, size: u64) -> std::ops::Range<u64> {
    let first = offset.div_ceil(RESERVE_CHUNK);
    let end = if offset + len == size {
        size.div_ceil(RESERVE_CHUNK)
    } else {
        (offset + len) / RESERVE_CHUNK
    };
    first..end.max(first)
}

/// Checks that `offset..offset + len` lies inside a device of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<(), DeviceError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DeviceError::OutOfBounds { offset, len, size }),
    }
}

/// Checks an 8-byte atomic access.
pub(crate) fn check_word(offset: u64, size: u64) -> Result<(), DeviceError> {
    if offset % 8 != 0 {
        return Err(DeviceError::Misaligned(offset));
    }
    check_range(offset, 8, size)
}
