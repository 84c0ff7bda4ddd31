//! pmfs on an image in a hugetlbfs mount, with 2 MiB and with 1 GiB pages: the size rule and
//! the shortage message, mkfs, a mount, an unclean end (kill -9 of the daemon), recovery at
//! the next mount, a clean fsck, and the direct mapping (`pmfs::dax`).
//!
//! Each test reserves the huge pages it needs itself (root writes
//! `/sys/kernel/mm/hugepages/hugepages-<kB>kB/nr_hugepages`), mounts a private hugetlbfs
//! with a `size=` limit, and undoes both on drop, whatever happened. Tests that change
//! `nr_hugepages` hold an exclusive flock on one lock file, so parallel tests (of this
//! binary or of another) never count each other's pages. A machine that cannot give the
//! pages fails the test, naming what is missing; `PMFS_HUGETLB_TESTS=skip` turns that into
//! a printed skip for machines known not to have them. Needs root and /dev/fuse.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use pmfs::dax::DaxMapping;
use pmfs::device::{DeviceError, Media, PersistenceMode};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

const LOCK_FILE: &str = "/tmp/pmfs-hugetlb-tests.lock";
const SKIP_VAR: &str = "PMFS_HUGETLB_TESTS";

fn sysfs_count(page: u64, name: &str) -> u64 {
    let file = format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB/{name}",
        page / 1024
    );
    let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file}: {e}"));
    text.trim().parse().unwrap()
}

fn set_nr_hugepages(page: u64, n: u64) -> std::io::Result<()> {
    let file = format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages",
        page / 1024
    );
    fs::write(file, n.to_string())
}

/// `pages` free huge pages of `page` bytes, reserved for as long as this lives; the old
/// `nr_hugepages` is restored on drop. Holds the tests' lock meanwhile.
struct HugePages {
    page: u64,
    restore: Option<u64>,
    _lock: nix::fcntl::Flock<File>,
}

impl HugePages {
    /// `None` when the machine cannot give the pages and `PMFS_HUGETLB_TESTS=skip` says to
    /// skip (printed); a failure otherwise.
    fn reserve(page: u64, pages: u64) -> Option<Self> {
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .unwrap();
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("{LOCK_FILE}: {e}"));
        let nr = sysfs_count(page, "nr_hugepages");
        let free = sysfs_count(page, "free_hugepages");
        let mut held = HugePages {
            page,
            restore: None,
            _lock: lock,
        };
        if free < pages {
            held.restore = Some(nr);
            let want = nr + pages - free;
            let wrote = set_nr_hugepages(page, want);
            let got = sysfs_count(page, "free_hugepages");
            if wrote.is_err() || got < pages {
                let why = format!(
                    "could not reserve {pages} huge pages of {} MiB (nr_hugepages {nr} -> \
                     {want}: {wrote:?}, {got} free): the kernel found too little contiguous \
                     memory",
                    page >> 20
                );
                if std::env::var(SKIP_VAR).as_deref() == Ok("skip") {
                    eprintln!("SKIPPED (hugetlbfs test, {SKIP_VAR}=skip): {why}");
                    return None;
                }
                panic!("{why}; set {SKIP_VAR}=skip to skip the hugetlbfs tests on this machine");
            }
        }
        Some(held)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(nr) = self.restore {
            if let Err(e) = set_nr_hugepages(self.page, nr) {
                eprintln!("could not restore nr_hugepages to {nr}: {e}");
            }
        }
    }
}

/// A private hugetlbfs mount with pages of `page` bytes and room for `pages` of them,
/// unmounted on drop (before the pages are given back).
struct HugetlbMount {
    dir: tempfile::TempDir,
    pages: u64,
    _pages: HugePages,
}

impl HugetlbMount {
    fn new(page: u64, pages: u64) -> Option<Self> {
        assert!(can_mount());
        let held = HugePages::reserve(page, pages)?;
        let dir = tempfile::Builder::new()
            .prefix("pmfs-hugetlbfs-")
            .tempdir()
            .unwrap();
        let status = Command::new("mount")
            .args(["-t", "hugetlbfs", "-o"])
            .arg(format!(
                "pagesize={}M,size={}M",
                page >> 20,
                (pages * page) >> 20
            ))
            .arg("none")
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount -t hugetlbfs failed");
        Some(HugetlbMount {
            dir,
            pages,
            _pages: held,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for HugetlbMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The `KernelPageSize` of the mapping that starts at `addr`, from /proc/self/smaps, in KiB.
fn kernel_page_kib(addr: usize) -> u64 {
    let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
    let start = format!("{addr:x}-");
    let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
    assert!(lines.next().is_some(), "no mapping at {addr:#x} in smaps");
    let line = lines
        .find(|l| l.starts_with("KernelPageSize:"))
        .expect("KernelPageSize in smaps");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

/// Writes `data` to `path` and fsyncs it.
fn write_synced(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// The checker's verdict on `image`: no problem at all.
fn assert_fsck_clean(image: &Path) {
    let dev = Device::open(
        image,
        &OpenOptions {
            read_only: true,
            wait_busy: Some(Duration::from_secs(10)),
        },
    )
    .unwrap();
    let media: Arc<dyn Media> = Arc::new(dev);
    let report = pmfs::check::check(&media).unwrap();
    assert!(
        report.problems.is_empty(),
        "fsck found problems: {:#?}",
        report.problems
    );
}

/// The whole round on a hugetlbfs with pages of `page` bytes and an image of `image_pages`
/// of them; `dax` checks the direct mapping of the remounted file system.
fn round(page: u64, image_pages: u64, dax: impl FnOnce(&Mount)) {
    let Some(hm) = HugetlbMount::new(page, image_pages) else {
        return;
    };
    let page_text = format!("{} MiB", page >> 20);
    let page_text = if page >= GIB {
        format!("{} GiB", page / GIB)
    } else {
        page_text
    };

    // The size rule: whole pages only, and the error says what to use; nothing is left.
    let odd = hm.path("odd.img");
    let e = create_image(&odd, page + page / 2).unwrap_err();
    assert!(
        e.to_string().contains(&format!(
            "is not a multiple of the hugetlbfs page size {page_text}"
        )),
        "{e}"
    );
    assert!(!odd.exists());
    // More pages than the mount allows: one line naming the limit.
    let big = hm.path("big.img");
    let e = create_image(&big, (hm.pages + 1) * page).unwrap_err();
    assert!(matches!(e, DeviceError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("not enough"), "{e}");
    assert!(e.to_string().contains("size= limit"), "{e}");
    assert!(!big.exists());

    // mkfs through the mapping only (hugetlbfs has no write(2)).
    let img = Image::at(hm.path("pmem.img"), "hugetlb", image_pages * page);
    {
        let dev = Device::open(&img.path, &OpenOptions::default()).unwrap();
        assert_eq!(dev.hugetlb_page_size(), Some(page));
        // Memory-backed: the crash-relevant flush path is the CPU's, as on pmem.
        assert!(
            matches!(
                dev.persistence(),
                PersistenceMode::Clwb | PersistenceMode::ClflushOpt | PersistenceMode::Clflush
            ),
            "{}",
            dev.persistence()
        );
        dev.sync_all().unwrap();
    }

    // A mount, fsynced files, then an unclean end: SIGKILL of the daemon.
    let small = pattern(3, 10_000);
    let large = pattern(9, (5 * MIB) as usize + 123);
    let mut m = Mount::new(&img, "");
    write_synced(&m.path("small"), &small);
    fs::create_dir(m.path("dir")).unwrap();
    write_synced(&m.path("dir/large"), &large);
    let mut child = m.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    drop(m); // unmounts the dead mount

    // Recovery at the next mount; what was fsynced is there.
    let m = Mount::new(&img, "");
    assert_eq!(fs::read(m.path("small")).unwrap(), small);
    assert_eq!(fs::read(m.path("dir/large")).unwrap(), large);
    dax(&m);
    m.unmount();
    assert_fsck_clean(&img.path);
}

/// 2 MiB pages: a 2 MiB-aligned file maps directly, PMD-mapped.
#[test]
fn hugetlbfs_with_2mib_pages() {
    round(2 * MIB, 64, |m| {
        let path = m.path("mapped");
        let data = pattern(5, (4 * MIB) as usize);
        write_synced(&path, &data);
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let map = DaxMapping::map(&file, 0, 4 * MIB).unwrap();
        assert!(map.is_huge_aligned());
        assert_eq!(map.as_ptr() as usize % (2 * MIB) as usize, 0);
        let mut buf = vec![0u8; 4096];
        map.read(3 * MIB as usize, &mut buf).unwrap();
        assert_eq!(buf, data[3 * MIB as usize..3 * MIB as usize + 4096]);
        map.write(100, b"through the mapping").unwrap();
        map.persist(100, 19).unwrap();
        let mut back = [0u8; 19];
        file.read_exact_at(&mut back, 100).unwrap();
        assert_eq!(&back, b"through the mapping");
        assert_eq!(kernel_page_kib(map.as_ptr() as usize), 2048);
    });
}

/// 1 GiB pages: a file preallocated to 1 GiB gets one 1 GiB-aligned extent in the whole
/// free region the device has left, `pmfs layout` shows it, and its direct mapping is
/// PUD-mapped; a file of 4 KiB extents cannot be mapped directly (its pages hold other
/// files' blocks) and says so.
#[test]
fn hugetlbfs_with_1gib_pages() {
    round(GIB, 2, |m| {
        let path = m.path("region");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, GIB as i64).unwrap();
        let out = Command::new(PMFS)
            .arg("layout")
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let layout = String::from_utf8(out.stdout).unwrap();
        let first: Vec<&str> = layout.lines().next().unwrap().split(' ').collect();
        assert_eq!(first[0], "0", "{layout}");
        assert_eq!(first[1].parse::<u64>().unwrap() % GIB, 0, "{layout}");
        assert_eq!(first[2], GIB.to_string(), "one 1 GiB extent: {layout}");
        let map = DaxMapping::map(&file, 0, GIB).unwrap();
        assert_eq!(map.as_ptr() as usize % GIB as usize, 0);
        map.write(GIB as usize - 5, b"last!").unwrap();
        map.persist(GIB as usize - 5, 5).unwrap();
        let mut back = [0u8; 5];
        file.read_exact_at(&mut back, GIB - 5).unwrap();
        assert_eq!(&back, b"last!");
        assert_eq!(kernel_page_kib(map.as_ptr() as usize), 1024 * 1024);
        drop(map);
        drop(file);

        let path = m.path("small-mapped");
        write_synced(&path, &pattern(1, 8192));
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let e = DaxMapping::map(&file, 0, 8192).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains("only in whole pages"), "{e}");
    });
}
