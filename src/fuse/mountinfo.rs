//! Reading `/proc/self/mountinfo`: which mounts exist, their sources, types and flags.
//!
//! The daemon uses it to find its FUSE connection number (the minor device number of its
//! superblock) and the current flags of a mount it is asked to remount; the integration
//! tests use it to wait for a mount to appear and disappear. Reading it never touches the
//! mounted file systems, so it cannot deadlock against a daemon that is not serving yet.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// One line of mountinfo (proc(5)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_id: u32,
    /// The superblock's device number; for FUSE the minor is the connection number under
    /// /sys/fs/fuse/connections.
    pub major: u32,
    pub minor: u32,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nosuid,nodev,relatime`).
    pub mount_options: String,
    /// `fuse.pmfs` for a pmfs mount.
    pub fstype: String,
    /// The mount source (for pmfs: the device path, byte for byte).
    pub source: OsString,
    /// Per-superblock options (`rw,user_id=0,...`).
    pub super_options: String,
}

impl MountInfo {
    /// True if the per-mount options contain `opt`.
    pub fn has_mount_option(&self, opt: &str) -> bool {
        self.mount_options.split(',').any(|o| o == opt)
    }

    /// True if the superblock is read-only.
    pub fn sb_read_only(&self) -> bool {
        self.super_options.split(',').any(|o| o == "ro")
    }
}

/// Undoes the octal escapes (`\040` for a space, ...) mountinfo uses in paths.
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = &b[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Parses one mountinfo line; `None` if it is malformed.
pub fn parse_line(line: &str) -> Option<MountInfo> {
    let (head, tail) = line.split_once(" - ")?;
    let h: Vec<&str> = head.split(' ').collect();
    let t: Vec<&str> = tail.split(' ').collect();
    if h.len() < 6 || t.len() < 3 {
        return None;
    }
    let (major, minor) = h[2].split_once(':')?;
    Some(MountInfo {
        mount_id: h[0].parse().ok()?,
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        mount_point: PathBuf::from(OsString::from_vec(unescape(h[4]))),
        mount_options: h[5].to_string(),
        fstype: t[0].to_string(),
        source: OsString::from_vec(unescape(t[1])),
        super_options: t[2].to_string(),
    })
}

/// Every mount this process sees, in mount order.
pub fn read() -> io::Result<Vec<MountInfo>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_line).collect())
}

/// The topmost mount at `mount_point` (exact path; pass a canonical one), if any.
pub fn find(mount_point: &Path) -> io::Result<Option<MountInfo>> {
    Ok(read()?
        .into_iter()
        .rev()
        .find(|m| m.mount_point.as_os_str().as_bytes() == mount_point.as_os_str().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_fuse_line_with_escapes() {
        let m = parse_line(
            "612 30 0:77 / /tmp/a\\040b rw,nosuid,nodev,relatime shared:340 - fuse.pmfs \
             /dev/shm/x\\040y.img rw,user_id=0,group_id=0,default_permissions,allow_other",
        )
        .unwrap();
        assert_eq!(m.mount_id, 612);
        assert_eq!((m.major, m.minor), (0, 77));
        assert_eq!(m.mount_point, PathBuf::from("/tmp/a b"));
        assert_eq!(m.fstype, "fuse.pmfs");
        assert_eq!(m.source, OsString::from("/dev/shm/x y.img"));
        assert!(m.has_mount_option("nosuid"));
        assert!(!m.has_mount_option("ro"));
        assert!(!m.sb_read_only());
    }

    #[test]
    fn unescape_leaves_other_backslashes() {
        assert_eq!(unescape("a\\134b"), b"a\\b");
        assert_eq!(unescape("a\\9"), b"a\\9");
        assert_eq!(unescape("a\\"), b"a\\");
    }

    #[test]
    fn reads_this_process_mounts() {
        let all = read().unwrap();
        assert!(all.iter().any(|m| m.mount_point == Path::new("/")));
    }
}
