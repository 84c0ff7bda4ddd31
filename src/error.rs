//! The error type of the object and file-system layers (B+trees, inodes, directories,
//! extents, xattrs, the fs core), and its one mapping to errno.

use crate::alloc::AllocError;
use crate::device::DeviceError;
use crate::format::FormatError;
use crate::journal::JournalError;

/// Errors of the file-system layers. [`Error::errno`] is the only place that turns them into
/// errno values for the kernel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// A damaged on-media object; the rest of the file system stays usable.
    #[error("corrupted {what} (inode {ino}): {detail}")]
    Corrupted {
        what: &'static str,
        ino: u64,
        detail: String,
    },
    #[error("no space left on device")]
    NoSpace,
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("file name too long")]
    NameTooLong,
    #[error("invalid argument")]
    Invalid,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("permission denied")]
    Access,
    #[error("too many links")]
    TooManyLinks,
    #[error("file too large")]
    FileTooBig,
    #[error("no such attribute")]
    NoAttr,
    #[error("result does not fit the buffer")]
    Range,
    #[error("read-only file system")]
    ReadOnly,
    #[error("operation not supported")]
    NotSupported,
    #[error("argument list too long")]
    TooBig,
    /// A direct client's request names a layout generation the file has left.
    #[error("the file changed since the caller listed its blocks")]
    Changed,
    #[error("no more inodes")]
    NoInodes,
    /// SEEK_DATA/SEEK_HOLE past the end, or no data after the offset.
    #[error("no such device or address")]
    NoSuchPosition,
    /// A rule of the code itself was broken (a bug, not the media's or the caller's fault).
    #[error("internal error: an operation used {0} without declaring it")]
    Internal(&'static str),
}

impl Error {
    pub fn corrupted(what: &'static str, ino: u64, detail: impl Into<String>) -> Self {
        Self::Corrupted {
            what,
            ino,
            detail: detail.into(),
        }
    }

    /// The errno the kernel gets for this error.
    pub fn errno(&self) -> i32 {
        match self {
            // The file system holding a sparse image is full.
            Self::Device(DeviceError::NoSpace(_)) => libc::ENOSPC,
            Self::Device(_) | Self::Format(_) | Self::Corrupted { .. } => libc::EIO,
            // Fail-stop after a failed commit or rollback: the mount is read-only now.
            Self::Journal(JournalError::Poisoned) => libc::EROFS,
            // After FS_IOC_SHUTDOWN every operation fails with EIO, as on XFS and ext4.
            Self::Journal(JournalError::ShutDown) => libc::EIO,
            // Operations that can free or map without bound run in steps (src/fs/data.rs,
            // `punch_in_steps`), so a transaction that still overflows its slot (TooLarge)
            // is a bug of ours, not a file too large: EIO, which the adapter logs.
            Self::Journal(_) | Self::Internal(_) => libc::EIO,
            Self::Alloc(AllocError::NoSpace) | Self::NoSpace | Self::NoInodes => libc::ENOSPC,
            Self::Alloc(_) => libc::EIO,
            Self::NotFound => libc::ENOENT,
            Self::Exists => libc::EEXIST,
            Self::NotDir => libc::ENOTDIR,
            Self::IsDir => libc::EISDIR,
            Self::NotEmpty => libc::ENOTEMPTY,
            Self::NameTooLong => libc::ENAMETOOLONG,
            Self::Invalid => libc::EINVAL,
            Self::NotPermitted => libc::EPERM,
            Self::Access => libc::EACCES,
            Self::TooManyLinks => libc::EMLINK,
            Self::FileTooBig => libc::EFBIG,
            Self::NoAttr => libc::ENODATA,
            Self::Range => libc::ERANGE,
            Self::ReadOnly => libc::EROFS,
            Self::NotSupported => libc::EOPNOTSUPP,
            Self::TooBig => libc::E2BIG,
            Self::NoSuchPosition => libc::ENXIO,
            Self::Changed => libc::ESTALE,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
