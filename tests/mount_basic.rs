//! Real mounts through the `pmfs` daemon: POSIX operations through std::fs, persistence
//! across unmount and mount, xattrs, concurrency, ENOSPC, sparse files past 4 GiB, and the
//! daemon's own behaviour (errors, daemonising, signals, the mount(8) helper convention).
//!
//! Needs root and /dev/fuse: without them the tests fail (a test that cannot run must not
//! count as passed). The harness is tests/common/mod.rs.

// Test helpers outside #[test] functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions as FileOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Bytes that differ per file and offset, so misplaced data shows.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn posix_operations_through_std_fs() {
    if !can_mount() {
        return;
    }
    let img = Image::new("posix", 64 * MIB);
    let m = Mount::new(&img, "");

    // create, write, read, stat
    let a = m.path("a.txt");
    fs::write(&a, b"hello pmfs\n").unwrap();
    assert_eq!(fs::read(&a).unwrap(), b"hello pmfs\n");
    let md = fs::metadata(&a).unwrap();
    assert!(md.is_file());
    assert_eq!(md.len(), 11);
    assert_eq!(md.nlink(), 1);
    assert_eq!(md.uid(), 0);

    // overwrite in the middle, append, truncate
    let f = FileOptions::new().read(true).write(true).open(&a).unwrap();
    f.write_at(b"PMFS", 6).unwrap();
    drop(f);
    let mut f = FileOptions::new().append(true).open(&a).unwrap();
    f.write_all(b"more\n").unwrap();
    drop(f);
    assert_eq!(fs::read(&a).unwrap(), b"hello PMFS\nmore\n");
    let f = FileOptions::new().write(true).open(&a).unwrap();
    f.set_len(5).unwrap();
    drop(f);
    assert_eq!(fs::read(&a).unwrap(), b"hello");

    // chmod, times
    fs::set_permissions(&a, fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(&a).unwrap().mode() & 0o7777, 0o640);
    let t = std::time::UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
    File::options()
        .write(true)
        .open(&a)
        .unwrap()
        .set_modified(t)
        .unwrap();
    let md = fs::metadata(&a).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_000_000_000, 123_456_789));

    // mkdir, nested files, rename across directories, rmdir
    let d = m.path("dir");
    fs::create_dir(&d).unwrap();
    fs::create_dir(d.join("sub")).unwrap();
    assert_eq!(fs::metadata(&d).unwrap().nlink(), 3);
    fs::rename(&a, d.join("sub/b.txt")).unwrap();
    assert!(!a.exists());
    assert_eq!(fs::read(d.join("sub/b.txt")).unwrap(), b"hello");
    assert_eq!(
        errno(&fs::remove_dir(&d).unwrap_err()),
        libc::ENOTEMPTY,
        "rmdir of a non-empty directory"
    );
    fs::rename(d.join("sub/b.txt"), m.path("b.txt")).unwrap();
    fs::remove_dir(d.join("sub")).unwrap();
    fs::remove_dir(&d).unwrap();
    assert!(!d.exists());

    // rename over an existing file replaces it
    fs::write(m.path("c.txt"), b"c").unwrap();
    fs::rename(m.path("c.txt"), m.path("b.txt")).unwrap();
    assert_eq!(fs::read(m.path("b.txt")).unwrap(), b"c");

    // rename flags: RENAME_NOREPLACE refuses an existing target, RENAME_EXCHANGE swaps
    fs::write(m.path("x1"), b"one").unwrap();
    fs::write(m.path("x2"), b"two").unwrap();
    let cwd = File::open(&m.mountpoint).unwrap();
    let err = nix::fcntl::renameat2(
        &cwd,
        "x1",
        &cwd,
        "x2",
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .unwrap_err();
    assert_eq!(err, nix::errno::Errno::EEXIST);
    nix::fcntl::renameat2(
        &cwd,
        "x1",
        &cwd,
        "x2",
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .unwrap();
    assert_eq!(fs::read(m.path("x1")).unwrap(), b"two");
    assert_eq!(fs::read(m.path("x2")).unwrap(), b"one");
    fs::remove_file(m.path("x1")).unwrap();
    fs::remove_file(m.path("x2")).unwrap();
    drop(cwd);

    // a cached negative entry does not hide a name created afterwards
    assert_eq!(
        fs::metadata(m.path("later")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    fs::write(m.path("later"), b"now").unwrap();
    assert_eq!(fs::read(m.path("later")).unwrap(), b"now");
    fs::remove_file(m.path("later")).unwrap();
    assert!(!m.path("later").exists());

    // symlink, readlink, hard link
    std::os::unix::fs::symlink("b.txt", m.path("s")).unwrap();
    assert_eq!(fs::read_link(m.path("s")).unwrap(), Path::new("b.txt"));
    assert_eq!(fs::read(m.path("s")).unwrap(), b"c");
    assert!(
        fs::symlink_metadata(m.path("s"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    fs::hard_link(m.path("b.txt"), m.path("h")).unwrap();
    assert_eq!(fs::metadata(m.path("b.txt")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(m.path("h")).unwrap().ino(),
        fs::metadata(m.path("b.txt")).unwrap().ino()
    );

    // unlink; an unlinked file stays readable while open
    let mut open = File::open(m.path("h")).unwrap();
    fs::remove_file(m.path("h")).unwrap();
    fs::remove_file(m.path("b.txt")).unwrap();
    assert!(!m.path("b.txt").exists());
    let mut buf = String::new();
    open.read_to_string(&mut buf).unwrap();
    assert_eq!(buf, "c");
    drop(open);

    // a fifo and errors
    nix::unistd::mkfifo(
        &m.path("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::metadata(m.path("fifo")).unwrap().file_type()
    ));
    assert_eq!(
        fs::metadata(m.path("missing")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        errno(&fs::create_dir(m.path("fifo")).unwrap_err()),
        libc::EEXIST
    );
    let long = "x".repeat(300);
    assert_eq!(
        errno(&fs::write(m.path(&long), b"").unwrap_err()),
        libc::ENAMETOOLONG
    );

    // the directory lists exactly what is there
    let mut names: Vec<String> = fs::read_dir(&m.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["fifo", "s"]);

    // statfs
    let st = nix::sys::statvfs::statvfs(&m.mountpoint).unwrap();
    assert!(st.blocks() > 0 && st.blocks_free() > 0 && st.blocks_free() <= st.blocks());
    m.unmount();
}

#[test]
fn data_survives_unmount_and_mount() {
    if !can_mount() {
        return;
    }
    let img = Image::new("persist", 128 * MIB);
    let sizes: [usize; 7] = [
        0,
        1,
        4095,
        4096,
        65_537,
        (MIB + 3) as usize,
        (5 * MIB) as usize,
    ];
    let m = Mount::new(&img, "");
    fs::create_dir(m.path("d")).unwrap();
    for (i, &len) in sizes.iter().enumerate() {
        fs::write(m.path(&format!("d/f{i}")), pattern(i as u64, len)).unwrap();
    }
    std::os::unix::fs::symlink("d/f1", m.path("link")).unwrap();
    fs::set_permissions(m.path("d/f2"), fs::Permissions::from_mode(0o600)).unwrap();
    let ino = fs::metadata(m.path("d/f3")).unwrap().ino();
    m.unmount();

    for round in 0..2 {
        let cache = if round == 0 { "" } else { "cache=page" };
        let m = Mount::new(&img, cache);
        for (i, &len) in sizes.iter().enumerate() {
            let got = fs::read(m.path(&format!("d/f{i}"))).unwrap();
            assert_eq!(got.len(), len, "size of f{i}");
            assert!(got == pattern(i as u64, len), "contents of f{i}");
        }
        assert_eq!(fs::read_link(m.path("link")).unwrap(), Path::new("d/f1"));
        assert_eq!(fs::metadata(m.path("d/f2")).unwrap().mode() & 0o7777, 0o600);
        assert_eq!(fs::metadata(m.path("d/f3")).unwrap().ino(), ino);
        m.unmount();
    }
}

#[test]
fn extended_attributes() {
    if !can_mount() {
        return;
    }
    let img = Image::new("xattr", 64 * MIB);
    let m = Mount::new(&img, "");
    let f = m.path("f");
    fs::write(&f, b"x").unwrap();
    xattr::set(&f, "user.one", b"1").unwrap();
    xattr::set(&f, "user.big", &vec![7u8; 3000]).unwrap();
    xattr::set(&f, "trusted.t", b"root only").unwrap();
    assert_eq!(xattr::get(&f, "user.one").unwrap().unwrap(), b"1");
    assert_eq!(
        xattr::get(&f, "user.big").unwrap().unwrap(),
        vec![7u8; 3000]
    );
    assert_eq!(xattr::get(&f, "user.none").unwrap(), None);
    let names: HashSet<String> = xattr::list(&f)
        .unwrap()
        .map(|n| n.into_string().unwrap())
        .collect();
    for n in ["user.one", "user.big", "trusted.t"] {
        assert!(names.contains(n), "{n} listed in {names:?}");
    }
    xattr::set(&f, "user.one", b"uno").unwrap();
    assert_eq!(xattr::get(&f, "user.one").unwrap().unwrap(), b"uno");
    xattr::remove(&f, "user.one").unwrap();
    assert_eq!(xattr::get(&f, "user.one").unwrap(), None);
    assert_eq!(
        errno(&xattr::remove(&f, "user.one").unwrap_err()),
        libc::ENODATA
    );
    // xattrs on directories and symlinks' targets, and across a remount
    xattr::set(&m.mountpoint, "user.dir", b"d").unwrap();
    m.unmount();
    let m = Mount::new(&img, "");
    assert_eq!(
        xattr::get(m.path("f"), "user.big").unwrap().unwrap(),
        vec![7u8; 3000]
    );
    assert_eq!(
        xattr::get(&m.mountpoint, "user.dir").unwrap().unwrap(),
        b"d"
    );
    m.unmount();
}

#[test]
fn concurrent_namespace_operations_in_one_directory() {
    if !can_mount() {
        return;
    }
    const THREADS: usize = 8;
    const ROUNDS: usize = 150;
    let img = Image::new("concurrent", 256 * MIB);
    let m = Mount::new(&img, "");
    let dir = m.path("shared");
    fs::create_dir(&dir).unwrap();
    // Each thread creates, writes, renames and deletes its own names in the one directory;
    // what survives is known per thread.
    let expected: Vec<BTreeMap<String, Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let dir = dir.clone();
                s.spawn(move || {
                    let mut keep = BTreeMap::new();
                    for r in 0..ROUNDS {
                        let data = pattern((t * ROUNDS + r) as u64, 100 + (r * 37) % 9000);
                        let tmp = dir.join(format!("t{t}-r{r}.tmp"));
                        fs::write(&tmp, &data).unwrap();
                        let name = format!("t{t}-r{r}");
                        fs::rename(&tmp, dir.join(&name)).unwrap();
                        if r % 3 == 0 {
                            fs::remove_file(dir.join(&name)).unwrap();
                        } else if r % 3 == 1 {
                            let moved = format!("t{t}-moved-{r}");
                            fs::rename(dir.join(&name), dir.join(&moved)).unwrap();
                            keep.insert(moved, data);
                        } else {
                            keep.insert(name, data);
                        }
                    }
                    keep
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all: BTreeMap<String, Vec<u8>> = expected.into_iter().flatten().collect();
    let listed: HashSet<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(listed.len(), all.len());
    m.unmount();

    let m = Mount::new(&img, "");
    let dir = m.path("shared");
    let listed: HashSet<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let want: HashSet<String> = all.keys().cloned().collect();
    assert_eq!(listed, want);
    for (name, data) in &all {
        assert!(fs::read(dir.join(name)).unwrap() == *data, "{name}");
    }
    m.unmount();
}

#[test]
fn enospc_then_space_returns_after_delete() {
    if !can_mount() {
        return;
    }
    let img = Image::new("enospc", 32 * MIB);
    let m = Mount::new(&img, "");
    let chunk = pattern(1, MIB as usize);
    let mut written = 0u64;
    let mut f = File::create(m.path("fill")).unwrap();
    let err = loop {
        match f.write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e) => break e,
        }
        assert!(written < 64 * MIB, "a 32 MiB image took {written} bytes");
    };
    assert_eq!(errno(&err), libc::ENOSPC, "{err}");
    assert!(written > 8 * MIB, "only {written} bytes fit");
    drop(f);
    assert_eq!(
        errno(&fs::write(m.path("more"), &chunk).unwrap_err()),
        libc::ENOSPC
    );
    let free_full = nix::sys::statvfs::statvfs(&m.mountpoint)
        .unwrap()
        .blocks_free();
    fs::remove_file(m.path("fill")).unwrap();
    let _ = fs::remove_file(m.path("more"));
    let free_after = nix::sys::statvfs::statvfs(&m.mountpoint)
        .unwrap()
        .blocks_free();
    assert!(
        free_after > free_full + written / 4096 / 2,
        "space did not return: {free_full} -> {free_after} blocks"
    );
    fs::write(m.path("again"), pattern(2, (4 * MIB) as usize)).unwrap();
    assert_eq!(fs::metadata(m.path("again")).unwrap().len(), 4 * MIB);
    m.unmount();
}

#[test]
fn sparse_file_past_4_gib_on_a_small_image() {
    if !can_mount() {
        return;
    }
    let img = Image::new("sparse", 64 * MIB);
    let m = Mount::new(&img, "");
    let p = m.path("sparse");
    let mut f = FileOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all_at(b"far away", 5 * GIB).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 5 * GIB + 8);
    let mut buf = [0u8; 8];
    f.read_exact_at(&mut buf, 5 * GIB).unwrap();
    assert_eq!(&buf, b"far away");
    let mut hole = vec![1u8; 4096];
    f.read_exact_at(&mut hole, 4 * GIB).unwrap();
    assert!(hole.iter().all(|&b| b == 0));
    // Only the chunk around the data is allocated (a 2 MiB chunk: files past 2 MiB get
    // aligned chunks), not the 5 GiB before it.
    let allocated = fs::metadata(&p).unwrap().blocks() * 512;
    assert!(
        allocated <= 4 * MIB,
        "{allocated} bytes allocated for 8 bytes of data"
    );
    // SEEK_DATA finds the data, SEEK_HOLE the hole before it
    let data = nix::unistd::lseek(&f, 0, nix::unistd::Whence::SeekData).unwrap();
    assert_eq!(data as u64, 5 * GIB);
    let hole_at = nix::unistd::lseek(&f, 0, nix::unistd::Whence::SeekHole).unwrap();
    assert_eq!(hole_at, 0);
    f.seek(SeekFrom::Start(5 * GIB + 3)).unwrap();
    let mut rest = String::new();
    f.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, " away");
    drop(f);
    m.unmount();
    let m = Mount::new(&img, "");
    let f = File::open(m.path("sparse")).unwrap();
    let mut buf = [0u8; 8];
    f.read_exact_at(&mut buf, 5 * GIB).unwrap();
    assert_eq!(&buf, b"far away");
    drop(f);
    m.unmount();
}

#[test]
fn readdir_sees_every_entry_once() {
    readdir_check(400);
}

/// The same with a directory whose B+tree needs more than two levels.
#[test]
fn readdir_sees_every_entry_of_a_large_directory_once() {
    readdir_check(3000);
}

fn readdir_check(n: usize) {
    if !can_mount() {
        return;
    }
    let img = Image::new("readdir", 128 * MIB);
    let m = Mount::new(&img, "");
    let dir = m.path("many");
    fs::create_dir(&dir).unwrap();
    for i in 0..n {
        File::create(dir.join(format!("entry-with-a-longish-name-{i:05}"))).unwrap();
    }
    let mut seen = HashSet::new();
    for e in fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(seen.insert(name.clone()), "{name} listed twice");
    }
    assert_eq!(seen.len(), n);
    // Listing while deleting: every name that was not deleted is seen exactly once.
    let mut seen = HashSet::new();
    for (k, e) in fs::read_dir(&dir).unwrap().enumerate() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(seen.insert(name.clone()), "{name} listed twice");
        if k % 2 == 0 {
            fs::remove_file(dir.join(&name)).unwrap();
        }
    }
    assert_eq!(seen.len(), n);
    m.unmount();
}

/// Runs `pmfs ARGS` to completion and returns (exit code, stderr).
fn run_pmfs(args: &[&std::ffi::OsStr]) -> (i32, String) {
    let out = Command::new(PMFS)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn daemon_reports_failures_as_one_line() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("m");
    fs::create_dir(&mp).unwrap();

    // usage errors: exit 2
    let (code, err) = run_pmfs(&[
        "/dev/shm/none".as_ref(),
        mp.as_os_str(),
        "-o".as_ref(),
        "rw,bogus".as_ref(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim(), "pmfs: unknown mount option 'bogus'");
    let (code, _) = run_pmfs(&["only-one-argument".as_ref()]);
    assert_eq!(code, 2);

    // a missing device
    let missing = dir.path().join("missing.img");
    let (code, err) = run_pmfs(&[missing.as_os_str(), mp.as_os_str()]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("pmfs: {}: ", missing.display())),
        "{err}"
    );

    // not a pmfs
    let junk = Image::new("junk", 32 * MIB);
    fs::write(&junk.path, vec![0u8; (32 * MIB) as usize]).unwrap();
    let (code, err) = run_pmfs(&[junk.path.as_os_str(), mp.as_os_str()]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("pmfs: {}: ", junk.path.display())),
        "{err}"
    );

    // a missing mount point
    let img = Image::new("errors", 32 * MIB);
    let nodir = dir.path().join("nodir");
    let (code, err) = run_pmfs(&[img.path.as_os_str(), nodir.as_os_str()]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("mount point"), "{err}");
    assert!(!is_mounted(&nodir));

    // busy: the image is mounted already (the second daemon waits 10 s for it, then fails)
    let m = Mount::new(&img, "");
    let mp2 = dir.path().join("m2");
    fs::create_dir(&mp2).unwrap();
    let (code, err) = run_pmfs(&[img.path.as_os_str(), mp2.as_os_str()]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("busy"), "{err}");
    assert!(!is_mounted(&mp2.canonicalize().unwrap()));
    m.unmount();
}

/// The pid of the daemon serving `mountpoint` (found by its command line).
fn daemon_pid(mountpoint: &Path) -> Option<i32> {
    let want = mountpoint.as_os_str().to_str()?;
    for e in fs::read_dir("/proc").ok()? {
        let e = e.ok()?;
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.contains(&&b"--daemon-child"[..]) && args.contains(&want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn daemonises_and_unmounts_cleanly_on_sigterm() {
    if !can_mount() {
        return;
    }
    let img = Image::new("daemon", 64 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("m");
    fs::create_dir(&mp).unwrap();
    let mp = mp.canonicalize().unwrap();

    // Without -f: the command returns once the mount is ready, with nothing left on our pipes.
    let out = Command::new(PMFS)
        .arg(&img.path)
        .arg(&mp)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    struct Lazy<'a>(&'a Path);
    impl Drop for Lazy<'_> {
        fn drop(&mut self) {
            if is_mounted(self.0) {
                let _ = Command::new("umount").arg("-l").arg(self.0).status();
            }
        }
    }
    let _guard = Lazy(&mp);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&mp), "mounted when pmfs returns");
    let info = mountinfo::find(&mp).unwrap().unwrap();
    assert_eq!(
        info.source,
        img.path.as_os_str(),
        "mount source is the device path"
    );
    assert_eq!(
        info.fstype, "fuse.pmfs",
        "mount(8) finds the remount helper by it"
    );
    fs::write(mp.join("file"), b"served by the daemon").unwrap();

    let pid = daemon_pid(&mp).expect("the daemon process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_until("SIGTERM unmounts", || !is_mounted(&mp));
    wait_until("the daemon exits", || {
        fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "))
    });

    // Marked clean and released: a foreground mount gets the device at once and the data.
    let m = Mount::new(&img, "");
    assert_eq!(fs::read(m.path("file")).unwrap(), b"served by the daemon");
    // SIGINT to a foreground daemon unmounts too, and it exits 0.
    let pid = m.child.as_ref().unwrap().id();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    wait_until("SIGINT unmounts", || !is_mounted(&m.mountpoint));
    let mut m = m;
    let status = m.child.take().unwrap().wait().unwrap();
    assert!(
        status.success(),
        "exit after SIGINT: {status}: {}",
        m.log_text()
    );
}

#[test]
fn mount_helper_convention_and_remount() {
    if !can_mount() || !Path::new("/sbin/mount.fuse3").exists() {
        eprintln!("skipping: needs /sbin/mount.fuse3");
        return;
    }
    let img = Image::new("helper", 64 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("m");
    fs::create_dir(&mp).unwrap();
    let mp = mp.canonicalize().unwrap();
    struct Guard<'a>(&'a Path);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            if is_mounted(self.0) {
                let _ = Command::new("umount").arg("-l").arg(self.0).status();
            }
        }
    }
    let _guard = Guard(&mp);

    // What `mount -t fuse.pmfs IMG MP` runs: mount.fuse3 finds `pmfs` in PATH.
    let bindir = Path::new(PMFS).parent().unwrap();
    let path = format!(
        "{}:{}",
        bindir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("/sbin/mount.fuse3")
        .arg(&img.path)
        .arg(&mp)
        .args([
            "-o",
            "rw,nofail,x-systemd.device-timeout=5",
            "-t",
            "fuse.pmfs",
        ])
        .env("PATH", &path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = mountinfo::find(&mp).unwrap().unwrap();
    assert_eq!(
        info.fstype, "fuse.pmfs",
        "mount(8) finds the remount helper by it"
    );
    // mount.fuse3 asks for dev,suid, mount(8)'s defaults
    assert!(!info.has_mount_option("nosuid"), "{}", info.mount_options);
    fs::write(mp.join("f"), b"1").unwrap();

    // What `mount -o remount,ro MP` runs (options as mount(8) and mount.fuse3 pass them).
    let remount = |opts: &str| {
        // A remount to read-only is refused while a file is open for writing, which a
        // parallel test's spawn can make so for a moment: see run_retrying_busy.
        let out = run_retrying_busy(
            Command::new(PMFS)
                .arg(&img.path)
                .arg(&mp)
                .args(["-o", opts]),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    remount("ro,relatime,remount,user_id=0,group_id=0,default_permissions,allow_other,dev,suid");
    let info = mountinfo::find(&mp).unwrap().unwrap();
    assert!(info.has_mount_option("ro"), "{}", info.mount_options);
    assert_eq!(
        errno(&fs::write(mp.join("g"), b"2").unwrap_err()),
        libc::EROFS
    );
    assert_eq!(fs::read(mp.join("f")).unwrap(), b"1");
    remount("rw,relatime,remount,user_id=0,group_id=0,default_permissions,allow_other,dev,suid");
    fs::write(mp.join("g"), b"2").unwrap();
    assert_eq!(fs::read(mp.join("g")).unwrap(), b"2");

    let out = run_retrying_busy(Command::new("umount").arg(&mp));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("umount", || !is_mounted(&mp));
}

#[test]
fn read_only_mount() {
    if !can_mount() {
        return;
    }
    let img = Image::new("ro", 64 * MIB);
    let m = Mount::new(&img, "");
    fs::write(m.path("f"), b"data").unwrap();
    m.unmount();
    let m = Mount::new(&img, "ro");
    assert_eq!(fs::read(m.path("f")).unwrap(), b"data");
    assert_eq!(
        errno(&fs::write(m.path("g"), b"x").unwrap_err()),
        libc::EROFS
    );
    assert_eq!(
        errno(&fs::remove_file(m.path("f")).unwrap_err()),
        libc::EROFS
    );
    m.unmount();
}

#[test]
fn page_cache_mode_and_mmap() {
    if !can_mount() {
        return;
    }
    let img = Image::new("mmap", 64 * MIB);
    for cache in ["cache=direct", "cache=page"] {
        let m = Mount::new(&img, cache);
        let p = m.path(&format!("mm-{cache}"));
        fs::write(&p, vec![b'a'; 8192]).unwrap();
        // Shared mmap works in both modes (direct: FUSE_DIRECT_IO_ALLOW_MMAP); python3 does
        // the mapping so this test needs no unsafe code.
        let script = "import mmap,sys\n\
            f=open(sys.argv[1],'r+b')\n\
            m=mmap.mmap(f.fileno(),8192)\n\
            assert m[0:1]==b'a'\n\
            m[100:105]=b'hello'\n\
            m.flush()\n\
            m.close()\n\
            f.close()\n";
        match Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&p)
            .status()
        {
            Ok(s) => {
                assert!(s.success(), "mmap through {cache}");
                let data = fs::read(&p).unwrap();
                assert_eq!(&data[100..105], b"hello", "{cache}");
            }
            Err(e) => panic!("this test runs python3 for mmap: {e}"),
        }
        m.unmount();
    }
}

/// Runs `cat PATH` as uid/gid 65534 (nobody): true if it could read the file.
fn nobody_can_read(path: &Path) -> bool {
    use std::os::unix::process::CommandExt;
    Command::new("cat")
        .arg(path)
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn posix_acls_are_enforced_inherited_and_kept_in_step_with_the_mode() {
    use pmfs::fuse::acl::{self, Acl, Entry};
    if !can_mount() {
        return;
    }
    let e = |tag, perm, id| Entry { tag, perm, id };
    let img = Image::new("acl", 64 * MIB);
    let m = Mount::new(&img, "");
    fs::set_permissions(&m.mountpoint, fs::Permissions::from_mode(0o755)).unwrap();

    // Enforcement: a named-user entry grants what the mode does not, within the mask.
    let secret = m.path("secret");
    fs::write(&secret, b"s").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!nobody_can_read(&secret));
    let grant = Acl {
        entries: vec![
            e(acl::USER_OBJ, 6, u32::MAX),
            e(acl::USER, 4, 65534),
            e(acl::GROUP_OBJ, 0, u32::MAX),
            e(acl::MASK, 4, u32::MAX),
            e(acl::OTHER, 0, u32::MAX),
        ],
    };
    xattr::set(&secret, "system.posix_acl_access", &grant.encode()).unwrap();
    assert_eq!(
        fs::metadata(&secret).unwrap().mode() & 0o777,
        0o640,
        "mode follows mask"
    );
    assert!(nobody_can_read(&secret));
    // chmod narrows the mask, and the ACL entry with it.
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!nobody_can_read(&secret));
    let stored = Acl::parse(
        &xattr::get(&secret, "system.posix_acl_access")
            .unwrap()
            .unwrap(),
    );
    assert!(stored.unwrap().entries.contains(&e(acl::MASK, 0, u32::MAX)));
    // An ACL of base entries only is just a mode.
    let base = Acl {
        entries: vec![
            e(acl::USER_OBJ, 6, u32::MAX),
            e(acl::GROUP_OBJ, 4, u32::MAX),
            e(acl::OTHER, 4, u32::MAX),
        ],
    };
    xattr::set(&secret, "system.posix_acl_access", &base.encode()).unwrap();
    assert_eq!(fs::metadata(&secret).unwrap().mode() & 0o777, 0o644);
    assert_eq!(
        xattr::get(&secret, "system.posix_acl_access").unwrap(),
        None
    );
    assert!(nobody_can_read(&secret));

    // Inheritance: a default ACL replaces the umask and passes to new files and directories.
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    let default = Acl {
        entries: vec![
            e(acl::USER_OBJ, 7, u32::MAX),
            e(acl::USER, 7, 65534),
            e(acl::GROUP_OBJ, 5, u32::MAX),
            e(acl::MASK, 7, u32::MAX),
            e(acl::OTHER, 0, u32::MAX),
        ],
    };
    xattr::set(&d, "system.posix_acl_default", &default.encode()).unwrap();
    let f = d.join("f");
    fs::write(&f, b"inherited").unwrap(); // created with mode 0666
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o777, 0o660);
    let access = Acl::parse(&xattr::get(&f, "system.posix_acl_access").unwrap().unwrap()).unwrap();
    assert!(access.entries.contains(&e(acl::USER, 7, 65534)));
    assert!(nobody_can_read(&f));
    let sub = d.join("sub");
    fs::create_dir(&sub).unwrap();
    assert_eq!(
        xattr::get(&sub, "system.posix_acl_default")
            .unwrap()
            .unwrap(),
        default.encode()
    );
    // Without a default ACL the umask applies (022 is what every test here expects).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let plain = m.path("plain-dir");
    fs::create_dir(&plain).unwrap();
    assert_eq!(fs::metadata(&plain).unwrap().mode() & 0o777, 0o755);
    m.unmount();

    // ACLs persist.
    let m = Mount::new(&img, "");
    assert!(nobody_can_read(&m.path("d/f")));
    m.unmount();
}

/// Regression from xfstests (generic/184, 306, 434, 633): a root mount gets mount(8)'s
/// defaults dev,suid, and with `nosubtype` the type reads plain `fuse` (xfstests's FUSE mode
/// needs both; local.config passes nosubtype). Without it the type is `fuse.pmfs`.
#[test]
fn root_mounts_are_dev_suid_and_typed_fuse() {
    assert!(can_mount());
    let img = Image::new("devsuid", 64 * MIB);
    let m = Mount::new(&img, "nosubtype");
    let info = mountinfo::find(&m.mountpoint).unwrap().unwrap();
    assert_eq!(info.fstype, "fuse");
    assert!(!info.has_mount_option("nosuid"), "{}", info.mount_options);
    assert!(!info.has_mount_option("nodev"), "{}", info.mount_options);
    m.unmount();
    let m = Mount::new(&img, "nosuid,nodev");
    let info = mountinfo::find(&m.mountpoint).unwrap().unwrap();
    assert_eq!(info.fstype, "fuse.pmfs");
    assert!(info.has_mount_option("nosuid") && info.has_mount_option("nodev"));
    m.unmount();
}

/// FS_IOC_SHUTDOWN (what xfstests' godown and `xfs_io -c shutdown` call): afterwards every
/// operation fails with EIO, the unmount works, and the next mount has every file that was
/// written before. The ioctl comes from python3 (the tests contain no unsafe code).
#[test]
fn shutdown_ioctl_stops_the_mount_and_the_next_mount_recovers() {
    can_mount();
    let img = Image::new("shutdown", 64 * MIB);
    let m = Mount::new(&img, "");
    fs::write(m.path("before"), b"written before the shutdown").unwrap();
    let shutdown = "import fcntl,os,struct,sys\n\
        fd=os.open(sys.argv[1],os.O_RDONLY)\n\
        fcntl.ioctl(fd,0x8004587d,struct.pack('I',0))\n";
    let status = Command::new("python3")
        .arg("-c")
        .arg(shutdown)
        .arg(&m.mountpoint)
        .status()
        .unwrap_or_else(|e| panic!("this test runs python3 for the ioctl: {e}"));
    assert!(status.success(), "FS_IOC_SHUTDOWN failed");
    let eio = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(errno(&e), libc::EIO, "{what}: {e}");
    };
    eio(fs::write(m.path("after"), b"x"), "create after shutdown");
    eio(fs::read(m.path("before")).map(drop), "read after shutdown");
    // A name the kernel has never seen (nothing cached): the lookup itself fails.
    eio(
        fs::metadata(m.path("never-seen")).map(drop),
        "lookup after shutdown",
    );
    m.unmount();
    let m = Mount::new(&img, "");
    assert_eq!(
        fs::read(m.path("before")).unwrap(),
        b"written before the shutdown"
    );
    assert!(!m.path("after").exists());
    fs::write(m.path("after"), b"writable again").unwrap();
    m.unmount();
}

/// Set-ID bits through the kernel: the mount negotiates FUSE_HANDLE_KILLPRIV_V2, so the
/// kernel leaves clearing them to the daemon (and skips a GETXATTR before each write). An
/// unprivileged write and an unprivileged truncate must each still clear them, as seen by
/// the next stat; root's keep them.
#[test]
fn unprivileged_write_and_truncate_clear_setid_bits_through_the_kernel() {
    use std::os::unix::process::CommandExt;
    if !can_mount() {
        return;
    }
    let img = Image::new("setid", 64 * MIB);
    let m = Mount::new(&img, "");
    let f = m.path("f");
    let mode = || fs::metadata(&f).unwrap().permissions().mode() & 0o7777;
    let as_nobody = |script: &str| {
        let st = Command::new("sh")
            .args(["-c", script, "sh"])
            .arg(&f)
            .uid(65534)
            .gid(65534)
            .status()
            .unwrap();
        assert!(st.success(), "{script}");
    };
    fs::write(&f, b"0123456789").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o6777)).unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(&f)
        .unwrap()
        .write_all(b"root")
        .unwrap();
    assert_eq!(mode(), 0o6777, "root's write keeps the bits");
    as_nobody("printf x >> \"$1\"");
    assert_eq!(mode(), 0o777, "an unprivileged write clears both");
    fs::set_permissions(&f, fs::Permissions::from_mode(0o6777)).unwrap();
    assert_eq!(mode(), 0o6777);
    as_nobody("truncate -s 3 \"$1\"");
    assert_eq!(mode(), 0o777, "an unprivileged truncate clears both");
    assert_eq!(fs::metadata(&f).unwrap().len(), 3);
    m.unmount();
}

/// `cache=writeback` runs with the kernel's writeback cache: write(2) completes in the page
/// cache, and fsync, msync and unmount are what make data durable (as on a disk file
/// system). After a kill -9 of the daemon, every byte written before a completed fsync or
/// msync is on the device, sizes included; data written without either reaches it at
/// unmount.
#[test]
fn writeback_cache_data_is_durable_after_fsync_msync_and_unmount() {
    use pmfs::device::SharedFileMapping;
    if !can_mount() {
        return;
    }
    let img = Image::new("wbcache", 64 * MIB);
    let synced = pattern(1, (3 * MIB + 5) as usize);
    let words: Vec<u64> = (0..MIB / 8)
        .map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    {
        let mut m = Mount::new(&img, "cache=writeback");
        let mut f = File::create(m.path("fsynced")).unwrap();
        f.write_all(&synced).unwrap();
        f.sync_all().unwrap();
        let f = FileOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(m.path("mapped"))
            .unwrap();
        f.set_len(MIB).unwrap();
        let map = SharedFileMapping::map(&f).unwrap();
        for (k, w) in words.iter().enumerate() {
            map.store_u64(k * 8, *w);
        }
        map.flush().unwrap();
        let mut child = m.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        drop(map);
    }
    let m = Mount::new(&img, "");
    assert!(
        fs::read(m.path("fsynced")).unwrap() == synced,
        "fsync'd data lost"
    );
    let mapped = fs::read(m.path("mapped")).unwrap();
    assert_eq!(mapped.len() as u64, MIB);
    let got: Vec<u64> = mapped
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(got == words, "msync'd stores lost");
    m.unmount();

    let plain = pattern(3, (2 * MIB + 77) as usize);
    let m = Mount::new(&img, "cache=writeback");
    fs::write(m.path("plain"), &plain).unwrap();
    m.unmount();
    let m = Mount::new(&img, "");
    assert!(
        fs::read(m.path("plain")).unwrap() == plain,
        "data lost at unmount"
    );
    m.unmount();
}
