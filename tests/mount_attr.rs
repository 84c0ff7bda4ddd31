//! Through a real mount: inode attribute flags (the ioctls chattr and lsattr use), their
//! enforcement, RENAME_WHITEOUT, `-o noacl`, and files of 2^63 - 1 bytes.
//!
//! Needs root and /dev/fuse, as every mount test (tests/common/mod.rs). The ioctls and
//! xattr calls come from python3, as in mount_basic.rs (the tests contain no unsafe code).

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

/// FS_IOC_GETFLAGS/SETFLAGS (with an int, as chattr passes it) and FS_IOC_FSGETXATTR/
/// FSSETXATTR on `argv[1]`: prints the flags (`get`, `xget`), or `errno N`.
const ATTR_PY: &str = r#"
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)
op = sys.argv[2]
try:
    if op == 'get':
        print(struct.unpack('I', fcntl.ioctl(fd, 0x80086601, struct.pack('I', 0)))[0])
    elif op == 'set':
        fcntl.ioctl(fd, 0x40086602, struct.pack('I', int(sys.argv[3])))
        print(0)
    elif op == 'xget':
        print(struct.unpack('5I8x', fcntl.ioctl(fd, 0x801c581f, bytes(28)))[0])
    elif op == 'xset':
        fcntl.ioctl(fd, 0x401c5820, struct.pack('5I8x', int(sys.argv[3]), 0, 0, 0, 0))
        print(0)
except OSError as e:
    print('errno', e.errno)
"#;
const FS_SYNC_FL: u32 = 0x8;
const FS_IMMUTABLE_FL: u32 = 0x10;
const FS_APPEND_FL: u32 = 0x20;
const FS_NODUMP_FL: u32 = 0x40;
const FS_NOATIME_FL: u32 = 0x80;
const FS_COMPR_FL: u32 = 0x4;
const FS_XFLAG_IMMUTABLE: u32 = 0x8;
const FS_XFLAG_NOATIME: u32 = 0x40;
const FS_XFLAG_NODUMP: u32 = 0x80;

/// Runs one ATTR_PY operation: the flags it printed, or the errno it failed with.
fn attr(path: &Path, op: &str, value: Option<u32>) -> Result<u32, i32> {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(ATTR_PY).arg(path).arg(op);
    if let Some(v) = value {
        cmd.arg(v.to_string());
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("this test runs python3 for the ioctls: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python3 {op}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match text.trim().strip_prefix("errno ") {
        Some(n) => Err(n.parse().unwrap()),
        None => Ok(text.trim().parse().unwrap()),
    }
}

fn get(path: &Path) -> u32 {
    attr(path, "get", None).unwrap()
}

fn set(path: &Path, flags: u32) {
    attr(path, "set", Some(flags)).unwrap();
}

fn assert_eperm<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) {
    let e = r.expect_err(what);
    assert_eq!(errno(&e), libc::EPERM, "{what}: {e}");
}

#[test]
fn attribute_flags_through_the_mount_are_enforced_and_persist() {
    can_mount();
    let img = Image::new("attr-flags", 64 * MIB);
    let m = Mount::new(&img, "");
    let f = m.path("f");
    fs::write(&f, b"kept").unwrap();
    let early_writer = OpenOptions::new().write(true).open(&f).unwrap();
    assert_eq!(get(&f), 0);

    set(&f, FS_IMMUTABLE_FL | FS_NODUMP_FL);
    assert_eq!(get(&f), FS_IMMUTABLE_FL | FS_NODUMP_FL);
    assert_eq!(
        attr(&f, "xget", None),
        Ok(FS_XFLAG_IMMUTABLE | FS_XFLAG_NODUMP)
    );
    assert_eperm("write", fs::write(&f, b"x"));
    assert_eperm(
        "open for appending",
        OpenOptions::new().append(true).open(&f),
    );
    assert_eperm(
        "write through an fd opened before chattr +i",
        early_writer.write_at(b"x", 0),
    );
    assert_eperm("unlink", fs::remove_file(&f));
    assert_eperm("rename", fs::rename(&f, m.path("g")));
    assert_eperm("link", fs::hard_link(&f, m.path("h")));
    assert_eperm(
        "chmod",
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)),
    );
    assert_eq!(fs::read(&f).unwrap(), b"kept");
    // An immutable directory takes no new entry.
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    set(&d, FS_IMMUTABLE_FL);
    assert_eperm(
        "create in an immutable directory",
        fs::write(d.join("x"), b""),
    );
    set(&d, 0);
    fs::write(d.join("x"), b"").unwrap();

    // Append-only: O_APPEND writes only.
    set(&f, FS_APPEND_FL);
    assert_eperm(
        "open for writing without O_APPEND",
        OpenOptions::new().write(true).open(&f),
    );
    let mut a = OpenOptions::new().append(true).open(&f).unwrap();
    a.write_all(b"+more").unwrap();
    drop(a);
    assert_eq!(fs::read(&f).unwrap(), b"kept+more");
    assert_eperm("unlink of an append-only file", fs::remove_file(&f));

    // FS_IOC_FSSETXATTR sets through xflags; a flag pmfs lacks is EOPNOTSUPP.
    attr(&f, "xset", Some(FS_XFLAG_NOATIME)).unwrap();
    assert_eq!(get(&f), FS_NOATIME_FL);
    assert_eq!(attr(&f, "set", Some(FS_COMPR_FL)), Err(libc::EOPNOTSUPP));
    set(&f, FS_NODUMP_FL | FS_SYNC_FL);
    drop(early_writer);
    m.unmount();

    let m = Mount::new(&img, "");
    let f = m.path("f");
    assert_eq!(get(&f), FS_NODUMP_FL | FS_SYNC_FL);
    fs::write(&f, b"writable again").unwrap();
    fs::remove_file(&f).unwrap();
    m.unmount();
}

#[test]
fn rename_whiteout_through_the_mount() {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    can_mount();
    let img = Image::new("whiteout", 64 * MIB);
    let m = Mount::new(&img, "");
    fs::write(m.path("a"), b"moved").unwrap();
    fs::write(m.path("b"), b"other").unwrap();
    renameat2(
        AT_FDCWD,
        &m.path("a"),
        AT_FDCWD,
        &m.path("c"),
        RenameFlags::RENAME_WHITEOUT,
    )
    .unwrap();
    assert_eq!(fs::read(m.path("c")).unwrap(), b"moved");
    let w = fs::symlink_metadata(m.path("a")).unwrap();
    assert!(w.file_type().is_char_device(), "{w:?}");
    assert_eq!((w.rdev(), w.mode() & 0o7777), (0, 0));
    // EXCHANGE never goes with WHITEOUT; NOREPLACE does, and refuses an existing target.
    let err = renameat2(
        AT_FDCWD,
        &m.path("b"),
        AT_FDCWD,
        &m.path("c"),
        RenameFlags::RENAME_WHITEOUT | RenameFlags::RENAME_EXCHANGE,
    )
    .unwrap_err();
    assert_eq!(err, nix::errno::Errno::EINVAL);
    let err = renameat2(
        AT_FDCWD,
        &m.path("b"),
        AT_FDCWD,
        &m.path("c"),
        RenameFlags::RENAME_WHITEOUT | RenameFlags::RENAME_NOREPLACE,
    )
    .unwrap_err();
    assert_eq!(err, nix::errno::Errno::EEXIST);
    m.unmount();
    let m = Mount::new(&img, "");
    assert!(
        fs::symlink_metadata(m.path("a"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert_eq!(fs::read(m.path("b")).unwrap(), b"other");
    m.unmount();
}

/// Sets an access ACL granting `nobody` read (and reads it back): prints `ok` or `errno N`.
const ACL_PY: &str = r#"
import os, struct, sys
e = [(1, 6, 0xffffffff), (2, 4, 65534), (4, 4, 0xffffffff), (0x10, 4, 0xffffffff),
     (0x20, 4, 0xffffffff)]
v = struct.pack('<I', 2) + b''.join(struct.pack('<HHI', *x) for x in e)
try:
    os.setxattr(sys.argv[1], 'system.posix_acl_access', v)
    assert os.getxattr(sys.argv[1], 'system.posix_acl_access') == v
    print('ok')
except OSError as x:
    print('errno', x.errno)
"#;
fn set_acl(path: &Path) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(ACL_PY)
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("this test runs python3 for setxattr: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn noacl_refuses_acl_xattrs_and_acl_is_the_default() {
    can_mount();
    let img = Image::new("noacl", 64 * MIB);
    let m = Mount::new(&img, "noacl");
    fs::write(m.path("f"), b"").unwrap();
    assert_eq!(set_acl(&m.path("f")), format!("errno {}", libc::EOPNOTSUPP));
    m.unmount();
    for opts in ["", "acl"] {
        let m = Mount::new(&img, opts);
        assert_eq!(set_acl(&m.path("f")), "ok", "mounted with -o {opts:?}");
        m.unmount();
    }
}

#[test]
fn a_file_of_2_63_minus_1_bytes() {
    can_mount();
    let img = Image::new("huge-file", 64 * MIB);
    let m = Mount::new(&img, "");
    let max = i64::MAX as u64;
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(m.path("huge"))
        .unwrap();
    f.set_len(max).unwrap();
    f.write_at(b"z", max - 1).unwrap();
    drop(f);
    assert_eq!(fs::metadata(m.path("huge")).unwrap().len(), max);
    m.unmount();
    let m = Mount::new(&img, "");
    let f = fs::File::open(m.path("huge")).unwrap();
    // One byte: a longer read at 2^63 - 2 would end past the largest offset (EINVAL).
    let mut byte = [0u8; 1];
    assert_eq!(f.read_at(&mut byte, max - 1).unwrap(), 1);
    assert_eq!(&byte, b"z");
    drop(f);
    fs::remove_file(m.path("huge")).unwrap();
    m.unmount();
}
