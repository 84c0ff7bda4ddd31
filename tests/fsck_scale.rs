//! How long fsck takes on a file system with many inodes (ignored by default: run with
//! `cargo test --release --test fsck_scale -- --ignored --nocapture`; `PMFS_SCALE_FILES`
//! sets the number of files, 200,000 by default). Files are created through the core's
//! operations on the in-memory device, 100 per directory in two levels of directories (100
//! subdirectories per top-level one), then the checker and fsck's diagnosis are timed, and a
//! full repair pass (the object-level rebuild walk, forced by one wrong link count).
#![allow(clippy::unwrap_used)]

use pmfs::device::{Media, RecordingDevice};
use pmfs::format::Inode;
use pmfs::fs::{Ctx, Fs, MountOptions};
use pmfs::mkfs::{MkfsOptions, format};
use pmfs::repair::{RepairMode, diagnose, repair};
use std::sync::Arc;
use std::time::Instant;
use zerocopy::{FromBytes, IntoBytes};

fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

#[test]
#[ignore = "slow: a scale measurement"]
fn fsck_time_for_many_inodes() {
    let files: u64 = std::env::var("PMFS_SCALE_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let per_dir = 100;
    // Inode table (2 MiB per 8188 inodes), directory trees, and room to spare.
    let size = ((files / 8188 + 2) * 2 + files / 2000 + 64).next_power_of_two() << 20;
    let dev = Arc::new(RecordingDevice::new(size));
    format(dev.as_ref(), &MkfsOptions::default()).unwrap();
    let media: Arc<dyn Media> = dev.clone();
    let c = Ctx::ROOT;
    let t = Instant::now();
    let fs = Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap();
    let (mut top, mut dir) = (1, 1);
    let mut last = 0;
    for k in 0..files {
        let d = k / per_dir;
        if k % (per_dir * per_dir) == 0 {
            top = fs
                .mkdir(&c, 1, format!("t{}", d / per_dir).as_bytes(), 0o755)
                .unwrap()
                .ino;
            fs.forget(top, 1);
        }
        if k % per_dir == 0 {
            dir = fs
                .mkdir(&c, top, format!("d{d}").as_bytes(), 0o755)
                .unwrap()
                .ino;
            fs.forget(dir, 1);
        }
        last = fs
            .mknod(&c, dir, format!("file-{k}").as_bytes(), 0o100644, 0)
            .unwrap()
            .ino;
        fs.forget(last, 1);
    }
    let last_off = fs.inode_table().offset(last).unwrap();
    fs.shutdown().unwrap();
    drop(fs);
    let created = t.elapsed();
    let t = Instant::now();
    let report = pmfs::check::check(&media).unwrap();
    let check = t.elapsed();
    assert!(
        report.problems.is_empty(),
        "{:?}",
        &report.problems[..3.min(report.problems.len())]
    );
    let t = Instant::now();
    let report = diagnose(&media).unwrap();
    let diag = t.elapsed();
    assert!(report.problems.is_empty());
    // One wrong link count: the repair walks and plans every object.
    let mut raw = [0u8; 256];
    media.read(last_off, &mut raw).unwrap();
    let mut i = Inode::read_from_bytes(&raw).unwrap();
    i.nlink += 1;
    i.seal();
    media.write(last_off, i.as_bytes()).unwrap();
    let report = diagnose(&media).unwrap();
    assert_eq!(report.problems.len(), 1);
    let t = Instant::now();
    let out = repair(&media, &report, RepairMode::all()).unwrap();
    let rep = t.elapsed();
    assert!(out.report.problems.is_empty());
    assert_eq!(out.actions.len(), 1, "{:?}", out.actions);
    eprintln!(
        "{files} files in {} directories on a {} MiB device: created in {created:.2?}; \
         check {check:.2?} ({:.1} us/inode), fsck diagnosis {diag:.2?}, repair of one link count \
         (full rebuild walk, then a check) {rep:.2?}; peak RSS {} MiB (the image itself is {} MiB)",
        files.div_ceil(per_dir) + files.div_ceil(per_dir * per_dir),
        size >> 20,
        check.as_secs_f64() * 1e6 / files as f64,
        peak_rss_mib(),
        size >> 20
    );
}
