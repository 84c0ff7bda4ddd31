//! Sparse images in the core: every store lands in reserved space, a full backing store is
//! ENOSPC (never a fault), and FITRIM hands free chunks back. On the recording device's
//! sparse model (`RecordingDevice::model_sparse`), a store into a chunk nobody reserved
//! fails with `NotReserved`: where a real sparse image on a full file system raises SIGBUS.

use super::*;
use crate::device::{DeviceError, RecordingDevice};
use crate::format::{CHUNK_SIZE, ROOT_INO};
use crate::mkfs::{MkfsOptions, format};

const MIB: u64 = 1 << 20;
const C: Ctx = Ctx::ROOT;

/// A formatted device of `size` bytes that models a sparse image from before mkfs on.
fn sparse_device(size: u64) -> Arc<RecordingDevice> {
    let dev = Arc::new(RecordingDevice::new(size));
    dev.model_sparse();
    format(dev.as_ref(), &MkfsOptions::default()).unwrap();
    dev
}

fn mount(dev: &Arc<RecordingDevice>) -> Fs {
    let media: Arc<dyn Media> = dev.clone();
    Fs::mount(media, MountOptions::default()).unwrap()
}

fn check(fs: &Fs) {
    let report = crate::check::check(fs.media()).unwrap();
    assert!(
        report.problems.is_empty(),
        "consistency check: {:#?}",
        report.problems
    );
    fs.allocator()
        .check_against_bitmap(fs.media().as_ref())
        .unwrap();
}

fn read_all(fs: &Fs, ino: u64) -> Vec<u8> {
    let size = fs.getattr(ino).unwrap().size;
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        fs.read(ino, out.len() as u64, 1 << 20, &mut |d| {
            out.extend_from_slice(d)
        })
        .unwrap();
    }
    out
}

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn new_file(fs: &Fs, parent: u64, name: &str) -> u64 {
    fs.mknod(&C, parent, name.as_bytes(), 0o100644, 0)
        .unwrap()
        .ino
}

/// Everything that hands out space reserves it first: mkfs, the mount, file data (small
/// blocks, whole chunks, the move of a file's first 2 MiB), directory B+tree nodes,
/// xattrs, and a grown inode table. Without the reservations the first store into a data
/// chunk fails with `NotReserved`.
#[test]
fn every_store_on_a_sparse_image_lands_in_reserved_space() {
    let dev = sparse_device(64 * MIB);
    let fs = mount(&dev);
    let d = fs.mkdir(&C, ROOT_INO, b"d", 0o755).unwrap().ino;
    let small = new_file(&fs, d, "small");
    fs.write(&C, small, 0, b"a few bytes").unwrap();
    let big = new_file(&fs, ROOT_INO, "big");
    let data = pattern(9 * MIB + 123, 5);
    // In two writes: the second takes the file past 2 MiB and moves its first 2 MiB.
    fs.write(&C, big, 0, &data[..MIB as usize]).unwrap();
    fs.write(&C, big, MIB, &data[MIB as usize..]).unwrap();
    fs.setxattr(small, b"user.k", &[7; 3000], 0).unwrap();
    fs.fallocate(&C, small, 0, 3 * MIB, 0).unwrap();
    // More files than the first inode-table chunk holds: the table grows by a chunk, and
    // the directory's B+tree splits many times.
    let first_chunk = fs.inode_table().capacity(0);
    for i in 0..first_chunk + 10 {
        new_file(&fs, d, &format!("f{i}"));
    }
    assert!(fs.inode_table().capacity(0) > first_chunk, "the table grew");
    assert!(read_all(&fs, big) == data, "big reads back changed");
    check(&fs);
    fs.shutdown().unwrap();
    drop(fs);
    // A new mount (a new process: nothing is known reserved) reserves what is in use.
    dev.model_sparse();
    let fs = mount(&dev);
    assert!(read_all(&fs, big) == data, "big reads back changed");
    fs.unlink(ROOT_INO, b"big").unwrap();
    let again = new_file(&fs, ROOT_INO, "again");
    fs.write(&C, again, 0, &pattern(5 * MIB, 9)).unwrap();
    check(&fs);
}

/// A backing store that fills up: the write that needs new space gets ENOSPC, nothing is
/// half done, the mount stays writable, earlier data reads back, and writing works again
/// once there is space.
#[test]
fn a_full_backing_store_is_enospc_and_rolls_back_cleanly() {
    let dev = sparse_device(64 * MIB);
    let fs = mount(&dev);
    let keep = new_file(&fs, ROOT_INO, "keep");
    let kept = pattern(3 * MIB, 1);
    fs.write(&C, keep, 0, &kept).unwrap();
    let reserved = dev.reserved_chunks();
    dev.fail_reserves(true);
    let f = new_file(&fs, ROOT_INO, "f");
    let e = fs.write(&C, f, 0, &pattern(4 * MIB, 2)).unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert_eq!(
        fs.getattr(f).unwrap().size,
        0,
        "nothing of the write stayed"
    );
    let e = fs.fallocate(&C, f, 0, 4 * MIB, 0).unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert_eq!(dev.reserved_chunks(), reserved);
    assert!(!fs.is_read_only(), "ENOSPC is not a failed commit");
    assert!(read_all(&fs, keep) == kept, "keep reads back changed");
    check(&fs);
    dev.fail_reserves(false);
    let data = pattern(4 * MIB, 3);
    fs.write(&C, f, 0, &data).unwrap();
    assert!(read_all(&fs, f) == data, "f reads back changed");
    check(&fs);
}

/// A mount that cannot back the metadata and the blocks in use refuses, with the device's
/// "no space" error, rather than fault later.
#[test]
fn mount_refuses_when_the_space_in_use_cannot_be_backed() {
    let dev = sparse_device(32 * MIB);
    dev.model_sparse(); // a new process: nothing is known reserved
    dev.fail_reserves(true);
    let media: Arc<dyn Media> = dev.clone();
    let e = Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Device(DeviceError::NoSpace(_))), "{e:?}");
    assert_eq!(e.errno(), libc::ENOSPC);
    // Read-only needs no space.
    let ro = MountOptions {
        read_only: true,
        ..MountOptions::default()
    };
    Fs::mount(media, ro).unwrap();
}

#[test]
fn fitrim_hands_free_chunks_back_and_they_are_reserved_again_on_reuse() {
    let dev = sparse_device(64 * MIB);
    let fs = mount(&dev);
    let keep = new_file(&fs, ROOT_INO, "keep");
    let kept = pattern(5 * MIB, 4);
    fs.write(&C, keep, 0, &kept).unwrap();
    let big = new_file(&fs, ROOT_INO, "big");
    fs.write(&C, big, 0, &pattern(20 * MIB, 6)).unwrap();
    let before = dev.reserved_chunks();
    fs.unlink(ROOT_INO, b"big").unwrap();
    let size = fs.geometry().block_count * BLOCK_SIZE;
    let trimmed = fs.trim(0, u64::MAX, 0).unwrap();
    // Every whole free chunk is discarded (counted as ext4 does), among them the ten the
    // big file had.
    let free_chunks = fs.allocator().free_chunks();
    assert_eq!(trimmed, free_chunks * CHUNK_SIZE);
    assert!(free_chunks >= 10 && trimmed < size, "{free_chunks}");
    assert!(
        dev.reserved_chunks() + 10 <= before,
        "{} of {before} chunks still reserved",
        dev.reserved_chunks()
    );
    assert!(read_all(&fs, keep) == kept, "keep reads back changed");
    check(&fs);
    // The chunks are reserved again when handed out: the model would refuse the stores
    // otherwise.
    let again = new_file(&fs, ROOT_INO, "again");
    let data = pattern(20 * MIB, 8);
    fs.write(&C, again, 0, &data).unwrap();
    assert!(read_all(&fs, again) == data, "again reads back changed");
    // A range and a minimum: only chunks inside the range, runs of at least `minlen`.
    fs.unlink(ROOT_INO, b"again").unwrap();
    let part = fs.trim(8 * MIB + 1, 8 * MIB, 0).unwrap();
    assert!(part <= 6 * MIB && part % CHUNK_SIZE == 0, "{part}");
    assert_eq!(fs.trim(0, u64::MAX, size).unwrap() % CHUNK_SIZE, 0);
    check(&fs);
}

#[test]
fn fitrim_arguments_and_media_that_cannot_discard() {
    let dev = sparse_device(32 * MIB);
    let fs = mount(&dev);
    let size = fs.geometry().block_count * BLOCK_SIZE;
    for (start, len, minlen) in [
        (size, u64::MAX, 0),
        (u64::MAX, MIB, 0),
        (0, 100, 0),
        (0, u64::MAX, size + 1),
    ] {
        assert!(
            matches!(fs.trim(start, len, minlen), Err(Error::Invalid)),
            "start {start} len {len} minlen {minlen}"
        );
    }
    drop(fs);
    // A preallocated image (the recording device without the sparse model).
    let plain = Arc::new(RecordingDevice::new(32 * MIB));
    format(plain.as_ref(), &MkfsOptions::default()).unwrap();
    let fs = mount(&plain);
    let e = fs.trim(0, u64::MAX, 0).unwrap_err();
    assert_eq!(e.errno(), libc::EOPNOTSUPP, "{e}");
    let ro = MountOptions {
        read_only: true,
        ..MountOptions::default()
    };
    drop(fs);
    let media: Arc<dyn Media> = dev.clone();
    let fs = Fs::mount(media, ro).unwrap();
    assert_eq!(fs.trim(0, u64::MAX, 0).unwrap_err().errno(), libc::EROFS);
}

/// FITRIM racing writers and deleters: a chunk is never punched while handed out (the
/// model would zero a live file's data or refuse its stores), every file reads back.
#[test]
fn fitrim_racing_writers_never_punches_a_chunk_in_use() {
    use super::concurrency_tests::{Progress, run_watched};
    use std::sync::atomic::{AtomicU64, Ordering};
    let dev = sparse_device(128 * MIB);
    let fs = Arc::new(mount(&dev));
    let progress = Progress::default();
    let writers_done = Arc::new(AtomicU64::new(0));
    let trimmed = Arc::new(AtomicU64::new(0));
    const WRITERS: u64 = 4;
    let mut workers: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
    for w in 0..WRITERS {
        let (fs, progress, done) = (Arc::clone(&fs), progress.clone(), Arc::clone(&writers_done));
        workers.push(Box::new(move || {
            // Counted when the writer ends, also by a panic: the trimmer stops then.
            struct Done(Arc<AtomicU64>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.fetch_add(1, Ordering::SeqCst);
                }
            }
            let _done = Done(done);
            for i in 0..30u64 {
                let name = format!("w{w}-{i}");
                let ino = new_file(&fs, ROOT_INO, &name);
                // Small files, whole chunks, and files that cross the 2 MiB mark.
                let len = [10_000, 2 * MIB + 4096, 5 * MIB][(i % 3) as usize];
                let data = pattern(len, (w * 31 + i) as u8);
                fs.write(&C, ino, 0, &data).unwrap();
                assert!(read_all(&fs, ino) == data, "{name} reads back changed");
                if i % 5 != 0 {
                    fs.unlink(ROOT_INO, name.as_bytes()).unwrap();
                }
                progress.tick();
            }
        }));
    }
    {
        let (fs, progress, done, trimmed) = (
            Arc::clone(&fs),
            progress.clone(),
            Arc::clone(&writers_done),
            Arc::clone(&trimmed),
        );
        workers.push(Box::new(move || {
            while done.load(Ordering::SeqCst) < WRITERS {
                let n = fs.trim(0, u64::MAX, 0).unwrap();
                trimmed.fetch_add(n, Ordering::Relaxed);
                progress.tick();
            }
        }));
    }
    run_watched("fitrim-race", &progress, workers);
    assert!(trimmed.load(Ordering::Relaxed) > 0);
    // The files kept (every fifth) read back after one more trim.
    fs.trim(0, u64::MAX, 0).unwrap();
    for w in 0..WRITERS {
        for i in (0..30u64).step_by(5) {
            let a = fs.lookup(ROOT_INO, format!("w{w}-{i}").as_bytes()).unwrap();
            let len = [10_000, 2 * MIB + 4096, 5 * MIB][(i % 3) as usize];
            assert!(
                read_all(&fs, a.ino) == pattern(len, (w * 31 + i) as u8),
                "w{w}-{i} reads back changed"
            );
        }
    }
    check(&fs);
}
