//! Conversions between the core's types and fuser's wire types: attributes, file types,
//! timestamps.

use crate::format::file_type;
use crate::fs::Attr;
use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::fs::SetTime;

/// `st_blksize` for regular files: the largest write one FUSE request carries at the default
/// `fs.fuse.max_pages_limit` (256 pages). Programs that size their buffers by it (stdio,
/// coreutils) then issue one request per call instead of 256.
pub const PREFERRED_IO_SIZE: u32 = 1 << 20;

/// `st_blksize` for everything else.
const SMALL_IO_SIZE: u32 = 4096;

/// Nanoseconds since the epoch to `SystemTime` (negative: before 1970).
pub fn system_time(ns: i64) -> SystemTime {
    let d = Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 {
        UNIX_EPOCH.checked_add(d).unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH.checked_sub(d).unwrap_or(UNIX_EPOCH)
    }
}

/// `SystemTime` to nanoseconds since the epoch, saturating at the ends of `i64`.
pub fn nanos(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

/// A time from SETATTR: `UTIME_NOW` arrives as [`TimeOrNow::Now`].
pub fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(nanos(t)),
    }
}

/// The fuser file type of `S_IFMT` bits (in the position `st_mode` has them).
pub fn kind(mode: u32) -> FileType {
    match (mode & u32::from(file_type::S_IFMT)) as u16 {
        file_type::S_IFDIR => FileType::Directory,
        file_type::S_IFLNK => FileType::Symlink,
        file_type::S_IFIFO => FileType::NamedPipe,
        file_type::S_IFSOCK => FileType::Socket,
        file_type::S_IFCHR => FileType::CharDevice,
        file_type::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// The attributes the kernel gets for `a`.
pub fn file_attr(a: &Attr) -> FileAttr {
    let kind = kind(a.mode);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: system_time(a.atime_ns),
        mtime: system_time(a.mtime_ns),
        ctime: system_time(a.ctime_ns),
        crtime: system_time(a.btime_ns),
        kind,
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: if kind == FileType::RegularFile {
            PREFERRED_IO_SIZE
        } else {
            SMALL_IO_SIZE
        },
        flags: 0,
    }
}

/// The attributes of a negative entry: node id 0 tells the kernel "no such name" while the
/// entry timeout still lets it cache that answer.
pub fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: SMALL_IO_SIZE,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_across_the_epoch() {
        for ns in [
            0,
            1,
            -1,
            1_700_000_000_123_456_789,
            -1_000_000_001,
            i64::MAX,
            i64::MIN + 1,
        ] {
            assert_eq!(nanos(system_time(ns)), ns, "{ns}");
        }
    }

    #[test]
    fn kinds_follow_the_mode() {
        assert_eq!(kind(0o040755), FileType::Directory);
        assert_eq!(kind(0o100644), FileType::RegularFile);
        assert_eq!(kind(0o120777), FileType::Symlink);
        assert_eq!(kind(0o010644), FileType::NamedPipe);
        assert_eq!(kind(0o140644), FileType::Socket);
        assert_eq!(kind(0o020644), FileType::CharDevice);
        assert_eq!(kind(0o060644), FileType::BlockDevice);
    }
}
