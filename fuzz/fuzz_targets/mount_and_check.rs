//! Feeds mutated pmfs images to the checker, fsck's diagnosis and repair, and the mount path.
//!
//! The input is a list of patches (4-byte little-endian offset, 1 byte value) applied to a
//! small valid image built once: the fuzzer explores damage to a real file system instead of
//! random bytes that never get past the superblock checksum. Offsets are taken modulo the
//! metadata area (the first 8 MiB: superblocks, journal, bitmap, inode table, the first
//! tree nodes) when the top bit of the offset is clear, and modulo the whole image otherwise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pmfs::device::{Media, RecordingDevice};
use pmfs::fs::{Ctx, Fs, MountOptions};
use pmfs::repair::{RepairMode, diagnose, repair};
use std::sync::{Arc, OnceLock};

const SIZE: u64 = 16 << 20;

fn base() -> &'static Vec<u8> {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let dev = Arc::new(RecordingDevice::new(SIZE));
        pmfs::mkfs::format(dev.as_ref(), &pmfs::mkfs::MkfsOptions::default()).expect("format");
        let media: Arc<dyn Media> = dev.clone();
        let fs = Fs::mount(media, MountOptions::default()).expect("mount");
        let c = Ctx::ROOT;
        let d = fs.mkdir(&c, 1, b"dir", 0o755).expect("mkdir").ino;
        for k in 0..200u32 {
            fs.mknod(&c, d, format!("f{k}").as_bytes(), 0o100644, 0)
                .expect("mknod");
        }
        let f = fs.mknod(&c, 1, b"frag", 0o100644, 0).expect("mknod").ino;
        for k in 0..40u64 {
            fs.write(&c, f, 2 * k * 4096, &[k as u8; 4096])
                .expect("write");
        }
        fs.symlink(&c, d, b"link", &[b'x'; 200]).expect("symlink");
        fs.setxattr(f, b"user.a", b"b", 0).expect("setxattr");
        fs.shutdown().expect("shutdown");
        drop(fs);
        dev.snapshot()
    })
}

fuzz_target!(|data: &[u8]| {
    let mut img = base().clone();
    for p in data.chunks_exact(5) {
        let raw = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
        let off = u64::from(raw & 0x7fff_ffff);
        let off = if raw >> 31 == 0 {
            off % (8 << 20)
        } else {
            off % SIZE
        };
        img[off as usize] = p[4];
    }
    let media: Arc<dyn Media> = Arc::new(RecordingDevice::from_image(img.clone()));
    let _ = pmfs::check::check(&media);
    if let Ok(report) = diagnose(&media) {
        if let Ok(out) = repair(&media, &report, RepairMode::all()) {
            if out.report.problems.is_empty() {
                Fs::mount(Arc::clone(&media), MountOptions::default())
                    .expect("a repaired file system mounts");
            }
        }
    }
    let media: Arc<dyn Media> = Arc::new(RecordingDevice::from_image(img));
    if let Ok(fs) = Fs::mount(media, MountOptions::default()) {
        let _ = fs.readdir(1, 0, &mut |_, _, _, _| false);
        let _ = fs
            .lookup(1, b"frag")
            .map(|a| fs.read(a.ino, 0, 1 << 20, &mut |_| {}));
        let _ = fs.shutdown();
    }
});
