//! Crafted hostile trees (fsck/tests/common/mod.rs, `make_hostile`): a DAG of
//! `MAX_TREE_LEVEL` levels whose every entry points at the same child (~254^7 paths), the
//! same over an empty leaf, leaves out of key order, and a cycle across levels, each as the
//! directory tree of /big, the extent tree of /frag and the orphan list of a 64 MiB image.
//! On each: the checker reports the tree, fsck's repair rebuilds it, and the core's walks of
//! it (readdir, truncate, unlink, the orphan scan at mount) give EIO, all within a deadline
//! (past it the test aborts: a hang is a failure) and a bound on peak memory.
#![allow(clippy::unwrap_used)]

#[path = "../fsck/tests/common/mod.rs"]
mod common;

use common::{Image, Shape, Target};
use pmfs::check::{ProblemKind, check};
use pmfs::error::Error;
use pmfs::fs::{Ctx, Fs, MountOptions, SetAttr};
use pmfs::repair::{RepairMode, diagnose, repair};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const C: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 0,
};
/// Every step must end within this (measured), and the watchdog aborts at 12 times it.
const STEP: Duration = Duration::from_secs(5);
/// Peak memory a step may add over the resident size before it, in KiB. The image is 64
/// MiB; each step keeps at most a couple of copies of it.
const MEMORY_KIB: u64 = 384 * 1024;

/// The steps measure this process's peak memory: one scenario at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one step under the deadline and the memory bound; returns its result.
fn step<T>(what: &str, f: impl FnOnce() -> T) -> T {
    common::reset_peak_rss();
    let before = common::rss_kib();
    let start = Instant::now();
    let out = common::within(what, 12 * STEP.as_secs(), f);
    let took = start.elapsed();
    let grew = common::peak_rss_kib().saturating_sub(before);
    eprintln!("{what}: {took:?}, peak memory +{grew} KiB");
    assert!(took < STEP, "{what}: took {took:?}");
    assert!(grew < MEMORY_KIB, "{what}: peak memory grew by {grew} KiB");
    out
}

fn hostile(base: &Image, t: Target, shape: Shape) -> Image {
    let mut img = base.clone();
    img.make_hostile(t, shape);
    img
}

fn expect_eio<T: std::fmt::Debug>(what: &str, r: Result<T, Error>) {
    match r {
        Err(e) => assert_eq!(e.errno(), libc::EIO, "{what}: {e}"),
        Ok(v) => panic!("{what}: succeeded ({v:?}) on a hostile tree"),
    }
}

/// The checker reports the tree as damaged; fsck's repair then leaves a clean file system.
fn check_and_repair(base: &Image, t: Target, shape: Shape) {
    let img = hostile(base, t, shape);
    let owner = img.tree_of(t).1;
    let name = format!("{t:?}/{shape:?}");
    let media = img.media();
    let report = step(&format!("{name}: check"), || check(&media)).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::BadTree(owner)),
        "{name}: tree not reported: {:#?}",
        report.problems
    );
    step(&format!("{name}: diagnose + repair"), || {
        let report = diagnose(&media).unwrap();
        repair(&media, &report, RepairMode::all()).unwrap()
    });
    let after = step(&format!("{name}: check after repair"), || check(&media)).unwrap();
    assert!(
        after.problems.is_empty(),
        "{name}: left after repair: {:#?}",
        after.problems
    );
    let fs = Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap();
    fs.readdir(1, 0, &mut |_, _, _, _| false).unwrap();
    fs.shutdown().unwrap();
}

fn every_shape(t: Target) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let base = common::build();
    for shape in [
        Shape::Dag,
        Shape::DagOfEmptyLeaves,
        Shape::OutOfOrder,
        Shape::Cycle,
    ] {
        let name = format!("{t:?}/{shape:?}");
        let img = hostile(&base, t, shape);
        let media = img.media();
        match t {
            Target::Orphans => {
                expect_eio(
                    &format!("{name}: mount"),
                    step(&format!("{name}: mount"), || {
                        Fs::mount(Arc::clone(&media), MountOptions::default()).map(|_| ())
                    }),
                );
            }
            Target::Dir => {
                let fs = Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap();
                let big = base.ino["/big"];
                let mut n = 0u64;
                let r = step(&format!("{name}: readdir"), || {
                    // false: the reply buffer is not full, go on.
                    fs.readdir(big, 0, &mut |_, _, _, _| {
                        n += 1;
                        false
                    })
                });
                expect_eio(&format!("{name}: readdir ({n} entries)"), r);
                let r = step(&format!("{name}: rmdir"), || fs.rmdir(1, b"big"));
                assert!(r.is_err(), "{name}: rmdir of a damaged directory succeeded");
            }
            Target::Extents => {
                let fs = Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap();
                let frag = base.ino["/frag"];
                for size in [4096 * 3, 0] {
                    let s = SetAttr {
                        size: Some(size),
                        ..SetAttr::default()
                    };
                    let r = step(&format!("{name}: truncate to {size}"), || {
                        fs.setattr(&C, frag, &s)
                    });
                    expect_eio(&format!("{name}: truncate to {size}"), r);
                }
                // The unlink itself succeeds: a file with an extent tree becomes an orphan
                // and is freed after the commit, which fails (logged) and leaves it on the
                // orphan list...
                step(&format!("{name}: unlink"), || fs.unlink(1, b"frag")).unwrap();
                assert!(fs.lookup(1, b"frag").is_err());
                // (The image's own orphan was freed by the mount.)
                assert_eq!(fs.orphans().unwrap(), vec![frag], "{name}");
                drop(fs);
                // ...so the next mount cannot free it either: it mounts (one damaged
                // orphan does not keep the file system from mounting), logs it, and
                // leaves it on the list for fsck.
                let fs = step(&format!("{name}: mount with the file orphaned"), || {
                    Fs::mount(Arc::clone(&media), MountOptions::default())
                })
                .unwrap_or_else(|e| panic!("{name}: mount with a damaged orphan: {e}"));
                assert_eq!(fs.orphans().unwrap(), vec![frag], "{name}");
            }
        }
        check_and_repair(&base, t, shape);
    }
}

#[test]
fn hostile_directory_trees_give_eio_in_bounded_time() {
    every_shape(Target::Dir);
}

#[test]
fn hostile_extent_trees_give_eio_in_bounded_time() {
    every_shape(Target::Extents);
}

#[test]
fn hostile_orphan_lists_fail_the_mount_in_bounded_time() {
    every_shape(Target::Orphans);
}

/// A root collapse follows single-entry nodes: one pointing at itself, reached only by the
/// collapse, must end in an error, not a loop.
#[test]
fn a_collapse_into_a_self_referencing_node_is_an_error() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut img = common::build();
    let (kind, owner, _) = img.tree_of(Target::Dir);
    let id = (kind, owner);
    // Root (level 2): [(0, A), (k, B)]; A (level 1): [(0, A)]; B (level 1): [(k, L)];
    // L: the entry of one name of /big. Unlinking that name empties L and B, and the root
    // collapses into A, whose only child is A.
    let name = b"entry-0007";
    let child = {
        let fs = Fs::mount(img.media(), MountOptions::default()).unwrap();
        let ino = fs.lookup(owner, name).unwrap().ino;
        fs.shutdown().unwrap();
        ino
    };
    let at = img.find_entry(child, name) as u64;
    // The record starts 10 bytes (key, length) before the payload.
    let rec_at = (at - 10) as usize;
    let key = img.u64_at(rec_at as u64);
    let len = u16::from_le_bytes([img.bytes[rec_at + 8], img.bytes[rec_at + 9]]) as usize;
    let rec = img.bytes[rec_at..rec_at + 10 + len].to_vec();
    let b = img.take_blocks(4);
    let (l, a, bn, r) = (b[0], b[1], b[2], b[3]);
    img.put_node(l, id, 0, &[], (1, &rec));
    img.put_node(bn, id, 1, &[(key, l)], (0, &[]));
    img.put_node(a, id, 1, &[(0, a)], (0, &[]));
    img.put_node(r, id, 2, &[(0, a), (key, bn)], (0, &[]));
    img.set_root(Target::Dir, r);
    let media = img.media();
    let fs = Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap();
    let r = step("collapse into a self-reference: unlink", || {
        fs.unlink(owner, name)
    });
    expect_eio("collapse into a self-reference: unlink", r);
}

/// A chain of directories 2,500 deep with 250-byte names: the checker and fsck's repair keep
/// a path per directory for their messages, and kept whole those would hold ~800 MB (the
/// depth squared times the name length); capped at PATH_MAX they hold ~10 MB.
#[test]
fn a_deep_directory_chain_keeps_check_and_repair_memory_bounded() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const DEPTH: usize = 2500;
    let dev = Arc::new(pmfs::device::RecordingDevice::new(64 * common::MIB));
    pmfs::mkfs::format(dev.as_ref(), &pmfs::mkfs::MkfsOptions::default()).unwrap();
    let media: Arc<dyn pmfs::device::Media> = dev;
    let fs = Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap();
    let name = [b'd'; 250];
    let mut parent = 1;
    for _ in 0..DEPTH {
        parent = fs.mkdir(&C, parent, &name, 0o755).unwrap().ino;
        fs.forget(parent, 1);
    }
    fs.shutdown().unwrap();
    drop(fs);
    let report = step("check of a 2,500-deep chain", || check(&media)).unwrap();
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert_eq!(report.directories, DEPTH as u64 + 1);
    let deepest = report.path(parent).unwrap();
    assert!(
        deepest.len() <= pmfs::check::MESSAGE_PATH_MAX && deepest.starts_with('…'),
        "{}",
        deepest.len()
    );
    assert!(
        deepest.ends_with(&format!("/{}", "d".repeat(250))),
        "{deepest}"
    );
    step("diagnose + repair of a 2,500-deep chain", || {
        let report = diagnose(&media).unwrap();
        repair(&media, &report, RepairMode::all()).unwrap()
    });
}
