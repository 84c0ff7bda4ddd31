//! 1 GiB extents on a plain image (a file in /dev/shm), through the file-system core as the
//! FUSE adapter drives it: files that grow by writes get 1 GiB-aligned extents, and mkfs
//! `--huge-regions` reserves regions that survive a remount and steer the allocator.
#![allow(clippy::unwrap_used)]

use pmfs::alloc::REGION_SIZE;
use pmfs::device::{Device, Media, OpenOptions, create_image};
use pmfs::format::{CompatFeatures, ROOT_INO};
use pmfs::fs::{Ctx, Fs, MountOptions};
use pmfs::mkfs::{HugeRegions, MkfsOptions, format};
use std::path::PathBuf;
use std::sync::Arc;

const GIB: u64 = REGION_SIZE;
const MIB: u64 = 1 << 20;
const C: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 0,
};

/// An image file in /dev/shm, removed on drop.
struct Image(PathBuf);

impl Image {
    fn new(name: &str, size: u64, huge_regions: HugeRegions) -> Self {
        let path = PathBuf::from(format!("/dev/shm/pmfs-{name}-{}.img", std::process::id()));
        let _ = std::fs::remove_file(&path);
        create_image(&path, size).unwrap();
        let dev = Device::open(&path, &OpenOptions::default()).unwrap();
        format(
            &dev,
            &MkfsOptions {
                huge_regions,
                ..MkfsOptions::default()
            },
        )
        .unwrap();
        Self(path)
    }

    fn media(&self) -> Arc<dyn Media> {
        Arc::new(Device::open(&self.0, &OpenOptions::default()).unwrap())
    }

    fn mount(&self) -> Fs {
        Fs::mount(self.media(), MountOptions::default()).unwrap()
    }

    /// fsck finds nothing (the file system must be unmounted).
    fn assert_clean(&self) {
        let report = pmfs::check::check(&self.media()).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn create(fs: &Fs, name: &str) -> u64 {
    fs.mknod(&C, ROOT_INO, name.as_bytes(), 0o100644, 0)
        .unwrap()
        .ino
}

/// The device offset of file offset 0 and the length of the extent there, as `pmfs layout`
/// shows them (records that continue each other are one entry).
fn first_extent(fs: &Fs, ino: u64) -> (u64, u64) {
    let layout = fs.layout(ino).unwrap();
    let e = layout.first().unwrap();
    assert_eq!(e.file_offset, 0, "{layout:?}");
    (e.device_offset, e.len)
}

/// Two files grow at the same time, one by 1 MiB writes (dd) and one by 4 KiB appends,
/// interleaved, past 1 GiB: each one's first GiB is one 1 GiB-aligned extent (file offset
/// and device offset both aligned), so a direct mapping can map it with one PUD entry.
/// Before growing files were given regions, their first GiB was 2 MiB chunks wherever the
/// pool had them.
#[test]
fn files_growing_past_1_gib_get_1_gib_aligned_extents() {
    let image = Image::new("growth", 4 * GIB, HugeRegions::default());
    let fs = image.mount();
    let dd = create(&fs, "dd");
    let appended = create(&fs, "appended");
    let big = vec![0x5au8; MIB as usize];
    let small = vec![0xa5u8; 4096];
    let target = GIB + 4 * MIB;
    let mut off = 0;
    while off < target {
        fs.write(&C, dd, off, &big).unwrap();
        for k in 0..MIB / 4096 {
            fs.write(&C, appended, off + k * 4096, &small).unwrap();
        }
        off += MIB;
    }
    for (name, ino) in [("dd", dd), ("appended", appended)] {
        let (device, len) = first_extent(&fs, ino);
        assert_eq!(device % GIB, 0, "{name}: first extent at device {device}");
        assert!(len >= GIB, "{name}: first extent of {len} bytes");
    }
    // The data survived the move to the region (the first 32 MiB were copied).
    let mut back = Vec::new();
    fs.read(appended, 4096 * 7, 4096, &mut |b| back.extend_from_slice(b))
        .unwrap();
    assert_eq!(back, small);
    fs.shutdown().unwrap();
    drop(fs);
    image.assert_clean();
}

/// mkfs `--huge-regions 2` on a 4 GiB device: the superblock keeps the reservation, a
/// remount honours it, small files stay out of the last two regions until the rest of the
/// device is full, then spill into them (no ENOSPC while space is free), and a 1 GiB file
/// takes a reserved region.
#[test]
fn reserved_regions_survive_remount_and_are_used_last_by_small_files() {
    let image = Image::new("reserved", 4 * GIB, HugeRegions::Count(2));
    let reserved_start = 2 * GIB;
    let fs = image.mount();
    let sb = fs.superblock();
    assert_ne!(sb.compat & CompatFeatures::HUGE_REGIONS.bits(), 0);
    assert_eq!(sb.huge_regions, 2);
    assert_eq!(fs.allocator().reserved_regions(), 2);
    let region = create(&fs, "region");
    fs.fallocate(&C, region, 0, GIB, 0).unwrap();
    let (device, _) = first_extent(&fs, region);
    assert_eq!(
        device, reserved_start,
        "the 1 GiB file takes the first reserved region"
    );
    fs.shutdown().unwrap();
    drop(fs);

    let fs = image.mount();
    assert_eq!(fs.allocator().reserved_regions(), 2, "lost at remount");
    let data = vec![7u8; MIB as usize];
    let mut files = 0;
    let spilled_at = loop {
        let free_before = fs.statfs().bfree * 4096;
        let ino = create(&fs, &format!("f{files}"));
        files += 1;
        fs.write(&C, ino, 0, &data).unwrap();
        let layout = fs.layout(ino).unwrap();
        if layout
            .iter()
            .any(|e| e.device_offset + e.len > reserved_start)
        {
            break free_before;
        }
    };
    // Only the last reserved region (1 GiB) and a few blocks were left when a small file
    // first went into it.
    assert!(
        spilled_at <= GIB + 2 * MIB,
        "a small file went into a reserved region with {spilled_at} bytes free"
    );
    // The spill goes on until the device is full.
    let mut written = 0;
    while let Ok(a) = fs.mknod(&C, ROOT_INO, format!("g{written}").as_bytes(), 0o100644, 0) {
        if fs.write(&C, a.ino, 0, &data).is_err() {
            break;
        }
        written += 1;
    }
    assert!(
        written * MIB >= GIB - 64 * MIB,
        "only {written} MiB written into the last reserved region"
    );
    fs.shutdown().unwrap();
    drop(fs);
    image.assert_clean();
}
