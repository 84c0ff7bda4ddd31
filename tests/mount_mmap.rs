//! write(2) racing stores through a shared mapping of the same file, through a real mount
//! with the default `cache=direct` (issue 15, xfstests generic/346). Every byte is checked
//! afterwards, through the mapping and through read(2). Needs root and /dev/fuse.
//!
//! The race: one thread writes an 8-byte marker into every page with pwrite(2) while another
//! stores its own marker into the other half of every page through a `MAP_SHARED` mapping.
//! write(2) bypasses the page cache (FOPEN_DIRECT_IO): a fault during the write fills the
//! page from pmfs before the write lands, and without src/fuse/coherence.rs the page's later
//! writeback puts the old bytes back over the written ones (this test failed 4 of 4 runs so).

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use pmfs::device::SharedFileMapping;
use std::fs::{self, File, OpenOptions as FileOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Both markers sit in every 4 KiB block, in different halves (holetest's offsets).
const BLOCK: usize = 4096;
const WRITE_AT: usize = BLOCK / 4;
const STORE_AT: usize = 3 * BLOCK / 4;

/// No marker landing for this long is a hang.
const STALL: Duration = Duration::from_secs(15);

/// What a checked file must hold at 8-byte word `at`.
fn expected(at: usize, wmark: u64, smark: u64) -> u64 {
    match at % BLOCK {
        WRITE_AT => wmark,
        STORE_AT => smark,
        _ => 0,
    }
}

/// Every wrong 8-byte word of `words` (offset, found, wanted), at most 8 of them, and their count.
fn wrong_words(
    words: impl Iterator<Item = (usize, u64)>,
    wmark: u64,
    smark: u64,
) -> (usize, Vec<String>) {
    let mut n = 0;
    let mut shown = Vec::new();
    for (at, v) in words {
        let want = expected(at, wmark, smark);
        if v != want {
            n += 1;
            if shown.len() < 8 {
                shown.push(format!("{at:#x}: {v:#018x} != {want:#018x}"));
            }
        }
    }
    (n, shown)
}

/// One round of holetest -w: a zero-filled file of `len` bytes, then pwrite(2) of a marker
/// into every block (through `writer`, or through the mapping's own descriptor) racing a
/// store of another marker into every block through a shared mapping.
fn race_round(m: &Mount, round: usize, len: usize, separate_writer: bool) {
    let path = m.path(&format!("race-{round}"));
    let file = FileOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    file.set_len(len as u64).unwrap();
    // Zero-fill through a mapping first, as holetest does: the page cache then holds the
    // file's pages, dirty, when the race starts.
    {
        let fill = SharedFileMapping::map(&file).unwrap();
        for at in (0..len).step_by(8) {
            fill.store_u64(at, 0);
        }
    }
    let map = SharedFileMapping::map(&file).unwrap();
    let writer = if separate_writer {
        FileOptions::new().write(true).open(&path).unwrap()
    } else {
        file.try_clone().unwrap()
    };
    let wmark = 0x5752_0000_0000_0000 | (round as u64) << 32 | 0x1111;
    let smark = 0x5354_0000_0000_0000 | (round as u64) << 32 | 0x2222;
    let how = if separate_writer {
        "separate"
    } else {
        "same-descriptor"
    };
    let progress = AtomicU64::new(0);
    let started = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let (map, writer, progress, started) = (&map, &writer, &progress, &started);
        let w = s.spawn(move || {
            for block in (0..len).step_by(BLOCK) {
                started.store(block, Ordering::Release);
                writer
                    .write_all_at(&wmark.to_ne_bytes(), (block + WRITE_AT) as u64)
                    .unwrap();
                progress.fetch_add(1, Ordering::Relaxed);
            }
        });
        let st = s.spawn(move || {
            for block in (0..len).step_by(BLOCK) {
                // Store into a block once its pwrite has started: the store then faults
                // the page in while the write is on its way, the window of the race.
                while started.load(Ordering::Acquire) < block {
                    std::thread::yield_now();
                }
                map.store_u64(block + STORE_AT, smark);
                progress.fetch_add(1, Ordering::Relaxed);
            }
        });
        let mut last = (progress.load(Ordering::Relaxed), Instant::now());
        while !(w.is_finished() && st.is_finished()) {
            std::thread::sleep(Duration::from_millis(20));
            let now = progress.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            } else {
                assert!(
                    last.1.elapsed() < STALL,
                    "round {round}: no marker landed for {STALL:?} after {now}: the mount hangs"
                );
            }
        }
    });

    // Through the mapping, before it is written back...
    let (bad, shown) = wrong_words(
        (0..len).step_by(8).map(|at| (at, map.load_u64(at))),
        wmark,
        smark,
    );
    assert_eq!(
        bad, 0,
        "round {round} ({len} bytes, {how} writer): {bad} wrong words seen through the mapping: {shown:?}"
    );
    // ...and through read(2) after it was written back and unmapped.
    map.flush().unwrap();
    drop(map);
    drop(writer);
    drop(file);
    let mut data = Vec::with_capacity(len);
    File::open(&path).unwrap().read_to_end(&mut data).unwrap();
    assert_eq!(data.len(), len);
    let (bad, shown) = wrong_words(
        data.chunks_exact(8)
            .enumerate()
            .map(|(i, w)| (i * 8, u64::from_ne_bytes(w.try_into().unwrap()))),
        wmark,
        smark,
    );
    assert_eq!(
        bad, 0,
        "round {round} ({len} bytes, {how} writer): {bad} wrong words read back with read(2): {shown:?}"
    );
    fs::remove_file(&path).unwrap();
}

/// Issue 15: with `cache=direct`, bytes written with write(2) while another thread stored
/// into the same pages through a shared mapping read back as zeros.
#[test]
fn write_racing_shared_mmap_stores_loses_nothing() {
    can_mount();
    let img = Image::new("mmap-race", 256 * MIB);
    let m = Mount::new(&img, "");
    for round in 0..8 {
        let len = if round % 4 == 3 { 16 * MIB } else { 8 * MIB } as usize;
        race_round(&m, round, len, round % 2 == 1);
    }
    m.unmount();
}
