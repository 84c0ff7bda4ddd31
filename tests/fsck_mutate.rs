//! Hostile images, deterministically: a small valid image gets random bytes of its metadata
//! (superblocks, journal headers, bitmaps, inode table, tree nodes, xattr and symlink
//! blocks) flipped, with a fixed seed, 500 times (`PMFS_MUTATIONS` changes the count,
//! `PMFS_MUTATION_SEED` the seed). On each, the checker, fsck's diagnosis, a mount (with a
//! walk of the tree and reads), and a full repair must return, Ok or Err, without a panic
//! and within a time bound. A repair that reports success must leave a file system that
//! checks clean and mounts.
//!
//! The same target, open-ended and coverage-guided, is fuzz/fuzz_targets/mount_and_check.rs.
#![allow(clippy::unwrap_used)]

#[path = "../fsck/tests/common/mod.rs"]
mod common;

use pmfs::device::{Media, RecordingDevice};
use pmfs::fs::{Fs, MountOptions};
use pmfs::repair::{RepairMode, diagnose, repair};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Debug, Default)]
struct Outcome {
    check_ok: bool,
    mount_ok: bool,
    repaired_clean: bool,
    repair_err: Option<String>,
    left: usize,
}

/// Mounts and walks everything reachable, reading a little of every file.
fn exercise(media: &Arc<dyn Media>) -> bool {
    let Ok(fs) = Fs::mount(Arc::clone(media), MountOptions::default()) else {
        return false;
    };
    let mut stack = vec![1u64];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        let mut names = Vec::new();
        let _ = fs.readdir(dir, 2, &mut |_, _, _, name| {
            names.push(name.to_vec());
            false
        });
        for n in names {
            seen += 1;
            if seen > 10_000 {
                break;
            }
            let Ok(a) = fs.lookup(dir, &n) else { continue };
            match a.file_type() {
                0o040000 => stack.push(a.ino),
                0o100000 => {
                    let _ = fs.read(a.ino, 0, 8192, &mut |_| {});
                    let _ = fs.listxattr(a.ino);
                }
                0o120000 => {
                    let _ = fs.readlink(a.ino);
                }
                _ => {}
            }
        }
    }
    let _ = fs.shutdown();
    true
}

fn run_one(img: Vec<u8>) -> Outcome {
    let mut o = Outcome::default();
    let media: Arc<dyn Media> = Arc::new(RecordingDevice::from_image(img.clone()));
    o.check_ok = pmfs::check::check(&media).is_ok_and(|r| r.problems.is_empty());
    let _ = diagnose(&media);
    o.mount_ok = exercise(&media);
    // Repair a fresh copy.
    let media: Arc<dyn Media> = Arc::new(RecordingDevice::from_image(img));
    let Ok(report) = diagnose(&media) else {
        return o;
    };
    match repair(&media, &report, RepairMode::all()) {
        Ok(out) => {
            o.left = out.report.problems.len();
            o.repaired_clean = o.left == 0;
            if o.repaired_clean {
                assert!(
                    diagnose(&media).is_ok_and(|r| r.problems.is_empty()),
                    "diagnose disagrees with repair's final check"
                );
                assert!(exercise(&media), "a repaired file system does not mount");
            }
        }
        Err(e) => o.repair_err = Some(e.to_string()),
    }
    o
}

#[test]
fn mutated_metadata_never_panics() {
    let count: u64 = std::env::var("PMFS_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let seed: u64 = std::env::var("PMFS_MUTATION_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_f5c4);
    let base = common::build_sized(16 * common::MIB);
    let regions = base.metadata_regions();
    let mut rng = Rng(seed | 1);
    let (mut check_ok, mut mount_ok, mut clean, mut left, mut errs) = (0, 0, 0, 0, 0);
    let mut errors: Vec<String> = Vec::new();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for it in 0..count {
        let mut img = base.bytes.clone();
        let n = 1 + rng.below(8);
        let mut what = Vec::new();
        for _ in 0..n {
            let (start, len) = regions[rng.below(regions.len() as u64) as usize];
            let off = (start + rng.below(len)) as usize;
            let old = img[off];
            img[off] = match rng.below(4) {
                0 => old ^ (1 << rng.below(8)),
                1 => rng.next() as u8,
                2 => 0,
                _ => 0xff,
            };
            what.push(format!("{off:#x}:{old:#04x}->{:#04x}", img[off]));
        }
        let (tx, rx) = mpsc::channel();
        let t0 = Instant::now();
        let worker = std::thread::spawn(move || {
            let o = run_one(img);
            let _ = tx.send(o);
        });
        let o = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(o) => o,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("iteration {it} (seed {seed:#x}) did not finish in 120 s: {what:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let e = worker.join().err().map(|p| {
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
                        .unwrap_or_default()
                });
                panic!("iteration {it} (seed {seed:#x}) panicked: {e:?}; mutations {what:?}")
            }
        };
        let _ = worker.join();
        slowest = slowest.max(t0.elapsed());
        check_ok += u32::from(o.check_ok);
        mount_ok += u32::from(o.mount_ok);
        clean += u32::from(o.repaired_clean);
        if o.left > 0 {
            left += 1;
        }
        if let Some(e) = o.repair_err {
            errs += 1;
            if errors.len() < 10 {
                errors.push(format!("iteration {it}: {e} ({what:?})"));
            }
        }
    }
    eprintln!(
        "{count} mutated images in {:.1?} (slowest {slowest:.2?}): check clean {check_ok}, mounted {mount_ok}, \
         repaired to clean {clean}, repair left problems {left}, repair refused {errs}",
        started.elapsed()
    );
    for e in &errors {
        eprintln!("  {e}");
    }
    assert_eq!(left, 0, "repairs that left problems behind");
}
