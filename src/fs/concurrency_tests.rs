//! Concurrency of the core: the lock order, locks held until commit, leases against frees,
//! fail-stop, and the reference counts. Every test runs more threads than the device has
//! journal slots (a 64 MiB device has 4) under a progress watchdog: a hang fails the test
//! with the seed and what stalled, it never runs into a timeout.

use super::failpoint;
use super::*;
use crate::device::RecordingDevice;
use crate::mkfs::{MkfsOptions, format};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const C: Ctx = Ctx::ROOT;
/// No operation finishing for this long is a hang.
const STALL: Duration = Duration::from_secs(10);

fn new_fs(size: u64) -> (Arc<dyn Media>, Arc<Fs>) {
    let dev: Arc<dyn Media> = Arc::new(RecordingDevice::new(size));
    format(dev.as_ref(), &MkfsOptions::default()).unwrap();
    let fs = Fs::mount(Arc::clone(&dev), MountOptions::default()).unwrap();
    assert!(fs.geometry().journal_slots <= 4, "the tests need few slots");
    (dev, Arc::new(fs))
}

fn check_clean(media: &Arc<dyn Media>) {
    let report = crate::check::check(media).unwrap();
    assert!(
        report.problems.is_empty(),
        "consistency check: {:#?}",
        report.problems
    );
}

/// Counts finished operations; the watchdog fails the test when it stops moving.
#[derive(Clone, Default)]
pub(super) struct Progress(Arc<AtomicU64>);

impl Progress {
    pub(super) fn tick(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Runs `workers` on their own threads and waits for them; panics (failing the test) if
/// no worker finishes an operation for [`STALL`], or if a worker panicked. Stuck threads
/// are left behind: they hold only this test's file system.
pub(super) fn run_watched(what: &str, progress: &Progress, workers: Vec<Box<dyn FnOnce() + Send>>) {
    let handles: Vec<_> = workers
        .into_iter()
        .enumerate()
        .map(|(n, w)| {
            std::thread::Builder::new()
                .name(format!("{what}-{n}"))
                .spawn(w)
                .unwrap()
        })
        .collect();
    let mut last = (progress.get(), Instant::now());
    loop {
        if handles.iter().all(|h| h.is_finished()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        let now = progress.get();
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > STALL {
            panic!(
                "{what}: no operation finished for {STALL:?} after {now} operations: \
                 the workers are deadlocked (gdb: thread apply all bt)"
            );
        }
    }
    for h in handles {
        if let Err(p) = h.join() {
            std::panic::resume_unwind(p);
        }
    }
}

/// Issue item 1: `reap` (from FORGET) took state → slot while unlink took slot → state.
/// Sixteen threads, each unlinking looked-up files (orphans) and forgetting them at once.
#[test]
fn parallel_unlinks_and_forgets_in_sixteen_directories_make_progress() {
    let (media, fs) = new_fs(64 * MIB);
    let progress = Progress::default();
    let mut workers: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
    for t in 0..16u32 {
        let fs = Arc::clone(&fs);
        let progress = progress.clone();
        workers.push(Box::new(move || {
            let d = fs
                .mkdir(&C, ROOT_INO, format!("d{t}").as_bytes(), 0o755)
                .unwrap();
            for round in 0..6 {
                let mut inos = Vec::new();
                for i in 0..100 {
                    let name = format!("f{round}-{i}");
                    let a = fs.mknod(&C, d.ino, name.as_bytes(), 0o100644, 0).unwrap();
                    fs.write(&C, a.ino, 0, &[t as u8; 5000]).unwrap();
                    inos.push((name, a.ino));
                    progress.tick();
                }
                // As the kernel does: the unlink while the inode is looked up (an orphan),
                // then the FORGET (the reap frees it).
                for (name, ino) in inos {
                    fs.unlink(d.ino, name.as_bytes()).unwrap();
                    fs.forget(ino, 1);
                    progress.tick();
                }
            }
        }));
    }
    run_watched("unlink", &progress, workers);
    assert!(fs.orphans().unwrap().is_empty());
    fs.shutdown().unwrap();
    check_clean(&media);
}

/// Issue item 2: inode-table growth began a second transaction inside the creator's.
#[test]
fn creates_in_eight_directories_across_inode_table_growth_make_progress() {
    let (media, fs) = new_fs(64 * MIB);
    let progress = Progress::default();
    let per_thread = (2 * crate::format::USABLE_INODES_PER_CHUNK / 8 + 200) as usize;
    let mut workers: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
    for t in 0..8u32 {
        let fs = Arc::clone(&fs);
        let progress = progress.clone();
        workers.push(Box::new(move || {
            let d = fs
                .mkdir(&C, ROOT_INO, format!("d{t}").as_bytes(), 0o755)
                .unwrap();
            for i in 0..per_thread {
                fs.mknod(&C, d.ino, format!("{i}").as_bytes(), 0o100644, 0)
                    .unwrap();
                progress.tick();
            }
        }));
    }
    run_watched("grow", &progress, workers);
    assert!(
        fs.inode_table().chunk_blocks().len() >= 3,
        "the table grew twice"
    );
    fs.shutdown().unwrap();
    check_clean(&media);
}

/// Issue item 3: `end_lease` took deferred → slot while a truncate of a leased file took
/// slot → deferred. Six files stay leased while six threads truncate and rewrite them, and
/// one thread ends and retakes their leases (each end frees what the truncates deferred).
#[test]
fn lease_ends_racing_truncates_of_leased_files_make_progress() {
    let (media, fs) = new_fs(64 * MIB);
    let progress = Progress::default();
    let files: Vec<u64> = (0..6)
        .map(|n| {
            let a = fs
                .mknod(&C, ROOT_INO, format!("f{n}").as_bytes(), 0o100644, 0)
                .unwrap();
            fs.write(&C, a.ino, 0, &[1; 4096]).unwrap();
            a.ino
        })
        .collect();
    let leases: Vec<u64> = files
        .iter()
        .map(|&ino| fs.map_direct(ino, 0, 4096).unwrap().0)
        .collect();
    let mut workers: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
    for &ino in &files {
        let (fs, progress) = (Arc::clone(&fs), progress.clone());
        workers.push(Box::new(move || {
            let size = SetAttr {
                size: Some(0),
                ..SetAttr::default()
            };
            for round in 0..300u32 {
                fs.write(&C, ino, 0, &[round as u8; 3 * 4096]).unwrap();
                fs.setattr(&C, ino, &size).unwrap();
                progress.tick();
            }
        }));
    }
    {
        let (fs, progress, files) = (Arc::clone(&fs), progress.clone(), files.clone());
        workers.push(Box::new(move || {
            let mut leases = leases;
            for round in 0..300 {
                let k = round % files.len();
                fs.end_lease(leases[k]).unwrap();
                leases[k] = fs.map_direct(files[k], 0, 4096).unwrap().0;
                progress.tick();
            }
            for id in leases {
                fs.end_lease(id).unwrap();
            }
        }));
    }
    run_watched("lease", &progress, workers);
    assert_eq!(fs.lease_count(), 0);
    fs.shutdown().unwrap();
    check_clean(&media);
}

/// Forces an interleaving. Runs `victim` on a thread named `thread` until it reaches
/// `failpoint`, which pauses it; runs `other` on a second thread meanwhile; lets the victim
/// go on when `other` has finished, or after `max_wait` (when `other` waits for a lock the
/// victim holds, as it must where the locks are right); the victim's failpoint then returns
/// `outcome()`. Returns both results.
fn interleave<V: Send + 'static, O: Send + 'static>(
    thread: &str,
    failpoint: &'static str,
    outcome: fn() -> Result<()>,
    max_wait: Duration,
    victim: impl FnOnce() -> V + Send + 'static,
    other: impl FnOnce() -> O + Send + 'static,
) -> (V, O) {
    let (reached, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    {
        let (reached, done) = (Arc::clone(&reached), Arc::clone(&done));
        failpoint::set(failpoint, thread, move || {
            reached.store(true, Ordering::Release);
            let start = Instant::now();
            while !done.load(Ordering::Acquire) && start.elapsed() < max_wait {
                std::thread::sleep(Duration::from_millis(5));
            }
            outcome()
        });
    }
    let victim = std::thread::Builder::new()
        .name(thread.into())
        .spawn(victim)
        .unwrap();
    let start = Instant::now();
    while !reached.load(Ordering::Acquire) {
        assert!(
            start.elapsed() < STALL,
            "{thread} never reached {failpoint}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let other = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let r = other();
            done.store(true, Ordering::Release);
            r
        })
    };
    let v = victim.join().unwrap();
    failpoint::clear(thread);
    (v, other.join().unwrap())
}

/// The failpoint outcome of a transaction that fails just before its commit.
fn fail_commit() -> Result<()> {
    Err(Error::NoSpace)
}

/// Issue item 4: the state lock was dropped before commit, so a second unlink could log
/// (and commit over) orphan-tree bytes that the first then rolled back.
#[test]
fn an_orphan_committed_while_another_unlink_rolls_back_stays_recorded() {
    let (media, fs) = new_fs(64 * MIB);
    // Both files stay looked up, so each unlink makes an orphan.
    let x = fs.mknod(&C, ROOT_INO, b"x", 0o100644, 0).unwrap();
    let y = fs.mknod(&C, ROOT_INO, b"y", 0o100644, 0).unwrap();
    let (f1, f2) = (Arc::clone(&fs), Arc::clone(&fs));
    // x's unlink stops with its orphan added but not committed; y's runs meanwhile.
    let (vx, vy) = interleave(
        "victim-orphan",
        "commit",
        fail_commit,
        Duration::from_millis(500),
        move || f1.unlink(ROOT_INO, b"x"),
        move || f2.unlink(ROOT_INO, b"y"),
    );
    assert!(matches!(vx, Err(Error::NoSpace)));
    vy.unwrap();
    assert_eq!(
        fs.orphans().unwrap(),
        vec![y.ino],
        "y's orphan survived x's rollback"
    );
    assert_eq!(
        fs.lookup(ROOT_INO, b"x").unwrap().ino,
        x.ino,
        "x is still linked"
    );
    fs.forget(y.ino, 1);
    assert!(fs.orphans().unwrap().is_empty());
    fs.shutdown().unwrap();
    check_clean(&media);
}

/// Issue item 5: a truncate of a leased file published its deferred ranges before commit,
/// and a lease end freed them; the truncate then rolled back and the file pointed at
/// blocks the next file reused.
#[test]
fn a_lease_ending_during_a_truncate_that_rolls_back_frees_nothing_the_file_uses() {
    let (media, fs) = new_fs(64 * MIB);
    let f = fs.mknod(&C, ROOT_INO, b"leased", 0o100644, 0).unwrap();
    let data: Vec<u8> = (0..64 * 4096u32).map(|i| (i % 251) as u8).collect();
    fs.write(&C, f.ino, 0, &data).unwrap();
    let (lease, _) = fs.map_direct(f.ino, 0, data.len() as u64).unwrap();
    let (f1, f2) = (Arc::clone(&fs), Arc::clone(&fs));
    let truncate = SetAttr {
        size: Some(0),
        ..SetAttr::default()
    };
    // The truncate stops with its frees deferred but not committed; the lease ends.
    let (truncated, ended) = interleave(
        "victim-lease",
        "commit",
        fail_commit,
        Duration::from_millis(500),
        move || f1.setattr(&C, f.ino, &truncate),
        move || f2.end_lease(lease),
    );
    assert!(matches!(truncated, Err(Error::NoSpace)));
    ended.unwrap();
    // Fill the free space: any block wrongly freed is handed to this file.
    let g = fs.mknod(&C, ROOT_INO, b"filler", 0o100644, 0).unwrap();
    let mut off = 0u64;
    while fs.write(&C, g.ino, off, &[0xee; 256 * 1024]).is_ok() {
        off += 256 * 1024;
    }
    let mut back = Vec::new();
    fs.read(f.ino, 0, data.len() as u32, &mut |d| {
        back.extend_from_slice(d)
    })
    .unwrap();
    assert!(
        back == data,
        "the leased file's blocks were freed and reused"
    );
    fs.unlink(ROOT_INO, b"filler").unwrap();
    fs.forget(g.ino, 1);
    fs.shutdown().unwrap();
    check_clean(&media);
}

/// Issue item 7: `open` counted the open after its lock was gone, while the last release
/// of the same unlinked file checked the count and freed its data.
#[test]
fn an_open_racing_the_last_release_of_an_unlinked_file_keeps_its_data() {
    let (media, fs) = new_fs(64 * MIB);
    let f = fs.mknod(&C, ROOT_INO, b"f", 0o100644, 0).unwrap();
    fs.write(&C, f.ino, 0, b"still here").unwrap();
    fs.open(f.ino, libc::O_RDWR).unwrap();
    fs.unlink(ROOT_INO, b"f").unwrap();
    fs.forget(f.ino, 1); // only the open keeps it now (as a handle-based reopen would)
    let (f1, f2) = (Arc::clone(&fs), Arc::clone(&fs));
    // A second open stops between reading the inode and counting itself; the first
    // handle's release (the last, it believes) runs meanwhile.
    let (opened, ()) = interleave(
        "victim-open",
        "open.before_count",
        || Ok(()),
        Duration::from_millis(300),
        move || f1.open(f.ino, libc::O_RDWR),
        move || f2.release(f.ino),
    );
    match opened {
        Ok(_) => {
            let mut back = Vec::new();
            fs.read(f.ino, 0, 100, &mut |d| back.extend_from_slice(d))
                .unwrap();
            assert_eq!(back, b"still here", "an open file's data was freed");
            fs.release(f.ino);
        }
        // The release won: the inode is gone and the open says so.
        Err(e) => assert!(matches!(e, Error::NotFound), "{e}"),
    }
    assert!(fs.orphans().unwrap().is_empty());
    fs.shutdown().unwrap();
    check_clean(&media);
}

/// Issue item 6: a failed commit or rollback returned its slot, in an unknown state, to
/// the free list, and the mount carried on.
#[test]
fn a_failed_commit_stops_every_later_change_and_the_next_mount_recovers() {
    let dev = Arc::new(RecordingDevice::new(64 * MIB));
    format(dev.as_ref(), &MkfsOptions::default()).unwrap();
    let inner: Arc<dyn Media> = dev.clone();
    let fs = Fs::mount(Arc::clone(&inner), MountOptions::default()).unwrap();
    fs.mknod(&C, ROOT_INO, b"before", 0o100644, 0).unwrap();
    dev.fail_flushes_after(Some(0));
    assert!(fs.mknod(&C, ROOT_INO, b"during", 0o100644, 0).is_err());
    dev.fail_flushes_after(None);
    // The media works again, but this mount stays stopped: read-only, reads still served.
    assert!(fs.is_read_only());
    let e = fs.mknod(&C, ROOT_INO, b"after", 0o100644, 0).unwrap_err();
    assert_eq!(e.errno(), libc::EROFS, "{e}");
    assert_eq!(
        fs.write(&C, ROOT_INO, 0, b"x").unwrap_err().errno(),
        libc::EROFS
    );
    assert!(fs.lookup(ROOT_INO, b"before").is_ok());
    // More threads than slots: none of them waits for the lost slot.
    let progress = Progress::default();
    let fs = Arc::new(fs);
    let workers: Vec<Box<dyn FnOnce() + Send>> = (0..8)
        .map(|t| {
            let (fs, progress) = (Arc::clone(&fs), progress.clone());
            Box::new(move || {
                for i in 0..50 {
                    let name = format!("t{t}-{i}");
                    assert!(
                        fs.mknod(&C, ROOT_INO, name.as_bytes(), 0o100644, 0)
                            .is_err()
                    );
                    progress.tick();
                }
            }) as Box<dyn FnOnce() + Send>
        })
        .collect();
    run_watched("poisoned", &progress, workers);
    drop(fs);
    // The next mount recovers: "before" is there, "during" is not, the checker is happy.
    let fs = Fs::mount(Arc::clone(&inner), MountOptions::default()).unwrap();
    assert!(fs.lookup(ROOT_INO, b"before").is_ok());
    assert!(matches!(
        fs.lookup(ROOT_INO, b"during"),
        Err(Error::NotFound)
    ));
    fs.mknod(&C, ROOT_INO, b"after", 0o100644, 0).unwrap();
    fs.shutdown().unwrap();
    check_clean(&inner);
}

/// What one stress worker believes about the files it owns: bytes `0..zero_from` hold
/// `fill`, bytes `zero_from..size` are zeros (a punched tail).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Expect {
    ino: u64,
    fill: u8,
    size: u64,
    zero_from: u64,
}

impl Expect {
    fn matches(&self, got: &[u8]) -> bool {
        got.len() as u64 == self.size
            && got.iter().enumerate().all(|(i, &b)| {
                b == if (i as u64) < self.zero_from {
                    self.fill
                } else {
                    0
                }
            })
    }
}

/// A worker's names: (directory, name) -> what the file holds.
type Names = BTreeMap<(u64, String), Expect>;

/// A stress worker's view: its names, the kernel references it holds (one per create,
/// link and lookup reply, as the kernel counts them), and its open handles.
#[derive(Default)]
struct Worker {
    names: Names,
    lookups: HashMap<u64, u64>,
    /// (inode, lease) per open handle; the inode's names may be gone.
    open: Vec<(u64, Option<u64>)>,
}

impl Worker {
    fn referenced(&mut self, ino: u64) {
        *self.lookups.entry(ino).or_default() += 1;
    }

    /// Forgets `ino` when nothing of this worker refers to it any more (the kernel's
    /// FORGET after the last name and handle are gone).
    fn settle(&mut self, fs: &Fs, ino: u64) {
        if !self.names.values().any(|v| v.ino == ino) && !self.open.iter().any(|(i, _)| *i == ino) {
            if let Some(n) = self.lookups.remove(&ino) {
                fs.forget(ino, n);
            }
        }
    }

    fn set_all(&mut self, ino: u64, fill: u8, size: u64, zero_from: u64) {
        for v in self.names.values_mut().filter(|v| v.ino == ino) {
            v.fill = fill;
            v.size = size;
            v.zero_from = zero_from;
        }
    }
}

/// Seeded random operations in shared directories by more threads than slots: creates,
/// writes, truncates, punches, links, renames, xattrs, unlinks of open files, leases and
/// forgets. Each worker owns its names (so it can keep an exact model of them) but every
/// directory is shared, so the directories, the orphan tree, the deferred-free inode, the
/// allocator and the slots are all contended. Then the checker, and every model against the
/// file system.
fn stress(seed: u64, threads: usize, ops_per_thread: usize) {
    let (media, fs) = new_fs(64 * MIB);
    let dirs: Vec<u64> = (0..3)
        .map(|d| {
            fs.mkdir(&C, ROOT_INO, format!("d{d}").as_bytes(), 0o755)
                .unwrap()
                .ino
        })
        .collect();
    let progress = Progress::default();
    let models: Arc<Mutex<Vec<Names>>> = Arc::new(Mutex::new(vec![BTreeMap::new(); threads]));
    let workers: Vec<Box<dyn FnOnce() + Send>> = (0..threads)
        .map(|t| {
            let (fs, progress, dirs, models) = (
                Arc::clone(&fs),
                progress.clone(),
                dirs.clone(),
                Arc::clone(&models),
            );
            Box::new(move || {
                let mut rng = StdRng::seed_from_u64(seed ^ (t as u64).wrapping_mul(0x9e37_79b9));
                let mut w = Worker::default();
                let mut counter = 0u64;
                let truncate = SetAttr {
                    size: Some(0),
                    ..SetAttr::default()
                };
                for _ in 0..ops_per_thread {
                    let names: Vec<(u64, String)> = w.names.keys().cloned().collect();
                    let pick = |rng: &mut StdRng| names[rng.random_range(0..names.len())].clone();
                    counter += 1;
                    let fresh = (
                        dirs[rng.random_range(0..dirs.len())],
                        format!("t{t}-{counter}"),
                    );
                    match rng.random_range(0..12) {
                        0 | 1 if names.len() < 40 => {
                            match fs.mknod(&C, fresh.0, fresh.1.as_bytes(), 0o100644, 0) {
                                Ok(a) => {
                                    w.referenced(a.ino);
                                    let e = Expect {
                                        ino: a.ino,
                                        fill: 0,
                                        size: 0,
                                        zero_from: 0,
                                    };
                                    w.names.insert(fresh, e);
                                }
                                Err(Error::NoSpace | Error::NoInodes) => {}
                                Err(e) => panic!("seed {seed}: create: {e}"),
                            }
                        }
                        2 | 3 if !names.is_empty() => {
                            // Rewrite the whole file with one value (every link sees it).
                            let e = w.names[&pick(&mut rng)].clone();
                            let fill = rng.random_range(1..=255u8);
                            let size = rng.random_range(0..64 * 1024u64);
                            match fs.setattr(&C, e.ino, &truncate) {
                                Ok(_) => w.set_all(e.ino, 0, 0, 0),
                                Err(Error::NoSpace) => continue,
                                Err(err) => panic!("seed {seed}: truncate: {err}"),
                            }
                            match fs.write(&C, e.ino, 0, &vec![fill; size as usize]) {
                                Ok(_) => w.set_all(e.ino, fill, size, size),
                                Err(Error::NoSpace) => {}
                                Err(err) => panic!("seed {seed}: write: {err}"),
                            }
                        }
                        4 if !names.is_empty() => {
                            // Punch the tail after the first block: it reads back as zeros.
                            let e = w.names[&pick(&mut rng)].clone();
                            let keep = 4096u64;
                            if e.size > keep {
                                match fs.fallocate(&C, e.ino, keep, e.size - keep, 0x03) {
                                    Ok(()) => {
                                        w.set_all(e.ino, e.fill, e.size, e.zero_from.min(keep))
                                    }
                                    Err(Error::NoSpace) => {}
                                    Err(err) => panic!("seed {seed}: punch: {err}"),
                                }
                            }
                        }
                        5 if !names.is_empty() => {
                            let e = w.names[&pick(&mut rng)].clone();
                            match fs.link(e.ino, fresh.0, fresh.1.as_bytes()) {
                                Ok(_) => {
                                    w.referenced(e.ino);
                                    w.names.insert(fresh, e);
                                }
                                Err(Error::NoSpace) => {}
                                Err(err) => panic!("seed {seed}: link: {err}"),
                            }
                        }
                        6 if !names.is_empty() => {
                            let from = pick(&mut rng);
                            // Sometimes over another of our names (the target loses a link).
                            let mut to = fresh;
                            if rng.random_bool(0.3) {
                                let other = pick(&mut rng);
                                if w.names[&other].ino != w.names[&from].ino {
                                    to = other;
                                }
                            }
                            match fs.rename(
                                &Ctx::ROOT,
                                from.0,
                                from.1.as_bytes(),
                                to.0,
                                to.1.as_bytes(),
                                0,
                            ) {
                                Ok(()) => {
                                    let e = w.names.remove(&from).unwrap();
                                    if let Some(old) = w.names.insert(to, e) {
                                        w.settle(&fs, old.ino);
                                    }
                                }
                                Err(Error::NoSpace) => {}
                                Err(err) => panic!("seed {seed}: rename: {err}"),
                            }
                        }
                        7 if !names.is_empty() => {
                            let e = w.names[&pick(&mut rng)].clone();
                            let v = vec![e.fill; rng.random_range(0..300)];
                            match fs.setxattr(e.ino, b"user.stress", &v, 0) {
                                Ok(()) | Err(Error::NoSpace) => {}
                                Err(err) => panic!("seed {seed}: setxattr: {err}"),
                            }
                        }
                        8 if !names.is_empty() => {
                            // Open (and sometimes lease), then unlink: an open orphan.
                            let k = pick(&mut rng);
                            let e = w.names[&k].clone();
                            fs.open(e.ino, libc::O_RDWR).unwrap();
                            let lease = if rng.random_bool(0.5) {
                                fs.map_direct(e.ino, 0, 1 << 20).ok().map(|(id, _)| id)
                            } else {
                                None
                            };
                            w.open.push((e.ino, lease));
                            fs.unlink(k.0, k.1.as_bytes()).unwrap_or_else(|err| {
                                panic!("seed {seed}: unlink of an open file: {err}")
                            });
                            w.names.remove(&k);
                            if !w.names.values().any(|v| v.ino == e.ino) {
                                // The open orphan keeps its data and can still be changed.
                                let got = read_back(&fs, e.ino);
                                assert!(
                                    e.matches(&got),
                                    "seed {seed}: an open orphan lost its data"
                                );
                                let _ = fs.setattr(&C, e.ino, &truncate);
                            }
                        }
                        9 if !w.open.is_empty() => {
                            // Close: end the lease, release, forget what is no longer named.
                            let (ino, lease) =
                                w.open.swap_remove(rng.random_range(0..w.open.len()));
                            if let Some(id) = lease {
                                fs.end_lease(id)
                                    .unwrap_or_else(|err| panic!("seed {seed}: end_lease: {err}"));
                            }
                            fs.release(ino);
                            w.settle(&fs, ino);
                        }
                        10 if !names.is_empty() => {
                            let k = pick(&mut rng);
                            let ino = w.names[&k].ino;
                            fs.unlink(k.0, k.1.as_bytes())
                                .unwrap_or_else(|err| panic!("seed {seed}: unlink: {err}"));
                            w.names.remove(&k);
                            w.settle(&fs, ino);
                        }
                        _ if !names.is_empty() => {
                            let k = pick(&mut rng);
                            let e = w.names[&k].clone();
                            let a = fs.lookup(k.0, k.1.as_bytes()).unwrap();
                            assert_eq!((a.ino, a.size), (e.ino, e.size), "seed {seed}: {k:?}");
                            fs.forget(a.ino, 1);
                        }
                        _ => {}
                    }
                    progress.tick();
                }
                for (ino, lease) in std::mem::take(&mut w.open) {
                    if let Some(id) = lease {
                        fs.end_lease(id).unwrap();
                    }
                    fs.release(ino);
                    w.settle(&fs, ino);
                }
                models.lock()[t] = w.names;
            }) as Box<dyn FnOnce() + Send>
        })
        .collect();
    run_watched(&format!("stress-{seed}"), &progress, workers);
    // Every worker's names are there with their contents, and nothing else is.
    let models = models.lock();
    let mut expected: HashMap<(u64, String), Expect> = HashMap::new();
    for m in models.iter() {
        expected.extend(m.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    for &dir in &dirs {
        let mut listed = Vec::new();
        fs.readdir(dir, 0, &mut |ino, _, _, name| {
            if name != b"." && name != b".." {
                listed.push((String::from_utf8(name.to_vec()).unwrap(), ino));
            }
            false
        })
        .unwrap();
        let mut want: Vec<(String, u64)> = expected
            .iter()
            .filter(|(k, _)| k.0 == dir)
            .map(|(k, v)| (k.1.clone(), v.ino))
            .collect();
        listed.sort();
        want.sort();
        assert_eq!(listed, want, "seed {seed}: directory {dir}");
    }
    for e in expected.values() {
        let got = read_back(&fs, e.ino);
        assert!(
            e.matches(&got),
            "seed {seed}: inode {} holds the wrong data",
            e.ino
        );
    }
    // The kernel's references are all forgotten: nothing is left in the orphan list.
    assert!(
        fs.orphans().unwrap().is_empty(),
        "seed {seed}: orphans left"
    );
    assert_eq!(fs.lease_count(), 0);
    fs.shutdown().unwrap();
    check_clean(&media);
}

fn read_back(fs: &Fs, ino: u64) -> Vec<u8> {
    let size = fs.getattr(ino).unwrap().size;
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let before = out.len();
        fs.read(ino, out.len() as u64, 1 << 20, &mut |d| {
            out.extend_from_slice(d)
        })
        .unwrap();
        assert!(out.len() > before, "short read");
    }
    out
}

/// The stress run CI does: `PMFS_STRESS_OPS` operations per thread (default 12,500: with
/// 8 threads, 10^5 operations), seed from `PMFS_STRESS_SEED` or the clock (printed).
#[test]
fn stress_more_threads_than_slots_with_a_watchdog_and_a_model() {
    let seed = std::env::var("PMFS_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_ns() as u64);
    let ops = std::env::var("PMFS_STRESS_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) {
            2_000
        } else {
            12_500
        });
    eprintln!(
        "stress: seed {seed} (PMFS_STRESS_SEED={seed} to repeat), 8 threads x {ops} operations"
    );
    stress(seed, 8, ops);
}

/// FS_IOC_SHUTDOWN: from the call on every operation fails with EIO (reads too), threads
/// waiting for a slot are released, and the next mount finds everything that committed.
#[test]
fn shut_down_stops_every_operation_and_the_next_mount_has_what_committed() {
    let (media, fs) = new_fs(64 * MIB);
    let f = fs.mknod(&C, ROOT_INO, b"kept", 0o100644, 0).unwrap();
    fs.write(&C, f.ino, 0, b"committed").unwrap();
    // Writers racing the shutdown: each operation either committed or failed with EIO.
    let progress = Progress::default();
    let acked: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<Box<dyn FnOnce() + Send>> = (0..8)
        .map(|t| {
            let (fs, progress, acked) = (Arc::clone(&fs), progress.clone(), Arc::clone(&acked));
            Box::new(move || {
                for i in 0.. {
                    let name = format!("t{t}-{i}");
                    match fs.mknod(&C, ROOT_INO, name.as_bytes(), 0o100644, 0) {
                        Ok(_) => acked.lock().push(name),
                        Err(e) => {
                            assert_eq!(e.errno(), libc::EIO, "{e}");
                            return;
                        }
                    }
                    progress.tick();
                }
            }) as Box<dyn FnOnce() + Send>
        })
        .collect();
    let stopper = {
        let fs = Arc::clone(&fs);
        Box::new(move || {
            std::thread::sleep(Duration::from_millis(50));
            fs.shut_down();
        }) as Box<dyn FnOnce() + Send>
    };
    run_watched(
        "shutdown",
        &progress,
        workers.into_iter().chain([stopper]).collect(),
    );
    for e in [
        fs.getattr(f.ino).unwrap_err(),
        fs.lookup(ROOT_INO, b"kept").unwrap_err(),
        fs.read(f.ino, 0, 10, &mut |_| {}).unwrap_err(),
        fs.write(&C, f.ino, 0, b"x").map(drop).unwrap_err(),
        fs.readdir(ROOT_INO, 0, &mut |_, _, _, _| false)
            .unwrap_err(),
    ] {
        assert_eq!(e.errno(), libc::EIO, "{e}");
    }
    fs.shutdown().unwrap(); // unmount after a shutdown is quiet
    drop(fs);
    let fs = Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap();
    let a = fs.lookup(ROOT_INO, b"kept").unwrap();
    let mut back = Vec::new();
    fs.read(a.ino, 0, 100, &mut |d| back.extend_from_slice(d))
        .unwrap();
    assert_eq!(back, b"committed");
    for name in acked.lock().iter() {
        assert!(
            fs.lookup(ROOT_INO, name.as_bytes()).is_ok(),
            "{name} was acknowledged"
        );
    }
    fs.shutdown().unwrap();
    check_clean(&media);
}
