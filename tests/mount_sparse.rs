//! Sparse images through a real mount (issue 14 item 4, issue 15 FITRIM): a 1 GiB image on a
//! 64 MiB tmpfs fills its store; the writer gets ENOSPC (never SIGBUS: the daemon lives on),
//! what was written reads back, deleting and fstrim(8) give the space back to the tmpfs, and
//! the image checks clean.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use pmfs::device::create_sparse_image;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A tmpfs of a given size mounted on a temporary directory, unmounted on drop (lazily, so
/// a failing test that left a file open still cleans up).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn new(size: u64) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("pmfs-sparse-store-")
            .tempdir()
            .unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs on {}", dir.path().display());
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// `size` bytes of sparse image at `path`, formatted as `mkfs.pmfs --sparse -s SIZE` does.
fn sparse_image(path: PathBuf, size: u64) -> Image {
    create_sparse_image(&path, size).unwrap();
    let dev = pmfs::cli::open_device(&path, false, pmfs::cli::TOOL_WAIT, "test").unwrap();
    format(&dev, &MkfsOptions::default()).unwrap();
    drop(dev);
    Image { path }
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed ^ (i >> 12) as u8)
        .collect()
}

fn fstrim(mountpoint: &Path, as_user: Option<u32>) -> Output {
    let mut cmd = Command::new("fstrim");
    cmd.arg("-v").arg(mountpoint);
    if let Some(uid) = as_user {
        cmd.uid(uid).gid(uid);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("this test runs fstrim(8) (util-linux): {e}"))
}

/// The bytes `fstrim -v` reports: "MNT: 1.2 GiB (1288490188 bytes) trimmed".
fn trimmed_bytes(out: &Output) -> u64 {
    let text = String::from_utf8_lossy(&out.stdout);
    let inner = text
        .split('(')
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .unwrap_or_else(|| panic!("unexpected fstrim output {text:?}"));
    inner.parse().unwrap()
}

#[test]
fn sparse_image_beyond_its_store_gives_enospc_and_fstrim_gives_space_back() {
    can_mount();
    let store = Tmpfs::new(64 * MIB);
    let img = sparse_image(store.path().join("pm.img"), GIB);
    assert!(
        allocated(&img.path) < 16 * MIB,
        "mkfs allocated only the metadata: {} bytes",
        allocated(&img.path)
    );
    let m = Mount::new(&img, "");
    assert!(
        m.log_text().contains("sparse image"),
        "the daemon says the image is sparse: {:?}",
        m.log_text()
    );

    let keep = pattern(3 * MIB as usize, 1);
    fs::write(m.path("keep"), &keep).unwrap();
    // Fill the store: 4 MiB files until a write fails. 64 MiB of tmpfs cannot take 20.
    let mut filled = 0;
    let err = loop {
        assert!(filled < 20, "the 64 MiB store never filled");
        let mut f = fs::File::create(m.path(&format!("fill{filled}"))).unwrap();
        match f.write_all(&pattern(4 * MIB as usize, filled as u8)) {
            Ok(()) => filled += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(errno(&err), libc::ENOSPC, "{err}");
    let mut m = m;
    assert!(
        m.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the daemon died (SIGBUS?): {}",
        m.log_text()
    );
    assert!(is_mounted(&m.mountpoint));
    // pmfs itself is far from full: the limit was the store below.
    let st = nix::sys::statvfs::statvfs(&m.mountpoint).unwrap();
    assert!(st.blocks_available() * st.fragment_size() > 512 * MIB);
    assert!(
        fs::read(m.path("keep")).unwrap() == keep,
        "keep reads back changed"
    );
    for i in 0..filled {
        assert!(
            fs::read(m.path(&format!("fill{i}"))).unwrap() == pattern(4 * MIB as usize, i as u8),
            "fill{i} reads back changed"
        );
    }

    // Delete, and hand the space back to the store.
    for i in 0..=filled {
        fs::remove_file(m.path(&format!("fill{i}"))).unwrap();
    }
    let before = allocated(&img.path);
    let out = fstrim(&m.mountpoint, Some(65534));
    assert!(!out.status.success(), "an unprivileged user may not trim");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(allocated(&img.path), before);
    let out = fstrim(&m.mountpoint, None);
    assert!(
        out.status.success(),
        "fstrim: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trimmed = trimmed_bytes(&out);
    let after = allocated(&img.path);
    assert!(trimmed > 0, "fstrim reported {trimmed} bytes");
    assert!(
        after + 32 * MIB <= before,
        "the image still holds {after} of {before} bytes"
    );
    assert!(
        fs::read(m.path("keep")).unwrap() == keep,
        "keep reads back changed"
    );

    // The space is there again: the chunks punched are allocated again on reuse.
    let again = pattern(24 * MIB as usize, 7);
    fs::write(m.path("again"), &again).unwrap();
    assert!(
        fs::read(m.path("again")).unwrap() == again,
        "again reads back changed"
    );
    m.unmount();

    let dev = Device::open(
        &img.path,
        &OpenOptions {
            read_only: true,
            wait_busy: Some(MOUNT_DEADLINE),
        },
    )
    .unwrap();
    let media: std::sync::Arc<dyn pmfs::device::Media> = std::sync::Arc::new(dev);
    let report = pmfs::check::check(&media).unwrap();
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
}

/// A preallocated image keeps its allocation: fstrim says the mount cannot discard.
#[test]
fn fstrim_on_a_preallocated_image_is_not_supported() {
    can_mount();
    let img = Image::new("prealloc-trim", 64 * MIB);
    let m = Mount::new(&img, "");
    let before = allocated(&img.path);
    let out = fstrim(&m.mountpoint, None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not supported"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(allocated(&img.path), before);
    assert!(!m.log_text().contains("sparse image"), "{}", m.log_text());
    m.unmount();
}

/// A sparse image stays sparse once every block of it is allocated (the file system was
/// full): `mkfs --sparse` marks the image file (xattr `user.pmfs.sparse`), so fstrim still
/// gives its free chunks back, where a preallocated image refuses (above).
#[test]
fn a_sparse_image_that_was_full_still_gives_space_back() {
    can_mount();
    let dir = tempfile::Builder::new()
        .prefix("pmfs-full-sparse-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let img = sparse_image(dir.path().join("img"), 64 * MIB);
    // Every block allocated, as after the file system was filled to ENOSPC.
    let f = fs::OpenOptions::new().write(true).open(&img.path).unwrap();
    nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, 64 * MIB as i64).unwrap();
    drop(f);
    assert_eq!(allocated(&img.path), 64 * MIB);
    let m = Mount::new(&img, "");
    let out = fstrim(&m.mountpoint, None);
    assert!(
        out.status.success(),
        "fstrim: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(trimmed_bytes(&out) > 0);
    assert!(allocated(&img.path) < 64 * MIB, "nothing was punched");
    m.unmount();
}
