//! Concurrency through a real mount: more FUSE threads than the device has journal slots (a
//! 128 MiB image has 4), with the kernel's own FORGETs, under a progress watchdog. A hang
//! fails the test with what stalled; it never runs into a timeout. Needs root and /dev/fuse.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// No file operation finishing for this long is a hang.
const STALL: Duration = Duration::from_secs(15);

/// Runs `workers` and waits; panics if the shared counter stops moving for [`STALL`].
fn run_watched(what: &str, progress: &Arc<AtomicU64>, workers: Vec<Box<dyn FnOnce() + Send>>) {
    let handles: Vec<_> = workers.into_iter().map(std::thread::spawn).collect();
    let mut last = (progress.load(Ordering::Relaxed), Instant::now());
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        let now = progress.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > STALL {
            panic!("{what}: no file operation finished for {STALL:?} after {now}: the mount hangs");
        }
    }
    for h in handles {
        if let Err(p) = h.join() {
            std::panic::resume_unwind(p);
        }
    }
}

/// Checks an unmounted image with the consistency checker.
fn check_image(path: &Path) {
    let dev = Device::open(
        path,
        &OpenOptions {
            read_only: true,
            wait_busy: Some(Duration::from_secs(10)),
        },
    )
    .unwrap();
    let media: Arc<dyn pmfs::device::Media> = Arc::new(dev);
    let report = pmfs::check::check(&media).unwrap();
    assert!(
        report.problems.is_empty(),
        "checker: {:#?}",
        report.problems
    );
}

/// Issue 12, item 1 as a user met it: eight `rm -rf` in parallel of 2,500 files each on a
/// 128 MiB image mounted with eight threads.
#[test]
fn eight_parallel_rm_rf_on_a_small_device_finish() {
    can_mount();
    let img = Image::new("rmrf", 128 * MIB);
    let m = Mount::new(&img, "threads=8");
    let progress = Arc::new(AtomicU64::new(0));
    let make: Vec<Box<dyn FnOnce() + Send>> = (0..8)
        .map(|d| {
            let (dir, progress) = (m.path(&format!("d{d}")), Arc::clone(&progress));
            Box::new(move || {
                fs::create_dir(&dir).unwrap();
                for i in 0..2500 {
                    fs::write(dir.join(format!("file-{i}")), b"x").unwrap();
                    progress.fetch_add(1, Ordering::Relaxed);
                }
            }) as Box<dyn FnOnce() + Send>
        })
        .collect();
    run_watched("creating 8 x 2,500 files", &progress, make);
    let remove: Vec<Box<dyn FnOnce() + Send>> = (0..8)
        .map(|d| {
            let (dir, progress) = (m.path(&format!("d{d}")), Arc::clone(&progress));
            Box::new(move || {
                // rm -rf, one entry at a time so the watchdog sees progress.
                for e in fs::read_dir(&dir).unwrap() {
                    fs::remove_file(e.unwrap().path()).unwrap();
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                fs::remove_dir(&dir).unwrap();
            }) as Box<dyn FnOnce() + Send>
        })
        .collect();
    run_watched("8 parallel rm -rf", &progress, remove);
    assert_eq!(fs::read_dir(&m.mountpoint).unwrap().count(), 0);
    m.unmount();
    check_image(&img.path);
}

/// One worker's files: name -> (fill byte, size).
type Files = BTreeMap<PathBuf, (u8, u64)>;

/// Seeded random operations by 12 threads in 3 shared directories through a mount with 8
/// FUSE threads on a 4-slot device: create, write, truncate, punch, rename (over its own
/// names too), link, setxattr, unlink of open files (read and written after), and the
/// kernel's FORGETs. Each worker checks its own names at the end; then the checker.
#[test]
fn random_operations_through_a_mount_with_more_threads_than_slots() {
    can_mount();
    let seed = std::env::var("PMFS_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_ns() as u64);
    eprintln!("mount stress: seed {seed} (PMFS_STRESS_SEED={seed} to repeat)");
    let img = Image::new("stress", 128 * MIB);
    let m = Mount::new(&img, "threads=8");
    let dirs: Vec<PathBuf> = (0..3).map(|d| m.path(&format!("d{d}"))).collect();
    for d in &dirs {
        fs::create_dir(d).unwrap();
    }
    let progress = Arc::new(AtomicU64::new(0));
    let workers: Vec<Box<dyn FnOnce() + Send>> = (0..12u64)
        .map(|t| {
            let (dirs, progress) = (dirs.clone(), Arc::clone(&progress));
            Box::new(move || {
                let mut rng = StdRng::seed_from_u64(seed ^ t.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let mut files = Files::new();
                for n in 0..1000u32 {
                    let names: Vec<PathBuf> = files.keys().cloned().collect();
                    let fresh = dirs[rng.random_range(0..dirs.len())].join(format!("t{t}-{n}"));
                    let pick = |rng: &mut StdRng| names[rng.random_range(0..names.len())].clone();
                    match rng.random_range(0..10) {
                        0 | 1 if names.len() < 30 => {
                            fs::write(&fresh, b"").unwrap();
                            files.insert(fresh, (0, 0));
                        }
                        2 | 3 if !names.is_empty() => {
                            let p = pick(&mut rng);
                            let (fill, size) =
                                (rng.random_range(1..=255u8), rng.random_range(0..40_000u64));
                            fs::write(&p, vec![fill; size as usize]).unwrap();
                            set_linked(&mut files, &p, fill, size);
                        }
                        4 if !names.is_empty() => {
                            // Truncate down (a punch of the tail, as the model sees it).
                            let p = pick(&mut rng);
                            let (fill, size) = files[&p];
                            let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
                            f.set_len(size / 2).unwrap();
                            set_linked(&mut files, &p, fill, size / 2);
                        }
                        5 if !names.is_empty() => {
                            let p = pick(&mut rng);
                            fs::hard_link(&p, &fresh).unwrap();
                            let v = files[&p];
                            files.insert(fresh, v);
                        }
                        6 if !names.is_empty() => {
                            let p = pick(&mut rng);
                            let to = if rng.random_bool(0.3) {
                                pick(&mut rng)
                            } else {
                                fresh
                            };
                            if same_file(&p, &to) {
                                continue; // rename between links of one file does nothing
                            }
                            fs::rename(&p, &to).unwrap();
                            let v = files.remove(&p).unwrap();
                            files.insert(to, v);
                        }
                        7 if !names.is_empty() => {
                            let p = pick(&mut rng);
                            xattr::set(&p, "user.stress", &vec![7u8; rng.random_range(0..200)])
                                .unwrap();
                        }
                        8 if !names.is_empty() => {
                            // Unlink an open file, then use it: it keeps its data.
                            let p = pick(&mut rng);
                            let (fill, size) = files[&p];
                            let mut f = fs::OpenOptions::new()
                                .read(true)
                                .write(true)
                                .open(&p)
                                .unwrap();
                            let ino = inode_of(&p).unwrap();
                            fs::remove_file(&p).unwrap();
                            files.remove(&p);
                            let mut got = Vec::new();
                            f.read_to_end(&mut got).unwrap();
                            assert!(
                                got.len() as u64 == size && got.iter().all(|&b| b == fill),
                                "seed {seed}: an open unlinked file lost its data"
                            );
                            f.write_all_at(b"after", 0).unwrap();
                            f.flush().unwrap();
                            // Other names of the inode see that write: the model says one
                            // value per file, so those names go too.
                            let others: Vec<PathBuf> = files
                                .keys()
                                .filter(|q| inode_of(q) == Some(ino))
                                .cloned()
                                .collect();
                            for q in others {
                                fs::remove_file(&q).unwrap();
                                files.remove(&q);
                            }
                        }
                        _ if !names.is_empty() => {
                            let p = pick(&mut rng);
                            fs::remove_file(&p).unwrap();
                            files.remove(&p);
                        }
                        _ => {}
                    }
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                for (p, (fill, size)) in &files {
                    let got = fs::read(p).unwrap();
                    assert!(
                        got.len() as u64 == *size && got.iter().all(|b| b == fill),
                        "seed {seed}: {} holds the wrong data",
                        p.display()
                    );
                }
            }) as Box<dyn FnOnce() + Send>
        })
        .collect();
    run_watched(&format!("mount stress (seed {seed})"), &progress, workers);
    m.unmount();
    check_image(&img.path);
}

fn inode_of(p: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(p).ok().map(|m| m.ino())
}

/// True when two existing names are links to one inode.
fn same_file(a: &Path, b: &Path) -> bool {
    matches!((inode_of(a), inode_of(b)), (Some(x), Some(y)) if x == y)
}

fn set_linked(files: &mut Files, p: &Path, fill: u8, size: u64) {
    let targets: Vec<PathBuf> = files.keys().filter(|q| same_file(q, p)).cloned().collect();
    for q in targets {
        files.insert(q, (fill, size));
    }
}
