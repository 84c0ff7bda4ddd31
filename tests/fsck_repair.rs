//! fsck's engine (`pmfs::repair`) on every damage class, on the in-memory device: the
//! diagnosis finds the damage, a repair fixes it, the check afterwards is clean, a second
//! repair finds nothing to do, and the file system mounts. The same classes run through the
//! fsck.pmfs binary in fsck/tests/fsck_damage.rs.
#![allow(clippy::unwrap_used)]

#[path = "../fsck/tests/common/mod.rs"]
mod common;

use pmfs::check::check;
use pmfs::fs::{Fs, MountOptions};
use pmfs::repair::{Class, RepairMode, diagnose, repair};
use std::sync::Arc;

#[test]
fn every_damage_class_is_found_and_repaired() {
    let base = common::build();
    let mut failures = Vec::new();
    for d in common::damages() {
        let mut img = base.clone();
        (d.apply)(&mut img);
        let media = img.media();
        let report = match diagnose(&media) {
            Ok(r) => r,
            Err(e) => {
                if !d.fatal {
                    failures.push(format!("{}: diagnose failed: {e}", d.name));
                } else if !e.to_string().contains(d.expect) {
                    failures.push(format!("{}: error {e:?} lacks {:?}", d.name, d.expect));
                }
                continue;
            }
        };
        if d.fatal {
            failures.push(format!("{}: expected a fatal error", d.name));
            continue;
        }
        let msgs: Vec<&str> = report.problems.iter().map(|p| p.message.as_str()).collect();
        if !msgs.iter().any(|m| m.contains(d.expect)) {
            failures.push(format!(
                "{}: no problem mentions {:?}: {msgs:#?}",
                d.name, d.expect
            ));
        }
        // Diagnosis changes nothing.
        let untouched = Arc::clone(&media);
        assert!(
            check_bytes_equal(&untouched, &img.bytes),
            "{}: diagnose wrote",
            d.name
        );
        let out = match repair(&media, &report, RepairMode::all()) {
            Ok(o) => o,
            Err(e) => {
                failures.push(format!("{}: repair failed: {e}", d.name));
                continue;
            }
        };
        if !out.changed() {
            failures.push(format!("{}: repair changed nothing", d.name));
        }
        if !out.report.problems.is_empty() {
            failures.push(format!(
                "{}: problems left after repair: {:#?}\nactions: {:#?}",
                d.name, out.report.problems, out.actions
            ));
            continue;
        }
        let again = diagnose(&media).unwrap();
        if !again.problems.is_empty() {
            failures.push(format!(
                "{}: second diagnosis: {:#?}",
                d.name, again.problems
            ));
        }
        match Fs::mount(Arc::clone(&media), MountOptions::default()) {
            Ok(fs) => {
                fs.shutdown().unwrap();
                let r = check(&media).unwrap();
                if !r.problems.is_empty() {
                    failures.push(format!("{}: after mount: {:#?}", d.name, r.problems));
                }
            }
            Err(e) => failures.push(format!("{}: mount after repair: {e}", d.name)),
        }
        eprintln!("{}: ok ({} actions)", d.name, out.actions.len());
        for a in &out.actions {
            eprintln!("    [{:?}] {}", a.class, a.message);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn check_bytes_equal(media: &Arc<dyn pmfs::device::Media>, bytes: &[u8]) -> bool {
    let mut buf = vec![0u8; bytes.len()];
    media.read(0, &mut buf).unwrap();
    buf == bytes
}

#[test]
fn preen_fixes_only_what_loses_nothing() {
    let base = common::build();
    // Link counts: preen-safe.
    let mut img = base.clone();
    for d in common::damages() {
        if d.name == "link-counts" {
            (d.apply)(&mut img);
        }
    }
    let media = img.media();
    let report = diagnose(&media).unwrap();
    let out = repair(&media, &report, RepairMode::preen()).unwrap();
    assert!(out.changed());
    assert!(out.report.problems.is_empty(), "{:#?}", out.report.problems);
    // An unreachable directory: preen does not move it to /lost+found.
    let mut img = base.clone();
    for d in common::damages() {
        if d.name == "unreachable" {
            (d.apply)(&mut img);
        }
    }
    let media = img.media();
    let report = diagnose(&media).unwrap();
    let out = repair(&media, &report, RepairMode::preen()).unwrap();
    assert!(
        out.actions.iter().all(|a| a.class.preen_safe()),
        "{:#?}",
        out.actions
    );
    assert!(!out.report.problems.is_empty());
    // Then -y finishes the job.
    let out = repair(&media, &out.report, RepairMode::all()).unwrap();
    assert!(out.report.problems.is_empty(), "{:#?}", out.report.problems);
    assert!(out.actions.iter().any(|a| a.class == Class::LostFound));
    let fs = Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap();
    let lf = fs.lookup(common::ROOT, b"lost+found").unwrap();
    let a = fs
        .lookup(lf.ino, format!("#{}", base.ino["/a"]).as_bytes())
        .unwrap();
    let b = fs.lookup(a.ino, b"b").unwrap();
    assert!(fs.lookup(b.ino, b"c").is_ok());
}

#[test]
fn no_repair_without_permission() {
    let base = common::build();
    let mut img = base.clone();
    for d in common::damages() {
        if d.name == "superblock" {
            (d.apply)(&mut img);
        }
    }
    let media = img.media();
    let report = diagnose(&media).unwrap();
    let out = repair(&media, &report, RepairMode::none()).unwrap();
    assert!(!out.changed());
    assert!(check_bytes_equal(&media, &img.bytes));
    assert!(!out.report.problems.is_empty());
}

/// A power failure at any fence of a repair leaves an image that a second repair brings to
/// a clean, mountable file system (each crash state rebuilt by the recording device: all
/// fenced stores plus subsets of the unflushed ones).
#[test]
fn a_crash_during_repair_is_repaired_by_the_next_run() {
    use pmfs::device::RecordingDevice;
    let base = common::build_sized(16 * common::MIB);
    for name in [
        "directory-node",
        "superblock",
        "extent-node",
        "bitmap",
        "unreachable",
    ] {
        let mut img = base.clone();
        let d = common::damages()
            .into_iter()
            .find(|d| d.name == name)
            .unwrap();
        (d.apply)(&mut img);
        let dev = Arc::new(RecordingDevice::from_image(img.bytes.clone()));
        let media: Arc<dyn pmfs::device::Media> = dev.clone();
        let report = diagnose(&media).unwrap();
        dev.start_recording();
        let out = repair(&media, &report, RepairMode::all()).unwrap();
        dev.stop_recording();
        assert!(
            out.report.problems.is_empty(),
            "{name}: {:#?}",
            out.report.problems
        );
        let fences = dev.fence_count();
        let step = (fences / 40).max(1);
        let mut states = 0;
        for f in (0..=fences).step_by(step) {
            for image in dev.crash_images(f).enumerate(3, 3, f as u64 + 11) {
                states += 1;
                let m: Arc<dyn pmfs::device::Media> = Arc::new(RecordingDevice::from_image(image));
                let report = diagnose(&m)
                    .unwrap_or_else(|e| panic!("{name}, crash at fence {f}: diagnose: {e}"));
                let out = repair(&m, &report, RepairMode::all())
                    .unwrap_or_else(|e| panic!("{name}, crash at fence {f}: repair: {e}"));
                assert!(
                    out.report.problems.is_empty(),
                    "{name}, crash at fence {f}: {:#?}",
                    out.report.problems
                );
                let fs = Fs::mount(Arc::clone(&m), MountOptions::default())
                    .unwrap_or_else(|e| panic!("{name}, crash at fence {f}: mount: {e}"));
                fs.shutdown().unwrap();
            }
        }
        eprintln!("{name}: {fences} fences, {states} crash states repaired");
    }
}

/// An inode the repair creates takes its generation by the core's rule
/// (`InodeTable::next_generation`): one more than a slot's last, or the clock for a slot
/// never used, so a file handle from a chunk given back never matches it. The repair used
/// to give a never-used slot generation 1 (and a damaged slot its raw generation + 1).
#[test]
fn repair_creates_inodes_with_the_cores_generation_rule() {
    let mut img = common::build();
    let unreachable = common::damages()
        .into_iter()
        .find(|d| d.name == "unreachable")
        .unwrap();
    (unreachable.apply)(&mut img);
    let media = img.media();
    let before = pmfs::fs::now_ns() as u64;
    let report = diagnose(&media).unwrap();
    let out = repair(&media, &report, RepairMode::all()).unwrap();
    assert!(out.report.problems.is_empty(), "{:#?}", out.report.problems);
    let fs = Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap();
    let lf = fs.lookup(common::ROOT, b"lost+found").unwrap();
    // /lost+found went to a slot never used before.
    assert!(lf.generation >= before, "generation {}", lf.generation);
}
